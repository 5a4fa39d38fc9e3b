//! The policy core: pure, I/O-free cache bookkeeping.
//!
//! Geometry and the disk-block → set map ([`Geometry`]), one set's blocks,
//! states and lookup ([`CacheSet`]), and the replacement policies behind the
//! [`Replacement`] trait. Nothing here does I/O, reads a clock or takes a lock:
//! decisions are plain values, so the I/O layer executes them, and tests and
//! trace simulations run them directly, in microseconds.

mod cleaning;
mod geometry;
pub mod replacement;
mod sequential;
mod set;
mod stats;
mod tunables;

pub use cleaning::{
    CleanLimits, CleanRun, fallow_tick, plan_cleaning, plan_fallow_cleaning, plan_full_cleaning,
};
pub use geometry::{Geometry, GeometryError, MAX_ASSOC, SetMapping};
pub use replacement::{ListMoves, PolicyKind, Replacement, SetLinks};
pub use sequential::{SequentialDetector, TRACKED_STREAMS};
pub use set::{Allocation, BlockState, CacheSet, MAX_BLOCK, NIL, Way};
pub use stats::{CacheStats, Counters};
pub use tunables::{TunableError, Tunables};

#[cfg(test)]
mod tests;
