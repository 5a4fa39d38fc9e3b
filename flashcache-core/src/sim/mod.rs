//! Trace simulation: replay block I/O traces through the real policy core,
//! with no I/O, and count hits.
//!
//! A [`Simulator`] holds one cache shape ([`Shape`]: set-associative from a
//! [`Geometry`], or one fully associative set) and one replacement policy,
//! and is fed [`TraceRecord`]s, from a file ([`TraceReader`]: `R|W sector
//! count` lines or the MSR Cambridge CSV, see [`trace`]) or synthetic
//! ([`Zipf`]). [`run_matrix`] runs many
//! (policy, size) combinations over one trace held in memory, with sizes in
//! blocks or as a fraction of the trace's footprint.
//!
//! # What is simulated
//!
//! Each record is split into the cache blocks it touches (a record that covers
//! part of a block counts as an access to the whole block), and each block
//! access is one lookup in the block's set:
//!
//! - a **hit** tells the policy ([`CacheSet::touch`]);
//! - a **miss** fills the block ([`CacheSet::allocate`]), evicting the
//!   policy's victim when the set is full.
//!
//! Reads and writes are treated alike: every miss is filled and no block is
//! ever dirty, busy or pinned, so every block is always evictable. That is a
//! writethrough cache with fill on every miss, or a writeback cache whose
//! cleaning keeps up instantly; it leaves out the sequential-stream bypass and
//! sub-block I/O going uncached. The counts are block accesses, the unit
//! flashcache's own hit counters use for whole-block I/O.
//!
//! ```
//! use flashcache_core::policy::{PolicyKind, SetMapping};
//! use flashcache_core::sim::{CacheSize, Organization, Zipf, run_matrix};
//!
//! let trace: Vec<_> = Zipf::new(10_000, 1.0, 7).unwrap().shuffled().records(8).take(50_000).collect();
//! let reports = run_matrix(
//!     &trace,
//!     &[PolicyKind::Lru, PolicyKind::Sieve],
//!     &[CacheSize::Fraction(0.05), CacheSize::Fraction(0.2)],
//!     Organization::Full,
//!     8,
//! )
//! .unwrap();
//! assert_eq!(reports.len(), 4);
//! // SIEVE misses less than LRU on a skewed workload.
//! assert!(reports[2].miss_ratio() < reports[0].miss_ratio());
//! ```

pub mod trace;
pub mod zipf;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::str::FromStr;

use crate::policy::{
    Allocation, CacheSet, Geometry, GeometryError, MAX_BLOCK, PolicyKind, Replacement, SetMapping,
};

pub use trace::{
    LineError, TraceError, TraceFormat, TraceOp, TraceReader, TraceRecord, UnknownFormat,
    read_trace, write_text,
};
pub use zipf::{MAX_ZIPF_OBJECTS, SplitMix64, Zipf, ZipfError, ZipfRecords};

/// The largest fully associative cache, in blocks: one [`CacheSet`], whose
/// ways are 16-bit numbers with one value kept for "none".
pub const MAX_FULL_BLOCKS: u64 = 65535;

/// Why a simulation cannot be set up.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A fully associative cache of more than [`MAX_FULL_BLOCKS`] blocks.
    #[error(
        "a fully associative cache of {0} blocks is too large (at most {MAX_FULL_BLOCKS}); \
         use a set-associative shape"
    )]
    FullTooLarge(u64),
    /// A cache of no blocks.
    #[error("a cache needs at least one block")]
    NoBlocks,
    /// The block size is not a power of two of at least one sector.
    #[error("block size of {0} sectors is not a power of two")]
    BlockSize(u32),
    /// A fraction of the footprint that is not a finite number above 0.
    #[error("cache size fraction {0} is not a finite number above 0")]
    BadFraction(f64),
    /// More sets than a [`Geometry`] holds.
    #[error("{0} sets are too many")]
    TooManySets(u64),
    /// The geometry is not possible.
    #[error(transparent)]
    Geometry(#[from] GeometryError),
}

/// How the cache's blocks are organised, without its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Organization {
    /// One set holding every block (at most [`MAX_FULL_BLOCKS`]).
    Full,
    /// Sets of `assoc` blocks, with disk blocks mapped to sets by `mapping`.
    SetAssociative {
        /// Blocks per set (a power of two, see [`Geometry::new`]).
        assoc: u32,
        /// The disk block → set map.
        mapping: SetMapping,
    },
}

/// A concrete cache shape: organisation, size and block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// A set-associative cache.
    SetAssociative(Geometry),
    /// One fully associative set.
    Full {
        /// Blocks in the cache (1 to [`MAX_FULL_BLOCKS`]).
        blocks: u32,
        /// The block size in 512-byte sectors (a power of two).
        block_sectors: u32,
    },
}

impl Shape {
    /// A fully associative shape of `blocks` blocks of `block_sectors` sectors.
    pub fn full(blocks: u64, block_sectors: u32) -> Result<Shape, SimError> {
        if !block_sectors.is_power_of_two() {
            return Err(SimError::BlockSize(block_sectors));
        }
        if blocks == 0 {
            return Err(SimError::NoBlocks);
        }
        if blocks > MAX_FULL_BLOCKS {
            return Err(SimError::FullTooLarge(blocks));
        }
        // `blocks <= 65535`.
        Ok(Shape::Full { blocks: blocks as u32, block_sectors })
    }

    /// The shape of `organization` for a cache of `size`, where fractions are of
    /// `footprint` blocks. A fully associative size rounds down to whole blocks
    /// (as libCacheSim does), a set-associative one to the nearest whole
    /// number of sets; either is at least one block or one set.
    pub fn sized(
        organization: Organization,
        size: CacheSize,
        footprint: u64,
        block_sectors: u32,
    ) -> Result<Shape, SimError> {
        match organization {
            Organization::Full => {
                let blocks = match size {
                    CacheSize::Blocks(0) => return Err(SimError::NoBlocks),
                    CacheSize::Blocks(n) => n,
                    CacheSize::Fraction(f) => {
                        (check_fraction(f)? * footprint as f64).floor() as u64
                    }
                };
                Shape::full(blocks.max(1), block_sectors)
            }
            Organization::SetAssociative { assoc, mapping } => {
                let blocks = match size {
                    CacheSize::Blocks(0) => return Err(SimError::NoBlocks),
                    CacheSize::Blocks(n) => n as f64,
                    CacheSize::Fraction(f) => check_fraction(f)? * footprint as f64,
                };
                let sets = (blocks / f64::from(assoc.max(1))).round().max(1.0);
                // Saturating float-to-int conversion.
                let sets = sets as u64;
                let num_sets = u32::try_from(sets).map_err(|_| SimError::TooManySets(sets))?;
                Ok(Shape::SetAssociative(Geometry::new(block_sectors, assoc, num_sets, mapping)?))
            }
        }
    }

    /// Blocks in the cache.
    pub fn cache_blocks(&self) -> u64 {
        match self {
            Shape::SetAssociative(g) => g.cache_blocks(),
            Shape::Full { blocks, .. } => u64::from(*blocks),
        }
    }

    /// The block size in 512-byte sectors.
    pub fn block_sectors(&self) -> u32 {
        match self {
            Shape::SetAssociative(g) => g.block_sectors(),
            Shape::Full { block_sectors, .. } => *block_sectors,
        }
    }

    /// Blocks per set, or `None` for a fully associative cache.
    pub fn assoc(&self) -> Option<u32> {
        match self {
            Shape::SetAssociative(g) => Some(g.assoc()),
            Shape::Full { .. } => None,
        }
    }

    /// The disk block → set map, or `None` for a fully associative cache.
    pub fn mapping(&self) -> Option<SetMapping> {
        match self {
            Shape::SetAssociative(g) => Some(g.mapping()),
            Shape::Full { .. } => None,
        }
    }
}

fn check_fraction(f: f64) -> Result<f64, SimError> {
    if f.is_finite() && f > 0.0 { Ok(f) } else { Err(SimError::BadFraction(f)) }
}

/// A cache size: whole blocks, or a fraction of a trace's footprint (its
/// number of distinct blocks).
///
/// Parses from `1000` (blocks) or `5%` / `0.5%` (percent of the footprint).
///
/// ```
/// use flashcache_core::sim::CacheSize;
/// assert_eq!("5%".parse::<CacheSize>(), Ok(CacheSize::Fraction(0.05)));
/// assert_eq!("4096".parse::<CacheSize>(), Ok(CacheSize::Blocks(4096)));
/// assert_eq!(CacheSize::Fraction(0.05).to_string(), "5%");
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CacheSize {
    /// A number of blocks.
    Blocks(u64),
    /// A fraction of the footprint (0.05 is 5 %).
    Fraction(f64),
}

/// A cache size that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cache size {0:?} is neither a number of blocks nor a percentage above 0 (like 5%)")]
pub struct BadCacheSize(pub String);

impl FromStr for CacheSize {
    type Err = BadCacheSize;

    fn from_str(s: &str) -> Result<CacheSize, BadCacheSize> {
        let text = s.trim();
        let bad = || BadCacheSize(s.to_owned());
        if let Some(percent) = text.strip_suffix('%') {
            let p: f64 = percent.trim().parse().map_err(|_| bad())?;
            if !p.is_finite() || p <= 0.0 {
                return Err(bad());
            }
            Ok(CacheSize::Fraction(p / 100.0))
        } else {
            match text.parse::<u64>() {
                Ok(n) if n > 0 => Ok(CacheSize::Blocks(n)),
                _ => Err(bad()),
            }
        }
    }
}

impl fmt::Display for CacheSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheSize::Blocks(n) => write!(f, "{n}"),
            CacheSize::Fraction(x) => write!(f, "{}%", x * 100.0),
        }
    }
}

/// The blocks a record touches (none for a record of no sectors).
fn blocks_of(record: &TraceRecord, block_sectors: u32) -> impl Iterator<Item = u64> + use<> {
    let bs = u64::from(block_sectors.max(1));
    let first = record.sector / bs;
    let range = u64::from(record.sectors)
        .checked_sub(1)
        .map(|more| first..=record.sector.saturating_add(more) / bs);
    range.into_iter().flatten()
}

/// The footprint of a trace: the number of distinct blocks of `block_sectors`
/// sectors it touches.
///
/// ```
/// use flashcache_core::sim::{TraceOp, TraceRecord, footprint};
/// let r = |sector, sectors| TraceRecord { op: TraceOp::Read, sector, sectors };
/// assert_eq!(footprint(&[r(0, 8), r(4, 8), r(0, 1)], 8), 2);
/// ```
pub fn footprint(records: &[TraceRecord], block_sectors: u32) -> u64 {
    let mut seen: HashSet<u64, BuildHasherDefault<MixHasher>> = HashSet::default();
    for record in records {
        seen.extend(blocks_of(record, block_sectors));
    }
    seen.len() as u64
}

/// A hasher for integer keys: one multiply-and-fold (the keys are set numbers
/// and block numbers, not attacker-chosen strings worth SipHash).
#[derive(Default)]
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The results of a simulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimReport {
    /// The policy.
    pub policy: PolicyKind,
    /// Blocks in the cache.
    pub cache_blocks: u64,
    /// Blocks per set, or `None` for a fully associative cache.
    pub assoc: Option<u32>,
    /// The disk block → set map, or `None` for a fully associative cache.
    pub mapping: Option<SetMapping>,
    /// The block size in 512-byte sectors.
    pub block_sectors: u32,
    /// Trace records replayed.
    pub records: u64,
    /// Block accesses: `reads + writes`.
    pub accesses: u64,
    /// Block accesses that hit: `read_hits + write_hits`.
    pub hits: u64,
    /// Block reads.
    pub reads: u64,
    /// Block reads that hit.
    pub read_hits: u64,
    /// Block writes.
    pub writes: u64,
    /// Block writes that hit.
    pub write_hits: u64,
    /// Misses that evicted a block.
    pub evictions: u64,
    /// Misses that found no evictable block and went uncached (flashcache's
    /// `noroom`; never happens here, where no block is dirty or busy, but
    /// counted).
    pub no_room: u64,
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 / whole as f64 }
}

impl SimReport {
    /// Hits per access (0 with no accesses).
    pub fn hit_ratio(&self) -> f64 {
        ratio(self.hits, self.accesses)
    }

    /// Misses per access (0 with no accesses).
    pub fn miss_ratio(&self) -> f64 {
        ratio(self.accesses.saturating_sub(self.hits), self.accesses)
    }

    /// Read hits per read (0 with no reads).
    pub fn read_hit_ratio(&self) -> f64 {
        ratio(self.read_hits, self.reads)
    }

    /// Write hits per write (0 with no writes).
    pub fn write_hit_ratio(&self) -> f64 {
        ratio(self.write_hits, self.writes)
    }
}

/// Replays block accesses through one cache shape and one policy: see the
/// [module docs](self) for what a hit and a miss do.
///
/// Sets are created when first touched, so memory follows the part of the
/// cache the trace fills (about 15 bytes per block of each touched set).
/// Disk block numbers are taken modulo 2⁴⁸ ([`MAX_BLOCK`] + 1), the range a
/// [`CacheSet`] stores.
///
/// ```
/// use flashcache_core::policy::PolicyKind;
/// use flashcache_core::sim::{Shape, Simulator, TraceOp, TraceRecord};
/// let mut sim = Simulator::new(PolicyKind::Lru, Shape::full(2, 8).unwrap());
/// for block in [1, 2, 1, 3, 2] {
///     sim.access(&TraceRecord { op: TraceOp::Read, sector: block * 8, sectors: 8 });
/// }
/// let report = sim.report();
/// assert_eq!((report.accesses, report.hits, report.evictions), (5, 1, 2));
/// assert_eq!(report.miss_ratio(), 0.8);
/// ```
pub struct Simulator {
    kind: PolicyKind,
    policy: Box<dyn Replacement>,
    shape: Shape,
    sets: HashMap<u32, CacheSet, BuildHasherDefault<MixHasher>>,
    report: SimReport,
}

impl Simulator {
    /// An empty cache of `shape` run by `policy`. A [`Shape::Full`] built by
    /// hand with values out of range is brought into range: 1 to
    /// [`MAX_FULL_BLOCKS`] blocks, a power-of-two block size (rounded up).
    pub fn new(policy: PolicyKind, shape: Shape) -> Simulator {
        let shape = match shape {
            Shape::Full { blocks, block_sectors } => Shape::Full {
                blocks: blocks.clamp(1, MAX_FULL_BLOCKS as u32),
                block_sectors: block_sectors.max(1).checked_next_power_of_two().unwrap_or(1 << 31),
            },
            other => other,
        };
        Simulator {
            kind: policy,
            policy: policy.build(),
            shape,
            sets: HashMap::default(),
            report: SimReport {
                policy,
                cache_blocks: shape.cache_blocks(),
                assoc: shape.assoc(),
                mapping: shape.mapping(),
                block_sectors: shape.block_sectors(),
                records: 0,
                accesses: 0,
                hits: 0,
                reads: 0,
                read_hits: 0,
                writes: 0,
                write_hits: 0,
                evictions: 0,
                no_room: 0,
            },
        }
    }

    /// A set-associative cache of `geometry`.
    pub fn set_associative(policy: PolicyKind, geometry: Geometry) -> Simulator {
        Simulator::new(policy, Shape::SetAssociative(geometry))
    }

    /// A fully associative cache of `blocks` blocks of `block_sectors`
    /// sectors; an error past [`MAX_FULL_BLOCKS`].
    pub fn fully_associative(
        policy: PolicyKind,
        blocks: u64,
        block_sectors: u32,
    ) -> Result<Simulator, SimError> {
        Ok(Simulator::new(policy, Shape::full(blocks, block_sectors)?))
    }

    /// The policy.
    pub fn policy(&self) -> PolicyKind {
        self.kind
    }

    /// The cache shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Replays one record: one access per block it touches.
    pub fn access(&mut self, record: &TraceRecord) {
        self.report.records += 1;
        for block in blocks_of(record, self.shape.block_sectors()) {
            self.access_block(record.op, block);
        }
    }

    /// Replays every record of `records`.
    pub fn run<'a, I: IntoIterator<Item = &'a TraceRecord>>(&mut self, records: I) {
        for record in records {
            self.access(record);
        }
    }

    /// One access to disk block `block`; returns whether it hit.
    pub fn access_block(&mut self, op: TraceOp, block: u64) -> bool {
        let block = block & MAX_BLOCK;
        let (set_index, ways) = match self.shape {
            Shape::SetAssociative(g) => (g.set_of(block), g.assoc()),
            Shape::Full { blocks, .. } => (0, blocks),
        };
        let set = self.sets.entry(set_index).or_insert_with(|| CacheSet::new(ways as usize));
        let policy = &*self.policy;
        let hit = match set.lookup(block) {
            Some(way) => {
                set.touch(policy, way);
                true
            }
            None => {
                match set.allocate(policy, block) {
                    // `AlreadyCached` cannot happen: the lookup just missed.
                    Allocation::Free(_) | Allocation::AlreadyCached(_) => {}
                    Allocation::Replaced { .. } => self.report.evictions += 1,
                    Allocation::NoRoom => self.report.no_room += 1,
                }
                false
            }
        };
        let r = &mut self.report;
        r.accesses += 1;
        r.hits += u64::from(hit);
        match op {
            TraceOp::Read => {
                r.reads += 1;
                r.read_hits += u64::from(hit);
            }
            TraceOp::Write => {
                r.writes += 1;
                r.write_hits += u64::from(hit);
            }
        }
        hit
    }

    /// The counts so far.
    pub fn report(&self) -> SimReport {
        self.report
    }
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("policy", &self.kind)
            .field("shape", &self.shape)
            .field("sets_touched", &self.sets.len())
            .field("report", &self.report)
            .finish()
    }
}

/// One simulation of a [`run_matrix`]-style plan: a policy, the size asked
/// for, and the shape it resolved to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimJob {
    /// The policy.
    pub policy: PolicyKind,
    /// The size asked for.
    pub size: CacheSize,
    /// The concrete shape.
    pub shape: Shape,
}

impl SimJob {
    /// Runs the job over `records`.
    pub fn run(&self, records: &[TraceRecord]) -> SimReport {
        let mut sim = Simulator::new(self.policy, self.shape);
        sim.run(records);
        sim.report()
    }
}

/// Resolves every (policy, size) combination to a job, policies in the outer
/// loop and sizes in the inner (the order [`run_matrix`] reports in).
/// Fractions are of `footprint` blocks (see [`Shape::sized`] for rounding).
pub fn plan(
    policies: &[PolicyKind],
    sizes: &[CacheSize],
    organization: Organization,
    footprint: u64,
    block_sectors: u32,
) -> Result<Vec<SimJob>, SimError> {
    let shapes: Vec<Shape> = sizes
        .iter()
        .map(|&size| Shape::sized(organization, size, footprint, block_sectors))
        .collect::<Result<_, _>>()?;
    Ok(policies
        .iter()
        .flat_map(|&policy| {
            sizes.iter().zip(&shapes).map(move |(&size, &shape)| SimJob { policy, size, shape })
        })
        .collect())
}

/// Runs every (policy, size) combination over `records`, one after another,
/// and returns the reports in [`plan`]'s order (policies outer, sizes inner).
/// Fractional sizes are of the trace's [`footprint`].
pub fn run_matrix(
    records: &[TraceRecord],
    policies: &[PolicyKind],
    sizes: &[CacheSize],
    organization: Organization,
    block_sectors: u32,
) -> Result<Vec<SimReport>, SimError> {
    if !block_sectors.is_power_of_two() {
        return Err(SimError::BlockSize(block_sectors));
    }
    let footprint = footprint(records, block_sectors);
    let jobs = plan(policies, sizes, organization, footprint, block_sectors)?;
    Ok(jobs.iter().map(|job| job.run(records)).collect())
}

#[cfg(test)]
mod tests;
