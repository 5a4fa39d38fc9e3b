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

/// Lock-table entries kept inside the set's own bookkeeping, next to its
/// mutex: taking and releasing a block lock then touches no other memory
/// (a separate heap vector was one more cache miss per I/O).
const INLINE_LOCKS: usize = 4;

/// An unused inline entry (no disk block number reaches it: blocks are
/// sectors / 8 at most).
const NO_BLOCK: u64 = u64::MAX;

/// Where a block's entry sits in a [`LockTable`].
#[derive(Clone, Copy)]
enum Entry {
    Inline(usize),
    Spilled(usize),
}

/// The locked disk blocks of one set. Few blocks of a set are locked at any
/// time (the I/O in flight to it, plus the runs being cleaned), so a short
/// table scanned linearly beats a hash map: no hashing, and the first
/// [`INLINE_LOCKS`] entries live inline; more spill into a vector.
#[repr(C)]
struct LockTable {
    inline: [(u64, BlockLock); INLINE_LOCKS],
    spilled: Vec<(u64, BlockLock)>,
}

impl Default for LockTable {
    fn default() -> Self {
        LockTable { inline: [(NO_BLOCK, BlockLock::default()); INLINE_LOCKS], spilled: Vec::new() }
    }
}

impl LockTable {
    fn position(&self, block: u64) -> Option<Entry> {
        if let Some(i) = self.inline.iter().position(|(b, _)| *b == block) {
            return Some(Entry::Inline(i));
        }
        self.spilled.iter().position(|(b, _)| *b == block).map(Entry::Spilled)
    }

    fn at(&mut self, entry: Entry) -> &mut BlockLock {
        match entry {
            Entry::Inline(i) => &mut self.inline[i].1,
            Entry::Spilled(i) => &mut self.spilled[i].1,
        }
    }

    fn get(&self, block: u64) -> BlockLock {
        match self.position(block) {
            Some(Entry::Inline(i)) => self.inline[i].1,
            Some(Entry::Spilled(i)) => self.spilled[i].1,
            None => BlockLock::default(),
        }
    }

    fn contains(&self, block: u64) -> bool {
        self.position(block).is_some()
    }

    fn get_mut(&mut self, block: u64) -> Option<&mut BlockLock> {
        let entry = self.position(block)?;
        Some(self.at(entry))
    }

    /// `block`'s entry, added unlocked if missing.
    fn entry(&mut self, block: u64) -> &mut BlockLock {
        let entry = match self.position(block) {
            Some(entry) => entry,
            None => match self.inline.iter().position(|(b, _)| *b == NO_BLOCK) {
                Some(i) => {
                    self.inline[i] = (block, BlockLock::default());
                    Entry::Inline(i)
                }
                None => {
                    self.spilled.push((block, BlockLock::default()));
                    Entry::Spilled(self.spilled.len() - 1)
                }
            },
        };
        self.at(entry)
    }

    fn remove(&mut self, block: u64) {
        match self.position(block) {
            Some(Entry::Inline(i)) => self.inline[i] = (NO_BLOCK, BlockLock::default()),
            Some(Entry::Spilled(i)) => {
                self.spilled.swap_remove(i);
            }
            None => {}
        }
    }
}

/// A set's bookkeeping, behind the shard's mutex. In declaration order
/// (`repr(C)`), so that what a hit touches (the inline lock entries, then the
/// set's pointers) follows the mutex word in the same few cache lines.
#[repr(C)]
pub(crate) struct SetState {
    /// Locked disk blocks of this set (cached or not).
    locks: LockTable,
    /// The blocks, their states and the replacement lists.
    pub(crate) set: CacheSet,
    /// The set's replacement policy (switchable at run time).
    pub(crate) policy: Box<dyn Replacement>,
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

    /// Takes the lock of `block`, cached at `way` (just looked up, under this
    /// same guard), for `access` without waiting, if it is free for it (for
    /// I/O served from a dm-io callback, which may never wait: a busy block
    /// goes the blocking way instead). Knowing the way saves a second walk of
    /// the lookup chain, a cache miss on a large cache.
    pub(crate) fn try_lock_cached(&mut self, block: u64, way: Way, access: Access) -> bool {
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
        self.set.set_busy(way, true);
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
/// the set's slots can never land after a newer one). Aligned to a cache
/// line, so that a set's hot fields never straddle one more line than needed.
#[repr(C, align(64))]
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
    /// set's bookkeeping still locked, and whether it had to wait (counted in
    /// `pending_enqueues`).
    pub(crate) fn acquire(
        &self,
        block: u64,
        access: Access,
        counters: &Counters,
    ) -> (MutexGuard<'_, SetState>, bool) {
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
                return (state, counted);
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

    /// [`release_cached`](Self::release_cached) with the bookkeeping locked.
    pub(crate) fn release_cached_locked(
        &self,
        state: &mut SetState,
        block: u64,
        way: Way,
        access: Access,
    ) {
        self.release_at(state, block, Some(way), access);
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
    /// Whether taking the lock waited for I/O in progress on the block.
    waited: bool,
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
        let (state, waited) = shard.acquire(block, access, counters);
        (BlockGuard { shard, block, access, waited }, state)
    }

    /// A guard for a lock already taken with [`SetState::try_lock_exclusive`].
    pub(crate) fn adopt(shard: &'a Shard, block: u64) -> BlockGuard<'a> {
        BlockGuard { shard, block, access: Access::Exclusive, waited: false }
    }

    /// Whether taking the lock had to wait for I/O in progress on the block
    /// (an I/O that then invalidates the block counts as flashcache's
    /// `pending_inval`).
    pub(crate) fn waited(&self) -> bool {
        self.waited
    }
}

impl Drop for BlockGuard<'_> {
    fn drop(&mut self) {
        self.shard.release(self.block, self.access);
    }
}

#[cfg(test)]
mod lock_table_tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::{BlockLock, LockTable};

    proptest! {
        /// The table (inline entries, then spilled ones) behaves as a map from
        /// block to lock state, whatever the order of adds and removes.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((0u64..10, 0u8..3), 1..200)) {
            let mut table = LockTable::default();
            let mut model: HashMap<u64, (u32, bool)> = HashMap::new();
            for (block, op) in ops {
                match op {
                    0 => {
                        table.entry(block).readers += 1;
                        model.entry(block).or_default().0 += 1;
                    }
                    1 => {
                        table.entry(block).writer = true;
                        model.entry(block).or_default().1 = true;
                    }
                    _ => {
                        table.remove(block);
                        model.remove(&block);
                    }
                }
                for b in 0..10 {
                    let BlockLock { readers, writer } = table.get(b);
                    let want = model.get(&b).copied();
                    prop_assert_eq!(table.contains(b), want.is_some());
                    prop_assert_eq!((readers, writer), want.unwrap_or_default());
                }
            }
        }
    }
}
