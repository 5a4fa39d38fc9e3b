//! The policy core: pure, I/O-free cache bookkeeping.
//!
//! Geometry and the disk-block → set map ([`Geometry`]), one set's blocks,
//! states and lookup ([`CacheSet`]), and the replacement policies behind the
//! [`Replacement`] trait. Nothing here does I/O, reads a clock or takes a lock:
//! decisions are plain values, so the I/O layer executes them, and tests and
//! trace simulations run them directly, in microseconds.

mod geometry;
pub mod replacement;
mod set;

pub use geometry::{Geometry, GeometryError, MAX_ASSOC, SetMapping};
pub use replacement::{PolicyKind, Replacement, SetLinks};
pub use set::{Allocation, BlockState, CacheSet, MAX_BLOCK, NIL, Way};

#[cfg(test)]
mod tests;
