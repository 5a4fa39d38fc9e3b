//! # flashcache-core: an SSD cache in front of a disk (not yet implemented)
//!
//! This crate will hold a set-associative, crash-safe block cache in the style of
//! Facebook's flashcache: a pure, I/O-free policy core (geometry, block states,
//! replacement policies, dirty thresholds, statistics) and an I/O layer built on
//! [`dmio`] and [`kcopyd`]. See the project's issue tracker for the plan.
//! The on-SSD format (superblock, metadata slots, layout) is specified in [`mod@format`].
//!
//! Until then the crate is intentionally empty; it exists so that the workspace
//! layout (`dmio <- kcopyd <- flashcache-core`) is in place.
#![forbid(unsafe_code)]

pub mod format;
pub mod policy;
pub mod sim;

/// The dm-io layer this crate builds on, re-exported for convenience.
pub use dmio;
/// The copy engine this crate builds on, re-exported for convenience.
pub use kcopyd;
