//! SIEVE (Zhang et al., NSDI'24).

use super::{ListMoves, PolicyKind, Replacement, SetLinks};
use crate::policy::set::Way;

const VISITED: u8 = 1;

/// SIEVE: blocks stay in insertion order; a hit only sets a visited bit. To
/// evict, a hand walks from where it last stopped (initially the oldest block)
/// toward newer blocks, clearing visited bits, and evicts the first block that
/// was not visited; past the newest block it starts again at the oldest.
/// Blocks that prove popular stay put while new, once-used blocks leave
/// quickly, which lowers the miss ratio well below LRU's on skewed workloads.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sieve;

impl Replacement for Sieve {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Sieve
    }

    fn inserted(&self, set: &mut SetLinks<'_>, way: Way) {
        set.set_meta(way, 0);
        set.push_head(0, way);
    }

    fn accessed(&self, set: &mut SetLinks<'_>, way: Way) -> ListMoves {
        set.set_meta(way, VISITED);
        ListMoves::default()
    }

    fn removed(&self, set: &mut SetLinks<'_>, way: Way) {
        if set.hand() == Some(way) {
            let newer = set.newer(way);
            set.set_hand(newer);
        }
        set.unlink(0, way);
    }

    fn victim(&self, set: &mut SetLinks<'_>) -> Option<Way> {
        // Two rounds clear every visited bit; a third would find nothing new.
        let mut steps = 2 * set.len(0) + 1;
        let mut at = set.hand().or_else(|| set.tail(0));
        while let Some(way) = at {
            if steps == 0 {
                break;
            }
            steps -= 1;
            let next = set.newer(way).or_else(|| set.tail(0));
            if !set.evictable(way) {
                at = next;
                continue;
            }
            if set.meta(way) & VISITED != 0 {
                set.set_meta(way, 0);
                at = next;
                continue;
            }
            set.set_hand(set.newer(way));
            return Some(way);
        }
        None
    }
}
