//! The completion thread: turns requests into operations, drives the engine,
//! counts completions down and notifies.
//!
//! ```text
//! submitter ──Box<RequestSlot>──► inbox ──► start ──► pump: split regions into ops
//!                                                        │ (op slots: the bio mempool)
//!                               engine ◄──── launch ◄────┘
//!   reap ──► complete_op: retry EINTR/EAGAIN/EBUSY, resubmit short transfers,
//!            set error bits ──► last op of the request ──► slot back to the pool ──► notify
//! ```
//!
//! Everything here runs on one thread, so request progress needs no locks; the
//! request slots themselves travel between threads by value (boxed, allocated
//! once when the client is created).

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::client::{DmIoConfig, Shared, mark_completion_thread};
use crate::device::SECTOR_SIZE;
use crate::engine::sync::SyncEngine;
use crate::engine::uring::UringEngine;
use crate::engine::{
    Engine, EngineChoice, EngineKind, IoOp, OpBuf, OpKind, Wait, uring_unavailable_reason,
};
use crate::error::{DmIoError, Errno, ErrorBits, MAX_REGIONS, RegionFailure};
use crate::memory::{DmIoMemory, MemCursor, PagePool};
use crate::notify::{DmIoCompletion, Notify};
use crate::region::DmIoRegion;
use crate::request::{DmIoOp, DmIoRequest, ReqFlags};

/// From this many ops in flight on, the completion thread waits for batches of
/// completions instead of single ones...
const BATCH_MIN_IN_FLIGHT: usize = 8;

/// ...as long as the ops in flight average at most this many bytes. Small ops
/// complete microseconds apart, so a batch fills within the wait's 10 µs
/// minimum and saves wake-ups. Large ones complete far apart: the batch never
/// fills, every wait runs into the minimum's timer, and each completion is
/// delayed by it (a kcopyd copy of 512 KiB chunks between RAM loop devices ran
/// 1.1-1.4x faster with single waits).
const BATCH_MAX_AVG_OP_BYTES: u64 = 64 << 10;

/// How often an op failing with EINTR, EAGAIN or EBUSY is reissued before the
/// error is reported.
pub(crate) const MAX_RETRIES: u16 = 64;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Flushing each distinct device (PREFLUSH, or a flush request).
    #[default]
    Flush,
    /// Issuing the data (or discard / write-zeroes) ops region by region.
    Data,
    /// Every op issued and completed.
    Done,
}

/// The dispatcher's progress through one request.
#[derive(Debug, Default)]
struct Progress {
    phase: Phase,
    /// The region being issued.
    region: usize,
    /// Bytes of that region already issued.
    region_issued: u64,
    cursor: MemCursor,
    /// Ops issued and not yet completed.
    in_flight: u32,
    error_bits: ErrorBits,
    failures: Vec<RegionFailure>,
    /// Regions whose preflush failed: their data is not written.
    flush_failed: u64,
    /// Memory ranges of failed reads, zero-filled before notifying.
    zero_fill: Vec<(u64, u64)>,
    /// Whether the request waits in the queue for a free op slot.
    queued: bool,
}

/// One request slot (the kernel's `struct io`): allocated once per client, it
/// carries a request from the submitter to the completion thread and back.
#[derive(Debug)]
pub(crate) struct RequestSlot {
    id: u32,
    op: DmIoOp,
    flags: ReqFlags,
    ioprio: u16,
    regions: Vec<DmIoRegion>,
    memory: Option<DmIoMemory>,
    notify: Option<Notify>,
    progress: Progress,
}

impl RequestSlot {
    pub(crate) fn new(id: u32) -> RequestSlot {
        RequestSlot {
            id,
            op: DmIoOp::Read,
            flags: ReqFlags::empty(),
            ioprio: 0,
            regions: Vec::with_capacity(MAX_REGIONS),
            memory: None,
            notify: None,
            progress: Progress::default(),
        }
    }

    /// Loads a validated request.
    pub(crate) fn fill(&mut self, req: DmIoRequest, notify: Notify, regions: &[DmIoRegion]) {
        self.op = req.op;
        self.flags = req.flags;
        self.ioprio = req.ioprio.raw();
        self.memory = req.memory;
        self.notify = Some(notify);
        self.regions.clear();
        self.regions.extend_from_slice(regions);
        self.progress = Progress::default();
    }

    /// Takes the request back out of a filled slot.
    pub(crate) fn take_request(&mut self) -> (DmIoRequest, Notify) {
        let mut req = DmIoRequest::new(self.op);
        req.flags = self.flags;
        req.ioprio = crate::request::IoPriority::from_raw(self.ioprio);
        req.memory = self.memory.take();
        let notify = self.notify.take().unwrap_or_else(|| Notify::new(|_| {}));
        (req, notify)
    }

    /// Empties the slot (dropping any request it held).
    pub(crate) fn reset_for_reuse(mut self: Box<Self>) -> Box<Self> {
        self.regions.clear();
        self.memory = None;
        self.notify = None;
        self.progress = Progress::default();
        self
    }
}

/// One op slot (the kernel's bio from the client's bio_set), with its iovec array.
#[derive(Debug)]
struct OpSlot {
    request: u32,
    region: usize,
    kind: OpKind,
    fd: i32,
    /// Byte offset of the op on the device.
    dev_offset: u64,
    /// Byte offset of the op in the request's memory.
    mem_offset: u64,
    len: u64,
    /// Bytes already transferred (short transfers).
    done: u64,
    rw_flags: i32,
    block_size: u64,
    retries: u16,
    iov: Vec<libc::iovec>,
    /// Fault rules were consulted (once per op, not per reissue).
    #[cfg(feature = "fault-injection")]
    fault_checked: bool,
    /// The device's write-log position when the op was issued (for flushes).
    #[cfg(feature = "fault-injection")]
    log_mark: u64,
    /// A fault rule cut the next transfer to this many bytes.
    #[cfg(feature = "fault-injection")]
    short_once: Option<u64>,
    /// A fault rule dropped this write.
    #[cfg(feature = "fault-injection")]
    dropped: bool,
}

/// The dispatcher's counters, kept as plain integers on the hot path and
/// published to the client's atomics once per loop iteration.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    requests: u64,
    ops: u64,
    retries: u64,
    short_transfers: u64,
    fixed_buffer_ops: u64,
    submit_calls: u64,
    callback_panics: u64,
}

/// What to do with an op after its completion.
enum Next {
    Reissue,
    Finished,
}

type Ready = Result<(EngineKind, Option<String>), DmIoError>;

static FALLBACK_NOTED: AtomicBool = AtomicBool::new(false);

fn make_engine(
    choice: EngineChoice,
    config: &DmIoConfig,
) -> Result<(Box<dyn Engine>, Option<String>), DmIoError> {
    let sync = |note: Option<String>| -> Result<(Box<dyn Engine>, Option<String>), DmIoError> {
        match SyncEngine::new(config.sync_threads, config.ring_entries as usize) {
            Ok(engine) => Ok((Box::new(engine), note)),
            Err(e) => Err(DmIoError::EngineSetup { engine: "sync", reason: e.to_string() }),
        }
    };
    match choice {
        EngineChoice::Sync => sync(None),
        EngineChoice::Uring => match UringEngine::new(config.ring_entries) {
            Ok(engine) => Ok((Box::new(engine), None)),
            Err(e) => Err(DmIoError::EngineSetup {
                engine: "io_uring",
                reason: uring_unavailable_reason(&e),
            }),
        },
        EngineChoice::Auto => match UringEngine::new(config.ring_entries) {
            Ok(engine) => Ok((Box::new(engine), None)),
            Err(e) => {
                let reason = uring_unavailable_reason(&e);
                if !FALLBACK_NOTED.swap(true, Ordering::Relaxed) {
                    note(&format!("{reason}; using the synchronous engine"));
                }
                sync(Some(reason))
            }
        },
    }
}

/// The completion thread's body.
pub(crate) fn run(
    choice: EngineChoice,
    config: DmIoConfig,
    pool: PagePool,
    inbox: Receiver<Box<RequestSlot>>,
    shared: Arc<Shared>,
    ready: Sender<Ready>,
) {
    let (mut engine, note) = match make_engine(choice, &config) {
        Ok(made) => made,
        Err(e) => {
            shared.alive.store(false, Ordering::Release);
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = shared.waker.set(engine.waker());
    mark_completion_thread(&shared);
    let mut fixed = Vec::new();
    if config.register_pool {
        let (addr, len) = pool.arena_range();
        if let Some(index) = engine.register_buffer(addr, len) {
            fixed.push((addr, len, index));
        }
    }
    let kind = engine.kind();
    let op_slots = (config.ring_entries as usize).saturating_sub(1).max(1);
    let mut dispatcher = Dispatcher {
        engine,
        shared: shared.clone(),
        inbox,
        active: (0..shared.reserve).map(|_| None).collect(),
        ops: (0..op_slots)
            .map(|_| OpSlot {
                request: 0,
                region: 0,
                kind: OpKind::Read,
                fd: -1,
                dev_offset: 0,
                mem_offset: 0,
                len: 0,
                done: 0,
                rw_flags: 0,
                block_size: 512,
                retries: 0,
                iov: Vec::with_capacity(config.iovecs_per_op),
                #[cfg(feature = "fault-injection")]
                fault_checked: false,
                #[cfg(feature = "fault-injection")]
                log_mark: 0,
                #[cfg(feature = "fault-injection")]
                short_once: None,
                #[cfg(feature = "fault-injection")]
                dropped: false,
            })
            .collect(),
        free_ops: (0..op_slots as u32).rev().collect(),
        waiting: VecDeque::with_capacity(shared.reserve),
        completions: Vec::with_capacity(op_slots + 8),
        local: VecDeque::with_capacity(op_slots),
        in_flight_ops: 0,
        in_flight_bytes: 0,
        fixed,
        _pool: pool,
        max_op_bytes: config.max_op_bytes,
        iovecs_per_op: config.iovecs_per_op,
        tally: Tally::default(),
        #[cfg(feature = "fault-injection")]
        delayed: Vec::new(),
    };
    let _ = ready.send(Ok((kind, note)));
    let _dead = MarkDeadOnExit(shared);
    let _abort = AbortOnUnwind;
    dispatcher.run_loop();
}

struct Dispatcher {
    engine: Box<dyn Engine>,
    shared: Arc<Shared>,
    inbox: Receiver<Box<RequestSlot>>,
    /// Requests in progress, by slot id.
    active: Vec<Option<Box<RequestSlot>>>,
    ops: Vec<OpSlot>,
    free_ops: Vec<u32>,
    /// Requests waiting for a free op slot, in arrival order.
    waiting: VecDeque<u32>,
    completions: Vec<(u64, i32)>,
    /// Completions made up here (fault injection, a full queue).
    local: VecDeque<(u64, i32)>,
    in_flight_ops: usize,
    /// The lengths of the ops in flight, summed.
    in_flight_bytes: u64,
    /// Registered buffers: (start address, length, index).
    fixed: Vec<(usize, usize, u16)>,
    /// Keeps the registered arena alive as long as the ring.
    _pool: PagePool,
    max_op_bytes: u64,
    iovecs_per_op: usize,
    tally: Tally,
    /// Ops held back by a delay rule: (due time, op slot).
    #[cfg(feature = "fault-injection")]
    delayed: Vec<(std::time::Instant, u32)>,
}

impl Dispatcher {
    fn run_loop(&mut self) {
        let mut engine_errors = 0u32;
        loop {
            while let Ok(slot) = self.inbox.try_recv() {
                self.start(slot);
            }
            #[cfg(feature = "fault-injection")]
            self.release_due_delays();
            if self.shared.closed.load(Ordering::Acquire) && self.idle() {
                break;
            }
            let mut wait = if !self.local.is_empty() || !self.inbox.is_empty() {
                Wait::No
            } else {
                self.timer_wait()
            };
            if wait != Wait::No {
                self.shared.sleeping.store(true, Ordering::SeqCst);
                if !self.inbox.is_empty()
                    || self.shared.closed.load(Ordering::SeqCst) && self.idle()
                {
                    wait = Wait::No;
                }
            }
            if wait == Wait::Forever
                && self.in_flight_ops >= BATCH_MIN_IN_FLIGHT
                && self.in_flight_bytes <= self.in_flight_ops as u64 * BATCH_MAX_AVG_OP_BYTES
            {
                // Many ops in flight: wait for a quarter of them (bounded in time by
                // the engine). Waking once per completion costs more than the I/O
                // on a VM; batches keep the ring full with fewer sleeps.
                wait = Wait::Batch(self.in_flight_ops / 4);
            }
            self.tally.submit_calls += 1;
            match self.engine.submit_and_wait(wait) {
                Ok(()) => engine_errors = 0,
                Err(e) => {
                    // Nothing sensible to do but try again: in-flight ops still own
                    // their memory, so the thread must not give up on them.
                    engine_errors += 1;
                    if engine_errors == 1 {
                        note(&format!("the I/O engine failed to submit or wait: {e}; retrying"));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            self.shared.sleeping.store(false, Ordering::Relaxed);
            self.engine.reap(&mut self.completions);
            let mut batch = std::mem::take(&mut self.completions);
            for (user_data, res) in batch.drain(..) {
                self.complete_op(user_data as u32, res);
            }
            self.completions = batch;
            while let Some((user_data, res)) = self.local.pop_front() {
                self.complete_op(user_data as u32, res);
            }
            self.publish_tally();
        }
        self.publish_tally();
    }

    fn publish_tally(&self) {
        let c = &self.shared.counters;
        let t = &self.tally;
        c.requests.store(t.requests, Ordering::Relaxed);
        c.ops.store(t.ops, Ordering::Relaxed);
        c.retries.store(t.retries, Ordering::Relaxed);
        c.short_transfers.store(t.short_transfers, Ordering::Relaxed);
        c.fixed_buffer_ops.store(t.fixed_buffer_ops, Ordering::Relaxed);
        c.submit_calls.store(t.submit_calls, Ordering::Relaxed);
        c.callback_panics.store(t.callback_panics, Ordering::Relaxed);
    }

    fn idle(&self) -> bool {
        self.in_flight_ops == 0
            && self.local.is_empty()
            && self.inbox.is_empty()
            && self.shared.free_rx.len() == self.shared.reserve
    }

    #[cfg(feature = "fault-injection")]
    fn timer_wait(&self) -> Wait {
        match self.delayed.iter().map(|(due, _)| *due).min() {
            Some(due) => Wait::Timeout(due.saturating_duration_since(std::time::Instant::now())),
            None => Wait::Forever,
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    fn timer_wait(&self) -> Wait {
        Wait::Forever
    }

    #[cfg(feature = "fault-injection")]
    fn release_due_delays(&mut self) {
        if self.delayed.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        let mut i = 0;
        while i < self.delayed.len() {
            if self.delayed[i].0 <= now {
                let (_, op) = self.delayed.swap_remove(i);
                self.in_flight_ops -= 1;
                self.in_flight_bytes =
                    self.in_flight_bytes.saturating_sub(self.ops[op as usize].len);
                let request = self.ops[op as usize].request as usize;
                if let Some(mut slot) = self.active[request].take() {
                    slot.progress.in_flight -= 1;
                    self.launch(op, &mut slot);
                    self.active[request] = Some(slot);
                }
            } else {
                i += 1;
            }
        }
    }

    /// Takes a new request from a submitter.
    fn start(&mut self, mut slot: Box<RequestSlot>) {
        slot.progress.phase = if slot.op == DmIoOp::Flush
            || slot.flags.contains(ReqFlags::PREFLUSH) && slot.op.is_write()
        {
            Phase::Flush
        } else {
            Phase::Data
        };
        if self.waiting.is_empty() {
            self.advance(slot);
        } else {
            // Requests already waiting for op slots go first (FIFO).
            self.wait_for_op(&mut slot);
            let id = slot.id as usize;
            self.active[id] = Some(slot);
            self.run_waiting();
        }
    }

    /// Issues what can be issued now; finishes the request when nothing is left.
    fn advance(&mut self, mut slot: Box<RequestSlot>) {
        if self.pump(&mut slot) {
            self.finish(slot);
        } else {
            let id = slot.id as usize;
            self.active[id] = Some(slot);
        }
    }

    /// Marks a request as waiting for an op slot.
    fn wait_for_op(&mut self, slot: &mut RequestSlot) {
        if !slot.progress.queued {
            slot.progress.queued = true;
            self.waiting.push_back(slot.id);
        }
    }

    /// Gives waiting requests the op slots that came free.
    fn run_waiting(&mut self) {
        while !self.free_ops.is_empty() {
            let Some(id) = self.waiting.pop_front() else {
                break;
            };
            if let Some(mut slot) = self.active[id as usize].take() {
                if !slot.progress.queued {
                    // A stale entry (the request was already served).
                    self.active[id as usize] = Some(slot);
                    continue;
                }
                slot.progress.queued = false;
                self.advance(slot);
            }
        }
    }

    /// Issues ops for `slot` until it is blocked (no op slot, or waiting for
    /// its flushes) or completely done. Returns true when the request is done.
    fn pump(&mut self, slot: &mut RequestSlot) -> bool {
        loop {
            match slot.progress.phase {
                Phase::Flush => {
                    while slot.progress.region < slot.regions.len() {
                        let i = slot.progress.region;
                        let dev_id = slot.regions[i].device.id();
                        // One flush per distinct device, attributed to its first region.
                        if slot.regions[..i].iter().any(|r| r.device.id() == dev_id) {
                            slot.progress.region += 1;
                            continue;
                        }
                        let Some(op) = self.free_ops.pop() else {
                            self.wait_for_op(slot);
                            return false;
                        };
                        let fd = slot.regions[i].device.raw_fd();
                        self.setup_op(op, slot, OpKind::Flush, i, fd, 0, 0, 0);
                        self.launch(op, slot);
                        slot.progress.region += 1;
                    }
                    if slot.progress.in_flight > 0 {
                        return false;
                    }
                    slot.progress.region = 0;
                    slot.progress.region_issued = 0;
                    slot.progress.phase =
                        if slot.op == DmIoOp::Flush { Phase::Done } else { Phase::Data };
                }
                Phase::Data => {
                    let i = slot.progress.region;
                    if i >= slot.regions.len() {
                        if slot.progress.in_flight > 0 {
                            return false;
                        }
                        slot.progress.phase = Phase::Done;
                        continue;
                    }
                    let region = &slot.regions[i];
                    let total = region.byte_len();
                    if slot.progress.region_issued >= total
                        || slot.progress.flush_failed & (1 << i) != 0
                    {
                        next_region(slot);
                        continue;
                    }
                    let dev = &region.device;
                    let lbs = u64::from(dev.logical_block_size().max(512));
                    let round = |max: u64| (max / lbs * lbs).max(lbs);
                    let data_max = || round(dev.info().max_io_bytes.min(self.max_op_bytes));
                    let (kind, max) = match slot.op {
                        DmIoOp::Read => (OpKind::Read, data_max()),
                        DmIoOp::Write => (OpKind::Write, data_max()),
                        DmIoOp::Discard | DmIoOp::WriteZeroes => {
                            let limit = if slot.op == DmIoOp::Discard {
                                dev.max_discard_bytes()
                            } else {
                                dev.max_write_zeroes_bytes()
                            };
                            if limit == 0 {
                                // The device cannot do it: the region fails with
                                // EOPNOTSUPP and nothing is sent (no fallback).
                                self.fail_region_now(slot, i, libc::EOPNOTSUPP);
                                next_region(slot);
                                continue;
                            }
                            let nounmap = slot.flags.contains(ReqFlags::NOUNMAP);
                            let kind = match (slot.op, dev.is_block_device()) {
                                (DmIoOp::Discard, true) => OpKind::BlockDiscard,
                                (DmIoOp::Discard, false) => OpKind::PunchHole,
                                (_, true) if nounmap => {
                                    // A block device offers no write-zeroes that
                                    // keeps blocks mapped without falling back to
                                    // writing zero pages (FALLOC_FL_ZERO_RANGE
                                    // does), and dm-io never falls back silently.
                                    self.fail_region_now(slot, i, libc::EOPNOTSUPP);
                                    next_region(slot);
                                    continue;
                                }
                                (_, false) if nounmap => OpKind::ZeroRange,
                                _ => OpKind::PunchHole,
                            };
                            (kind, round(limit))
                        }
                        DmIoOp::Flush => {
                            slot.progress.region = slot.regions.len();
                            continue;
                        }
                    };
                    let Some(op) = self.free_ops.pop() else {
                        self.wait_for_op(slot);
                        return false;
                    };
                    let start = slot.progress.region_issued;
                    let len = (total - start).min(max);
                    let dev_offset = region.byte_offset() + start;
                    let fd = dev.raw_fd();
                    self.setup_op(op, slot, kind, i, fd, dev_offset, start, len);
                    let o = &mut self.ops[op as usize];
                    o.block_size = lbs;
                    let len = if matches!(kind, OpKind::Read | OpKind::Write) {
                        let Some(memory) = slot.memory.as_mut() else {
                            // Validation guarantees memory for data ops.
                            self.free_ops.push(op);
                            self.fail_region_now(slot, i, libc::EINVAL);
                            next_region(slot);
                            continue;
                        };
                        let gathered = memory.gather(
                            start,
                            len,
                            &mut slot.progress.cursor,
                            &mut o.iov,
                            self.iovecs_per_op,
                        );
                        // Cut at a block boundary (segments are block multiples, so
                        // this only matters for a corrupt memory layout).
                        let covered = gathered / lbs * lbs;
                        if covered == 0 {
                            self.free_ops.push(op);
                            self.fail_region_now(slot, i, libc::EINVAL);
                            next_region(slot);
                            continue;
                        }
                        if covered < gathered {
                            trim_iov(&mut o.iov, covered);
                        }
                        o.len = covered;
                        covered
                    } else {
                        len
                    };
                    self.launch(op, slot);
                    slot.progress.region_issued += len;
                }
                Phase::Done => return true,
            }
        }
    }

    /// Fails region `i` of `slot` without issuing anything.
    fn fail_region_now(&mut self, slot: &mut RequestSlot, i: usize, errno: i32) {
        let region = &slot.regions[i];
        if slot.op == DmIoOp::Read {
            let issued = slot.progress.region_issued;
            let rest = region.byte_len().saturating_sub(issued);
            slot.progress.zero_fill.push((issued, rest));
        }
        slot.progress.error_bits.set(i);
        slot.progress.failures.push(RegionFailure {
            region: i,
            device: region.device.clone(),
            sector: region.sector,
            op: slot.op,
            errno: Errno(errno),
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn setup_op(
        &mut self,
        op: u32,
        slot: &RequestSlot,
        kind: OpKind,
        region: usize,
        fd: i32,
        dev_offset: u64,
        mem_offset: u64,
        len: u64,
    ) {
        let mut rw_flags = 0;
        if kind == OpKind::Write {
            if slot.flags.contains(ReqFlags::FUA) {
                rw_flags |= libc::RWF_DSYNC;
            }
            if slot.flags.contains(ReqFlags::ATOMIC) {
                rw_flags |= libc::RWF_ATOMIC;
            }
        }
        let o = &mut self.ops[op as usize];
        o.request = slot.id;
        o.region = region;
        o.kind = kind;
        o.fd = fd;
        o.dev_offset = dev_offset;
        o.mem_offset = mem_offset;
        o.len = len;
        o.done = 0;
        o.rw_flags = rw_flags;
        o.retries = 0;
        o.iov.clear();
        #[cfg(feature = "fault-injection")]
        {
            o.fault_checked = false;
            o.short_once = None;
            o.dropped = false;
        }
    }

    /// Hands op `op` (or what remains of it) to the engine.
    fn launch(&mut self, op: u32, slot: &mut RequestSlot) {
        slot.progress.in_flight += 1;
        self.in_flight_ops += 1;
        self.in_flight_bytes += self.ops[op as usize].len;
        #[cfg(feature = "fault-injection")]
        if !self.ops[op as usize].fault_checked {
            self.ops[op as usize].fault_checked = true;
            if self.apply_faults(op, slot) {
                return;
            }
        }
        let io = self.io_op(op, slot.ioprio);
        self.tally.ops += 1;
        if !self.engine.push(&io) {
            // The submission queue is full: submit what is queued and try again.
            let _ = self.engine.submit_and_wait(Wait::No);
            if !self.engine.push(&io) {
                // Still full; complete it locally with EAGAIN, which is retried.
                self.local.push_back((u64::from(op), -libc::EAGAIN));
            }
        }
    }

    /// The engine op for op slot `op`, from `done` bytes on.
    fn io_op(&mut self, op: u32, ioprio: u16) -> IoOp {
        let o = &mut self.ops[op as usize];
        #[allow(unused_mut)]
        let mut len = o.len - o.done;
        #[cfg(feature = "fault-injection")]
        if let Some(cut) = o.short_once.take() {
            // Transfer only `cut` bytes this time: the completion looks short and
            // the remainder is resubmitted, as after a real short transfer.
            if cut < len {
                trim_iov(&mut o.iov, cut);
                len = cut;
            }
        }
        let buf = match o.kind {
            OpKind::Read | OpKind::Write => {
                if o.iov.len() == 1 {
                    let addr = o.iov[0].iov_base as usize;
                    let len = o.iov[0].iov_len;
                    let fixed = self
                        .fixed
                        .iter()
                        .find(|(base, blen, _)| *base <= addr && addr + len <= base + blen)
                        .map(|&(_, _, index)| index);
                    if fixed.is_some() {
                        self.tally.fixed_buffer_ops += 1;
                    }
                    OpBuf::Single { addr, len, fixed }
                } else {
                    OpBuf::Vectored { iov: o.iov.as_ptr() as usize, count: o.iov.len() as u32 }
                }
            }
            _ => OpBuf::None,
        };
        IoOp {
            kind: o.kind,
            fd: o.fd,
            offset: o.dev_offset + o.done,
            len,
            buf,
            rw_flags: o.rw_flags,
            ioprio: carried_ioprio(o.kind, ioprio),
            user_data: u64::from(op),
        }
    }

    /// Handles the completion of op `op` with result `res`.
    fn complete_op(&mut self, op: u32, res: i32) {
        let Some(o) = self.ops.get(op as usize) else {
            return;
        };
        let request = o.request as usize;
        self.in_flight_ops = self.in_flight_ops.saturating_sub(1);
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(o.len);
        let Some(mut slot) = self.active.get_mut(request).and_then(Option::take) else {
            self.free_ops.push(op);
            return;
        };
        slot.progress.in_flight -= 1;
        match self.evaluate(op, res, &mut slot) {
            Next::Reissue => {
                self.launch(op, &mut slot);
                self.active[request] = Some(slot);
            }
            Next::Finished => {
                #[cfg(feature = "fault-injection")]
                self.log_completion(op, res, &slot);
                self.free_ops.push(op);
                if !self.waiting.is_empty() && has_ops_to_issue(&slot) {
                    // Round robin: a request with more to issue goes to the back of
                    // the queue, so one large request cannot keep recycling the op
                    // slots that others wait for.
                    self.wait_for_op(&mut slot);
                    self.active[request] = Some(slot);
                } else {
                    self.advance(slot);
                }
                self.run_waiting();
            }
        }
    }

    fn evaluate(&mut self, op: u32, res: i32, slot: &mut RequestSlot) -> Next {
        let o = &mut self.ops[op as usize];
        if res < 0 {
            let errno = -res;
            if matches!(errno, libc::EINTR | libc::EAGAIN | libc::EBUSY) && o.retries < MAX_RETRIES
            {
                o.retries += 1;
                self.tally.retries += 1;
                return Next::Reissue;
            }
            self.fail_op(op, slot, errno);
            return Next::Finished;
        }
        if !matches!(o.kind, OpKind::Read | OpKind::Write) {
            return Next::Finished;
        }
        o.done += res as u64;
        if o.done >= o.len {
            return Next::Finished;
        }
        if res == 0 {
            // No progress: the device ended early (it shrank) or refuses more.
            self.fail_op(op, slot, libc::EIO);
            return Next::Finished;
        }
        if o.rw_flags & libc::RWF_ATOMIC != 0 {
            // An atomic write is never split, not even to finish a short transfer.
            self.fail_op(op, slot, libc::EIO);
            return Next::Finished;
        }
        // A short transfer: resubmit the rest, from the last block boundary (an
        // O_DIRECT transfer must start on one).
        self.tally.short_transfers += 1;
        let before = o.done - res as u64;
        let resume = o.done / o.block_size * o.block_size;
        if resume <= before / o.block_size * o.block_size {
            // Less than a block of progress past the last boundary (a file that
            // shrank to a size that is not a block multiple): resubmitting would
            // transfer the same bytes forever.
            self.fail_op(op, slot, libc::EIO);
            return Next::Finished;
        }
        o.done = resume;
        let (start, len) = (o.mem_offset + o.done, o.len - o.done);
        o.iov.clear();
        let covered = match slot.memory.as_mut() {
            Some(memory) => {
                memory.gather(start, len, &mut slot.progress.cursor, &mut o.iov, self.iovecs_per_op)
            }
            None => 0,
        };
        if covered != len {
            self.fail_op(op, slot, libc::EIO);
            return Next::Finished;
        }
        Next::Reissue
    }

    /// Records the failure of op `op`.
    fn fail_op(&mut self, op: u32, slot: &mut RequestSlot, errno: i32) {
        let o = &self.ops[op as usize];
        let sector = (o.dev_offset + o.done) / SECTOR_SIZE;
        if o.kind == OpKind::Flush {
            // A failed flush fails every region on that device; their data is
            // not written (the kernel's PREFLUSH bio fails as a whole).
            let dev_id = slot.regions[o.region].device.id();
            for (i, region) in slot.regions.iter().enumerate() {
                if region.device.id() == dev_id {
                    slot.progress.error_bits.set(i);
                    slot.progress.flush_failed |= 1 << i;
                    slot.progress.failures.push(RegionFailure {
                        region: i,
                        device: region.device.clone(),
                        sector: region.sector,
                        op: DmIoOp::Flush,
                        errno: Errno(errno),
                    });
                }
            }
            return;
        }
        let region = &slot.regions[o.region];
        slot.progress.error_bits.set(o.region);
        slot.progress.failures.push(RegionFailure {
            region: o.region,
            device: region.device.clone(),
            sector,
            op: slot.op,
            errno: Errno(errno),
        });
        if o.kind == OpKind::Read {
            slot.progress.zero_fill.push((o.mem_offset, o.len));
        }
    }

    /// Completes a request: zero-fills failed reads, returns the slot to the
    /// pool, then notifies (as the kernel frees its `io` before calling `fn`).
    fn finish(&mut self, mut slot: Box<RequestSlot>) {
        if slot.progress.queued {
            // It finished while waiting for an op slot; forget the queue entry so
            // a reuse of the slot is not mistaken for it.
            let id = slot.id;
            self.waiting.retain(|&w| w != id);
        }
        let progress = std::mem::take(&mut slot.progress);
        let mut memory = slot.memory.take();
        if let Some(memory) = memory.as_mut() {
            for &(offset, len) in &progress.zero_fill {
                memory.zero_range(offset as usize, len as usize);
            }
        }
        let completion =
            DmIoCompletion { error_bits: progress.error_bits, failures: progress.failures, memory };
        let notify = slot.notify.take();
        slot.regions.clear();
        self.tally.requests += 1;
        // Counters are current whenever a completion is delivered.
        self.publish_tally();
        let _ = self.shared.free_tx.try_send(slot);
        let Some(notify) = notify else { return };
        // A panicking callback (or waker) must not take the completion thread
        // down: other requests' memory is still in the kernel's hands.
        if catch_unwind(AssertUnwindSafe(|| notify.fire(completion))).is_err() {
            self.tally.callback_panics += 1;
            self.publish_tally();
            note("a notify callback panicked; the panic was caught and the client goes on");
        }
    }
}

/// Writes one line to standard error, ignoring failures (a closed stderr must
/// not panic the completion thread).
fn note(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "dmio: {message}");
}

/// Aborts the process if the completion thread unwinds. Unwinding would free
/// request memory that the kernel may still be writing into; aborting is the only
/// safe way out of a bug there (user callbacks are caught separately).
struct AbortOnUnwind;

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            note(
                "the completion thread panicked with I/O in flight; aborting to keep its memory safe",
            );
            std::process::abort();
        }
    }
}

/// Clears the client's `alive` flag when the completion thread ends, however it ends.
struct MarkDeadOnExit(Arc<Shared>);

impl Drop for MarkDeadOnExit {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Release);
    }
}

/// The I/O priority an op really carries: reads and writes carry the request's
/// (`sqe->ioprio`, or the sync worker's thread priority); io_uring's fsync and
/// fallocate opcodes have no priority field, and block-device uring commands
/// refuse one, so flushes, discards and write-zeroes carry none.
fn carried_ioprio(kind: OpKind, ioprio: u16) -> u16 {
    match kind {
        OpKind::Read | OpKind::Write => ioprio,
        _ => 0,
    }
}

/// Whether the request still has ops to issue (as opposed to waiting for the
/// ones in flight).
fn has_ops_to_issue(slot: &RequestSlot) -> bool {
    match slot.progress.phase {
        Phase::Flush | Phase::Data => slot.progress.region < slot.regions.len(),
        Phase::Done => false,
    }
}

fn next_region(slot: &mut RequestSlot) {
    slot.progress.region += 1;
    slot.progress.region_issued = 0;
}

/// Shortens an iovec list to `len` bytes.
fn trim_iov(iov: &mut Vec<libc::iovec>, len: u64) {
    let mut left = len as usize;
    let mut keep = 0;
    for v in iov.iter_mut() {
        if left == 0 {
            break;
        }
        if v.iov_len > left {
            v.iov_len = left;
        }
        left -= v.iov_len;
        keep += 1;
    }
    iov.truncate(keep);
}

#[cfg(feature = "fault-injection")]
impl Dispatcher {
    /// Consults the device's fault rules for a new op. Returns true when the op
    /// was handled here (failed, dropped or delayed) instead of being issued.
    fn apply_faults(&mut self, op: u32, slot: &mut RequestSlot) -> bool {
        use crate::fault::{IssueVerdict, OpInfo};
        let o = &self.ops[op as usize];
        if !slot.regions[o.region].device.faults().is_active() {
            // No rule, trace or log on this device: one atomic load, nothing else.
            return false;
        }
        let device = slot.regions[o.region].device.clone();
        let faults = device.faults();
        let info = OpInfo {
            op: match o.kind {
                OpKind::Read => DmIoOp::Read,
                OpKind::Write => DmIoOp::Write,
                OpKind::Flush => DmIoOp::Flush,
                OpKind::BlockDiscard => DmIoOp::Discard,
                OpKind::PunchHole | OpKind::ZeroRange => slot.op,
            },
            sector: o.dev_offset / SECTOR_SIZE,
            sectors: o.len / SECTOR_SIZE,
            ioprio: carried_ioprio(o.kind, slot.ioprio),
            fua: o.rw_flags & libc::RWF_DSYNC != 0,
            region: o.region,
        };
        let mark = faults.log_position();
        self.ops[op as usize].log_mark = mark;
        match faults.on_issue(&info) {
            IssueVerdict::Pass => false,
            IssueVerdict::Fail(errno) => {
                self.local.push_back((u64::from(op), -errno));
                true
            }
            IssueVerdict::Drop => {
                let o = &mut self.ops[op as usize];
                let res = i32::try_from(o.len).unwrap_or(i32::MAX);
                o.dropped = true;
                self.local.push_back((u64::from(op), res));
                true
            }
            IssueVerdict::Shorten(bytes) => {
                let o = &mut self.ops[op as usize];
                if matches!(o.kind, OpKind::Read | OpKind::Write) {
                    o.short_once = Some((bytes / o.block_size * o.block_size).max(o.block_size));
                }
                false
            }
            IssueVerdict::Delay(d) => {
                self.delayed.push((std::time::Instant::now() + d, op));
                true
            }
        }
    }

    /// Records a finished op in its device's write log, if one is running.
    fn log_completion(&mut self, op: u32, res: i32, slot: &RequestSlot) {
        let o = &self.ops[op as usize];
        let dropped = o.dropped;
        let device = &slot.regions[o.region].device;
        let faults = device.faults();
        if !faults.logging() || res < 0 {
            return;
        }
        let sector = o.dev_offset / SECTOR_SIZE;
        match o.kind {
            OpKind::Write => {
                let mut data = vec![0u8; o.len as usize];
                if let Some(memory) = &slot.memory {
                    memory.copy_to_slice(o.mem_offset as usize, &mut data);
                }
                faults.log_write(sector, data, o.rw_flags & libc::RWF_DSYNC != 0, dropped);
            }
            OpKind::Flush => faults.log_flush(o.log_mark),
            OpKind::PunchHole | OpKind::ZeroRange | OpKind::BlockDiscard => {
                faults.log_zero(sector, o.len / SECTOR_SIZE, slot.op)
            }
            OpKind::Read => {}
        }
    }
}
