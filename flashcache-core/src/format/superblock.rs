//! The superblock: the fixed 512-byte record at offset 0 of the SSD.

use std::fmt;

use super::crc::crc32c;
use super::error::{Corruption, FormatError};
use super::layout::Layout;
use super::slot::SlotRecord;
use super::{FORMAT_VERSION, MAGIC, MAX_IDENTITY_BYTES, SECTOR_BYTES, SUPERBLOCK_BYTES};

/// Byte offsets of the superblock fields (see the module documentation's table).
mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const STATE: usize = 12;
    pub const MODE: usize = 16;
    pub const WRITE_ONLY: usize = 17;
    pub const COMMIT: usize = 18;
    pub const POLICY: usize = 19;
    pub const BLOCK_SECTORS: usize = 20;
    pub const ASSOC: usize = 24;
    pub const NUM_SETS: usize = 28;
    pub const DISK_ASSOC_BLOCKS: usize = 32;
    pub const MD_BLOCK_BYTES: usize = 36;
    pub const SSD_SECTORS: usize = 40;
    pub const DISK_SECTORS: usize = 48;
    pub const GENERATION: usize = 56;
    pub const CREATED: usize = 64;
    pub const UUID: usize = 72;
    pub const IDENTITY_LEN: usize = 88;
    pub const IDENTITY: usize = 90;
    pub const RESERVED: usize = 346;
    pub const CRC: usize = 508;
}

// The table adds up: identity then reserved then the CRC as the last 4 bytes.
const _: () = assert!(off::IDENTITY + super::MAX_IDENTITY_BYTES == off::RESERVED);
const _: () = assert!(off::RESERVED + 162 == off::CRC);
const _: () = assert!(off::CRC + 4 == super::SUPERBLOCK_BYTES);

/// The superblock's state field: how the cache was last left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SbState {
    /// In use, or crashed while in use: the metadata must be treated as unclean.
    Loaded,
    /// Shut down in order with no dirty blocks.
    Clean,
    /// Shut down in order with dirty blocks, all recorded in the metadata.
    FastClean,
    /// Writing the metadata failed at shutdown: the metadata cannot be trusted.
    Unstable,
}

impl SbState {
    /// The raw value stored at offset 12.
    #[must_use]
    pub const fn to_raw(self) -> u32 {
        match self {
            Self::Loaded => 1,
            Self::Clean => 2,
            Self::FastClean => 3,
            Self::Unstable => 4,
        }
    }

    /// The state a raw value names, if any.
    #[must_use]
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Loaded),
            2 => Some(Self::Clean),
            3 => Some(Self::FastClean),
            4 => Some(Self::Unstable),
            _ => None,
        }
    }
}

/// The superblock's cache mode field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheMode {
    /// Writes go to the SSD and reach the disk later (dirty blocks).
    WriteBack,
    /// Writes go to both the SSD and the disk.
    WriteThrough,
    /// Writes go to the disk only (and invalidate any cached copy).
    WriteAround,
}

impl CacheMode {
    /// The raw value stored at offset 16.
    #[must_use]
    pub const fn to_raw(self) -> u8 {
        match self {
            Self::WriteBack => 1,
            Self::WriteThrough => 2,
            Self::WriteAround => 3,
        }
    }

    /// The mode a raw value names, if any.
    #[must_use]
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(Self::WriteBack),
            2 => Some(Self::WriteThrough),
            3 => Some(Self::WriteAround),
            _ => None,
        }
    }
}

/// The superblock's commit mode field: when metadata updates reach the SSD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommitMode {
    /// Each metadata update is written before the I/O that caused it completes.
    Sync,
    /// Metadata updates are written when the upper layer flushes.
    OnFlush,
}

impl CommitMode {
    /// The raw value stored at offset 18.
    #[must_use]
    pub const fn to_raw(self) -> u8 {
        match self {
            Self::Sync => 1,
            Self::OnFlush => 2,
        }
    }

    /// The commit mode a raw value names, if any.
    #[must_use]
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(Self::Sync),
            2 => Some(Self::OnFlush),
            _ => None,
        }
    }
}

/// A stable identity of the cached disk, chosen by the I/O layer: UTF-8, at most
/// [`MAX_IDENTITY_BYTES`](super::MAX_IDENTITY_BYTES) bytes.
///
/// ```
/// use flashcache_core::format::{DiskIdentity, FormatError};
///
/// let id = DiskIdentity::new("wwn-0x5000c500a1b2c3d4")?;
/// assert_eq!(id.as_str(), "wwn-0x5000c500a1b2c3d4");
/// assert!(matches!(DiskIdentity::new("x".repeat(257)), Err(FormatError::IdentityTooLong { .. })));
/// # Ok::<(), FormatError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskIdentity(String);

impl DiskIdentity {
    /// An identity, or [`FormatError::IdentityTooLong`] if it is over
    /// [`MAX_IDENTITY_BYTES`](super::MAX_IDENTITY_BYTES) bytes.
    pub fn new(identity: impl Into<String>) -> Result<Self, FormatError> {
        let identity = identity.into();
        if identity.len() > MAX_IDENTITY_BYTES {
            return Err(FormatError::IdentityTooLong {
                len: identity.len(),
                max: MAX_IDENTITY_BYTES,
            });
        }
        Ok(Self(identity))
    }

    /// The identity as a string.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The identity's length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the identity is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for DiskIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<&str> for DiskIdentity {
    type Error = FormatError;

    fn try_from(identity: &str) -> Result<Self, FormatError> {
        Self::new(identity)
    }
}

impl TryFrom<String> for DiskIdentity {
    type Error = FormatError;

    fn try_from(identity: String) -> Result<Self, FormatError> {
        Self::new(identity)
    }
}

/// The decoded superblock (format version [`FORMAT_VERSION`](super::FORMAT_VERSION)).
///
/// ```
/// use flashcache_core::format::{
///     CacheMode, CommitMode, DiskIdentity, FormatError, SbState, Superblock,
/// };
///
/// let sb = Superblock {
///     state: SbState::Loaded,
///     mode: CacheMode::WriteBack,
///     write_only: false,
///     commit: CommitMode::Sync,
///     policy: 0,
///     block_sectors: 8,
///     assoc: 512,
///     num_sets: 64,
///     disk_assoc_blocks: 0,
///     md_block_bytes: 4096,
///     ssd_sectors: 1 << 21, // 1 GiB
///     disk_sectors: 1 << 24,
///     generation: 1,
///     created_unix_secs: 1_700_000_000,
///     cache_uuid: [7; 16],
///     disk_identity: DiskIdentity::new("/dev/disk/by-id/example")?,
/// };
/// let bytes = sb.encode();
/// assert_eq!(Superblock::decode(&bytes)?, sb);
/// assert_eq!(sb.layout()?.num_blocks(), 64 * 512);
///
/// // A blank device is not a cache; a flipped bit is caught by the CRC.
/// assert!(matches!(Superblock::decode(&[0; 512]), Err(FormatError::NotACache { .. })));
/// let mut flipped = bytes;
/// flipped[100] ^= 1;
/// assert!(matches!(Superblock::decode(&flipped), Err(FormatError::Corrupt { .. })));
/// # Ok::<(), FormatError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Superblock {
    /// How the cache was last left.
    pub state: SbState,
    /// The cache mode.
    pub mode: CacheMode,
    /// Whether only writes are cached (reads of uncached blocks are not inserted).
    pub write_only: bool,
    /// When metadata updates reach the SSD.
    pub commit: CommitMode,
    /// The replacement policy's id, opaque to the format.
    pub policy: u8,
    /// The cache block size in 512-byte sectors (a power of two, at least 8).
    pub block_sectors: u32,
    /// Cache blocks per set (a power of two from 2 to 32768).
    pub assoc: u32,
    /// The number of sets (at least 1).
    pub num_sets: u32,
    /// 0 for a linear mapping of disk blocks to sets, else the size in blocks (a
    /// power of two) of the disk clusters that map to one set.
    pub disk_assoc_blocks: u32,
    /// The metadata block size in bytes (a power of two from 4096 to 65536).
    pub md_block_bytes: u32,
    /// The size of the SSD when the cache was created, in sectors.
    pub ssd_sectors: u64,
    /// The size of the disk, in sectors.
    pub disk_sectors: u64,
    /// Incremented at every load.
    pub generation: u64,
    /// When the cache was created, in seconds since the Unix epoch.
    pub created_unix_secs: u64,
    /// Random at creation; identifies this cache instance.
    pub cache_uuid: [u8; 16],
    /// A stable identity of the disk, chosen by the I/O layer.
    pub disk_identity: DiskIdentity,
}

impl Superblock {
    /// The cache block size in bytes.
    #[must_use]
    pub fn block_bytes(&self) -> u64 {
        u64::from(self.block_sectors) * SECTOR_BYTES
    }

    /// The SSD size recorded at creation, in bytes (saturating).
    #[must_use]
    pub fn ssd_bytes(&self) -> u64 {
        self.ssd_sectors.saturating_mul(SECTOR_BYTES)
    }

    /// Validates every field and returns the cache's [`Layout`].
    ///
    /// Fails with [`FormatError::Corrupt`] naming the first field out of range:
    /// the geometry ([`Corruption::Geometry`], including a cache that does not fit
    /// `ssd_sectors`), `disk_assoc_blocks`, or a disk with more blocks than a
    /// slot's 48-bit block number can name.
    pub fn layout(&self) -> Result<Layout, FormatError> {
        let corrupt = |reason| FormatError::Corrupt { reason };
        let geometry = |e: FormatError| match e {
            FormatError::InvalidGeometry { reason } => corrupt(Corruption::Geometry(reason)),
            other => other,
        };
        let layout =
            Layout::new(self.block_bytes(), self.assoc, self.num_sets, self.md_block_bytes)
                .map_err(geometry)?;
        layout.check_fits(self.ssd_bytes()).map_err(geometry)?;
        if self.disk_assoc_blocks != 0 && !self.disk_assoc_blocks.is_power_of_two() {
            return Err(corrupt(Corruption::DiskAssocBlocks { found: self.disk_assoc_blocks }));
        }
        // block_sectors >= 8 here (the layout accepted it).
        let last_block = self.disk_sectors.saturating_sub(1) / u64::from(self.block_sectors);
        if last_block > SlotRecord::MAX_BLOCK {
            return Err(corrupt(Corruption::DiskTooLarge {
                disk_sectors: self.disk_sectors,
                block_sectors: self.block_sectors,
            }));
        }
        Ok(layout)
    }

    /// [`layout`](Self::layout) without the layout: whether every field is in range.
    pub fn validate(&self) -> Result<(), FormatError> {
        self.layout().map(drop)
    }

    /// Encodes the superblock as its 512-byte record (format version
    /// [`FORMAT_VERSION`](super::FORMAT_VERSION), CRC included).
    ///
    /// This does not validate: a superblock whose fields are out of range encodes,
    /// and then fails to [`decode`](Self::decode). Call [`validate`](Self::validate)
    /// first when the fields come from a user.
    #[must_use]
    pub fn encode(&self) -> [u8; SUPERBLOCK_BYTES] {
        let mut rec = [0u8; SUPERBLOCK_BYTES];
        put(&mut rec, off::MAGIC, &MAGIC);
        put(&mut rec, off::VERSION, &FORMAT_VERSION.to_le_bytes());
        put(&mut rec, off::STATE, &self.state.to_raw().to_le_bytes());
        put(&mut rec, off::MODE, &[self.mode.to_raw()]);
        put(&mut rec, off::WRITE_ONLY, &[u8::from(self.write_only)]);
        put(&mut rec, off::COMMIT, &[self.commit.to_raw()]);
        put(&mut rec, off::POLICY, &[self.policy]);
        put(&mut rec, off::BLOCK_SECTORS, &self.block_sectors.to_le_bytes());
        put(&mut rec, off::ASSOC, &self.assoc.to_le_bytes());
        put(&mut rec, off::NUM_SETS, &self.num_sets.to_le_bytes());
        put(&mut rec, off::DISK_ASSOC_BLOCKS, &self.disk_assoc_blocks.to_le_bytes());
        put(&mut rec, off::MD_BLOCK_BYTES, &self.md_block_bytes.to_le_bytes());
        put(&mut rec, off::SSD_SECTORS, &self.ssd_sectors.to_le_bytes());
        put(&mut rec, off::DISK_SECTORS, &self.disk_sectors.to_le_bytes());
        put(&mut rec, off::GENERATION, &self.generation.to_le_bytes());
        put(&mut rec, off::CREATED, &self.created_unix_secs.to_le_bytes());
        put(&mut rec, off::UUID, &self.cache_uuid);
        let identity = self.disk_identity.as_str().as_bytes();
        // DiskIdentity guarantees at most 256 bytes, so the length fits a u16.
        let len = u16::try_from(identity.len()).unwrap_or(u16::MAX);
        put(&mut rec, off::IDENTITY_LEN, &len.to_le_bytes());
        put(&mut rec, off::IDENTITY, identity);
        let crc = crc32c(rec.get(..off::CRC).unwrap_or_default());
        put(&mut rec, off::CRC, &crc.to_le_bytes());
        rec
    }

    /// Decodes and validates a superblock from the first 512 bytes of `bytes`
    /// (bytes past 512, for example the rest of the first 4 KiB, are ignored).
    ///
    /// The checks run in this order, so the error names the most useful problem:
    /// 1. fewer than 512 bytes: [`FormatError::BufferSize`];
    /// 2. wrong magic: [`FormatError::NotACache`];
    /// 3. a version newer than [`FORMAT_VERSION`](super::FORMAT_VERSION):
    ///    [`FormatError::NewerVersion`], before the CRC, since a newer format may
    ///    checksum differently;
    /// 4. a CRC mismatch: [`FormatError::Corrupt`] with [`Corruption::Crc`];
    /// 5. every field: [`FormatError::Corrupt`] naming the first one out of range
    ///    (as [`layout`](Self::layout), plus the enums, the identity and the
    ///    reserved bytes, which must be zero).
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let rec: &[u8; SUPERBLOCK_BYTES] = bytes.first_chunk().ok_or(FormatError::BufferSize {
            what: "a superblock (at least)",
            expected: SUPERBLOCK_BYTES,
            found: bytes.len(),
        })?;
        let magic: [u8; 8] = get(rec, off::MAGIC);
        if magic != MAGIC {
            return Err(FormatError::NotACache { found: magic });
        }
        let version = u32::from_le_bytes(get(rec, off::VERSION));
        if version > FORMAT_VERSION {
            return Err(FormatError::NewerVersion { found: version, supported: FORMAT_VERSION });
        }
        let corrupt = |reason| Err(FormatError::Corrupt { reason });
        let stored = u32::from_le_bytes(get(rec, off::CRC));
        let computed = crc32c(rec.get(..off::CRC).unwrap_or_default());
        if stored != computed {
            return corrupt(Corruption::Crc { stored, computed });
        }
        if version != FORMAT_VERSION {
            return corrupt(Corruption::Version { found: version });
        }

        let raw_state = u32::from_le_bytes(get(rec, off::STATE));
        let Some(state) = SbState::from_raw(raw_state) else {
            return corrupt(Corruption::State { found: raw_state });
        };
        let [raw_mode, raw_write_only, raw_commit, policy] = get(rec, off::MODE);
        let Some(mode) = CacheMode::from_raw(raw_mode) else {
            return corrupt(Corruption::Mode { found: raw_mode });
        };
        let write_only = match raw_write_only {
            0 => false,
            1 => true,
            found => return corrupt(Corruption::WriteOnly { found }),
        };
        let Some(commit) = CommitMode::from_raw(raw_commit) else {
            return corrupt(Corruption::Commit { found: raw_commit });
        };

        let identity_len = u16::from_le_bytes(get(rec, off::IDENTITY_LEN));
        let len = usize::from(identity_len);
        if len > MAX_IDENTITY_BYTES {
            return corrupt(Corruption::IdentityLength {
                found: identity_len,
                max: MAX_IDENTITY_BYTES,
            });
        }
        let field: [u8; MAX_IDENTITY_BYTES] = get(rec, off::IDENTITY);
        let (identity, padding) = field.split_at_checked(len).unwrap_or((&field, &[]));
        if let Some(pos) = padding.iter().position(|&b| b != 0) {
            return corrupt(Corruption::IdentityPadding { offset: off::IDENTITY + len + pos });
        }
        let Ok(identity) = std::str::from_utf8(identity) else {
            return corrupt(Corruption::IdentityNotUtf8);
        };
        let reserved = rec.get(off::RESERVED..off::CRC).unwrap_or_default();
        if let Some(pos) = reserved.iter().position(|&b| b != 0) {
            return corrupt(Corruption::Reserved { offset: off::RESERVED + pos });
        }

        let sb = Self {
            state,
            mode,
            write_only,
            commit,
            policy,
            block_sectors: u32::from_le_bytes(get(rec, off::BLOCK_SECTORS)),
            assoc: u32::from_le_bytes(get(rec, off::ASSOC)),
            num_sets: u32::from_le_bytes(get(rec, off::NUM_SETS)),
            disk_assoc_blocks: u32::from_le_bytes(get(rec, off::DISK_ASSOC_BLOCKS)),
            md_block_bytes: u32::from_le_bytes(get(rec, off::MD_BLOCK_BYTES)),
            ssd_sectors: u64::from_le_bytes(get(rec, off::SSD_SECTORS)),
            disk_sectors: u64::from_le_bytes(get(rec, off::DISK_SECTORS)),
            generation: u64::from_le_bytes(get(rec, off::GENERATION)),
            created_unix_secs: u64::from_le_bytes(get(rec, off::CREATED)),
            cache_uuid: get(rec, off::UUID),
            disk_identity: DiskIdentity(identity.to_owned()),
        };
        sb.validate()?;
        Ok(sb)
    }
}

/// The `N` bytes of `rec` at `offset` (all offsets used are constants inside the
/// record; an out-of-range one would read as zeros rather than panic).
fn get<const N: usize>(rec: &[u8; SUPERBLOCK_BYTES], offset: usize) -> [u8; N] {
    rec.get(offset..).and_then(<[u8]>::first_chunk::<N>).copied().unwrap_or([0; N])
}

/// Copies `bytes` into `rec` at `offset` (all offsets used are constants inside
/// the record; an out-of-range write would be skipped rather than panic).
fn put(rec: &mut [u8; SUPERBLOCK_BYTES], offset: usize, bytes: &[u8]) {
    if let Some(dst) = offset.checked_add(bytes.len()).and_then(|end| rec.get_mut(offset..end)) {
        dst.copy_from_slice(bytes);
    }
}
