//! One set's share of the cache: its bookkeeping behind its own mutex, and
//! per-block locks so that I/O on one disk block never races another on the
//! same block (a read-miss fill against a write, a write against cleaning).
//!
//! Locks are per set, never global: I/O to different sets never waits on each
//! other. Within a set, a block lock is held across the block's I/O, while the
//! set's mutex is only held for bookkeeping (never across I/O).

use std::sync::{Condvar, Mutex, MutexGuard};

use crate::policy::{CacheSet, Counters, Replacement, Way};

/// Heap bytes of a set's boxed policy object (the largest policy, the
/// segmented LRU, holds two bytes of parameters; an allocation is at least 16).
pub(crate) const POLICY_BYTES: usize = 16;

/// How a block is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Reading the cached copy (many at once).
    Shared,
    /// Anything that changes the block's data or cache state: writes, fills,
    /// cleaning, invalidation, uncached disk I/O that must not race a fill.
    Exclusive,
}

/// The holders of one disk block's lock.
#[derive(Clone, Copy, Debug, Default)]
struct BlockLock {
    readers: u32,
    writer: bool,
}

/// The locked disk blocks of one set. Few blocks of a set are locked at any
/// time (the I/O in flight to it, plus the runs being cleaned), so a short
/// vector scanned linearly beats a hash map: one cache line, no hashing.
#[derive(Default)]
struct LockTable {
    held: Vec<(u64, BlockLock)>,
}

impl LockTable {
    fn position(&self, block: u64) -> Option<usize> {
        self.held.iter().position(|(b, _)| *b == block)
    }

    fn get(&self, block: u64) -> BlockLock {
        self.position(block).map(|i| self.held[i].1).unwrap_or_default()
    }

    fn contains(&self, block: u64) -> bool {
        self.position(block).is_some()
    }

    fn get_mut(&mut self, block: u64) -> Option<&mut BlockLock> {
        let i = self.position(block)?;
        Some(&mut self.held[i].1)
    }

    /// `block`'s entry, added unlocked if missing.
    fn entry(&mut self, block: u64) -> &mut BlockLock {
        let i = match self.position(block) {
            Some(i) => i,
            None => {
                self.held.push((block, BlockLock::default()));
                self.held.len() - 1
            }
        };
        &mut self.held[i].1
    }

    fn remove(&mut self, block: u64) {
        if let Some(i) = self.position(block) {
            self.held.swap_remove(i);
        }
    }
}

/// A set's bookkeeping, behind the shard's mutex.
pub(crate) struct SetState {
    /// The blocks, their states and the replacement lists.
    pub(crate) set: CacheSet,
    /// The set's replacement policy (switchable at run time).
    pub(crate) policy: Box<dyn Replacement>,
    /// Locked disk blocks of this set (cached or not).
    locks: LockTable,
    /// Threads waiting in [`Shard::acquire`] for a block lock of this set:
    /// releases only wake the condition variable when there are any (a
    /// wake-up is a system call, even with nobody to wake).
    waiters: u32,
    /// Cleaning writes in flight for this set.
    pub(crate) clean_ios: u32,
}

impl SetState {
    /// Takes `block`'s lock without waiting, if free (for cleaning, which skips
    /// busy blocks rather than waiting for them).
    pub(crate) fn try_lock_exclusive(&mut self, block: u64) -> bool {
        if self.locks.contains(block) {
            return false;
        }
        *self.locks.entry(block) = BlockLock { readers: 0, writer: true };
        self.mark_busy(block, true);
        true
    }

    /// Takes `block`'s lock for `access` without waiting, if it is free for
    /// it (for I/O served from a dm-io callback, which may never wait: a busy
    /// block goes the blocking way instead).
    pub(crate) fn try_lock(&mut self, block: u64, access: Access) -> bool {
        let entry = self.locks.entry(block);
        let free = match access {
            Access::Shared => !entry.writer,
            Access::Exclusive => !entry.writer && entry.readers == 0,
        };
        if !free {
            return false;
        }
        match access {
            Access::Shared => entry.readers += 1,
            Access::Exclusive => entry.writer = true,
        }
        self.mark_busy(block, true);
        true
    }

    fn mark_busy(&mut self, block: u64, busy: bool) {
        if let Some(way) = self.set.lookup(block) {
            self.set.set_busy(way, busy);
        }
    }

    /// The way holding `block`, if cached; marks it busy when a lock is held on
    /// the block (a block allocated while locked becomes busy here).
    pub(crate) fn lookup_locked(&mut self, block: u64) -> Option<Way> {
        let way = self.set.lookup(block)?;
        if self.locks.contains(block) {
            self.set.set_busy(way, true);
        }
        Some(way)
    }
}

/// One set: bookkeeping, a condition variable for block-lock waiters, and a
/// mutex that serializes the set's metadata commits (so an older snapshot of
/// the set's slots can never land after a newer one).
pub(crate) struct Shard {
    state: Mutex<SetState>,
    released: Condvar,
    pub(crate) commit: Mutex<()>,
}

impl Shard {
    pub(crate) fn new(set: CacheSet, policy: Box<dyn Replacement>) -> Shard {
        Shard {
            state: Mutex::new(SetState {
                set,
                policy,
                locks: LockTable::default(),
                waiters: 0,
                clean_ios: 0,
            }),
            released: Condvar::new(),
            commit: Mutex::new(()),
        }
    }

    /// The set's bookkeeping. A poisoned mutex is taken over: every update
    /// under it is a few field writes that leave the set consistent.
    pub(crate) fn lock(&self) -> MutexGuard<'_, SetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The commit mutex.
    pub(crate) fn lock_commit(&self) -> MutexGuard<'_, ()> {
        self.commit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `block` can be locked for `access`, locks it, and returns the
    /// set's bookkeeping still locked. Counts a `pending_enqueues` when it had
    /// to wait.
    pub(crate) fn acquire(
        &self,
        block: u64,
        access: Access,
        counters: &Counters,
    ) -> MutexGuard<'_, SetState> {
        let mut state = self.lock();
        let mut counted = false;
        loop {
            let held = state.locks.get(block);
            let free = match access {
                Access::Shared => !held.writer,
                Access::Exclusive => !held.writer && held.readers == 0,
            };
            if free {
                let entry = state.locks.entry(block);
                match access {
                    Access::Shared => entry.readers += 1,
                    Access::Exclusive => entry.writer = true,
                }
                state.mark_busy(block, true);
                return state;
            }
            if !counted {
                Counters::bump(&counters.pending_enqueues);
                counted = true;
            }
            state.waiters += 1;
            state = self.released.wait(state).unwrap_or_else(|e| e.into_inner());
            state.waiters -= 1;
        }
    }

    /// Releases one hold of `block`'s lock (with the bookkeeping locked).
    pub(crate) fn release_locked(&self, state: &mut SetState, block: u64, access: Access) {
        self.release_at(state, block, None, access);
    }

    /// [`release_locked`](Self::release_locked) of a block known to be cached
    /// at `way` (checked): clearing its busy bit then needs no lookup.
    pub(crate) fn release_cached(&self, block: u64, way: Way, access: Access) {
        let mut state = self.lock();
        self.release_at(&mut state, block, Some(way), access);
    }

    fn release_at(&self, state: &mut SetState, block: u64, way: Option<Way>, access: Access) {
        let Some(entry) = state.locks.get_mut(block) else { return };
        match access {
            Access::Shared => entry.readers = entry.readers.saturating_sub(1),
            Access::Exclusive => entry.writer = false,
        }
        if entry.readers == 0 && !entry.writer {
            state.locks.remove(block);
            match way {
                Some(way) if state.set.block(way) == Some(block) => state.set.set_busy(way, false),
                _ => state.mark_busy(block, false),
            }
        }
        // Waiters count themselves under the mutex held here: none is missed.
        if state.waiters > 0 {
            self.released.notify_all();
        }
    }

    /// Releases one hold of `block`'s lock.
    pub(crate) fn release(&self, block: u64, access: Access) {
        let mut state = self.lock();
        self.release_locked(&mut state, block, access);
    }
}

/// A held block lock, released on drop (so every error path lets go).
pub(crate) struct BlockGuard<'a> {
    shard: &'a Shard,
    block: u64,
    access: Access,
}

impl<'a> BlockGuard<'a> {
    /// Takes `block`'s lock, waiting as needed, and returns the guard and the
    /// set's bookkeeping (still locked: drop it before any I/O).
    pub(crate) fn acquire(
        shard: &'a Shard,
        block: u64,
        access: Access,
        counters: &Counters,
    ) -> (BlockGuard<'a>, MutexGuard<'a, SetState>) {
        let state = shard.acquire(block, access, counters);
        (BlockGuard { shard, block, access }, state)
    }

    /// A guard for a lock already taken with [`SetState::try_lock_exclusive`].
    pub(crate) fn adopt(shard: &'a Shard, block: u64) -> BlockGuard<'a> {
        BlockGuard { shard, block, access: Access::Exclusive }
    }
}

impl Drop for BlockGuard<'_> {
    fn drop(&mut self) {
        self.shard.release(self.block, self.access);
    }
}
