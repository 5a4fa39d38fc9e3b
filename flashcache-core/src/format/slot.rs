//! Metadata slots: the 16-byte on-SSD record of one cache block.

use super::crc::Crc32c;
use super::error::{FormatError, SlotCorruption};

/// The size of one metadata slot in bytes.
pub const SLOT_BYTES: usize = 16;

/// How many slots fill one 512-byte sector exactly (so none straddles two).
pub const SLOTS_PER_SECTOR: usize = super::SECTOR_BYTES as usize / SLOT_BYTES;

// A slot must never straddle a sector: the sector size must be a multiple of it.
const _: () = assert!((super::SECTOR_BYTES as usize).is_multiple_of(SLOT_BYTES));

/// The state of a cache block as recorded in its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotState {
    /// The cache block holds nothing (also what a never-written, all-zero slot means).
    Invalid,
    /// The cache block holds a clean copy of its disk block.
    Valid,
    /// The cache block holds data newer than its disk block (write-back).
    Dirty,
}

impl SlotState {
    /// The byte stored at slot offset 6.
    #[must_use]
    pub const fn to_raw(self) -> u8 {
        match self {
            Self::Invalid => 0,
            Self::Valid => 1,
            Self::Dirty => 2,
        }
    }

    /// The state a raw byte names, if any.
    #[must_use]
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0 => Some(Self::Invalid),
            1 => Some(Self::Valid),
            2 => Some(Self::Dirty),
            _ => None,
        }
    }
}

/// The decoded content of one metadata slot.
///
/// ```
/// use flashcache_core::format::{FormatError, SlotRecord, SlotState};
///
/// let rec = SlotRecord { block: 123_456, state: SlotState::Dirty, generation: 7 };
/// let bytes = rec.encode(42);
/// assert_eq!(SlotRecord::decode(&bytes, 42), Ok(rec));
/// // The slot's index is in its CRC: the same bytes at another slot are rejected.
/// assert_eq!(SlotRecord::decode(&bytes, 43), Err(FormatError::TornSlot { index: 43 }));
/// // A slot that was never written reads as invalid.
/// assert_eq!(SlotRecord::decode(&[0; 16], 9), Ok(SlotRecord::NEVER_WRITTEN));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotRecord {
    /// The disk block cached (`dbn / block_sectors`); at most [`Self::MAX_BLOCK`].
    pub block: u64,
    /// The cache block's state.
    pub state: SlotState,
    /// The low 32 bits of the superblock generation when the slot was written.
    pub generation: u32,
}

impl SlotRecord {
    /// The largest block number a slot can hold (48 bits).
    pub const MAX_BLOCK: u64 = (1 << 48) - 1;

    /// What an all-zero, never-written slot decodes as.
    pub const NEVER_WRITTEN: Self = Self { block: 0, state: SlotState::Invalid, generation: 0 };

    /// Encodes the record as the slot with global index `index` (`set * assoc + way`).
    ///
    /// `block` must be at most [`Self::MAX_BLOCK`], which holds for every disk a
    /// valid [`Superblock`](super::Superblock) describes. If it is larger (a caller
    /// bug) this does not panic and does not store a wrong block number: it writes
    /// a slot whose CRC deliberately mismatches, so it reads back as
    /// [`FormatError::TornSlot`]. Use [`try_encode`](Self::try_encode) to catch
    /// that at write time instead.
    #[must_use]
    pub fn encode(&self, index: u64) -> [u8; SLOT_BYTES] {
        match self.try_encode(index) {
            Ok(bytes) => bytes,
            Err(_) => {
                // All-ones block bytes make the slot non-zero (so it is not taken for
                // a never-written slot) and the inverted CRC can never verify.
                let head = slot_head(Self::MAX_BLOCK, self.state, self.generation);
                join_slot(head, !slot_crc(&head, index))
            }
        }
    }

    /// Encodes the record as the slot with global index `index`, or fails with
    /// [`FormatError::BlockOutOfRange`] if `block` does not fit 48 bits.
    pub fn try_encode(&self, index: u64) -> Result<[u8; SLOT_BYTES], FormatError> {
        if self.block > Self::MAX_BLOCK {
            return Err(FormatError::BlockOutOfRange { block: self.block, max: Self::MAX_BLOCK });
        }
        let head = slot_head(self.block, self.state, self.generation);
        Ok(join_slot(head, slot_crc(&head, index)))
    }

    /// Decodes the slot with global index `index`.
    ///
    /// An all-zero slot (never written) decodes as [`Self::NEVER_WRITTEN`]. Any
    /// other slot must carry the CRC of its bytes 0..12 followed by `index`, else
    /// it is [`FormatError::TornSlot`]; a slot whose CRC matches but whose state or
    /// reserved byte is invalid is [`FormatError::CorruptSlot`].
    pub fn decode(bytes: &[u8; SLOT_BYTES], index: u64) -> Result<Self, FormatError> {
        if bytes.iter().all(|&b| b == 0) {
            return Ok(Self::NEVER_WRITTEN);
        }
        let [b0, b1, b2, b3, b4, b5, state, reserved, g0, g1, g2, g3, c0, c1, c2, c3] = *bytes;
        let head = [b0, b1, b2, b3, b4, b5, state, reserved, g0, g1, g2, g3];
        if u32::from_le_bytes([c0, c1, c2, c3]) != slot_crc(&head, index) {
            return Err(FormatError::TornSlot { index });
        }
        let Some(state) = SlotState::from_raw(state) else {
            return Err(FormatError::CorruptSlot {
                index,
                reason: SlotCorruption::State { found: state },
            });
        };
        if reserved != 0 {
            return Err(FormatError::CorruptSlot {
                index,
                reason: SlotCorruption::Reserved { found: reserved },
            });
        }
        Ok(Self {
            block: u64::from_le_bytes([b0, b1, b2, b3, b4, b5, 0, 0]),
            state,
            generation: u32::from_le_bytes([g0, g1, g2, g3]),
        })
    }
}

/// A slot's bytes 0..12: the low 48 bits of `block`, the state, a zero reserved
/// byte and the generation.
fn slot_head(block: u64, state: SlotState, generation: u32) -> [u8; 12] {
    let [b0, b1, b2, b3, b4, b5, _, _] = block.to_le_bytes();
    let [g0, g1, g2, g3] = generation.to_le_bytes();
    [b0, b1, b2, b3, b4, b5, state.to_raw(), 0, g0, g1, g2, g3]
}

/// A whole slot from its bytes 0..12 and its CRC.
fn join_slot(head: [u8; 12], crc: u32) -> [u8; SLOT_BYTES] {
    let [h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11] = head;
    let [c0, c1, c2, c3] = crc.to_le_bytes();
    [h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11, c0, c1, c2, c3]
}

/// The CRC of a slot: CRC-32C over its bytes 0..12 followed by `index` (u64 LE).
fn slot_crc(head: &[u8; 12], index: u64) -> u32 {
    let mut crc = Crc32c::new();
    crc.update(head);
    crc.update(&index.to_le_bytes());
    crc.finish()
}

/// Encodes `records` as consecutive slots with global indices `first_index`,
/// `first_index + 1`, … into the start of `out`, and zeroes the rest of `out`
/// (so one call fills a whole metadata block, its unused tail included).
///
/// Fails with [`FormatError::BufferSize`] if `out` is shorter than
/// `records.len() * SLOT_BYTES`, or [`FormatError::BlockOutOfRange`] if a record's
/// block does not fit 48 bits; `out` is left unchanged on failure.
///
/// ```
/// use flashcache_core::format::{decode_slots, encode_slots, SlotRecord, SlotState};
///
/// let records = [
///     SlotRecord { block: 1, state: SlotState::Valid, generation: 3 },
///     SlotRecord { block: 9, state: SlotState::Dirty, generation: 3 },
/// ];
/// let mut md_block = vec![0xAA; 4096];
/// encode_slots(&records, 64, &mut md_block)?;
/// let decoded = decode_slots(&md_block[..32], 64)?;
/// assert!(decoded.is_clean());
/// assert_eq!(decoded.records().collect::<Vec<_>>(), [(64, &records[0]), (65, &records[1])]);
/// # Ok::<(), flashcache_core::format::FormatError>(())
/// ```
pub fn encode_slots(
    records: &[SlotRecord],
    first_index: u64,
    out: &mut [u8],
) -> Result<(), FormatError> {
    let needed = records.len().checked_mul(SLOT_BYTES);
    if needed.is_none_or(|needed| needed > out.len()) {
        return Err(FormatError::BufferSize {
            what: "a slot buffer (at least records * 16)",
            expected: needed.unwrap_or(usize::MAX),
            found: out.len(),
        });
    }
    if let Some(bad) = records.iter().find(|r| r.block > SlotRecord::MAX_BLOCK) {
        return Err(FormatError::BlockOutOfRange { block: bad.block, max: SlotRecord::MAX_BLOCK });
    }
    let (slots, rest) = out.as_chunks_mut::<SLOT_BYTES>();
    let mut index = first_index;
    for (i, slot) in slots.iter_mut().enumerate() {
        *slot = match records.get(i) {
            Some(record) => record.encode(index),
            None => [0; SLOT_BYTES],
        };
        index = index.wrapping_add(1);
    }
    rest.fill(0);
    Ok(())
}

/// Decodes every slot of `bytes` (a whole number of slots), the first having
/// global index `first_index`, and reports every bad slot rather than stopping at
/// the first one.
///
/// Fails only with [`FormatError::BufferSize`] when `bytes.len()` is not a
/// multiple of [`SLOT_BYTES`]; torn and corrupt slots are listed in the result.
pub fn decode_slots(bytes: &[u8], first_index: u64) -> Result<DecodedSlots, FormatError> {
    if !bytes.len().is_multiple_of(SLOT_BYTES) {
        return Err(FormatError::BufferSize {
            what: "a slot buffer (a multiple of 16)",
            expected: bytes.len() - bytes.len() % SLOT_BYTES,
            found: bytes.len(),
        });
    }
    let mut index = first_index;
    let slots = bytes
        .as_chunks::<SLOT_BYTES>()
        .0
        .iter()
        .map(|slot| {
            let decoded = SlotRecord::decode(slot, index);
            index = index.wrapping_add(1);
            decoded
        })
        .collect();
    Ok(DecodedSlots { first_index, slots })
}

/// The outcome of decoding a run of slots: every slot's record or error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedSlots {
    /// The global index of the first slot.
    pub first_index: u64,
    /// One entry per slot, in order: slot `first_index + i` is `slots[i]`.
    pub slots: Vec<Result<SlotRecord, FormatError>>,
}

impl DecodedSlots {
    /// Whether every slot decoded.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.slots.iter().all(Result::is_ok)
    }

    /// The errors of the bad slots, in slot order.
    pub fn errors(&self) -> impl Iterator<Item = &FormatError> {
        self.slots.iter().filter_map(|s| s.as_ref().err())
    }

    /// The global indices of the bad slots, in order.
    #[must_use]
    pub fn bad_indices(&self) -> Vec<u64> {
        self.indexed().filter(|(_, s)| s.is_err()).map(|(i, _)| i).collect()
    }

    /// The good slots with their global indices, in order.
    pub fn records(&self) -> impl Iterator<Item = (u64, &SlotRecord)> {
        self.indexed().filter_map(|(i, s)| s.as_ref().ok().map(|r| (i, r)))
    }

    fn indexed(&self) -> impl Iterator<Item = (u64, &Result<SlotRecord, FormatError>)> {
        let mut index = self.first_index;
        self.slots.iter().map(move |s| {
            let i = index;
            index = index.wrapping_add(1);
            (i, s)
        })
    }
}
