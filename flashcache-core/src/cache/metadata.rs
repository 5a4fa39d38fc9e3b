//! Metadata commits (the slots of a set written to the SSD, after the data they
//! describe is durable) and recovery (the sets rebuilt from the slots at load).
//!
//! # The rules that make a crash safe
//!
//! - A slot says DIRTY only after the block's data write completed, and a
//!   commit snapshots the slots *before* it flushes the devices, so every DIRTY
//!   slot it writes describes data that the flush made durable (data before
//!   metadata). Cleaned blocks are made durable on the disk by the same flush
//!   before their slots say "clean".
//! - A way whose durable slot may still say DIRTY for a block is never given
//!   to another block: a cleaned block stays PINNED (not evictable), and a
//!   dropped dirty block's way is held off the free list, until a commit has
//!   written the new slot.
//! - Each commit writes a whole set's slots with one FUA write and stamps them
//!   with a sequence number; commits of a set are serialized. If a crash tears
//!   a commit so that two slots name the same dirty block, recovery keeps the
//!   one with the newer sequence number.
//! - After a crash only DIRTY slots are loaded (clean blocks may be stale: a
//!   write-around write or an eviction since the last commit did not rewrite
//!   their slots). After an orderly shutdown every slot is current, so clean
//!   blocks are kept as well (a warm restart).

use std::sync::atomic::Ordering;

use dmio::{AlignedBuf, DmIoMemory, ReqFlags, SECTOR_SIZE};

use super::Inner;
use super::devio::DevIo;
use super::error::{CacheError, Device};
use super::shard::{SetState, Shard};
use crate::format::{Layout, SlotRecord, SlotState};
use crate::policy::{BlockState, CacheSet, Counters, Geometry, PolicyKind, Way};

/// One set's slots encoded for a commit, and the ways that the commit frees.
struct SetSnapshot {
    set: u32,
    bytes: AlignedBuf,
    /// Valid, clean, pinned ways: unpinned once the commit is durable.
    unpin: Vec<Way>,
    /// Ways held off the free list: released once the commit is durable.
    release: Vec<Way>,
    /// Slots that changed state since the last commit (for the batch counter).
    slots: u64,
}

impl Inner {
    /// Records that `set`'s slots changed in memory. Called under the set's
    /// lock, at the change itself, so that no error path can lose it: the set
    /// stays pending until a commit succeeds.
    pub(crate) fn note_slots_changed(&self, set: u32) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(set);
    }

    /// In `sync` commit mode, commits the pending slot changes now (a failed
    /// commit leaves them pending for the next try); in `on-flush` mode they
    /// wait for the next flush, FUA write or periodic commit.
    pub(crate) fn commit_if_sync(&self) -> Result<(), CacheError> {
        if self.commit_mode == crate::format::CommitMode::Sync {
            self.commit_pending(false)
        } else {
            Ok(())
        }
    }

    /// Commits every set with uncommitted slot changes; with `flush_disk`, the
    /// disk's cache is flushed as well (for write-through, write-around and
    /// cleaned data).
    pub(crate) fn commit_pending(&self, flush_disk: bool) -> Result<(), CacheError> {
        let sets: Vec<u32> =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        let result = self.commit(&sets, flush_disk);
        if result.is_err() {
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).extend(sets);
        }
        result
    }

    /// Commits the slots of `sets`: snapshot, flush the SSD (and the disk with
    /// `flush_disk`), write each set's slots with FUA, then unpin and release
    /// the ways the new slots no longer name as dirty. With no sets it still
    /// flushes, so it is also the flush of the data path.
    pub(crate) fn commit(&self, sets: &[u32], flush_disk: bool) -> Result<(), CacheError> {
        let mut sets = sets.to_vec();
        sets.sort_unstable();
        sets.dedup();
        // Commit mutexes in set order: no two commits wait on each other.
        let guards: Vec<_> = sets.iter().map(|&s| self.shards[s as usize].lock_commit()).collect();
        let seq = self.commit_seq.fetch_add(1, Ordering::Relaxed);
        let mut snapshots = Vec::with_capacity(sets.len());
        for &set in &sets {
            let st = self.shards[set as usize].lock();
            snapshots.push(self.snapshot(set, &st, seq)?);
        }
        // Everything the snapshots describe completed before this point; the
        // flushes make it durable before the slots that point at it. A
        // snapshot that unpins cleaned blocks stops vouching for their SSD
        // copies, so their data on the disk must be durable first, whoever
        // asked for this commit: a sync-mode write commits every pending set,
        // the cleaner's too, between its cleaning and its own commit.
        let flush_disk = flush_disk || snapshots.iter().any(|s| !s.unpin.is_empty());
        if flush_disk {
            self.io.flush(Device::Disk, &self.counters)?;
        }
        self.io.flush(Device::Ssd, &self.counters)?;
        for snap in snapshots {
            let sector = self.layout.set_md_offset(snap.set).unwrap_or(0) / SECTOR_SIZE;
            Counters::bump(&self.counters.metadata_ssd_writes);
            if snap.slots > 1 {
                self.counters.metadata_batch.fetch_add(snap.slots - 1, Ordering::Relaxed);
            }
            self.io.write(
                Device::Ssd,
                sector,
                DmIoMemory::Kmem(snap.bytes),
                ReqFlags::FUA,
                &self.counters,
            )?;
            let shard: &Shard = &self.shards[snap.set as usize];
            let mut st = shard.lock();
            for way in snap.unpin {
                st.set.set_pinned(way, false);
            }
            for way in snap.release {
                st.set.release_held(way);
            }
        }
        drop(guards);
        Ok(())
    }

    /// Encodes `set`'s slots as they are now.
    fn snapshot(&self, set: u32, st: &SetState, seq: u32) -> Result<SetSnapshot, CacheError> {
        let assoc = self.layout.assoc();
        let bypass = self.bypass.load(Ordering::Relaxed);
        let mut records = Vec::with_capacity(assoc as usize);
        let (mut unpin, mut release, mut slots) = (Vec::new(), Vec::new(), 0u64);
        for way in 0..assoc {
            let way = way as Way;
            let state = st.set.state(way);
            let record = match st.set.block(way) {
                Some(block) if state.contains(BlockState::DIRTY) => {
                    SlotRecord { block, state: SlotState::Dirty, generation: seq }
                }
                // In bypass the SSD's clean copies may be stale: never vouch for them.
                Some(block) if !bypass => {
                    if state.contains(BlockState::PINNED) {
                        unpin.push(way);
                    }
                    SlotRecord { block, state: SlotState::Valid, generation: seq }
                }
                Some(_) => {
                    if state.contains(BlockState::PINNED) {
                        unpin.push(way);
                    }
                    SlotRecord::NEVER_WRITTEN
                }
                None => {
                    if st.set.is_held(way) {
                        release.push(way);
                    }
                    SlotRecord::NEVER_WRITTEN
                }
            };
            if record.state != SlotState::Invalid {
                slots += 1;
            }
            records.push(record);
        }
        let md_bytes = self.layout.md_block_bytes() as usize;
        let per_set = self.layout.md_blocks_per_set() as usize;
        let mut bytes = AlignedBuf::new(md_bytes * per_set);
        let first_md = u64::from(set) * per_set as u64;
        for i in 0..per_set {
            let md_block = first_md + i as u64;
            let range = self.layout.md_block_slots(md_block).map_or(0..0, |r| {
                let start = (r.start - u64::from(set) * u64::from(assoc)) as usize;
                start..start + (r.end - r.start) as usize
            });
            let chunk = &mut bytes[i * md_bytes..(i + 1) * md_bytes];
            self.layout.encode_md_block_into(md_block, &records[range], chunk).map_err(
                |source| CacheError::Format { path: self.io.ssd.path().to_path_buf(), source },
            )?;
        }
        Ok(SetSnapshot { set, bytes, unpin, release, slots })
    }
}

/// The parts of a cache that recovery reads.
pub(crate) struct RecoverFrom<'a> {
    pub(crate) io: &'a DevIo,
    pub(crate) layout: &'a Layout,
    pub(crate) geometry: &'a Geometry,
    pub(crate) counters: &'a Counters,
}

impl RecoverFrom<'_> {
    /// Rebuilds every set from the slots on the SSD. With `trust_clean` (the
    /// cache was shut down in order) clean blocks are loaded too; otherwise only
    /// dirty ones. Returns the highest sequence number found.
    pub(crate) fn recover_sets(
        &self,
        policy: PolicyKind,
        trust_clean: bool,
    ) -> Result<(Vec<Shard>, u32, Recovered), CacheError> {
        let layout = self.layout;
        let assoc = layout.assoc();
        let per_set_bytes =
            u64::from(layout.md_blocks_per_set()) * u64::from(layout.md_block_bytes());
        // Read up to 1 MiB of metadata (whole sets) at a time.
        let sets_per_read = ((1u64 << 20) / per_set_bytes).max(1) as u32;
        let disk_blocks = self.io.disk.size_sectors() / u64::from(self.geometry.block_sectors());
        let mut shards = Vec::with_capacity(layout.num_sets() as usize);
        let mut max_seq = 0u32;
        let mut found = Recovered::default();
        let mut set = 0u32;
        while set < layout.num_sets() {
            let count = sets_per_read.min(layout.num_sets() - set);
            let start = layout.set_md_offset(set).unwrap_or(0);
            let bytes = self.io.read(
                Device::Ssd,
                start / SECTOR_SIZE,
                (per_set_bytes * u64::from(count)) as usize,
                self.counters,
            )?;
            for i in 0..count {
                let s = set + i;
                let base = (per_set_bytes * u64::from(i)) as usize;
                let mut entries = Vec::new();
                for m in 0..layout.md_blocks_per_set() {
                    let md_block =
                        u64::from(s) * u64::from(layout.md_blocks_per_set()) + u64::from(m);
                    let off = base + (m * layout.md_block_bytes()) as usize;
                    let chunk = &bytes[off..off + layout.md_block_bytes() as usize];
                    let decoded = layout
                        .decode_md_block(md_block, chunk)
                        .map_err(|e| self.corrupt(s, e.to_string()))?;
                    if let Some(e) = decoded.errors().next() {
                        return Err(self.corrupt(
                            s,
                            format!("{} damaged slot(s), first: {e}", decoded.bad_indices().len()),
                        ));
                    }
                    for (index, rec) in decoded.records() {
                        let keep = match rec.state {
                            SlotState::Dirty => true,
                            SlotState::Valid => trust_clean,
                            SlotState::Invalid => false,
                        };
                        max_seq = max_seq.max(rec.generation);
                        if !keep {
                            continue;
                        }
                        if rec.block >= disk_blocks || self.geometry.set_of(rec.block) != s {
                            return Err(self.corrupt(
                                s,
                                format!(
                                    "slot {index} names disk block {} which this set cannot hold",
                                    rec.block
                                ),
                            ));
                        }
                        let way = (index - u64::from(s) * u64::from(assoc)) as Way;
                        entries.push((
                            rec.generation,
                            way,
                            rec.block,
                            rec.state == SlotState::Dirty,
                        ));
                    }
                }
                // Newest first: of two slots naming one block, the newer wins.
                entries.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                let entries: Vec<(Way, u64, bool)> =
                    entries.into_iter().map(|(_, w, b, d)| (w, b, d)).collect();
                let policy_box = policy.build();
                let (cache_set, rejected) =
                    CacheSet::restore(assoc as usize, &*policy_box, &entries);
                found.dirty += u64::from(cache_set.nr_dirty());
                found.clean += u64::from(cache_set.nr_valid() - cache_set.nr_dirty());
                found.superseded += rejected.len() as u64;
                shards.push(Shard::new(cache_set, policy_box));
            }
            set += count;
        }
        Ok((shards, max_seq, found))
    }

    fn corrupt(&self, set: u32, detail: String) -> CacheError {
        CacheError::CorruptMetadata { path: self.io.ssd.path().to_path_buf(), set, detail }
    }
}

/// What recovery found on the SSD.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Dirty blocks loaded.
    pub dirty: u64,
    /// Clean blocks loaded (only after an orderly shutdown).
    pub clean: u64,
    /// Older slots naming a block that a newer slot also names (a commit torn
    /// by a crash), dropped.
    pub superseded: u64,
}
