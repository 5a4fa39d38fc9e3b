//! Seeded, deterministic synthetic workloads: a small PRNG and a Zipf
//! generator.
//!
//! The crate has no random-number dependency, so [`SplitMix64`] is its own:
//! the same seed gives the same numbers on every platform and in every
//! version of this crate, which is what a cross-check against another
//! simulator on "the same trace" needs.

use std::fmt;

use super::trace::{TraceOp, TraceRecord};

/// Steele, Lea and Flood's SplitMix64: a 64-bit state, a golden-ratio
/// increment and a strong finalizer. Small, fast, and good enough for
/// workload generation (not for cryptography).
///
/// ```
/// use flashcache_core::sim::SplitMix64;
/// let mut a = SplitMix64::new(7);
/// let mut b = SplitMix64::new(7);
/// assert_eq!(a.next_u64(), b.next_u64());
/// assert!(a.below(10) < 10);
/// assert!((0.0..1.0).contains(&a.next_f64()));
/// ```
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform number in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in `0..n` (0 when `n` is 0), without modulo bias
    /// (Lemire's multiply-and-reject).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// The most objects a [`Zipf`] generator takes (it keeps 8 to 12 bytes per
/// object).
pub const MAX_ZIPF_OBJECTS: u64 = 1 << 26;

/// Why a [`Zipf`] generator cannot be built.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ZipfError {
    /// There are no objects.
    #[error("a Zipf distribution needs at least one object")]
    NoObjects,
    /// More than [`MAX_ZIPF_OBJECTS`].
    #[error("{0} objects are too many for the Zipf generator (at most {MAX_ZIPF_OBJECTS})")]
    TooManyObjects(u64),
    /// The exponent is negative, infinite or not a number.
    #[error("Zipf exponent {0} is not a finite number >= 0")]
    BadAlpha(f64),
}

/// A seeded Zipf(α) generator over `n` objects: the object of popularity rank
/// `k` (1-based) is drawn with probability proportional to `1 / k^α`.
///
/// It precomputes the cumulative distribution and draws by binary search over
/// it, so any `α >= 0` works the same way, including `α = 1` (where the
/// closed-form inversions divide by `1 - α`) and `α = 0` (uniform).
///
/// Ranks map to object ids `0..n`: by default the most popular object is id 0,
/// the next id 1, and so on, which puts all the heat at the start of the
/// address space. [`shuffled`](Self::shuffled) maps ranks through a seeded
/// random permutation instead, so ids carry no spatial locality. The
/// permutation uses its own random stream: the sequence of ranks drawn is the
/// same with and without it.
///
/// ```
/// use flashcache_core::sim::Zipf;
/// let mut a = Zipf::new(1000, 0.8, 42).unwrap().shuffled();
/// let mut b = Zipf::new(1000, 0.8, 42).unwrap().shuffled();
/// let xs: Vec<u64> = a.by_ref().take(100).collect();
/// assert_eq!(xs, b.by_ref().take(100).collect::<Vec<_>>());
/// assert!(xs.iter().all(|&id| id < 1000));
/// ```
#[derive(Clone)]
pub struct Zipf {
    /// `cdf[k]`: the probability of a rank `<= k` (0-based); the last is 1.
    cdf: Box<[f64]>,
    /// The object id of each rank, when shuffled.
    ids: Option<Box<[u32]>>,
    alpha: f64,
    seed: u64,
    rng: SplitMix64,
}

/// Mixed into the seed for the permutation's stream.
const SHUFFLE_SALT: u64 = 0x5eed_5eed_0bad_cafe;

impl Zipf {
    /// A generator of ids `0..objects` with exponent `alpha`, seeded with `seed`.
    pub fn new(objects: u64, alpha: f64, seed: u64) -> Result<Zipf, ZipfError> {
        if objects == 0 {
            return Err(ZipfError::NoObjects);
        }
        if objects > MAX_ZIPF_OBJECTS {
            return Err(ZipfError::TooManyObjects(objects));
        }
        if !alpha.is_finite() || alpha < 0.0 {
            return Err(ZipfError::BadAlpha(alpha));
        }
        let mut cdf = Vec::with_capacity(objects as usize);
        let mut sum = 0.0f64;
        for k in 1..=objects {
            sum += (k as f64).powf(-alpha);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        if let Some(last) = cdf.last_mut() {
            *last = 1.0;
        }
        Ok(Zipf { cdf: cdf.into(), ids: None, alpha, seed, rng: SplitMix64::new(seed) })
    }

    /// The same generator with ranks mapped to ids through a random
    /// permutation (Fisher–Yates, seeded from the generator's seed).
    pub fn shuffled(mut self) -> Zipf {
        let n = self.cdf.len();
        // `n <= MAX_ZIPF_OBJECTS < 2^32`.
        let mut ids: Vec<u32> = (0..n as u32).collect();
        let mut rng = SplitMix64::new(self.seed ^ SHUFFLE_SALT);
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            ids.swap(i, j);
        }
        self.ids = Some(ids.into());
        self
    }

    /// The number of objects.
    pub fn objects(&self) -> u64 {
        self.cdf.len() as u64
    }

    /// The exponent α.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Whether ids are shuffled.
    pub fn is_shuffled(&self) -> bool {
        self.ids.is_some()
    }

    /// The probability of the object of 0-based rank `rank` (0 past the end).
    pub fn probability(&self, rank: u64) -> f64 {
        let Ok(k) = usize::try_from(rank) else { return 0.0 };
        let Some(&c) = self.cdf.get(k) else { return 0.0 };
        let before = if k == 0 { 0.0 } else { self.cdf[k - 1] };
        c - before
    }

    /// The object id of 0-based rank `rank` (the rank itself past the end).
    pub fn id_of_rank(&self, rank: u64) -> u64 {
        match (&self.ids, usize::try_from(rank)) {
            (Some(ids), Ok(k)) if k < ids.len() => u64::from(ids[k]),
            _ => rank,
        }
    }

    /// Draws a 0-based popularity rank (0 is the most popular).
    pub fn next_rank(&mut self) -> u64 {
        let u = self.rng.next_f64();
        let k = self.cdf.partition_point(|&c| c <= u);
        k.min(self.cdf.len() - 1) as u64
    }

    /// Draws an object id.
    pub fn next_id(&mut self) -> u64 {
        let rank = self.next_rank();
        self.id_of_rank(rank)
    }

    /// An endless stream of one-block reads: object `id` is the block of
    /// `block_sectors` sectors at sector `id * block_sectors`. Take as many
    /// as needed.
    ///
    /// ```
    /// use flashcache_core::sim::{TraceOp, Zipf};
    /// let mut zipf = Zipf::new(100, 1.0, 1).unwrap();
    /// let trace: Vec<_> = zipf.records(8).take(10).collect();
    /// assert!(trace.iter().all(|r| r.op == TraceOp::Read && r.sectors == 8 && r.sector % 8 == 0));
    /// ```
    pub fn records(&mut self, block_sectors: u32) -> ZipfRecords<'_> {
        ZipfRecords { zipf: self, block_sectors: block_sectors.max(1) }
    }
}

impl fmt::Debug for Zipf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Zipf")
            .field("objects", &self.objects())
            .field("alpha", &self.alpha)
            .field("seed", &self.seed)
            .field("shuffled", &self.is_shuffled())
            .finish()
    }
}

impl Iterator for Zipf {
    type Item = u64;

    /// The next object id; never `None`.
    fn next(&mut self) -> Option<u64> {
        Some(self.next_id())
    }
}

/// One-block reads drawn from a [`Zipf`] generator: see [`Zipf::records`].
#[derive(Debug)]
pub struct ZipfRecords<'a> {
    zipf: &'a mut Zipf,
    block_sectors: u32,
}

impl Iterator for ZipfRecords<'_> {
    type Item = TraceRecord;

    fn next(&mut self) -> Option<TraceRecord> {
        let id = self.zipf.next_id();
        // `id < 2^26` and `block_sectors < 2^32`: no overflow.
        let sector = id * u64::from(self.block_sectors);
        Some(TraceRecord { op: TraceOp::Read, sector, sectors: self.block_sectors })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_the_reference_sequence() {
        // The first outputs for seed 1234567 of the reference implementation.
        let mut rng = SplitMix64::new(1234567);
        let expected = [
            6457827717110365317u64,
            3203168211198807973,
            9817491932198370423,
            4593380528125082431,
            16408922859458223821,
        ];
        for want in expected {
            assert_eq!(rng.next_u64(), want);
        }
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut rng = SplitMix64::new(3);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            counts[rng.below(6) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
        assert_eq!(rng.below(0), 0);
        assert_eq!(rng.below(1), 0);
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert_eq!(Zipf::new(0, 1.0, 0).unwrap_err(), ZipfError::NoObjects);
        assert_eq!(
            Zipf::new(MAX_ZIPF_OBJECTS + 1, 1.0, 0).unwrap_err(),
            ZipfError::TooManyObjects(MAX_ZIPF_OBJECTS + 1)
        );
        assert!(matches!(Zipf::new(10, -0.5, 0), Err(ZipfError::BadAlpha(_))));
        assert!(matches!(Zipf::new(10, f64::NAN, 0), Err(ZipfError::BadAlpha(_))));
        assert!(matches!(Zipf::new(10, f64::INFINITY, 0), Err(ZipfError::BadAlpha(_))));
    }

    #[test]
    fn same_seed_same_sequence_other_seed_other_sequence() {
        let draw = |seed, shuffle: bool| {
            let z = Zipf::new(10_000, 0.8, seed).unwrap();
            let z = if shuffle { z.shuffled() } else { z };
            z.take(1000).collect::<Vec<u64>>()
        };
        assert_eq!(draw(5, false), draw(5, false));
        assert_eq!(draw(5, true), draw(5, true));
        assert_ne!(draw(5, false), draw(6, false));
        assert_ne!(draw(5, false), draw(5, true));
    }

    #[test]
    fn shuffle_permutes_ids_but_keeps_the_ranks() {
        let plain = Zipf::new(5000, 1.0, 9).unwrap();
        let shuffled = plain.clone().shuffled();
        let ranks: Vec<u64> = plain.take(2000).collect();
        let ids: Vec<u64> = shuffled.clone().take(2000).collect();
        for (&rank, &id) in ranks.iter().zip(&ids) {
            assert_eq!(shuffled.id_of_rank(rank), id);
        }
        // A permutation: every id exactly once.
        let mut all: Vec<u64> = (0..5000).map(|r| shuffled.id_of_rank(r)).collect();
        all.sort_unstable();
        assert!(all.iter().copied().eq(0..5000));
        // And not the identity (not even close).
        assert!((0..5000).filter(|&r| shuffled.id_of_rank(r) == r).count() < 20);
    }

    /// Frequencies of rank 1 and rank 10 (1-based) over a long run.
    fn rank_counts(alpha: f64) -> (f64, f64) {
        let mut zipf = Zipf::new(100_000, alpha, 2024).unwrap();
        let mut counts = [0u64; 10];
        for _ in 0..2_000_000 {
            let rank = zipf.next_rank();
            if rank < 10 {
                counts[rank as usize] += 1;
            }
        }
        (counts[0] as f64, counts[9] as f64)
    }

    #[test]
    fn rank_1_is_about_10_to_the_alpha_times_rank_10() {
        for alpha in [0.8, 1.0, 1.2] {
            let (first, tenth) = rank_counts(alpha);
            let ratio = first / tenth;
            let want = 10f64.powf(alpha);
            assert!((ratio / want - 1.0).abs() < 0.1, "alpha {alpha}: ratio {ratio}, want {want}");
        }
    }

    #[test]
    fn probabilities_follow_the_power_law() {
        for alpha in [0.0, 0.8, 1.0] {
            let z = Zipf::new(1000, alpha, 0).unwrap();
            let total: f64 = (0..1000).map(|r| z.probability(r)).sum();
            assert!((total - 1.0).abs() < 1e-9);
            let ratio = z.probability(0) / z.probability(9);
            assert!((ratio - 10f64.powf(alpha)).abs() < 1e-9, "alpha {alpha}: {ratio}");
            assert_eq!(z.probability(1000), 0.0);
        }
        // alpha = 0 is uniform.
        let mut uniform = Zipf::new(4, 0.0, 11).unwrap();
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[uniform.next_rank() as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
    }

    #[test]
    fn one_object() {
        let mut z = Zipf::new(1, 1.0, 0).unwrap().shuffled();
        assert!(z.by_ref().take(100).all(|id| id == 0));
        let r = z.records(8).next().unwrap();
        assert_eq!(r, TraceRecord { op: TraceOp::Read, sector: 0, sectors: 8 });
    }
}
