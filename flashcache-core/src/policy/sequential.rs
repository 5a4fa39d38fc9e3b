//! Sequential-stream detection (flashcache's `skip_seq_thresh_kb`).

/// How many streams are tracked at once (flashcache: 32).
pub const TRACKED_STREAMS: usize = 32;

#[derive(Clone, Copy, Debug, Default)]
struct Stream {
    /// The sector just past the stream's last I/O.
    end: u64,
    /// Sectors seen in this stream so far.
    sectors: u64,
    /// For least-recently-used replacement of streams.
    last_use: u64,
}

/// Tracks up to [`TRACKED_STREAMS`] sequential streams. An I/O that starts
/// exactly where a stream ended extends it; once a stream is longer than the
/// threshold, its I/O is reported sequential (to bypass the cache). The first
/// threshold's worth of a stream is still cached, as in flashcache. Any other
/// I/O starts a new stream in place of the least recently used one.
///
/// ```
/// use flashcache_core::policy::SequentialDetector;
/// let mut seq = SequentialDetector::new(64); // 64 KiB
/// let mut skipped = 0;
/// for i in 0..32u64 {
///     if seq.observe(i * 8, 8) { skipped += 1; } // 4 KiB I/Os back to back
/// }
/// assert_eq!(skipped, 32 - 16); // the first 64 KiB are cached
/// assert!(!seq.observe(1_000_000, 8)); // a random I/O is not sequential
/// ```
#[derive(Clone, Debug)]
pub struct SequentialDetector {
    thresh_sectors: u64,
    streams: [Stream; TRACKED_STREAMS],
    clock: u64,
}

impl SequentialDetector {
    /// A detector with a threshold of `thresh_kb` KiB; 0 turns detection off.
    pub fn new(thresh_kb: u64) -> SequentialDetector {
        SequentialDetector {
            thresh_sectors: thresh_kb.saturating_mul(2),
            streams: [Stream::default(); TRACKED_STREAMS],
            clock: 0,
        }
    }

    /// Changes the threshold (0 = off); the streams are kept.
    pub fn set_threshold_kb(&mut self, thresh_kb: u64) {
        self.thresh_sectors = thresh_kb.saturating_mul(2);
    }

    /// Records an I/O of `sectors` at `sector`; returns whether it belongs to a
    /// stream already past the threshold (so it should bypass the cache).
    pub fn observe(&mut self, sector: u64, sectors: u64) -> bool {
        if self.thresh_sectors == 0 {
            return false;
        }
        self.clock += 1;
        let end = sector.saturating_add(sectors);
        if let Some(s) = self.streams.iter_mut().find(|s| s.sectors > 0 && s.end == sector) {
            let sequential = s.sectors >= self.thresh_sectors;
            s.end = end;
            s.sectors = s.sectors.saturating_add(sectors);
            s.last_use = self.clock;
            return sequential;
        }
        // A new stream replaces the least recently used one.
        if let Some(s) = self.streams.iter_mut().min_by_key(|s| s.last_use) {
            *s = Stream { end, sectors, last_use: self.clock };
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_streams_are_told_apart_from_random_io() {
        let mut seq = SequentialDetector::new(32);
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let (mut a, mut b) = (0u64, 10_000_000u64);
        let (mut skipped_seq, mut skipped_random) = (0, 0);
        for _ in 0..200 {
            skipped_seq += u32::from(seq.observe(a, 8)) + u32::from(seq.observe(b, 8));
            a += 8;
            b += 8;
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            skipped_random += u32::from(seq.observe((rng >> 20) % 1_000_000_000 * 8, 8));
        }
        // Each stream's first 32 KiB (8 I/Os) is cached, the rest skipped.
        assert_eq!(skipped_seq, 2 * (200 - 8));
        assert_eq!(skipped_random, 0);
    }

    #[test]
    fn zero_threshold_is_off() {
        let mut seq = SequentialDetector::new(0);
        assert!((0..100).all(|i| !seq.observe(i * 8, 8)));
    }
}
