//! Raw system calls and ioctls that have no safe wrapper in `nix`.
//!
//! This is one of the few files of the crate that holds `unsafe` code (with
//! `memory/raw.rs`, `engine/uring.rs`, `engine/sync.rs` and `loopdev.rs`). Every
//! block says what keeps the memory it hands to the kernel alive.
#![allow(unsafe_code)]

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use crate::engine::{IoOp, OpBuf, OpKind};

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);
nix::ioctl_read_bad!(blk_ssz_get, nix::request_code_none!(0x12, 104), libc::c_int);
nix::ioctl_read_bad!(blk_pbsz_get, nix::request_code_none!(0x12, 123), libc::c_uint);
nix::ioctl_read_bad!(blk_ro_get, nix::request_code_none!(0x12, 94), libc::c_int);
nix::ioctl_write_ptr_bad!(blk_discard, nix::request_code_none!(0x12, 119), [u64; 2]);

/// `BLKGETSIZE64`: the size of a block device in bytes.
pub(crate) fn block_device_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: `size` is a live local for the whole call; the ioctl writes one u64.
    unsafe { blk_get_size64(fd.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

/// `BLKSSZGET`: the logical block size of a block device.
pub(crate) fn block_logical_size(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: `size` is a live local; the ioctl writes one int.
    unsafe { blk_ssz_get(fd.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    u32::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `BLKPBSZGET`: the physical block size of a block device.
pub(crate) fn block_physical_size(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut size: libc::c_uint = 0;
    // SAFETY: `size` is a live local; the ioctl writes one unsigned int.
    unsafe { blk_pbsz_get(fd.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

/// `BLKROGET`: whether a block device is read-only.
pub(crate) fn block_read_only(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut ro: libc::c_int = 0;
    // SAFETY: `ro` is a live local; the ioctl writes one int.
    unsafe { blk_ro_get(fd.as_raw_fd(), &mut ro) }.map_err(io::Error::from)?;
    Ok(ro != 0)
}

/// What `statx` says about direct I/O and atomic writes on an open file.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StatxDio {
    /// `stx_dio_mem_align` (0 when the kernel or filesystem did not report it).
    pub mem_align: u32,
    /// `stx_dio_offset_align` (0 when not reported; also 0 when O_DIRECT is unsupported).
    pub offset_align: u32,
    /// `stx_atomic_write_unit_max` (0 when atomic writes are not supported).
    pub atomic_unit_max: u32,
    /// `stx_atomic_write_unit_min`.
    pub atomic_unit_min: u32,
}

/// `statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN | STATX_WRITE_ATOMIC)`.
pub(crate) fn statx_dio(fd: BorrowedFd<'_>) -> io::Result<StatxDio> {
    let mut buf = MaybeUninit::<libc::statx>::zeroed();
    let mask = libc::STATX_DIOALIGN | libc::STATX_WRITE_ATOMIC;
    // SAFETY: the path is a static NUL-terminated empty string, `buf` is a live
    // local large enough for `struct statx`; the kernel writes only into it.
    let rc = unsafe {
        libc::statx(fd.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, mask, buf.as_mut_ptr())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the buffer was zero-initialised and statx succeeded, so every field
    // holds either the kernel's value or zero, both valid for plain integers.
    let st = unsafe { buf.assume_init() };
    let mut out = StatxDio::default();
    if st.stx_mask & libc::STATX_DIOALIGN != 0 {
        out.mem_align = st.stx_dio_mem_align;
        out.offset_align = st.stx_dio_offset_align;
    }
    if st.stx_mask & libc::STATX_WRITE_ATOMIC != 0 {
        out.atomic_unit_min = st.stx_atomic_write_unit_min;
        out.atomic_unit_max = st.stx_atomic_write_unit_max;
    }
    Ok(out)
}

/// `ioprio_set(IOPRIO_WHO_PROCESS, 0, prio)`: the calling thread's I/O priority,
/// which its blocking I/O carries (the sync engine's analogue of `sqe->ioprio`).
pub(crate) fn set_thread_ioprio(prio: u16) -> io::Result<()> {
    const IOPRIO_WHO_PROCESS: libc::c_int = 1;
    // SAFETY: ioprio_set takes only integers; `who = 0` names the calling thread.
    let rc = unsafe {
        libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, libc::c_int::from(prio))
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `BLKDISCARD` on a block device, blocking.
pub(crate) fn block_discard(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: `range` is a live local array of two u64 that the ioctl only reads.
    unsafe { blk_discard(fd, &range) }.map_err(io::Error::from)?;
    Ok(())
}

/// Runs one engine operation with blocking system calls and returns what an
/// io_uring completion would: the byte count, or a negative errno.
///
/// # Safety
///
/// The memory that `op.buf` names (a buffer or an iovec array and the buffers it
/// points to) must stay allocated and unaliased by Rust references for the whole
/// call. The dispatcher guarantees this: the request that owns the memory and the
/// op slot that owns the iovec array are only released after this op's completion
/// has been reaped.
pub(crate) unsafe fn execute_blocking(op: &IoOp) -> i32 {
    let offset = op.offset as libc::off_t;
    let ret: isize = match op.kind {
        OpKind::Read | OpKind::Write => {
            let (iov_ptr, iov_cnt, single);
            match op.buf {
                OpBuf::Single { addr, len, .. } => {
                    single = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len };
                    iov_ptr = &single as *const libc::iovec;
                    iov_cnt = 1;
                }
                OpBuf::Vectored { iov, count } => {
                    iov_ptr = iov as *const libc::iovec;
                    iov_cnt = count as libc::c_int;
                }
                OpBuf::None => return -libc::EINVAL,
            }
            if op.kind == OpKind::Read {
                // SAFETY: the caller keeps the iovec array and its buffers alive and
                // unaliased for the duration of this call (see the function contract).
                unsafe { libc::preadv2(op.fd, iov_ptr, iov_cnt, offset, op.rw_flags) }
            } else {
                // SAFETY: as above; the kernel only reads the buffers.
                unsafe { libc::pwritev2(op.fd, iov_ptr, iov_cnt, offset, op.rw_flags) }
            }
        }
        OpKind::Flush => {
            // SAFETY: fdatasync takes only a descriptor.
            unsafe { libc::fdatasync(op.fd) as isize }
        }
        OpKind::PunchHole | OpKind::ZeroRange => {
            let mode = if op.kind == OpKind::PunchHole {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            // SAFETY: fallocate takes only integers.
            unsafe { libc::fallocate(op.fd, mode, offset, op.len as libc::off_t) as isize }
        }
        OpKind::BlockDiscard => match block_discard(op.fd, op.offset, op.len) {
            Ok(()) => 0,
            Err(e) => return -e.raw_os_error().unwrap_or(libc::EIO),
        },
    };
    if ret < 0 {
        -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
    } else {
        // Data transfers are capped far below i32::MAX by the splitter.
        i32::try_from(ret).unwrap_or(i32::MAX)
    }
}
