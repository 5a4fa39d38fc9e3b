//! Property tests of [`CacheSet`] and the policies against naive models.

use proptest::prelude::*;

use super::*;

/// One step of a random workload on one set.
#[derive(Clone, Debug)]
enum Op {
    /// Access a block: a hit touches it, a miss allocates it.
    Access(u64),
    /// Dirty the block if cached.
    Dirty(u64),
    /// Clean the block if cached.
    Clean(u64),
    /// Pin or unpin (busy) the block if cached.
    Busy(u64, bool),
    /// Invalidate the block if cached.
    Invalidate(u64),
}

fn ops(blocks: u64, with_invalidate: bool) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        8 => (0..blocks).prop_map(Op::Access),
        1 => (0..blocks).prop_map(Op::Dirty),
        1 => (0..blocks).prop_map(Op::Clean),
        1 => (0..blocks, any::<bool>()).prop_map(|(b, busy)| Op::Busy(b, busy)),
        if with_invalidate { 1 } else { 0 } => (0..blocks).prop_map(Op::Invalidate),
    ];
    proptest::collection::vec(op, 1..400)
}

/// A naive model entry.
#[derive(Clone, Debug)]
struct Entry {
    block: u64,
    dirty: bool,
    busy: bool,
    visited: bool,
}

impl Entry {
    fn evictable(&self) -> bool {
        !self.dirty && !self.busy
    }
}

/// The naive models: a vector in the policy's order, oldest first.
#[derive(Debug)]
struct Model {
    kind: PolicyKind,
    ways: usize,
    entries: Vec<Entry>,
    /// SIEVE's hand: the block it stopped at.
    hand: Option<u64>,
}

impl Model {
    fn position(&self, block: u64) -> Option<usize> {
        self.entries.iter().position(|e| e.block == block)
    }

    /// Returns the evicted block, `Err(())` for no room.
    fn access(&mut self, block: u64) -> Result<Option<u64>, ()> {
        if let Some(i) = self.position(block) {
            match self.kind {
                PolicyKind::Lru => {
                    let e = self.entries.remove(i);
                    self.entries.push(e);
                }
                PolicyKind::Sieve => self.entries[i].visited = true,
                _ => {}
            }
            return Ok(None);
        }
        let mut evicted = None;
        if self.entries.len() == self.ways {
            let victim = match self.kind {
                PolicyKind::Fifo | PolicyKind::Lru => {
                    self.entries.iter().position(Entry::evictable).ok_or(())?
                }
                PolicyKind::Sieve => self.sieve_victim().ok_or(())?,
                _ => unreachable!(),
            };
            evicted = Some(self.entries.remove(victim).block);
        }
        let e = Entry { block, dirty: false, busy: false, visited: false };
        self.entries.push(e);
        Ok(evicted)
    }

    fn sieve_victim(&mut self) -> Option<usize> {
        let n = self.entries.len();
        let mut i = match self.hand {
            Some(b) => self.position(b).unwrap_or(0),
            None => 0,
        };
        for _ in 0..(2 * n + 1) {
            let next = (i + 1) % n;
            let e = &mut self.entries[i];
            if !e.evictable() {
                i = next;
                continue;
            }
            if e.visited {
                e.visited = false;
                i = next;
                continue;
            }
            // The hand moves to the next newer block, or none past the newest.
            self.hand = if i + 1 < n { Some(self.entries[i + 1].block) } else { None };
            return Some(i);
        }
        None
    }

    fn invalidate(&mut self, block: u64) {
        if let Some(i) = self.position(block) {
            if self.hand == Some(block) {
                self.hand = self.entries.get(i + 1).map(|e| e.block);
            }
            self.entries.remove(i);
        }
    }
}

fn run(kind: PolicyKind, ways: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let policy = kind.build();
    let mut set = CacheSet::new(ways);
    let mut model = Model { kind, ways, entries: Vec::new(), hand: None };
    for op in ops {
        match *op {
            Op::Access(block) => {
                let expected = model.access(block);
                match set.lookup(block) {
                    Some(way) => {
                        prop_assert_eq!(expected, Ok(None), "hit in the set, not in the model");
                        set.touch(&*policy, way);
                    }
                    None => match (set.allocate(&*policy, block), expected) {
                        (Allocation::Free(_), Ok(None)) => {}
                        (Allocation::Replaced { old_block, .. }, Ok(Some(evicted))) => {
                            prop_assert_eq!(old_block, evicted, "{} picked another victim", kind);
                        }
                        (Allocation::NoRoom, Err(())) => {}
                        (got, want) => {
                            prop_assert!(false, "{kind}: set {got:?}, model {want:?}");
                        }
                    },
                }
            }
            Op::Dirty(block) | Op::Clean(block) => {
                let dirty = matches!(op, Op::Dirty(_));
                if let Some(way) = set.lookup(block) {
                    if dirty { set.mark_dirty(way) } else { set.mark_clean(way) }
                }
                if let Some(i) = model.position(block) {
                    model.entries[i].dirty = dirty;
                }
            }
            Op::Busy(block, busy) => {
                if let Some(way) = set.lookup(block) {
                    set.set_busy(way, busy);
                }
                if let Some(i) = model.position(block) {
                    model.entries[i].busy = busy;
                }
            }
            Op::Invalidate(block) => {
                if let Some(way) = set.lookup(block) {
                    set.invalidate(&*policy, way);
                }
                model.invalidate(block);
            }
        }
        prop_assert_eq!(set.nr_valid() as usize, model.entries.len());
        let dirty = model.entries.iter().filter(|e| e.dirty).count();
        prop_assert_eq!(set.nr_dirty() as usize, dirty);
        for e in &model.entries {
            let way = set.lookup(e.block);
            prop_assert!(way.is_some(), "block {} missing from the set", e.block);
            let state = set.state(way.unwrap_or(NIL));
            prop_assert_eq!(state.contains(BlockState::DIRTY), e.dirty);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn lru_matches_the_model(ops in ops(24, true), ways in 1usize..12) {
        run(PolicyKind::Lru, ways, &ops)?;
    }

    #[test]
    fn sieve_matches_the_model(ops in ops(24, true), ways in 1usize..12) {
        run(PolicyKind::Sieve, ways, &ops)?;
    }

    /// FIFO's cursor equals insertion order while every block stays evictable
    /// and nothing is invalidated. (A block the cursor skips because it is dirty
    /// or busy is met again only a full round later, and a freed way is reused
    /// out of order: flashcache's behaviour, which a queue does not model.)
    #[test]
    fn fifo_matches_the_model_for_plain_accesses(ops in ops(24, false), ways in 1usize..12) {
        let accesses: Vec<Op> = ops.into_iter().filter(|op| matches!(op, Op::Access(_))).collect();
        run(PolicyKind::Fifo, ways, &accesses)?;
    }

    /// Whatever the workload, SLRU never evicts a dirty or busy block, keeps its
    /// counts right, and a rebuild after a policy switch keeps every block.
    #[test]
    fn slru_and_policy_switches_keep_the_set_consistent(
        ops in ops(40, true), ways in 1usize..16, switch_at in 0usize..400,
    ) {
        let kinds = [PolicyKind::FLASHCACHE_LRU, PolicyKind::Sieve, PolicyKind::Fifo];
        let mut policy = kinds[0].build();
        let mut set = CacheSet::new(ways);
        let mut cached = std::collections::HashMap::<u64, (bool, bool)>::new();
        for (i, op) in ops.iter().enumerate() {
            if i == switch_at {
                policy = kinds[1 + i % 2].build();
                set.rebuild(&*policy);
            }
            match *op {
                Op::Access(block) => match set.lookup(block) {
                    Some(way) => {
                        set.touch(&*policy, way);
                    }
                    None => {
                        let all_stuck = cached.len() == ways
                            && cached.values().all(|&(dirty, busy)| dirty || busy);
                        match set.allocate(&*policy, block) {
                            Allocation::NoRoom => prop_assert!(all_stuck, "no room while a block was evictable"),
                            Allocation::AlreadyCached(_) => prop_assert!(false, "lookup missed a cached block"),
                            Allocation::Free(_) => { cached.insert(block, (false, false)); }
                            Allocation::Replaced { old_block, .. } => {
                                let (dirty, busy) = cached.remove(&old_block).unwrap_or((true, true));
                                prop_assert!(!dirty && !busy, "evicted a dirty or busy block");
                                cached.insert(block, (false, false));
                            }
                        }
                    }
                },
                Op::Dirty(block) | Op::Clean(block) => {
                    let dirty = matches!(op, Op::Dirty(_));
                    if let Some(way) = set.lookup(block) {
                        if dirty { set.mark_dirty(way) } else { set.mark_clean(way) }
                        if let Some(e) = cached.get_mut(&block) { e.0 = dirty; }
                    }
                }
                Op::Busy(block, busy) => {
                    if let Some(way) = set.lookup(block) {
                        set.set_busy(way, busy);
                        if let Some(e) = cached.get_mut(&block) { e.1 = busy; }
                    }
                }
                Op::Invalidate(block) => {
                    if let Some(way) = set.lookup(block) {
                        set.invalidate(&*policy, way);
                        cached.remove(&block);
                    }
                }
            }
            prop_assert_eq!(set.nr_valid() as usize, cached.len());
            prop_assert!(cached.keys().all(|&b| set.lookup(b).is_some()));
        }
    }
}

#[test]
fn index_memory_is_at_most_16_bytes_per_block() {
    for ways in [256usize, 512, 1024, 8192] {
        let per_block = CacheSet::index_bytes(ways) as f64 / ways as f64;
        assert!(per_block <= 16.0, "{ways} ways: {per_block} bytes per block");
    }
}

#[test]
fn allocating_a_cached_block_or_one_beyond_48_bits_changes_nothing() {
    let lru = PolicyKind::Lru.build();
    let mut set = CacheSet::new(4);
    let way = set.allocate(&*lru, 7).way().unwrap();
    assert_eq!(set.allocate(&*lru, 7), Allocation::AlreadyCached(way));
    assert_eq!(set.allocate(&*lru, MAX_BLOCK + 1), Allocation::NoRoom);
    assert_eq!(set.nr_valid(), 1);
    let top = set.allocate(&*lru, MAX_BLOCK).way().unwrap();
    assert_eq!(set.block(top), Some(MAX_BLOCK));
}

#[test]
fn segmented_lru_hits_report_promotions_and_demotions_other_policies_none() {
    // Four ways, hot list capped at half of them, promotion on the second hit.
    let slru = PolicyKind::Slru { promote_thresh: 2, hot_pct: 50 }.build();
    let mut set = CacheSet::new(4);
    let ways: Vec<Way> = (0..4).map(|b| set.allocate(&*slru, b).way().unwrap()).collect();
    let none = ListMoves::default();
    assert_eq!(set.touch(&*slru, ways[0]), none, "first hit: still warm");
    assert_eq!(set.touch(&*slru, ways[0]), ListMoves { promoted: 1, demoted: 0 });
    assert_eq!(set.touch(&*slru, ways[0]), none, "a hot hit moves nothing between lists");
    set.touch(&*slru, ways[1]);
    assert_eq!(set.touch(&*slru, ways[1]), ListMoves { promoted: 1, demoted: 0 });
    // A third hot block exceeds the cap: the oldest hot block goes back to warm.
    set.touch(&*slru, ways[2]);
    assert_eq!(set.touch(&*slru, ways[2]), ListMoves { promoted: 1, demoted: 1 });
    for kind in [PolicyKind::Fifo, PolicyKind::Lru, PolicyKind::Sieve] {
        let policy = kind.build();
        let mut set = CacheSet::new(4);
        let way = set.allocate(&*policy, 9).way().unwrap();
        for _ in 0..3 {
            assert_eq!(set.touch(&*policy, way), none, "{kind:?}");
        }
    }
}
