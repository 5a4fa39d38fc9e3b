//! Block-sized helpers shared by the flashcache test suites: their caches use
//! 4 KiB blocks, data written as a [`pattern`] per block and
//! seed, and checks against the disk's image file.

use std::ops::Range;
use std::os::unix::fs::FileExt;

use flashcache_core::cache::{Cache, IoFlags};

use crate::{TestDevice, pattern};

/// The cache block of the suites' scenarios, in bytes...
pub const BLOCK: usize = 4096;
/// ...and in sectors.
pub const BS: u64 = 8;

/// Disk block `block` as written by the write of `seed` (0: the disk's
/// initial content).
pub fn data(block: u64, seed: u64) -> Vec<u8> {
    pattern(block * BS, BS, seed)
}

/// Reads disk block `block` through the cache; a failure panics.
pub fn read_block(cache: &Cache, block: u64) -> Vec<u8> {
    read_block_with(cache, block, IoFlags::empty())
}

/// [`read_block`] with hints.
pub fn read_block_with(cache: &Cache, block: u64, flags: IoFlags) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK];
    cache
        .read_with(block * BS, &mut buf, flags)
        .unwrap_or_else(|e| panic!("reading block {block}: {e}"));
    buf
}

/// Writes [`data`]`(block, seed)` through the cache; a failure panics.
pub fn write_block(cache: &Cache, block: u64, seed: u64) {
    cache
        .write(block * BS, &data(block, seed))
        .unwrap_or_else(|e| panic!("writing block {block}: {e}"));
}

/// Block `block` as the disk itself holds it (read from its image file).
pub fn disk_block(disk: &TestDevice, block: u64) -> Vec<u8> {
    let file = std::fs::File::open(disk.image())
        .unwrap_or_else(|e| panic!("opening {}: {e}", disk.image().display()));
    let mut buf = vec![0u8; BLOCK];
    file.read_exact_at(&mut buf, block * BLOCK as u64)
        .unwrap_or_else(|e| panic!("reading block {block} of {}: {e}", disk.image().display()));
    buf
}

/// The SSD sectors of the cache's data blocks.
pub fn data_sectors(cache: &Cache) -> Range<u64> {
    let layout = cache.superblock().layout().unwrap_or_else(|e| panic!("the cache's layout: {e}"));
    layout.data_start() / 512..layout.total_bytes() / 512
}
