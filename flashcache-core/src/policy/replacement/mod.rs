//! Replacement policies behind one trait, all working on a set's ways through
//! [`SetLinks`]: two intrusive doubly linked lists with 16-bit links, a hand or
//! cursor, and eight bits of per-block policy state.
//!
//! | policy | flashcache | idea |
//! |---|---|---|
//! | [`Fifo`] | `reclaim_policy = 0` | evict in insertion order (a round-robin cursor over the ways) |
//! | [`Lru`] | — | evict the least recently used |
//! | [`Slru`] | `reclaim_policy = 1` ("LRU") | warm and hot lists: new blocks enter warm; after `promote_thresh` hits they move to hot (capped at `hot_pct` of the set); victims come from warm |
//! | [`Sieve`] | — | SIEVE (NSDI'24): FIFO order plus a visited bit; a hand from the oldest block spares visited blocks once. Scan-friendly, frequency-aware, no per-hit list moves |

mod fifo;
mod lru;
mod sieve;
mod slru;

use std::fmt;

pub use fifo::Fifo;
pub use lru::Lru;
pub use sieve::Sieve;
pub use slru::Slru;

use super::set::{NIL, Slot, Way};

/// A set's list heads: two lists (policies use one or both), their lengths, a
/// hand and a cursor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lists {
    head: [Way; 2],
    tail: [Way; 2],
    len: [u32; 2],
    hand: Way,
    cursor: Way,
}

impl Default for Lists {
    fn default() -> Self {
        Lists { head: [NIL; 2], tail: [NIL; 2], len: [0; 2], hand: NIL, cursor: 0 }
    }
}

/// What a policy may do to a set: list operations on its ways, per-block policy
/// bits, a hand and a cursor. Lists are ordered from head (newest) to tail
/// (oldest); [`older`](Self::older) walks toward the tail, [`newer`](Self::newer)
/// toward the head.
///
/// The set only ever hands a policy its own valid ways; the methods panic on a
/// way outside the set or a list other than 0 and 1, which would be a bug in
/// the policy.
pub struct SetLinks<'a> {
    lists: &'a mut Lists,
    slots: &'a mut [Slot],
}

impl<'a> SetLinks<'a> {
    pub(crate) fn new(lists: &'a mut Lists, slots: &'a mut [Slot]) -> SetLinks<'a> {
        SetLinks { lists, slots }
    }

    /// Ways in the set.
    pub fn ways(&self) -> usize {
        self.slots.len()
    }

    /// Puts `way` at the head of list `list` (0 or 1).
    pub fn push_head(&mut self, list: usize, way: Way) {
        let old = self.lists.head[list];
        let slot = &mut self.slots[usize::from(way)];
        slot.prev = NIL;
        slot.next = old;
        if old == NIL {
            self.lists.tail[list] = way;
        } else {
            self.slots[usize::from(old)].prev = way;
        }
        self.lists.head[list] = way;
        self.lists.len[list] += 1;
    }

    /// Takes `way` out of list `list`.
    pub fn unlink(&mut self, list: usize, way: Way) {
        let Slot { prev, next, .. } = self.slots[usize::from(way)];
        if prev == NIL {
            self.lists.head[list] = next;
        } else {
            self.slots[usize::from(prev)].next = next;
        }
        if next == NIL {
            self.lists.tail[list] = prev;
        } else {
            self.slots[usize::from(next)].prev = prev;
        }
        let slot = &mut self.slots[usize::from(way)];
        slot.prev = NIL;
        slot.next = NIL;
        self.lists.len[list] = self.lists.len[list].saturating_sub(1);
    }

    /// Moves `way`, which is in list `list`, to its head.
    pub fn move_to_head(&mut self, list: usize, way: Way) {
        if self.lists.head[list] != way {
            self.unlink(list, way);
            self.push_head(list, way);
        }
    }

    /// The newest way of list `list`.
    pub fn head(&self, list: usize) -> Option<Way> {
        some(self.lists.head[list])
    }

    /// The oldest way of list `list`.
    pub fn tail(&self, list: usize) -> Option<Way> {
        some(self.lists.tail[list])
    }

    /// The number of ways in list `list`.
    pub fn len(&self, list: usize) -> usize {
        self.lists.len[list] as usize
    }

    /// Whether list `list` is empty.
    pub fn is_empty(&self, list: usize) -> bool {
        self.lists.len[list] == 0
    }

    /// The next older way in its list.
    pub fn older(&self, way: Way) -> Option<Way> {
        some(self.slots[usize::from(way)].next)
    }

    /// The next newer way in its list.
    pub fn newer(&self, way: Way) -> Option<Way> {
        some(self.slots[usize::from(way)].prev)
    }

    /// The policy's bits for `way`.
    pub fn meta(&self, way: Way) -> u8 {
        self.slots[usize::from(way)].meta
    }

    /// Sets the policy's bits for `way`.
    pub fn set_meta(&mut self, way: Way, meta: u8) {
        self.slots[usize::from(way)].meta = meta;
    }

    /// Whether `way` may be evicted now (valid, clean, idle, not pinned).
    pub fn evictable(&self, way: Way) -> bool {
        self.slots.get(usize::from(way)).is_some_and(Slot::evictable)
    }

    /// The hand (SIEVE's, or any policy's), if set.
    pub fn hand(&self) -> Option<Way> {
        some(self.lists.hand)
    }

    /// Sets or clears the hand.
    pub fn set_hand(&mut self, hand: Option<Way>) {
        self.lists.hand = hand.unwrap_or(NIL);
    }

    /// The cursor (a way index), for round-robin policies.
    pub fn cursor(&self) -> Way {
        self.lists.cursor
    }

    /// Sets the cursor.
    pub fn set_cursor(&mut self, cursor: Way) {
        self.lists.cursor = cursor;
    }

    /// Walks list `list` from its tail toward its head and returns the first
    /// evictable way.
    pub fn oldest_evictable(&self, list: usize) -> Option<Way> {
        let mut at = self.tail(list);
        while let Some(way) = at {
            if self.evictable(way) {
                return Some(way);
            }
            at = self.newer(way);
        }
        None
    }
}

impl fmt::Debug for SetLinks<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SetLinks").field("ways", &self.ways()).field("lists", &self.lists).finish()
    }
}

fn some(way: Way) -> Option<Way> {
    (way != NIL).then_some(way)
}

/// What a hit moved between a policy's lists: only the segmented LRU moves
/// blocks between lists (flashcache's `lru_promotions` / `lru_demotions`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListMoves {
    /// Blocks promoted to the hot list.
    pub promoted: u32,
    /// Blocks demoted from the hot list to the warm list to make room.
    pub demoted: u32,
}

/// A replacement policy. The set calls it when a block is inserted, hit or
/// removed, and when it needs a victim; the policy keeps its state in the
/// set's lists and per-block bits, so one policy object serves every set.
pub trait Replacement: Send + Sync + fmt::Debug {
    /// Which policy this is.
    fn kind(&self) -> PolicyKind;
    /// A new block was placed in `way`.
    fn inserted(&self, set: &mut SetLinks<'_>, way: Way);
    /// `way` was hit; returns what moved between lists.
    fn accessed(&self, set: &mut SetLinks<'_>, way: Way) -> ListMoves;
    /// `way` is leaving the cache (evicted or invalidated).
    fn removed(&self, set: &mut SetLinks<'_>, way: Way);
    /// The way to evict, among [`evictable`](SetLinks::evictable) ones; `None`
    /// when none is. The set then calls [`removed`](Self::removed) for it.
    fn victim(&self, set: &mut SetLinks<'_>) -> Option<Way>;
    /// Appends the set's ways in the order the policy would evict them, coldest
    /// first (cleaning picks dirty blocks in this order, so that the blocks it
    /// makes clean are the next victims). The default walks list 0, then list
    /// 1, from tail to head.
    fn coldest_first(&self, set: &SetLinks<'_>, out: &mut Vec<Way>) {
        for list in 0..2 {
            let mut at = set.tail(list);
            while let Some(way) = at {
                out.push(way);
                at = set.newer(way);
            }
        }
    }
}

/// The policies this crate provides, with their parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// [`Fifo`].
    Fifo,
    /// [`Lru`].
    Lru,
    /// [`Slru`] with flashcache's parameters.
    Slru {
        /// Hits in the warm list before a block is promoted (flashcache's
        /// `lru_promote_thresh`, default 2).
        promote_thresh: u8,
        /// The hot list's share of the set in percent (`lru_hot_pct`, default 75).
        hot_pct: u8,
    },
    /// [`Sieve`].
    Sieve,
}

impl PolicyKind {
    /// flashcache's "LRU": [`Slru`] with its default parameters.
    pub const FLASHCACHE_LRU: PolicyKind = PolicyKind::Slru { promote_thresh: 2, hot_pct: 75 };

    /// Every policy, with default parameters.
    pub const ALL: [PolicyKind; 4] =
        [PolicyKind::Fifo, PolicyKind::Lru, PolicyKind::FLASHCACHE_LRU, PolicyKind::Sieve];

    /// The policy object.
    pub fn build(self) -> Box<dyn Replacement> {
        match self {
            PolicyKind::Fifo => Box::new(Fifo),
            PolicyKind::Lru => Box::new(Lru),
            PolicyKind::Slru { promote_thresh, hot_pct } => {
                Box::new(Slru::new(promote_thresh, hot_pct))
            }
            PolicyKind::Sieve => Box::new(Sieve),
        }
    }

    /// A short name: `fifo`, `lru`, `slru`, `sieve`.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Fifo => "fifo",
            PolicyKind::Lru => "lru",
            PolicyKind::Slru { .. } => "slru",
            PolicyKind::Sieve => "sieve",
        }
    }

    /// The policy named `name` (as [`name`](Self::name) gives it), with default
    /// parameters.
    pub fn from_name(name: &str) -> Option<PolicyKind> {
        PolicyKind::ALL.into_iter().find(|k| k.name().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
