//! Reads, writes and discards, block by block.

use std::sync::atomic::Ordering;

use dmio::{AlignedBuf, DmIoMemory, ReqFlags, SECTOR_SIZE};

use super::error::{CacheError, Device};
use super::shard::{Access, BlockGuard, Shard};
use super::{Inner, IoFlags};
use crate::format::CacheMode;
use crate::policy::{Allocation, BlockState, Counters, Way};

/// The part of an I/O that falls in one cache block.
#[derive(Clone, Copy, Debug)]
pub(super) struct Piece {
    /// The disk block.
    pub(super) block: u64,
    /// Byte offset of the piece inside the block.
    pub(super) offset: usize,
    /// Bytes.
    pub(super) len: usize,
    /// Byte offset of the piece inside the caller's buffer.
    pub(super) at: usize,
}

impl Piece {
    pub(super) fn is_whole(&self, block_bytes: usize) -> bool {
        self.offset == 0 && self.len == block_bytes
    }
}

/// An I/O's pieces: most I/O falls in one block, which needs no allocation.
#[derive(Clone, Debug)]
pub(super) enum Pieces {
    One([Piece; 1]),
    Many(Vec<Piece>),
}

impl std::ops::Deref for Pieces {
    type Target = [Piece];

    fn deref(&self) -> &[Piece] {
        match self {
            Pieces::One(one) => one,
            Pieces::Many(many) => many,
        }
    }
}

/// What to do with a miss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cacheable {
    Yes,
    /// Not cached: hinted, `cache_all` off, or write-only mode (reads).
    No,
    /// Not cached: part of a sequential stream.
    Sequential,
}

impl Inner {
    pub(super) fn block_bytes(&self) -> usize {
        self.geometry.block_bytes() as usize
    }

    pub(super) fn shard_of(&self, block: u64) -> (u32, &Shard) {
        let set = self.geometry.set_of(block);
        (set, &self.shards[set as usize])
    }

    /// The SSD sector of a set's way.
    pub(super) fn ssd_sector(&self, set: u32, way: Way) -> u64 {
        let index = u64::from(set) * u64::from(self.layout.assoc()) + u64::from(way);
        self.layout.block_offset(index).unwrap_or(0) / SECTOR_SIZE
    }

    fn disk_sector(&self, block: u64, offset: usize) -> u64 {
        block * u64::from(self.geometry.block_sectors()) + offset as u64 / SECTOR_SIZE
    }

    /// Checks an I/O range and splits it into per-block pieces.
    fn pieces(&self, sector: u64, bytes: usize) -> Result<Pieces, CacheError> {
        let bad = |reason| Err(CacheError::BadRange { sector, bytes: bytes as u64, reason });
        if bytes == 0 {
            return bad("the length is zero");
        }
        let align = self.io_align_sectors.max(1);
        if !(bytes as u64).is_multiple_of(align * SECTOR_SIZE) {
            return bad("the length is not a multiple of the devices' logical block size");
        }
        if !sector.is_multiple_of(align) {
            return bad("the start is not aligned to the devices' logical block size");
        }
        let end = sector.checked_add(bytes as u64 / SECTOR_SIZE);
        if end.is_none_or(|end| end > self.io.disk.size_sectors()) {
            return bad("the range ends past the end of the disk");
        }
        let block_bytes = self.block_bytes() as u64;
        let start = sector * SECTOR_SIZE;
        let offset = start % block_bytes;
        if offset + bytes as u64 <= block_bytes {
            let block = start / block_bytes;
            return Ok(Pieces::One([Piece { block, offset: offset as usize, len: bytes, at: 0 }]));
        }
        let mut out = Vec::new();
        let mut at = 0u64;
        while at < bytes as u64 {
            let pos = start + at;
            let block = pos / block_bytes;
            let offset = pos % block_bytes;
            let len = (block_bytes - offset).min(bytes as u64 - at);
            out.push(Piece { block, offset: offset as usize, len: len as usize, at: at as usize });
            at += len;
        }
        Ok(Pieces::Many(out))
    }

    /// Whether misses of this I/O may be cached.
    fn cacheable(&self, sector: u64, bytes: usize, flags: IoFlags, write: bool) -> Cacheable {
        if flags.contains(IoFlags::NO_CACHE) || (!write && self.write_only) {
            return Cacheable::No;
        }
        let (cache_all, seq_kb) = {
            let t = self.tunables.read().unwrap_or_else(|e| e.into_inner());
            (t.cache_all, t.skip_seq_thresh_kb)
        };
        if cache_all == 0 && !flags.contains(IoFlags::CACHE) {
            return Cacheable::No;
        }
        if seq_kb > 0 {
            let mut seq = self.sequential.lock().unwrap_or_else(|e| e.into_inner());
            seq.set_threshold_kb(u64::from(seq_kb));
            if seq.observe(sector, bytes as u64 / SECTOR_SIZE) {
                return Cacheable::Sequential;
            }
        }
        Cacheable::Yes
    }

    fn count_uncached(&self, cacheable: Cacheable, write: bool) {
        let c = &self.counters;
        match (cacheable, write) {
            (Cacheable::Yes, _) => {}
            (Cacheable::No, false) => Counters::bump(&c.uncached_reads),
            (Cacheable::No, true) => Counters::bump(&c.uncached_writes),
            (Cacheable::Sequential, false) => Counters::bump(&c.uncached_sequential_reads),
            (Cacheable::Sequential, true) => Counters::bump(&c.uncached_sequential_writes),
        }
    }

    pub(crate) fn read(
        &self,
        sector: u64,
        buf: &mut [u8],
        flags: IoFlags,
    ) -> Result<(), CacheError> {
        self.check_can_block()?;
        let (pieces, cacheable) = self.begin(sector, buf.len(), flags, false)?;
        self.read_pieces(&pieces, cacheable, buf)
    }

    /// Checks a read or write, counts it and decides whether its misses are
    /// cached.
    pub(super) fn begin(
        &self,
        sector: u64,
        len: usize,
        flags: IoFlags,
        write: bool,
    ) -> Result<(Pieces, Cacheable), CacheError> {
        self.check_open()?;
        let pieces = self.pieces(sector, len)?;
        Counters::bump(if write { &self.counters.writes } else { &self.counters.reads });
        let cacheable = self.cacheable(sector, len, flags, write);
        self.count_uncached(cacheable, write);
        Ok((pieces, cacheable))
    }

    /// The blocking part of a read [`begin`](Self::begin) accepted.
    pub(super) fn read_pieces(
        &self,
        pieces: &[Piece],
        cacheable: Cacheable,
        buf: &mut [u8],
    ) -> Result<(), CacheError> {
        for &piece in pieces {
            self.read_piece(piece, cacheable, &mut buf[piece.at..piece.at + piece.len])?;
        }
        Ok(())
    }

    fn read_piece(&self, p: Piece, cacheable: Cacheable, out: &mut [u8]) -> Result<(), CacheError> {
        let (set, shard) = self.shard_of(p.block);
        let block_bytes = self.block_bytes();
        let mut access = Access::Shared;
        let mut cleaned_for_room = false;
        loop {
            if self.bypass.load(Ordering::Acquire) {
                let (_guard, st) =
                    BlockGuard::acquire(shard, p.block, Access::Shared, &self.counters);
                drop(st);
                return self.read_disk_piece(p, out);
            }
            let (guard, mut st) = BlockGuard::acquire(shard, p.block, access, &self.counters);
            if let Some(way) = st.lookup_locked(p.block) {
                Counters::bump(&self.counters.read_hits);
                let state = &mut *st;
                self.counters.add_moves(state.set.touch(&*state.policy, way));
                let dirty = st.set.state(way).contains(BlockState::DIRTY);
                drop(st);
                match self.io.read(
                    Device::Ssd,
                    self.ssd_sector(set, way),
                    block_bytes,
                    &self.counters,
                ) {
                    Ok(data) => {
                        out.copy_from_slice(&data[p.offset..p.offset + p.len]);
                        return Ok(());
                    }
                    // The only copy of the data is on the SSD.
                    Err(e) if dirty => return Err(e),
                    Err(_) => {
                        // A clean copy: drop it and serve the read from the disk.
                        self.ssd_error();
                        drop(guard);
                        self.invalidate_clean(shard, p.block, way);
                        continue;
                    }
                }
            }
            let fill = p.is_whole(block_bytes) && cacheable == Cacheable::Yes;
            if fill && access == Access::Shared {
                // Filling needs the block to itself; look again once we have it.
                access = Access::Exclusive;
                drop(st);
                drop(guard);
                continue;
            }
            if fill {
                let state = &mut *st;
                let allocation = state.set.allocate(&*state.policy, p.block);
                if let Some(way) = allocation.way() {
                    state.set.set_busy(way, true);
                    if matches!(allocation, Allocation::Replaced { .. }) {
                        Counters::bump(&self.counters.replacement);
                    }
                    drop(st);
                    let result = self.fill(set, way, p, out);
                    if result.is_err() {
                        self.invalidate_clean_locked(shard, p.block, way);
                    }
                    drop(guard);
                    return result.map(drop);
                }
                Counters::bump(&self.counters.no_room);
                if !cleaned_for_room && self.clean_on_miss(false) {
                    drop(st);
                    drop(guard);
                    cleaned_for_room = true;
                    if self.clean_for_room(set) {
                        continue;
                    }
                    // Nothing could be cleaned: read uncached.
                    let (_guard, st) =
                        BlockGuard::acquire(shard, p.block, Access::Shared, &self.counters);
                    drop(st);
                    return self.read_disk_piece(p, out);
                }
                self.cleaner.wake();
            }
            drop(st);
            let result = self.read_disk_piece(p, out);
            drop(guard);
            return result;
        }
    }

    /// A read miss: reads the block from the disk into `out`, then writes it to
    /// the SSD way. An SSD failure only drops the block (the read succeeded).
    fn fill(&self, set: u32, way: Way, p: Piece, out: &mut [u8]) -> Result<(), CacheError> {
        let data = self.io.read(
            Device::Disk,
            self.disk_sector(p.block, 0),
            self.block_bytes(),
            &self.counters,
        )?;
        out.copy_from_slice(&data[..]);
        match self.io.write(
            Device::Ssd,
            self.ssd_sector(set, way),
            DmIoMemory::Kmem(data),
            ReqFlags::empty(),
            &self.counters,
        ) {
            Ok(()) => {
                Counters::bump(&self.counters.read_fills);
                Ok(())
            }
            Err(_) => {
                self.ssd_error();
                // The caller drops the block; the read itself succeeded.
                let (_, shard) = self.shard_of(p.block);
                self.invalidate_clean_locked(shard, p.block, way);
                Ok(())
            }
        }
    }

    fn read_disk_piece(&self, p: Piece, out: &mut [u8]) -> Result<(), CacheError> {
        let data = self.io.read(
            Device::Disk,
            self.disk_sector(p.block, p.offset),
            p.len,
            &self.counters,
        )?;
        out.copy_from_slice(&data[..]);
        Ok(())
    }

    /// Drops `block` from `way` if it is still there and clean, taking the
    /// block's lock.
    pub(super) fn invalidate_clean(&self, shard: &Shard, block: u64, way: Way) {
        let (_guard, st) = BlockGuard::acquire(shard, block, Access::Exclusive, &self.counters);
        drop(st);
        self.invalidate_clean_locked(shard, block, way);
    }

    /// [`invalidate_clean`](Self::invalidate_clean) with the block's lock held.
    pub(super) fn invalidate_clean_locked(&self, shard: &Shard, block: u64, way: Way) {
        let mut st = shard.lock();
        let state = st.set.state(way);
        if st.set.block(way) == Some(block) && !state.contains(BlockState::DIRTY) {
            let s = &mut *st;
            if state.contains(BlockState::PINNED) {
                s.set.invalidate_held(&*s.policy, way);
            } else {
                s.set.invalidate(&*s.policy, way);
            }
        }
    }

    pub(crate) fn write(&self, sector: u64, data: &[u8], flags: IoFlags) -> Result<(), CacheError> {
        self.check_can_block()?;
        let (pieces, cacheable) = self.begin(sector, data.len(), flags, true)?;
        self.write_pieces(&pieces, cacheable, data, flags)
    }

    /// The blocking part of a write [`begin`](Self::begin) accepted.
    pub(super) fn write_pieces(
        &self,
        pieces: &[Piece],
        cacheable: Cacheable,
        data: &[u8],
        flags: IoFlags,
    ) -> Result<(), CacheError> {
        let mut changed = false;
        for &piece in pieces {
            let result = self.write_piece(piece, cacheable, &data[piece.at..piece.at + piece.len]);
            match result {
                Ok(dirtied) => changed |= dirtied.is_some(),
                Err(e) => {
                    // Blocks dirtied before the failure are pending already;
                    // in sync mode try to commit them before reporting it.
                    let _ = self.commit_if_sync();
                    return Err(e);
                }
            }
        }
        if changed {
            self.commit_if_sync()?;
        }
        if flags.contains(IoFlags::FUA) {
            self.commit_pending(true)?;
        }
        Ok(())
    }

    /// Writes one piece; returns the set whose slots it changed (a block made
    /// dirty), if any.
    fn write_piece(
        &self,
        p: Piece,
        cacheable: Cacheable,
        data: &[u8],
    ) -> Result<Option<u32>, CacheError> {
        let (set, shard) = self.shard_of(p.block);
        let block_bytes = self.block_bytes();
        let (guard, mut st) =
            BlockGuard::acquire(shard, p.block, Access::Exclusive, &self.counters);
        if self.bypass.load(Ordering::Acquire) {
            drop(st);
            return self.write_disk_piece(p, data).map(|()| None);
        }
        let hit = st.lookup_locked(p.block);
        if let Some(way) = hit {
            Counters::bump(&self.counters.write_hits);
            let s = &mut *st;
            self.counters.add_moves(s.set.touch(&*s.policy, way));
        }
        if self.mode == CacheMode::WriteAround {
            if let Some(way) = hit {
                Counters::bump(&self.counters.write_invalidates);
                if guard.waited() {
                    Counters::bump(&self.counters.pending_inval);
                }
                let s = &mut *st;
                if s.set.state(way).contains(BlockState::PINNED) {
                    s.set.invalidate_held(&*s.policy, way);
                } else {
                    s.set.invalidate(&*s.policy, way);
                }
            }
            drop(st);
            return self.write_disk_piece(p, data).map(|()| None);
        }
        let way = match hit {
            Some(way) => way,
            None if p.is_whole(block_bytes) && cacheable == Cacheable::Yes => {
                let mut cleaned_for_room = false;
                loop {
                    let s = &mut *st;
                    let allocation = s.set.allocate(&*s.policy, p.block);
                    if let Some(way) = allocation.way() {
                        s.set.set_busy(way, true);
                        if matches!(allocation, Allocation::Replaced { .. }) {
                            Counters::bump(&self.counters.write_replacement);
                        }
                        break way;
                    }
                    Counters::bump(&self.counters.no_room);
                    drop(st);
                    if !cleaned_for_room && self.clean_on_miss(true) && self.clean_for_room(set) {
                        // This block's lock is still ours; try once more.
                        cleaned_for_room = true;
                        st = shard.lock();
                        continue;
                    }
                    self.cleaner.wake();
                    return self.write_disk_piece(p, data).map(|()| None);
                }
            }
            None => {
                drop(st);
                return self.write_disk_piece(p, data).map(|()| None);
            }
        };
        let was_dirty = st.set.state(way).contains(BlockState::DIRTY);
        drop(st);
        let ssd_sector = self.ssd_sector(set, way);
        // The whole block as it should be after the write.
        let block = if p.is_whole(block_bytes) {
            AlignedBuf::from_slice(data)
        } else {
            match self.io.read(Device::Ssd, ssd_sector, block_bytes, &self.counters) {
                Ok(mut old) => {
                    old[p.offset..p.offset + p.len].copy_from_slice(data);
                    old
                }
                Err(e) if was_dirty => return Err(e),
                Err(_) => {
                    self.ssd_error();
                    self.invalidate_clean_locked(shard, p.block, way);
                    return self.write_disk_piece(p, data).map(|()| None);
                }
            }
        };
        if self.mode == CacheMode::WriteThrough {
            let outcome = self.io.write_both(
                self.disk_sector(p.block, 0),
                ssd_sector,
                block,
                ReqFlags::empty(),
                &self.counters,
            );
            let outcome = match outcome {
                Ok(o) => o,
                Err(e) => {
                    self.invalidate_clean_locked(shard, p.block, way);
                    return Err(e);
                }
            };
            if outcome.ssd.is_some() {
                self.ssd_error();
                self.invalidate_clean_locked(shard, p.block, way);
            }
            if let Some(e) = outcome.disk {
                self.invalidate_clean_locked(shard, p.block, way);
                return Err(e);
            }
            drop(guard);
            return Ok(None);
        }
        // Write-back.
        if let Err(e) = self.io.write(
            Device::Ssd,
            ssd_sector,
            DmIoMemory::Kmem(block),
            ReqFlags::empty(),
            &self.counters,
        ) {
            // A clean copy is dropped (the disk still has the old data, and the
            // write failed); a dirty one stays, as the only copy there is.
            self.invalidate_clean_locked(shard, p.block, way);
            return Err(e);
        }
        let mut st = shard.lock();
        if was_dirty {
            Counters::bump(&self.counters.dirty_write_hits);
            return Ok(None);
        }
        st.set.mark_dirty(way);
        self.note_slots_changed(set);
        Counters::bump(&self.counters.metadata_dirties);
        let over = {
            let t = self.tunables.read().unwrap_or_else(|e| e.into_inner());
            st.set.nr_dirty() > t.dirty_thresh_blocks(self.layout.assoc())
        };
        drop(st);
        drop(guard);
        if over {
            self.cleaner.wake();
        }
        Ok(Some(set))
    }

    /// Whether a miss that finds its set full of dirty blocks cleans some
    /// first (`clean_on_read_miss` / `clean_on_write_miss`, write-back only).
    fn clean_on_miss(&self, write: bool) -> bool {
        if self.mode != CacheMode::WriteBack {
            return false;
        }
        let t = self.tunables.read().unwrap_or_else(|e| e.into_inner());
        (if write { t.clean_on_write_miss } else { t.clean_on_read_miss }) == 1
    }

    fn write_disk_piece(&self, p: Piece, data: &[u8]) -> Result<(), CacheError> {
        self.io.write(
            Device::Disk,
            self.disk_sector(p.block, p.offset),
            DmIoMemory::Kmem(AlignedBuf::from_slice(data)),
            ReqFlags::empty(),
            &self.counters,
        )
    }

    pub(crate) fn discard(&self, sector: u64, sectors: u64) -> Result<(), CacheError> {
        self.check_can_block()?;
        self.check_open()?;
        let bytes = usize::try_from(sectors.saturating_mul(SECTOR_SIZE)).unwrap_or(usize::MAX);
        let pieces = self.pieces(sector, bytes)?;
        Counters::bump(&self.counters.discards);
        let block_bytes = self.block_bytes();
        let mut changed = false;
        for p in pieces.iter().copied().filter(|p| p.is_whole(block_bytes)) {
            let (set, shard) = self.shard_of(p.block);
            let (guard, mut st) =
                BlockGuard::acquire(shard, p.block, Access::Exclusive, &self.counters);
            let Some(way) = st.lookup_locked(p.block) else { continue };
            Counters::bump(&self.counters.discarded_blocks);
            if guard.waited() {
                Counters::bump(&self.counters.pending_inval);
            }
            let s = &mut *st;
            let state = s.set.state(way);
            if state.intersects(BlockState::DIRTY | BlockState::PINNED) {
                // Its durable slot may say dirty: keep the way until a commit.
                s.set.invalidate_held(&*s.policy, way);
                self.note_slots_changed(set);
                changed = true;
            } else {
                s.set.invalidate(&*s.policy, way);
            }
        }
        if changed {
            self.commit_if_sync()?;
        }
        self.io.discard_disk(sector, sectors)
    }
}
