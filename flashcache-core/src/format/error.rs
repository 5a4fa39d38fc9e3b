//! The errors of the format module.

/// Everything that can go wrong encoding or decoding the on-SSD format.
///
/// Decoding never panics: every malformed input, whether zeros, random data, a torn
/// write or a field out of range, ends up as one of these.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The superblock does not start with [`MAGIC`](super::MAGIC): the device was
    /// never formatted as a cache (all zeros, another file system, random data).
    #[error(
        "not a flashcache-core cache: the superblock magic is {found:02x?}, expected {:02x?}",
        super::MAGIC
    )]
    NotACache {
        /// The first 8 bytes found where the magic belongs.
        found: [u8; 8],
    },
    /// The superblock was written by a newer format version than this build reads.
    #[error(
        "the cache is in on-SSD format version {found}, newer than version {supported}, the newest this build reads: load it with a newer flashcache-core"
    )]
    NewerVersion {
        /// The version found in the superblock.
        found: u32,
        /// The newest version this build supports ([`FORMAT_VERSION`](super::FORMAT_VERSION)).
        supported: u32,
    },
    /// The superblock is damaged or inconsistent: a CRC mismatch or a field out of
    /// range.
    #[error("corrupt cache superblock: {reason}")]
    Corrupt {
        /// What is wrong.
        reason: Corruption,
    },
    /// A cache geometry (block size, associativity, set count, metadata block size)
    /// is out of range, overflows, or does not fit the SSD.
    #[error("invalid cache geometry: {reason}")]
    InvalidGeometry {
        /// What is wrong.
        reason: GeometryError,
    },
    /// A metadata slot's CRC does not match: the slot was torn by an interrupted
    /// write, holds garbage, or was written at another slot's place.
    #[error("metadata slot {index} is torn or garbage (its CRC does not match)")]
    TornSlot {
        /// The slot's global index (`set * assoc + way`).
        index: u64,
    },
    /// A metadata slot's CRC matches but its content is not valid format v1 (an
    /// unknown state or a non-zero reserved byte): it was written by a buggy or
    /// incompatible writer, not torn.
    #[error("metadata slot {index} is invalid: {reason}")]
    CorruptSlot {
        /// The slot's global index (`set * assoc + way`).
        index: u64,
        /// What is wrong.
        reason: SlotCorruption,
    },
    /// A buffer handed to an encoder or decoder has the wrong length.
    #[error("{what} must be {expected} bytes long, got {found} bytes")]
    BufferSize {
        /// What the buffer holds.
        what: &'static str,
        /// The length needed (a minimum or a multiple, as `what` says).
        expected: usize,
        /// The length given.
        found: usize,
    },
    /// A disk identity is longer than [`MAX_IDENTITY_BYTES`](super::MAX_IDENTITY_BYTES).
    #[error("a disk identity is at most {max} bytes of UTF-8, this one is {len} bytes")]
    IdentityTooLong {
        /// The identity's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A block number does not fit the 48 bits a slot stores.
    #[error("disk block number {block} does not fit a slot's 48 bits (at most {max})")]
    BlockOutOfRange {
        /// The block number.
        block: u64,
        /// The largest storable block number ([`SlotRecord::MAX_BLOCK`](super::SlotRecord::MAX_BLOCK)).
        max: u64,
    },
    /// A metadata block number beyond the layout's metadata area.
    #[error("metadata block {md_block} does not exist: the layout has {count} metadata blocks")]
    NoSuchMdBlock {
        /// The metadata block number asked for.
        md_block: u64,
        /// How many metadata blocks the layout has.
        count: u64,
    },
    /// The number of records handed to a metadata block encoder differs from the
    /// number of slots the block holds.
    #[error("metadata block {md_block} holds {expected} slots, {found} records were given")]
    SlotCount {
        /// The metadata block number.
        md_block: u64,
        /// The number of slots in that block.
        expected: usize,
        /// The number of records given.
        found: usize,
    },
}

impl FormatError {
    /// The global slot index this error is about, for [`TornSlot`](Self::TornSlot)
    /// and [`CorruptSlot`](Self::CorruptSlot).
    #[must_use]
    pub fn slot_index(&self) -> Option<u64> {
        match self {
            Self::TornSlot { index } | Self::CorruptSlot { index, .. } => Some(*index),
            _ => None,
        }
    }
}

impl From<GeometryError> for FormatError {
    fn from(reason: GeometryError) -> Self {
        Self::InvalidGeometry { reason }
    }
}

/// Why a superblock is corrupt ([`FormatError::Corrupt`]).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// The CRC-32C stored at offset 508 does not match bytes 0..508: a torn or
    /// partial write, bit rot, or data that happens to start with the magic.
    #[error("CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc {
        /// The CRC stored in the superblock.
        stored: u32,
        /// The CRC of the superblock's bytes 0..508.
        computed: u32,
    },
    /// A format version that never existed (0).
    #[error("format version {found} does not exist")]
    Version {
        /// The version found.
        found: u32,
    },
    /// An unknown superblock state.
    #[error("unknown state {found} (expected 1 to 4)")]
    State {
        /// The raw value found.
        found: u32,
    },
    /// An unknown cache mode.
    #[error("unknown cache mode {found} (expected 1 to 3)")]
    Mode {
        /// The raw value found.
        found: u8,
    },
    /// A `write_only` flag other than 0 or 1.
    #[error("write_only flag is {found} (expected 0 or 1)")]
    WriteOnly {
        /// The raw value found.
        found: u8,
    },
    /// An unknown commit mode.
    #[error("unknown commit mode {found} (expected 1 or 2)")]
    Commit {
        /// The raw value found.
        found: u8,
    },
    /// `disk_assoc_blocks` is neither 0 nor a power of two.
    #[error("disk_assoc_blocks is {found}, neither 0 (linear) nor a power of two")]
    DiskAssocBlocks {
        /// The value found.
        found: u32,
    },
    /// The disk has more blocks than a slot's 48-bit block number can name.
    #[error(
        "a disk of {disk_sectors} sectors has more blocks of {block_sectors} sectors than a slot's 48-bit block number can name"
    )]
    DiskTooLarge {
        /// The disk size recorded.
        disk_sectors: u64,
        /// The cache block size recorded.
        block_sectors: u32,
    },
    /// The disk identity length is over [`MAX_IDENTITY_BYTES`](super::MAX_IDENTITY_BYTES).
    #[error("disk identity length {found} is over {max}")]
    IdentityLength {
        /// The length found.
        found: u16,
        /// The limit.
        max: usize,
    },
    /// The disk identity bytes are not UTF-8.
    #[error("disk identity is not UTF-8")]
    IdentityNotUtf8,
    /// A byte of the disk identity field past its length is not zero.
    #[error("disk identity padding byte at offset {offset} is not zero")]
    IdentityPadding {
        /// The superblock byte offset of the first non-zero padding byte.
        offset: usize,
    },
    /// A reserved byte is not zero.
    #[error("reserved byte at offset {offset} is not zero")]
    Reserved {
        /// The superblock byte offset of the first non-zero reserved byte.
        offset: usize,
    },
    /// The geometry fields are out of range, or do not fit `ssd_sectors`.
    #[error("{0}")]
    Geometry(GeometryError),
}

/// Why a geometry is invalid ([`FormatError::InvalidGeometry`], or inside
/// [`Corruption::Geometry`] when read from a superblock).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// The cache block size is not a power of two between
    /// [`MIN_BLOCK_BYTES`](super::MIN_BLOCK_BYTES) and
    /// [`MAX_BLOCK_BYTES`](super::MAX_BLOCK_BYTES).
    #[error(
        "cache block size of {block_bytes} bytes is not a power of two from {} to {} bytes",
        super::MIN_BLOCK_BYTES,
        super::MAX_BLOCK_BYTES
    )]
    BlockSize {
        /// The block size in bytes.
        block_bytes: u64,
    },
    /// The associativity is not a power of two between
    /// [`MIN_ASSOC`](super::MIN_ASSOC) and [`MAX_ASSOC`](super::MAX_ASSOC).
    #[error(
        "associativity {assoc} is not a power of two from {} to {}",
        super::MIN_ASSOC,
        super::MAX_ASSOC
    )]
    Assoc {
        /// The associativity.
        assoc: u32,
    },
    /// The set count is 0.
    #[error("the cache has no sets (num_sets is 0)")]
    NoSets,
    /// The metadata block size is not a power of two between
    /// [`MIN_MD_BLOCK_BYTES`](super::MIN_MD_BLOCK_BYTES) and
    /// [`MAX_MD_BLOCK_BYTES`](super::MAX_MD_BLOCK_BYTES).
    #[error(
        "metadata block size of {md_block_bytes} bytes is not a power of two from {} to {} bytes",
        super::MIN_MD_BLOCK_BYTES,
        super::MAX_MD_BLOCK_BYTES
    )]
    MdBlockSize {
        /// The metadata block size in bytes.
        md_block_bytes: u32,
    },
    /// The cache's extent overflows a 64-bit byte offset.
    #[error("the cache's size overflows 64-bit byte offsets")]
    Overflow,
    /// The cache needs more bytes than the SSD has.
    #[error("the cache needs {needed_bytes} bytes but the SSD has {ssd_bytes} bytes")]
    DoesNotFit {
        /// The bytes the layout spans, from offset 0 to the end of the last data block.
        needed_bytes: u64,
        /// The SSD's size in bytes.
        ssd_bytes: u64,
    },
}

/// Why a slot whose CRC matches is still invalid ([`FormatError::CorruptSlot`]).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotCorruption {
    /// An unknown slot state.
    #[error("unknown slot state {found} (expected 0 to 2)")]
    State {
        /// The raw state byte.
        found: u8,
    },
    /// The reserved byte 7 is not zero.
    #[error("reserved byte is {found:#04x}, not zero")]
    Reserved {
        /// The reserved byte.
        found: u8,
    },
}
