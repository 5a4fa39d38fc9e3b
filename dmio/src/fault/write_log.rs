//! The write log: every write, flush, discard and write-zeroes a device completed,
//! in completion order, and the device image as of any entry (the project's
//! dm-log-writes).

use crate::device::SECTOR_SIZE;
use crate::request::DmIoOp;

/// One logged event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEntry {
    /// A write completed: `data` at `sector`.
    Write {
        /// First sector (512-byte units).
        sector: u64,
        /// The bytes written.
        data: Vec<u8>,
        /// Whether it was a FUA write (durable on completion).
        fua: bool,
        /// Whether a fault rule dropped it (it never reached the device).
        dropped: bool,
    },
    /// A flush completed. Every entry before index `issued_at` had completed when
    /// the flush was issued, so it is durable once the flush completes; entries
    /// that completed while the flush was in flight are not covered.
    Flush {
        /// The log length when the flush was issued.
        issued_at: usize,
    },
    /// A discard or write-zeroes completed: the sectors read back as zeros.
    Zero {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// [`DmIoOp::Discard`] or [`DmIoOp::WriteZeroes`].
        op: DmIoOp,
    },
}

/// The byte offset of `sector`, saturating (entries may be built by hand).
fn byte_index(sector: u64) -> usize {
    usize::try_from(sector.saturating_mul(SECTOR_SIZE)).unwrap_or(usize::MAX)
}

/// How to rebuild an image from a log prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Apply every completed (and not dropped) write: the image with no power loss.
    Everything,
    /// Apply only what is durable at that point: FUA writes, and writes covered by
    /// a completed flush. The worst case after a power loss.
    DurableOnly,
    /// Apply what is durable, plus a pseudo-random subset (chosen by `seed`) of the
    /// writes that were not yet durable, in order: one possible state after a power
    /// loss with a volatile write cache.
    Crash {
        /// Chooses the subset; the same seed gives the same image.
        seed: u64,
    },
}

/// A device's write log; see [`FaultInjector::start_write_log`](super::FaultInjector::start_write_log).
///
/// ```
/// use dmio::fault::{LogEntry, Replay, WriteLog};
/// let mut log = WriteLog::default();
/// log.push(LogEntry::Write { sector: 0, data: vec![1; 512], fua: false, dropped: false });
/// log.push(LogEntry::Flush { issued_at: 1 });
/// log.push(LogEntry::Write { sector: 1, data: vec![2; 512], fua: false, dropped: false });
/// let base = vec![0u8; 1024];
/// let all = log.image_at(log.len(), &base, Replay::Everything);
/// assert_eq!((all[0], all[512]), (1, 2));
/// let durable = log.image_at(log.len(), &base, Replay::DurableOnly);
/// assert_eq!((durable[0], durable[512]), (1, 0)); // the second write was never flushed
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteLog {
    entries: Vec<LogEntry>,
}

impl WriteLog {
    /// The entries, in completion order.
    pub fn entries(&self) -> &[LogEntry] {
        &self.entries
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends an entry (the client does this; tests may build logs by hand).
    pub fn push(&mut self, entry: LogEntry) {
        self.entries.push(entry);
    }

    /// Whether entry `index` is durable once the first `upto` entries completed:
    /// it is a FUA write, or a flush among them was issued after it completed.
    pub fn is_durable(&self, index: usize, upto: usize) -> bool {
        let upto = upto.min(self.entries.len());
        if index >= upto {
            return false;
        }
        if let LogEntry::Write { fua: true, .. } = self.entries[index] {
            return true;
        }
        self.entries[..upto]
            .iter()
            .any(|e| matches!(e, LogEntry::Flush { issued_at } if *issued_at > index))
    }

    /// Applies the first `upto` entries to `image` (the device's bytes), as `mode` says.
    pub fn replay_onto(&self, upto: usize, image: &mut [u8], mode: Replay) {
        let upto = upto.min(self.entries.len());
        // The index of the last flush issued after each entry, computed once: an
        // entry is durable when some completed flush has issued_at > its index.
        let covered = self.entries[..upto]
            .iter()
            .filter_map(|e| match e {
                LogEntry::Flush { issued_at } => Some(*issued_at),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let mut rng = match mode {
            Replay::Crash { seed } => seed ^ 0x9e37_79b9_7f4a_7c15,
            _ => 0,
        };
        for (index, entry) in self.entries[..upto].iter().enumerate() {
            let durable = index < covered || matches!(entry, LogEntry::Write { fua: true, .. });
            let apply = match mode {
                Replay::Everything => true,
                Replay::DurableOnly => durable,
                Replay::Crash { .. } => {
                    durable || {
                        // splitmix64: a tiny deterministic generator.
                        rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
                        let mut z = rng;
                        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                        (z ^ (z >> 31)) & 1 == 1
                    }
                }
            };
            if !apply {
                continue;
            }
            match entry {
                LogEntry::Write { sector, data, dropped: false, .. } => {
                    let start = byte_index(*sector);
                    if start < image.len() {
                        let end = start.saturating_add(data.len()).min(image.len());
                        image[start..end].copy_from_slice(&data[..end - start]);
                    }
                }
                LogEntry::Zero { sector, sectors, .. } => {
                    let start = byte_index(*sector);
                    let end = byte_index(sector.saturating_add(*sectors));
                    if start < image.len() {
                        let end = end.min(image.len());
                        image[start..end].fill(0);
                    }
                }
                LogEntry::Write { dropped: true, .. } | LogEntry::Flush { .. } => {}
            }
        }
    }

    /// The image after the first `upto` entries, starting from `base`.
    pub fn image_at(&self, upto: usize, base: &[u8], mode: Replay) -> Vec<u8> {
        let mut image = base.to_vec();
        self.replay_onto(upto, &mut image, mode);
        image
    }
}
