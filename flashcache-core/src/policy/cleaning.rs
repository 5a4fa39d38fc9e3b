//! Cleaning decisions: which dirty blocks to write back, merged into runs of
//! contiguous disk blocks, and the fallow (idle) clock.

use super::replacement::Replacement;
use super::set::{BlockState, CacheSet, Way};

/// A run of contiguous disk blocks of one set, cleaned with one disk write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CleanRun {
    /// The first disk block of the run.
    pub first_block: u64,
    /// The ways holding `first_block`, `first_block + 1`, ... in disk order.
    pub ways: Vec<Way>,
    /// How many of `ways` were merged in front of the block the planner chose
    /// (`ways[front_merged]`); the rest after it were merged behind it
    /// (flashcache's `front_merge` and `back_merge`).
    pub front_merged: usize,
}

/// Limits for one round of cleaning in a set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CleanLimits {
    /// Dirty blocks the set may keep (flashcache's `dirty_thresh_set`, from
    /// `dirty_thresh_pct` of the associativity).
    pub dirty_thresh: u32,
    /// Cleaning writes (runs) the set may start now: `max_clean_ios_set` minus
    /// those in flight, capped by what `max_clean_ios_total` leaves.
    pub max_runs: u32,
    /// The most blocks one run may merge.
    pub max_run_blocks: u32,
}

/// Picks dirty blocks of `set` to clean so that it gets back down to
/// `limits.dirty_thresh`: blocks idle for two fallow periods first, then in the
/// policy's eviction order. The chosen blocks are sorted by disk block and
/// merged with their dirty neighbours in the set ("for free", as flashcache
/// does) into at most `limits.max_runs` runs. Busy blocks are never chosen.
///
/// ```
/// use flashcache_core::policy::{plan_cleaning, CacheSet, CleanLimits, PolicyKind};
/// let lru = PolicyKind::Lru.build();
/// let mut set = CacheSet::new(8);
/// for block in [10, 11, 12, 40, 41, 7] {
///     let way = set.allocate(&*lru, block).way().unwrap();
///     set.mark_dirty(way);
/// }
/// let runs = plan_cleaning(&mut set, &*lru, CleanLimits { dirty_thresh: 4, max_runs: 2, max_run_blocks: 64 });
/// // The two coldest dirty blocks are 10 and 11; 12 joins their run for free.
/// assert_eq!(runs.len(), 1);
/// assert_eq!(runs[0].first_block, 10);
/// assert_eq!(runs[0].ways.len(), 3);
/// assert_eq!(runs[0].front_merged, 0); // 10 was chosen; 11 and 12 merged behind it
/// ```
pub fn plan_cleaning(
    set: &mut CacheSet,
    policy: &dyn Replacement,
    limits: CleanLimits,
) -> Vec<CleanRun> {
    let excess = set.nr_dirty().saturating_sub(limits.dirty_thresh);
    if excess == 0 || limits.max_runs == 0 {
        return Vec::new();
    }
    let cleanable = |set: &CacheSet, way: Way| {
        let s = set.state(way);
        s.contains(BlockState::VALID | BlockState::DIRTY) && !s.contains(BlockState::BUSY)
    };
    let order = set.coldest_first(policy);
    let mut chosen: Vec<Way> = order
        .iter()
        .copied()
        .filter(|&w| cleanable(set, w) && set.state(w).contains(BlockState::FALLOW_2))
        .collect();
    chosen.extend(
        order
            .iter()
            .copied()
            .filter(|&w| cleanable(set, w) && !set.state(w).contains(BlockState::FALLOW_2)),
    );
    chosen.truncate(excess as usize);
    merge_runs(set, &chosen, limits.max_runs, limits.max_run_blocks, cleanable)
}

/// Picks up to `max_blocks` dirty blocks idle for two fallow periods (for
/// flashcache's fallow cleaning, `fallow_clean_speed` blocks per set per
/// second), merged into runs like [`plan_cleaning`].
pub fn plan_fallow_cleaning(set: &CacheSet, max_blocks: u32, max_runs: u32) -> Vec<CleanRun> {
    let cleanable = |set: &CacheSet, way: Way| {
        let s = set.state(way);
        s.contains(BlockState::VALID | BlockState::DIRTY) && !s.contains(BlockState::BUSY)
    };
    let chosen: Vec<Way> = set
        .valid_ways()
        .filter(|&w| cleanable(set, w) && set.state(w).contains(BlockState::FALLOW_2))
        .take(max_blocks as usize)
        .collect();
    merge_runs(set, &chosen, max_runs, u32::MAX, cleanable)
}

/// Every dirty, idle block of the set as runs (for "clean everything now").
pub fn plan_full_cleaning(set: &CacheSet, max_runs: u32, max_run_blocks: u32) -> Vec<CleanRun> {
    let cleanable = |set: &CacheSet, way: Way| {
        let s = set.state(way);
        s.contains(BlockState::VALID | BlockState::DIRTY) && !s.contains(BlockState::BUSY)
    };
    let chosen: Vec<Way> = set.valid_ways().filter(|&w| cleanable(set, w)).collect();
    merge_runs(set, &chosen, max_runs, max_run_blocks, cleanable)
}

/// Sorts `chosen` by disk block, grows each into a run with the set's other
/// cleanable blocks on either side, and returns at most `max_runs` runs.
fn merge_runs(
    set: &CacheSet,
    chosen: &[Way],
    max_runs: u32,
    max_run_blocks: u32,
    cleanable: impl Fn(&CacheSet, Way) -> bool,
) -> Vec<CleanRun> {
    let mut blocks: Vec<(u64, Way)> =
        chosen.iter().filter_map(|&w| set.block(w).map(|b| (b, w))).collect();
    blocks.sort_unstable();
    let mut runs: Vec<CleanRun> = Vec::new();
    let mut taken = std::collections::HashSet::new();
    for (block, way) in blocks {
        if runs.len() as u32 >= max_runs {
            break;
        }
        if taken.contains(&way) {
            continue;
        }
        let mut first = block;
        let mut ways = std::collections::VecDeque::from([way]);
        taken.insert(way);
        // Grow backwards, then forwards, over cleanable neighbours.
        while (ways.len() as u32) < max_run_blocks && first > 0 {
            match set.lookup(first - 1) {
                Some(w) if !taken.contains(&w) && cleanable(set, w) => {
                    ways.push_front(w);
                    taken.insert(w);
                    first -= 1;
                }
                _ => break,
            }
        }
        while (ways.len() as u32) < max_run_blocks {
            match set.lookup(first + ways.len() as u64) {
                Some(w) if !taken.contains(&w) && cleanable(set, w) => {
                    ways.push_back(w);
                    taken.insert(w);
                }
                _ => break,
            }
        }
        let front_merged = (block - first) as usize;
        runs.push(CleanRun { first_block: first, ways: ways.into(), front_merged });
    }
    runs
}

/// One tick of the fallow clock (call it once per `fallow_delay`): blocks
/// untouched since the last tick get `FALLOW_1`, those that already had it get
/// `FALLOW_2`. [`CacheSet::touch`] clears both. A dirty block idle for two
/// ticks is due for fallow cleaning.
pub fn fallow_tick(set: &mut CacheSet) {
    let ways: Vec<Way> = set.valid_ways().collect();
    for way in ways {
        set.update(way, |s| {
            if s.contains(BlockState::FALLOW_1) {
                s | BlockState::FALLOW_2
            } else {
                s | BlockState::FALLOW_1
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyKind;

    fn dirty_set(policy: &dyn Replacement, ways: usize, blocks: &[u64]) -> CacheSet {
        let mut set = CacheSet::new(ways);
        for &b in blocks {
            let way = set.allocate(policy, b).way().unwrap();
            set.mark_dirty(way);
        }
        set
    }

    /// Cleaning what the planner says, round after round, brings every set down
    /// to its threshold, never exceeds the run limit, and only ever writes back
    /// dirty, idle blocks in disk order.
    #[test]
    fn repeated_cleaning_converges_to_the_threshold() {
        for kind in PolicyKind::ALL {
            let policy = kind.build();
            let blocks: Vec<u64> = (0..64).map(|i| (i * 7919) % 200).collect();
            let mut set = dirty_set(&*policy, 64, &blocks);
            let busy = set.lookup(blocks[0]).unwrap();
            set.set_busy(busy, true);
            let limits = CleanLimits { dirty_thresh: 12, max_runs: 2, max_run_blocks: 8 };
            for _ in 0..100 {
                let runs = plan_cleaning(&mut set, &*policy, limits);
                assert!(runs.len() <= 2);
                for run in &runs {
                    assert!(run.ways.len() <= 8);
                    for (i, &way) in run.ways.iter().enumerate() {
                        assert_eq!(set.block(way), Some(run.first_block + i as u64), "{kind}");
                        assert_ne!(way, busy, "{kind}: cleaned a busy block");
                        set.mark_clean(way);
                    }
                }
                if runs.is_empty() {
                    break;
                }
            }
            assert!(set.nr_dirty() <= 12, "{kind}: {} dirty", set.nr_dirty());
            assert!(set.state(busy).contains(BlockState::DIRTY));
        }
    }

    #[test]
    fn an_idle_dirty_block_is_due_after_two_fallow_ticks() {
        let lru = PolicyKind::Lru.build();
        let mut set = dirty_set(&*lru, 4, &[1, 5, 6]);
        let (a, b) = (set.lookup(1).unwrap(), set.lookup(5).unwrap());
        fallow_tick(&mut set);
        assert!(plan_fallow_cleaning(&set, 10, 10).is_empty());
        set.touch(&*lru, b);
        fallow_tick(&mut set);
        // 1 is due; 6 is due too (untouched), and 5, touched, rides along in
        // 6's run because it is dirty and contiguous.
        let runs = plan_fallow_cleaning(&set, 10, 10);
        let c = set.lookup(6).unwrap();
        assert_eq!(
            runs,
            vec![
                CleanRun { first_block: 1, ways: vec![a], front_merged: 0 },
                CleanRun { first_block: 5, ways: vec![b, c], front_merged: 1 },
            ]
        );
        assert_eq!(plan_fallow_cleaning(&set, 1, 10).len(), 1, "max_blocks limits the choice");
    }

    #[test]
    fn full_cleaning_merges_every_contiguous_run() {
        let fifo = PolicyKind::Fifo.build();
        let set = dirty_set(&*fifo, 16, &[5, 3, 4, 9, 10, 11, 12, 20]);
        let runs = plan_full_cleaning(&set, 16, 64);
        let shape: Vec<(u64, usize)> = runs.iter().map(|r| (r.first_block, r.ways.len())).collect();
        assert_eq!(shape, vec![(3, 3), (9, 4), (20, 1)]);
    }

    /// A run grown around a chosen block says how many blocks joined in front
    /// of it: flashcache's `front_merge` (the rest are `back_merge`).
    #[test]
    fn runs_count_blocks_merged_in_front_of_the_chosen_block() {
        let lru = PolicyKind::Lru.build();
        let mut set = dirty_set(&*lru, 8, &[10, 11, 12, 13]);
        // 12 becomes the coldest: 10, 11 and 13 are used after it.
        for b in [10, 11, 13] {
            let way = set.lookup(b).unwrap();
            set.touch(&*lru, way);
        }
        let limits = CleanLimits { dirty_thresh: 3, max_runs: 1, max_run_blocks: 64 };
        let runs = plan_cleaning(&mut set, &*lru, limits);
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].first_block, runs[0].ways.len(), runs[0].front_merged), (10, 4, 2));
        assert_eq!(set.block(runs[0].ways[runs[0].front_merged]), Some(12));
    }
}
