//! The io_uring engine: one ring, owned and driven by the client's completion thread.
//!
//! The ring is created on that thread with `SINGLE_ISSUER | DEFER_TASKRUN` (as fio
//! does), so only that thread ever submits or reaps, completions never depend on
//! another thread entering the kernel, and batches of SQEs go in with one
//! `io_uring_enter`. Other threads hand requests over through the dispatcher's
//! inbox and wake the ring with an eventfd that the ring itself reads.
//!
//! This file is part of the crate's unsafe boundary: pushing an SQE publishes raw
//! pointers to the kernel.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, unbounded};
use io_uring::{IoUring, Probe, opcode, squeue, types};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::{Engine, EngineKind, EngineWaker, IoOp, OpBuf, OpKind, Wait};

/// The user_data of the eventfd read that wakes the ring.
const WAKE_TOKEN: u64 = u64::MAX;
/// `BLOCK_URING_CMD_DISCARD`, `_IO(0x12, 0)`.
const BLOCK_URING_CMD_DISCARD: u32 = 0x12 << 8;
/// How long a batched wait holds out for its whole batch before it returns with
/// the completions it has (`IORING_FEAT_MIN_TIMEOUT`, Linux 6.12).
const BATCH_MIN_WAIT_US: u32 = 10;
/// The overall bound of a batched wait (see `Wait::Batch`): long, since any
/// completion or wake-up ends the wait first.
const BATCH_MAX_WAIT_SECS: u64 = 60;
/// Slots in the sparse registered-buffer table.
const BUFFER_TABLE_SLOTS: u32 = 16;

struct EventFdWaker {
    fd: EventFd,
}

impl EngineWaker for EventFdWaker {
    fn wake(&self) {
        // A full counter (EAGAIN) still leaves the eventfd readable, which is all
        // the ring needs to wake.
        let _ = self.fd.write(1);
    }
}

/// Runs ops that io_uring cannot express on this kernel (discard on block devices
/// before 6.12) with blocking system calls on a helper thread.
struct BlockingHelper {
    tx: Sender<IoOp>,
    rx: Receiver<(u64, i32)>,
    _thread: std::thread::JoinHandle<()>,
}

pub(crate) struct UringEngine {
    ring: IoUring,
    waker: Arc<EventFdWaker>,
    /// The eventfd read's target buffer. Boxed so its address is stable while
    /// the read is in flight; `Drop` completes and reaps the read before the box
    /// is freed (or leaks the box).
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    /// Registered buffers: (start address, length, index).
    buffers: Vec<(usize, usize, u16)>,
    buffer_table: bool,
    cmd_discard: bool,
    /// Whether the kernel can bound a batched wait (`IORING_FEAT_MIN_TIMEOUT`).
    min_timeout: bool,
    helper: Option<BlockingHelper>,
    /// Completions made up locally (an op the helper thread could not take).
    local: Vec<(u64, i32)>,
}

impl UringEngine {
    /// Creates a ring of `entries` SQEs (and twice as many CQEs). Must be called on
    /// the thread that will drive it.
    pub(crate) fn new(entries: u32) -> io::Result<UringEngine> {
        let attempts: [&dyn Fn(&mut io_uring::Builder); 3] = [
            &|b| {
                b.setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_taskrun_flag()
                    .setup_coop_taskrun()
                    .setup_submit_all();
            },
            &|b| {
                b.setup_coop_taskrun().setup_taskrun_flag();
            },
            &|_| {},
        ];
        let mut last_err = None;
        let mut ring = None;
        for configure in attempts {
            let mut builder = IoUring::builder();
            builder.setup_cqsize(entries.saturating_mul(2)).setup_clamp();
            configure(&mut builder);
            match builder.build(entries) {
                Ok(r) => {
                    ring = Some(r);
                    break;
                }
                // EINVAL means a flag is unknown to this kernel: try fewer flags.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        let Some(ring) = ring else {
            return Err(last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)));
        };
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in
            [opcode::Read::CODE, opcode::Write::CODE, opcode::Readv::CODE, opcode::Fsync::CODE]
        {
            if !probe.is_supported(code) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
        }
        let buffer_table = ring.submitter().register_buffers_sparse(BUFFER_TABLE_SLOTS).is_ok()
            && probe.is_supported(opcode::ReadFixed::CODE);
        let cmd_discard = probe.is_supported(opcode::UringCmd16::CODE) && kernel_at_least(6, 12);
        let min_timeout = ring.params().is_feature_min_timeout();
        let fd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).map_err(io::Error::from)?;
        let mut engine = UringEngine {
            ring,
            waker: Arc::new(EventFdWaker { fd }),
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            buffers: Vec::new(),
            buffer_table,
            cmd_discard,
            min_timeout,
            helper: None,
            local: Vec::new(),
        };
        engine.arm_wake();
        Ok(engine)
    }

    fn arm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        let entry = opcode::Read::new(
            types::Fd(self.waker.fd.as_fd().as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(WAKE_TOKEN);
        // SAFETY: the read targets `wake_buf`, a heap buffer owned by the engine
        // that outlives the ring's use of it (the engine owns the ring, and the
        // buffer is never reallocated).
        if unsafe { self.ring.submission().push(&entry) }.is_ok() {
            self.wake_armed = true;
        }
    }

    fn helper(&mut self) -> Option<&BlockingHelper> {
        if self.helper.is_none() {
            let waker = self.waker.clone();
            let (tx, op_rx) = unbounded::<IoOp>();
            let (done_tx, rx) = unbounded();
            let spawned =
                std::thread::Builder::new().name("dmio-blocking".into()).spawn(move || {
                    for op in op_rx {
                        // SAFETY: the dispatcher keeps the op's memory alive until it
                        // has reaped this op's completion (see execute_blocking).
                        let res = unsafe { crate::sys::execute_blocking(&op) };
                        if done_tx.send((op.user_data, res)).is_err() {
                            break;
                        }
                        waker.wake();
                    }
                });
            if let Ok(thread) = spawned {
                self.helper = Some(BlockingHelper { tx, rx, _thread: thread });
            }
        }
        self.helper.as_ref()
    }

    fn build(&self, op: &IoOp) -> squeue::Entry {
        let fd = types::Fd(op.fd);
        // Every read and write opcode takes the same offset, priority and flags.
        macro_rules! rw {
            ($builder:expr) => {
                $builder.offset(op.offset).ioprio(op.ioprio).rw_flags(op.rw_flags).build()
            };
        }
        let entry = match (op.kind, op.buf) {
            (OpKind::Read, OpBuf::Single { addr, len, fixed: Some(index) }) => {
                rw!(opcode::ReadFixed::new(fd, addr as *mut u8, len as u32, index))
            }
            (OpKind::Read, OpBuf::Single { addr, len, fixed: None }) => {
                rw!(opcode::Read::new(fd, addr as *mut u8, len as u32))
            }
            (OpKind::Read, OpBuf::Vectored { iov, count }) => {
                rw!(opcode::Readv::new(fd, iov as *const libc::iovec, count))
            }
            (OpKind::Write, OpBuf::Single { addr, len, fixed: Some(index) }) => {
                rw!(opcode::WriteFixed::new(fd, addr as *const u8, len as u32, index))
            }
            (OpKind::Write, OpBuf::Single { addr, len, fixed: None }) => {
                rw!(opcode::Write::new(fd, addr as *const u8, len as u32))
            }
            (OpKind::Write, OpBuf::Vectored { iov, count }) => {
                rw!(opcode::Writev::new(fd, iov as *const libc::iovec, count))
            }
            (OpKind::Read | OpKind::Write, OpBuf::None) => {
                // Not produced by the dispatcher; fail the op rather than panic.
                return opcode::Nop::new().build().user_data(op.user_data | NOP_EINVAL);
            }
            (OpKind::Flush, _) => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            (OpKind::PunchHole | OpKind::ZeroRange, _) => {
                let mode = if op.kind == OpKind::PunchHole {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                opcode::Fallocate::new(fd, op.len).offset(op.offset).mode(mode).build()
            }
            (OpKind::BlockDiscard, _) => {
                let mut cmd = [0u8; 16];
                cmd[..8].copy_from_slice(&op.len.to_ne_bytes());
                opcode::UringCmd16::new(fd, BLOCK_URING_CMD_DISCARD)
                    .addr(Some(op.offset))
                    .cmd(cmd)
                    .build()
            }
        };
        entry.user_data(op.user_data)
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The eventfd read still targets `wake_buf`. Complete it (by waking) and
        // reap its completion before the buffer is freed; if that cannot be
        // confirmed, leak the 8 bytes rather than free memory the kernel may write.
        if !self.wake_armed {
            return;
        }
        self.waker.wake();
        for _ in 0..1000 {
            let _ = self.ring.submitter().submit_and_wait(1);
            if self.ring.completion().any(|cqe| cqe.user_data() == WAKE_TOKEN) {
                return;
            }
        }
        Box::leak(std::mem::replace(&mut self.wake_buf, Box::new([0; 8])));
    }
}

/// Marks a NOP that stands for an invalid op: its completion is turned into EINVAL.
const NOP_EINVAL: u64 = 1 << 62;

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(uts) = nix::sys::utsname::uname() else {
        return false;
    };
    let release = uts.release().to_string_lossy().into_owned();
    let mut parts =
        release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let (Some(a), Some(b)) = (parts.next(), parts.next()) else {
        return false;
    };
    (a, b) >= (major, minor)
}

impl Engine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn push(&mut self, op: &IoOp) -> bool {
        if op.kind == OpKind::BlockDiscard && !self.cmd_discard {
            let sent = self.helper().is_some_and(|helper| helper.tx.send(*op).is_ok());
            if !sent {
                self.local.push((op.user_data, -libc::EAGAIN));
            }
            return true;
        }
        let entry = self.build(op);
        // SAFETY: every pointer in the entry names memory owned by the dispatcher's
        // request slot (data buffers) or op slot (iovec arrays), which are released
        // only after this op's completion has been reaped; the engine (and so the
        // ring) never outlives the dispatcher's in-flight ops.
        unsafe { self.ring.submission().push(&entry) }.is_ok()
    }

    fn submit_and_wait(&mut self, wait: Wait) -> io::Result<()> {
        self.arm_wake();
        let wait = if self.local.is_empty() { wait } else { Wait::No };
        let submitter = self.ring.submitter();
        let result = match wait {
            Wait::No => submitter.submit(),
            Wait::Forever => submitter.submit_and_wait(1),
            Wait::Batch(n) if self.min_timeout => {
                // Wait for a batch, but once BATCH_MIN_WAIT_US have passed, return
                // with whatever completed: fewer sleeps and wake-ups per I/O at
                // high queue depth, with a small bound on the added latency.
                // The overall timeout matters: without one, the kernel ends the
                // wait when the minimum expires even if nothing completed, and
                // the thread polls every BATCH_MIN_WAIT_US. With one, it goes on
                // sleeping until the first completion (or the timeout, which
                // returns ETIME and is simply waited again).
                let ts = types::Timespec::new().sec(BATCH_MAX_WAIT_SECS);
                let args = types::SubmitArgs::new().min_wait_usec(BATCH_MIN_WAIT_US).timespec(&ts);
                submitter.submit_with_args(n, &args)
            }
            Wait::Batch(_) => submitter.submit_and_wait(1),
            Wait::Timeout(d) => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                submitter.submit_with_args(1, &args)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                // Interrupted, timed out, or the CQ needs reaping first: the caller
                // reaps and calls again.
                Some(libc::EINTR) | Some(libc::ETIME) | Some(libc::EAGAIN) | Some(libc::EBUSY) => {
                    Ok(())
                }
                _ => Err(e),
            },
        }
    }

    fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        let mut rearm = false;
        for cqe in self.ring.completion() {
            let user_data = cqe.user_data();
            if user_data == WAKE_TOKEN {
                rearm = true;
                continue;
            }
            if user_data & NOP_EINVAL != 0 && user_data != WAKE_TOKEN {
                out.push((user_data & !NOP_EINVAL, -libc::EINVAL));
                continue;
            }
            out.push((user_data, cqe.result()));
        }
        if rearm {
            self.wake_armed = false;
            self.arm_wake();
        }
        if let Some(helper) = &self.helper {
            out.extend(helper.rx.try_iter());
        }
        out.append(&mut self.local);
    }

    fn waker(&self) -> Arc<dyn EngineWaker> {
        self.waker.clone()
    }

    fn register_buffer(&mut self, addr: usize, len: usize) -> Option<u16> {
        if !self.buffer_table || self.buffers.len() >= BUFFER_TABLE_SLOTS as usize {
            return None;
        }
        let index = self.buffers.len() as u16;
        let iov = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len };
        // SAFETY: the kernel pins the pages of [addr, addr + len) for as long as they
        // stay registered, so unmapping them later cannot cause a use-after-free;
        // the caller (the dispatcher) also keeps the owning pool alive.
        let result =
            unsafe { self.ring.submitter().register_buffers_update(index as u32, &[iov], None) };
        match result {
            Ok(_) => {
                self.buffers.push((addr, len, index));
                Some(index)
            }
            // Refused (memlock limit, old kernel): fall back to plain opcodes quietly.
            Err(_) => None,
        }
    }
}
