//! Where everything lives on the SSD: superblock, metadata sets and data blocks.

use std::ops::Range;

use super::error::{FormatError, GeometryError};
use super::slot::{DecodedSlots, SLOT_BYTES, SlotRecord, decode_slots, encode_slots};
use super::{
    MAX_ASSOC, MAX_BLOCK_BYTES, MAX_MD_BLOCK_BYTES, MD_START, MIN_ASSOC, MIN_BLOCK_BYTES,
    MIN_MD_BLOCK_BYTES, SECTOR_BYTES,
};

/// [`SLOT_BYTES`] as a byte-offset quantity.
const SLOT: u64 = SLOT_BYTES as u64;

/// The byte layout of a cache on its SSD, computed from its geometry.
///
/// Every offset it hands out is a byte offset from the start of the SSD. A
/// `Layout` always satisfies the format's invariants: no metadata block covers two
/// sets, no slot crosses a 512-byte sector boundary, the data area starts aligned
/// to the block size, and the whole cache ends at [`total_bytes`](Self::total_bytes)
/// without overflowing a `u64`. Whether it fits a given SSD is
/// [`fits`](Self::fits).
///
/// ```
/// use flashcache_core::format::Layout;
///
/// // 4 KiB blocks, 512-way sets, 1024 sets, 4 KiB metadata blocks.
/// let layout = Layout::new(4096, 512, 1024, 4096)?;
/// assert_eq!(layout.md_blocks_per_set(), 2); // 512 slots * 16 bytes = 8 KiB
/// assert_eq!(layout.md_start(), 4096);
/// assert_eq!(layout.md_bytes(), 1024 * 2 * 4096);
/// assert_eq!(layout.data_start(), 4096 + 1024 * 2 * 4096);
/// // Slot of set 3, way 5 (global index 3 * 512 + 5):
/// assert_eq!(layout.slot_offset(3 * 512 + 5), Some(4096 + 3 * 2 * 4096 + 5 * 16));
/// // Cache block 7 holds data at:
/// assert_eq!(layout.block_offset(7), Some(layout.data_start() + 7 * 4096));
///
/// // The largest cache of this shape on a 1 GiB SSD:
/// let blocks = Layout::max_blocks_for(1 << 30, 4096, 512, 4096)?;
/// assert_eq!(blocks % 512, 0);
/// let sets = u32::try_from(blocks / 512).unwrap();
/// assert!(Layout::new(4096, 512, sets, 4096)?.fits(1 << 30));
/// assert!(!Layout::new(4096, 512, sets + 1, 4096)?.fits(1 << 30));
/// # Ok::<(), flashcache_core::format::FormatError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    block_bytes: u64,
    assoc: u32,
    num_sets: u32,
    md_block_bytes: u32,
    md_blocks_per_set: u32,
    md_bytes: u64,
    data_start: u64,
    total_bytes: u64,
}

impl Layout {
    /// Computes the layout of a cache of `num_sets` sets of `assoc` blocks of
    /// `block_bytes` bytes each, with metadata blocks of `md_block_bytes` bytes.
    ///
    /// Fails with [`FormatError::InvalidGeometry`] unless `block_bytes` is a power
    /// of two from [`MIN_BLOCK_BYTES`](super::MIN_BLOCK_BYTES) to
    /// [`MAX_BLOCK_BYTES`](super::MAX_BLOCK_BYTES), `assoc` a power of two from
    /// [`MIN_ASSOC`](super::MIN_ASSOC) to [`MAX_ASSOC`](super::MAX_ASSOC),
    /// `num_sets` at least 1, `md_block_bytes` a power of two from
    /// [`MIN_MD_BLOCK_BYTES`](super::MIN_MD_BLOCK_BYTES) to
    /// [`MAX_MD_BLOCK_BYTES`](super::MAX_MD_BLOCK_BYTES), and the cache's end
    /// offset fits a `u64`.
    pub fn new(
        block_bytes: u64,
        assoc: u32,
        num_sets: u32,
        md_block_bytes: u32,
    ) -> Result<Self, FormatError> {
        let per_set = PerSet::new(block_bytes, assoc, md_block_bytes)?;
        if num_sets == 0 {
            return Err(GeometryError::NoSets.into());
        }
        let (md_bytes, data_start, total_bytes) =
            per_set.extent(num_sets).ok_or(GeometryError::Overflow)?;
        Ok(Self {
            block_bytes,
            assoc,
            num_sets,
            md_block_bytes,
            md_blocks_per_set: per_set.md_blocks_per_set,
            md_bytes,
            data_start,
            total_bytes,
        })
    }

    /// The largest number of cache blocks (`num_sets * assoc`, for any set count
    /// from 1 to `u32::MAX`) of this shape whose layout fits in `ssd_bytes`, or 0
    /// if not even one set fits.
    ///
    /// The result is maximal: a layout with one more set would not fit. Fails with
    /// [`FormatError::InvalidGeometry`] if the shape itself is invalid (see
    /// [`new`](Self::new)).
    pub fn max_blocks_for(
        ssd_bytes: u64,
        block_bytes: u64,
        assoc: u32,
        md_block_bytes: u32,
    ) -> Result<u64, FormatError> {
        let per_set = PerSet::new(block_bytes, assoc, md_block_bytes)?;
        let fits = |sets: u32| per_set.extent(sets).is_some_and(|(_, _, end)| end <= ssd_bytes);
        // The data blocks alone bound the set count; `fits` is monotonic in it.
        let bound = ssd_bytes / per_set.data_bytes_per_set;
        let mut hi = u32::try_from(bound).unwrap_or(u32::MAX);
        let mut lo = 0u32;
        if fits(hi) {
            lo = hi;
        }
        // Invariant: `lo` fits (or is 0), `hi` does not fit unless `lo == hi`.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(u64::from(lo) * u64::from(assoc))
    }

    /// The cache block size in bytes.
    #[must_use]
    pub const fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// The cache block size in 512-byte sectors.
    #[must_use]
    pub const fn block_sectors(&self) -> u64 {
        self.block_bytes / SECTOR_BYTES
    }

    /// The associativity: cache blocks (and slots) per set.
    #[must_use]
    pub const fn assoc(&self) -> u32 {
        self.assoc
    }

    /// The number of sets.
    #[must_use]
    pub const fn num_sets(&self) -> u32 {
        self.num_sets
    }

    /// The number of cache blocks (and slots): `num_sets * assoc`.
    #[must_use]
    pub const fn num_blocks(&self) -> u64 {
        self.num_sets as u64 * self.assoc as u64
    }

    /// The metadata block size in bytes.
    #[must_use]
    pub const fn md_block_bytes(&self) -> u32 {
        self.md_block_bytes
    }

    /// Metadata blocks per set: `ceil(assoc * SLOT_BYTES / md_block_bytes)`.
    #[must_use]
    pub const fn md_blocks_per_set(&self) -> u32 {
        self.md_blocks_per_set
    }

    /// Slots per metadata block: `md_block_bytes / SLOT_BYTES` (the last block of
    /// a set may use fewer).
    #[must_use]
    pub const fn slots_per_md_block(&self) -> u32 {
        self.md_block_bytes / SLOT_BYTES as u32
    }

    /// The number of metadata blocks: `num_sets * md_blocks_per_set`.
    #[must_use]
    pub const fn md_block_count(&self) -> u64 {
        self.num_sets as u64 * self.md_blocks_per_set as u64
    }

    /// The byte offset of the metadata area ([`MD_START`](super::MD_START)).
    #[must_use]
    pub const fn md_start(&self) -> u64 {
        MD_START
    }

    /// The size of the metadata area in bytes.
    #[must_use]
    pub const fn md_bytes(&self) -> u64 {
        self.md_bytes
    }

    /// The byte offset of the data area: the end of the metadata area rounded up to
    /// the block size.
    #[must_use]
    pub const fn data_start(&self) -> u64 {
        self.data_start
    }

    /// The size of the data area in bytes: `num_blocks * block_bytes`.
    #[must_use]
    pub const fn data_bytes(&self) -> u64 {
        self.total_bytes - self.data_start
    }

    /// The end of the last data block: the SSD must be at least this large.
    #[must_use]
    pub const fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Whether the cache fits an SSD of `ssd_bytes` bytes.
    #[must_use]
    pub const fn fits(&self, ssd_bytes: u64) -> bool {
        self.total_bytes <= ssd_bytes
    }

    /// [`fits`](Self::fits) as a result: [`GeometryError::DoesNotFit`] if it does not.
    pub fn check_fits(&self, ssd_bytes: u64) -> Result<(), FormatError> {
        if self.fits(ssd_bytes) {
            Ok(())
        } else {
            Err(GeometryError::DoesNotFit { needed_bytes: self.total_bytes, ssd_bytes }.into())
        }
    }

    /// The global slot (and cache block) index of `way` in `set`:
    /// `set * assoc + way`, or `None` if either is out of range.
    #[must_use]
    pub fn slot_index(&self, set: u32, way: u32) -> Option<u64> {
        (set < self.num_sets && way < self.assoc)
            .then(|| u64::from(set) * u64::from(self.assoc) + u64::from(way))
    }

    /// The set and way of global slot index `index`, or `None` if out of range.
    #[must_use]
    pub fn set_and_way(&self, index: u64) -> Option<(u32, u32)> {
        if index >= self.num_blocks() {
            return None;
        }
        let assoc = u64::from(self.assoc);
        Some((u32::try_from(index / assoc).ok()?, u32::try_from(index % assoc).ok()?))
    }

    /// The byte offset of set `set`'s first metadata block, or `None` if out of
    /// range.
    #[must_use]
    pub fn set_md_offset(&self, set: u32) -> Option<u64> {
        self.md_block_offset(u64::from(set) * u64::from(self.md_blocks_per_set))
            .filter(|_| set < self.num_sets)
    }

    /// The byte offset of the slot with global index `index`, or `None` if out of
    /// range.
    #[must_use]
    pub fn slot_offset(&self, index: u64) -> Option<u64> {
        let (md_block, within) = self.md_block_of_slot(index)?;
        Some(self.md_block_offset(md_block)? + within as u64)
    }

    /// The byte offset of the data of cache block `index` (`set * assoc + way`),
    /// or `None` if out of range.
    #[must_use]
    pub fn block_offset(&self, index: u64) -> Option<u64> {
        (index < self.num_blocks()).then(|| self.data_start + index * self.block_bytes)
    }

    /// The byte offset of metadata block `md_block` (numbered from 0 across all
    /// sets: set `s` owns blocks `s * md_blocks_per_set ..`), or `None` if out of
    /// range.
    #[must_use]
    pub fn md_block_offset(&self, md_block: u64) -> Option<u64> {
        (md_block < self.md_block_count())
            .then(|| MD_START + md_block * u64::from(self.md_block_bytes))
    }

    /// The global indices of the slots stored in metadata block `md_block`, or
    /// `None` if out of range. They all belong to one set; the last metadata block
    /// of a set holds fewer slots than [`slots_per_md_block`](Self::slots_per_md_block)
    /// when `assoc * SLOT_BYTES` is not a multiple of the metadata block size.
    #[must_use]
    pub fn md_block_slots(&self, md_block: u64) -> Option<Range<u64>> {
        if md_block >= self.md_block_count() {
            return None;
        }
        let per_set = u64::from(self.md_blocks_per_set);
        let (set, k) = (md_block / per_set, md_block % per_set);
        let assoc = u64::from(self.assoc);
        let first_way = k * u64::from(self.slots_per_md_block());
        let end_way = (first_way + u64::from(self.slots_per_md_block())).min(assoc);
        Some(set * assoc + first_way..set * assoc + end_way)
    }

    /// The metadata block holding slot `index`, and the slot's byte offset within
    /// it, or `None` if out of range.
    #[must_use]
    pub fn md_block_of_slot(&self, index: u64) -> Option<(u64, usize)> {
        let (set, way) = self.set_and_way(index)?;
        let spb = self.slots_per_md_block();
        let md_block = u64::from(set) * u64::from(self.md_blocks_per_set) + u64::from(way / spb);
        let within = usize::try_from(way % spb).ok()? * SLOT_BYTES;
        Some((md_block, within))
    }

    /// Encodes metadata block `md_block` from the records of its slots (exactly
    /// `md_block_slots(md_block).len()` of them, in slot order), zero-filling the
    /// unused tail, as `md_block_bytes` bytes ready to write at
    /// [`md_block_offset`](Self::md_block_offset).
    pub fn encode_md_block(
        &self,
        md_block: u64,
        records: &[SlotRecord],
    ) -> Result<Vec<u8>, FormatError> {
        let mut out = vec![0; self.md_block_len()];
        self.encode_md_block_into(md_block, records, &mut out)?;
        Ok(out)
    }

    /// [`encode_md_block`](Self::encode_md_block) into a caller's buffer of exactly
    /// `md_block_bytes` bytes (for example an aligned I/O buffer).
    pub fn encode_md_block_into(
        &self,
        md_block: u64,
        records: &[SlotRecord],
        out: &mut [u8],
    ) -> Result<(), FormatError> {
        let slots = self.md_block_slots_checked(md_block)?;
        self.check_md_len(out.len())?;
        let expected = slots_len(&slots);
        if records.len() != expected {
            return Err(FormatError::SlotCount { md_block, expected, found: records.len() });
        }
        encode_slots(records, slots.start, out)
    }

    /// Decodes metadata block `md_block` (`md_block_bytes` bytes as read from
    /// [`md_block_offset`](Self::md_block_offset)): one entry per slot of
    /// [`md_block_slots`](Self::md_block_slots), every bad slot reported. Bytes past
    /// the set's last slot are ignored.
    pub fn decode_md_block(
        &self,
        md_block: u64,
        bytes: &[u8],
    ) -> Result<DecodedSlots, FormatError> {
        let slots = self.md_block_slots_checked(md_block)?;
        self.check_md_len(bytes.len())?;
        let used = slots_len(&slots) * SLOT_BYTES;
        let used_bytes = bytes.get(..used).ok_or(FormatError::BufferSize {
            what: "a metadata block",
            expected: self.md_block_len(),
            found: bytes.len(),
        })?;
        decode_slots(used_bytes, slots.start)
    }

    fn md_block_len(&self) -> usize {
        // At most MAX_MD_BLOCK_BYTES (64 KiB), which fits any `usize` of 32+ bits.
        usize::try_from(self.md_block_bytes).unwrap_or(usize::MAX)
    }

    fn md_block_slots_checked(&self, md_block: u64) -> Result<Range<u64>, FormatError> {
        self.md_block_slots(md_block)
            .ok_or(FormatError::NoSuchMdBlock { md_block, count: self.md_block_count() })
    }

    fn check_md_len(&self, len: usize) -> Result<(), FormatError> {
        if len == self.md_block_len() {
            Ok(())
        } else {
            Err(FormatError::BufferSize {
                what: "a metadata block",
                expected: self.md_block_len(),
                found: len,
            })
        }
    }
}

/// The number of slots in a range of slot indices (at most `MAX_MD_BLOCK_BYTES / 16`).
fn slots_len(slots: &Range<u64>) -> usize {
    usize::try_from(slots.end - slots.start).unwrap_or(usize::MAX)
}

/// The per-set quantities of a validated shape (block size, associativity and
/// metadata block size), shared by [`Layout::new`] and [`Layout::max_blocks_for`].
#[derive(Debug, Clone, Copy)]
struct PerSet {
    block_bytes: u64,
    md_blocks_per_set: u32,
    /// Metadata bytes per set: `md_blocks_per_set * md_block_bytes`.
    md_bytes_per_set: u64,
    /// Data bytes per set: `assoc * block_bytes`.
    data_bytes_per_set: u64,
}

impl PerSet {
    fn new(block_bytes: u64, assoc: u32, md_block_bytes: u32) -> Result<Self, GeometryError> {
        if !block_bytes.is_power_of_two()
            || !(MIN_BLOCK_BYTES..=MAX_BLOCK_BYTES).contains(&block_bytes)
        {
            return Err(GeometryError::BlockSize { block_bytes });
        }
        if !assoc.is_power_of_two() || !(MIN_ASSOC..=MAX_ASSOC).contains(&assoc) {
            return Err(GeometryError::Assoc { assoc });
        }
        if !md_block_bytes.is_power_of_two()
            || !(MIN_MD_BLOCK_BYTES..=MAX_MD_BLOCK_BYTES).contains(&md_block_bytes)
        {
            return Err(GeometryError::MdBlockSize { md_block_bytes });
        }
        // assoc <= 2^15 and SLOT <= 2^4: no overflow; md_block_bytes > 0.
        let md_blocks = (u64::from(assoc) * SLOT).div_ceil(u64::from(md_block_bytes));
        let md_blocks_per_set = u32::try_from(md_blocks).map_err(|_| GeometryError::Overflow)?;
        Ok(Self {
            block_bytes,
            md_blocks_per_set,
            md_bytes_per_set: md_blocks * u64::from(md_block_bytes),
            // block_bytes <= 2^40 and assoc <= 2^15: no overflow.
            data_bytes_per_set: u64::from(assoc) * block_bytes,
        })
    }

    /// `(md_bytes, data_start, total_bytes)` for `sets` sets, or `None` on overflow.
    fn extent(&self, sets: u32) -> Option<(u64, u64, u64)> {
        let sets = u64::from(sets);
        let md_bytes = sets.checked_mul(self.md_bytes_per_set)?;
        let md_end = MD_START.checked_add(md_bytes)?;
        let data_start = md_end.checked_next_multiple_of(self.block_bytes)?;
        let total = data_start.checked_add(sets.checked_mul(self.data_bytes_per_set)?)?;
        Some((md_bytes, data_start, total))
    }
}
