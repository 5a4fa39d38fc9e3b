//! # kcopyd: the dm-kcopyd analogue (not yet implemented)
//!
//! This crate will copy one region of a block device to up to eight destination
//! regions, and zero regions, asynchronously, on top of [`dmio`]: jobs are split
//! into sub-jobs that read into pages once and fan the data out to every
//! destination with one dm-io write. See the project's issue tracker for the plan.
//!
//! Until then the crate is intentionally empty; it exists so that the workspace
//! layout (`dmio <- kcopyd <- flashcache-core`) is in place.
#![forbid(unsafe_code)]

/// The dm-io layer this crate builds on, re-exported for convenience.
pub use dmio;
