//! Counters, with flashcache's names.

use std::sync::atomic::{AtomicU64, Ordering};

use super::replacement::ListMoves;

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters, updated from many threads (relaxed atomics).
        #[derive(Debug, Default)]
        pub struct Counters {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        /// A snapshot of [`Counters`].
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct CacheStats {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl Counters {
            /// Reads every counter.
            pub fn snapshot(&self) -> CacheStats {
                CacheStats { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }

            /// Sets every counter to zero (flashcache's `zero_stats`).
            pub fn reset(&self) {
                $( self.$name.store(0, Ordering::Relaxed); )*
            }

            /// Adds `value` to the counter called `name`; false for an unknown name.
            pub fn add_named(&self, name: &str, value: u64) -> bool {
                match name {
                    $( stringify!($name) => { self.$name.fetch_add(value, Ordering::Relaxed); true } )*
                    _ => false,
                }
            }
        }

        impl CacheStats {
            /// Every counter as `(name, value)`, in a fixed order, with
            /// flashcache's names where it has the counter.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($name), self.$name), )* ]
            }

            /// The counters as `key=value` lines.
            pub fn to_key_value_lines(&self) -> String {
                self.fields().iter().map(|(k, v)| format!("{k}={v}\n")).collect()
            }
        }
    };
}

counters! {
    /// Read requests.
    reads,
    /// Write requests.
    writes,
    /// Reads served from the SSD.
    read_hits,
    /// Writes to a cached block.
    write_hits,
    /// Writes to a block that was already dirty (no metadata update needed).
    dirty_write_hits,
    /// Clean blocks evicted for a read miss.
    replacement,
    /// Clean blocks evicted for a write miss.
    write_replacement,
    /// Cached blocks invalidated by uncached reads (always 0 here: such reads
    /// are served from the cached copy).
    read_invalidates,
    /// Cached blocks invalidated by uncached writes (partial blocks, write-around).
    write_invalidates,
    /// I/Os queued behind I/O in progress on the same block.
    pending_enqueues,
    /// I/Os that waited for I/O in progress on a cached block and then
    /// invalidated it (write-around writes, discards).
    pending_inval,
    /// Slot updates clean → dirty.
    metadata_dirties,
    /// Slot updates dirty → clean.
    metadata_cleans,
    /// Slot updates committed together in one metadata write beyond the first.
    metadata_batch,
    /// Metadata writes issued to the SSD.
    metadata_ssd_writes,
    /// Dirty blocks written back to the disk.
    cleanings,
    /// Dirty blocks written back because they were idle (fallow).
    fallow_cleanings,
    /// Misses that found no evictable block (the I/O went uncached).
    no_room,
    /// Blocks merged into a cleaning write in front of the dirty block it was
    /// planned for.
    front_merge,
    /// Blocks merged into a cleaning write behind the dirty block it was
    /// planned for.
    back_merge,
    /// Reads issued to the disk.
    disk_reads,
    /// Writes issued to the disk.
    disk_writes,
    /// Reads issued to the SSD.
    ssd_reads,
    /// Writes issued to the SSD (data and metadata).
    ssd_writes,
    /// Misses filled from the disk into the SSD.
    read_fills,
    /// Reads whose misses may not be cached (the "do not cache" hint,
    /// `cache_all` off, write-only mode); their hits are still served from the
    /// cache.
    uncached_reads,
    /// Writes whose misses may not be cached (as `uncached_reads`).
    uncached_writes,
    /// Reads that bypassed the cache as part of a sequential stream.
    uncached_sequential_reads,
    /// Writes that bypassed the cache as part of a sequential stream.
    uncached_sequential_writes,
    /// Cleaning I/Os started for sets over their dirty threshold.
    clean_set_ios,
    /// Blocks cleaned to make room on a miss.
    force_clean_block,
    /// Blocks promoted to the hot list (segmented LRU).
    lru_promotions,
    /// Blocks demoted to the warm list (segmented LRU).
    lru_demotions,
    /// Flush requests.
    flushes,
    /// Discard requests.
    discards,
    /// Blocks dropped by discards.
    discarded_blocks,
    /// Disk read errors.
    disk_read_errors,
    /// Disk write errors.
    disk_write_errors,
    /// SSD read errors.
    ssd_read_errors,
    /// SSD write errors.
    ssd_write_errors,
    /// Cleanings that failed (the block stays dirty).
    clean_errors,
}

impl Counters {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts what a hit moved between the policy's lists (`lru_promotions`,
    /// `lru_demotions`).
    pub fn add_moves(&self, moves: ListMoves) {
        if moves.promoted > 0 {
            self.lru_promotions.fetch_add(u64::from(moves.promoted), Ordering::Relaxed);
        }
        if moves.demoted > 0 {
            self.lru_demotions.fetch_add(u64::from(moves.demoted), Ordering::Relaxed);
        }
    }
}

impl CacheStats {
    /// Read hits over reads (0 when there were no reads).
    pub fn read_hit_ratio(&self) -> f64 {
        ratio(self.read_hits, self.reads)
    }

    /// Write hits over writes (0 when there were no writes).
    pub fn write_hit_ratio(&self) -> f64 {
        ratio(self.write_hits, self.writes)
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 / whole as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reset_and_key_value_lines() {
        let c = Counters::default();
        Counters::bump(&c.reads);
        Counters::bump(&c.reads);
        Counters::bump(&c.read_hits);
        let s = c.snapshot();
        assert_eq!((s.reads, s.read_hits), (2, 1));
        assert_eq!(s.read_hit_ratio(), 0.5);
        let text = s.to_key_value_lines();
        assert!(text.starts_with("reads=2\nwrites=0\nread_hits=1\n"), "{text}");
        c.reset();
        assert_eq!(c.snapshot(), CacheStats::default());
    }
}
