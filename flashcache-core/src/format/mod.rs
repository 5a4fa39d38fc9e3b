//! The on-SSD format, version 1: pure encoding and decoding, no I/O.
//!
//! This module turns the cache's persistent state into bytes and back. It reads and
//! writes nothing itself: the I/O layer moves the bytes with [`dmio`], and asks this
//! module where they go ([`Layout`]) and what they mean ([`Superblock`],
//! [`SlotRecord`]). Every decoder takes untrusted bytes (a blank device, another
//! file system, a cache torn by a crash, random data) and answers with a
//! [`FormatError`], never a panic.
//!
//! All integers are little-endian. Every checksum is a CRC-32C (Castagnoli,
//! [`crc32c`]).
//!
//! # The SSD, region by region
//!
//! The SSD holds three regions, each starting on a 4096-byte boundary:
//!
//! | region | byte range | content |
//! |---|---|---|
//! | superblock | `[0, 4096)` | the [superblock](#the-superblock) in bytes 0..512, the optional statistics record ([`encode_stats`]) from byte 2048, zeros elsewhere |
//! | metadata | `[md_start, md_start + md_bytes)` | one [slot](#slots) of 16 bytes per cache block, grouped by set |
//! | data | `[data_start, data_start + num_blocks * block_bytes)` | the cached blocks themselves |
//!
//! with, for `num_sets` sets of `assoc` cache blocks of `block_bytes` bytes and
//! metadata blocks of `md_block_bytes` bytes (a power of two from 4096 to 65536,
//! 4096 by default):
//!
//! | quantity | value |
//! |---|---|
//! | `md_start` | 4096 ([`MD_START`]) |
//! | `md_blocks_per_set` | `ceil(assoc * 16 / md_block_bytes)` |
//! | `md_bytes` | `num_sets * md_blocks_per_set * md_block_bytes` |
//! | metadata of set `s` | from `md_start + s * md_blocks_per_set * md_block_bytes` |
//! | slot of way `i` of set `s` | at `set_start + i * 16`; its global index is `s * assoc + i` |
//! | `data_start` | `md_start + md_bytes` rounded up to a multiple of `block_bytes` |
//! | cache block `b = s * assoc + i` | at `data_start + b * block_bytes` |
//!
//! [`Layout::new`] computes all of it and checks the geometry;
//! [`Layout::max_blocks_for`] gives the largest cache of a given shape that fits an
//! SSD (any set count from 1 up; it need not be a power of two).
//!
//! ## Why a metadata block never covers two sets
//!
//! Each set's slots start on a metadata block boundary and the set owns whole
//! metadata blocks (the last one padded with zeros). A metadata update rewrites a
//! whole metadata block, so this makes every metadata write belong to exactly one
//! set: updates of different sets never read-modify-write the same block (so they
//! need no common lock and cannot overwrite each other's fresh slots with stale
//! copies), and a write torn by a crash can only damage the slots of the one set
//! it was updating.
//!
//! ## Why a slot never straddles a sector
//!
//! Slots are 16 bytes, 32 to a 512-byte sector, and every set starts on a 4096-byte
//! boundary, so each slot lies inside one sector. Storage devices write a single
//! sector atomically, but a multi-sector write interrupted by power loss may land
//! only some of its sectors. With no slot split across sectors, a torn metadata
//! write leaves each slot either wholly old or wholly new, never half of each: a
//! half-old, half-new slot could name the wrong disk block with a plausible state.
//! On devices that do not even keep sectors atomic, the slot CRC catches the
//! damage.
//!
//! # The superblock
//!
//! A fixed 512-byte record at offset 0 ([`Superblock`]):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"FCCORE\0\x01"` ([`MAGIC`]) |
//! | 8 | 4 | format version, 1 ([`FORMAT_VERSION`]); a newer version is refused ([`FormatError::NewerVersion`]) |
//! | 12 | 4 | state ([`SbState`]): 1 loaded (in use, or crashed: unclean), 2 clean (orderly shutdown, no dirty blocks), 3 fast-clean (orderly shutdown with dirty blocks), 4 unstable (metadata write failed at shutdown) |
//! | 16 | 1 | cache mode ([`CacheMode`]): 1 write-back, 2 write-through, 3 write-around |
//! | 17 | 1 | write-only flag, 0 or 1 |
//! | 18 | 1 | commit mode ([`CommitMode`]): 1 sync, 2 on flush |
//! | 19 | 1 | replacement policy id (opaque to the format) |
//! | 20 | 4 | `block_sectors`: cache block size in 512-byte sectors, a power of two, at least 8 |
//! | 24 | 4 | `assoc`: blocks per set, a power of two from 2 to 32768 |
//! | 28 | 4 | `num_sets`: at least 1 |
//! | 32 | 4 | `disk_assoc_blocks`: 0 for a linear mapping of disk blocks to sets, else a power-of-two cluster size in blocks |
//! | 36 | 4 | `md_block_bytes` |
//! | 40 | 8 | `ssd_sectors`: the SSD's size at creation; the layout must fit in it |
//! | 48 | 8 | `disk_sectors`: the disk's size |
//! | 56 | 8 | generation, incremented at every load |
//! | 64 | 8 | creation time, seconds since the Unix epoch |
//! | 72 | 16 | cache UUID, random at creation |
//! | 88 | 2 | disk identity length `n`, at most 256 |
//! | 90 | 256 | disk identity ([`DiskIdentity`]): `n` bytes of UTF-8 chosen by the I/O layer, zero padded |
//! | 346 | 162 | reserved, zero |
//! | 508 | 4 | CRC-32C of bytes 0..508 |
//!
//! [`Superblock::decode`] checks, in order: the magic ([`FormatError::NotACache`]),
//! the version ([`FormatError::NewerVersion`], checked before the CRC because a
//! newer format may checksum differently), the CRC, then every field
//! ([`FormatError::Corrupt`] naming what is wrong, [`Corruption`]).
//!
//! # Slots
//!
//! One 16-byte slot per cache block ([`SlotRecord`]):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 6 | disk block number (`dbn / block_sectors`), 48 bits |
//! | 6 | 1 | state ([`SlotState`]): 0 invalid, 1 valid (clean), 2 dirty |
//! | 7 | 1 | reserved, zero |
//! | 8 | 4 | low 32 bits of the superblock generation when the slot was written |
//! | 12 | 4 | CRC-32C of bytes 0..12 followed by the slot's global index as a `u64` |
//!
//! A slot of 16 zero bytes was never written and reads as invalid
//! ([`SlotRecord::NEVER_WRITTEN`]), so a freshly zeroed metadata area is an empty
//! cache. [`decode_slots`] and [`Layout::decode_md_block`] decode a whole metadata
//! block and report every bad slot, not just the first.
//!
//! # What the CRCs detect
//!
//! - **Superblock CRC**: a superblock write torn by a crash or only partly
//!   written, bit rot or a misread, and data that merely happens to begin with the
//!   magic. Any single flipped bit in the 512 bytes is caught: in the magic it
//!   reads as [`FormatError::NotACache`], in the version possibly as
//!   [`FormatError::NewerVersion`], anywhere else as a CRC mismatch.
//! - **Slot CRC**: a slot torn or garbled in a device that does not write sectors
//!   atomically, bit rot, and garbage ([`FormatError::TornSlot`]). Because the CRC
//!   also covers the slot's global index, which is not stored, it catches a slot
//!   written at the wrong place, such as a misdirected write or a metadata block
//!   written at another block's offset: valid bytes copied to another slot fail
//!   there.
//!
//! What they cannot detect: a write the device acknowledged but never made (the
//! old, self-consistent slot remains; its generation tells how old it is), and
//! slots left by an earlier cache on the same SSD, whose CRCs are still valid
//! (nothing in a slot names the cache instance). Creating a cache must therefore
//! zero the whole metadata area before the superblock is written.

mod crc;
mod error;
mod layout;
mod slot;
mod stats_record;
mod superblock;

#[cfg(test)]
mod tests;

pub use crc::{Crc32c, crc32c};
pub use error::{Corruption, FormatError, GeometryError, SlotCorruption};
pub use layout::Layout;
pub use slot::{
    DecodedSlots, SLOT_BYTES, SLOTS_PER_SECTOR, SlotRecord, SlotState, decode_slots, encode_slots,
};
pub use stats_record::{STATS_MAX_BYTES, STATS_OFFSET, decode_stats, encode_stats};
pub use superblock::{CacheMode, CommitMode, DiskIdentity, SbState, Superblock};

/// The superblock magic, at offset 0.
pub const MAGIC: [u8; 8] = *b"FCCORE\0\x01";

/// The format version this build writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// The sector size the format is laid out in: the unit of atomic device writes.
pub const SECTOR_BYTES: u64 = 512;

/// The size of the superblock record.
pub const SUPERBLOCK_BYTES: usize = 512;

/// The size of the superblock region at the start of the SSD (the record, then
/// zeros).
pub const SUPERBLOCK_REGION_BYTES: u64 = 4096;

/// The byte offset of the metadata area, right after the superblock region.
pub const MD_START: u64 = SUPERBLOCK_REGION_BYTES;

/// The smallest cache block size in bytes (8 sectors).
pub const MIN_BLOCK_BYTES: u64 = 4096;

/// The largest cache block size in bytes (the largest power-of-two sector count a
/// `u32` holds, 2^31 sectors).
pub const MAX_BLOCK_BYTES: u64 = (1 << 31) * SECTOR_BYTES;

/// The smallest associativity.
pub const MIN_ASSOC: u32 = 2;

/// The largest associativity.
pub const MAX_ASSOC: u32 = 32768;

/// The smallest metadata block size in bytes.
pub const MIN_MD_BLOCK_BYTES: u32 = 4096;

/// The largest metadata block size in bytes.
pub const MAX_MD_BLOCK_BYTES: u32 = 65536;

/// The default metadata block size in bytes.
pub const DEFAULT_MD_BLOCK_BYTES: u32 = 4096;

/// The longest disk identity in bytes.
pub const MAX_IDENTITY_BYTES: usize = 256;
