//! The statistics record: the cache's counters as of its last orderly
//! shutdown, kept in the superblock region so that they survive a restart
//! (flashcache's counters started from zero at every load).
//!
//! | offset in the superblock region | size | field |
//! |---|---|---|
//! | 2048 ([`STATS_OFFSET`]) | 8 | magic `b"FCSTATS1"` |
//! | 2056 | 4 | `len`: bytes of text |
//! | 2060 | `len` | `name=value` lines, ASCII |
//! | 2060 + `len` | 4 | CRC-32C of the magic, `len` and the text |
//!
//! The record is optional: a missing or damaged one only means the counters
//! start from zero. Names it does not know are skipped, so counters can be
//! added in later versions without a format change.

use super::crc::crc32c;

/// Where the record starts in the superblock region.
pub const STATS_OFFSET: usize = 2048;

/// The most bytes the record may take.
pub const STATS_MAX_BYTES: usize = 2048;

const STATS_MAGIC: [u8; 8] = *b"FCSTATS1";

/// Encodes counters as a record, or `None` if they do not fit in
/// [`STATS_MAX_BYTES`].
///
/// ```
/// use flashcache_core::format::{decode_stats, encode_stats};
/// let bytes = encode_stats(&[("reads", 7), ("writes", 3)]).unwrap();
/// assert_eq!(decode_stats(&bytes), Some(vec![("reads".to_string(), 7), ("writes".to_string(), 3)]));
/// assert_eq!(decode_stats(&[0; 64]), None);
/// ```
pub fn encode_stats(fields: &[(&str, u64)]) -> Option<Vec<u8>> {
    let text: String = fields.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    let len = u32::try_from(text.len()).ok()?;
    let mut out = Vec::with_capacity(16 + text.len());
    out.extend_from_slice(&STATS_MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    let crc = crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    (out.len() <= STATS_MAX_BYTES).then_some(out)
}

/// Decodes a record (the bytes from [`STATS_OFFSET`] on); `None` when there is
/// none or it is damaged.
pub fn decode_stats(bytes: &[u8]) -> Option<Vec<(String, u64)>> {
    if bytes.get(..8)? != STATS_MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?) as usize;
    let end = 12usize.checked_add(len)?;
    let text = bytes.get(12..end)?;
    let crc = u32::from_le_bytes(bytes.get(end..end + 4)?.try_into().ok()?);
    if crc32c(&bytes[..end]) != crc {
        return None;
    }
    let text = std::str::from_utf8(text).ok()?;
    Some(
        text.lines()
            .filter_map(|line| {
                let (k, v) = line.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect(),
    )
}
