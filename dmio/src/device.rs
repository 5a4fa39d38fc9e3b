//! Block devices (and regular files) opened for direct I/O, with their limits
//! probed from the kernel.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::DmIoError;
use crate::sys;

/// Bytes in a sector: regions are always counted in 512-byte sectors, whatever
/// the device's logical block size (as in the kernel).
pub const SECTOR_SIZE: u64 = 512;

/// The largest byte count one read or write system call transfers on Linux
/// (`MAX_RW_COUNT`, `INT_MAX` rounded down to a page).
const MAX_RW_COUNT: u64 = 0x7fff_f000;

static NEXT_DEVICE_ID: AtomicU64 = AtomicU64::new(1);

/// What kind of object a [`BlockDevice`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A block special file.
    BlockDevice {
        /// The major device number.
        major: u32,
        /// The minor device number.
        minor: u32,
    },
    /// A regular file used as a device.
    RegularFile,
}

/// Where the direct-I/O alignment of a device was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlignmentSource {
    /// `statx(STATX_DIOALIGN)`.
    Statx,
    /// The `BLKSSZGET` ioctl and the block queue's `dma_alignment` in sysfs.
    BlockIoctl,
    /// The logical block size, in sysfs, of the block device holding the file.
    Sysfs,
    /// Nothing could be read, so the largest common value (4096) is used, which is
    /// always safe and possibly stricter than needed.
    Conservative,
}

/// A block device's zone model (sysfs `queue/zoned`): whether writes must go
/// sequentially within each zone.
///
/// ```no_run
/// use dmio::{BlockDevice, ZonedModel};
/// let dev = BlockDevice::open("/dev/loop0")?;
/// assert_eq!(dev.zoned_model(), ZonedModel::None); // loop devices are not zoned
/// # Ok::<(), dmio::DmIoError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZonedModel {
    /// Not zoned: writes may go anywhere in any order (regular files too).
    #[default]
    None,
    /// Zoned, but random writes are tolerated (at a cost).
    HostAware,
    /// Zoned: each zone must be written sequentially, at its write pointer.
    HostManaged,
}

impl ZonedModel {
    /// The model sysfs names `text` (`none`, `host-aware`, `host-managed`);
    /// anything else (a future model) counts as host-managed, the strict one.
    fn from_sysfs(text: &str) -> ZonedModel {
        match text.trim() {
            "none" | "" => ZonedModel::None,
            "host-aware" => ZonedModel::HostAware,
            _ => ZonedModel::HostManaged,
        }
    }
}

/// The limits and capabilities of a device, probed when it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The logical block size in bytes: every region's start and length must be a
    /// multiple of it. For a regular file this is its direct-I/O offset alignment.
    pub logical_block_size: u32,
    /// The physical block size in bytes (equal to the logical size for files).
    pub physical_block_size: u32,
    /// The alignment, in bytes, that every memory segment's address must have.
    pub dio_mem_align: u32,
    /// Where the alignment values came from.
    pub alignment_source: AlignmentSource,
    /// The largest single read or write the device takes without splitting.
    pub max_io_bytes: u64,
    /// The largest single discard, or 0 when discard is not supported.
    pub max_discard_bytes: u64,
    /// The largest single write-zeroes, or 0 when write-zeroes is not supported.
    pub max_write_zeroes_bytes: u64,
    /// The largest atomic write (`RWF_ATOMIC`), or 0 when not supported.
    pub atomic_write_max_bytes: u32,
    /// The smallest atomic write.
    pub atomic_write_min_bytes: u32,
    /// The zone model ([`ZonedModel::None`] for regular files).
    pub zoned: ZonedModel,
}

/// Options for [`BlockDevice::open_with`].
///
/// ```no_run
/// use dmio::{BlockDevice, DeviceOptions};
/// let dev = BlockDevice::open_with("/dev/loop0", DeviceOptions::new().read_only(true))?;
/// # Ok::<(), dmio::DmIoError>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceOptions {
    read_only: bool,
    exclusive: bool,
}

impl DeviceOptions {
    /// Read-write, shared access (the default).
    pub fn new() -> DeviceOptions {
        DeviceOptions::default()
    }

    /// Opens read-only: writes, discards, write-zeroes and flushes are refused.
    pub fn read_only(mut self, read_only: bool) -> DeviceOptions {
        self.read_only = read_only;
        self
    }

    /// Opens exclusively: `O_EXCL` for a block device (fails if it is mounted or
    /// claimed), a non-blocking `flock(LOCK_EX)` for a regular file.
    pub fn exclusive(mut self, exclusive: bool) -> DeviceOptions {
        self.exclusive = exclusive;
        self
    }
}

/// A block device or regular file opened with `O_DIRECT`: the analogue of the
/// kernel's `struct block_device` in a [`DmIoRegion`](crate::DmIoRegion).
///
/// Devices are shared through `Arc`: every region holds one, so the descriptor
/// stays open until the last request naming it has completed.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let file = tempfile::NamedTempFile::new_in(std::env::temp_dir())?;
/// file.as_file().set_len(1 << 20)?;
/// let dev = dmio::BlockDevice::open(file.path())?;
/// assert_eq!(dev.size_sectors(), 2048);
/// assert!(dev.info().logical_block_size >= 512);
/// # Ok(()) }
/// ```
pub struct BlockDevice {
    file: File,
    _lock: Option<nix::fcntl::Flock<File>>,
    path: PathBuf,
    kind: DeviceKind,
    read_only: bool,
    exclusive: bool,
    size_bytes: AtomicU64,
    info: DeviceInfo,
    id: u64,
    #[cfg(feature = "fault-injection")]
    faults: crate::fault::FaultInjector,
}

fn open_error(path: &Path, err: io::Error, read_only: bool, is_file: bool) -> DmIoError {
    let path = path.to_path_buf();
    match err.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENXIO) | Some(libc::ENODEV) => DmIoError::NotFound { path },
        Some(libc::EACCES) | Some(libc::EPERM) => DmIoError::PermissionDenied { path, read_only },
        Some(libc::EROFS) => DmIoError::Device { path, what: "open read-write", source: err },
        Some(libc::EBUSY) => DmIoError::Busy { path },
        Some(libc::EINVAL) if is_file => DmIoError::DirectIoUnsupported { path, source: err },
        _ => DmIoError::Device { path, what: "open", source: err },
    }
}

fn kind_name(ft: &std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "directory"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Whether block device `major:minor` is a loop device backed by `file`.
fn loop_backs_file(major: u32, minor: u32, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    let sysfs = format!("/sys/dev/block/{major}:{minor}/loop/backing_file");
    let Ok(backing) = std::fs::read_to_string(sysfs) else {
        return false;
    };
    // The kernel appends " (deleted)" when the file was unlinked; such a file
    // cannot be opened by path any more, so there is nothing to compare.
    match (std::fs::metadata(backing.trim_end_matches('\n')), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn read_sysfs_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The sysfs `queue` directory of a block device (a partition's is its parent's).
fn sysfs_queue_dir(major: u32, minor: u32) -> PathBuf {
    let dev = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if dev.join("partition").exists() { dev.join("../queue") } else { dev.join("queue") }
}

impl BlockDevice {
    /// Opens `path` read-write, shared.
    pub fn open(path: impl AsRef<Path>) -> Result<Arc<BlockDevice>, DmIoError> {
        Self::open_with(path, DeviceOptions::new())
    }

    /// Opens `path` with `options`.
    ///
    /// Errors: [`NotFound`](DmIoError::NotFound), [`PermissionDenied`](DmIoError::PermissionDenied),
    /// [`NotABlockDevice`](DmIoError::NotABlockDevice),
    /// [`DirectIoUnsupported`](DmIoError::DirectIoUnsupported), [`Busy`](DmIoError::Busy),
    /// or [`Device`](DmIoError::Device) with the errno.
    pub fn open_with(
        path: impl AsRef<Path>,
        options: DeviceOptions,
    ) -> Result<Arc<BlockDevice>, DmIoError> {
        let path = path.as_ref();
        let read_only = options.read_only;
        let meta = std::fs::metadata(path).map_err(|e| open_error(path, e, read_only, false))?;
        let ft = meta.file_type();
        let is_block = ft.is_block_device();
        if !is_block && !ft.is_file() {
            return Err(DmIoError::NotABlockDevice {
                path: path.to_path_buf(),
                kind: kind_name(&ft),
            });
        }
        let mut flags = libc::O_DIRECT | libc::O_CLOEXEC;
        if options.exclusive && is_block {
            flags |= libc::O_EXCL;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| open_error(path, e, read_only, !is_block))?;
        // Check again on the descriptor: the path may have changed under us.
        let meta = file.metadata().map_err(|e| DmIoError::Device {
            path: path.to_path_buf(),
            what: "fstat",
            source: e,
        })?;
        let ft = meta.file_type();
        let kind = if ft.is_block_device() {
            let rdev = meta.rdev();
            DeviceKind::BlockDevice { major: libc::major(rdev), minor: libc::minor(rdev) }
        } else if ft.is_file() {
            DeviceKind::RegularFile
        } else {
            return Err(DmIoError::NotABlockDevice {
                path: path.to_path_buf(),
                kind: kind_name(&ft),
            });
        };
        if !read_only && matches!(kind, DeviceKind::BlockDevice { .. }) {
            // The kernel lets a read-only block device be opened for writing and
            // fails every write later; say so now instead.
            if sys::block_read_only(file.as_fd()).unwrap_or(false) {
                return Err(DmIoError::DeviceReadOnly { path: path.to_path_buf() });
            }
        }
        let lock = if options.exclusive && kind == DeviceKind::RegularFile {
            let dup = file.try_clone().map_err(|e| DmIoError::Device {
                path: path.to_path_buf(),
                what: "dup",
                source: e,
            })?;
            match nix::fcntl::Flock::lock(dup, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => Some(lock),
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(DmIoError::Busy { path: path.to_path_buf() });
                }
                Err((_, errno)) => {
                    return Err(DmIoError::Device {
                        path: path.to_path_buf(),
                        what: "flock",
                        source: io::Error::from(errno),
                    });
                }
            }
        } else {
            None
        };
        let dev_err = |what: &'static str| {
            let path = path.to_path_buf();
            move |source: io::Error| DmIoError::Device { path, what, source }
        };
        let size_bytes = match kind {
            DeviceKind::BlockDevice { .. } => {
                sys::block_device_size(file.as_fd()).map_err(dev_err("BLKGETSIZE64"))?
            }
            DeviceKind::RegularFile => meta.len(),
        };
        let info =
            probe_info(&file, kind, &meta, read_only, size_bytes).map_err(dev_err("probe"))?;
        Ok(Arc::new(BlockDevice {
            file,
            _lock: lock,
            path: path.to_path_buf(),
            kind,
            read_only,
            exclusive: options.exclusive,
            size_bytes: AtomicU64::new(size_bytes),
            info,
            id: NEXT_DEVICE_ID.fetch_add(1, Ordering::Relaxed),
            #[cfg(feature = "fault-injection")]
            faults: crate::fault::FaultInjector::new(),
        }))
    }

    /// The path the device was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a block device or a regular file.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// Whether the device was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the device was opened exclusively.
    pub fn is_exclusive(&self) -> bool {
        self.exclusive
    }

    /// The size in bytes, as of opening or the last [`refresh_size`](Self::refresh_size).
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    /// The size in 512-byte sectors (rounded down).
    pub fn size_sectors(&self) -> u64 {
        self.size_bytes() / SECTOR_SIZE
    }

    /// Reads the size again (after a file was extended or a device resized).
    pub fn refresh_size(&self) -> Result<u64, DmIoError> {
        let size = match self.kind {
            DeviceKind::BlockDevice { .. } => sys::block_device_size(self.file.as_fd()),
            DeviceKind::RegularFile => self.file.metadata().map(|m| m.len()),
        }
        .map_err(|source| DmIoError::Device {
            path: self.path.clone(),
            what: "size",
            source,
        })?;
        self.size_bytes.store(size, Ordering::Release);
        Ok(size)
    }

    /// The probed limits and capabilities.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The open file (`O_DIRECT`), for the client's inline blocking path.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The logical block size in bytes.
    pub fn logical_block_size(&self) -> u32 {
        self.info.logical_block_size
    }

    /// Whether discard is supported (taking fault-injection overrides into account).
    pub fn supports_discard(&self) -> bool {
        self.max_discard_bytes() > 0
    }

    /// Whether write-zeroes is supported (taking fault-injection overrides into account).
    pub fn supports_write_zeroes(&self) -> bool {
        self.max_write_zeroes_bytes() > 0
    }

    /// The zone model (taking fault-injection overrides into account).
    pub fn zoned_model(&self) -> ZonedModel {
        #[cfg(feature = "fault-injection")]
        if let Some(v) = self.faults.zoned_override() {
            return v;
        }
        self.info.zoned
    }

    /// Whether the device is zoned (host-aware or host-managed), so that writes
    /// should go sequentially (the kernel's `bdev_is_zoned`; kcopyd then writes
    /// in order, as with `WRITE_SEQ`).
    pub fn is_zoned(&self) -> bool {
        self.zoned_model() != ZonedModel::None
    }

    /// The largest single discard in effect, 0 when unsupported.
    pub(crate) fn max_discard_bytes(&self) -> u64 {
        #[cfg(feature = "fault-injection")]
        if let Some(v) = self.faults.discard_override() {
            return v;
        }
        self.info.max_discard_bytes
    }

    /// The largest single write-zeroes in effect, 0 when unsupported.
    pub(crate) fn max_write_zeroes_bytes(&self) -> u64 {
        #[cfg(feature = "fault-injection")]
        if let Some(v) = self.faults.write_zeroes_override() {
            return v;
        }
        self.info.max_write_zeroes_bytes
    }

    /// The largest atomic write in effect, 0 when unsupported.
    pub(crate) fn atomic_write_max_bytes(&self) -> u32 {
        #[cfg(feature = "fault-injection")]
        if let Some(v) = self.faults.atomic_override() {
            return v;
        }
        self.info.atomic_write_max_bytes
    }

    /// A number unique to this open device within the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether `self` and `other` are the same device: the same open device, the
    /// same block device (major and minor) opened twice, the same file (device
    /// and inode) opened twice, or a loop device and the file behind it (from
    /// sysfs `loop/backing_file`). Other stacking (partitions of one disk, a loop
    /// device over a file on another loop device) is not recognised.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let file = tempfile::NamedTempFile::new_in(std::env::temp_dir())?;
    /// file.as_file().set_len(1 << 20)?;
    /// let a = dmio::BlockDevice::open(file.path())?;
    /// let b = dmio::BlockDevice::open(file.path())?;
    /// assert!(a.is_same_device(&b));
    /// # Ok(()) }
    /// ```
    pub fn is_same_device(&self, other: &BlockDevice) -> bool {
        use std::os::unix::fs::MetadataExt;
        if self.id == other.id {
            return true;
        }
        match (self.kind, other.kind) {
            (DeviceKind::BlockDevice { .. }, DeviceKind::BlockDevice { .. }) => {
                self.kind == other.kind
            }
            (DeviceKind::RegularFile, DeviceKind::RegularFile) => {
                match (self.file.metadata(), other.file.metadata()) {
                    (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                    _ => false,
                }
            }
            (DeviceKind::BlockDevice { major, minor }, DeviceKind::RegularFile) => {
                loop_backs_file(major, minor, &other.file)
            }
            (DeviceKind::RegularFile, DeviceKind::BlockDevice { major, minor }) => {
                loop_backs_file(major, minor, &self.file)
            }
        }
    }

    /// Whether this is a block special file.
    pub fn is_block_device(&self) -> bool {
        matches!(self.kind, DeviceKind::BlockDevice { .. })
    }

    /// The fault injector of this device (feature `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn faults(&self) -> &crate::fault::FaultInjector {
        &self.faults
    }

    /// The raw descriptor.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for BlockDevice {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockDevice")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("read_only", &self.read_only)
            .field("size_bytes", &self.size_bytes())
            .field("info", &self.info)
            .finish()
    }
}

fn probe_info(
    file: &File,
    kind: DeviceKind,
    meta: &std::fs::Metadata,
    read_only: bool,
    size_bytes: u64,
) -> io::Result<DeviceInfo> {
    let statx = sys::statx_dio(file.as_fd()).unwrap_or_default();
    match kind {
        DeviceKind::BlockDevice { major, minor } => {
            let queue = sysfs_queue_dir(major, minor);
            let lbs = sys::block_logical_size(file.as_fd())?;
            let pbs = sys::block_physical_size(file.as_fd()).unwrap_or(lbs);
            let (mem_align, source) = if statx.mem_align > 0 {
                (statx.mem_align, AlignmentSource::Statx)
            } else {
                match read_sysfs_u64(&queue.join("dma_alignment")) {
                    Some(mask) => ((mask + 1) as u32, AlignmentSource::BlockIoctl),
                    None => (lbs, AlignmentSource::BlockIoctl),
                }
            };
            let max_io = read_sysfs_u64(&queue.join("max_sectors_kb"))
                .map(|kb| kb * 1024)
                .filter(|&b| b >= lbs as u64)
                .unwrap_or(128 * 1024);
            let discard = read_sysfs_u64(&queue.join("discard_max_bytes")).unwrap_or(0);
            let write_zeroes = read_sysfs_u64(&queue.join("write_zeroes_max_bytes")).unwrap_or(0);
            let zoned = std::fs::read_to_string(queue.join("zoned"))
                .map_or(ZonedModel::None, |text| ZonedModel::from_sysfs(&text));
            Ok(DeviceInfo {
                logical_block_size: lbs,
                physical_block_size: pbs,
                dio_mem_align: mem_align.max(1),
                alignment_source: source,
                max_io_bytes: max_io,
                max_discard_bytes: discard,
                max_write_zeroes_bytes: write_zeroes,
                atomic_write_max_bytes: statx.atomic_unit_max,
                atomic_write_min_bytes: statx.atomic_unit_min,
                zoned,
            })
        }
        DeviceKind::RegularFile => {
            let (lbs, mem_align, source) = if statx.offset_align > 0 && statx.mem_align > 0 {
                (statx.offset_align, statx.mem_align, AlignmentSource::Statx)
            } else {
                let dev = meta.dev();
                let lbs = read_sysfs_u64(
                    &sysfs_queue_dir(libc::major(dev), libc::minor(dev)).join("logical_block_size"),
                );
                match lbs {
                    Some(lbs) => (lbs as u32, lbs as u32, AlignmentSource::Sysfs),
                    None => (4096, 4096, AlignmentSource::Conservative),
                }
            };
            // Discard and write-zeroes on a file are hole punches. Probe support
            // harmlessly: punching beyond the end of the file changes nothing.
            let punch = !read_only && {
                let start = size_bytes.div_ceil(lbs as u64) * lbs as u64;
                nix::fcntl::fallocate(
                    file.as_fd(),
                    nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                        | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    start as i64,
                    lbs as i64,
                )
                .is_ok()
            };
            let unlimited = u64::MAX / 2;
            Ok(DeviceInfo {
                logical_block_size: lbs,
                physical_block_size: lbs,
                dio_mem_align: mem_align.max(1),
                alignment_source: source,
                max_io_bytes: MAX_RW_COUNT / lbs as u64 * lbs as u64,
                max_discard_bytes: if punch { unlimited } else { 0 },
                max_write_zeroes_bytes: if punch { unlimited } else { 0 },
                atomic_write_max_bytes: statx.atomic_unit_max,
                atomic_write_min_bytes: statx.atomic_unit_min,
                zoned: ZonedModel::None,
            })
        }
    }
}

#[cfg(test)]
mod zoned_tests {
    use super::ZonedModel;

    #[test]
    fn sysfs_zone_models_parse() {
        assert_eq!(ZonedModel::from_sysfs("none\n"), ZonedModel::None);
        assert_eq!(ZonedModel::from_sysfs("host-aware\n"), ZonedModel::HostAware);
        assert_eq!(ZonedModel::from_sysfs("host-managed\n"), ZonedModel::HostManaged);
        // A model this code does not know yet is taken as the strict one.
        assert_eq!(ZonedModel::from_sysfs("host-something\n"), ZonedModel::HostManaged);
    }
}
