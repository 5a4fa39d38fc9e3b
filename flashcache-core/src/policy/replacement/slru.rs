//! flashcache's "LRU": a two-list segmented LRU.

use super::{ListMoves, PolicyKind, Replacement, SetLinks};
use crate::policy::set::Way;

const WARM: usize = 0;
const HOT: usize = 1;
/// Set in a block's policy bits while it is in the hot list; the low bits
/// count hits in the warm list.
const IN_HOT: u8 = 0x80;

/// Segmented LRU with a warm and a hot list (flashcache's `reclaim_policy = 1`).
/// New blocks enter the warm list's head; a block hit `promote_thresh` times
/// while warm moves to the hot list's head; the hot list holds at most
/// `hot_pct` percent of the set, its oldest blocks going back to warm. Victims
/// come from the warm list's tail (the hot list's when warm has none).
#[derive(Clone, Copy, Debug)]
pub struct Slru {
    promote_thresh: u8,
    hot_pct: u8,
}

impl Slru {
    /// A segmented LRU; `promote_thresh` is clamped to 1..=127, `hot_pct` to
    /// 0..=100 (0 makes it a plain LRU).
    pub fn new(promote_thresh: u8, hot_pct: u8) -> Slru {
        Slru { promote_thresh: promote_thresh.clamp(1, 127), hot_pct: hot_pct.min(100) }
    }

    fn hot_max(&self, set: &SetLinks<'_>) -> usize {
        set.ways() * usize::from(self.hot_pct) / 100
    }
}

impl Replacement for Slru {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Slru { promote_thresh: self.promote_thresh, hot_pct: self.hot_pct }
    }

    fn inserted(&self, set: &mut SetLinks<'_>, way: Way) {
        set.set_meta(way, 0);
        set.push_head(WARM, way);
    }

    fn accessed(&self, set: &mut SetLinks<'_>, way: Way) -> ListMoves {
        let meta = set.meta(way);
        if meta & IN_HOT != 0 {
            set.move_to_head(HOT, way);
            return ListMoves::default();
        }
        let hits = (meta & !IN_HOT).saturating_add(1);
        if hits < self.promote_thresh || self.hot_max(set) == 0 {
            set.set_meta(way, hits.min(!IN_HOT));
            set.move_to_head(WARM, way);
            return ListMoves::default();
        }
        set.unlink(WARM, way);
        set.set_meta(way, IN_HOT);
        set.push_head(HOT, way);
        let mut moves = ListMoves { promoted: 1, demoted: 0 };
        while set.len(HOT) > self.hot_max(set) {
            let Some(oldest) = set.tail(HOT) else { break };
            set.unlink(HOT, oldest);
            set.set_meta(oldest, 0);
            set.push_head(WARM, oldest);
            moves.demoted += 1;
        }
        moves
    }

    fn removed(&self, set: &mut SetLinks<'_>, way: Way) {
        let list = if set.meta(way) & IN_HOT != 0 { HOT } else { WARM };
        set.unlink(list, way);
    }

    fn victim(&self, set: &mut SetLinks<'_>) -> Option<Way> {
        set.oldest_evictable(WARM).or_else(|| set.oldest_evictable(HOT))
    }
}
