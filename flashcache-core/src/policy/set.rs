//! One cache set: its blocks' identities and states, a lookup table, and the
//! replacement policy's lists, in about 15 bytes per block.

use std::fmt;

use super::geometry::mix64;
use super::replacement::{ListMoves, Lists, Replacement, SetLinks};

/// A way (block slot) within a set.
pub type Way = u16;

/// "No way": the end of a list or chain.
pub const NIL: Way = Way::MAX;

/// The largest block number a set can hold (48 bits: 1 EiB of 4 KiB blocks).
pub const MAX_BLOCK: u64 = (1 << 48) - 1;

bitflags::bitflags! {
    /// The state of a cache block.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct BlockState: u8 {
        /// The block holds a disk block.
        const VALID = 1 << 0;
        /// The cached copy is newer than the disk's.
        const DIRTY = 1 << 1;
        /// I/O on the block is in progress (fill, write, cleaning): never a victim.
        const BUSY = 1 << 2;
        /// Untouched for one fallow period.
        const FALLOW_1 = 1 << 3;
        /// Untouched for two fallow periods: cleaned first when dirty.
        const FALLOW_2 = 1 << 4;
        /// The durable metadata still names this block's identity in a way a
        /// crash would load (dirty on the SSD): the way may not be reused for
        /// another disk block until that metadata is committed.
        const PINNED = 1 << 5;
    }
}

/// A block slot: 14 bytes. The links belong to the replacement policy (and, for
/// invalid slots, to the free list); `meta` holds the policy's per-block bits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    block: [u16; 3],
    pub(crate) prev: Way,
    pub(crate) next: Way,
    /// The next way in the same lookup bucket.
    chain: Way,
    state: u8,
    pub(crate) meta: u8,
}

impl Slot {
    const EMPTY: Slot = Slot { block: [0; 3], prev: NIL, next: NIL, chain: NIL, state: 0, meta: 0 };

    fn block(&self) -> u64 {
        u64::from(self.block[0]) | u64::from(self.block[1]) << 16 | u64::from(self.block[2]) << 32
    }

    fn set_block(&mut self, block: u64) {
        self.block = [block as u16, (block >> 16) as u16, (block >> 32) as u16];
    }

    pub(crate) fn state(&self) -> BlockState {
        BlockState::from_bits_retain(self.state)
    }

    fn set_state(&mut self, state: BlockState) {
        self.state = state.bits();
    }

    /// Whether the block may be evicted: valid, clean, idle and not pinned.
    pub(crate) fn evictable(&self) -> bool {
        let s = self.state();
        s.contains(BlockState::VALID)
            && !s.intersects(BlockState::DIRTY | BlockState::BUSY | BlockState::PINNED)
    }
}

/// The result of [`CacheSet::allocate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// An invalid way was used.
    Free(Way),
    /// A clean block was evicted to make room.
    Replaced {
        /// The way now holding the new block.
        way: Way,
        /// The disk block that was evicted.
        old_block: u64,
    },
    /// Every way is dirty, busy or pinned: the I/O goes uncached (flashcache's
    /// `noroom`).
    NoRoom,
    /// The block was cached already, in this way; nothing changed.
    AlreadyCached(Way),
}

impl Allocation {
    /// The way allocated, if any.
    pub fn way(self) -> Option<Way> {
        match self {
            Allocation::Free(way) | Allocation::Replaced { way, .. } => Some(way),
            Allocation::NoRoom | Allocation::AlreadyCached(_) => None,
        }
    }
}

/// One set of a set-associative cache: which disk block each way holds, block
/// states, a per-set lookup table and the replacement lists. Pure bookkeeping:
/// no I/O, no clock, no locking (the I/O layer locks each set on its own).
///
/// ```
/// use flashcache_core::policy::{Allocation, BlockState, CacheSet, PolicyKind};
/// let lru = PolicyKind::Lru.build();
/// let mut set = CacheSet::new(2);
/// let a = set.allocate(&*lru, 100).way().unwrap();
/// let b = set.allocate(&*lru, 200).way().unwrap();
/// set.touch(&*lru, a); // 100 is now the most recently used
/// assert_eq!(set.allocate(&*lru, 300), Allocation::Replaced { way: b, old_block: 200 });
/// assert_eq!(set.lookup(100), Some(a));
/// assert_eq!(set.lookup(200), None);
/// set.mark_dirty(a);
/// assert_eq!(set.nr_dirty(), 1);
/// assert!(set.state(a).contains(BlockState::DIRTY));
/// ```
pub struct CacheSet {
    slots: Box<[Slot]>,
    buckets: Box<[Way]>,
    free_head: Way,
    lists: Lists,
    nr_valid: u32,
    nr_dirty: u32,
}

impl CacheSet {
    /// An empty set of `ways` blocks (1 to 65535).
    ///
    /// # Panics
    ///
    /// Never for `ways` within that range; larger values are clamped.
    pub fn new(ways: usize) -> CacheSet {
        let ways = ways.clamp(1, usize::from(NIL));
        let buckets = (ways / 2).max(1).next_power_of_two();
        let mut slots = vec![Slot::EMPTY; ways].into_boxed_slice();
        // Every way starts on the free list, in order.
        for (i, slot) in slots.iter_mut().enumerate() {
            slot.next = if i + 1 < ways { (i + 1) as Way } else { NIL };
        }
        CacheSet {
            slots,
            buckets: vec![NIL; buckets].into_boxed_slice(),
            free_head: 0,
            lists: Lists::default(),
            nr_valid: 0,
            nr_dirty: 0,
        }
    }

    /// A set rebuilt from recovered metadata: each entry `(way, block, dirty)`
    /// puts `block` in `way`, valid and dirty or clean. Entries naming a way out
    /// of range, a way already used, a block already placed or a block above
    /// [`MAX_BLOCK`] are skipped and returned, so the caller can report them.
    /// Every other way is free; the policy sees the blocks in way order.
    ///
    /// ```
    /// use flashcache_core::policy::{CacheSet, PolicyKind};
    /// let fifo = PolicyKind::Fifo.build();
    /// let (set, rejected) = CacheSet::restore(4, &*fifo, &[(2, 70, true), (0, 9, false), (1, 70, false)]);
    /// assert_eq!((set.lookup(70), set.lookup(9), set.nr_dirty()), (Some(2), Some(0), 1));
    /// assert_eq!(rejected, vec![(1, 70, false)]);
    /// ```
    pub fn restore(
        ways: usize,
        policy: &dyn Replacement,
        entries: &[(Way, u64, bool)],
    ) -> (CacheSet, Vec<(Way, u64, bool)>) {
        let mut set = CacheSet::new(ways);
        let mut rejected = Vec::new();
        for &(way, block, dirty) in entries {
            let usable = usize::from(way) < set.slots.len()
                && block <= MAX_BLOCK
                && !set.slots[usize::from(way)].state().contains(BlockState::VALID)
                && set.lookup(block).is_none();
            if !usable {
                rejected.push((way, block, dirty));
                continue;
            }
            let bucket = set.bucket(block);
            let slot = &mut set.slots[usize::from(way)];
            slot.set_block(block);
            slot.set_state(if dirty {
                BlockState::VALID | BlockState::DIRTY
            } else {
                BlockState::VALID
            });
            slot.chain = set.buckets[bucket];
            set.buckets[bucket] = way;
            set.nr_valid += 1;
            set.nr_dirty += u32::from(dirty);
        }
        // The free list: every invalid way, in way order.
        set.free_head = NIL;
        for i in (0..set.slots.len()).rev() {
            let slot = &mut set.slots[i];
            slot.prev = NIL;
            if slot.state().contains(BlockState::VALID) {
                slot.next = NIL;
            } else {
                slot.next = set.free_head;
                set.free_head = i as Way;
            }
        }
        let valid: Vec<Way> = set.valid_ways().collect();
        for way in valid {
            policy.inserted(&mut set.links(), way);
        }
        (set, rejected)
    }

    /// Bytes of memory the index of a set of `ways` blocks takes: the slots and
    /// the lookup buckets (per-set constants not included).
    pub fn index_bytes(ways: usize) -> usize {
        let buckets = (ways / 2).max(1).next_power_of_two();
        ways * std::mem::size_of::<Slot>() + buckets * std::mem::size_of::<Way>()
    }

    /// The number of ways.
    pub fn ways(&self) -> usize {
        self.slots.len()
    }

    /// Valid blocks.
    pub fn nr_valid(&self) -> u32 {
        self.nr_valid
    }

    /// Dirty blocks.
    pub fn nr_dirty(&self) -> u32 {
        self.nr_dirty
    }

    fn bucket(&self, block: u64) -> usize {
        (mix64(block) as usize) & (self.buckets.len() - 1)
    }

    /// The way holding disk block `block`, if cached.
    pub fn lookup(&self, block: u64) -> Option<Way> {
        let mut way = self.buckets[self.bucket(block)];
        while way != NIL {
            let slot = &self.slots[usize::from(way)];
            if slot.block() == block {
                return Some(way);
            }
            way = slot.chain;
        }
        None
    }

    /// The disk block a way holds, if valid.
    pub fn block(&self, way: Way) -> Option<u64> {
        let slot = self.slots.get(usize::from(way))?;
        slot.state().contains(BlockState::VALID).then(|| slot.block())
    }

    /// A way's state (empty for an invalid or out-of-range way).
    pub fn state(&self, way: Way) -> BlockState {
        self.slots.get(usize::from(way)).map(Slot::state).unwrap_or_default()
    }

    /// Records a hit on `way`: tells the policy and clears the fallow bits.
    /// Returns what the policy moved between its lists.
    pub fn touch(&mut self, policy: &dyn Replacement, way: Way) -> ListMoves {
        let Some(slot) = self.slots.get_mut(usize::from(way)) else {
            return ListMoves::default();
        };
        if !slot.state().contains(BlockState::VALID) {
            return ListMoves::default();
        }
        let state = slot.state() - (BlockState::FALLOW_1 | BlockState::FALLOW_2);
        slot.set_state(state);
        policy.accessed(&mut self.links(), way)
    }

    /// Finds a way for disk block `block`: an invalid way first, else the
    /// policy's victim among clean, idle, unpinned blocks. The way becomes a
    /// valid, clean block for `block`. A block already cached is left alone
    /// ([`Allocation::AlreadyCached`]). Blocks above [`MAX_BLOCK`] are refused
    /// ([`Allocation::NoRoom`]).
    pub fn allocate(&mut self, policy: &dyn Replacement, block: u64) -> Allocation {
        if let Some(way) = self.lookup(block) {
            return Allocation::AlreadyCached(way);
        }
        if block > MAX_BLOCK {
            return Allocation::NoRoom;
        }
        let allocation = if self.free_head != NIL {
            let way = self.free_head;
            self.free_head = self.slots[usize::from(way)].next;
            Allocation::Free(way)
        } else {
            self.evict_victim(policy)
        };
        let Some(way) = allocation.way() else { return Allocation::NoRoom };
        let slot = &mut self.slots[usize::from(way)];
        slot.set_block(block);
        slot.set_state(BlockState::VALID);
        slot.meta = 0;
        slot.prev = NIL;
        slot.next = NIL;
        let bucket = self.bucket(block);
        self.slots[usize::from(way)].chain = self.buckets[bucket];
        self.buckets[bucket] = way;
        self.nr_valid += 1;
        policy.inserted(&mut self.links(), way);
        allocation
    }

    /// Picks and removes the policy's victim.
    fn evict_victim(&mut self, policy: &dyn Replacement) -> Allocation {
        let Some(way) = policy.victim(&mut self.links()) else { return Allocation::NoRoom };
        let Some(old_block) = self.block(way) else { return Allocation::NoRoom };
        if !self.slots[usize::from(way)].evictable() {
            return Allocation::NoRoom;
        }
        self.remove(policy, way);
        // `remove` put the way on the free list; take it back off.
        self.free_head = self.slots[usize::from(way)].next;
        Allocation::Replaced { way, old_block }
    }

    /// Drops a block from the cache (dirty or not: the caller has cleaned it or
    /// decided to discard it). The way becomes invalid and free.
    pub fn invalidate(&mut self, policy: &dyn Replacement, way: Way) {
        if self.block(way).is_some() {
            self.remove(policy, way);
        }
    }

    /// Drops a block from the cache but keeps its way off the free list: the
    /// way is invalid, yet not reused until [`release_held`](Self::release_held)
    /// (its durable metadata may still name the old block as dirty, and a crash
    /// must not find another block's data under that name).
    pub fn invalidate_held(&mut self, policy: &dyn Replacement, way: Way) {
        if self.block(way).is_none() {
            return;
        }
        self.remove(policy, way);
        // `remove` put the way on the free list; take it back off and mark it held.
        self.free_head = self.slots[usize::from(way)].next;
        let slot = &mut self.slots[usize::from(way)];
        slot.next = NIL;
        slot.set_state(BlockState::PINNED);
    }

    /// Whether `way` is held off the free list by
    /// [`invalidate_held`](Self::invalidate_held).
    pub fn is_held(&self, way: Way) -> bool {
        self.slots.get(usize::from(way)).is_some_and(|s| s.state() == BlockState::PINNED)
    }

    /// Puts a way held by [`invalidate_held`](Self::invalidate_held) back on the
    /// free list; any other way is left alone.
    pub fn release_held(&mut self, way: Way) {
        if !self.is_held(way) {
            return;
        }
        let slot = &mut self.slots[usize::from(way)];
        *slot = Slot::EMPTY;
        slot.next = self.free_head;
        self.free_head = way;
    }

    fn remove(&mut self, policy: &dyn Replacement, way: Way) {
        policy.removed(&mut self.links(), way);
        let index = usize::from(way);
        let block = self.slots[index].block();
        // Unlink from the lookup chain.
        let bucket = self.bucket(block);
        let mut at = self.buckets[bucket];
        let mut before = NIL;
        while at != NIL && at != way {
            before = at;
            at = self.slots[usize::from(at)].chain;
        }
        let after = self.slots[index].chain;
        if before == NIL {
            self.buckets[bucket] = after;
        } else {
            self.slots[usize::from(before)].chain = after;
        }
        if self.slots[index].state().contains(BlockState::DIRTY) {
            self.nr_dirty -= 1;
        }
        self.nr_valid -= 1;
        let slot = &mut self.slots[index];
        *slot = Slot::EMPTY;
        slot.next = self.free_head;
        self.free_head = way;
    }

    /// Marks a valid block dirty.
    pub fn mark_dirty(&mut self, way: Way) {
        self.update(way, |s| s | BlockState::DIRTY);
    }

    /// Marks a valid block clean.
    pub fn mark_clean(&mut self, way: Way) {
        self.update(way, |s| s - BlockState::DIRTY);
    }

    /// Sets or clears the busy bit (I/O in progress; never a victim).
    pub fn set_busy(&mut self, way: Way, busy: bool) {
        self.update(way, |s| if busy { s | BlockState::BUSY } else { s - BlockState::BUSY });
    }

    /// Sets or clears the pinned bit (durable metadata still loads this identity).
    pub fn set_pinned(&mut self, way: Way, pinned: bool) {
        self.update(way, |s| if pinned { s | BlockState::PINNED } else { s - BlockState::PINNED });
    }

    /// Changes a valid block's state bits, keeping the dirty count right.
    pub fn update(&mut self, way: Way, f: impl FnOnce(BlockState) -> BlockState) {
        let Some(slot) = self.slots.get_mut(usize::from(way)) else { return };
        let before = slot.state();
        if !before.contains(BlockState::VALID) {
            return;
        }
        let after = f(before) | BlockState::VALID;
        slot.set_state(after);
        match (before.contains(BlockState::DIRTY), after.contains(BlockState::DIRTY)) {
            (false, true) => self.nr_dirty += 1,
            (true, false) => self.nr_dirty -= 1,
            _ => {}
        }
    }

    /// The valid ways, in way order.
    pub fn valid_ways(&self) -> impl Iterator<Item = Way> + '_ {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].state().contains(BlockState::VALID))
            .map(|i| i as Way)
    }

    /// Puts every valid block into `policy`'s lists afresh (in way order), for a
    /// switch of policy at run time: nothing cached is lost, only the recency
    /// and frequency history.
    pub fn rebuild(&mut self, policy: &dyn Replacement) {
        self.lists = Lists::default();
        let valid: Vec<Way> = self.valid_ways().collect();
        for &way in &valid {
            let slot = &mut self.slots[usize::from(way)];
            slot.prev = NIL;
            slot.next = NIL;
            slot.meta = 0;
        }
        for way in valid {
            policy.inserted(&mut self.links(), way);
        }
    }

    /// Every way in the order `policy` would evict it, coldest first (invalid
    /// ways may appear; callers filter by state).
    pub fn coldest_first(&mut self, policy: &dyn Replacement) -> Vec<Way> {
        let mut out = Vec::with_capacity(self.slots.len());
        policy.coldest_first(&self.links(), &mut out);
        out
    }

    fn links(&mut self) -> SetLinks<'_> {
        SetLinks::new(&mut self.lists, &mut self.slots)
    }
}

impl fmt::Debug for CacheSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheSet")
            .field("ways", &self.ways())
            .field("nr_valid", &self.nr_valid)
            .field("nr_dirty", &self.nr_dirty)
            .finish()
    }
}
