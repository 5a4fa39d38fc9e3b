//! # flashcache-core: a crash-safe SSD cache in front of a disk
//!
//! A set-associative block cache in the style of Facebook's flashcache, on
//! [`dmio`] and [`kcopyd`], that honours flushes and survives power loss. Two
//! layers:
//!
//! 1. **The policy core** ([`policy`]), pure and I/O-free: the geometry and the
//!    disk-block → set map, each set's block identities and states with a
//!    per-set lookup (15 bytes of index per cache block at 512 ways),
//!    replacement policies behind the [`policy::Replacement`] trait (FIFO, LRU,
//!    flashcache's segmented LRU, SIEVE; switchable at run time), cleaning
//!    decisions (dirty threshold, fallow clock, merged runs in disk order), the
//!    sequential-stream detector and the counters. Decisions are plain values.
//! 2. **The I/O layer** ([`cache`], [`setup`]), which executes them: [`cache::Cache`]
//!    reads and writes through the cache (synchronously from many threads, or
//!    asynchronously with callbacks and futures), flushes, discards, cleans
//!    with kcopyd in a background thread, commits metadata and recovers it.
//!
//! Beside them: the on-SSD format ([`mod@format`]: superblock, metadata slots,
//! layout, with the byte-level tables) and trace simulation ([`sim`]), which
//! replays block traces through the real policy core without any I/O.
//!
//! ```
//! use flashcache_core::cache::Cache;
//! use flashcache_core::setup::CreateOptions;
//! use flashcache_core::dmio::BlockDevice;
//!
//! # let dir = tempfile::tempdir().unwrap();
//! # let (ssd_path, disk_path) = (dir.path().join("ssd"), dir.path().join("disk"));
//! # std::fs::File::create(&ssd_path).unwrap().set_len(4 << 20).unwrap();
//! # std::fs::File::create(&disk_path).unwrap().set_len(16 << 20).unwrap();
//! let ssd = BlockDevice::open(&ssd_path).unwrap();   // a fast device (or a file)
//! let disk = BlockDevice::open(&disk_path).unwrap(); // the slow one behind it
//! let options = CreateOptions { assoc: 64, ..CreateOptions::default() }; // write-back
//! let cache = Cache::create(ssd, disk, &options).unwrap();
//! cache.write(0, &[1u8; 8192]).unwrap();
//! cache.flush().unwrap(); // durable from here on, across any crash
//! let mut buf = vec![0u8; 8192];
//! cache.read(0, &mut buf).unwrap();
//! assert_eq!(buf, vec![1u8; 8192]);
//! cache.shutdown().unwrap(); // cleans, commits, marks the cache clean
//! ```
//!
//! # What survives a crash
//!
//! - Every write that completed before a completed [`flush`](cache::Cache::flush)
//!   (or was written with [`FUA`](cache::IoFlags::FUA)) is there after a power
//!   loss, in every mode. Dirty blocks come back from the SSD's metadata with
//!   their latest flushed data (or newer).
//! - A read never returns data older than that, nor bytes of another block:
//!   metadata is written only after the data it describes is durable, and a
//!   cache slot is never given to another block while a crash could still load
//!   its old identity.
//! - Clean blocks survive an orderly [`shutdown`](cache::Cache::shutdown) (a
//!   warm restart). After a crash they are dropped: a clean slot on the SSD
//!   may describe a block whose disk copy changed since (write-around writes,
//!   evictions), and proving it current would cost a metadata write on every
//!   such change. Dirty blocks, the ones that matter, always come back.
//! - A torn or corrupted metadata slot, or a damaged superblock, is detected at
//!   load and refused with a typed error, never loaded as data.
//!
//! flashcache ignored flush requests; this crate does not. The power-loss tests
//! replay the devices' write logs at every flush and between flushes.
//!
//! # Modes and commit modes
//!
//! | mode | writes go to | read misses | dirty data |
//! |---|---|---|---|
//! | write-back | the SSD; cleaned to the disk later | filled | yes, persistent |
//! | write-back, write-only | the SSD | not filled | yes |
//! | write-through | the disk and the SSD, one dm-io fan-out write | filled | never |
//! | write-around | the disk; a cached copy is dropped | filled | never |
//!
//! | commit mode | a block's first dirtying write | cost |
//! |---|---|---|
//! | `on-flush` (default) | its slot is committed at the next flush, FUA write, or by the background thread within a second | one metadata write per set per flush: writes run at SSD speed |
//! | `sync` (flashcache's) | its slot is committed (with a preflush) before the write returns | a flush and a metadata write on every first dirtying |
//!
//! `on-flush` is the default because it is the contract of every disk with a
//! volatile write cache, which file systems and databases already handle:
//! nothing acknowledged before a flush is lost, and writes are not slowed by
//! metadata I/O. Pick `sync` for software that never sends flushes.
//!
//! # flashcache names → Rust names
//!
//! | flashcache | here |
//! |---|---|
//! | `flashcache_create -p back\|thru\|around [-w]` | [`Cache::create`](cache::Cache::create) with [`CreateOptions`](setup::CreateOptions) `mode`, `write_only` |
//! | `flashcache_load` | [`Cache::load`](cache::Cache::load) |
//! | `flashcache_destroy` | [`setup::destroy`] |
//! | `dmsetup remove` | [`Cache::shutdown`](cache::Cache::shutdown) (cleans first unless `fast_remove`) |
//! | `do_sync` / `stop_sync` | [`clean_all`](cache::Cache::clean_all) / [`stop_cleaning`](cache::Cache::stop_cleaning) |
//! | `zero_stats` | [`reset_stats`](cache::Cache::reset_stats) |
//! | sysctl `dev.flashcache.<dev>.<name>` | [`set_tunable(name, value)`](cache::Cache::set_tunable), same names: `dirty_thresh_pct`, `fallow_delay`, `fallow_clean_speed`, `max_clean_ios_set`, `max_clean_ios_total`, `clean_on_read_miss`, `clean_on_write_miss`, `reclaim_policy` (0 FIFO, 1 segmented LRU, 2 LRU, 3 SIEVE), `lru_promote_thresh`, `lru_hot_pct`, `skip_seq_thresh_kb`, `cache_all`, `fast_remove`, plus `ssd_error_threshold` |
//! | pid white/black lists | `cache_all` and the per-I/O hints [`IoFlags::NO_CACHE`](cache::IoFlags::NO_CACHE) / [`IoFlags::CACHE`](cache::IoFlags::CACHE) |
//! | `/proc/flashcache/<dev>/flashcache_stats` | [`stats()`](cache::Cache::stats), [`CacheStats`](policy::CacheStats) with the same names (`reads`, `writes`, `read_hits`, `write_hits`, `dirty_write_hits`, `replacement`, `write_replacement`, `write_invalidates`, `read_invalidates`, `pending_enqueues`, `metadata_dirties`, `metadata_cleans`, `metadata_batch`, `metadata_ssd_writes`, `cleanings`, `fallow_cleanings`, `no_room`, `front_merge`, `back_merge`, `disk_reads`, `disk_writes`, `ssd_reads`, `ssd_writes`, `uncached_reads`, `uncached_writes`, `uncached_sequential_reads`, `uncached_sequential_writes`, `clean_set_ios`, `force_clean_block`) and the error counters `disk_read_errors`, `disk_write_errors`, `ssd_read_errors`, `ssd_write_errors`, plus `read_fills`, `flushes`, `discards`, `discarded_blocks`, `clean_errors` |
//! | `dmsetup table` cached / dirty counts | [`cached_blocks`](cache::Cache::cached_blocks), [`dirty_blocks`](cache::Cache::dirty_blocks) |
//!
//! `lru_promotions` and `lru_demotions` count the segmented LRU's moves
//! between its warm and hot lists (0 under the other policies).
//! `front_merge` and `back_merge` count the blocks a cleaning write merged in
//! front of and behind the dirty block it was planned for. `pending_inval`
//! counts write-around writes and discards that waited for I/O in progress
//! on a cached block and then invalidated it. `read_invalidates` stays 0: a
//! partial or uncached read of a cached block is served from the cached copy
//! here, where flashcache dropped the block and read the disk.
//!
//! # Where this differs from flashcache
//!
//! - Flushes and FUA are honoured; metadata is crash-consistent (above).
//! - A partial-block write to a cached block updates the cached copy
//!   (read-modify-write) instead of cleaning and invalidating it.
//! - I/O is split at cache-block boundaries here, not by device-mapper; every
//!   I/O must be aligned to [`io_alignment`](cache::Cache::io_alignment) (512
//!   bytes, or 4 KiB when either device has 4 KiB sectors).
//! - An SSD error in write-through or write-around drops the block and serves
//!   the I/O from the disk; past `ssd_error_threshold` errors the cache goes to
//!   bypass. In write-back, errors are returned.
//! - Asynchronous hits complete on the dm-io completion path, as a bio's
//!   `end_io` does in the kernel: a read hit, and in write-back a write hit that
//!   needs no metadata commit first, go straight to the SSD from the caller's
//!   buffer, and the callback runs on the dm-io completion thread, so it must not
//!   block. Other asynchronous I/O runs the blocking code on a small worker pool
//!   (it grows from [`cache::ASYNC_WORKERS`] to [`cache::MAX_ASYNC_WORKERS`]
//!   threads while requests queue up, so that misses overlap).
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
