//! Errors: typed, with the errno kept and the region, device or sector named.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::device::BlockDevice;
use crate::request::DmIoOp;

/// The largest number of regions one request may name (the kernel's
/// `DM_IO_MAX_REGIONS`, `BITS_PER_LONG`).
pub const MAX_REGIONS: usize = 64;

/// A Linux error number, as the kernel returned it (positive).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// The raw errno value.
    pub fn raw(self) -> i32 {
        self.0
    }

    /// The errno as an [`std::io::Error`].
    pub fn to_io_error(self) -> std::io::Error {
        std::io::Error::from_raw_os_error(self.0)
    }

    /// The symbolic name (`"EIO"`), or `"errno"` when it is not a common one.
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::EIO => "EIO",
            libc::ENOSPC => "ENOSPC",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::EINVAL => "EINVAL",
            libc::EAGAIN => "EAGAIN",
            libc::EINTR => "EINTR",
            libc::EBUSY => "EBUSY",
            libc::EPERM => "EPERM",
            libc::EACCES => "EACCES",
            libc::ENOENT => "ENOENT",
            libc::ENODATA => "ENODATA",
            libc::EROFS => "EROFS",
            libc::EBADF => "EBADF",
            libc::ENXIO => "ENXIO",
            libc::ENOMEM => "ENOMEM",
            libc::ECANCELED => "ECANCELED",
            libc::ETIMEDOUT => "ETIMEDOUT",
            libc::EFBIG => "EFBIG",
            libc::EILSEQ => "EILSEQ",
            libc::ENOTTY => "ENOTTY",
            libc::ENODEV => "ENODEV",
            libc::ENOSYS => "ENOSYS",
            libc::EFAULT => "EFAULT",
            libc::EMEDIUMTYPE => "EMEDIUMTYPE",
            libc::ENOLINK => "ENOLINK",
            libc::EREMOTEIO => "EREMOTEIO",
            libc::ENOTBLK => "ENOTBLK",
            _ => "errno",
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.to_io_error(), self.name())
    }
}

/// The per-region error bits of a request: bit *i* is set when region *i* failed
/// (the kernel's `error_bits`, an `unsigned long`).
///
/// ```
/// let bits = dmio::ErrorBits::from_bits(0b101);
/// assert!(bits.is_set(0) && !bits.is_set(1) && bits.is_set(2));
/// assert_eq!(bits.iter().collect::<Vec<_>>(), vec![0, 2]);
/// assert_eq!(format!("{bits}"), "0b101");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ErrorBits(u64);

impl ErrorBits {
    /// No region failed.
    pub const NONE: ErrorBits = ErrorBits(0);

    /// Error bits from a raw mask.
    pub const fn from_bits(bits: u64) -> ErrorBits {
        ErrorBits(bits)
    }

    /// The raw mask.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether region `region` failed.
    pub const fn is_set(self, region: usize) -> bool {
        region < 64 && self.0 & (1 << region) != 0
    }

    /// Marks region `region` as failed.
    pub fn set(&mut self, region: usize) {
        if region < 64 {
            self.0 |= 1 << region;
        }
    }

    /// The number of failed regions.
    pub const fn count(self) -> u32 {
        self.0.count_ones()
    }

    /// The indices of the failed regions, in increasing order.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..64).filter(move |i| self.0 & (1u64 << i) != 0)
    }
}

impl fmt::Debug for ErrorBits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ErrorBits({:#b})", self.0)
    }
}

impl fmt::Display for ErrorBits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#b}", self.0)
    }
}

/// Why one region of a request failed: which region, on which device, at which
/// sector, doing what, and the errno the kernel returned.
#[derive(Clone)]
pub struct RegionFailure {
    /// The index of the region in the request.
    pub region: usize,
    /// The device of the region.
    pub device: Arc<BlockDevice>,
    /// The first sector (512-byte units) of the operation that failed.
    pub sector: u64,
    /// The operation that failed (a flush for a failed PREFLUSH).
    pub op: DmIoOp,
    /// The error number.
    pub errno: Errno,
}

impl RegionFailure {
    /// Whether the failure means "the device cannot do this" (`EOPNOTSUPP`), as
    /// reported for discard and write-zeroes on devices without support.
    pub fn is_not_supported(&self) -> bool {
        self.errno.0 == libc::EOPNOTSUPP
    }
}

impl fmt::Debug for RegionFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionFailure")
            .field("region", &self.region)
            .field("device", &self.device.path())
            .field("sector", &self.sector)
            .field("op", &self.op)
            .field("errno", &self.errno)
            .finish()
    }
}

impl fmt::Display for RegionFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "region {} ({}, sector {}): {} failed: {}",
            self.region,
            self.device.path().display(),
            self.sector,
            self.op,
            self.errno
        )
    }
}

/// The failed regions of a request, for [`DmIoError::Regions`].
#[derive(Clone, Debug)]
pub struct RegionFailures {
    /// Bit *i* set when region *i* failed.
    pub error_bits: ErrorBits,
    /// One entry per failed operation (at least one per set bit).
    pub failures: Vec<RegionFailure>,
}

impl fmt::Display for RegionFailures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error bits {}", self.error_bits)?;
        for (i, failure) in self.failures.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            write!(f, "{failure}")?;
        }
        Ok(())
    }
}

/// Every error of this crate.
///
/// Bad input is rejected before anything is submitted, with the region index (and
/// device path) and the reason; I/O failures keep the errno.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum DmIoError {
    /// The path does not exist.
    #[error("cannot open {}: no such file or device", path.display())]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// The caller may not open the path this way.
    #[error("cannot open {}: permission denied{}", path.display(), if *read_only { "" } else { " (for read-write access)" })]
    PermissionDenied {
        /// The path.
        path: PathBuf,
        /// Whether read-only access was asked for.
        read_only: bool,
    },
    /// The path names something that is neither a block device nor a regular file.
    #[error("{} is neither a block device nor a regular file (it is a {kind})", path.display())]
    NotABlockDevice {
        /// The path.
        path: PathBuf,
        /// What it is instead ("directory", "character device", ...).
        kind: &'static str,
    },
    /// The filesystem (or driver) behind the path cannot do O_DIRECT.
    #[error("{} does not support direct I/O (O_DIRECT): {source}", path.display())]
    DirectIoUnsupported {
        /// The path.
        path: PathBuf,
        /// The error from `open(2)` (usually EINVAL).
        source: std::io::Error,
    },
    /// A read-write open of a block device that is read-only (`BLKROGET`).
    #[error("{} is a read-only block device; open it with DeviceOptions::read_only(true)", path.display())]
    DeviceReadOnly {
        /// The path.
        path: PathBuf,
    },
    /// The device is held exclusively by someone else (or by us, elsewhere).
    #[error("{} is busy: it is open exclusively elsewhere or mounted", path.display())]
    Busy {
        /// The path.
        path: PathBuf,
    },
    /// Any other failure to open or examine a device, with the errno.
    #[error("{}: {what}: {source}", path.display())]
    Device {
        /// The path.
        path: PathBuf,
        /// What was being done ("open", "BLKGETSIZE64", ...).
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A region's start sector is not a multiple of the device's logical block size.
    #[error("region {region} ({}): sector {sector} is not aligned to the logical block size of {block_size} bytes", path.display())]
    MisalignedSector {
        /// The region index.
        region: usize,
        /// The device path.
        path: PathBuf,
        /// The start sector.
        sector: u64,
        /// The device's logical block size in bytes.
        block_size: u32,
    },
    /// A region's sector count is not a multiple of the device's logical block size.
    #[error("region {region} ({}): count of {count} sectors is not a multiple of the logical block size of {block_size} bytes", path.display())]
    MisalignedCount {
        /// The region index.
        region: usize,
        /// The device path.
        path: PathBuf,
        /// The sector count.
        count: u64,
        /// The device's logical block size in bytes.
        block_size: u32,
    },
    /// A memory segment's address or length does not meet a device's direct-I/O
    /// alignment.
    #[error("memory segment {segment} (address {address:#x}, {len} bytes) of the {kind} is not aligned for region {region} ({}): {reason}", path.display())]
    MisalignedMemory {
        /// The region whose device needs the alignment.
        region: usize,
        /// The device path.
        path: PathBuf,
        /// The segment index in the memory.
        segment: usize,
        /// The segment's address.
        address: usize,
        /// The segment's length.
        len: usize,
        /// The memory type.
        kind: &'static str,
        /// The alignment rule that was broken.
        reason: String,
    },
    /// A region extends beyond the end of its device.
    #[error("region {region} ({}): sectors {sector}..{} lie beyond the end of the device ({device_sectors} sectors)", path.display(), sector.saturating_add(*count))]
    OutOfRange {
        /// The region index.
        region: usize,
        /// The device path.
        path: PathBuf,
        /// The start sector.
        sector: u64,
        /// The sector count.
        count: u64,
        /// The device size in sectors.
        device_sectors: u64,
    },
    /// A read named more than one region (dm-io reads exactly one region).
    #[error("a read must name exactly one region, this one names {regions}")]
    ReadWithMultipleRegions {
        /// The number of regions named.
        regions: usize,
    },
    /// A request named no region at all.
    #[error("the request names no region")]
    NoRegions,
    /// A request named more than [`MAX_REGIONS`] regions.
    #[error("a request may name at most {max} regions, this one names {regions}")]
    TooManyRegions {
        /// The number of regions named.
        regions: usize,
        /// The limit.
        max: usize,
    },
    /// The memory is shorter than a region.
    #[error("region {region} needs {needed} bytes but the memory holds only {available}")]
    MemoryTooShort {
        /// The region index.
        region: usize,
        /// The bytes the region covers.
        needed: u64,
        /// The bytes the memory holds.
        available: u64,
    },
    /// A read named [`DmIoMemory::Zeroes`](crate::DmIoMemory::Zeroes), which is
    /// write-only (shared by every request).
    #[error(
        "a read cannot fill zero memory (DmIoMemory::Zeroes is write-only); read into a buffer"
    )]
    ReadIntoZeroes,
    /// A read or write came without memory.
    #[error("a {op} request needs memory")]
    MissingMemory {
        /// The operation.
        op: DmIoOp,
    },
    /// A segment of a bio vector does not lie within its page.
    #[error(
        "a bio vector segment of {len} bytes at offset {offset} does not fit in one non-empty page"
    )]
    BadSegment {
        /// The offset in the page.
        offset: usize,
        /// The length.
        len: usize,
    },
    /// A write, discard, write-zeroes or flush named a device opened read-only.
    #[error("region {region} ({}): the device is open read-only and cannot take a {op}", path.display())]
    ReadOnlyDevice {
        /// The region index.
        region: usize,
        /// The device path.
        path: PathBuf,
        /// The operation.
        op: DmIoOp,
    },
    /// An atomic write was asked of a region the device cannot write atomically.
    #[error("region {region} ({}): an atomic write of {bytes} bytes is not possible: {reason}", path.display())]
    AtomicWrite {
        /// The region index.
        region: usize,
        /// The device path.
        path: PathBuf,
        /// The region length in bytes.
        bytes: u64,
        /// Why not.
        reason: &'static str,
    },
    /// An asynchronous submission came without a notify callback.
    #[error("an asynchronous request needs a notify callback (use io_sync for a blocking call)")]
    MissingNotify,
    /// The client was closed (or is being destroyed).
    #[error("the dm-io client is closed")]
    ClientClosed,
    /// A notify callback submitted a request while every request slot was busy;
    /// waiting there would deadlock the completion thread.
    #[error(
        "no free request slot and this is the completion thread, which must not wait (submit from another thread or raise the reserve)"
    )]
    NoSlotInCallback,
    /// A blocking call was made from a notify callback, which runs on the completion
    /// thread and must not block.
    #[error(
        "a blocking dm-io call was made from a notify callback (callbacks run on the completion thread and must not block)"
    )]
    BlockingInCallback,
    /// Some regions failed (returned by [`DmIoCompletion::into_result`](crate::DmIoCompletion::into_result)).
    #[error("{0}")]
    Regions(RegionFailures),
    /// The I/O engine could not be set up.
    #[error("the {engine} engine could not be set up: {reason}")]
    EngineSetup {
        /// The engine ("io_uring" or "sync").
        engine: &'static str,
        /// Why.
        reason: String,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Any other system-call failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl DmIoError {
    /// The errno behind this error, when there is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            DmIoError::Device { source, .. }
            | DmIoError::DirectIoUnsupported { source, .. }
            | DmIoError::Io { source, .. } => source.raw_os_error().map(Errno),
            DmIoError::NotFound { .. } => Some(Errno(libc::ENOENT)),
            DmIoError::PermissionDenied { .. } => Some(Errno(libc::EACCES)),
            DmIoError::Busy { .. } => Some(Errno(libc::EBUSY)),
            DmIoError::DeviceReadOnly { .. } => Some(Errno(libc::EROFS)),
            DmIoError::Regions(r) => r.failures.first().map(|f| f.errno),
            _ => None,
        }
    }
}
