//! Cleaning: writing dirty blocks back to the disk, and the background thread
//! that does it (sets over their dirty threshold, idle "fallow" blocks) and
//! commits metadata once a second.
//!
//! A cleaning run is a set's dirty blocks with consecutive disk block numbers,
//! written to the disk with one write, in disk order. When the run's blocks sit
//! in consecutive SSD ways too, kcopyd copies the run; otherwise the blocks are
//! read from the SSD one by one and written to the disk together. A cleaned
//! block turns clean but stays pinned (not evictable) until a commit has
//! recorded it as clean; a block that fails to clean stays dirty and is
//! counted in `clean_errors`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dmio::{AlignedBuf, DmIoMemory, DmIoRegion, ReqFlags, SECTOR_SIZE};
use kcopyd::CopyFlags;

use super::Inner;
use super::error::{CacheError, Device};
use super::shard::BlockGuard;
use crate::format::CacheMode;
use crate::policy::{
    CleanLimits, CleanRun, Counters, fallow_tick, plan_cleaning, plan_fallow_cleaning,
    plan_full_cleaning,
};

/// The most blocks one cleaning write merges.
const MAX_RUN_BLOCKS: u32 = 256;

/// How often the background thread looks for work and commits metadata.
const TICK: Duration = Duration::from_millis(200);

/// How often slot changes are committed without a flush (on-flush mode).
const COMMIT_PERIOD: Duration = Duration::from_secs(1);

/// What a round of cleaning did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CleanReport {
    /// Blocks written back.
    pub cleaned: u64,
    /// Blocks that failed to clean (they stay dirty).
    pub failed: u64,
    /// Dirty blocks left.
    pub remaining_dirty: u64,
    /// Whether [`Cache::stop_cleaning`](super::Cache::stop_cleaning) ended it.
    pub stopped: bool,
}

#[derive(Debug, Default)]
struct Flags {
    quit: bool,
    stopped: bool,
    woken: bool,
}

/// The controls of a cache's cleaning.
#[derive(Debug, Default)]
pub(crate) struct CleanerControl {
    flags: Mutex<Flags>,
    cond: Condvar,
}

impl CleanerControl {
    fn flags(&self) -> std::sync::MutexGuard<'_, Flags> {
        self.flags.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the background thread to look for work now.
    pub(crate) fn wake(&self) {
        self.flags().woken = true;
        self.cond.notify_all();
    }

    pub(crate) fn stop(&self) {
        self.flags().stopped = true;
        self.cond.notify_all();
    }

    pub(crate) fn resume(&self) {
        self.flags().stopped = false;
        self.cond.notify_all();
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.flags().stopped
    }

    pub(crate) fn quit(&self) {
        self.flags().quit = true;
        self.cond.notify_all();
    }

    /// Waits for a wake-up or `timeout`; false once asked to quit.
    fn wait(&self, timeout: Duration) -> bool {
        let mut flags = self.flags();
        if !flags.quit && !flags.woken {
            flags = self.cond.wait_timeout(flags, timeout).unwrap_or_else(|e| e.into_inner()).0;
        }
        flags.woken = false;
        !flags.quit
    }
}

/// Starts the background thread of `inner`.
pub(crate) fn spawn(inner: Arc<Inner>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("flashcache-clean".into()).spawn(move || background(&inner))
}

fn background(inner: &Inner) {
    let mut last_commit = Instant::now();
    let mut last_fallow_tick = Instant::now();
    let mut last_fallow_clean = Instant::now();
    while inner.cleaner.wait(TICK) {
        let t = *inner.tunables.read().unwrap_or_else(|e| e.into_inner());
        if inner.mode == CacheMode::WriteBack && !inner.cleaner.is_stopped() {
            let limits = CleanLimits {
                dirty_thresh: t.dirty_thresh_blocks(inner.layout.assoc()),
                max_runs: t.max_clean_ios_set,
                max_run_blocks: MAX_RUN_BLOCKS,
            };
            let mut budget = t.max_clean_ios_total;
            for set in 0..inner.layout.num_sets() {
                if budget == 0 {
                    break;
                }
                let runs = inner.lock_runs(set, |st| {
                    let s = &mut *st;
                    let mut l = limits;
                    l.max_runs = l.max_runs.min(budget);
                    plan_cleaning(&mut s.set, &*s.policy, l)
                });
                budget = budget.saturating_sub(runs.len() as u32);
                if !runs.is_empty() {
                    Counters::bump(&inner.counters.clean_set_ios);
                    let _ = inner.clean_runs(set, runs, false);
                }
            }
            if t.fallow_delay > 0 {
                let delay = Duration::from_secs(u64::from(t.fallow_delay));
                if last_fallow_tick.elapsed() >= delay {
                    last_fallow_tick = Instant::now();
                    for shard in inner.shards.iter() {
                        fallow_tick(&mut shard.lock().set);
                    }
                }
                if last_fallow_clean.elapsed() >= Duration::from_secs(1) {
                    last_fallow_clean = Instant::now();
                    for set in 0..inner.layout.num_sets() {
                        let runs = inner.lock_runs(set, |st| {
                            plan_fallow_cleaning(&st.set, t.fallow_clean_speed, t.max_clean_ios_set)
                        });
                        if !runs.is_empty() {
                            let _ = inner.clean_runs(set, runs, true);
                        }
                    }
                }
            }
        }
        let pending = !inner.pending.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
        if pending && last_commit.elapsed() >= COMMIT_PERIOD {
            last_commit = Instant::now();
            let _ = inner.commit_pending(true);
        }
    }
}

/// A cleaning run whose blocks are locked.
pub(crate) struct LockedRun {
    run: CleanRun,
}

impl Inner {
    /// Plans runs for `set` with `plan` and locks their blocks, in one hold of
    /// the set's mutex (the planner never picks a busy block, so every lock is
    /// free).
    pub(crate) fn lock_runs(
        &self,
        set: u32,
        plan: impl FnOnce(&mut super::shard::SetState) -> Vec<CleanRun>,
    ) -> Vec<LockedRun> {
        let mut st = self.shards[set as usize].lock();
        let runs = plan(&mut st);
        let mut locked = Vec::with_capacity(runs.len());
        for mut run in runs {
            // Keep the run's leading blocks that could be locked (all of them, as
            // the planner skips busy ones); a gap ends the run.
            let mut n = 0;
            while n < run.ways.len() && st.try_lock_exclusive(run.first_block + n as u64) {
                n += 1;
            }
            run.ways.truncate(n);
            if n > 0 {
                st.clean_ios += 1;
                locked.push(LockedRun { run });
            }
        }
        locked
    }

    /// Cleans locked runs of `set`, then commits the set so the cleaned blocks
    /// can be evicted. Returns (cleaned, failed) block counts.
    pub(crate) fn clean_runs(&self, set: u32, runs: Vec<LockedRun>, fallow: bool) -> (u64, u64) {
        let shard = &self.shards[set as usize];
        let (mut cleaned, mut failed) = (0u64, 0u64);
        for LockedRun { run } in runs {
            // Release every block lock, whatever happens below.
            let guards: Vec<BlockGuard<'_>> = (0..run.ways.len())
                .map(|i| BlockGuard::adopt(shard, run.first_block + i as u64))
                .collect();
            let n = run.ways.len() as u64;
            let result = self.copy_run(set, &run);
            let mut st = shard.lock();
            st.clean_ios = st.clean_ios.saturating_sub(1);
            match result {
                Ok(()) => {
                    for &way in &run.ways {
                        st.set.mark_clean(way);
                        st.set.set_pinned(way, true);
                    }
                    Counters::bump(&self.counters.metadata_cleans);
                    self.counters.cleanings.fetch_add(n, Ordering::Relaxed);
                    if fallow {
                        self.counters.fallow_cleanings.fetch_add(n, Ordering::Relaxed);
                    }
                    // A run cut short at a block it could not lock may have
                    // lost blocks behind the chosen one (or the chosen one).
                    let front = (run.front_merged as u64).min(n - 1);
                    self.counters.front_merge.fetch_add(front, Ordering::Relaxed);
                    self.counters.back_merge.fetch_add(n - 1 - front, Ordering::Relaxed);
                    cleaned += n;
                }
                Err(_) => {
                    self.counters.clean_errors.fetch_add(n, Ordering::Relaxed);
                    failed += n;
                }
            }
            drop(st);
            drop(guards);
        }
        if cleaned > 0 {
            self.note_slots_changed(set);
            if self.commit_mode == crate::format::CommitMode::Sync {
                let _ = self.commit_pending(true);
            }
        }
        (cleaned, failed)
    }

    /// Writes a run's blocks from the SSD to the disk.
    fn copy_run(&self, set: u32, run: &CleanRun) -> Result<(), CacheError> {
        let block_sectors = u64::from(self.geometry.block_sectors());
        let n = run.ways.len() as u64;
        let assoc = u64::from(self.layout.assoc());
        let index = |way: u16| u64::from(set) * assoc + u64::from(way);
        let ssd_sector = |way: u16| self.layout.block_offset(index(way)).unwrap_or(0) / SECTOR_SIZE;
        let disk_sector = run.first_block * block_sectors;
        let consecutive = run.ways.windows(2).all(|w| w[1] == w[0].wrapping_add(1));
        if consecutive {
            let from = DmIoRegion::new(&self.io.ssd, ssd_sector(run.ways[0]), n * block_sectors);
            let to = DmIoRegion::new(&self.io.disk, disk_sector, n * block_sectors);
            Counters::bump(&self.counters.ssd_reads);
            Counters::bump(&self.counters.disk_writes);
            let outcome = self.kcopyd.copy_sync(&from, &[to], CopyFlags::empty()).map_err(|e| {
                CacheError::Io {
                    what: "cleaning",
                    device: Device::Disk,
                    path: self.io.disk.path().to_path_buf(),
                    sector: disk_sector,
                    source: Box::new(dmio::DmIoError::Config(e.to_string())),
                }
            })?;
            if outcome.read_err || !outcome.write_err.is_empty() {
                let (device, counter) = if outcome.read_err {
                    (Device::Ssd, &self.counters.ssd_read_errors)
                } else {
                    (Device::Disk, &self.counters.disk_write_errors)
                };
                Counters::bump(counter);
                let failure = outcome.failures.first();
                return Err(CacheError::Io {
                    what: "cleaning",
                    device,
                    path: failure.map_or_else(
                        || self.io.disk.path().to_path_buf(),
                        |f| f.device.path().to_path_buf(),
                    ),
                    sector: failure.map_or(disk_sector, |f| f.sector),
                    source: Box::new(dmio::DmIoError::Regions(dmio::RegionFailures {
                        error_bits: outcome.write_err,
                        failures: outcome.failures.clone(),
                    })),
                });
            }
            return Ok(());
        }
        let block_bytes = self.geometry.block_bytes() as usize;
        let mut all = AlignedBuf::new(block_bytes * run.ways.len());
        for (i, &way) in run.ways.iter().enumerate() {
            let data = self.io.read(Device::Ssd, ssd_sector(way), block_bytes, &self.counters)?;
            all[i * block_bytes..(i + 1) * block_bytes].copy_from_slice(&data[..]);
        }
        self.io.write(
            Device::Disk,
            disk_sector,
            DmIoMemory::Kmem(all),
            ReqFlags::empty(),
            &self.counters,
        )
    }

    /// For a miss that found `set` full: cleans its coldest dirty run now and
    /// commits the set, so the cleaned blocks can be evicted at once
    /// (flashcache's `clean_on_read_miss` / `clean_on_write_miss`). Returns
    /// whether anything was cleaned.
    pub(crate) fn clean_for_room(&self, set: u32) -> bool {
        let runs = self.lock_runs(set, |st| {
            let s = &mut *st;
            let thresh = s.set.nr_dirty().saturating_sub(1);
            let limits =
                CleanLimits { dirty_thresh: thresh, max_runs: 1, max_run_blocks: MAX_RUN_BLOCKS };
            plan_cleaning(&mut s.set, &*s.policy, limits)
        });
        if runs.is_empty() {
            return false;
        }
        let (cleaned, _) = self.clean_runs(set, runs, false);
        if cleaned == 0 {
            return false;
        }
        self.counters.force_clean_block.fetch_add(cleaned, Ordering::Relaxed);
        self.commit_pending(true).is_ok()
    }

    /// Cleans every dirty block (the caller's thread does the work).
    pub(crate) fn clean_all(&self) -> Result<CleanReport, CacheError> {
        let mut report = CleanReport::default();
        loop {
            let mut round_cleaned = 0;
            let mut round_failed = 0;
            for set in 0..self.layout.num_sets() {
                if self.cleaner.is_stopped() {
                    report.stopped = true;
                    break;
                }
                let runs =
                    self.lock_runs(set, |st| plan_full_cleaning(&st.set, u32::MAX, MAX_RUN_BLOCKS));
                if runs.is_empty() {
                    continue;
                }
                let (c, f) = self.clean_runs(set, runs, false);
                round_cleaned += c;
                round_failed += f;
            }
            report.cleaned += round_cleaned;
            report.failed += round_failed;
            self.commit_pending(true)?;
            report.remaining_dirty =
                self.shards.iter().map(|s| u64::from(s.lock().set.nr_dirty())).sum();
            if report.stopped || report.remaining_dirty == 0 {
                return Ok(report);
            }
            if round_cleaned == 0 {
                if round_failed > 0 {
                    return Err(CacheError::CleaningIncomplete {
                        remaining: report.remaining_dirty,
                        failed: round_failed,
                    });
                }
                // Dirty blocks busy with I/O: give them a moment.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
