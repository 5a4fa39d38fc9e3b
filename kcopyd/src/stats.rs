//! Client counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// The live counters behind [`KcopydStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) jobs: AtomicU64,
    pub(crate) sub_jobs: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) write_zeroes_ops: AtomicU64,
    pub(crate) page_waits: AtomicU64,
    pub(crate) throttle_waits: AtomicU64,
    pub(crate) callback_panics: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> KcopydStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        KcopydStats {
            jobs: get(&self.jobs),
            sub_jobs: get(&self.sub_jobs),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            write_zeroes_ops: get(&self.write_zeroes_ops),
            page_waits: get(&self.page_waits),
            throttle_waits: get(&self.throttle_waits),
            callback_panics: get(&self.callback_panics),
        }
    }
}

/// What a client has done since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KcopydStats {
    /// Copy and zero jobs accepted by the worker.
    pub jobs: u64,
    /// Sub-jobs (chunks) started.
    pub sub_jobs: u64,
    /// Source bytes read.
    pub bytes_read: u64,
    /// Bytes written, summed over destinations (zeroing included).
    pub bytes_written: u64,
    /// Zeroing chunks done with the write-zeroes operation.
    pub write_zeroes_ops: u64,
    /// Times the head of the page queue had to wait for pages.
    pub page_waits: u64,
    /// Times an I/O was held back by the throttle.
    pub throttle_waits: u64,
    /// User callbacks that panicked (caught; the worker went on).
    pub callback_panics: u64,
}
