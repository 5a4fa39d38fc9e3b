//! Creating, loading and destroying a cache's superblock on the SSD: the first
//! piece of the I/O layer. A cache created here has no blocks yet; the cache
//! itself (reads, writes, cleaning) is still to come.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dmio::{
    AlignedBuf, BlockDevice, DeviceKind, DmIoClient, DmIoError, DmIoMemory, DmIoRegion,
    DmIoRequest, ReqFlags, SECTOR_SIZE,
};

use crate::format::{
    CacheMode, CommitMode, DiskIdentity, FormatError, Layout, MD_START, STATS_MAX_BYTES,
    STATS_OFFSET, SUPERBLOCK_REGION_BYTES, SbState, Superblock, decode_stats,
};
use crate::policy::PolicyKind;

/// The superblock region's size, as a buffer length.
const SB_REGION: usize = SUPERBLOCK_REGION_BYTES as usize;

/// Why a cache could not be created, loaded or destroyed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The SSD and the disk are the same device.
    #[error("{} is given as both the SSD and the disk", path.display())]
    SameDevice {
        /// The device.
        path: PathBuf,
    },
    /// A creation option is out of range.
    #[error("invalid cache option: {0}")]
    Option(String),
    /// The SSD already holds a cache (or something that looks like one).
    #[error("{} already holds a cache; destroy it first or create with force", path.display())]
    AlreadyACache {
        /// The SSD.
        path: PathBuf,
    },
    /// The SSD holds no cache.
    #[error("{} holds no cache", path.display())]
    NotACache {
        /// The SSD.
        path: PathBuf,
    },
    /// The SSD's superblock is damaged or from a newer format.
    #[error("{}: the cache superblock cannot be used: {source}", path.display())]
    BadSuperblock {
        /// The SSD.
        path: PathBuf,
        /// What is wrong.
        source: FormatError,
    },
    /// The cache belongs to another disk.
    #[error("the cache on {} belongs to disk {expected:?}, not {found:?} ({})", ssd.display(), disk.display())]
    WrongDisk {
        /// The SSD.
        ssd: PathBuf,
        /// The disk given.
        disk: PathBuf,
        /// The identity recorded in the superblock.
        expected: String,
        /// The identity of the disk given.
        found: String,
    },
    /// The disk's size differs from the one recorded.
    #[error("{}: the cache was made for a disk of {expected} sectors, this one has {found}", disk.display())]
    DiskSizeChanged {
        /// The disk.
        disk: PathBuf,
        /// Sectors recorded in the superblock.
        expected: u64,
        /// Sectors now.
        found: u64,
    },
    /// The SSD is too small (for the cache asked for, or smaller than when the
    /// cache was created).
    #[error("{}: {reason}", path.display())]
    SsdTooSmall {
        /// The SSD.
        path: PathBuf,
        /// Details.
        reason: String,
    },
    /// The cache may hold dirty blocks (it was not shut down cleanly, or fast).
    #[error("the cache on {} may hold dirty blocks (state {state:?}); clean it first or force", path.display())]
    MayBeDirty {
        /// The SSD.
        path: PathBuf,
        /// The superblock's state.
        state: SbState,
    },
    /// A metadata write failed at the last shutdown: the metadata cannot be
    /// trusted (flashcache's UNSTABLE).
    #[error("{}: the cache's metadata write failed at its last shutdown; its metadata cannot be trusted", path.display())]
    Unstable {
        /// The SSD.
        path: PathBuf,
    },
    /// Reading or writing the SSD failed.
    #[error("{what} on {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The SSD.
        path: PathBuf,
        /// The dm-io error, with the errno and sector.
        source: Box<DmIoError>,
    },
}

/// How to create a cache.
///
/// The default commit mode is [`CommitMode::OnFlush`]: slot updates are grouped
/// and made durable at `flush()` and FUA writes, which is the contract of a disk
/// with a volatile write cache (and of every file system above one). `Sync`
/// writes a block's slot before its first dirtying write completes, as
/// flashcache does, at the price of a metadata write on the write path.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// The cache mode.
    pub mode: CacheMode,
    /// Writeback without filling read misses.
    pub write_only: bool,
    /// When metadata reaches the SSD.
    pub commit: CommitMode,
    /// The cache block size in bytes (a power of two, 4 KiB or more, a multiple
    /// of both devices' logical block sizes). Default 4 KiB.
    pub block_bytes: u64,
    /// Blocks per set (a power of two). Default 512.
    pub assoc: u32,
    /// The run of consecutive disk blocks kept in one set (flashcache's disk
    /// associativity), 0 for the linear mapping. Default 64 (256 KiB of 4 KiB
    /// blocks).
    pub disk_assoc_blocks: u32,
    /// The metadata block size. Default 4096.
    pub md_block_bytes: u32,
    /// Use this much of the SSD (default: all of it).
    pub size_bytes: Option<u64>,
    /// The replacement policy.
    pub policy: PolicyKind,
    /// Overwrite an existing cache.
    pub force: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            mode: CacheMode::WriteBack,
            write_only: false,
            commit: CommitMode::OnFlush,
            block_bytes: 4096,
            assoc: 512,
            disk_assoc_blocks: 64,
            md_block_bytes: 4096,
            size_bytes: None,
            policy: PolicyKind::Sieve,
            force: false,
        }
    }
}

/// The policy's id in the superblock.
pub fn policy_id(policy: PolicyKind) -> u8 {
    match policy {
        PolicyKind::Fifo => 0,
        PolicyKind::Slru { .. } => 1,
        PolicyKind::Lru => 2,
        PolicyKind::Sieve => 3,
    }
}

/// A stable identity for `disk`, recorded at creation and checked at load: the
/// backing file of a loop device, else the device's or file's canonical path.
pub fn disk_identity(disk: &BlockDevice) -> String {
    let canonical = |p: &std::path::Path| {
        std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string()
    };
    if let DeviceKind::BlockDevice { major, minor } = disk.kind() {
        let sysfs = format!("/sys/dev/block/{major}:{minor}/loop/backing_file");
        if let Ok(backing) = std::fs::read_to_string(sysfs) {
            return format!("loop:{}", backing.trim_end());
        }
        return format!("block:{}", canonical(disk.path()));
    }
    format!("file:{}", canonical(disk.path()))
}

/// Writes a new, empty cache to `ssd` for `disk`: zeroes the metadata area, then
/// writes the superblock (state Clean) with PREFLUSH and FUA. Refuses an SSD that
/// already holds a cache unless `options.force`.
pub fn create(
    dmio: &DmIoClient,
    ssd: &Arc<BlockDevice>,
    disk: &Arc<BlockDevice>,
    options: &CreateOptions,
) -> Result<Superblock, SetupError> {
    let ssd_path = ssd.path().to_path_buf();
    if ssd.is_same_device(disk) {
        return Err(SetupError::SameDevice { path: ssd_path });
    }
    let lbs = u64::from(ssd.logical_block_size().max(disk.logical_block_size()));
    let block = options.block_bytes;
    if !block.is_power_of_two() || block < 4096 || !block.is_multiple_of(lbs) {
        return Err(SetupError::Option(format!(
            "block size {block} is not a power of two of at least 4096 bytes and a multiple of \
             the devices' logical block size ({lbs})"
        )));
    }
    if options.disk_assoc_blocks != 0 && !options.disk_assoc_blocks.is_power_of_two() {
        return Err(SetupError::Option(format!(
            "disk associativity of {} blocks is not a power of two",
            options.disk_assoc_blocks
        )));
    }
    let ssd_bytes = ssd.size_bytes();
    let use_bytes = options.size_bytes.unwrap_or(ssd_bytes);
    if use_bytes > ssd_bytes {
        return Err(SetupError::SsdTooSmall {
            path: ssd_path,
            reason: format!("a cache of {use_bytes} bytes was asked for, the SSD has {ssd_bytes}"),
        });
    }
    let blocks = Layout::max_blocks_for(use_bytes, block, options.assoc, options.md_block_bytes)
        .map_err(|e| SetupError::Option(e.to_string()))?;
    let num_sets = u32::try_from(blocks / u64::from(options.assoc)).unwrap_or(u32::MAX);
    if num_sets == 0 {
        return Err(SetupError::SsdTooSmall {
            path: ssd_path,
            reason: format!(
                "{use_bytes} bytes cannot hold one set of {} blocks of {block} bytes",
                options.assoc
            ),
        });
    }
    if !options.force {
        match read_superblock(dmio, ssd) {
            Err(SetupError::NotACache { .. }) => {}
            Err(e @ SetupError::Io { .. }) => return Err(e),
            // A valid, damaged or newer superblock: something is there.
            _ => return Err(SetupError::AlreadyACache { path: ssd_path }),
        }
    }
    let identity = DiskIdentity::new(disk_identity(disk))
        .or_else(|_| DiskIdentity::new(format!("size:{}", disk.size_sectors())))
        .map_err(|e| SetupError::Option(e.to_string()))?;
    let sb = Superblock {
        state: SbState::Clean,
        mode: options.mode,
        write_only: options.write_only,
        commit: options.commit,
        policy: policy_id(options.policy),
        block_sectors: (block / SECTOR_SIZE) as u32,
        assoc: options.assoc,
        num_sets,
        disk_assoc_blocks: options.disk_assoc_blocks,
        md_block_bytes: options.md_block_bytes,
        ssd_sectors: ssd.size_sectors(),
        disk_sectors: disk.size_sectors(),
        generation: 0,
        created_unix_secs: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        cache_uuid: random_uuid(),
        disk_identity: identity,
    };
    let layout = sb
        .layout()
        .map_err(|source| SetupError::BadSuperblock { path: ssd_path.clone(), source })?;
    // No slot of an earlier cache on this SSD may survive into this one.
    let md = DmIoRegion::new(ssd, MD_START / SECTOR_SIZE, layout.md_bytes() / SECTOR_SIZE);
    let zeros = DmIoMemory::Zeroes(layout.md_bytes() as usize);
    io(dmio, DmIoRequest::write(zeros), md, "zeroing the metadata", &ssd_path)?;
    write_superblock(dmio, ssd, &sb)?;
    Ok(sb)
}

/// Reads and checks `ssd`'s superblock against `disk`, then records the load:
/// generation + 1 and state Loaded (unclean until an orderly shutdown), written
/// with FUA. Returns the superblock as it was found.
pub fn load(
    dmio: &DmIoClient,
    ssd: &Arc<BlockDevice>,
    disk: &Arc<BlockDevice>,
) -> Result<Superblock, SetupError> {
    let found = read_superblock(dmio, ssd)?;
    let identity = disk_identity(disk);
    if found.disk_identity.as_str() != identity {
        return Err(SetupError::WrongDisk {
            ssd: ssd.path().to_path_buf(),
            disk: disk.path().to_path_buf(),
            expected: found.disk_identity.as_str().to_string(),
            found: identity,
        });
    }
    if found.disk_sectors != disk.size_sectors() {
        return Err(SetupError::DiskSizeChanged {
            disk: disk.path().to_path_buf(),
            expected: found.disk_sectors,
            found: disk.size_sectors(),
        });
    }
    if ssd.size_sectors() < found.ssd_sectors {
        return Err(SetupError::SsdTooSmall {
            path: ssd.path().to_path_buf(),
            reason: format!(
                "the cache was made on {} sectors, the SSD now has {}",
                found.ssd_sectors,
                ssd.size_sectors()
            ),
        });
    }
    if found.state == SbState::Unstable {
        return Err(SetupError::Unstable { path: ssd.path().to_path_buf() });
    }
    let mut loaded = found.clone();
    loaded.state = SbState::Loaded;
    loaded.generation = found.generation.wrapping_add(1);
    // Keep the statistics record of the last shutdown.
    let stats = read_stats_record(dmio, ssd)?;
    write_superblock_with(dmio, ssd, &loaded, stats.as_deref())?;
    Ok(found)
}

/// Removes the cache from `ssd` (zeroes its superblock). Refuses a cache that may
/// hold dirty blocks (not shut down cleanly, or shut down fast) unless `force`.
pub fn destroy(dmio: &DmIoClient, ssd: &Arc<BlockDevice>, force: bool) -> Result<(), SetupError> {
    let sb = read_superblock(dmio, ssd)?;
    if !force && sb.state != SbState::Clean {
        return Err(SetupError::MayBeDirty { path: ssd.path().to_path_buf(), state: sb.state });
    }
    let region = DmIoRegion::new(ssd, 0, SUPERBLOCK_REGION_BYTES / SECTOR_SIZE);
    let req = DmIoRequest::write(DmIoMemory::Zeroes(SB_REGION)).with_flags(ReqFlags::FUA);
    io(dmio, req, region, "erasing the superblock", ssd.path())?;
    Ok(())
}

/// Reads and decodes the superblock of `ssd`.
pub fn read_superblock(
    dmio: &DmIoClient,
    ssd: &Arc<BlockDevice>,
) -> Result<Superblock, SetupError> {
    let path = ssd.path().to_path_buf();
    let region = DmIoRegion::new(ssd, 0, SUPERBLOCK_REGION_BYTES / SECTOR_SIZE);
    let req = DmIoRequest::read(AlignedBuf::new(SB_REGION));
    let bytes = io(dmio, req, region, "reading the superblock", &path)?;
    Superblock::decode(&bytes).map_err(|source| match source {
        FormatError::NotACache { .. } => SetupError::NotACache { path },
        source => SetupError::BadSuperblock { path, source },
    })
}

pub(crate) fn write_superblock(
    dmio: &DmIoClient,
    ssd: &Arc<BlockDevice>,
    sb: &Superblock,
) -> Result<(), SetupError> {
    write_superblock_with(dmio, ssd, sb, None)
}

/// The raw statistics record of `ssd` (see [`crate::format::encode_stats`]),
/// if it has a valid one.
pub fn read_stats_record(
    dmio: &DmIoClient,
    ssd: &Arc<BlockDevice>,
) -> Result<Option<Vec<u8>>, SetupError> {
    let region = DmIoRegion::new(ssd, 0, SUPERBLOCK_REGION_BYTES / SECTOR_SIZE);
    let req = DmIoRequest::read(AlignedBuf::new(SB_REGION));
    let bytes = io(dmio, req, region, "reading the statistics record", ssd.path())?;
    let tail = bytes.get(STATS_OFFSET..).unwrap_or_default();
    Ok(decode_stats(tail).map(|_| tail[..].to_vec()))
}

/// Writes the superblock region: the superblock, and a statistics record
/// (encoded with [`crate::format::encode_stats`]) when given.
pub(crate) fn write_superblock_with(
    dmio: &DmIoClient,
    ssd: &Arc<BlockDevice>,
    sb: &Superblock,
    stats: Option<&[u8]>,
) -> Result<(), SetupError> {
    let mut buf = AlignedBuf::new(SB_REGION);
    buf[..crate::format::SUPERBLOCK_BYTES].copy_from_slice(&sb.encode());
    if let Some(stats) = stats {
        let n = stats.len().min(STATS_MAX_BYTES);
        buf[STATS_OFFSET..STATS_OFFSET + n].copy_from_slice(&stats[..n]);
    }
    let region = DmIoRegion::new(ssd, 0, SUPERBLOCK_REGION_BYTES / SECTOR_SIZE);
    // PREFLUSH: whatever was written before (the zeroed metadata) is durable
    // before the superblock that describes it; FUA: the superblock itself.
    let req = DmIoRequest::write(buf).with_flags(ReqFlags::PREFLUSH | ReqFlags::FUA);
    io(dmio, req, region, "writing the superblock", ssd.path())?;
    Ok(())
}

/// Runs one request and returns the memory's bytes.
fn io(
    dmio: &DmIoClient,
    req: DmIoRequest,
    region: DmIoRegion,
    what: &'static str,
    path: &std::path::Path,
) -> Result<Vec<u8>, SetupError> {
    let fail = |source| SetupError::Io { what, path: path.to_path_buf(), source: Box::new(source) };
    let done = dmio.io_sync(req, &[region]).map_err(fail)?;
    let memory = done.into_result().map_err(fail)?;
    Ok(memory.map(|m| m.to_vec()).unwrap_or_default())
}

/// 16 random bytes from the kernel, or from the clock and the process if
/// `/dev/urandom` cannot be read.
fn random_uuid() -> [u8; 16] {
    use std::io::Read;
    let mut uuid = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut uuid));
    if read.is_err() {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        uuid.copy_from_slice(&(nanos ^ u128::from(std::process::id())).to_le_bytes());
    }
    uuid
}
