//! White-box checks of the crash-safety rules that a black-box power-loss test
//! only hits by chance: a way whose durable slot names a dirty block is never
//! given to another block before a commit rewrote that slot.

use std::sync::Arc;

use dmio::{BlockDevice, SECTOR_SIZE};

use super::Cache;
use crate::format::{CacheMode, CommitMode, SlotState};
use crate::policy::plan_full_cleaning;
use crate::setup::CreateOptions;

/// An SSD and a disk on files of these sizes in `dir`.
fn file_devices(
    dir: &tempfile::TempDir,
    ssd: u64,
    disk: u64,
) -> (Arc<BlockDevice>, Arc<BlockDevice>) {
    let open = |name: &str, len: u64| {
        let path = dir.path().join(name);
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        BlockDevice::open(&path).unwrap()
    };
    (open("ssd", ssd), open("disk", disk))
}

/// A one-set cache of 64 blocks on files, with its background thread stopped
/// (so nothing commits behind the test's back).
fn one_set_cache(dir: &tempfile::TempDir) -> (Cache, Arc<BlockDevice>) {
    one_set_cache_in(dir, CacheMode::WriteBack)
}

/// [`one_set_cache`] in `mode`.
fn one_set_cache_in(dir: &tempfile::TempDir, mode: CacheMode) -> (Cache, Arc<BlockDevice>) {
    let (cache, ssd, _disk) = one_set_cache_with(dir, mode, CommitMode::OnFlush);
    (cache, ssd)
}

/// [`one_set_cache`] in `mode` and `commit` mode; also returns the disk.
fn one_set_cache_with(
    dir: &tempfile::TempDir,
    mode: CacheMode,
    commit: CommitMode,
) -> (Cache, Arc<BlockDevice>, Arc<BlockDevice>) {
    // Superblock 4 KiB + one 4 KiB metadata block + 64 blocks of 4 KiB.
    let (ssd, disk) = file_devices(dir, 8192 + 64 * 4096, 4 << 20);
    let options =
        CreateOptions { mode, commit, assoc: 64, disk_assoc_blocks: 0, ..CreateOptions::default() };
    let mut cache = Cache::create(ssd.clone(), disk.clone(), &options).unwrap();
    assert_eq!(cache.geometry().num_sets(), 1);
    cache.stop_thread();
    (cache, ssd, disk)
}

/// Runs `io` on another thread while block `block` of set 0 is locked, as by
/// I/O in progress, and lets the lock go once `io` waits for it; returns what
/// `io` returned.
fn run_while_locked<T: Send>(cache: &Cache, block: u64, io: impl FnOnce() -> T + Send) -> T {
    let shard = &cache.inner.shards[0];
    drop(shard.acquire(block, super::shard::Access::Exclusive, &cache.inner.counters));
    std::thread::scope(|s| {
        let waiting = s.spawn(io);
        while cache.stats().pending_enqueues == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        shard.release(block, super::shard::Access::Exclusive);
        waiting.join().unwrap()
    })
}

/// The slots as they are on the SSD: (way, block, state).
fn durable_slots(cache: &Cache, ssd: &Arc<BlockDevice>) -> Vec<(u16, u64, SlotState)> {
    let layout = cache.inner.layout;
    let bytes = cache
        .inner
        .io
        .read(
            super::Device::Ssd,
            layout.md_start() / SECTOR_SIZE,
            layout.md_block_bytes() as usize,
            &cache.inner.counters,
        )
        .unwrap();
    let _ = ssd;
    let decoded = layout.decode_md_block(0, &bytes).unwrap();
    decoded.records().map(|(i, r)| (i as u16, r.block, r.state)).collect()
}

#[test]
fn cleaned_blocks_keep_their_way_until_the_clean_slot_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, ssd) = one_set_cache(&dir);
    let block = vec![0x5au8; 4096];
    for b in 0..64u64 {
        cache.write(b * 8, &block).unwrap();
    }
    cache.flush().unwrap();
    assert_eq!(durable_slots(&cache, &ssd).iter().filter(|s| s.2 == SlotState::Dirty).count(), 64);

    // Clean everything without committing (what the background cleaner does
    // between its periodic commits in on-flush mode).
    let runs = cache.inner.lock_runs(0, |st| plan_full_cleaning(&st.set, u32::MAX, 256));
    let (cleaned, failed) = cache.inner.clean_runs(0, runs, false);
    assert_eq!((cleaned, failed), (64, 0));
    assert_eq!(cache.dirty_blocks(), 0);

    // Misses on other blocks now find only cleaned, uncommitted blocks: none
    // may be evicted, so the reads go uncached.
    let mut buf = vec![0u8; 4096];
    for b in 64..128u64 {
        cache.read(b * 8, &mut buf).unwrap();
    }
    let stats = cache.stats();
    assert_eq!(stats.replacement, 0, "{stats:?}");
    assert!(stats.no_room > 0, "{stats:?}");
    for (way, block, state) in durable_slots(&cache, &ssd) {
        if state == SlotState::Dirty {
            let st = cache.inner.shards[0].lock();
            assert_eq!(
                st.set.block(way),
                Some(block),
                "way {way} was reused while its slot says dirty"
            );
        }
    }

    // Once committed, the cleaned blocks can be evicted.
    cache.flush().unwrap();
    assert!(durable_slots(&cache, &ssd).iter().all(|s| s.2 != SlotState::Dirty));
    for b in 64..128u64 {
        cache.read(b * 8, &mut buf).unwrap();
    }
    assert!(cache.stats().replacement > 0);
}

#[test]
fn a_discarded_dirty_block_keeps_its_way_until_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, ssd) = one_set_cache(&dir);
    let block = vec![0xa5u8; 4096];
    for b in 0..64u64 {
        cache.write(b * 8, &block).unwrap();
    }
    cache.flush().unwrap();
    cache.discard(0, 64 * 8).unwrap();
    assert_eq!(cache.cached_blocks(), 0);
    // Every way is held: a new block finds no room until the commit.
    cache.write(100 * 8, &block).unwrap();
    assert_eq!(cache.cached_blocks(), 0);
    assert!(cache.stats().no_room > 0);
    for (way, _, state) in durable_slots(&cache, &ssd) {
        if state == SlotState::Dirty {
            assert!(cache.inner.shards[0].lock().set.is_held(way), "way {way}");
        }
    }
    cache.flush().unwrap();
    assert!(durable_slots(&cache, &ssd).iter().all(|s| s.2 == SlotState::Invalid));
    cache.write(101 * 8, &block).unwrap();
    assert_eq!(cache.cached_blocks(), 1);
}

#[test]
fn clean_on_miss_makes_room_in_a_set_full_of_dirty_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _ssd) = one_set_cache(&dir);
    let block = vec![0x11u8; 4096];
    for b in 0..64u64 {
        cache.write(b * 8, &block).unwrap();
    }
    // Off (the default): the set is full of dirty blocks, the write goes around.
    cache.write(100 * 8, &block).unwrap();
    assert_eq!(cache.stats().no_room, 1);
    assert_eq!(cache.inner.shards[0].lock().set.lookup(100), None);
    cache.set_tunable("clean_on_write_miss", 1).unwrap();
    cache.write(101 * 8, &block).unwrap();
    assert!(cache.inner.shards[0].lock().set.lookup(101).is_some());
    assert!(cache.stats().force_clean_block > 0);
    cache.set_tunable("clean_on_read_miss", 1).unwrap();
    // Fill the set with dirty blocks again, then a read miss makes room.
    for b in 200..264u64 {
        cache.write(b * 8, &block).unwrap();
    }
    let mut buf = vec![0u8; 4096];
    cache.read(300 * 8, &mut buf).unwrap();
    assert!(cache.inner.shards[0].lock().set.lookup(300).is_some());
}

#[test]
fn the_index_takes_at_most_16_bytes_per_cache_block_at_the_default_geometry() {
    let dir = tempfile::tempdir().unwrap();
    let (ssd, disk) = file_devices(&dir, 9 << 20, 64 << 20);
    let cache = Cache::create(ssd, disk, &CreateOptions::default()).unwrap();
    assert_eq!(cache.geometry().assoc(), 512);
    let (total, per_block) = cache.index_bytes();
    assert!(total > 0);
    assert!(per_block <= 16.0, "{per_block} bytes per block");
    assert!(per_block >= 15.0, "{per_block}: the estimate must include the slots");
}

#[test]
fn counters_survive_an_orderly_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (ssd, disk) = file_devices(&dir, 1 << 20, 4 << 20);
    let options = CreateOptions { assoc: 64, ..CreateOptions::default() };
    let cache = Cache::create(ssd.clone(), disk.clone(), &options).unwrap();
    for b in 0..10u64 {
        cache.write(b * 8, &[3u8; 4096]).unwrap();
    }
    let before = cache.stats();
    cache.shutdown().unwrap();
    let (cache, _) = Cache::load(ssd.clone(), disk.clone()).unwrap();
    let after = cache.stats();
    assert_eq!(after.writes, before.writes);
    assert!(after.cleanings >= 10, "the shutdown's cleaning is counted too: {after:?}");
    cache.reset_stats();
    cache.shutdown().unwrap();
    let (cache, _) = Cache::load(ssd, disk).unwrap();
    assert_eq!(cache.stats().writes, 0);
}

#[test]
fn abandon_leaves_what_a_crash_leaves_and_a_switched_policy_persists() {
    let dir = tempfile::tempdir().unwrap();
    let (ssd, disk) = file_devices(&dir, 1 << 20, 4 << 20);
    let options = CreateOptions { assoc: 64, ..CreateOptions::default() };
    let cache = Cache::create(ssd.clone(), disk.clone(), &options).unwrap();
    cache.set_tunable("reclaim_policy", 0).unwrap();
    cache.write(0, &[9u8; 4096]).unwrap();
    cache.flush().unwrap();
    cache.abandon();
    let (cache, report) = Cache::load(ssd.clone(), disk.clone()).unwrap();
    assert_eq!(report.previous_state, crate::format::SbState::Loaded, "nothing was written");
    assert_eq!(report.recovered.dirty, 1);
    let mut buf = vec![0u8; 4096];
    cache.read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![9u8; 4096]);
    // The superblock still names the policy of creation (SIEVE) until an
    // orderly shutdown records a switch.
    assert_eq!(cache.tunables().reclaim_policy, 3);
    cache.set_tunable("reclaim_policy", 0).unwrap();
    cache.shutdown().unwrap();
    let (cache, _) = Cache::load(ssd, disk).unwrap();
    assert_eq!(cache.tunables().reclaim_policy, 0);
}

#[test]
fn segmented_lru_promotions_and_demotions_are_counted_on_every_hit_path() {
    let dir = tempfile::tempdir().unwrap();
    let (ssd, disk) = file_devices(&dir, 8192 + 64 * 4096, 4 << 20);
    let options = CreateOptions {
        assoc: 64,
        disk_assoc_blocks: 0,
        // Promote on the second hit; the hot list holds at most 2 of 64 ways.
        policy: crate::policy::PolicyKind::Slru { promote_thresh: 2, hot_pct: 4 },
        ..CreateOptions::default()
    };
    let cache = Cache::create(ssd, disk, &options).unwrap();
    for block in 0..3u64 {
        cache.write(block * 8, &[block as u8; 4096]).unwrap();
    }
    let mut buf = vec![0u8; 4096];
    // Blocking hits: blocks 0 and 1 reach the hot list.
    for block in 0..2u64 {
        for _ in 0..2 {
            cache.read(block * 8, &mut buf).unwrap();
        }
    }
    let stats = cache.stats();
    assert_eq!((stats.lru_promotions, stats.lru_demotions), (2, 0));
    // Asynchronous hits, served from dm-io: block 2 is promoted and pushes the
    // oldest hot block back to warm.
    for _ in 0..2 {
        let (tx, rx) = std::sync::mpsc::channel();
        let buf = dmio::AlignedBuf::new(4096);
        cache
            .submit_read(16, buf, super::IoFlags::empty(), move |r, _| tx.send(r).unwrap())
            .unwrap();
        rx.recv().unwrap().unwrap();
    }
    let stats = cache.stats();
    assert_eq!((stats.lru_promotions, stats.lru_demotions), (3, 1));
    cache.shutdown().unwrap();
}

#[test]
fn cleaning_counts_blocks_merged_in_front_of_and_behind_the_chosen_block() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _ssd) = one_set_cache(&dir);
    cache.set_tunable("reclaim_policy", 2).unwrap(); // LRU: the order is plain
    let block = vec![0x3cu8; 4096];
    for b in 10..14u64 {
        cache.write(b * 8, &block).unwrap();
    }
    // 12 becomes the coldest dirty block; cleaning one block picks it and
    // merges 10 and 11 in front of it and 13 behind it.
    let mut buf = vec![0u8; 4096];
    for b in [10u64, 11, 13] {
        cache.read(b * 8, &mut buf).unwrap();
    }
    let limits = crate::policy::CleanLimits { dirty_thresh: 3, max_runs: 1, max_run_blocks: 64 };
    let runs = cache.inner.lock_runs(0, |st| {
        let s = &mut *st;
        crate::policy::plan_cleaning(&mut s.set, &*s.policy, limits)
    });
    assert_eq!(cache.inner.clean_runs(0, runs, false), (4, 0));
    let stats = cache.stats();
    assert_eq!((stats.cleanings, stats.front_merge, stats.back_merge), (4, 2, 1), "{stats:?}");
}

#[test]
fn an_invalidation_that_waited_for_io_on_its_block_counts_as_pending_inval() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _ssd) = one_set_cache(&dir);
    let block = vec![0x7eu8; 4096];
    cache.write(5 * 8, &block).unwrap();
    cache.write(6 * 8, &block).unwrap();
    // Nobody holds block 6: its discard does not wait.
    cache.discard(6 * 8, 8).unwrap();
    assert_eq!((cache.stats().pending_enqueues, cache.stats().pending_inval), (0, 0));
    // Block 5 is locked, as by I/O in progress: the discard waits, then drops it.
    run_while_locked(&cache, 5, || cache.discard(5 * 8, 8)).unwrap();
    let stats = cache.stats();
    assert_eq!((stats.pending_enqueues, stats.pending_inval), (1, 1), "{stats:?}");
    assert_eq!(cache.cached_blocks(), 0);
}

#[test]
fn a_write_around_write_that_waited_for_its_block_counts_as_pending_inval() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, _ssd) = one_set_cache_in(&dir, CacheMode::WriteAround);
    let block = vec![0x42u8; 4096];
    let mut buf = vec![0u8; 4096];
    cache.read(5 * 8, &mut buf).unwrap(); // a read miss caches block 5
    assert_eq!(cache.cached_blocks(), 1);
    run_while_locked(&cache, 5, || cache.write(5 * 8, &block)).unwrap();
    let stats = cache.stats();
    assert_eq!((stats.write_invalidates, stats.pending_inval), (1, 1), "{stats:?}");
    assert_eq!(cache.cached_blocks(), 0);
    cache.read(5 * 8, &mut buf).unwrap();
    assert_eq!(buf, block, "the write-around write did not reach the disk");
}

/// A sync-mode commit asked for by a write takes every pending set, the
/// cleaner's too: slots of blocks it cleaned (written back, marked clean, not
/// yet committed) must not become durable before the disk's copy is, or a
/// crash finds the slot clean and the disk without the data. Such a commit
/// flushes the disk, whoever asked for it (`commit` issues its flushes, one
/// blocking call after the other, before it writes any slot).
#[test]
fn a_sync_commit_of_cleaned_blocks_flushes_the_disk() {
    use dmio::DmIoOp;
    let dir = tempfile::tempdir().unwrap();
    let (cache, ssd, disk) = one_set_cache_with(&dir, CacheMode::WriteBack, CommitMode::Sync);
    cache.write(3 * 8, &vec![0x33u8; 4096]).unwrap();
    assert_eq!(durable_slots(&cache, &ssd).iter().filter(|s| s.2 == SlotState::Dirty).count(), 1);
    // The state the cleaner leaves between writing block 3 back and its own
    // commit (`clean_runs`): clean, pinned, its set pending.
    {
        let mut st = cache.inner.shards[0].lock();
        let way = st.set.lookup(3).unwrap();
        st.set.mark_clean(way);
        st.set.set_pinned(way, true);
        cache.inner.note_slots_changed(0);
    }
    disk.faults().start_trace();
    ssd.faults().start_trace();
    cache.inner.commit_if_sync().unwrap();
    let disk_ops = disk.faults().take_trace();
    let ssd_ops = ssd.faults().take_trace();
    assert!(
        disk_ops.iter().any(|t| t.op == DmIoOp::Flush),
        "the commit wrote cleaned blocks' slots without flushing the disk: {disk_ops:?}"
    );
    assert!(ssd_ops.iter().any(|t| t.op == DmIoOp::Write), "no metadata was written: {ssd_ops:?}");
    assert!(durable_slots(&cache, &ssd).iter().all(|s| s.2 != SlotState::Dirty));
}
