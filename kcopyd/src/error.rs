//! The errors of this crate.

use std::path::PathBuf;

use dmio::{DmIoError, ErrorBits, RegionFailure};

/// Every error of this crate.
///
/// Bad input is rejected on the caller's thread before anything starts: no I/O is
/// issued and no callback runs. I/O failures are not errors of the call: they
/// arrive in the job's [`JobOutcome`](crate::JobOutcome), which
/// [`into_result`](crate::JobOutcome::into_result) turns into
/// [`KcopydError::JobFailed`].
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum KcopydError {
    /// A copy or zero job named no destination.
    #[error("a kcopyd job needs at least one destination")]
    NoDestinations,
    /// A job named more destinations than [`MAX_DESTINATIONS`](crate::MAX_DESTINATIONS).
    #[error("a kcopyd job may name at most {max} destinations, this one names {count}")]
    TooManyDestinations {
        /// The number of destinations named.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A destination's length differs from the source's (or, when zeroing, from
    /// destination 0's).
    #[error(
        "destination {dest} is {found_sectors} sectors long but the job copies {expected_sectors} sectors (every destination must match the source)"
    )]
    LengthMismatch {
        /// The destination index.
        dest: usize,
        /// The source's sector count.
        expected_sectors: u64,
        /// The destination's sector count.
        found_sectors: u64,
    },
    /// A destination overlaps the source on the same device.
    #[error("destination {dest} overlaps the source on {}", path.display())]
    DestinationOverlapsSource {
        /// The destination index.
        dest: usize,
        /// The device both are on.
        path: PathBuf,
    },
    /// Two destinations overlap on the same device.
    #[error("destinations {first} and {second} overlap on {}", path.display())]
    DestinationsOverlap {
        /// The lower destination index.
        first: usize,
        /// The higher destination index.
        second: usize,
        /// The device both are on.
        path: PathBuf,
    },
    /// The source region is not valid for its device (misaligned, beyond the end).
    #[error("source region: {0}")]
    InvalidSource(#[source] DmIoError),
    /// A destination region is not valid for its device (misaligned, beyond the
    /// end, or on a device opened read-only).
    #[error("destination {dest}: {source}")]
    InvalidDestination {
        /// The destination index.
        dest: usize,
        /// Why.
        source: DmIoError,
    },
    /// A device's logical block size does not divide the client's sub-job size,
    /// so chunks could not be aligned for it.
    #[error("{}: its logical block size of {block_size} bytes does not divide the sub-job size of {sub_job_bytes} bytes (raise KcopydConfig::sub_job_kb)", path.display())]
    BlockLargerThanSubJob {
        /// The device.
        path: PathBuf,
        /// Its logical block size.
        block_size: u32,
        /// The client's sub-job size.
        sub_job_bytes: u64,
    },
    /// The client is shutting down and takes no new jobs.
    #[error("the kcopyd client is shutting down")]
    ClientClosed,
    /// A blocking call was made where it would wait for itself: from a kcopyd
    /// callback (which runs on the client's worker) or a dm-io notify callback.
    #[error(
        "a blocking kcopyd call was made from a kcopyd or dm-io callback, which would wait for its own thread"
    )]
    BlockingInCallback,
    /// A configuration value is out of range.
    #[error("invalid kcopyd configuration: {0}")]
    Config(String),
    /// The dm-io client could not be created.
    #[error("creating the dm-io client: {0}")]
    DmIo(#[source] DmIoError),
    /// The kcopyd worker thread could not be started.
    #[error("starting the kcopyd worker thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A job finished with errors or was cancelled (from
    /// [`JobOutcome::into_result`](crate::JobOutcome::into_result)).
    #[error("{}", describe_failure(*read_err, *write_err, *cancelled, first_failure.as_ref()))]
    JobFailed {
        /// A source read failed.
        read_err: bool,
        /// Bit *i* set when writes to destination *i* failed.
        write_err: ErrorBits,
        /// The job was cancelled before every chunk ran.
        cancelled: bool,
        /// The first I/O failure, with device, sector and errno.
        first_failure: Option<RegionFailure>,
    },
}

fn describe_failure(
    read_err: bool,
    write_err: ErrorBits,
    cancelled: bool,
    first: Option<&RegionFailure>,
) -> String {
    let mut parts = Vec::new();
    if read_err {
        parts.push("the source read failed".to_string());
    }
    if !write_err.is_empty() {
        let dests: Vec<String> = write_err.iter().map(|i| i.to_string()).collect();
        parts.push(format!("writes to destination(s) {} failed", dests.join(", ")));
    }
    if cancelled {
        parts.push("the job was cancelled".to_string());
    }
    let mut text = format!("kcopyd job failed: {}", parts.join("; "));
    if let Some(f) = first {
        text.push_str(&format!(
            " (first: {} {} at sector {}: {})",
            f.device.path().display(),
            f.op,
            f.sector,
            f.errno
        ));
    }
    text
}
