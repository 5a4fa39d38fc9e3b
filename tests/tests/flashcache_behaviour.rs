//! What the cache does beyond reading its writes, on regular files:
//!
//! - switching `reclaim_policy` at run time keeps every cached block (and the
//!   dirty ones dirty), and replacement still works afterwards;
//! - `skip_seq_thresh_kb`: a sequential stream stops being cached past the
//!   threshold while random I/O still is; the `NO_CACHE` hint and
//!   `cache_all = 0` (with the `CACHE` hint) decide what a miss caches;
//! - discard drops the cached blocks wholly in its range, dirty ones without
//!   writing them back, counts them, and they do not come back after a flush
//!   and an orderly shutdown or a crash;
//! - the background cleaner brings a set down to `dirty_thresh_pct`,
//!   `stop_cleaning()` stops it, and idle ("fallow") dirty blocks are cleaned
//!   after `fallow_delay`;
//! - a partial-block write to a cached block keeps the rest of the block;
//! - 8 threads reading and writing whole blocks of the same few blocks never
//!   see a torn block, a lost write or stale data (the per-block locks).
//!
//! A "crash" here is a cache dropped while every SSD write and flush fails, so
//! that nothing more reaches the SSD (its superblock stays Loaded).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dmio::ReqFlags;
use dmio::fault::{FaultRule, OpSet};
use flashcache_core::cache::{Cache, IoFlags, LoadReport};
use flashcache_core::format::{CacheMode, CommitMode};
use flashcache_core::setup::CreateOptions;
use tests::cache_blocks::{BLOCK, BS, data, disk_block, read_block, write_block};
use tests::{Backing, Rng, TestDevice, assert_data, pattern, write_at};

const MIB: u64 = 1 << 20;
const SSD_BYTES: u64 = MIB + 64 * 1024;
const DISK_BYTES: u64 = 4 * MIB;
const DISK_BLOCKS: u64 = DISK_BYTES / BLOCK as u64;
const ALL_MODES: [CacheMode; 3] =
    [CacheMode::WriteBack, CacheMode::WriteThrough, CacheMode::WriteAround];

fn options(mode: CacheMode) -> CreateOptions {
    CreateOptions {
        mode,
        commit: CommitMode::OnFlush,
        assoc: 64,
        disk_assoc_blocks: 8,
        ..CreateOptions::default()
    }
}

/// A fresh SSD, a disk holding the pattern of seed 0, and a cache over them.
/// Bind as `(ssd, disk, cache)` so the cache is dropped first.
fn rig(mode: CacheMode) -> (TestDevice, TestDevice, Cache) {
    let ssd = TestDevice::new(Backing::File, SSD_BYTES);
    let disk = TestDevice::new(Backing::File, DISK_BYTES);
    let io = dmio::DmIoClient::new().unwrap();
    for mib in 0..DISK_BYTES / MIB {
        let first = mib * (MIB / 512);
        let done =
            write_at(&io, &disk.dev, first, &pattern(first, MIB / 512, 0), ReqFlags::empty());
        assert!(done.is_ok(), "seeding the disk: {:?}", done.failures);
    }
    let cache = Cache::create(ssd.dev.clone(), disk.dev.clone(), &options(mode)).unwrap();
    (ssd, disk, cache)
}

/// The disk blocks that map to `set`, in order.
fn blocks_of_set(cache: &Cache, set: u32) -> Vec<u64> {
    let g = cache.geometry();
    (0..DISK_BLOCKS).filter(|&b| g.set_of(b) == set).collect()
}

/// A power loss: the cache is dropped while every SSD write and flush fails,
/// so nothing more reaches the SSD; then the SSD works again.
fn crash(cache: Cache, ssd: &TestDevice) {
    cache.stop_cleaning();
    cache.set_tunable("fast_remove", 1).unwrap();
    let rule =
        ssd.dev.faults().add(FaultRule::fail(OpSet::WRITE | OpSet::FLUSH, 0..u64::MAX, libc::EIO));
    drop(cache);
    assert!(ssd.dev.faults().fired(rule) > 0, "the shutdown wrote nothing to fail");
    ssd.dev.faults().clear_rules();
}

fn reload(ssd: &TestDevice, disk: &TestDevice) -> (Cache, LoadReport) {
    Cache::load(ssd.dev.clone(), disk.dev.clone()).unwrap_or_else(|e| panic!("reload: {e}"))
}

/// Polls `done` every 50 ms until it holds or `timeout` passes; returns
/// whether it held.
fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// Replacement policy.
// ---------------------------------------------------------------------------

#[test]
fn switching_the_reclaim_policy_at_run_time_keeps_every_cached_block() {
    let (_ssd, _disk, cache) = rig(CacheMode::WriteBack);
    cache.stop_cleaning();
    let sets = cache.geometry().num_sets();
    // Per set: 30 clean blocks (read fills), then 10 dirty ones.
    let mut clean = Vec::new();
    let mut dirty = Vec::new();
    let mut spare = Vec::new();
    for set in 0..sets {
        let blocks = blocks_of_set(&cache, set);
        assert!(blocks.len() >= 80, "set {set} has only {} disk blocks", blocks.len());
        clean.extend_from_slice(&blocks[..30]);
        dirty.extend_from_slice(&blocks[30..40]);
        spare.extend_from_slice(&blocks[40..80]);
    }
    for &b in &clean {
        read_block(&cache, b);
    }
    for &b in &dirty {
        write_block(&cache, b, 1);
    }
    let (cached, ndirty) = (cache.cached_blocks(), cache.dirty_blocks());
    assert_eq!((cached, ndirty), (40 * u64::from(sets), 10 * u64::from(sets)));

    let check_all = |label: &str| {
        cache.reset_stats();
        for &b in &clean {
            assert_data!(read_block(&cache, b), data(b, 0), "{label}: clean block {b}");
        }
        for &b in &dirty {
            assert_data!(read_block(&cache, b), data(b, 1), "{label}: dirty block {b}");
        }
        let s = cache.stats();
        assert_eq!(s.read_hits, cached, "{label}: a cached block was lost: {s:?}");
        assert_eq!(s.read_fills, 0, "{label}: {s:?}");
    };
    for policy in [0u64, 1, 2, 3, 2, 0, 1, 3] {
        cache.set_tunable("reclaim_policy", policy).unwrap();
        assert_eq!(cache.tunables().reclaim_policy, policy as u32);
        let label = format!("reclaim_policy {policy}");
        assert_eq!(cache.cached_blocks(), cached, "{label}");
        assert_eq!(cache.dirty_blocks(), ndirty, "{label}");
        check_all(&label);
    }
    // The segmented LRU's parameters switch it in place too.
    cache.set_tunable("reclaim_policy", 1).unwrap();
    cache.set_tunable("lru_hot_pct", 50).unwrap();
    cache.set_tunable("lru_promote_thresh", 1).unwrap();
    assert_eq!((cache.cached_blocks(), cache.dirty_blocks()), (cached, ndirty));
    check_all("segmented LRU, new parameters");

    // Replacement still works: fill every set past its 64 ways. Dirty blocks
    // are never evicted.
    for policy in [0u64, 2] {
        cache.set_tunable("reclaim_policy", policy).unwrap();
        for &b in &spare {
            assert_data!(read_block(&cache, b), data(b, 0), "policy {policy}: spare block {b}");
        }
        let s = cache.stats();
        assert!(s.replacement > 0, "policy {policy}: nothing was evicted: {s:?}");
        assert_eq!(cache.cached_blocks(), 64 * u64::from(sets), "policy {policy}");
        assert_eq!(cache.dirty_blocks(), ndirty, "policy {policy}");
    }
    for &b in &dirty {
        assert_data!(read_block(&cache, b), data(b, 1), "dirty block {b} after evictions");
    }
    cache.set_tunable("reclaim_policy", 3).unwrap();
    assert_eq!(cache.cached_blocks(), 64 * u64::from(sets));
    cache.shutdown().unwrap();
}

// ---------------------------------------------------------------------------
// What a miss caches.
// ---------------------------------------------------------------------------

#[test]
fn a_sequential_stream_stops_being_cached_past_the_threshold_random_io_does_not() {
    let (_ssd, disk, cache) = rig(CacheMode::WriteThrough);
    cache.set_tunable("skip_seq_thresh_kb", 64).unwrap();
    // 64 back-to-back 4 KiB reads: the first 64 KiB (16 blocks) are cached.
    for b in 0..64 {
        assert_data!(read_block(&cache, b), data(b, 0), "sequential block {b}");
    }
    let s = cache.stats();
    assert_eq!((s.read_fills, s.uncached_sequential_reads), (16, 48), "{s:?}");
    assert_eq!(cache.cached_blocks(), 16);
    // Random reads (never where another read ended) are all cached.
    let random: Vec<u64> = (0..32).map(|i| 512 + i * 7).collect();
    for &b in &random {
        assert_data!(read_block(&cache, b), data(b, 0), "random block {b}");
    }
    let s = cache.stats();
    assert_eq!((s.read_fills, s.uncached_sequential_reads), (48, 48), "{s:?}");
    assert_eq!(cache.cached_blocks(), 48);
    for &b in &random {
        read_block(&cache, b);
    }
    assert_eq!(cache.stats().read_hits, 32, "the random blocks were not all cached");
    // Writes: the same for a sequential write stream.
    for b in 900..964 {
        write_block(&cache, b, 1);
    }
    let s = cache.stats();
    assert_eq!(s.uncached_sequential_writes, 48, "{s:?}");
    assert_eq!(cache.cached_blocks(), 48 + 16);
    for b in (900..964).rev() {
        assert_data!(disk_block(&disk, b), data(b, 1), "disk block {b}");
        assert_data!(read_block(&cache, b), data(b, 1), "block {b}");
    }
    // Off again: a sequential stream is cached whole.
    cache.set_tunable("skip_seq_thresh_kb", 0).unwrap();
    let before = cache.stats().read_fills;
    for b in 800..864 {
        read_block(&cache, b);
    }
    assert_eq!(cache.stats().read_fills, before + 64);
    cache.shutdown().unwrap();
}

#[test]
fn the_no_cache_hint_and_cache_all_decide_what_a_miss_caches() {
    let (_ssd, disk, cache) = rig(CacheMode::WriteBack);
    cache.stop_cleaning();
    let read_with = |b: u64, flags: IoFlags| {
        let mut buf = vec![0u8; BLOCK];
        cache.read_with(b * BS, &mut buf, flags).unwrap();
        buf
    };
    // NO_CACHE: a miss is not cached.
    assert_data!(read_with(300, IoFlags::NO_CACHE), data(300, 0), "NO_CACHE miss");
    let s = cache.stats();
    assert_eq!((s.uncached_reads, s.read_fills, cache.cached_blocks()), (1, 0, 0), "{s:?}");
    read_block(&cache, 300);
    assert_eq!(cache.cached_blocks(), 1);
    // ... but a hit is still a hit.
    assert_data!(read_with(300, IoFlags::NO_CACHE), data(300, 0), "NO_CACHE hit");
    assert_eq!(cache.stats().read_hits, 1);
    cache.write_with(301 * BS, &data(301, 1), IoFlags::NO_CACHE).unwrap();
    let s = cache.stats();
    assert_eq!(s.uncached_writes, 1, "{s:?}");
    assert_eq!((cache.cached_blocks(), cache.dirty_blocks()), (1, 0));
    assert_data!(disk_block(&disk, 301), data(301, 1), "an uncached write goes to the disk");

    // cache_all = 0: only misses hinted CACHE are cached. (The counters are
    // re-read here: a hinted I/O that hits counts as uncached too.)
    cache.set_tunable("cache_all", 0).unwrap();
    let base = cache.stats();
    assert_data!(read_block(&cache, 302), data(302, 0));
    let s = cache.stats();
    assert_eq!((s.uncached_reads, s.read_fills), (base.uncached_reads + 1, base.read_fills));
    assert_eq!(cache.cached_blocks(), 1);
    assert_data!(read_with(303, IoFlags::CACHE), data(303, 0));
    assert_eq!(cache.cached_blocks(), 2);
    write_block(&cache, 304, 1);
    assert_eq!(
        (cache.stats().uncached_writes, cache.cached_blocks()),
        (base.uncached_writes + 1, 2)
    );
    assert_data!(disk_block(&disk, 304), data(304, 1));
    cache.write_with(305 * BS, &data(305, 1), IoFlags::CACHE).unwrap();
    assert_eq!((cache.cached_blocks(), cache.dirty_blocks()), (3, 1));
    assert_data!(disk_block(&disk, 305), data(305, 0), "write-back: the disk is not written");
    // Cached blocks are still hits, and a write hit still goes to the cache.
    let hits = cache.stats().read_hits;
    assert_data!(read_block(&cache, 303), data(303, 0));
    assert_eq!(cache.stats().read_hits, hits + 1);
    write_block(&cache, 303, 2);
    assert_eq!(cache.dirty_blocks(), 2);
    assert_data!(read_block(&cache, 303), data(303, 2));
    cache.shutdown().unwrap();
}

// ---------------------------------------------------------------------------
// Discard.
// ---------------------------------------------------------------------------

#[test]
fn discard_drops_cached_blocks_in_its_range_without_writing_dirty_ones_back() {
    let (ssd, disk, cache) = rig(CacheMode::WriteBack);
    cache.stop_cleaning();
    // Blocks 400..408 dirty (one cluster), 408..412 clean (the next one).
    cache.write(400 * BS, &pattern(400 * BS, 8 * BS, 1)).unwrap();
    let mut four = vec![0u8; 4 * BLOCK];
    cache.read(408 * BS, &mut four).unwrap();
    assert_eq!((cache.cached_blocks(), cache.dirty_blocks()), (12, 8));
    cache.flush().unwrap(); // the dirty slots are durable: the discard must undo them

    // From the middle of block 400 to the end of block 409: blocks 401..410
    // are wholly inside, 400 is not.
    let start = 400 * BS + 4;
    cache.discard(start, 410 * BS - start).unwrap();
    let s = cache.stats();
    assert_eq!((s.discards, s.discarded_blocks), (1, 9), "{s:?}");
    assert_eq!((cache.cached_blocks(), cache.dirty_blocks()), (3, 1));
    assert_eq!(s.cleanings, 0, "{s:?}");
    // The disk never got the dirty data: it holds its old content, or zeros
    // where it supports discard (a file punches a hole).
    let punched = disk.dev.supports_discard();
    for b in 401..410 {
        let on_disk = disk_block(&disk, b);
        if punched {
            assert_data!(on_disk, vec![0u8; BLOCK], "disk block {b} after the discard");
        } else {
            assert_data!(on_disk, data(b, 0), "disk block {b} after the discard");
        }
        // (Uncached reads: what a reload finds cached is checked below.)
        let mut got = vec![0u8; BLOCK];
        cache.read_with(b * BS, &mut got, IoFlags::NO_CACHE).unwrap();
        assert_data!(got, on_disk, "block {b} read after the discard");
    }
    assert_data!(read_block(&cache, 400), data(400, 1), "a partly discarded block is kept");
    // The partly covered block keeps its dirty data and is written back whole.
    assert_eq!(cache.dirty_blocks(), 1);

    // Flush, an orderly shutdown that keeps dirty blocks, and a warm reload:
    // the discarded blocks stay gone.
    cache.flush().unwrap();
    cache.set_tunable("fast_remove", 1).unwrap();
    cache.shutdown().unwrap();
    let (cache, report) = reload(&ssd, &disk);
    assert_eq!((report.recovered.dirty, report.recovered.clean), (1, 2), "{report:?}");
    for b in 401..410 {
        assert_data!(read_block(&cache, b), disk_block(&disk, b), "block {b} after the reload");
        assert!(read_block(&cache, b) != data(b, 1), "block {b}'s discarded data came back");
    }
    assert_data!(read_block(&cache, 400), data(400, 1));
    cache.clean_all().unwrap();
    assert_data!(disk_block(&disk, 400), data(400, 1), "block 400 written back whole");
    cache.shutdown().unwrap();
}

#[test]
fn discarded_dirty_blocks_do_not_come_back_after_a_flush_and_a_crash() {
    let (ssd, disk, cache) = rig(CacheMode::WriteBack);
    cache.stop_cleaning();
    cache.write(424 * BS, &pattern(424 * BS, 8 * BS, 1)).unwrap();
    write_block(&cache, 440, 1);
    cache.flush().unwrap();
    cache.discard(424 * BS, 8 * BS).unwrap();
    assert_eq!(cache.stats().discarded_blocks, 8);
    assert_eq!(cache.dirty_blocks(), 1);
    cache.flush().unwrap();
    crash(cache, &ssd);
    let (cache, report) = reload(&ssd, &disk);
    assert_eq!(report.recovered.dirty, 1, "{report:?}");
    for b in 424..432 {
        let got = read_block(&cache, b);
        assert!(got != data(b, 1), "block {b}'s discarded dirty data came back after a crash");
        assert_data!(got, disk_block(&disk, b), "block {b} after the crash");
    }
    assert_data!(read_block(&cache, 440), data(440, 1));
    cache.shutdown().unwrap();
}

// ---------------------------------------------------------------------------
// Cleaning.
// ---------------------------------------------------------------------------

#[test]
fn the_cleaner_keeps_a_set_at_its_dirty_threshold_until_stopped() {
    let (_ssd, disk, cache) = rig(CacheMode::WriteBack);
    cache.stop_cleaning();
    cache.set_tunable("dirty_thresh_pct", 10).unwrap();
    // Up to 8 single-block cleaning writes per tick, not 2.
    cache.set_tunable("max_clean_ios_set", 8).unwrap();
    cache.set_tunable("max_clean_ios_total", 16).unwrap();
    let thresh = cache.tunables().dirty_thresh_blocks(cache.geometry().assoc()) as u64;
    assert_eq!(thresh, 6);
    // Blocks of one set with no two adjacent on the disk, so that cleaning
    // cannot merge neighbours "for free": it cleans exactly the excess.
    let set = cache.geometry().set_of(0);
    let blocks: Vec<u64> = blocks_of_set(&cache, set).into_iter().filter(|b| b % 2 == 0).collect();
    assert!(blocks.len() >= 60, "{}", blocks.len());
    for &b in &blocks[..40] {
        write_block(&cache, b, 1);
    }
    assert_eq!(cache.dirty_blocks(), 40);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cache.dirty_blocks(), 40, "the cleaner ran while stopped");

    cache.resume_cleaning();
    let reached = wait_for(Duration::from_secs(10), || cache.dirty_blocks() <= thresh);
    assert!(reached, "still {} dirty blocks after 10 s", cache.dirty_blocks());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(cache.dirty_blocks(), thresh, "the cleaner went below the threshold");
    let s = cache.stats();
    assert_eq!(s.cleanings, 40 - thresh, "{s:?}");
    assert!(s.clean_set_ios > 0, "{s:?}");
    assert_eq!(s.fallow_cleanings, 0, "{s:?}");

    // Stopped: new dirty blocks stay dirty.
    cache.stop_cleaning();
    for &b in &blocks[40..60] {
        write_block(&cache, b, 1);
    }
    let dirty = cache.dirty_blocks();
    assert_eq!(dirty, thresh + 20);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(cache.dirty_blocks(), dirty, "the cleaner ran while stopped");
    cache.resume_cleaning();
    let reached = wait_for(Duration::from_secs(10), || cache.dirty_blocks() <= thresh);
    assert!(reached, "still {} dirty blocks after 10 s", cache.dirty_blocks());

    // What was cleaned is on the disk; everything reads back.
    cache.clean_all().unwrap();
    for &b in &blocks[..60] {
        assert_data!(disk_block(&disk, b), data(b, 1), "disk block {b}");
        assert_data!(read_block(&cache, b), data(b, 1), "block {b}");
    }
    cache.shutdown().unwrap();
}

#[test]
fn an_idle_dirty_block_is_cleaned_after_two_fallow_periods() {
    let (_ssd, disk, cache) = rig(CacheMode::WriteBack);
    cache.set_tunable("fallow_delay", 1).unwrap();
    write_block(&cache, 600, 1);
    write_block(&cache, 650, 1);
    assert_eq!(cache.dirty_blocks(), 2, "below the dirty threshold nothing is cleaned at once");
    let start = Instant::now();
    let cleaned = wait_for(Duration::from_secs(12), || cache.dirty_blocks() == 0);
    assert!(cleaned, "{} idle dirty blocks left after 12 s", cache.dirty_blocks());
    assert!(start.elapsed() >= Duration::from_millis(900), "cleaned before one fallow period");
    let s = cache.stats();
    assert_eq!((s.fallow_cleanings, s.cleanings), (2, 2), "{s:?}");
    assert_data!(disk_block(&disk, 600), data(600, 1));
    assert_data!(disk_block(&disk, 650), data(650, 1));
    // Cleaned blocks stay cached.
    assert_eq!(cache.cached_blocks(), 2);
    cache.shutdown().unwrap();
}

// ---------------------------------------------------------------------------
// Partial-block writes.
// ---------------------------------------------------------------------------

#[test]
fn a_partial_write_to_a_cached_block_keeps_the_rest_of_the_block() {
    for mode in ALL_MODES {
        let (ssd, disk, cache) = rig(mode);
        cache.stop_cleaning();
        // Block 500 and 501 cached with the data of seed 1 (dirty in
        // write-back); block 502 not cached.
        write_block(&cache, 500, 1);
        write_block(&cache, 501, 1);
        read_block(&cache, 500);
        read_block(&cache, 501);
        assert_eq!(cache.cached_blocks(), 2, "{mode:?}");
        let before = cache.stats();

        // Two sectors in the middle of block 500, twice (the second on a block
        // the first already changed).
        cache.write(500 * BS + 2, &pattern(500 * BS + 2, 2, 2)).unwrap();
        cache.write(500 * BS + 6, &pattern(500 * BS + 6, 1, 3)).unwrap();
        let mut expect500 = data(500, 1);
        expect500[1024..2048].copy_from_slice(&pattern(500 * BS + 2, 2, 2));
        expect500[3072..3584].copy_from_slice(&pattern(500 * BS + 6, 1, 3));
        assert_data!(read_block(&cache, 500), expect500, "{mode:?}: block 500");
        // Straddling: the last two sectors of 501 (cached) and the first three
        // of 502 (not cached).
        cache.write(501 * BS + 6, &pattern(501 * BS + 6, 5, 4)).unwrap();
        let mut expect = data(501, 1);
        expect.extend_from_slice(&data(502, 0));
        expect[3072..4096 + 1536].copy_from_slice(&pattern(501 * BS + 6, 5, 4));
        let mut two = vec![0u8; 2 * BLOCK];
        cache.read(501 * BS, &mut two).unwrap();
        assert_data!(two, expect, "{mode:?}: blocks 501 and 502");
        let s = cache.stats();
        // Write-around drops block 500 at its first write: the second misses.
        let hits = if mode == CacheMode::WriteAround { 2 } else { 3 };
        assert_eq!(s.write_hits, before.write_hits + hits, "{mode:?}: {s:?}");
        match mode {
            CacheMode::WriteBack => {
                assert_eq!(cache.dirty_blocks(), 2, "{mode:?}");
                assert_eq!(s.dirty_write_hits, before.dirty_write_hits + 3, "{mode:?}: {s:?}");
                assert_data!(
                    disk_block(&disk, 500),
                    data(500, 0),
                    "{mode:?}: not written back yet"
                );
                cache.clean_all().unwrap();
            }
            // The read of blocks 501 and 502 filled 502.
            CacheMode::WriteThrough => assert_eq!(cache.cached_blocks(), 3, "{mode:?}"),
            CacheMode::WriteAround => {
                let inval = s.write_invalidates - before.write_invalidates;
                assert_eq!(inval, 2, "{mode:?}: the writes to 500 and 501 drop them: {s:?}");
            }
        }
        assert_data!(disk_block(&disk, 500), expect500, "{mode:?}: disk block 500");
        assert_data!(disk_block(&disk, 501), expect[..BLOCK], "{mode:?}: disk block 501");
        assert_data!(disk_block(&disk, 502), expect[BLOCK..], "{mode:?}: disk block 502");
        cache.shutdown().unwrap();
        let (cache, _) = reload(&ssd, &disk);
        assert_data!(read_block(&cache, 500), expect500, "{mode:?}: block 500 after a reload");
        cache.read(501 * BS, &mut two).unwrap();
        assert_data!(two, expect, "{mode:?}: blocks 501 and 502 after a reload");
        cache.shutdown().unwrap();
    }
}

// ---------------------------------------------------------------------------
// Concurrency.
// ---------------------------------------------------------------------------

const THREADS: u64 = 8;
/// The blocks every thread works on: one cluster (one set), plus one of
/// another cluster.
const HOT: [u64; 5] = [40, 41, 42, 43, 200];

/// The 8-byte word filling a block written by `thread`'s write number `n`.
fn tag(block: u64, thread: u64, n: u64) -> u64 {
    (block << 44) | ((thread + 1) << 36) | n
}

/// Checks a whole block read by `me` and returns the (thread, n) it holds, or
/// None for the disk's initial content.
fn decode(block: u64, buf: &[u8], me: u64, op: usize) -> Option<(u64, u64)> {
    if buf == data(block, 0) {
        return None;
    }
    let word = u64::from_le_bytes(buf[..8].try_into().unwrap());
    let uniform = buf.chunks_exact(8).all(|w| w == word.to_le_bytes());
    assert!(
        uniform,
        "thread {me} op {op}: block {block} is torn: {}",
        tests::describe_sectors(buf)
    );
    assert_eq!(word >> 44, block, "thread {me} op {op}: block {block} holds another block's data");
    let thread = ((word >> 36) & 0xff).checked_sub(1).expect("a tag names a thread");
    assert!(thread < THREADS, "thread {me} op {op}: block {block}: bad tag {word:#x}");
    Some((thread, word & 0xf_ffff_ffff))
}

fn hammer(mode: CacheMode) {
    let (_ssd, disk, cache) = rig(mode);
    // FIFO: the churn below evicts the hot blocks however often they are hit.
    cache.set_tunable("reclaim_policy", 0).unwrap();
    // started[t][i]: the highest write number thread t has started on HOT[i].
    let started: Vec<Vec<AtomicU64>> =
        (0..THREADS).map(|_| HOT.iter().map(|_| AtomicU64::new(0)).collect()).collect();
    // written[i]: whether a write to HOT[i] has completed.
    let written: Vec<AtomicBool> = HOT.iter().map(|_| AtomicBool::new(false)).collect();
    let stop = AtomicBool::new(false);
    // Evicting neighbours: other blocks of the hot cluster's set.
    let set = cache.geometry().set_of(HOT[0]);
    let others: Vec<u64> = blocks_of_set(&cache, set).into_iter().filter(|b| b / 8 != 5).collect();
    let ops = 500;
    std::thread::scope(|s| {
        let mut workers = Vec::new();
        for me in 0..THREADS {
            let (cache, started, written) = (&cache, &started, &written);
            workers.push(s.spawn(move || {
                let mut rng = Rng(0xb10c ^ me);
                let mut n = 0u64;
                // My last completed write number per block; the newest (thread, n)
                // seen per block and writer.
                let mut mine = [0u64; HOT.len()];
                let mut seen = vec![[0u64; THREADS as usize]; HOT.len()];
                let mut buf = vec![0u8; BLOCK];
                for op in 0..ops {
                    let i = rng.below(HOT.len() as u64) as usize;
                    let block = HOT[i];
                    if rng.below(2) == 0 {
                        n += 1;
                        started[me as usize][i].store(n, Ordering::SeqCst);
                        let bytes = tag(block, me, n).to_le_bytes().repeat(BLOCK / 8);
                        let flags =
                            if rng.below(20) == 0 { IoFlags::FUA } else { IoFlags::empty() };
                        cache.write_with(block * BS, &bytes, flags).unwrap();
                        mine[i] = n;
                        written[i].store(true, Ordering::SeqCst);
                    } else {
                        let was_written = written[i].load(Ordering::SeqCst);
                        let flags =
                            if rng.below(4) == 0 { IoFlags::NO_CACHE } else { IoFlags::empty() };
                        cache.read_with(block * BS, &mut buf, flags).unwrap();
                        match decode(block, &buf, me, op) {
                            None => assert!(
                                !was_written,
                                "thread {me} op {op}: block {block} reads as never written \
                                 after a write to it completed"
                            ),
                            Some((t, c)) => {
                                let limit = started[t as usize][i].load(Ordering::SeqCst);
                                assert!(
                                    c >= 1 && c <= limit,
                                    "thread {me} op {op}: block {block} holds write {c} of \
                                     thread {t}, which has started only {limit}"
                                );
                                if t == me {
                                    assert_eq!(
                                        c, mine[i],
                                        "thread {me} op {op}: block {block} holds my write {c}, \
                                         not my last one {}",
                                        mine[i]
                                    );
                                }
                                let last = &mut seen[i][t as usize];
                                assert!(
                                    c >= *last,
                                    "thread {me} op {op}: block {block} went back from write \
                                     {last} of thread {t} to its write {c}"
                                );
                                *last = c;
                            }
                        }
                    }
                }
            }));
        }
        // Beside them: reads of the set's other blocks (evictions and
        // refills of the hot blocks), cleaning and flushes.
        let churn = s.spawn(|| {
            let mut rng = Rng(0xc4u64);
            let mut buf = vec![0u8; BLOCK];
            while !stop.load(Ordering::SeqCst) {
                let b = others[rng.below(others.len() as u64) as usize];
                cache.read(b * BS, &mut buf).unwrap();
                match rng.below(50) {
                    0 => cache.flush().unwrap(),
                    // Ends the cleaner thread's clean_all (it starts another).
                    1..=3 => cache.stop_cleaning(),
                    _ => {}
                }
            }
        });
        // Write-back: clean the hot blocks over and over, so that they can be
        // evicted and filled again.
        let cleaner = s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                cache.clean_all().unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        // Stop the churn before reporting a worker's panic (else it spins on).
        let results: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        stop.store(true, Ordering::SeqCst);
        churn.join().unwrap();
        cleaner.join().unwrap();
        for result in results {
            if let Err(panic) = result {
                std::panic::resume_unwind(panic);
            }
        }
    });
    // Every hot block reads the same through the cache and, once cleaned and
    // shut down, on the disk.
    cache.flush().unwrap();
    let through: Vec<Vec<u8>> = HOT.iter().map(|&b| read_block(&cache, b)).collect();
    for (i, &b) in HOT.iter().enumerate() {
        decode(b, &through[i], THREADS, 0);
    }
    let s = cache.stats();
    assert!(s.pending_enqueues > 0, "{mode:?}: no I/O ever waited for a block lock: {s:?}");
    if mode != CacheMode::WriteAround {
        assert!(s.write_hits > 0, "{mode:?}: {s:?}");
    }
    cache.shutdown().unwrap();
    for (i, &b) in HOT.iter().enumerate() {
        assert_data!(disk_block(&disk, b), through[i], "{mode:?}: disk block {b}");
    }
}

#[test]
fn concurrent_whole_block_io_to_the_same_blocks_is_never_torn_or_stale_writeback() {
    hammer(CacheMode::WriteBack);
}

#[test]
fn concurrent_whole_block_io_to_the_same_blocks_is_never_torn_or_stale_writethrough() {
    hammer(CacheMode::WriteThrough);
}

#[test]
fn concurrent_whole_block_io_to_the_same_blocks_is_never_torn_or_stale_writearound() {
    hammer(CacheMode::WriteAround);
}
