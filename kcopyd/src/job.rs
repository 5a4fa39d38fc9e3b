//! What callers hold and receive for a job: flags, handles, outcomes, tokens.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dmio::{ErrorBits, RegionFailure};

use crate::error::KcopydError;
use crate::worker::{Msg, Notifier, TokenDone};

bitflags::bitflags! {
    /// Flags of a copy or zero job (the kernel's `DM_KCOPYD_*` flags, as masks).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct CopyFlags: u32 {
        /// Keep going after errors: every chunk is attempted, errors are still
        /// reported. A chunk whose source read failed is written with zeros where
        /// the read failed (dm-io zero-fills failed reads). `DM_KCOPYD_IGNORE_ERROR`.
        const IGNORE_ERROR = 1 << 0;
        /// Issue destination writes in strictly increasing offset order (reads
        /// stay parallel), as zoned devices need. Errors always stop the job:
        /// `IGNORE_ERROR` is ignored. `DM_KCOPYD_WRITE_SEQ`. Set automatically,
        /// as in the kernel, when a destination is zoned
        /// ([`BlockDevice::is_zoned`](dmio::BlockDevice::is_zoned)).
        const WRITE_SEQ = 1 << 1;
    }
}

/// How a job ended: what the notify callback receives (the kernel passes
/// `read_err` and `write_err`; the rest is this crate's addition).
#[derive(Clone, Debug, Default)]
pub struct JobOutcome {
    /// A source read failed.
    pub read_err: bool,
    /// Bit *i* set when a write to destination *i* failed (the kernel's
    /// `write_err`). For a prepared callback, whatever the completer passed.
    pub write_err: ErrorBits,
    /// [`JobHandle::cancel`] stopped the job before every chunk ran (or a
    /// [`CallbackToken`] was dropped without being completed).
    pub cancelled: bool,
    /// The job's length in bytes.
    pub total_bytes: u64,
    /// Bytes of the sub-jobs that finished, with or without errors.
    pub bytes_done: u64,
    /// The leading part of the range, in bytes, that reached every destination
    /// without any error: after a failure or a cancel, the job can be resumed
    /// from here.
    pub completed_prefix_bytes: u64,
    /// A zero job was served by the write-zeroes operation (no data written).
    pub used_write_zeroes: bool,
    /// The first few I/O failures, each with its device, sector, operation and
    /// errno. For reads, `region` 0 is the source; for writes, `region` *i* is
    /// destination *i*.
    pub failures: Vec<RegionFailure>,
}

impl JobOutcome {
    /// Whether the job completed without any error and was not cancelled.
    pub fn is_ok(&self) -> bool {
        !self.read_err && self.write_err.is_empty() && !self.cancelled
    }

    /// `Ok(self)` when [`is_ok`](Self::is_ok), else [`KcopydError::JobFailed`].
    pub fn into_result(self) -> Result<JobOutcome, KcopydError> {
        if self.is_ok() {
            return Ok(self);
        }
        Err(KcopydError::JobFailed {
            read_err: self.read_err,
            write_err: self.write_err,
            cancelled: self.cancelled,
            first_failure: self.failures.into_iter().next(),
        })
    }
}

/// Progress and control shared between a job's handle and the worker.
#[derive(Debug)]
pub(crate) struct JobShared {
    pub(crate) total_bytes: u64,
    pub(crate) bytes_done: AtomicU64,
    pub(crate) cancel: AtomicBool,
    pub(crate) finished: AtomicBool,
}

impl JobShared {
    pub(crate) fn new(total_bytes: u64) -> Arc<JobShared> {
        Arc::new(JobShared {
            total_bytes,
            bytes_done: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        })
    }
}

/// A running job: poll its progress, or cancel it. Cloning gives another handle
/// to the same job; dropping handles does not affect the job.
#[derive(Clone)]
pub struct JobHandle {
    pub(crate) shared: Arc<JobShared>,
    pub(crate) notifier: Notifier,
}

impl JobHandle {
    /// The job's length in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.shared.total_bytes
    }

    /// Bytes of the sub-jobs that have finished so far (for progress reports).
    pub fn bytes_done(&self) -> u64 {
        self.shared.bytes_done.load(Ordering::Acquire)
    }

    /// Whether the job's callback has run.
    pub fn is_finished(&self) -> bool {
        self.shared.finished.load(Ordering::Acquire)
    }

    /// Stops the job: no new sub-job starts, those in flight finish (their writes
    /// too), then the callback runs with [`JobOutcome::cancelled`] set if any
    /// chunk was left out. Does nothing once the job has finished.
    pub fn cancel(&self) {
        if self.shared.cancel.swap(true, Ordering::AcqRel) || self.is_finished() {
            return;
        }
        self.notifier.send(Msg::Cancel);
    }
}

impl fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobHandle")
            .field("total_bytes", &self.total_bytes())
            .field("bytes_done", &self.bytes_done())
            .field("finished", &self.is_finished())
            .field("cancel_requested", &self.shared.cancel.load(Ordering::Relaxed))
            .finish()
    }
}

/// A prepared callback (the kernel's `dm_kcopyd_prepare_callback` job): completes
/// a foreign operation into the client's serialized callback stream.
///
/// [`complete`](Self::complete) may be called from any thread, including a dm-io
/// callback: it never blocks. The callback then runs on the client's worker,
/// never concurrently with its other callbacks. The client counts the token as a
/// job, so destroying the client waits for it. Dropping a token without
/// completing it runs the callback with [`JobOutcome::cancelled`] set.
pub struct CallbackToken {
    pub(crate) done: Option<TokenDone>,
    pub(crate) notifier: Notifier,
}

impl CallbackToken {
    /// Completes the token with the kernel's `read_err` / `write_err` values
    /// (`dm_kcopyd_do_callback`).
    pub fn complete(mut self, read_err: bool, write_err: ErrorBits) {
        self.finish(read_err, write_err, false);
    }

    fn finish(&mut self, read_err: bool, write_err: ErrorBits, cancelled: bool) {
        if let Some(mut done) = self.done.take() {
            done.outcome.read_err = read_err;
            done.outcome.write_err = write_err;
            done.outcome.cancelled = cancelled;
            self.notifier.send(Msg::Token(Box::new(done)));
        }
    }
}

impl Drop for CallbackToken {
    fn drop(&mut self) {
        self.finish(false, ErrorBits::NONE, true);
    }
}

impl fmt::Debug for CallbackToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallbackToken").field("completed", &self.done.is_none()).finish()
    }
}
