//! Hits served natively from dm-io: the SSD I/O of a cached block is submitted
//! with a notify callback, and the caller's callback runs from it on the dm-io
//! completion thread. No worker thread is involved and nothing waits.
//!
//! A hit goes this way only when it can be started without waiting: the
//! block's lock is taken with `try_lock_cached`, and the dm-io request with
//! `try_submit`. Anything else is declined and handed back, to run on the
//! cache's worker pool with the blocking code, which behaves the same way.
//! The completion side only takes the set's mutex (held for bookkeeping,
//! never across I/O), so it never waits for I/O either. Work that would wait
//! (dropping a clean block after an SSD read error, which takes the block's
//! lock, then reading the disk) goes to the pool.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use dmio::{AlignedBuf, DmIoCompletion, DmIoMemory, DmIoRequest, SECTOR_SIZE};

use super::async_io::{InFlight, IoNotify, Job, refuse};
use super::error::CacheError;
use super::io_path::{Cacheable, Piece};
use super::shard::Access;
use crate::format::{CacheMode, CommitMode};
use crate::policy::{BlockState, Counters, Way};

/// A declined request, handed back whole.
pub(super) type Declined = Box<(InFlight, AlignedBuf, IoNotify)>;

/// What a submitted hit's dm-io callback needs: the request and its callback.
/// It sits behind a mutex shared with the submitter so that a request dm-io
/// refuses (its full reserve, seen from the completion thread) can be taken
/// back and run on the pool instead.
type Handoff = Arc<Mutex<Option<(InFlight, IoNotify)>>>;

fn take(handoff: &Handoff) -> Option<(InFlight, IoNotify)> {
    handoff.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// The caller's buffer out of a completed request (dm-io hands back the
/// memory it was given: the copy is only a fallback).
fn buffer_of(memory: Option<DmIoMemory>, len: usize) -> AlignedBuf {
    match memory {
        Some(DmIoMemory::Kmem(buf)) => buf,
        other => {
            let mut buf = AlignedBuf::new(len);
            if let Some(m) = other {
                m.copy_to_slice(0, &mut buf[..]);
            }
            buf
        }
    }
}

impl InFlight {
    /// Starts a read of one piece natively if its block is cached and not
    /// locked exclusively; otherwise hands it back.
    pub(super) fn try_read_hit(
        self,
        p: Piece,
        cacheable: Cacheable,
        buf: AlignedBuf,
        notify: IoNotify,
    ) -> Result<(), Declined> {
        let inner = self.inner.clone();
        if inner.bypass.load(Ordering::Acquire) {
            return Err(Box::new((self, buf, notify)));
        }
        let (set, shard) = inner.shard_of(p.block);
        let (way, dirty) = {
            let mut st = shard.lock();
            let Some(way) = st.set.lookup(p.block) else {
                return Err(Box::new((self, buf, notify)));
            };
            if !st.try_lock_cached(p.block, way, Access::Shared) {
                return Err(Box::new((self, buf, notify)));
            }
            let s = &mut *st;
            inner.counters.add_moves(s.set.touch(&*s.policy, way));
            (way, s.set.state(way).contains(BlockState::DIRTY))
        };
        let sector = inner.ssd_sector(set, way) + p.offset as u64 / SECTOR_SIZE;
        let done = move |request: InFlight, notify, done| {
            request.read_hit_done(p, cacheable, way, dirty, sector, done, notify);
        };
        self.submit_hit(p, Access::Shared, sector, buf, notify, done)
    }

    /// Submits the SSD I/O of a hit whose block this request has locked for
    /// `access` (shared: a read into `buf`; exclusive: a write of it), with
    /// `done` run from its dm-io callback. Counts the hit once submitted (a
    /// declined hit is counted by the blocking path that serves it). A request
    /// dm-io refuses lets go of the lock and comes back whole.
    fn submit_hit(
        self,
        p: Piece,
        access: Access,
        sector: u64,
        buf: AlignedBuf,
        notify: IoNotify,
        done: impl FnOnce(InFlight, IoNotify, DmIoCompletion) + Send + 'static,
    ) -> Result<(), Declined> {
        let inner = self.inner.clone();
        let handoff: Handoff = Arc::new(Mutex::new(Some((self, notify))));
        let theirs = handoff.clone();
        let on_complete = move |completion: DmIoCompletion| {
            if let Some((request, notify)) = take(&theirs) {
                done(request, notify, completion);
            }
        };
        let (req, hits) = match access {
            Access::Shared => (DmIoRequest::read(buf), &inner.counters.read_hits),
            Access::Exclusive => (DmIoRequest::write(buf), &inner.counters.write_hits),
        };
        match inner.io.submit_ssd(sector, req.on_complete(on_complete), &inner.counters) {
            Ok(()) => {
                Counters::bump(hits);
                Ok(())
            }
            Err(refused) => {
                let (_, shard) = inner.shard_of(p.block);
                shard.release(p.block, access);
                let buf = buffer_of(refused.request.memory, p.len);
                match take(&handoff) {
                    Some((request, notify)) => Err(Box::new((request, buf, notify))),
                    // Unreachable: the callback of a refused request never runs.
                    None => Ok(()),
                }
            }
        }
    }

    /// The dm-io callback of a native read hit.
    #[allow(clippy::too_many_arguments)]
    fn read_hit_done(
        self,
        p: Piece,
        cacheable: Cacheable,
        way: Way,
        dirty: bool,
        sector: u64,
        mut done: DmIoCompletion,
        notify: IoNotify,
    ) {
        let inner = self.inner.clone();
        let buf = buffer_of(done.memory.take(), p.len);
        let (_, shard) = inner.shard_of(p.block);
        shard.release_cached(p.block, way, Access::Shared);
        match inner.io.ssd_completion_error(false, sector, &done, &inner.counters) {
            None => {
                notify(Ok(()), buf);
                drop(self);
            }
            // The only copy of the data is on the SSD.
            Some(e) if dirty => {
                notify(Err(e), buf);
                drop(self);
            }
            Some(_) => {
                // A clean copy: drop it and read the disk, as the blocking
                // path does; both wait, so on the pool.
                inner.ssd_error();
                let mut buf = buf;
                let job: Job = Box::new(move |run: bool| {
                    let result = if run {
                        let (_, shard) = self.inner.shard_of(p.block);
                        self.inner.invalidate_clean(shard, p.block, way);
                        self.inner.read_pieces(&[p], cacheable, &mut buf)
                    } else {
                        Err(CacheError::ShutDown)
                    };
                    notify(result, buf);
                    drop(self);
                });
                if let Err(job) = inner.async_state.submit(job) {
                    refuse(job);
                }
            }
        }
    }

    /// Starts a whole-block write-back write natively if the block is cached,
    /// unlocked, and the write changes no slot that must be committed before
    /// it completes (`sync` commit mode and a clean block); otherwise hands it
    /// back.
    pub(super) fn try_write_hit(
        self,
        p: Piece,
        data: AlignedBuf,
        notify: IoNotify,
    ) -> Result<(), Declined> {
        let inner = self.inner.clone();
        if inner.mode != CacheMode::WriteBack
            || !p.is_whole(inner.block_bytes())
            || inner.bypass.load(Ordering::Acquire)
        {
            return Err(Box::new((self, data, notify)));
        }
        let (set, shard) = inner.shard_of(p.block);
        let (way, was_dirty) = {
            let mut st = shard.lock();
            let Some(way) = st.set.lookup(p.block) else {
                return Err(Box::new((self, data, notify)));
            };
            let was_dirty = st.set.state(way).contains(BlockState::DIRTY);
            if (inner.commit_mode == CommitMode::Sync && !was_dirty)
                || !st.try_lock_cached(p.block, way, Access::Exclusive)
            {
                return Err(Box::new((self, data, notify)));
            }
            let s = &mut *st;
            inner.counters.add_moves(s.set.touch(&*s.policy, way));
            (way, was_dirty)
        };
        let sector = inner.ssd_sector(set, way);
        let done = move |request: InFlight, notify, done| {
            request.write_hit_done(p, set, way, was_dirty, sector, done, notify);
        };
        self.submit_hit(p, Access::Exclusive, sector, data, notify, done)
    }

    /// The dm-io callback of a native write hit: marks the block dirty (its
    /// slot is committed later, as for any on-flush write), or drops a clean
    /// copy the write failed to update.
    #[allow(clippy::too_many_arguments)]
    fn write_hit_done(
        self,
        p: Piece,
        set: u32,
        way: Way,
        was_dirty: bool,
        sector: u64,
        mut done: DmIoCompletion,
        notify: IoNotify,
    ) {
        let inner = self.inner.clone();
        let data = buffer_of(done.memory.take(), p.len);
        let (_, shard) = inner.shard_of(p.block);
        let error = inner.io.ssd_completion_error(true, sector, &done, &inner.counters);
        if error.is_some() {
            // A clean copy is dropped (the disk has the old data and the write
            // failed); a dirty one stays, the only copy there is.
            inner.invalidate_clean_locked(shard, p.block, way);
        }
        let mut over = false;
        {
            let mut st = shard.lock();
            if error.is_none() {
                if was_dirty {
                    Counters::bump(&inner.counters.dirty_write_hits);
                } else {
                    st.set.mark_dirty(way);
                    inner.note_slots_changed(set);
                    Counters::bump(&inner.counters.metadata_dirties);
                    let t = inner.tunables.read().unwrap_or_else(PoisonError::into_inner);
                    over = st.set.nr_dirty() > t.dirty_thresh_blocks(inner.layout.assoc());
                }
            }
            shard.release_locked(&mut st, p.block, Access::Exclusive);
        }
        if over {
            inner.cleaner.wake();
        }
        notify(error.map_or(Ok(()), Err), data);
        drop(self);
    }
}
