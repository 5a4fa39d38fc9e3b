//! FIFO: flashcache's default policy.

use super::{ListMoves, PolicyKind, Replacement, SetLinks};
use crate::policy::set::Way;

/// First in, first out, as flashcache does it: a per-set cursor goes round the
/// ways and evicts the next evictable block. New blocks take the evicted
/// block's way (or a free way), so in a full set the cursor meets blocks in
/// the order they came in. Needs no lists and no per-block bits.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fifo;

impl Replacement for Fifo {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Fifo
    }

    fn inserted(&self, _set: &mut SetLinks<'_>, _way: Way) {}

    fn accessed(&self, _set: &mut SetLinks<'_>, _way: Way) -> ListMoves {
        ListMoves::default()
    }

    fn removed(&self, _set: &mut SetLinks<'_>, _way: Way) {}

    fn coldest_first(&self, set: &SetLinks<'_>, out: &mut Vec<Way>) {
        let ways = set.ways();
        let start = usize::from(set.cursor()) % ways;
        out.extend((0..ways).map(|i| ((start + i) % ways) as Way));
    }

    fn victim(&self, set: &mut SetLinks<'_>) -> Option<Way> {
        let ways = set.ways();
        let start = usize::from(set.cursor()) % ways;
        for i in 0..ways {
            let way = ((start + i) % ways) as Way;
            if set.evictable(way) {
                set.set_cursor(((usize::from(way) + 1) % ways) as Way);
                return Some(way);
            }
        }
        None
    }
}
