//! The cache's asynchronous API (`submit_read`, `submit_write`,
//! `submit_flush`, the futures), checked against what it promises:
//!
//! - routing: a read hit inside one cache block, and in write-back a whole-block
//!   non-FUA write hit (in `sync` commit mode only to a dirty block), complete
//!   natively on the dm-io completion thread; everything else completes on a
//!   worker, and the data is right either way;
//! - read-your-writes against a RAM model in every mode and commit mode, on
//!   files and loop devices, with many requests in flight from several threads,
//!   blocking calls mixed in and resubmissions from inside callbacks, then a
//!   shutdown and a reload;
//! - blocking calls in a native callback are refused, submissions work there;
//! - `shutdown()` waits for every accepted request's callback;
//! - dropping the last handle inside a callback neither deadlocks nor loses the
//!   orderly shutdown;
//! - SSD faults on the native path behave as on the blocking path;
//! - bad ranges are refused at submission and never call back;
//! - blocks dirtied natively survive a crash after a flush; a panicking native
//!   callback leaves the cache working; a shutdown run from another cache's
//!   worker callback still waits for its own requests.
//!
//! Callbacks never panic on purpose here (but for the one test of exactly
//! that): they record what they saw and the test thread asserts, so a failure
//! names the request instead of being swallowed by the thread that ran it.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use dmio::ReqFlags;
use dmio::fault::{FaultAction, FaultRule, OpSet, Trigger};
use flashcache_core::cache::{ASYNC_WORKERS, Cache, CacheError, Device, IoFlags};
use flashcache_core::dmio::{AlignedBuf, in_notify_callback};
use flashcache_core::format::{CacheMode, CommitMode, SbState};
use flashcache_core::setup::{self, CreateOptions};
use tests::cache_blocks::{BLOCK, BS, data, data_sectors, disk_block, read_block, write_block};
use tests::{Backing, Rng, TestDevice, assert_data, backings, pattern, write_at};

const MIB: u64 = 1 << 20;
const SSD_BYTES: u64 = MIB + 64 * 1024;
const DISK_BYTES: u64 = 4 * MIB;
/// The longest a test waits for any one callback before calling it stuck.
const WAIT: Duration = Duration::from_secs(20);

fn options(mode: CacheMode, write_only: bool, commit: CommitMode) -> CreateOptions {
    CreateOptions {
        mode,
        write_only,
        commit,
        assoc: 64,
        disk_assoc_blocks: 8,
        ..CreateOptions::default()
    }
}

/// Writes `image` to the start of `disk`, beneath any cache.
fn seed_disk(disk: &TestDevice, image: &[u8]) {
    let io = dmio::DmIoClient::new().unwrap();
    for (i, chunk) in image.chunks(MIB as usize).enumerate() {
        let done = write_at(&io, &disk.dev, i as u64 * (MIB / 512), chunk, ReqFlags::empty());
        assert!(done.is_ok(), "seeding the disk: {:?}", done.failures);
    }
}

/// A fresh SSD, a disk holding the pattern of seed 0, and a cache over them
/// (regular files). Bind as `(ssd, disk, cache)` so the cache is dropped first.
fn rig(mode: CacheMode, write_only: bool, commit: CommitMode) -> (TestDevice, TestDevice, Cache) {
    let ssd = TestDevice::new(Backing::File, SSD_BYTES);
    let disk = TestDevice::new(Backing::File, DISK_BYTES);
    seed_disk(&disk, &pattern(0, DISK_BYTES / 512, 0));
    let cache =
        Cache::create(ssd.dev.clone(), disk.dev.clone(), &options(mode, write_only, commit))
            .unwrap();
    (ssd, disk, cache)
}

/// What a callback saw: the result, the buffer handed back, and whether it ran
/// on the dm-io completion thread.
#[derive(Debug)]
struct Seen {
    result: Result<(), CacheError>,
    buf: AlignedBuf,
    native: bool,
}

fn wait_for<T>(rx: &mpsc::Receiver<T>, what: &str) -> T {
    rx.recv_timeout(WAIT).unwrap_or_else(|e| panic!("{what}: no callback within {WAIT:?} ({e})"))
}

fn read_async(cache: &Cache, sector: u64, len: usize, flags: IoFlags) -> Seen {
    let (tx, rx) = mpsc::channel();
    cache
        .submit_read(sector, AlignedBuf::new(len), flags, move |result, buf| {
            let _ = tx.send(Seen { result, buf, native: in_notify_callback() });
        })
        .unwrap_or_else(|e| panic!("submitting a read of {len} bytes at sector {sector}: {e}"));
    wait_for(&rx, &format!("read of {len} bytes at sector {sector}"))
}

fn write_async(cache: &Cache, sector: u64, bytes: &[u8], flags: IoFlags) -> Seen {
    let (tx, rx) = mpsc::channel();
    cache
        .submit_write(sector, AlignedBuf::from_slice(bytes), flags, move |result, buf| {
            let _ = tx.send(Seen { result, buf, native: in_notify_callback() });
        })
        .unwrap_or_else(|e| panic!("submitting a write at sector {sector}: {e}"));
    let seen = wait_for(&rx, &format!("write of {} bytes at sector {sector}", bytes.len()));
    assert_data!(seen.buf, bytes, "the write at sector {sector} handed back another buffer");
    seen
}

/// Checks that `seen` succeeded on the expected thread.
fn assert_ran(seen: &Seen, native: bool, what: &str) {
    if let Err(e) = &seen.result {
        panic!("{what}: failed: {e}");
    }
    let thread = |n| if n { "the dm-io completion thread" } else { "a cache worker" };
    assert_eq!(
        seen.native,
        native,
        "{what}: the callback ran on {}, expected {}",
        thread(seen.native),
        thread(native)
    );
}

/// Checks that `result` is an I/O error on `device` with `errno`.
fn assert_io_error(result: &Result<(), CacheError>, device: Device, errno: i32, what: &str) {
    match result {
        Err(e @ CacheError::Io { device: d, .. }) if *d == device => {
            assert_eq!(e.errno(), Some(errno), "{what}: {e}");
        }
        other => panic!("{what}: expected an I/O error on the {device}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// 1. Which requests complete natively.
// ---------------------------------------------------------------------------

#[test]
fn writeback_hits_complete_natively_and_everything_else_on_a_worker() {
    let (_ssd, _disk, cache) = rig(CacheMode::WriteBack, false, CommitMode::OnFlush);
    // A block being cleaned is locked, which would send a hit to a worker.
    cache.stop_cleaning();
    for b in 1..=3 {
        write_block(&cache, b, 1);
    }

    let hits = cache.stats().read_hits;
    let s = read_async(&cache, BS, BLOCK, IoFlags::empty());
    assert_ran(&s, true, "whole-block read hit");
    assert_data!(s.buf, data(1, 1), "whole-block read hit");
    assert_eq!(cache.stats().read_hits, hits + 1, "the native hit was not counted");
    let s = read_async(&cache, 2 * BS + 2, 1024, IoFlags::empty());
    assert_ran(&s, true, "read hit inside one block");
    assert_data!(s.buf, data(2, 1)[1024..2048], "read hit inside one block");

    // A miss is filled on a worker; the filled block then hits natively.
    let s = read_async(&cache, 100 * BS, BLOCK, IoFlags::empty());
    assert_ran(&s, false, "read miss");
    assert_data!(s.buf, data(100, 0), "read miss");
    let s = read_async(&cache, 100 * BS, BLOCK, IoFlags::empty());
    assert_ran(&s, true, "read hit of a filled block");
    assert_data!(s.buf, data(100, 0), "read hit of a filled block");
    // Hits in several blocks: a worker.
    let s = read_async(&cache, BS + 4, 2 * BLOCK, IoFlags::empty());
    assert_ran(&s, false, "read of hits spanning three blocks");
    assert_data!(s.buf, pattern(BS + 4, 2 * BS, 1), "read of hits spanning three blocks");

    // Writes: a whole-block hit natively (dirty or clean: on-flush commits
    // nothing first), a miss, a partial hit and an FUA hit on a worker.
    let s = write_async(&cache, BS, &data(1, 2), IoFlags::empty());
    assert_ran(&s, true, "whole-block write hit to a dirty block");
    let dirty = cache.dirty_blocks();
    let s = write_async(&cache, 100 * BS, &data(100, 2), IoFlags::empty());
    assert_ran(&s, true, "whole-block write hit to a clean block");
    assert_eq!(cache.dirty_blocks(), dirty + 1, "the native write did not make the block dirty");
    let s = write_async(&cache, 200 * BS, &data(200, 2), IoFlags::empty());
    assert_ran(&s, false, "write miss");
    let s = write_async(&cache, 2 * BS + 1, &pattern(2 * BS + 1, 1, 2), IoFlags::empty());
    assert_ran(&s, false, "partial write hit");
    let s = write_async(&cache, 3 * BS, &data(3, 2), IoFlags::FUA);
    assert_ran(&s, false, "FUA write hit");

    let mut two = data(2, 1);
    two[512..1024].copy_from_slice(&pattern(2 * BS + 1, 1, 2));
    for (b, want) in [(1, data(1, 2)), (2, two), (3, data(3, 2)), (100, data(100, 2))] {
        let s = read_async(&cache, b * BS, BLOCK, IoFlags::empty());
        assert_ran(&s, true, &format!("read-back of block {b}"));
        assert_data!(s.buf, want, "read-back of block {b}");
    }
    assert_data!(read_block(&cache, 200), data(200, 2), "block 200");
    // The future resolves the same way.
    let f = cache.read_future(BS, AlignedBuf::new(BLOCK), IoFlags::empty()).unwrap();
    let (done, buf) = pollster::block_on(f);
    done.unwrap();
    assert_data!(buf, data(1, 2), "read_future");
    cache.shutdown().unwrap();
}

/// Hits submitted from a native callback while every dm-io request slot is
/// taken are refused by dm-io and come back whole: they run on a worker, with
/// the right data, and every callback runs once (the hit's state travels as
/// the dm-io request's notify state and is handed back by the refusal).
#[test]
fn hits_beyond_the_dm_io_reserve_submitted_from_a_callback_run_on_a_worker() {
    // More than dm-io's default reserve of 64 request slots.
    const FAN_OUT: u64 = 120;
    let (_ssd, _disk, cache) = rig(CacheMode::WriteBack, false, CommitMode::OnFlush);
    cache.stop_cleaning();
    for b in 0..FAN_OUT {
        write_block(&cache, b, 3);
    }
    let cache = Arc::new(cache);
    let (tx, rx) = mpsc::channel();
    let fan_cache = Arc::downgrade(&cache);
    cache
        .submit_read(0, AlignedBuf::new(BLOCK), IoFlags::empty(), move |first, _| {
            let cache = fan_cache.upgrade().expect("the cache outlives its requests");
            let _ = tx.send((u64::MAX, first, Vec::new(), in_notify_callback()));
            for b in 0..FAN_OUT {
                let (tx, refused) = (tx.clone(), tx.clone());
                let submitted = cache.submit_read(
                    b * BS,
                    AlignedBuf::new(BLOCK),
                    IoFlags::empty(),
                    move |result, buf| {
                        let _ = tx.send((b, result, buf.to_vec(), in_notify_callback()));
                    },
                );
                if let Err(e) = submitted {
                    let _ = refused.send((b, Err(e), Vec::new(), true));
                }
            }
        })
        .unwrap();
    let (first, result, _, native) = wait_for(&rx, "the first read");
    assert_eq!(first, u64::MAX);
    assert!(result.is_ok() && native, "the first read: {result:?}, native {native}");
    let mut seen = vec![false; FAN_OUT as usize];
    let mut on_workers = 0;
    for _ in 0..FAN_OUT {
        let (b, result, buf, native) = wait_for(&rx, "a read submitted from the callback");
        assert!(result.is_ok(), "block {b}: {result:?}");
        assert!(!seen[b as usize], "block {b}: called back twice");
        seen[b as usize] = true;
        assert_data!(buf, data(b, 3), "block {b}");
        on_workers += usize::from(!native);
    }
    assert!(
        on_workers >= (FAN_OUT - 64) as usize,
        "only {on_workers} of {FAN_OUT} reads ran on a worker: the reserve was never full"
    );
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "a callback ran twice");
}

#[test]
fn sync_commit_writes_natively_only_to_blocks_already_dirty() {
    let (_ssd, _disk, cache) = rig(CacheMode::WriteBack, false, CommitMode::Sync);
    cache.stop_cleaning();
    write_block(&cache, 5, 1); // dirty
    read_block(&cache, 6); // clean, filled
    assert_eq!((cache.cached_blocks(), cache.dirty_blocks()), (2, 1));

    // A clean block's first dirtying write commits its slot first: a worker.
    let s = write_async(&cache, 6 * BS, &data(6, 2), IoFlags::empty());
    assert_ran(&s, false, "sync commit: write hit to a clean block");
    assert_eq!(cache.dirty_blocks(), 2);
    let s = write_async(&cache, 6 * BS, &data(6, 3), IoFlags::empty());
    assert_ran(&s, true, "sync commit: write hit to the block made dirty");
    let s = write_async(&cache, 5 * BS, &data(5, 2), IoFlags::empty());
    assert_ran(&s, true, "sync commit: write hit to a dirty block");
    let s = write_async(&cache, 5 * BS, &data(5, 3), IoFlags::FUA);
    assert_ran(&s, false, "sync commit: FUA write hit to a dirty block");
    assert_data!(read_block(&cache, 5), data(5, 3), "block 5");
    assert_data!(read_block(&cache, 6), data(6, 3), "block 6");
    cache.shutdown().unwrap();
}

#[test]
fn writethrough_writearound_and_write_only_route_as_promised() {
    for (mode, write_only) in [
        (CacheMode::WriteThrough, false),
        (CacheMode::WriteAround, false),
        (CacheMode::WriteBack, true),
    ] {
        let what = format!("{mode:?} write_only={write_only}");
        let (_ssd, _disk, cache) = rig(mode, write_only, CommitMode::OnFlush);
        cache.stop_cleaning();
        // Block 10 cached: by a write in write-only (reads fill nothing), else by a read.
        if write_only {
            write_block(&cache, 10, 1);
        } else {
            read_block(&cache, 10);
        }
        let old = if write_only { data(10, 1) } else { data(10, 0) };
        let s = read_async(&cache, 10 * BS, BLOCK, IoFlags::empty());
        assert_ran(&s, true, &format!("{what}: read hit"));
        assert_data!(s.buf, old, "{what}: read hit");

        // Only write-back writes natively; write-through writes both devices,
        // write-around drops the cached copy.
        let s = write_async(&cache, 10 * BS, &data(10, 2), IoFlags::empty());
        assert_ran(&s, write_only, &format!("{what}: whole-block write hit"));
        let still_cached = mode != CacheMode::WriteAround;
        let s = read_async(&cache, 10 * BS, BLOCK, IoFlags::empty());
        assert_ran(&s, still_cached, &format!("{what}: read after the write"));
        assert_data!(s.buf, data(10, 2), "{what}: read after the write");

        let s = read_async(&cache, 11 * BS, BLOCK, IoFlags::empty());
        assert_ran(&s, false, &format!("{what}: read miss"));
        assert_data!(s.buf, data(11, 0), "{what}: read miss");
        // Write-only fills nothing: the second read misses again.
        let s = read_async(&cache, 11 * BS, BLOCK, IoFlags::empty());
        assert_ran(&s, !write_only, &format!("{what}: second read"));
        assert_data!(s.buf, data(11, 0), "{what}: second read");
        cache.shutdown().unwrap();
    }
}

// ---------------------------------------------------------------------------
// 2. Read-your-writes against a RAM model, many requests in flight.
// ---------------------------------------------------------------------------

/// The model test's disk, its hot part (most I/O goes there, so it hits), the
/// threads and each one's requests in flight.
const MODEL_DISK: u64 = 2 * MIB;
const MODEL_THREADS: u64 = 3;
const MODEL_OPS: usize = 250;
const MAX_IN_FLIGHT: usize = 16;
/// A run that takes longer than this is stuck.
const MODEL_DEADLINE: Duration = Duration::from_secs(60);

/// The base seed of the model runs: `FLASHCACHE_ASYNC_SEED`, or a fixed one.
fn base_seed() -> u64 {
    std::env::var("FLASHCACHE_ASYNC_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0x5eed_a51c)
}

/// One request: its range on the disk and a name for messages.
#[derive(Clone, Debug)]
struct Req {
    sector: u64,
    len: usize,
    what: String,
}

impl Req {
    fn bytes(&self) -> Range<usize> {
        let start = (self.sector * 512) as usize;
        start..start + self.len
    }
}

/// A thread's requests in flight, counting a request's resubmissions as the
/// request itself.
#[derive(Default)]
struct Flight {
    n: Mutex<usize>,
    cv: Condvar,
}

impl Flight {
    fn start(&self) {
        *self.n.lock().unwrap() += 1;
    }

    fn end(&self) {
        *self.n.lock().unwrap() -= 1;
        self.cv.notify_all();
    }

    /// Waits until fewer than `limit` requests are in flight.
    fn wait_below(&self, limit: usize, label: &str) {
        let deadline = Instant::now() + WAIT;
        let mut n = self.n.lock().unwrap();
        while *n >= limit {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{label}: {} requests stuck in flight", *n);
            n = self.cv.wait_timeout(n, left).unwrap().0;
        }
    }
}

/// A model run's shared state.
struct Model {
    label: String,
    block_bytes: u64,
    /// What the cache should present.
    bytes: Mutex<Vec<u8>>,
    /// Blocks with a request in flight: no two requests in flight share a
    /// block, so every read has exactly one right answer.
    busy: Mutex<Vec<bool>>,
    freed: Condvar,
    errors: Mutex<Vec<String>>,
    native_reads: AtomicU64,
    native_writes: AtomicU64,
    worker_reads: AtomicU64,
    worker_writes: AtomicU64,
}

impl Model {
    fn blocks(&self, req: &Req) -> Range<usize> {
        let r = req.bytes();
        (r.start / self.block_bytes as usize)..r.end.div_ceil(self.block_bytes as usize)
    }

    fn try_reserve(&self, req: &Req) -> bool {
        let mut busy = self.busy.lock().unwrap();
        let blocks = self.blocks(req);
        if busy[blocks.clone()].iter().any(|&b| b) {
            return false;
        }
        busy[blocks].fill(true);
        true
    }

    fn release(&self, req: &Req) {
        let mut busy = self.busy.lock().unwrap();
        busy[self.blocks(req)].fill(false);
        self.freed.notify_all();
    }

    fn error(&self, message: String) {
        self.errors.lock().unwrap().push(format!("{}: {message}", self.label));
    }

    /// Counts where an asynchronous request completed (`None`: a blocking call).
    fn count(&self, write: bool, native: Option<bool>) {
        let Some(native) = native else { return };
        match (write, native) {
            (false, true) => &self.native_reads,
            (false, false) => &self.worker_reads,
            (true, true) => &self.native_writes,
            (true, false) => &self.worker_writes,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Checks a completed read against the model (its blocks are reserved, so
    /// the model cannot change under it).
    fn read_done(
        &self,
        req: &Req,
        result: Result<(), CacheError>,
        got: &[u8],
        native: Option<bool>,
    ) {
        self.count(false, native);
        if let Err(e) = result {
            return self.error(format!("{}: read failed (native={native:?}): {e}", req.what));
        }
        let bytes = self.bytes.lock().unwrap();
        let want = &bytes[req.bytes()];
        if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
            self.error(format!(
                "{}: read of {} bytes at sector {} (native={native:?}) differs from the model at \
                 byte {at} (disk byte {})",
                req.what,
                req.len,
                req.sector,
                req.bytes().start + at
            ));
        }
    }

    /// Applies a completed write to the model.
    fn write_done(
        &self,
        req: &Req,
        sent: &[u8],
        result: Result<(), CacheError>,
        back: &[u8],
        native: Option<bool>,
    ) {
        self.count(true, native);
        if back != sent {
            self.error(format!("{}: the write handed back another buffer", req.what));
        }
        match result {
            Ok(()) => self.bytes.lock().unwrap()[req.bytes()].copy_from_slice(sent),
            Err(e) => self.error(format!("{}: write failed (native={native:?}): {e}", req.what)),
        }
    }
}

fn random_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for chunk in out.chunks_mut(8) {
        let word = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    out
}

/// A random request: a whole block, part of one, one straddling two blocks, or
/// several blocks; mostly in the hot part of the disk.
fn pick(rng: &mut Rng, block_bytes: u64, align: u64, what: String) -> Req {
    let blocks = MODEL_DISK / block_bytes;
    let region = if rng.below(10) < 7 { blocks / 4 } else { blocks };
    let units = block_bytes / align;
    let (start, len) = match rng.below(8) {
        0..=3 => (rng.below(region) * block_bytes, block_bytes),
        4 | 5 => {
            let n = 1 + rng.below(units - 1);
            let off = rng.below(units - n + 1);
            (rng.below(region) * block_bytes + off * align, n * align)
        }
        6 => {
            let off = 1 + rng.below(units - 1);
            let n = units - off + 1 + rng.below(units - 1);
            (rng.below(region - 1) * block_bytes + off * align, n * align)
        }
        _ => {
            let n = 2 + rng.below(3);
            let off = if rng.below(2) == 0 { 0 } else { rng.below(units) * align };
            let first = rng.below(region - n);
            (first * block_bytes + off, n * block_bytes)
        }
    };
    Req { sector: start / 512, len: len as usize, what }
}

/// One thread's workload: up to [`MAX_IN_FLIGHT`] asynchronous requests in
/// flight, some blocking reads, writes and flushes, and resubmissions from
/// callbacks (a read after a write, a write after a read, on the same range).
fn model_thread(cache: &Arc<Cache>, model: &Arc<Model>, thread: u64, seed: u64) {
    let mut rng = Rng(seed ^ (thread + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let flight = Arc::new(Flight::default());
    let align = cache.io_alignment();
    let bb = model.block_bytes;
    let label = &model.label;
    for op in 0..MODEL_OPS {
        flight.wait_below(MAX_IN_FLIGHT, label);
        let what = format!("thread {thread} op {op}");
        match rng.below(100) {
            0 => {
                let m = model.clone();
                let f = flight.clone();
                let what = what.clone();
                f.start();
                let done = move |r: Result<(), CacheError>| {
                    if let Err(e) = r {
                        m.error(format!("{what}: submit_flush: {e}"));
                    }
                    f.end();
                };
                cache.submit_flush(done).unwrap_or_else(|e| panic!("{label}: submit_flush: {e}"));
                continue;
            }
            1 => {
                cache.flush().unwrap_or_else(|e| panic!("{label}: {what}: flush: {e}"));
                continue;
            }
            _ => {}
        }
        // A range clear of every request in flight.
        let deadline = Instant::now() + WAIT;
        let req = loop {
            let req = pick(&mut rng, bb, align, what.clone());
            if model.try_reserve(&req) {
                break req;
            }
            let busy = model.busy.lock().unwrap();
            assert!(Instant::now() < deadline, "{label}: {what}: no free range");
            drop(model.freed.wait_timeout(busy, Duration::from_millis(5)).unwrap());
        };
        let flags = match rng.below(40) {
            0 => IoFlags::NO_CACHE,
            1 => IoFlags::FUA,
            _ => IoFlags::empty(),
        };
        match rng.below(20) {
            // Blocking, on this thread.
            0 => {
                let mut buf = vec![0u8; req.len];
                let r = cache.read_with(req.sector, &mut buf, flags - IoFlags::FUA);
                model.read_done(&req, r, &buf, None);
                model.release(&req);
            }
            1 => {
                let bytes = random_bytes(&mut rng, req.len);
                let r = cache.write_with(req.sector, &bytes, flags);
                model.write_done(&req, &bytes, r, &bytes, None);
                model.release(&req);
            }
            k => {
                let follow = (rng.below(4) == 0).then(|| random_bytes(&mut rng, req.len));
                let ctx = Ctx {
                    cache: Arc::downgrade(cache),
                    model: model.clone(),
                    flight: flight.clone(),
                };
                flight.start();
                if k % 2 == 0 {
                    ctx.read(req, flags - IoFlags::FUA, follow);
                } else {
                    let bytes = random_bytes(&mut rng, req.len);
                    ctx.write(req, bytes, flags, follow.is_some());
                }
            }
        }
    }
    flight.wait_below(1, label);
}

/// What a callback needs to check its request, resubmit, and say it is done.
/// Only a weak handle of the cache: a callback never holds the last one.
struct Ctx {
    cache: Weak<Cache>,
    model: Arc<Model>,
    flight: Arc<Flight>,
}

impl Ctx {
    /// Submits a read; `then_write` is written to the same range from its callback.
    fn read(self, req: Req, flags: IoFlags, then_write: Option<Vec<u8>>) {
        let Some(cache) = self.cache.upgrade() else {
            return self.finish(&req, "the cache is gone");
        };
        let (sector, len) = (req.sector, req.len);
        let (r2, model, flight) = (req.clone(), self.model.clone(), self.flight.clone());
        let submitted = cache.submit_read(sector, AlignedBuf::new(len), flags, move |r, buf| {
            self.model.read_done(&r2, r, &buf, Some(in_notify_callback()));
            match then_write {
                Some(bytes) => {
                    let again = Req { what: format!("{} (write from a callback)", r2.what), ..r2 };
                    self.write(again, bytes, IoFlags::empty(), false)
                }
                None => self.finish(&r2, ""),
            }
        });
        drop(cache);
        if let Err(e) = submitted {
            refused(&model, &flight, &req, e);
        }
    }

    /// Submits a write; with `then_read`, the range is read back from its callback.
    fn write(self, req: Req, bytes: Vec<u8>, flags: IoFlags, then_read: bool) {
        let Some(cache) = self.cache.upgrade() else {
            return self.finish(&req, "the cache is gone");
        };
        let (sector, buf) = (req.sector, AlignedBuf::from_slice(&bytes));
        let (r2, model, flight) = (req.clone(), self.model.clone(), self.flight.clone());
        let submitted = cache.submit_write(sector, buf, flags, move |r, back| {
            self.model.write_done(&r2, &bytes, r, &back, Some(in_notify_callback()));
            if then_read {
                let again = Req { what: format!("{} (read from a callback)", r2.what), ..r2 };
                self.read(again, IoFlags::empty(), None)
            } else {
                self.finish(&r2, "")
            }
        });
        drop(cache);
        if let Err(e) = submitted {
            refused(&model, &flight, &req, e);
        }
    }

    fn finish(self, req: &Req, error: &str) {
        if !error.is_empty() {
            self.model.error(format!("{}: {error}", req.what));
        }
        self.model.release(req);
        self.flight.end();
    }
}

/// A refused submission: its callback (and the `Ctx` in it) was dropped
/// unrun, so the request is ended here.
fn refused(model: &Model, flight: &Flight, req: &Req, e: CacheError) {
    model.error(format!("{}: submission refused: {e}", req.what));
    model.release(req);
    flight.end();
}

/// The cache out of its `Arc`, once no callback holds a handle any more: a
/// callback that resubmitted may still be returning when its request's
/// follow-up has already completed.
fn sole_owner(mut cache: Arc<Cache>, label: &str) -> Cache {
    let deadline = Instant::now() + WAIT;
    loop {
        match Arc::try_unwrap(cache) {
            Ok(cache) => return cache,
            Err(again) => cache = again,
        }
        assert!(Instant::now() < deadline, "{label}: a callback kept a handle of the cache");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Reads the whole disk through the cache, blocking.
fn read_all(cache: &Cache, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    for (i, chunk) in out.chunks_mut(256 * 1024).enumerate() {
        cache.read(i as u64 * 512, chunk).unwrap();
    }
    out
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn model_run(backing: Backing, mode: CacheMode, write_only: bool, commit: CommitMode) {
    let started = Instant::now();
    // 8 KiB blocks on 4 KiB-sector loop devices, so that I/O inside one block exists there too.
    let block_bytes = if backing == Backing::Loop4096 { 8192 } else { 4096 };
    let seed = base_seed()
        ^ (backing as u64) << 8
        ^ (mode as u64) << 16
        ^ u64::from(write_only) << 24
        ^ (commit as u64) << 32;
    let label = format!(
        "{backing} {mode:?} write_only={write_only} {commit:?} seed {seed:#x} \
         (base seed: FLASHCACHE_ASYNC_SEED={})",
        base_seed()
    );
    let ssd = TestDevice::new(backing, SSD_BYTES);
    let disk = TestDevice::new(backing, MODEL_DISK);
    let initial = random_bytes(&mut Rng(seed), MODEL_DISK as usize);
    seed_disk(&disk, &initial);
    let opts = CreateOptions { block_bytes, ..options(mode, write_only, commit) };
    let cache = Arc::new(Cache::create(ssd.dev.clone(), disk.dev.clone(), &opts).unwrap());
    // Cleaning runs beside the I/O: a block being cleaned sends its hits to a worker.
    cache.set_tunable("dirty_thresh_pct", 10).unwrap();
    let model = Arc::new(Model {
        label: label.clone(),
        block_bytes,
        bytes: Mutex::new(initial),
        busy: Mutex::new(vec![false; (MODEL_DISK / block_bytes) as usize]),
        freed: Condvar::new(),
        errors: Mutex::new(Vec::new()),
        native_reads: AtomicU64::new(0),
        native_writes: AtomicU64::new(0),
        worker_reads: AtomicU64::new(0),
        worker_writes: AtomicU64::new(0),
    });
    std::thread::scope(|s| {
        for t in 0..MODEL_THREADS {
            let (cache, model) = (cache.clone(), model.clone());
            s.spawn(move || model_thread(&cache, &model, t, seed));
        }
    });
    assert!(started.elapsed() < MODEL_DEADLINE, "{label}: took {:?}", started.elapsed());
    let errors = std::mem::take(&mut *model.errors.lock().unwrap());
    assert!(
        errors.is_empty(),
        "{} errors, the first ones:\n{}",
        errors.len(),
        errors[..errors.len().min(10)].join("\n")
    );

    // Where the requests completed: the routing rules, seen under load.
    let counts =
        [&model.native_reads, &model.worker_reads, &model.native_writes, &model.worker_writes]
            .map(|c| c.load(Ordering::Relaxed));
    assert!(counts[0] > 0 && counts[1] > 0, "{label}: reads native/worker: {counts:?}");
    if mode == CacheMode::WriteBack {
        assert!(counts[2] > 0 && counts[3] > 0, "{label}: writes native/worker: {counts:?}");
    } else {
        assert_eq!(counts[2], 0, "{label}: only write-back writes natively: {counts:?}");
    }

    let want = model.bytes.lock().unwrap().clone();
    let through = read_all(&cache, MODEL_DISK);
    if let Some(at) = first_difference(&through, &want) {
        panic!("{label}: read back through the cache differs from the model at byte {at}");
    }
    cache.flush().unwrap();
    let cache = sole_owner(cache, &label);
    cache.shutdown().unwrap_or_else(|e| panic!("{label}: shutdown: {e}"));
    let on_disk = disk.read_back();
    if let Some(at) = first_difference(&on_disk, &want) {
        panic!("{label}: after an orderly shutdown the disk differs from the model at byte {at}");
    }
    let (cache, report) = Cache::load(ssd.dev.clone(), disk.dev.clone())
        .unwrap_or_else(|e| panic!("{label}: reload: {e}"));
    assert_eq!(report.previous_state, SbState::Clean, "{label}");
    let warm = read_all(&cache, MODEL_DISK);
    if let Some(at) = first_difference(&warm, &want) {
        panic!("{label}: after the reload the cache differs from the model at byte {at}");
    }
    cache.shutdown().unwrap();
    eprintln!(
        "{label}: {:.2} s, reads native/worker, writes native/worker: {counts:?}",
        started.elapsed().as_secs_f64()
    );
}

fn model_runs(mode: CacheMode, write_only: bool) {
    for backing in backings() {
        for commit in [CommitMode::OnFlush, CommitMode::Sync] {
            model_run(backing, mode, write_only, commit);
        }
    }
}

#[test]
fn async_writeback_reads_its_writes_under_load() {
    model_runs(CacheMode::WriteBack, false);
}

#[test]
fn async_write_only_reads_its_writes_under_load() {
    model_runs(CacheMode::WriteBack, true);
}

#[test]
fn async_writethrough_reads_its_writes_under_load() {
    model_runs(CacheMode::WriteThrough, false);
}

#[test]
fn async_writearound_reads_its_writes_under_load() {
    model_runs(CacheMode::WriteAround, false);
}

// ---------------------------------------------------------------------------
// 3. Blocking calls in callbacks.
// ---------------------------------------------------------------------------

/// What a callback that tried the blocking calls saw.
#[derive(Debug)]
struct Tried {
    native: bool,
    /// Each blocking call's name and result (`Debug` of the error, or "ok").
    blocking: Vec<(&'static str, String)>,
    /// The submissions made from the callback.
    submitted: Vec<(&'static str, String)>,
}

fn outcome<T>(r: Result<T, CacheError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("{e:?}"),
    }
}

/// Runs every blocking call of `cache` (read and discard touch block 2, write
/// block 4) and reports each result.
fn try_blocking(cache: &Cache) -> Vec<(&'static str, String)> {
    let mut buf = vec![0u8; BLOCK];
    vec![
        ("read", outcome(cache.read(2 * BS, &mut buf))),
        ("write", outcome(cache.write(4 * BS, &data(4, 9)))),
        ("flush", outcome(cache.flush())),
        ("discard", outcome(cache.discard(2 * BS, BS))),
        ("clean_all", outcome(cache.clean_all())),
    ]
}

#[test]
fn blocking_calls_in_a_native_callback_are_refused_and_submissions_from_it_work() {
    let (_ssd, _disk, cache) = rig(CacheMode::WriteBack, false, CommitMode::OnFlush);
    cache.stop_cleaning();
    for b in 1..=3 {
        write_block(&cache, b, 1);
    }
    let cache = Arc::new(cache);
    let weak = Arc::downgrade(&cache);
    let (tx, rx) = mpsc::channel::<Tried>();
    let (nested_tx, nested_rx) = mpsc::channel::<(&'static str, Seen)>();
    cache
        .submit_read(BS, AlignedBuf::new(BLOCK), IoFlags::empty(), move |r, _| {
            let native = in_notify_callback();
            let Some(cache) = weak.upgrade() else { return };
            let blocking = if r.is_ok() { try_blocking(&cache) } else { vec![("hit", outcome(r))] };
            // Submissions never wait: a hit, a miss, a write hit, a flush.
            let seen = |what: &'static str| {
                let tx = nested_tx.clone();
                move |result, buf| {
                    let _ = tx.send((what, Seen { result, buf, native: in_notify_callback() }));
                }
            };
            let flush_tx = nested_tx.clone();
            let submitted = vec![
                (
                    "read hit",
                    outcome(cache.submit_read(
                        2 * BS,
                        AlignedBuf::new(BLOCK),
                        IoFlags::empty(),
                        seen("read hit"),
                    )),
                ),
                (
                    "read miss",
                    outcome(cache.submit_read(
                        300 * BS,
                        AlignedBuf::new(BLOCK),
                        IoFlags::empty(),
                        seen("read miss"),
                    )),
                ),
                (
                    "write hit",
                    outcome(cache.submit_write(
                        3 * BS,
                        AlignedBuf::from_slice(&data(3, 2)),
                        IoFlags::empty(),
                        seen("write hit"),
                    )),
                ),
                (
                    "flush",
                    outcome(cache.submit_flush(move |result| {
                        let native = in_notify_callback();
                        let buf = AlignedBuf::new(0);
                        let _ = flush_tx.send(("flush", Seen { result, buf, native }));
                    })),
                ),
            ];
            let _ = tx.send(Tried { native, blocking, submitted });
        })
        .unwrap();
    let tried = wait_for(&rx, "the native read hit");
    assert!(tried.native, "the read hit did not complete natively: {tried:?}");
    for (call, result) in &tried.blocking {
        assert_eq!(result, "BlockingInCallback", "{call} in a native callback");
    }
    for (call, result) in &tried.submitted {
        assert_eq!(result, "ok", "submitting a {call} from a native callback");
    }
    let mut nested: Vec<(&str, Seen)> = (0..4).map(|_| wait_for(&nested_rx, "nested")).collect();
    nested.sort_by_key(|(what, _)| *what);
    for (what, seen) in &nested {
        if let Err(e) = &seen.result {
            panic!("{what} submitted from a callback failed: {e}");
        }
    }
    // The refused write and discard changed nothing: block 2 is still cached
    // with its data, block 4 was never written.
    assert_data!(nested[1].1.buf, data(2, 1), "read hit submitted from the callback");
    assert_data!(nested[2].1.buf, data(300, 0), "read miss submitted from the callback");
    assert!(!nested[0].1.native, "a flush runs on a worker");
    assert_eq!(cache.cached_blocks(), 4, "blocks 1-3 and 300: the refused discard dropped one");
    assert_data!(read_block(&cache, 3), data(3, 2), "write submitted from the callback");
    assert_data!(read_block(&cache, 4), data(4, 0), "the refused write wrote");

    // On a worker, the blocking calls work.
    let weak = Arc::downgrade(&cache);
    let (tx, rx) = mpsc::channel::<Tried>();
    cache
        .submit_read(400 * BS, AlignedBuf::new(BLOCK), IoFlags::empty(), move |_, _| {
            let native = in_notify_callback();
            let Some(cache) = weak.upgrade() else { return };
            let blocking = try_blocking(&cache);
            let _ = tx.send(Tried { native, blocking, submitted: Vec::new() });
        })
        .unwrap();
    let tried = wait_for(&rx, "the read miss");
    assert!(!tried.native, "the read miss completed natively: {tried:?}");
    for (call, result) in &tried.blocking {
        assert_eq!(result, "ok", "{call} in a worker callback");
    }
    assert_data!(read_block(&cache, 4), data(4, 9), "the write from the worker callback");
    sole_owner(cache, "blocking").shutdown().unwrap();
}

// ---------------------------------------------------------------------------
// 4. Shutdown waits for every callback.
// ---------------------------------------------------------------------------

#[test]
fn shutdown_waits_for_every_accepted_request_and_keeps_their_writes() {
    let (ssd, disk, cache) = rig(CacheMode::WriteBack, false, CommitMode::OnFlush);
    for b in 0..64 {
        write_block(&cache, b, 1); // dirty hits
        read_block(&cache, 64 + b); // clean hits
    }
    // The requests' I/O is held back a little, so that most of them are
    // still in flight when the shutdown starts (the shutdown's own I/O, later,
    // mostly is not).
    let delay = Duration::from_millis(10);
    for dev in [&ssd.dev, &disk.dev] {
        let rule = FaultRule::delay(OpSet::READ | OpSet::WRITE, delay);
        dev.faults().add(rule.when(Trigger::FirstN(300)));
    }
    // Blocks 0..128 hit (native), 128..300 miss (worker); even blocks are
    // written, odd ones read; every fifth write is partial (a worker).
    const N: u64 = 300;
    let calls: Arc<Vec<AtomicU32>> = Arc::new((0..N).map(|_| AtomicU32::new(0)).collect());
    // Per request: whether it succeeded (with the right data), and why not.
    type Outcomes = Mutex<Vec<Option<(bool, String)>>>;
    let results: Arc<Outcomes> = Arc::new(Mutex::new((0..N).map(|_| None).collect()));
    let mut expect: Vec<(u64, Vec<u8>)> = Vec::new();
    for b in 0..N {
        let (calls, results) = (calls.clone(), results.clone());
        // What a read must see (the block's content before this round).
        let want = match b {
            0..64 => data(b, 1),
            _ => data(b, 0),
        };
        let read = b % 2 == 1;
        let done = move |r: Result<(), CacheError>, buf: AlignedBuf| {
            let seen = match r {
                Err(e) => (false, e.to_string()),
                Ok(()) if read && buf[..] != want[..] => (false, "wrong data".to_string()),
                Ok(()) => (true, String::new()),
            };
            results.lock().unwrap()[b as usize] = Some(seen);
            calls[b as usize].fetch_add(1, Ordering::SeqCst);
        };
        if b % 2 == 0 {
            let mut block = data(b, 2);
            if b % 5 == 0 {
                block[..512].copy_from_slice(&data(b, 3)[..512]);
                let part = AlignedBuf::from_slice(&block[..512]);
                cache.submit_write(b * BS, part, IoFlags::empty(), done).unwrap();
                let old = if b < 64 { data(b, 1) } else { data(b, 0) };
                block[512..].copy_from_slice(&old[512..]);
            } else {
                cache
                    .submit_write(b * BS, AlignedBuf::from_slice(&block), IoFlags::empty(), done)
                    .unwrap();
            }
            expect.push((b, block));
        } else {
            cache.submit_read(b * BS, AlignedBuf::new(BLOCK), IoFlags::empty(), done).unwrap();
        }
    }
    let before = calls.iter().filter(|c| c.load(Ordering::SeqCst) > 0).count();
    cache.shutdown().unwrap();
    let ran: Vec<u32> = calls.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert!(before < N as usize, "every callback ran before the shutdown: nothing was waited for");
    for (b, n) in ran.iter().enumerate() {
        assert_eq!(*n, 1, "request {b}: its callback ran {n} times by the time shutdown returned");
    }
    // No callback runs after the shutdown returned either.
    std::thread::sleep(Duration::from_millis(100));
    assert!(calls.iter().all(|c| c.load(Ordering::SeqCst) == 1), "a callback ran again");
    let results = std::mem::take(&mut *results.lock().unwrap());
    for (b, r) in results.iter().enumerate() {
        let (ok, what) = r.as_ref().expect("a result per callback");
        assert!(*ok, "request {b} failed: {what}");
    }
    eprintln!("shutdown: {before} of {N} callbacks had run when it started");

    for dev in [&ssd.dev, &disk.dev] {
        dev.faults().clear_rules();
    }
    let (cache, report) = Cache::load(ssd.dev.clone(), disk.dev.clone()).unwrap();
    assert_eq!(report.previous_state, SbState::Clean);
    for (b, want) in expect {
        assert_data!(read_block(&cache, b), want, "block {b} after the reload");
        assert_data!(disk_block(&disk, b), want, "block {b} on the disk (cleaned at shutdown)");
    }
    cache.shutdown().unwrap();
}

// ---------------------------------------------------------------------------
// 5. Dropping the last handle in a callback.
// ---------------------------------------------------------------------------

/// Waits until the superblock on `ssd` says the cache was shut down in order.
fn wait_clean_superblock(ssd: &TestDevice, what: &str) {
    let io = dmio::DmIoClient::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = setup::read_superblock(&io, &ssd.dev).map(|sb| sb.state);
        if let Ok(SbState::Clean) = state {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: no orderly shutdown after 10 s: {state:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How a callback lets go of the last handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LastHandle {
    /// Drops the last `Arc<Cache>` in a native callback.
    DropNative,
    /// Drops the last `Arc<Cache>` in a worker callback.
    DropOnWorker,
    /// Calls `shutdown()` on the cache itself in a native callback: refused
    /// (it would wait for this very thread), and the cache, consumed, shuts
    /// down in the background as when dropped.
    ShutdownNative,
}

#[test]
fn letting_go_of_the_last_handle_in_a_callback_shuts_the_cache_down_in_the_background() {
    for how in [LastHandle::DropNative, LastHandle::DropOnWorker, LastHandle::ShutdownNative] {
        let what = format!("{how:?}");
        let (ssd, disk, cache) = rig(CacheMode::WriteBack, false, CommitMode::OnFlush);
        cache.stop_cleaning();
        for b in 0..32 {
            write_block(&cache, b, 1); // dirty: the shutdown has cleaning to do
        }
        // The request's I/O is held back, so that its callback surely runs
        // after this thread let go of its own handle.
        let rule = FaultRule {
            ops: OpSet::READ,
            sectors: 0..u64::MAX,
            action: FaultAction::Delay(Duration::from_millis(100)),
            trigger: Trigger::Nth(1),
        };
        let native = how != LastHandle::DropOnWorker;
        let (faulty, block) = if native { (&ssd, 5) } else { (&disk, 500) };
        faulty.dev.faults().add(rule);
        // Either an `Arc` whose last clone the callback drops, or the cache
        // itself, which the callback takes out of the slot.
        let slot = Arc::new(Mutex::new(Some(cache)));
        let (tx, rx) = mpsc::channel();
        let submitted = {
            let guard = slot.lock().unwrap();
            let cache = guard.as_ref().unwrap();
            if how == LastHandle::ShutdownNative {
                let slot = slot.clone();
                cache.submit_read(
                    block * BS,
                    AlignedBuf::new(BLOCK),
                    IoFlags::empty(),
                    move |r, buf| {
                        let on_dmio = in_notify_callback();
                        let taken = slot.lock().unwrap().take();
                        let refused = taken.map(|c| outcome(c.shutdown()));
                        let _ = tx.send((on_dmio, refused, r.is_ok(), buf));
                    },
                )
            } else {
                // Moves the cache into an `Arc` whose clone the callback holds.
                drop(guard);
                let cache = Arc::new(slot.lock().unwrap().take().unwrap());
                let last = cache.clone();
                let submitted = cache.submit_read(
                    block * BS,
                    AlignedBuf::new(BLOCK),
                    IoFlags::empty(),
                    move |r, buf| {
                        let on_dmio = in_notify_callback();
                        let handles = Arc::strong_count(&last);
                        drop(last);
                        let _ = tx.send((on_dmio, Some(handles.to_string()), r.is_ok(), buf));
                    },
                );
                drop(cache);
                submitted
            }
        };
        submitted.unwrap_or_else(|e| panic!("{what}: submitting: {e}"));
        drop(slot);
        let (on_dmio, handle, ok, buf) = wait_for(&rx, &what);
        assert_eq!(on_dmio, native, "{what}: ran on the wrong thread");
        let expected = if how == LastHandle::ShutdownNative { "BlockingInCallback" } else { "1" };
        assert_eq!(handle.as_deref(), Some(expected), "{what}: the callback's handle");
        assert!(ok, "{what}: the read failed");
        assert_data!(buf, if native { data(5, 1) } else { data(500, 0) }, "{what}");
        faulty.dev.faults().clear_rules();

        wait_clean_superblock(&ssd, &what);
        let (cache, report) = Cache::load(ssd.dev.clone(), disk.dev.clone())
            .unwrap_or_else(|e| panic!("{what}: reload: {e}"));
        assert_eq!(report.recovered.dirty, 0, "{what}: the shutdown cleaned everything");
        for b in 0..32 {
            assert_data!(disk_block(&disk, b), data(b, 1), "{what}: block {b} on the disk");
        }
        cache.shutdown().unwrap();
    }
}

/// A power loss: the cache is dropped while every SSD write and flush fails,
/// so nothing more reaches the SSD; then the SSD works again.
fn crash(cache: Cache, ssd: &TestDevice) {
    cache.stop_cleaning();
    cache.set_tunable("fast_remove", 1).unwrap();
    let rule =
        ssd.dev.faults().add(FaultRule::fail(OpSet::WRITE | OpSet::FLUSH, 0..u64::MAX, libc::EIO));
    drop(cache);
    assert!(ssd.dev.faults().fired(rule) > 0, "the shutdown wrote nothing to fail");
    ssd.dev.faults().clear_rules();
}

/// A native write hit marks its block dirty without committing: the next
/// flush must commit it like any other write's.
#[test]
fn natively_dirtied_blocks_survive_a_crash_after_a_flush() {
    let (ssd, disk, cache) = rig(CacheMode::WriteBack, false, CommitMode::OnFlush);
    cache.stop_cleaning();
    for b in 0..8 {
        read_block(&cache, b); // clean
        write_block(&cache, 8 + b, 1); // dirty
    }
    cache.flush().unwrap();
    for b in 0..16 {
        let s = write_async(&cache, b * BS, &data(b, 2), IoFlags::empty());
        assert_ran(&s, true, &format!("write hit to block {b}"));
    }
    let (tx, rx) = mpsc::channel();
    cache.submit_flush(move |r| drop(tx.send(outcome(r)))).unwrap();
    assert_eq!(wait_for(&rx, "submit_flush"), "ok");
    crash(cache, &ssd);

    let (cache, report) = Cache::load(ssd.dev.clone(), disk.dev.clone()).unwrap();
    assert_eq!(report.previous_state, SbState::Loaded);
    assert_eq!(report.recovered.dirty, 16, "{report:?}");
    for b in 0..16 {
        assert_data!(read_block(&cache, b), data(b, 2), "block {b} after the crash");
    }
    cache.shutdown().unwrap();
    for b in 0..16 {
        assert_data!(disk_block(&disk, b), data(b, 2), "block {b} cleaned to the disk");
    }
}

// ---------------------------------------------------------------------------
// 6. Faults on the native path.
// ---------------------------------------------------------------------------

#[test]
fn writethrough_a_failed_native_read_of_a_clean_hit_is_served_from_the_disk() {
    let (ssd, _disk, cache) = rig(CacheMode::WriteThrough, false, CommitMode::OnFlush);
    cache.set_tunable("ssd_error_threshold", 1000).unwrap();
    write_block(&cache, 10, 1); // cached, clean
    read_block(&cache, 11);
    assert_eq!(cache.cached_blocks(), 2);
    let before = cache.stats();
    let rule = ssd.dev.faults().add(FaultRule::fail(OpSet::READ, data_sectors(&cache), libc::EIO));
    // NO_CACHE: the dropped block is not filled again.
    let s = read_async(&cache, 10 * BS, BLOCK, IoFlags::NO_CACHE);
    s.result.unwrap_or_else(|e| panic!("the read of a clean block failed: {e}"));
    assert_data!(s.buf, data(10, 1), "served from the disk");
    // A partial read of the other clean block, the same way.
    let s = read_async(&cache, 11 * BS + 3, 2048, IoFlags::NO_CACHE);
    s.result.unwrap_or_else(|e| panic!("the partial read of a clean block failed: {e}"));
    assert_data!(s.buf, data(11, 0)[1536..3584], "partial, served from the disk");
    assert_eq!(ssd.dev.faults().fired(rule), 2, "the SSD was not read");
    let s = cache.stats();
    assert_eq!(s.ssd_read_errors, before.ssd_read_errors + 2, "{s:?}");
    assert_eq!(s.read_hits, before.read_hits + 2, "{s:?}");
    assert_eq!(cache.cached_blocks(), 0, "a block whose SSD copy failed stayed cached");
    ssd.dev.faults().clear_rules();
    assert_data!(read_block(&cache, 10), data(10, 1));
    cache.shutdown().unwrap();
}

#[test]
fn writeback_a_failed_native_read_of_a_dirty_hit_is_an_error_naming_the_ssd() {
    let (ssd, _disk, cache) = rig(CacheMode::WriteBack, false, CommitMode::OnFlush);
    cache.stop_cleaning();
    write_block(&cache, 70, 1);
    let rule = ssd.dev.faults().add(FaultRule::fail(OpSet::READ, data_sectors(&cache), libc::EIO));
    let s = read_async(&cache, 70 * BS, BLOCK, IoFlags::empty());
    assert!(s.native, "the dirty hit did not complete natively");
    assert_io_error(&s.result, Device::Ssd, libc::EIO, "native dirty read hit");
    assert!(s.buf[..] != data(70, 0)[..], "the disk's stale copy was served");
    let s = read_async(&cache, 70 * BS + 2, 1024, IoFlags::empty());
    assert_io_error(&s.result, Device::Ssd, libc::EIO, "native partial dirty read hit");
    assert_eq!(ssd.dev.faults().fired(rule), 2);
    assert_eq!(cache.stats().ssd_read_errors, 2);
    assert_eq!(
        (cache.cached_blocks(), cache.dirty_blocks()),
        (1, 1),
        "the dirty block was dropped"
    );
    ssd.dev.faults().clear_rules();
    assert_data!(read_block(&cache, 70), data(70, 1));
    cache.shutdown().unwrap();
}

#[test]
fn writeback_a_failed_native_write_drops_a_clean_block_and_keeps_a_dirty_one() {
    let (ssd, disk, cache) = rig(CacheMode::WriteBack, false, CommitMode::OnFlush);
    cache.stop_cleaning();
    read_block(&cache, 60); // clean
    write_block(&cache, 61, 1); // dirty
    assert_eq!((cache.cached_blocks(), cache.dirty_blocks()), (2, 1));
    let rule =
        ssd.dev.faults().add(FaultRule::fail(OpSet::WRITE, data_sectors(&cache), libc::ENOSPC));
    let s = write_async(&cache, 60 * BS, &data(60, 2), IoFlags::empty());
    assert!(s.native, "the clean write hit did not complete natively");
    assert_io_error(&s.result, Device::Ssd, libc::ENOSPC, "native write hit, clean block");
    assert_eq!((cache.cached_blocks(), cache.dirty_blocks()), (1, 1), "the clean block stayed");
    let s = write_async(&cache, 61 * BS, &data(61, 2), IoFlags::empty());
    assert!(s.native, "the dirty write hit did not complete natively");
    assert_io_error(&s.result, Device::Ssd, libc::ENOSPC, "native write hit, dirty block");
    assert_eq!(
        (cache.cached_blocks(), cache.dirty_blocks()),
        (1, 1),
        "the dirty block was dropped"
    );
    assert_eq!(ssd.dev.faults().fired(rule), 2);
    assert_eq!(cache.stats().ssd_write_errors, 2);
    ssd.dev.faults().clear_rules();

    // Block 60 comes from the disk, unchanged; block 61 keeps its last good data.
    assert_data!(read_block(&cache, 60), data(60, 0), "the failed write changed block 60");
    assert_data!(read_block(&cache, 61), data(61, 1), "the dirty block lost its data");
    assert_eq!(cache.clean_all().unwrap().cleaned, 1);
    assert_data!(disk_block(&disk, 61), data(61, 1));
    cache.shutdown().unwrap();
}

// ---------------------------------------------------------------------------
// 7. Bad input.
// ---------------------------------------------------------------------------

#[test]
fn bad_ranges_are_refused_at_submission_and_never_call_back() {
    for backing in backings() {
        let ssd = TestDevice::new(backing, SSD_BYTES);
        let disk = TestDevice::new(backing, DISK_BYTES);
        let opts = options(CacheMode::WriteBack, false, CommitMode::OnFlush);
        let cache = Cache::create(ssd.dev.clone(), disk.dev.clone(), &opts).unwrap();
        let align = cache.io_alignment() as usize;
        let end = DISK_BYTES / 512;
        let mut cases = vec![
            (0, 0, "zero length"),
            (0, 100, "length not a multiple of 512"),
            (end - 8, 8192, "past the end"),
            (end, 4096, "starting at the end"),
            (u64::MAX - 7, 4096, "overflowing"),
        ];
        if align > 512 {
            cases.push((1, align, "start not aligned to the logical block"));
            cases.push((0, align + 512, "length not a multiple of the logical block"));
        }
        let before = cache.stats();
        let called = Arc::new(AtomicUsize::new(0));
        let notify = || {
            let called = called.clone();
            move |_: Result<(), CacheError>, _: AlignedBuf| {
                called.fetch_add(1, Ordering::SeqCst);
            }
        };
        for (sector, len, what) in cases {
            let what = format!("{backing}: {what} (sector {sector}, {len} bytes)");
            let refusals = [
                cache.submit_read(sector, AlignedBuf::new(len), IoFlags::empty(), notify()),
                cache.submit_write(sector, AlignedBuf::new(len), IoFlags::empty(), notify()),
                cache.read_future(sector, AlignedBuf::new(len), IoFlags::empty()).map(drop),
                cache.write_future(sector, AlignedBuf::new(len), IoFlags::FUA).map(drop),
            ];
            for r in refusals {
                match r {
                    Err(CacheError::BadRange { sector: s, bytes, .. }) => {
                        assert_eq!((s, bytes), (sector, len as u64), "{what}");
                    }
                    other => panic!("{what}: expected BadRange, got {other:?}"),
                }
            }
        }
        assert_eq!(cache.stats(), before, "{backing}: a refused request did something");
        // The shutdown waits for every accepted callback: none may come now.
        cache.shutdown().unwrap();
        assert_eq!(called.load(Ordering::SeqCst), 0, "{backing}: a refused request called back");
    }
}

// ---------------------------------------------------------------------------
// Robustness.
// ---------------------------------------------------------------------------

#[test]
fn a_panicking_native_callback_leaves_the_cache_working() {
    let (_ssd, _disk, cache) = rig(CacheMode::WriteBack, false, CommitMode::OnFlush);
    cache.stop_cleaning();
    write_block(&cache, 1, 1);
    let (tx, rx) = mpsc::channel();
    cache
        .submit_read(BS, AlignedBuf::new(BLOCK), IoFlags::empty(), move |_, _| {
            let native = in_notify_callback();
            let _ = tx.send(native);
            panic!("a callback panicking on purpose");
        })
        .unwrap();
    assert!(wait_for(&rx, "the panicking callback"), "the read hit did not complete natively");
    // The block's lock was let go and dm-io goes on: more hits, and a shutdown
    // that does not wait forever for the panicked request.
    let s = read_async(&cache, BS, BLOCK, IoFlags::empty());
    assert_ran(&s, true, "a read hit after the panic");
    let s = write_async(&cache, BS, &data(1, 2), IoFlags::empty());
    assert_ran(&s, true, "a write hit after the panic");
    assert_data!(read_block(&cache, 1), data(1, 2));
    cache.shutdown().unwrap();
}

/// Callbacks of misses run on the cache's worker pool: more panicking ones
/// than the pool starts with must not take the pool down with them.
#[test]
fn panicking_worker_callbacks_leave_the_pool_working() {
    let (_ssd, _disk, cache) = rig(CacheMode::WriteBack, false, CommitMode::OnFlush);
    cache.stop_cleaning();
    let panics = 2 * ASYNC_WORKERS as u64;
    let (tx, rx) = mpsc::channel();
    for block in 0..panics {
        let tx = tx.clone();
        cache
            .submit_read(block * BS, AlignedBuf::new(BLOCK), IoFlags::empty(), move |_, _| {
                let _ = tx.send(in_notify_callback());
                panic!("a worker callback panicking on purpose");
            })
            .unwrap();
    }
    for _ in 0..panics {
        assert!(!wait_for(&rx, "a panicking miss callback"), "a miss completed natively");
    }
    // Workers have run panicking callbacks; misses still complete.
    let s = read_async(&cache, panics * BS, BLOCK, IoFlags::empty());
    assert_ran(&s, false, "a read miss after the panics");
    cache.shutdown().unwrap();
}

/// Misses run on the worker pool, which grows while every worker is busy:
/// 32 read misses whose disk reads each take 300 ms overlap, rather than
/// running 4 at a time (8 x 300 ms), and each gets its block's data.
#[test]
fn async_misses_overlap_beyond_the_first_workers() {
    let (_ssd, disk, cache) = rig(CacheMode::WriteBack, false, CommitMode::OnFlush);
    cache.stop_cleaning();
    const MISSES: u64 = 32;
    let delay = Duration::from_millis(300);
    disk.dev.faults().add(FaultRule::delay(OpSet::READ, delay).when(Trigger::FirstN(MISSES)));
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    for block in 0..MISSES {
        let tx = tx.clone();
        cache
            .submit_read(block * BS, AlignedBuf::new(BLOCK), IoFlags::empty(), move |r, buf| {
                let _ = tx.send((block, r, buf, in_notify_callback()));
            })
            .unwrap();
    }
    for _ in 0..MISSES {
        let (block, result, buf, native) = wait_for(&rx, "a delayed read miss");
        result.unwrap_or_else(|e| panic!("the miss of block {block} failed: {e}"));
        assert!(!native, "the miss of block {block} completed natively");
        assert_data!(buf, pattern(block * BS, BS, 0), "block {block} read back other bytes");
    }
    let took = start.elapsed();
    assert!(
        took < 4 * delay,
        "{MISSES} misses with {delay:?} disk reads took {took:?}: they did not overlap \
         (the pool started with {ASYNC_WORKERS} workers)"
    );
    assert_eq!(cache.stats().read_hits, 0, "a block was cached before its miss");
    disk.dev.faults().clear_rules();
    cache.shutdown().unwrap();
}

/// A callback on a worker of cache A shuts cache B down while B has a
/// request in flight: B's shutdown must still wait for B's callback, and the
/// write that callback acknowledges must be on B's disk after B's orderly
/// shutdown.
#[test]
fn shutdown_from_another_caches_worker_waits_for_its_own_requests() {
    let (_ssd_a, _disk_a, a) = rig(CacheMode::WriteBack, false, CommitMode::OnFlush);
    let (ssd_b, disk_b, b) = rig(CacheMode::WriteBack, false, CommitMode::OnFlush);
    b.stop_cleaning();
    read_block(&b, 60); // clean, cached
    // B's next data write is held back: its native write hit stays in flight.
    let rule = FaultRule {
        ops: OpSet::WRITE,
        sectors: data_sectors(&b),
        action: FaultAction::Delay(Duration::from_millis(300)),
        trigger: Trigger::Nth(1),
    };
    ssd_b.dev.faults().add(rule);
    let b_done: Arc<Mutex<Option<(bool, String)>>> = Arc::new(Mutex::new(None));
    let b_seen = b_done.clone();
    b.submit_write(60 * BS, AlignedBuf::from_slice(&data(60, 5)), IoFlags::empty(), move |r, _| {
        *b_seen.lock().unwrap() = Some((in_notify_callback(), outcome(r)));
    })
    .unwrap();

    let slot = Arc::new(Mutex::new(Some(b)));
    let b_seen = b_done.clone();
    let (tx, rx) = mpsc::channel();
    a.submit_read(300 * BS, AlignedBuf::new(BLOCK), IoFlags::empty(), move |_, _| {
        let native = in_notify_callback();
        let Some(b) = slot.lock().unwrap().take() else { return };
        let result = outcome(b.shutdown());
        let b_ran = b_seen.lock().unwrap().is_some();
        let _ = tx.send((native, result, b_ran));
    })
    .unwrap();
    let (native, result, b_ran) = wait_for(&rx, "A's read miss");
    assert!(!native, "A's read miss completed natively");
    assert_eq!(result, "ok", "B's shutdown");
    assert!(b_ran, "B's shutdown returned before the callback of B's accepted write had run");

    let deadline = Instant::now() + WAIT;
    let (on_dmio, r) = loop {
        if let Some(seen) = b_done.lock().unwrap().take() {
            break seen;
        }
        assert!(Instant::now() < deadline, "B's write never called back");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(on_dmio, "B's write hit did not complete natively");
    assert_eq!(r, "ok", "B's write");
    assert_data!(disk_block(&disk_b, 60), data(60, 5), "an acknowledged write is not on B's disk");
    a.shutdown().unwrap();
}
