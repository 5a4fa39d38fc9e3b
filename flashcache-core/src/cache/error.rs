//! The cache's error type.

use std::path::PathBuf;

use dmio::DmIoError;

use crate::format::FormatError;
use crate::policy::TunableError;
use crate::setup::SetupError;

/// Which of the cache's two devices an error concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// The fast device holding the cache.
    Ssd,
    /// The slow device behind the cache.
    Disk,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Ssd => "SSD",
            Device::Disk => "disk",
        })
    }
}

/// Why a cache operation failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Creating or loading the cache failed.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// An I/O range is not 512-byte aligned, is empty, or ends past the disk.
    #[error("bad I/O range: sector {sector}, {bytes} bytes: {reason}")]
    BadRange {
        /// The first sector asked for.
        sector: u64,
        /// The length asked for, in bytes.
        bytes: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// An I/O to one of the devices failed.
    #[error("{what} on the {device} ({}) at sector {sector}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Which device.
        device: Device,
        /// Its path.
        path: PathBuf,
        /// The first sector of the failed I/O on that device.
        sector: u64,
        /// The dm-io error, with the errno.
        source: Box<DmIoError>,
    },
    /// The metadata on the SSD is damaged: a slot's checksum fails (a torn or
    /// corrupted metadata write) or a slot names a block the cache cannot hold.
    #[error("{}: the cache metadata of set {set} is damaged: {detail}", path.display())]
    CorruptMetadata {
        /// The SSD.
        path: PathBuf,
        /// The set whose metadata is damaged.
        set: u32,
        /// What is wrong.
        detail: String,
    },
    /// The superblock describes a geometry this build cannot use.
    #[error("{}: {source}", path.display())]
    Format {
        /// The SSD.
        path: PathBuf,
        /// The problem.
        source: FormatError,
    },
    /// A tunable's name or value was refused.
    #[error(transparent)]
    Tunable(#[from] TunableError),
    /// The cache has been shut down.
    #[error("the cache is shut down")]
    ShutDown,
    /// A blocking cache call was made from a notify callback running on the
    /// dm-io completion thread, where waiting could deadlock: hand the work to
    /// another thread, or use the asynchronous calls
    /// ([`Cache::submit_read`](super::Cache::submit_read) and friends).
    #[error(
        "a blocking cache call was made from a dm-io notify callback; use the asynchronous calls there"
    )]
    BlockingInCallback,
    /// Dirty blocks could not all be cleaned.
    #[error("{remaining} dirty blocks could not be cleaned ({failed} cleaning failures)")]
    CleaningIncomplete {
        /// Dirty blocks left.
        remaining: u64,
        /// Cleanings that failed in the last attempt.
        failed: u64,
    },
}

impl CacheError {
    /// The errno of an I/O error, if this is one and it has an errno.
    pub fn errno(&self) -> Option<i32> {
        match self {
            CacheError::Io { source, .. } => source.errno().map(|e| e.0),
            _ => None,
        }
    }
}
