//! # flashcache-core: an SSD cache in front of a disk (in progress)
//!
//! A set-associative, crash-safe block cache in the style of Facebook's
//! flashcache, in two layers:
//!
//! 1. **The policy core** ([`policy`]), pure and I/O-free: the geometry and the
//!    disk-block → set map, each set's block identities and states with a
//!    per-set lookup (15 bytes of index per cache block at 512 ways),
//!    replacement policies behind the [`policy::Replacement`] trait (FIFO, LRU,
//!    flashcache's segmented LRU, SIEVE; switchable at run time), cleaning
//!    decisions (dirty threshold, fallow clock, merged runs in disk order), the
//!    sequential-stream detector and the counters. Decisions are plain values.
//! 2. **The I/O layer** on [`dmio`] and [`kcopyd`], which executes them. So far
//!    only [`setup`] exists: creating a cache's superblock (refusing an existing
//!    cache unless forced), loading it (refusing a device that is no cache, a
//!    cache of another disk or of a resized one, a newer format, a corrupt or
//!    unstable superblock) and destroying it. Reads, writes and cleaning are
//!    still to come (see the project's issue tracker).
//!
//! Beside them: the on-SSD format ([`mod@format`]: superblock, metadata slots,
//! layout) and trace simulation ([`sim`]), which replays block traces through the
//! real policy core to compare hit ratios without any I/O:
//!
//! ```
//! use flashcache_core::policy::{Geometry, PolicyKind, SetMapping};
//! use flashcache_core::sim::{Shape, Simulator, zipf::Zipf};
//!
//! // 64 sets of 512 blocks of 4 KiB, flashcache's hashed mapping.
//! let geometry = Geometry::new(8, 512, 64, SetMapping::Hashed { cluster_blocks: 64 }).unwrap();
//! let mut lru = Simulator::new(PolicyKind::Lru, Shape::SetAssociative(geometry));
//! let mut sieve = Simulator::new(PolicyKind::Sieve, Shape::SetAssociative(geometry));
//! let mut zipf = Zipf::new(300_000, 0.9, 7).unwrap().shuffled();
//! for record in zipf.records(8).take(200_000) {
//!     lru.access(&record);
//!     sieve.access(&record);
//! }
//! assert!(sieve.report().miss_ratio() < lru.report().miss_ratio());
//! ```
#![forbid(unsafe_code)]

pub mod cache;
pub mod format;
pub mod policy;
pub mod setup;
pub mod sim;

/// The dm-io layer this crate builds on, re-exported for convenience.
pub use dmio;
/// The copy engine this crate builds on, re-exported for convenience.
pub use kcopyd;
