//! I/O engines: io_uring by default, worker threads doing blocking system calls
//! as the fallback.
//!
//! An engine executes [`IoOp`]s, the analogue of bios: one system call or SQE
//! each, built and owned by the dispatcher. The engine reports each op's result
//! (bytes transferred or a negative errno) by its `user_data`. Everything above
//! (splitting, retries, error bits, fault injection, callbacks) is shared by both
//! engines, so one test suite covers both.

pub(crate) mod sync;
pub(crate) mod uring;

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// Which engine a client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// io_uring: one ring per client, owned by its completion thread.
    Uring,
    /// Worker threads doing `preadv2`/`pwritev2`/`fdatasync`/`fallocate`/`BLKDISCARD`.
    Sync,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "io_uring",
            EngineKind::Sync => "sync",
        })
    }
}

/// Which engine to use when creating a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EngineChoice {
    /// io_uring if it can be set up, otherwise the sync engine (with one line on
    /// standard error saying why). The environment variable `DMIO_ENGINE`
    /// (`uring` or `sync`) overrides this choice.
    #[default]
    Auto,
    /// io_uring or an error.
    Uring,
    /// The sync engine.
    Sync,
}

/// What one op does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Read,
    Write,
    /// `fdatasync`: a cache flush on block devices.
    Flush,
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: discard or write-zeroes on a file,
    /// write-zeroes without fallback on a block device.
    PunchHole,
    /// `fallocate(ZERO_RANGE | KEEP_SIZE)`: write-zeroes that keeps blocks allocated.
    ZeroRange,
    /// Discard on a block device (`BLOCK_URING_CMD_DISCARD` or `BLKDISCARD`).
    BlockDiscard,
}

/// The memory of one op.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OpBuf {
    None,
    /// One contiguous buffer; `fixed` is its registered buffer index, if any.
    Single {
        addr: usize,
        len: usize,
        fixed: Option<u16>,
    },
    /// An iovec array owned by the op's slot.
    Vectored {
        iov: usize,
        count: u32,
    },
}

/// One operation for an engine.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IoOp {
    pub kind: OpKind,
    pub fd: RawFd,
    pub offset: u64,
    pub len: u64,
    pub buf: OpBuf,
    /// `RWF_*` flags for reads and writes (`RWF_DSYNC` for FUA, `RWF_ATOMIC`).
    pub rw_flags: i32,
    pub ioprio: u16,
    pub user_data: u64,
}

/// How long [`Engine::submit_and_wait`] may block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Submit and return at once.
    No,
    /// Until a completion or a wake-up arrives.
    Forever,
    /// Until this many completions arrived, or at least one did and a short
    /// time passed (a wake-up counts as a completion). Engines that cannot bound
    /// the wait treat it as [`Wait::Forever`].
    Batch(usize),
    /// Until a completion or a wake-up arrives, or the time passes (used for
    /// fault-injection delays).
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    Timeout(Duration),
}

/// Wakes an engine's thread from another thread.
pub(crate) trait EngineWaker: Send + Sync {
    fn wake(&self);
}

/// The interface the dispatcher drives. Only the dispatcher's thread calls it.
pub(crate) trait Engine {
    fn kind(&self) -> EngineKind;
    /// Queues an op. Returns false if the submission queue is full (submit first).
    fn push(&mut self, op: &IoOp) -> bool;
    /// Submits queued ops, then waits as asked.
    fn submit_and_wait(&mut self, wait: Wait) -> io::Result<()>;
    /// Moves available completions `(user_data, result)` into `out`.
    fn reap(&mut self, out: &mut Vec<(u64, i32)>);
    /// A handle other threads use to interrupt a wait.
    fn waker(&self) -> std::sync::Arc<dyn EngineWaker>;
    /// Registers `[addr, addr + len)` for fixed-buffer I/O; returns its index.
    fn register_buffer(&mut self, addr: usize, len: usize) -> Option<u16>;
}

/// Why io_uring could not be used, in one line, from the error of `io_uring_setup`.
pub(crate) fn uring_unavailable_reason(err: &io::Error) -> String {
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0);
    explain_uring_error(err.raw_os_error(), sysctl)
}

/// The pure part of [`uring_unavailable_reason`], for tests.
pub(crate) fn explain_uring_error(errno: Option<i32>, io_uring_disabled: u32) -> String {
    match (errno, io_uring_disabled) {
        (_, 2) => "io_uring is disabled by sysctl (kernel.io_uring_disabled = 2)".to_string(),
        (Some(libc::EPERM), 1) => {
            "io_uring is restricted by sysctl (kernel.io_uring_disabled = 1) and this process is \
             not in the io_uring group"
                .to_string()
        }
        (Some(libc::EPERM), _) | (Some(libc::EACCES), _) => {
            "io_uring_setup was refused (EPERM): blocked by a seccomp filter or a security module"
                .to_string()
        }
        (Some(libc::ENOSYS), _) => {
            "io_uring_setup does not exist (ENOSYS): the kernel is too old, was built without \
             io_uring, or a seccomp filter hides it"
                .to_string()
        }
        (Some(libc::EINVAL), _) => {
            "io_uring_setup rejected the ring parameters (EINVAL): the kernel is too old"
                .to_string()
        }
        (Some(libc::ENOMEM), _) => {
            "io_uring_setup ran out of memory (ENOMEM): RLIMIT_MEMLOCK may be too low".to_string()
        }
        (Some(e), _) => format!("io_uring_setup failed: {}", io::Error::from_raw_os_error(e)),
        (None, _) => "io_uring_setup failed".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_the_cause() {
        assert!(explain_uring_error(Some(libc::EPERM), 2).contains("sysctl"));
        assert!(explain_uring_error(Some(libc::EPERM), 1).contains("io_uring group"));
        assert!(explain_uring_error(Some(libc::EPERM), 0).contains("seccomp"));
        assert!(explain_uring_error(Some(libc::ENOSYS), 0).contains("too old"));
        assert!(explain_uring_error(Some(libc::EINVAL), 0).contains("too old"));
        assert!(explain_uring_error(Some(libc::ENOMEM), 0).contains("MEMLOCK"));
    }
}
