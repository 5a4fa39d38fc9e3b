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

use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use dmio::{
    AlignedBuf, CompletionState, DmIoCompletion, DmIoMemory, DmIoRequest, Notify, SECTOR_SIZE,
};

use super::Inner;
use super::async_io::{InFlight, IoNotify, Job, refuse};
use super::error::CacheError;
use super::io_path::{Cacheable, Piece};
use super::shard::Access;
use crate::format::{CacheMode, CommitMode};
use crate::policy::{BlockState, Counters, Way};

/// A declined request, handed back whole.
pub(super) type Declined = Box<(InFlight, AlignedBuf, IoNotify)>;

/// A native hit in flight: what its dm-io completion needs. It travels as the
/// dm-io request's notify state ([`Notify::with_state`]), so a request dm-io
/// refuses (its full reserve, seen from the completion thread) gives it back
/// by value, to run on the pool instead: no lock or shared cell per hit.
struct HitInFlight {
    request: InFlight,
    notify: IoNotify,
    p: Piece,
    way: Way,
    sector: u64,
    kind: HitKind,
}

/// What kind of hit, with what its completion needs to know.
enum HitKind {
    Read { cacheable: Cacheable, dirty: bool },
    Write { set: u32, was_dirty: bool },
}

impl HitKind {
    fn access(&self) -> Access {
        match self {
            HitKind::Read { .. } => Access::Shared,
            HitKind::Write { .. } => Access::Exclusive,
        }
    }
}

impl CompletionState for HitInFlight {
    fn complete(self: Box<Self>, done: DmIoCompletion) {
        let HitInFlight { request, notify, p, way, sector, kind } = *self;
        match kind {
            HitKind::Read { cacheable, dirty } => {
                request.read_hit_done(p, cacheable, way, dirty, sector, done, notify);
            }
            HitKind::Write { set, was_dirty } => {
                request.write_hit_done(p, set, way, was_dirty, sector, done, notify);
            }
        }
    }
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
    /// locked exclusively; otherwise hands it back. `inner` is the cache this
    /// request belongs to (the caller's reference: the request moves into its
    /// dm-io callback).
    pub(super) fn try_read_hit(
        self,
        inner: &Inner,
        p: Piece,
        cacheable: Cacheable,
        buf: AlignedBuf,
        notify: IoNotify,
    ) -> Result<(), Declined> {
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
        let kind = HitKind::Read { cacheable, dirty };
        let hit = HitInFlight { request: self, notify, p, way, sector, kind };
        submit_hit(inner, hit, buf)
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
        let buf = buffer_of(done.memory.take(), p.len);
        let inner = &*self.inner;
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
                let inner = self.inner.clone();
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
        inner: &Inner,
        p: Piece,
        data: AlignedBuf,
        notify: IoNotify,
    ) -> Result<(), Declined> {
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
        let kind = HitKind::Write { set, was_dirty };
        let hit = HitInFlight { request: self, notify, p, way, sector, kind };
        submit_hit(inner, hit, data)
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
        let data = buffer_of(done.memory.take(), p.len);
        let inner = &*self.inner;
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
            // At the known way: no second walk of the lookup chain (a cache
            // miss); the check there copes with a block dropped above.
            shard.release_cached_locked(&mut st, p.block, way, Access::Exclusive);
        }
        if over {
            inner.cleaner.wake();
        }
        notify(error.map_or(Ok(()), Err), data);
        drop(self);
    }
}

/// Submits the SSD I/O of a hit whose block `hit.request` has locked (shared:
/// a read into `buf`; exclusive: a write of it), completed by
/// [`HitInFlight::complete`] from its dm-io callback. Counts the hit once
/// submitted (a declined hit is counted by the blocking path that serves it).
/// A request dm-io refuses lets go of the lock and comes back whole.
fn submit_hit(inner: &Inner, hit: HitInFlight, buf: AlignedBuf) -> Result<(), Declined> {
    let (block, way, len, sector) = (hit.p.block, hit.way, hit.p.len, hit.sector);
    let access = hit.kind.access();
    let (req, hits) = match access {
        Access::Shared => (DmIoRequest::read(buf), &inner.counters.read_hits),
        Access::Exclusive => (DmIoRequest::write(buf), &inner.counters.write_hits),
    };
    let req = req.with_notify(Notify::with_state(hit));
    match inner.io.submit_ssd(sector, req, &inner.counters) {
        Ok(()) => {
            Counters::bump(hits);
            Ok(())
        }
        Err(refused) => {
            let (_, shard) = inner.shard_of(block);
            shard.release_cached(block, way, access);
            let mut request = refused.request;
            let buf = buffer_of(request.memory.take(), len);
            match request.notify.take().map(Notify::into_state::<HitInFlight>) {
                Some(Ok(hit)) => Err(Box::new((hit.request, buf, hit.notify))),
                // Unreachable: a refused request comes back with the notify it
                // was given, whose callback never ran.
                _ => Ok(()),
            }
        }
    }
}
