//! The cache: an SSD in front of a disk, with reads, writes, flushes, discards
//! and cleaning, crash-safe in every mode.
//!
//! [`Cache`] executes the policy core's decisions ([`crate::policy`]) with
//! [`dmio`] (data and metadata I/O) and [`kcopyd`] (cleaning). Its threading
//! model: a blocking call runs on the caller's thread and may be made from
//! many threads at once; an asynchronous hit completes on the dm-io completion
//! thread and other asynchronous I/O on a small worker pool (see
//! [`submit_read`](Cache::submit_read)); one background thread per cache
//! cleans dirty blocks and commits metadata.
//!
//! # How an I/O goes through the cache
//!
//! An I/O is split at cache-block boundaries. Each whole, aligned block goes
//! through the cache: a read hit is served from the SSD; a read miss is read
//! from the disk and, when cacheable, filled into the SSD; a write goes to the
//! SSD (write-back), to both devices with one dm-io fan-out write
//! (write-through), or to the disk with the cached copy dropped
//! (write-around). A partial block is read from the SSD when cached (else from
//! the disk), and written with read-modify-write of the cached copy when cached
//! in write-back or write-through (else to the disk, uncached).
//!
//! Each disk block has a lock, held across its I/O: reads of a cached block
//! share it, everything else (fills, writes, cleaning, discards, uncached
//! writes) holds it alone. A read-miss fill racing a write to the same block
//! therefore never installs stale data: whichever comes second waits (and is
//! counted in `pending_enqueues`). Locks live in the block's set, so I/O to
//! different sets never waits on each other.
//!
//! # Asynchronous I/O
//!
//! A submission is checked and counted on the caller's thread: a bad range is
//! an immediate error, and then the notify callback is never called. After
//! that, the callback runs exactly once, one of two ways:
//!
//! - **Natively, from dm-io**: a read that hits a cached block, and in
//!   write-back a whole-block write that hits a cached block and changes no
//!   metadata that must be committed first, takes the block's lock without
//!   waiting and goes straight to the SSD as one dm-io request, with the
//!   caller's buffer. The callback runs on the dm-io
//!   completion thread. No thread is woken in between and no byte is copied.
//! - **On a worker** ([`ASYNC_WORKERS`] threads started on first use, and one
//!   more whenever a job would otherwise wait, up to [`MAX_ASYNC_WORKERS`]):
//!   everything else (misses and fills, write-through and write-around writes,
//!   partial-block writes, FUA, I/O spanning several blocks, a block busy with
//!   other I/O, a full dm-io reserve) runs the blocking code on a worker, which
//!   then calls the callback.
//!
//! Buffers from [`Cache::io_buffer`] are pages of the cache's dm-io pool,
//! registered with its ring: a native hit into or from one uses io_uring's
//! fixed-buffer opcodes and skips pinning the page on every I/O. Reuse them
//! across requests (each callback gets its buffer back).
//!
//! ## Callbacks must not block
//!
//! A callback may run on the dm-io completion thread, which completes every
//! I/O of the cache: while a callback runs, no other I/O completes. Keep
//! callbacks short: record the result, wake a waiter, or submit more I/O
//! (submitting from a callback never waits). The cache's blocking calls
//! (`read`, `write`, `flush`, `discard`, `clean_all`, `shutdown`) made on the
//! completion thread return [`CacheError::BlockingInCallback`] rather than
//! deadlock. Dropping the last handle of a cache in a callback is allowed: the
//! shutdown then runs on a thread of its own.
//!
//! # Durability
//!
//! [`Cache::flush`] makes every write that completed before it durable, data
//! and metadata, on both devices. A write with [`IoFlags::FUA`] is durable when
//! it returns. Dirty blocks survive a crash with their data as of the last
//! completed flush (or newer); clean blocks survive an orderly
//! [`Cache::shutdown`] and are dropped after a crash. See [`metadata`'s
//! rules](self#crash-safety) below and the crate docs for the on-SSD format.
//!
//! # Crash safety
//!
//! - A slot says dirty only after its block's data write completed, and a
//!   commit snapshots slots before flushing the devices: metadata never
//!   points at data that was not written.
//! - A way whose durable slot may still name a dirty block is never reused for
//!   another block until a commit rewrote that slot.
//! - Commits of a set are serialized; each writes the whole set's slots with
//!   one FUA write, stamped with a sequence number that settles duplicates
//!   after a torn commit.
//! - In `on-flush` commit mode slot changes are committed by `flush()`, FUA
//!   writes, and the cleaner thread once a second (like dm-cache's commit
//!   period); in `sync` mode a block's first dirtying write commits its slot
//!   before it returns, as flashcache does.

mod async_hit;
mod async_io;
mod cleaner;
mod devio;
mod error;
mod io_path;
mod metadata;
mod shard;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use dmio::{BlockDevice, DmIoClient, SECTOR_SIZE};
use kcopyd::KcopydClient;

pub use self::async_io::{ASYNC_WORKERS, BufResult, CacheFuture, MAX_ASYNC_WORKERS};
pub use self::cleaner::CleanReport;
pub use self::error::{CacheError, Device};
pub use self::metadata::Recovered;

use self::async_io::AsyncState;
use self::cleaner::CleanerControl;
use self::devio::DevIo;
use self::metadata::RecoverFrom;
use self::shard::Shard;
use crate::format::{
    CacheMode, CommitMode, Layout, SbState, Superblock, decode_stats, encode_stats,
};
use crate::policy::{
    CacheSet, CacheStats, Counters, Geometry, PolicyKind, SequentialDetector, SetMapping, Tunables,
};
use crate::setup::{self, CreateOptions};

bitflags::bitflags! {
    /// Per-I/O hints.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct IoFlags: u8 {
        /// The write is durable when the call returns (data and metadata).
        const FUA = 1 << 0;
        /// Do not cache what this I/O misses (flashcache's "do not cache").
        const NO_CACHE = 1 << 1;
        /// Cache what this I/O misses even when the `cache_all` tunable is 0.
        const CACHE = 1 << 2;
    }
}

/// What [`Cache::load`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// The superblock state found: `Clean` or `FastClean` after an orderly
    /// shutdown, `Loaded` after a crash.
    pub previous_state: SbState,
    /// The blocks recovered.
    pub recovered: Recovered,
}

/// The shared state of a cache.
pub(crate) struct Inner {
    pub(crate) io: DevIo,
    pub(crate) kcopyd: KcopydClient,
    pub(crate) layout: Layout,
    pub(crate) geometry: Geometry,
    pub(crate) sb: Mutex<Superblock>,
    pub(crate) mode: CacheMode,
    pub(crate) write_only: bool,
    pub(crate) commit_mode: CommitMode,
    pub(crate) shards: Box<[Shard]>,
    pub(crate) counters: Counters,
    pub(crate) tunables: RwLock<Tunables>,
    pub(crate) sequential: Mutex<SequentialDetector>,
    /// The next commit's sequence number.
    pub(crate) commit_seq: AtomicU32,
    /// Sets with slot changes not yet committed.
    pub(crate) pending: Mutex<BTreeSet<u32>>,
    /// Write-through / write-around only: too many SSD errors, all I/O goes to
    /// the disk.
    pub(crate) bypass: AtomicBool,
    pub(crate) ssd_errors: AtomicU64,
    pub(crate) cleaner: CleanerControl,
    pub(crate) shut_down: AtomicBool,
    /// The smallest I/O unit both devices take, in sectors.
    pub(crate) io_align_sectors: u64,
    /// Asynchronous I/O: the worker pool and the requests in flight.
    pub(crate) async_state: AsyncState,
}

/// A cache: an SSD in front of a disk. See the [module docs](self).
///
/// ```
/// use std::sync::Arc;
/// use flashcache_core::cache::Cache;
/// use flashcache_core::setup::CreateOptions;
/// use flashcache_core::dmio::BlockDevice;
///
/// let dir = tempfile::tempdir().unwrap();
/// let (ssd_path, disk_path) = (dir.path().join("ssd"), dir.path().join("disk"));
/// std::fs::File::create(&ssd_path).unwrap().set_len(8 << 20).unwrap();
/// std::fs::File::create(&disk_path).unwrap().set_len(32 << 20).unwrap();
/// let ssd = BlockDevice::open(&ssd_path).unwrap();
/// let disk = BlockDevice::open(&disk_path).unwrap();
///
/// let cache = Cache::create(ssd.clone(), disk.clone(), &CreateOptions::default()).unwrap();
/// cache.write(8, &[7u8; 4096]).unwrap(); // sector 8: disk block 1
/// cache.flush().unwrap();
/// let mut back = vec![0u8; 4096];
/// cache.read(8, &mut back).unwrap();
/// assert_eq!(back, vec![7u8; 4096]);
/// assert_eq!(cache.stats().read_hits, 1);
/// // Shut down without cleaning: the dirty block stays on the SSD.
/// cache.set_tunable("fast_remove", 1).unwrap();
/// cache.shutdown().unwrap();
///
/// // A warm restart keeps it.
/// let (cache, report) = Cache::load(ssd.clone(), disk.clone()).unwrap();
/// assert_eq!(report.recovered.dirty, 1);
/// assert_eq!(cache.clean_all().unwrap().cleaned, 1);
/// cache.shutdown().unwrap(); // clean: nothing dirty is left
/// let (cache, report) = Cache::load(ssd, disk).unwrap();
/// assert_eq!((report.recovered.dirty, report.recovered.clean), (0, 1));
/// # drop(cache);
/// ```
pub struct Cache {
    inner: Arc<Inner>,
    cleaner_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("ssd", &self.inner.io.ssd.path())
            .field("disk", &self.inner.io.disk.path())
            .field("mode", &self.inner.mode)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// Creates a new, empty cache on `ssd` for `disk` (see [`setup::create`]
    /// for the checks) and opens it.
    pub fn create(
        ssd: Arc<BlockDevice>,
        disk: Arc<BlockDevice>,
        options: &CreateOptions,
    ) -> Result<Cache, CacheError> {
        let dmio = Arc::new(DmIoClient::new().map_err(|e| dmio_setup_error(&ssd, e))?);
        setup::create(&dmio, &ssd, &disk, options)?;
        let (cache, _) = Cache::open(dmio, ssd, disk, options.policy)?;
        Ok(cache)
    }

    /// Loads the cache on `ssd` for `disk` (see [`setup::load`] for the checks):
    /// after an orderly shutdown every block comes back (a warm restart), after
    /// a crash every dirty block does. Damaged metadata is refused with
    /// [`CacheError::CorruptMetadata`].
    pub fn load(
        ssd: Arc<BlockDevice>,
        disk: Arc<BlockDevice>,
    ) -> Result<(Cache, LoadReport), CacheError> {
        let dmio = Arc::new(DmIoClient::new().map_err(|e| dmio_setup_error(&ssd, e))?);
        let found = setup::read_superblock(&dmio, &ssd)?;
        let stats = setup::read_stats_record(&dmio, &ssd)?;
        let policy = policy_from_id(found.policy);
        let (cache, report) = Cache::open(dmio, ssd, disk, policy)?;
        // The counters carry on from the last orderly shutdown.
        for (name, value) in stats.as_deref().and_then(decode_stats).unwrap_or_default() {
            cache.inner.counters.add_named(&name, value);
        }
        Ok((cache, report))
    }

    fn open(
        dmio: Arc<DmIoClient>,
        ssd: Arc<BlockDevice>,
        disk: Arc<BlockDevice>,
        policy: PolicyKind,
    ) -> Result<(Cache, LoadReport), CacheError> {
        // Marks the superblock Loaded (unclean) before any I/O.
        let found = setup::load(&dmio, &ssd, &disk)?;
        let format_error = |source| CacheError::Format { path: ssd.path().to_path_buf(), source };
        let layout = found.layout().map_err(format_error)?;
        let mapping = match found.disk_assoc_blocks {
            0 => SetMapping::Linear,
            cluster_blocks => SetMapping::Hashed { cluster_blocks },
        };
        let geometry = Geometry::new(found.block_sectors, found.assoc, found.num_sets, mapping)
            .map_err(|e| CacheError::CorruptMetadata {
                path: ssd.path().to_path_buf(),
                set: 0,
                detail: e.to_string(),
            })?;
        let kcopyd = KcopydClient::with_dmio(dmio.clone(), kcopyd::KcopydConfig::default())
            .map_err(|e| CacheError::Setup(setup::SetupError::Option(e.to_string())))?;
        let io_align_sectors =
            u64::from(ssd.logical_block_size().max(disk.logical_block_size())) / SECTOR_SIZE;
        let io = DevIo { dmio, ssd, disk };
        let counters = Counters::default();
        let trust_clean = matches!(found.state, SbState::Clean | SbState::FastClean);
        let (shards, max_seq, recovered) =
            RecoverFrom { io: &io, layout: &layout, geometry: &geometry, counters: &counters }
                .recover_sets(policy, trust_clean)?;
        let mut tunables = Tunables::default();
        // The policy recorded in the superblock.
        let _ = tunables.set("reclaim_policy", u64::from(found.policy.min(3)));
        let mut loaded = found.clone();
        loaded.state = SbState::Loaded;
        loaded.generation = found.generation.wrapping_add(1);
        let inner = Arc::new(Inner {
            io,
            kcopyd,
            layout,
            geometry,
            sb: Mutex::new(loaded),
            mode: found.mode,
            write_only: found.write_only,
            commit_mode: found.commit,
            shards: shards.into_boxed_slice(),
            counters,
            tunables: RwLock::new(tunables),
            sequential: Mutex::new(SequentialDetector::new(0)),
            commit_seq: AtomicU32::new(max_seq.wrapping_add(1)),
            pending: Mutex::new(BTreeSet::new()),
            bypass: AtomicBool::new(false),
            ssd_errors: AtomicU64::new(0),
            cleaner: CleanerControl::default(),
            shut_down: AtomicBool::new(false),
            io_align_sectors,
            async_state: AsyncState::default(),
        });
        if !trust_clean {
            // After a crash, rewrite every set's slots from what was loaded: the
            // ignored clean slots and superseded duplicates must not outlive it.
            let all: Vec<u32> = (0..inner.layout.num_sets()).collect();
            inner.commit(&all, false)?;
        }
        let cleaner_thread = cleaner::spawn(inner.clone()).map_err(|source| {
            CacheError::Setup(setup::SetupError::Io {
                what: "starting the cleaner thread",
                path: inner.io.ssd.path().to_path_buf(),
                source: Box::new(dmio::DmIoError::Io { what: "spawning a thread", source }),
            })
        })?;
        let cleaner_thread = Some(cleaner_thread);
        Ok((Cache { inner, cleaner_thread }, LoadReport { previous_state: found.state, recovered }))
    }

    /// The smallest I/O the cache takes, in bytes: 512, or the larger logical
    /// block size of the two devices (4096 when either has 4 KiB sectors).
    /// Every I/O's start and length must be a multiple of it.
    pub fn io_alignment(&self) -> u64 {
        self.inner.io_align_sectors * SECTOR_SIZE
    }

    /// Reads `buf.len()` bytes at `sector` (both multiples of
    /// [`io_alignment`](Self::io_alignment), the length non-zero).
    pub fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), CacheError> {
        self.read_with(sector, buf, IoFlags::empty())
    }

    /// [`read`](Self::read) with hints.
    pub fn read_with(&self, sector: u64, buf: &mut [u8], flags: IoFlags) -> Result<(), CacheError> {
        self.inner.read(sector, buf, flags)
    }

    /// Writes `data` at `sector` (both multiples of
    /// [`io_alignment`](Self::io_alignment), the length non-zero).
    pub fn write(&self, sector: u64, data: &[u8]) -> Result<(), CacheError> {
        self.write_with(sector, data, IoFlags::empty())
    }

    /// [`write`](Self::write) with hints; with [`IoFlags::FUA`] the write is
    /// durable (data and metadata) when this returns.
    pub fn write_with(&self, sector: u64, data: &[u8], flags: IoFlags) -> Result<(), CacheError> {
        self.inner.write(sector, data, flags)
    }

    /// Makes every write completed before this call durable: the devices'
    /// caches are flushed and the changed metadata is committed.
    pub fn flush(&self) -> Result<(), CacheError> {
        self.inner.flush()
    }

    /// Drops the cached blocks wholly inside `sectors` sectors at `sector` (dirty
    /// ones without writing them back) and passes the discard to the disk.
    pub fn discard(&self, sector: u64, sectors: u64) -> Result<(), CacheError> {
        self.inner.discard(sector, sectors)
    }

    /// Cleans every dirty block now, on this thread, and returns when none is
    /// left, when [`stop_cleaning`](Self::stop_cleaning) is called, or with
    /// [`CacheError::CleaningIncomplete`] when blocks fail to clean.
    pub fn clean_all(&self) -> Result<CleanReport, CacheError> {
        self.inner.check_can_block()?;
        self.inner.check_open()?;
        self.inner.cleaner.resume();
        self.inner.clean_all()
    }

    /// Stops cleaning: a running [`clean_all`](Self::clean_all) returns, and the
    /// background cleaner starts nothing new until
    /// [`resume_cleaning`](Self::resume_cleaning).
    pub fn stop_cleaning(&self) {
        self.inner.cleaner.stop();
    }

    /// Lets the background cleaner run again.
    pub fn resume_cleaning(&self) {
        self.inner.cleaner.resume();
    }

    /// The counters since the cache was created (or since the last
    /// [`reset_stats`](Self::reset_stats)), carried across restarts in the
    /// superblock region: an orderly shutdown saves them; after a crash they
    /// resume from the last save.
    pub fn stats(&self) -> CacheStats {
        self.inner.counters.snapshot()
    }

    /// Sets every counter to zero.
    pub fn reset_stats(&self) {
        self.inner.counters.reset();
    }

    /// The tunables now.
    pub fn tunables(&self) -> Tunables {
        *self.inner.tunables.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes a tunable by its flashcache name (see [`Tunables`]), checking its
    /// range. Changing `reclaim_policy` (or the segmented LRU's parameters)
    /// switches every set's policy in place: nothing cached is lost.
    pub fn set_tunable(&self, name: &str, value: u64) -> Result<(), CacheError> {
        let (before, after) = {
            let mut t = self.inner.tunables.write().unwrap_or_else(|e| e.into_inner());
            let before = t.policy();
            t.set(name, value)?;
            (before, t.policy())
        };
        if before != after {
            for shard in self.inner.shards.iter() {
                let mut st = shard.lock();
                st.policy = after.build();
                let st = &mut *st;
                st.set.rebuild(&*st.policy);
            }
        }
        self.inner.cleaner.wake();
        Ok(())
    }

    /// Blocks cached now.
    pub fn cached_blocks(&self) -> u64 {
        self.inner.shards.iter().map(|s| u64::from(s.lock().set.nr_valid())).sum()
    }

    /// Dirty blocks now.
    pub fn dirty_blocks(&self) -> u64 {
        self.inner.shards.iter().map(|s| u64::from(s.lock().set.nr_dirty())).sum()
    }

    /// Whether SSD errors have put the cache in bypass (write-through and
    /// write-around only): every I/O goes to the disk. The error count and the
    /// bypass last until the cache is shut down; a reload starts afresh (the
    /// clean blocks it could not vouch for were not saved).
    pub fn is_bypassed(&self) -> bool {
        self.inner.bypass.load(Ordering::Relaxed)
    }

    /// The geometry: block size, associativity, sets, mapping.
    pub fn geometry(&self) -> Geometry {
        self.inner.geometry
    }

    /// The cache mode.
    pub fn mode(&self) -> CacheMode {
        self.inner.mode
    }

    /// The superblock as last written.
    pub fn superblock(&self) -> Superblock {
        self.inner.sb.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Bytes of RAM the block index takes (every set's per-block bookkeeping,
    /// lookup table, lock and policy object; not the per-I/O lock entries of
    /// blocks with I/O in flight), and the same per cache block.
    pub fn index_bytes(&self) -> (u64, f64) {
        let total = Cache::index_bytes_for(&self.inner.layout);
        (total, total as f64 / self.inner.layout.num_blocks().max(1) as f64)
    }

    /// [`index_bytes`](Self::index_bytes) of a cache of this layout, before
    /// loading it.
    pub fn index_bytes_for(layout: &Layout) -> u64 {
        let per_set = (CacheSet::index_bytes(layout.assoc() as usize)
            + std::mem::size_of::<Shard>()
            + self::shard::POLICY_BYTES) as u64;
        per_set * u64::from(layout.num_sets())
    }

    /// Shuts the cache down in order: stops the cleaner; in write-back mode
    /// cleans every dirty block first unless the `fast_remove` tunable is 1;
    /// commits all metadata and marks the superblock `Clean` (no dirty blocks)
    /// or `FastClean` (dirty blocks kept), so the next load is a warm restart.
    pub fn shutdown(mut self) -> Result<(), CacheError> {
        // On the completion thread the shutdown's I/O could never complete:
        // the drop runs it on a thread of its own instead.
        self.inner.check_can_block()?;
        self.stop_thread();
        self.inner.shutdown()
    }

    /// Drops the cache the way a crash would: the background threads stop and
    /// nothing more is written (no cleaning, no metadata commit, the superblock
    /// stays `Loaded`). The next [`load`](Self::load) recovers from what is on
    /// the devices, as after a power loss (minus what the devices' volatile
    /// caches would lose: a [fault-injection write
    /// log](dmio::fault::WriteLog) rebuilds that). For tests of crash recovery.
    pub fn abandon(mut self) {
        self.inner.shut_down.store(true, Ordering::Release);
        if dmio::in_notify_callback() {
            // Waiting for the cache's I/O here would wait for this thread.
            let apart =
                Cache { inner: self.inner.clone(), cleaner_thread: self.cleaner_thread.take() };
            let _ = std::thread::Builder::new()
                .name("flashcache-abandon".into())
                .spawn(move || apart.abandon());
            return;
        }
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        self.inner.async_state.close();
        self.inner.cleaner.quit();
        if let Some(thread) = self.cleaner_thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Cache {
    /// Dropping a cache that was not shut down shuts it down (errors are
    /// ignored: call [`Cache::shutdown`] to see them).
    fn drop(&mut self) {
        if dmio::in_notify_callback() {
            // Dropped in a notify callback on the dm-io completion thread: the
            // shutdown waits for I/O that thread completes, so it runs apart.
            let apart =
                Cache { inner: self.inner.clone(), cleaner_thread: self.cleaner_thread.take() };
            let spawned = std::thread::Builder::new()
                .name("flashcache-shutdown".into())
                .spawn(move || drop(apart));
            if spawned.is_ok() {
                return;
            }
        }
        self.stop_thread();
        let _ = self.inner.shutdown();
    }
}

impl Inner {
    pub(crate) fn check_open(&self) -> Result<(), CacheError> {
        if self.shut_down.load(Ordering::Acquire) { Err(CacheError::ShutDown) } else { Ok(()) }
    }

    /// Refuses a blocking call made from a dm-io notify callback: it could wait
    /// for a block lock or an I/O that only that very thread would complete.
    pub(crate) fn check_can_block(&self) -> Result<(), CacheError> {
        if dmio::in_notify_callback() { Err(CacheError::BlockingInCallback) } else { Ok(()) }
    }

    pub(crate) fn flush(&self) -> Result<(), CacheError> {
        self.check_can_block()?;
        self.check_open()?;
        Counters::bump(&self.counters.flushes);
        self.commit_pending(true)
    }

    fn shutdown(&self) -> Result<(), CacheError> {
        if self.shut_down.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let fast = self.tunables.read().unwrap_or_else(|e| e.into_inner()).fast_remove == 1;
        if self.mode == CacheMode::WriteBack && !fast {
            self.cleaner.resume();
            // Blocks that fail to clean stay dirty: a fast shutdown keeps them.
            let _ = self.clean_all();
        }
        let all: Vec<u32> = (0..self.layout.num_sets()).collect();
        let dirty: u64 = self.shards.iter().map(|s| u64::from(s.lock().set.nr_dirty())).sum();
        let mut sb = self.sb.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // A policy switched at run time is the one the next load uses.
        sb.policy =
            setup::policy_id(self.tunables.read().unwrap_or_else(|e| e.into_inner()).policy());
        let result = self.commit(&all, true);
        sb.state = match result {
            Ok(()) if dirty == 0 => SbState::Clean,
            Ok(()) => SbState::FastClean,
            Err(_) => SbState::Unstable,
        };
        let stats = encode_stats(&self.counters.snapshot().fields());
        let written =
            setup::write_superblock_with(&self.io.dmio, &self.io.ssd, &sb, stats.as_deref());
        *self.sb.lock().unwrap_or_else(|e| e.into_inner()) = sb;
        result?;
        written?;
        Ok(())
    }

    /// Counts an SSD error; in write-through and write-around, past the
    /// threshold, the cache goes to bypass.
    pub(crate) fn ssd_error(&self) {
        let errors = self.ssd_errors.fetch_add(1, Ordering::Relaxed) + 1;
        if self.mode != CacheMode::WriteBack {
            let thresh =
                self.tunables.read().unwrap_or_else(|e| e.into_inner()).ssd_error_threshold;
            if errors >= u64::from(thresh) {
                self.bypass.store(true, Ordering::Release);
            }
        }
    }
}

fn dmio_setup_error(ssd: &BlockDevice, e: dmio::DmIoError) -> CacheError {
    CacheError::Setup(setup::SetupError::Io {
        what: "starting dm-io",
        path: ssd.path().to_path_buf(),
        source: Box::new(e),
    })
}

/// The policy a superblock's policy id names (SIEVE for unknown ids).
pub fn policy_from_id(id: u8) -> PolicyKind {
    let defaults = Tunables::default();
    match id {
        0 => PolicyKind::Fifo,
        1 => PolicyKind::Slru {
            promote_thresh: defaults.lru_promote_thresh as u8,
            hot_pct: defaults.lru_hot_pct as u8,
        },
        2 => PolicyKind::Lru,
        _ => PolicyKind::Sieve,
    }
}
