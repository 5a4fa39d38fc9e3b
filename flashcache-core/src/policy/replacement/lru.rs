//! Plain LRU.

use super::{ListMoves, PolicyKind, Replacement, SetLinks};
use crate::policy::set::Way;

/// Least recently used: one list, a hit moves the block to the head, the victim
/// is the oldest evictable block.
#[derive(Clone, Copy, Debug, Default)]
pub struct Lru;

impl Replacement for Lru {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Lru
    }

    fn inserted(&self, set: &mut SetLinks<'_>, way: Way) {
        set.push_head(0, way);
    }

    fn accessed(&self, set: &mut SetLinks<'_>, way: Way) -> ListMoves {
        set.move_to_head(0, way);
        ListMoves::default()
    }

    fn removed(&self, set: &mut SetLinks<'_>, way: Way) {
        set.unlink(0, way);
    }

    fn victim(&self, set: &mut SetLinks<'_>) -> Option<Way> {
        set.oldest_evictable(0)
    }
}
