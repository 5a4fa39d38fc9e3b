//! The cache's error paths, driven by dmio's fault injection on the SSD and the
//! disk (regular files): each test injects one kind of failure and checks the
//! promised outcome, the counter that records it, and that nothing panics.
//!
//! - write-through and write-around: a failed SSD read of a hit is served from
//!   the disk and drops the block; a failed SSD write (read-miss fill or the
//!   write-through fan-out) leaves no block cached with bad data; a failed disk
//!   write of the fan-out is an error naming the disk; past
//!   `ssd_error_threshold` SSD errors the cache goes to bypass, every I/O still
//!   reads its writes, and a reload serves no stale block;
//! - write-back: a failed SSD write fails the write with its errno; a failed
//!   SSD read of a dirty block is an error (never the disk's stale copy); a
//!   failed disk read of a miss is an error naming the disk; a failed disk
//!   write while cleaning leaves the blocks dirty until the disk works again;
//! - metadata: a failed metadata write fails `flush()` (and, in sync commit
//!   mode, the dirtying write) until it works again; one during `shutdown()`
//!   leaves the superblock Unstable, which `Cache::load` refuses.
//!
//! A "crash" here is a cache dropped while every SSD write and flush fails, so
//! that nothing more reaches the SSD (its superblock stays Loaded).

use std::ops::Range;

use dmio::ReqFlags;
use dmio::fault::{FaultRule, OpSet, Trigger};
use flashcache_core::cache::{Cache, CacheError, Device, IoFlags};
use flashcache_core::format::{CacheMode, CommitMode, SbState};
use flashcache_core::setup::{self, CreateOptions, SetupError};
use tests::cache_blocks::{BLOCK, BS, data, data_sectors, disk_block, read_block, read_block_with};
use tests::{Backing, TestDevice, assert_data, pattern, write_at};

const MIB: u64 = 1 << 20;
const SSD_BYTES: u64 = MIB + 64 * 1024;
const DISK_BYTES: u64 = 4 * MIB;

fn options(mode: CacheMode, commit: CommitMode) -> CreateOptions {
    CreateOptions { mode, commit, assoc: 64, disk_assoc_blocks: 8, ..CreateOptions::default() }
}

/// A fresh SSD, a disk holding the pattern of seed 0, and a cache over them.
/// Bind as `(ssd, disk, cache)` so the cache is dropped first.
fn rig(mode: CacheMode, commit: CommitMode) -> (TestDevice, TestDevice, Cache) {
    let ssd = TestDevice::new(Backing::File, SSD_BYTES);
    let disk = TestDevice::new(Backing::File, DISK_BYTES);
    let io = dmio::DmIoClient::new().unwrap();
    for mib in 0..DISK_BYTES / MIB {
        let first = mib * (MIB / 512);
        let done =
            write_at(&io, &disk.dev, first, &pattern(first, MIB / 512, 0), ReqFlags::empty());
        assert!(done.is_ok(), "seeding the disk: {:?}", done.failures);
    }
    let cache = Cache::create(ssd.dev.clone(), disk.dev.clone(), &options(mode, commit)).unwrap();
    (ssd, disk, cache)
}

fn write_block(cache: &Cache, block: u64, seed: u64) -> Result<(), CacheError> {
    cache.write(block * BS, &data(block, seed))
}

/// The SSD sectors of the cache's metadata slots.
fn md_sectors(cache: &Cache) -> Range<u64> {
    let layout = cache.superblock().layout().unwrap();
    layout.md_start() / 512..layout.data_start() / 512
}

/// Checks that `result` is an I/O error on `device` with `errno`.
fn assert_io_error(result: Result<(), CacheError>, device: Device, errno: i32, what: &str) {
    match result {
        Err(e @ CacheError::Io { device: d, .. }) if d == device => {
            assert_eq!(e.errno(), Some(errno), "{what}: {e}");
        }
        other => panic!("{what}: expected an I/O error on the {device}, got {other:?}"),
    }
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

fn reload(ssd: &TestDevice, disk: &TestDevice) -> (Cache, flashcache_core::cache::LoadReport) {
    Cache::load(ssd.dev.clone(), disk.dev.clone()).unwrap_or_else(|e| panic!("reload: {e}"))
}

// ---------------------------------------------------------------------------
// Write-through and write-around.
// ---------------------------------------------------------------------------

#[test]
fn a_failed_ssd_read_of_a_clean_hit_is_served_from_the_disk_and_drops_the_block() {
    for mode in [CacheMode::WriteThrough, CacheMode::WriteAround] {
        let (ssd, _disk, cache) = rig(mode, CommitMode::OnFlush);
        cache.set_tunable("ssd_error_threshold", 1000).unwrap();
        // Blocks 10 and 11 cached by read fills; in write-through block 12 by a write.
        read_block(&cache, 10);
        read_block(&cache, 11);
        let mut expect12 = data(12, 0);
        if mode == CacheMode::WriteThrough {
            write_block(&cache, 12, 7).unwrap();
            expect12 = data(12, 7);
        }
        read_block(&cache, 12);
        assert_eq!(cache.cached_blocks(), 3, "{mode:?}");
        let before = cache.stats();

        let rule =
            ssd.dev.faults().add(FaultRule::fail(OpSet::READ, data_sectors(&cache), libc::EIO));
        // NO_CACHE: the block is dropped and not filled again.
        assert_data!(read_block_with(&cache, 10, IoFlags::NO_CACHE), data(10, 0), "{mode:?}");
        let s = cache.stats();
        assert_eq!(s.ssd_read_errors, before.ssd_read_errors + 1, "{mode:?}: {s:?}");
        assert_eq!(cache.cached_blocks(), 2, "{mode:?}: the block was not dropped");
        assert!(!cache.is_bypassed(), "{mode:?}: one error is below the threshold");
        // Without the hint the block is dropped, then filled again from the disk.
        assert_data!(read_block(&cache, 11), data(11, 0), "{mode:?}");
        assert_data!(read_block(&cache, 12), expect12, "{mode:?}");
        let s = cache.stats();
        assert_eq!(s.ssd_read_errors, before.ssd_read_errors + 3, "{mode:?}: {s:?}");
        assert_eq!(s.read_fills, before.read_fills + 2, "{mode:?}: {s:?}");
        assert!(ssd.dev.faults().fired(rule) >= 3);
        assert!(ssd.dev.faults().remove(rule));

        // The refilled copies are good, and block 10 comes back on a plain read.
        assert_data!(read_block(&cache, 11), data(11, 0), "{mode:?}");
        assert_data!(read_block(&cache, 12), expect12, "{mode:?}");
        assert_data!(read_block(&cache, 10), data(10, 0), "{mode:?}");
        assert_eq!(cache.cached_blocks(), 3, "{mode:?}");
        assert_eq!(cache.dirty_blocks(), 0, "{mode:?}");
        cache.shutdown().unwrap();
    }
}

#[test]
fn a_failed_ssd_write_of_a_read_miss_fill_succeeds_and_caches_nothing() {
    for mode in [CacheMode::WriteThrough, CacheMode::WriteAround] {
        let (ssd, _disk, cache) = rig(mode, CommitMode::OnFlush);
        cache.set_tunable("ssd_error_threshold", 1000).unwrap();
        let rule =
            ssd.dev.faults().add(FaultRule::fail(OpSet::WRITE, data_sectors(&cache), libc::EIO));
        assert_data!(read_block(&cache, 20), data(20, 0), "{mode:?}");
        let s = cache.stats();
        assert_eq!((s.ssd_write_errors, s.read_fills), (1, 0), "{mode:?}: {s:?}");
        assert_eq!(cache.cached_blocks(), 0, "{mode:?}: a block whose fill failed stayed cached");
        assert_eq!(ssd.dev.faults().fired(rule), 1);
        // A multi-block read: every fill fails, every byte is right.
        let mut buf = vec![0u8; 4 * BLOCK];
        cache.read(24 * BS, &mut buf).unwrap();
        assert_data!(buf, pattern(24 * BS, 4 * BS, 0), "{mode:?}");
        assert_eq!(cache.cached_blocks(), 0, "{mode:?}");
        assert_eq!(cache.stats().ssd_write_errors, 5, "{mode:?}");
        ssd.dev.faults().clear_rules();

        assert_data!(read_block(&cache, 20), data(20, 0), "{mode:?}");
        assert_eq!(cache.cached_blocks(), 1, "{mode:?}");
        let hits = cache.stats().read_hits;
        assert_data!(read_block(&cache, 20), data(20, 0), "{mode:?}");
        assert_eq!(cache.stats().read_hits, hits + 1, "{mode:?}");
        assert!(!cache.is_bypassed());
        cache.shutdown().unwrap();
    }
}

#[test]
fn writethrough_fan_out_ssd_failure_succeeds_and_drops_the_block_disk_failure_is_an_error() {
    let (ssd, disk, cache) = rig(CacheMode::WriteThrough, CommitMode::OnFlush);
    cache.set_tunable("ssd_error_threshold", 1000).unwrap();
    read_block(&cache, 30); // cached with its old content
    assert_eq!(cache.cached_blocks(), 1);
    let rule = ssd.dev.faults().add(FaultRule::fail(OpSet::WRITE, data_sectors(&cache), libc::EIO));
    write_block(&cache, 30, 3).expect("an SSD failure in the fan-out is not the caller's error");
    write_block(&cache, 31, 3).expect("an SSD failure in the fan-out is not the caller's error");
    let s = cache.stats();
    assert_eq!(s.ssd_write_errors, 2, "{s:?}");
    assert_eq!(cache.cached_blocks(), 0, "a block the fan-out failed to write stayed cached");
    assert_eq!(ssd.dev.faults().fired(rule), 2);
    assert_data!(disk_block(&disk, 30), data(30, 3));
    assert_data!(disk_block(&disk, 31), data(31, 3));
    // Reads while the SSD still fails writes, then after.
    assert_data!(read_block(&cache, 30), data(30, 3));
    ssd.dev.faults().clear_rules();
    assert_data!(read_block(&cache, 30), data(30, 3));
    assert_data!(read_block(&cache, 31), data(31, 3));
    assert_data!(read_block(&cache, 31), data(31, 3));
    assert_eq!(cache.cached_blocks(), 2);

    // The disk's part fails: the write fails naming the disk, and the SSD's
    // copy (written) is not served.
    let rule = disk.dev.faults().add(FaultRule::fail(OpSet::WRITE, 32 * BS..33 * BS, libc::ENOSPC));
    assert_io_error(write_block(&cache, 32, 4), Device::Disk, libc::ENOSPC, "fan-out disk error");
    write_block(&cache, 31, 5).unwrap(); // a hit: both devices, other sectors
    assert_io_error(write_block(&cache, 32, 6), Device::Disk, libc::ENOSPC, "second try");
    assert_eq!(disk.dev.faults().fired(rule), 2);
    assert_eq!(cache.stats().disk_write_errors, 2);
    disk.dev.faults().clear_rules();
    assert_data!(read_block(&cache, 32), disk_block(&disk, 32));
    assert_data!(read_block(&cache, 32), data(32, 0), "the failed writes left the old data");
    assert_data!(read_block(&cache, 31), data(31, 5));
    cache.shutdown().unwrap();
}

#[test]
fn past_the_ssd_error_threshold_the_cache_bypasses_and_a_reload_serves_no_stale_block() {
    for mode in [CacheMode::WriteThrough, CacheMode::WriteAround] {
        let (ssd, disk, cache) = rig(mode, CommitMode::OnFlush);
        cache.set_tunable("ssd_error_threshold", 3).unwrap();
        // Blocks 40 and 41 cached (40 written through in write-through).
        if mode == CacheMode::WriteThrough {
            write_block(&cache, 40, 1).unwrap();
        }
        let old40 = read_block(&cache, 40);
        read_block(&cache, 41);
        assert_eq!(cache.cached_blocks(), 2, "{mode:?}");

        let rule =
            ssd.dev.faults().add(FaultRule::fail(OpSet::WRITE, data_sectors(&cache), libc::EIO));
        assert_data!(read_block(&cache, 50), data(50, 0), "{mode:?}");
        assert_data!(read_block(&cache, 51), data(51, 0), "{mode:?}");
        assert!(!cache.is_bypassed(), "{mode:?}: bypass after 2 errors, the threshold is 3");
        assert_data!(read_block(&cache, 52), data(52, 0), "{mode:?}");
        assert!(cache.is_bypassed(), "{mode:?}: no bypass after 3 SSD errors");
        assert_eq!(cache.stats().ssd_write_errors, 3, "{mode:?}");
        assert_eq!(ssd.dev.faults().fired(rule), 3);
        // The SSD works again, but the cache stays in bypass.
        ssd.dev.faults().clear_rules();

        let before = cache.stats();
        write_block(&cache, 40, 9).unwrap(); // the SSD's copy is now stale
        write_block(&cache, 53, 9).unwrap();
        cache.write(41 * BS + 2, &pattern(41 * BS + 2, 3, 9)).unwrap(); // partial
        let mut expect41 = data(41, 0);
        expect41[1024..2560].copy_from_slice(&pattern(41 * BS + 2, 3, 9));
        assert!(old40 != data(40, 9));
        for _ in 0..2 {
            assert_data!(read_block(&cache, 40), data(40, 9), "{mode:?}: a stale block was served");
            assert_data!(read_block(&cache, 41), expect41, "{mode:?}");
            assert_data!(read_block(&cache, 53), data(53, 9), "{mode:?}");
            assert_data!(read_block(&cache, 54), data(54, 0), "{mode:?}");
        }
        cache.flush().unwrap();
        let s = cache.stats();
        assert_eq!(
            (s.ssd_reads, s.ssd_writes),
            (before.ssd_reads, before.ssd_writes),
            "{mode:?}: I/O in bypass touched the SSD"
        );
        assert_data!(disk_block(&disk, 40), data(40, 9), "{mode:?}");
        cache.shutdown().unwrap();

        let (cache, _report) = reload(&ssd, &disk);
        for _ in 0..2 {
            assert_data!(read_block(&cache, 40), data(40, 9), "{mode:?}: stale after the reload");
            assert_data!(read_block(&cache, 41), expect41, "{mode:?}: stale after the reload");
            assert_data!(read_block(&cache, 53), data(53, 9), "{mode:?}");
        }
        cache.shutdown().unwrap();
    }
}

// ---------------------------------------------------------------------------
// Write-back.
// ---------------------------------------------------------------------------

#[test]
fn writeback_a_failed_ssd_write_fails_the_write_with_its_errno() {
    let (ssd, disk, cache) = rig(CacheMode::WriteBack, CommitMode::OnFlush);
    cache.stop_cleaning();
    write_block(&cache, 61, 1).unwrap(); // dirty, with the data of seed 1
    let rule =
        ssd.dev.faults().add(FaultRule::fail(OpSet::WRITE, data_sectors(&cache), libc::ENOSPC));
    // A miss: the new block is not left cached.
    assert_io_error(write_block(&cache, 60, 2), Device::Ssd, libc::ENOSPC, "write miss");
    assert_eq!(cache.stats().ssd_write_errors, 1);
    assert_eq!((cache.cached_blocks(), cache.dirty_blocks()), (1, 1));
    // A dirty hit: the block stays dirty with its last good data.
    assert_io_error(write_block(&cache, 61, 2), Device::Ssd, libc::ENOSPC, "dirty hit");
    // A partial write to the dirty block (read-modify-write) fails the same way.
    let err = cache.write(61 * BS + 1, &[0xee; 512]);
    assert_io_error(err, Device::Ssd, libc::ENOSPC, "partial write");
    assert_eq!(cache.stats().ssd_write_errors, 3);
    assert_eq!(ssd.dev.faults().fired(rule), 3);
    ssd.dev.faults().clear_rules();

    assert_eq!((cache.cached_blocks(), cache.dirty_blocks()), (1, 1));
    assert_data!(read_block(&cache, 60), data(60, 0), "the failed write changed block 60");
    assert_data!(read_block(&cache, 61), data(61, 1), "the dirty block lost its data");
    assert_eq!(cache.clean_all().unwrap().cleaned, 1);
    assert_data!(disk_block(&disk, 61), data(61, 1));
    assert_data!(disk_block(&disk, 60), data(60, 0));
    cache.shutdown().unwrap();
}

#[test]
fn writeback_a_failed_ssd_read_of_a_dirty_block_is_an_error_not_stale_disk_data() {
    let (ssd, disk, cache) = rig(CacheMode::WriteBack, CommitMode::OnFlush);
    cache.stop_cleaning();
    write_block(&cache, 70, 1).unwrap();
    let rule = ssd.dev.faults().add(FaultRule::fail(OpSet::READ, data_sectors(&cache), libc::EIO));
    let mut buf = vec![0u8; BLOCK];
    assert_io_error(cache.read(70 * BS, &mut buf), Device::Ssd, libc::EIO, "dirty hit");
    assert!(buf != data(70, 0), "the disk's stale copy was served");
    // A partial read and a partial write (read-modify-write) of the dirty block.
    assert_io_error(cache.read(70 * BS + 3, &mut buf[..512]), Device::Ssd, libc::EIO, "partial");
    assert_io_error(cache.write(70 * BS + 3, &[1; 512]), Device::Ssd, libc::EIO, "rmw");
    assert_eq!(cache.stats().ssd_read_errors, 3);
    assert_eq!(ssd.dev.faults().fired(rule), 3);
    assert_eq!(
        (cache.cached_blocks(), cache.dirty_blocks()),
        (1, 1),
        "the dirty block was dropped"
    );
    assert!(!cache.is_bypassed(), "write-back never bypasses");
    ssd.dev.faults().clear_rules();
    assert_data!(read_block(&cache, 70), data(70, 1));

    // Once clean, a failed SSD read is served from the disk.
    cache.clean_all().unwrap();
    assert_data!(disk_block(&disk, 70), data(70, 1));
    ssd.dev.faults().add(FaultRule::fail(OpSet::READ, data_sectors(&cache), libc::EIO));
    assert_data!(read_block(&cache, 70), data(70, 1));
    assert_eq!(cache.stats().ssd_read_errors, 4);
    ssd.dev.faults().clear_rules();
    assert_data!(read_block(&cache, 70), data(70, 1));
    cache.shutdown().unwrap();
}

#[test]
fn writeback_a_failed_disk_read_of_a_miss_is_an_error_naming_the_disk() {
    let (_ssd, disk, cache) = rig(CacheMode::WriteBack, CommitMode::OnFlush);
    cache.stop_cleaning();
    let rule =
        disk.dev.faults().add(FaultRule::fail(OpSet::READ, 80 * BS..82 * BS, libc::EREMOTEIO));
    let mut buf = vec![0u8; BLOCK];
    assert_io_error(cache.read(80 * BS, &mut buf), Device::Disk, libc::EREMOTEIO, "fill");
    assert_eq!(cache.cached_blocks(), 0, "a block whose fill failed stayed cached");
    let r = cache.read_with(80 * BS, &mut buf, IoFlags::NO_CACHE);
    assert_io_error(r, Device::Disk, libc::EREMOTEIO, "uncached read");
    assert_io_error(
        cache.read(81 * BS + 2, &mut buf[..1024]),
        Device::Disk,
        libc::EREMOTEIO,
        "partial",
    );
    // A multi-block read failing in its second block.
    let mut two = vec![0u8; 2 * BLOCK];
    assert_io_error(cache.read(79 * BS, &mut two), Device::Disk, libc::EREMOTEIO, "two blocks");
    assert_eq!(cache.stats().disk_read_errors, 4);
    assert_eq!(disk.dev.faults().fired(rule), 4);
    assert_eq!(cache.cached_blocks(), 1, "only block 79 was filled");
    disk.dev.faults().clear_rules();
    assert_data!(read_block(&cache, 80), data(80, 0));
    assert_data!(read_block(&cache, 80), data(80, 0));
    assert_eq!(cache.cached_blocks(), 2);
    cache.shutdown().unwrap();
}

#[test]
fn writeback_a_failed_disk_write_while_cleaning_keeps_the_blocks_dirty() {
    let (_ssd, disk, cache) = rig(CacheMode::WriteBack, CommitMode::OnFlush);
    cache.stop_cleaning();
    // A run in consecutive ways (copied by kcopyd) and one in reversed ways
    // (read block by block, written together).
    let blocks = [96, 97, 98, 99, 121, 120];
    for &b in &blocks {
        write_block(&cache, b, 1).unwrap();
    }
    assert_eq!(cache.dirty_blocks(), 6);
    let rule = disk.dev.faults().add(FaultRule::fail(OpSet::WRITE, 0..u64::MAX, libc::EIO));
    match cache.clean_all() {
        Err(CacheError::CleaningIncomplete { remaining, failed }) => {
            assert_eq!(remaining, 6);
            assert!(failed >= 1, "{failed}");
        }
        other => panic!("expected CleaningIncomplete, got {other:?}"),
    }
    let s = cache.stats();
    assert_eq!(cache.dirty_blocks(), 6, "blocks that failed to clean turned clean");
    assert!(s.clean_errors >= 6, "{s:?}");
    assert!(s.disk_write_errors >= 2, "{s:?}");
    assert_eq!(s.cleanings, 0, "{s:?}");
    assert!(disk.dev.faults().fired(rule) >= 2);
    for &b in &blocks {
        assert_data!(disk_block(&disk, b), data(b, 0), "block {b} reached the disk");
        assert_data!(read_block(&cache, b), data(b, 1), "block {b} lost its dirty data");
    }
    disk.dev.faults().clear_rules();

    let report = cache.clean_all().unwrap();
    assert_eq!((report.cleaned, report.failed, report.remaining_dirty), (6, 0, 0));
    assert_eq!(cache.dirty_blocks(), 0);
    for &b in &blocks {
        assert_data!(disk_block(&disk, b), data(b, 1), "block {b} was not written back");
    }
    assert!(cache.stats().cleanings >= 6);
    cache.shutdown().unwrap();
}

// ---------------------------------------------------------------------------
// Metadata.
// ---------------------------------------------------------------------------

#[test]
fn a_failed_metadata_write_fails_flush_until_it_works_again() {
    let (ssd, disk, cache) = rig(CacheMode::WriteBack, CommitMode::OnFlush);
    cache.stop_cleaning();
    let rule = ssd.dev.faults().add(FaultRule::fail(OpSet::WRITE, md_sectors(&cache), libc::EIO));
    write_block(&cache, 130, 1).unwrap(); // a slot to commit
    // The cleaner thread's periodic commit may race the first flush for the
    // pending set; a failed commit puts the set back, so a retry sees it.
    let errors: Vec<CacheError> = (0..3).filter_map(|_| cache.flush().err()).collect();
    assert!(!errors.is_empty(), "flush succeeded with every metadata write failing");
    for e in errors {
        assert!(matches!(e, CacheError::Io { device: Device::Ssd, .. }), "{e}");
        assert_eq!(e.errno(), Some(libc::EIO), "{e}");
    }
    assert!(ssd.dev.faults().fired(rule) > 0);
    assert!(cache.stats().ssd_write_errors > 0);
    // An FUA write commits too, and fails the same way.
    let fua = cache.write_with(131 * BS, &data(131, 1), IoFlags::FUA);
    assert_io_error(fua, Device::Ssd, libc::EIO, "FUA write");
    assert!(ssd.dev.faults().remove(rule));
    cache.flush().unwrap();
    assert_data!(read_block(&cache, 130), data(130, 1));

    // The flush made both dirty blocks durable: they survive a crash.
    crash(cache, &ssd);
    let (cache, report) = reload(&ssd, &disk);
    assert_eq!(report.previous_state, SbState::Loaded);
    assert_eq!(report.recovered.dirty, 2, "{report:?}");
    assert_data!(read_block(&cache, 130), data(130, 1));
    assert_data!(read_block(&cache, 131), data(131, 1));
    cache.shutdown().unwrap();
}

#[test]
fn a_failed_metadata_write_at_shutdown_leaves_the_cache_unstable_and_load_refuses_it() {
    for mode in [CacheMode::WriteBack, CacheMode::WriteThrough] {
        let (ssd, disk, cache) = rig(mode, CommitMode::OnFlush);
        write_block(&cache, 140, 1).unwrap();
        read_block(&cache, 141);
        let rule =
            ssd.dev.faults().add(FaultRule::fail(OpSet::WRITE, md_sectors(&cache), libc::EIO));
        let err = cache.shutdown().expect_err("shutdown succeeded without writing its metadata");
        assert!(matches!(err, CacheError::Io { device: Device::Ssd, .. }), "{mode:?}: {err}");
        assert!(ssd.dev.faults().fired(rule) > 0);
        ssd.dev.faults().clear_rules();

        let io = dmio::DmIoClient::new().unwrap();
        let sb = setup::read_superblock(&io, &ssd.dev).unwrap();
        assert_eq!(sb.state, SbState::Unstable, "{mode:?}");
        match Cache::load(ssd.dev.clone(), disk.dev.clone()) {
            Err(CacheError::Setup(SetupError::Unstable { .. })) => {}
            other => panic!("{mode:?}: expected Unstable, got {other:?}"),
        }
        // The refusal changed nothing.
        assert_eq!(setup::read_superblock(&io, &ssd.dev).unwrap().state, SbState::Unstable);
    }
}

#[test]
fn sync_commit_a_failed_metadata_write_fails_the_dirtying_write() {
    let (ssd, _disk, cache) = rig(CacheMode::WriteBack, CommitMode::Sync);
    cache.stop_cleaning();
    let rule = ssd.dev.faults().add(FaultRule::fail(OpSet::WRITE, md_sectors(&cache), libc::EIO));
    assert_io_error(write_block(&cache, 150, 1), Device::Ssd, libc::EIO, "sync commit");
    assert!(ssd.dev.faults().fired(rule) > 0);
    ssd.dev.faults().clear_rules();
    write_block(&cache, 151, 1).unwrap();
    cache.flush().unwrap();
    cache.shutdown().unwrap();
}

/// After a dirtying write whose slot commit failed (sync commit mode), a later
/// successful write to the same block and a successful `flush()` must make
/// the block durable.
#[test]
fn sync_commit_a_block_whose_commit_failed_is_durable_after_a_later_write_and_flush() {
    let (ssd, disk, cache) = rig(CacheMode::WriteBack, CommitMode::Sync);
    cache.stop_cleaning();
    let rule = ssd.dev.faults().add(FaultRule::fail(OpSet::WRITE, md_sectors(&cache), libc::EIO));
    assert!(write_block(&cache, 160, 1).is_err());
    assert!(ssd.dev.faults().remove(rule));
    write_block(&cache, 160, 2).unwrap();
    cache.flush().unwrap();
    crash(cache, &ssd);
    let (cache, report) = reload(&ssd, &disk);
    assert_data!(read_block(&cache, 160), data(160, 2), "a flushed write was lost ({report:?})");
    cache.shutdown().unwrap();
}

/// A write of two blocks whose second block fails: the first block is dirty
/// in the cache; a later successful write to it and a successful `flush()`
/// must make it durable.
#[test]
fn a_block_dirtied_by_a_write_that_failed_later_is_durable_after_a_later_write_and_flush() {
    let (ssd, disk, cache) = rig(CacheMode::WriteBack, CommitMode::OnFlush);
    cache.stop_cleaning();
    // The second SSD data write fails: block 171's.
    let rule = ssd
        .dev
        .faults()
        .add(FaultRule::fail(OpSet::WRITE, data_sectors(&cache), libc::EIO).when(Trigger::Nth(2)));
    let err = cache.write(170 * BS, &pattern(170 * BS, 2 * BS, 1));
    assert_io_error(err, Device::Ssd, libc::EIO, "second block");
    assert_eq!(ssd.dev.faults().fired(rule), 1);
    ssd.dev.faults().clear_rules();
    assert_eq!(cache.dirty_blocks(), 1, "block 170 was written and is dirty");
    write_block(&cache, 170, 2).unwrap();
    cache.flush().unwrap();
    crash(cache, &ssd);
    let (cache, report) = reload(&ssd, &disk);
    assert_data!(read_block(&cache, 170), data(170, 2), "a flushed write was lost ({report:?})");
    cache.shutdown().unwrap();
}
