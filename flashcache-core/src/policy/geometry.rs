//! Cache geometry: block size, associativity, sets, and the disk-block → set map.

use std::fmt;

/// The largest associativity: set-relative links are 16 bits, with one value
/// kept for "none".
pub const MAX_ASSOC: u32 = 32768;

/// How disk blocks map to sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetMapping {
    /// flashcache v1/v2: `set = (block / assoc) mod sets`. A run of `assoc`
    /// consecutive disk blocks shares one set, and hot regions that alias to the
    /// same set fight while others stay empty.
    Linear,
    /// flashcache v3 "disk associativity": blocks are grouped in clusters of
    /// `cluster_blocks` consecutive blocks, and each cluster is hashed to a set.
    /// A cluster stays in one set (so cleaning can merge contiguous blocks), but
    /// clusters scatter over all sets.
    Hashed {
        /// Consecutive disk blocks per cluster (a power of two).
        cluster_blocks: u32,
    },
}

/// The shape of a cache: how many sets of how many blocks of what size, and how
/// disk blocks are placed in sets.
///
/// ```
/// use flashcache_core::policy::{Geometry, SetMapping};
/// // 1 GiB of 4 KiB blocks, 512-way, clusters of 64 blocks (256 KiB).
/// let g = Geometry::new(8, 512, 512, SetMapping::Hashed { cluster_blocks: 64 }).unwrap();
/// assert_eq!(g.cache_blocks(), 262_144);
/// assert_eq!(g.block_bytes(), 4096);
/// // Every block of one cluster lands in the same set.
/// let set = g.set_of(640);
/// assert!((640..704).all(|b| g.set_of(b) == set));
/// ```
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    block_sectors: u32,
    assoc: u32,
    num_sets: u32,
    mapping: SetMapping,
}

/// Why a geometry is not possible.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GeometryError {
    /// The block size is not a power of two of at least one sector.
    #[error("block size of {0} sectors is not a power of two")]
    BlockSize(u32),
    /// The associativity is not a power of two in range.
    #[error("associativity {assoc} is not a power of two from 2 to {max}")]
    Assoc {
        /// The value given.
        assoc: u32,
        /// The largest allowed.
        max: u32,
    },
    /// There are no sets.
    #[error("a cache needs at least one set")]
    NoSets,
    /// The cluster size is not a power of two.
    #[error("disk associativity of {0} blocks is not a power of two")]
    Cluster(u32),
}

impl Geometry {
    /// A geometry of `num_sets` sets of `assoc` blocks of `block_sectors` sectors.
    pub fn new(
        block_sectors: u32,
        assoc: u32,
        num_sets: u32,
        mapping: SetMapping,
    ) -> Result<Geometry, GeometryError> {
        if !block_sectors.is_power_of_two() {
            return Err(GeometryError::BlockSize(block_sectors));
        }
        if !assoc.is_power_of_two() || !(2..=MAX_ASSOC).contains(&assoc) {
            return Err(GeometryError::Assoc { assoc, max: MAX_ASSOC });
        }
        if num_sets == 0 {
            return Err(GeometryError::NoSets);
        }
        if let SetMapping::Hashed { cluster_blocks } = mapping
            && !cluster_blocks.is_power_of_two()
        {
            return Err(GeometryError::Cluster(cluster_blocks));
        }
        Ok(Geometry { block_sectors, assoc, num_sets, mapping })
    }

    /// The block size in 512-byte sectors.
    pub fn block_sectors(&self) -> u32 {
        self.block_sectors
    }

    /// The block size in bytes.
    pub fn block_bytes(&self) -> u64 {
        u64::from(self.block_sectors) * 512
    }

    /// Blocks per set.
    pub fn assoc(&self) -> u32 {
        self.assoc
    }

    /// The number of sets.
    pub fn num_sets(&self) -> u32 {
        self.num_sets
    }

    /// How disk blocks map to sets.
    pub fn mapping(&self) -> SetMapping {
        self.mapping
    }

    /// Cache blocks in all sets.
    pub fn cache_blocks(&self) -> u64 {
        u64::from(self.num_sets) * u64::from(self.assoc)
    }

    /// The disk block holding `sector`.
    pub fn block_of_sector(&self, sector: u64) -> u64 {
        sector / u64::from(self.block_sectors)
    }

    /// The set of disk block `block`.
    pub fn set_of(&self, block: u64) -> u32 {
        let sets = u64::from(self.num_sets);
        let set = match self.mapping {
            SetMapping::Linear => (block / u64::from(self.assoc)) % sets,
            SetMapping::Hashed { cluster_blocks } => {
                mix64(block >> cluster_blocks.trailing_zeros()) % sets
            }
        };
        // `set < num_sets`, which is a u32.
        set as u32
    }
}

impl fmt::Debug for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Geometry")
            .field("block_bytes", &self.block_bytes())
            .field("assoc", &self.assoc)
            .field("num_sets", &self.num_sets)
            .field("mapping", &self.mapping)
            .finish()
    }
}

/// A 64-bit finalizer (splitmix64's): every input bit affects every output bit,
/// so neighbouring clusters land in unrelated sets.
pub(crate) fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_mapping_keeps_runs_of_assoc_blocks_together() {
        let g = Geometry::new(8, 4, 8, SetMapping::Linear).unwrap();
        let sets: Vec<u32> = (0..40).map(|b| g.set_of(b)).collect();
        assert_eq!(&sets[..12], &[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(sets[32], 0, "wraps after num_sets runs");
    }

    #[test]
    fn hashed_mapping_spreads_clusters_over_sets() {
        let g = Geometry::new(8, 512, 64, SetMapping::Hashed { cluster_blocks: 64 }).unwrap();
        let mut counts = vec![0u32; 64];
        for cluster in 0..64 * 100u64 {
            let set = g.set_of(cluster * 64);
            assert!((0..64).all(|i| g.set_of(cluster * 64 + i) == set));
            counts[set as usize] += 1;
        }
        // 100 clusters per set on average; a fair hash stays well within 50..150.
        assert!(counts.iter().all(|&c| (50..150).contains(&c)), "{counts:?}");
    }

    #[test]
    fn bad_geometries_are_refused() {
        assert_eq!(Geometry::new(6, 512, 1, SetMapping::Linear), Err(GeometryError::BlockSize(6)));
        assert!(matches!(
            Geometry::new(8, 3, 1, SetMapping::Linear),
            Err(GeometryError::Assoc { .. })
        ));
        assert!(matches!(
            Geometry::new(8, 65536, 1, SetMapping::Linear),
            Err(GeometryError::Assoc { .. })
        ));
        assert_eq!(Geometry::new(8, 512, 0, SetMapping::Linear), Err(GeometryError::NoSets));
        assert_eq!(
            Geometry::new(8, 512, 1, SetMapping::Hashed { cluster_blocks: 48 }),
            Err(GeometryError::Cluster(48))
        );
    }
}
