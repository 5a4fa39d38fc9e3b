//! cache-bench: an fio-like load generator for [`flashcache_core::cache::Cache`].
//!
//! It creates a cache (with force: whatever was on the SSD is overwritten) on
//! `--ssd` for `--disk`, optionally warms it, then drives it for `--runtime`
//! seconds with 4 KiB (`--bs`) random reads or writes at block-aligned offsets
//! of the working set (`--offset`..`--offset + --working-set` of the disk).
//!
//! `--engine` picks how `--iodepth N` requests are kept in flight:
//!
//! - `sync` (the default): N threads, each with one blocking call
//!   ([`Cache::read_with`], [`Cache::write_with`]) in flight, like fio's
//!   `--ioengine=psync --numjobs=N --thread`. The cache is shared between them
//!   with an [`Arc`].
//! - `async`: N requests in flight from one thread through the cache's native
//!   asynchronous API ([`Cache::submit_read`], [`Cache::submit_write`]), like
//!   fio's `--ioengine=io_uring --numjobs=1 --iodepth=N`. The main thread
//!   submits N requests ("slots"); each completion callback records its
//!   latency and submits the slot's next request with the same buffer, so no
//!   thread of the benchmark waits for an I/O. This is the engine to compare
//!   against fio's io_uring numbers; `sync` compares with fio's psync. Its
//!   buffers come from [`Cache::io_buffer`] (`--mem pool`, the default: the
//!   cache's registered dm-io pool, so hits use io_uring's fixed-buffer
//!   opcodes, as fio does with `--fixedbufs`) or the heap (`--mem heap`).
//!
//! - `--warm` first reads (`--rw randread`) or writes (`--rw randwrite`) the
//!   whole working set once, with `--warm-threads` threads, then flushes, so
//!   the measured phase is all hits when the cache holds the working set
//!   (`--cache-size`, default the whole SSD).
//! - Without `--warm` (and a working set larger than the cache, or
//!   `--no-fill`, which marks every read `NO_CACHE`) it measures misses.
//! - `--cgroup DIR` moves the process into a cgroup (v1: writes its pid to
//!   `DIR/cgroup.procs`) after the warm phase, right before measuring. The
//!   comparison script uses it for all-hit reads so the warm-up is not held to
//!   the throttled disk's 200 IOPS while the measured phase runs under the same
//!   limits as fio.
//!
//! The report gives IOPS, the hit ratio of the measured phase (from the
//! cache's counters: read hits / reads, or write hits / writes), latency
//! percentiles (one HDR histogram per thread or slot, merged; submit to
//! completion), the process's CPU time
//! (`getrusage`), the busy time of all CPUs (`/proc/stat`, which also counts
//! loop kworkers), and the RAM the block index takes per cache block
//! ([`Cache::index_bytes`]). At the end the cache is shut down with
//! `fast_remove` set, so a write run does not spend minutes cleaning.
//!
//! ```text
//! cargo run --release -p benches --bin cache-bench -- --ssd /dev/loop0 --disk /dev/loop1 \
//!     --mode back --rw randread --bs 4k --engine async --iodepth 32 --runtime 8 \
//!     --working-set 1g --warm --json
//! ```

#[path = "../shared/args.rs"]
mod args;
#[path = "../shared/cpu.rs"]
mod cpu;
#[path = "../shared/policy.rs"]
mod policy;
use args::parse_size;
use cpu::{SystemCpu, clock_ticks, loop_dio, process_cpu};
use flashcache_core::sim::SplitMix64;
use policy::Policy;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use flashcache_core::cache::{Cache, CacheError, IoFlags};
use flashcache_core::dmio::{AlignedBuf, BlockDevice};
use flashcache_core::format::{CacheMode, CommitMode};
use flashcache_core::policy::CacheStats;
use flashcache_core::setup::CreateOptions;
use hdrhistogram::Histogram;

/// The cache mode (`--mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Write-back.
    Back,
    /// Write-through.
    Thru,
    /// Write-around.
    Around,
}

impl Mode {
    fn cache_mode(self) -> CacheMode {
        match self {
            Mode::Back => CacheMode::WriteBack,
            Mode::Thru => CacheMode::WriteThrough,
            Mode::Around => CacheMode::WriteAround,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Back => "back",
            Mode::Thru => "thru",
            Mode::Around => "around",
        }
    }
}

/// The access pattern (fio's `--rw`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Rw {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
}

impl Rw {
    fn name(self) -> &'static str {
        match self {
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
        }
    }
}

/// How the measured phase keeps `--iodepth` requests in flight (`--engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Engine {
    /// --iodepth threads, each with one blocking call in flight (like fio's
    /// psync with --numjobs=N --thread).
    Sync,
    /// --iodepth requests in flight through the cache's asynchronous API, no
    /// thread per request: each completion callback submits the next (like
    /// fio's io_uring with --iodepth=N).
    Async,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Sync => "sync",
            Engine::Async => "async",
        }
    }
}

/// Where the async engine's request buffers come from (`--mem`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mem {
    /// `Cache::io_buffer`: pages of the cache's dm-io pool, registered with
    /// its ring (io_uring's fixed-buffer opcodes on hits).
    Pool,
    /// Plain heap `AlignedBuf`s (the kernel pins them on every I/O).
    Heap,
}

impl Mem {
    fn name(self) -> &'static str {
        match self {
            Mem::Pool => "pool",
            Mem::Heap => "heap",
        }
    }
}

/// When metadata reaches the SSD (`--commit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Commit {
    /// Grouped, at flush/FUA and once a second.
    OnFlush,
    /// A block's first dirtying write commits its slot before returning.
    Sync,
}

impl Commit {
    fn commit_mode(self) -> CommitMode {
        match self {
            Commit::OnFlush => CommitMode::OnFlush,
            Commit::Sync => CommitMode::Sync,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Commit::OnFlush => "on-flush",
            Commit::Sync => "sync",
        }
    }
}

/// What the warm phase does (`--warm-op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WarmOp {
    /// Reads for `--rw randread`, writes for `--rw randwrite`.
    Auto,
    /// Read the working set (blocks are cached clean).
    Read,
    /// Write the working set (write-back: blocks are cached dirty).
    Write,
}

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "cache-bench",
    about = "fio-like benchmark of the flashcache-core Cache: IOPS, hit ratio, latency, CPU, index RAM"
)]
struct Args {
    /// The SSD (cache device). Its contents are overwritten (the cache is created with force).
    #[arg(long)]
    ssd: PathBuf,
    /// The disk behind the cache. Write runs overwrite its data (cleaning).
    #[arg(long)]
    disk: PathBuf,
    /// Cache mode.
    #[arg(long, value_enum, default_value_t = Mode::Back)]
    mode: Mode,
    /// Access pattern of the measured phase.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Bytes per request (suffixes k, m, g are powers of 1024).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// How requests are kept in flight: threads with one blocking call each
    /// (sync), or asynchronous requests resubmitted from their callbacks (async).
    #[arg(long, value_enum, default_value_t = Engine::Sync)]
    engine: Engine,
    /// Where the async engine's buffers come from: the cache's registered dm-io
    /// page pool (`Cache::io_buffer`: fixed-buffer I/O on hits), or the heap.
    #[arg(long, value_enum, default_value_t = Mem::Pool)]
    mem: Mem,
    /// Requests in flight: threads, each with one blocking call (--engine
    /// sync), or asynchronous requests in flight at once (--engine async).
    #[arg(long, default_value_t = 32)]
    iodepth: usize,
    /// Seconds of measurement (after the ramp).
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Seconds of load before measuring, discarded (fio's --ramp_time).
    #[arg(long, default_value_t = 0.0)]
    ramp: f64,
    /// Bytes of the disk the random offsets cover, from --offset (default: to the end).
    #[arg(long, value_parser = parse_size)]
    working_set: Option<u64>,
    /// First byte of the working set on the disk.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    offset: u64,
    /// Bytes of the SSD the cache uses (default: all of it).
    #[arg(long, value_parser = parse_size)]
    cache_size: Option<u64>,
    /// Read (or write, for randwrite) the whole working set once before measuring.
    #[arg(long)]
    warm: bool,
    /// Seconds to sit idle after the warm phase, before the load starts. The
    /// warm phase is a burst of CPU and I/O that a reference tool does not
    /// have right before its run; on a VM whose host caps its CPU time, the
    /// burst shows up as steal in the measured window that follows unless
    /// the machine settles first.
    #[arg(long, default_value_t = 0.0)]
    settle: f64,
    /// What the warm phase does.
    #[arg(long, value_enum, default_value_t = WarmOp::Auto)]
    warm_op: WarmOp,
    /// Threads of the warm phase.
    #[arg(long, default_value_t = 16)]
    warm_threads: usize,
    /// Mark every measured read NO_CACHE (misses are not filled).
    #[arg(long)]
    no_fill: bool,
    /// Metadata commit mode.
    #[arg(long, value_enum, default_value_t = Commit::OnFlush)]
    commit: Commit,
    /// Cache block size.
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    block_size: u64,
    /// Blocks per set.
    #[arg(long, default_value_t = 512)]
    assoc: u32,
    /// Replacement policy.
    #[arg(long, value_enum, default_value_t = Policy::Sieve)]
    policy: Policy,
    /// Set a tunable before measuring (NAME=VALUE, flashcache's names; repeatable).
    #[arg(long = "tunable", value_name = "NAME=VALUE")]
    tunables: Vec<String>,
    /// Join this cgroup (v1 directory; the pid goes to its cgroup.procs) after the
    /// warm phase, right before measuring.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Seed of the random offsets (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Print one JSON object instead of the human-readable report.
    #[arg(long)]
    json: bool,
}

/// Parses `NAME=VALUE`.
fn parse_tunable(text: &str) -> Result<(String, u64), String> {
    let (name, value) =
        text.split_once('=').ok_or_else(|| format!("--tunable `{text}` is not NAME=VALUE"))?;
    let value = value
        .trim()
        .parse()
        .map_err(|_| format!("--tunable `{text}`: `{value}` is not a non-negative integer"))?;
    Ok((name.trim().to_string(), value))
}

/// Run phases, as seen by the workers.
const PHASE_RAMP: u8 = 0;
/// Completions are recorded.
const PHASE_MEASURE: u8 = 1;
/// Workers stop.
const PHASE_STOP: u8 = 2;

/// A buffer of `len` bytes aligned to 4 KiB, every byte `fill`. The cache
/// copies through its own aligned buffers, so the alignment only keeps the
/// caller's side realistic; dmio's [`AlignedBuf`] is also the type the
/// asynchronous API takes and hands back, so both engines use it.
fn filled_buf(len: usize, fill: u8) -> AlignedBuf {
    let mut buf = AlignedBuf::new(len);
    buf.fill(fill);
    buf
}

/// What the measured phase shares between threads (sync engine) or
/// completion callbacks (async engine).
struct Shared {
    cache: Arc<Cache>,
    rw: Rw,
    flags: IoFlags,
    /// First sector of the working set.
    start_sector: u64,
    /// Requests (of `bs`) in the working set.
    blocks: u64,
    /// Sectors per request.
    sectors: u64,
    phase: AtomicU8,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Async engine: slots that have not stopped yet. The main thread waits
    /// for 0 after the stop before it reads `slot_results`.
    slots_running: AtomicUsize,
    /// Async engine: what each stopped slot measured (one short lock per slot,
    /// at its end; never per I/O).
    slot_results: Mutex<Vec<WorkerResult>>,
    /// Async engine: the latencies of every slot, in one histogram (as fio
    /// keeps one per job and dmio-bench one per run). One histogram per slot
    /// would spread each record over `--iodepth` separate arrays of counts,
    /// hundreds of KiB that evict the cache's own index from the CPU caches;
    /// the lock is uncontended (callbacks run on dm-io's completion thread).
    async_hist: Mutex<Histogram<u64>>,
}

impl Shared {
    fn fail(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(message);
        }
    }
}

/// What one worker thread (or async slot) measured: its latencies (a sync
/// worker's own histogram; async slots share [`Shared::async_hist`]) and its
/// request count.
struct WorkerResult {
    hist: Option<Histogram<u64>>,
    ios: u64,
}

fn new_histogram() -> Result<Histogram<u64>, String> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| format!("cannot create a latency histogram: {e}"))?;
    h.auto(false);
    Ok(h)
}

/// One worker: synchronous I/O at random offsets until the run stops.
fn worker(shared: Arc<Shared>, seed: u64, bs: usize, mut hist: Histogram<u64>) -> WorkerResult {
    let mut rng = SplitMix64::new(seed);
    let mut buf = filled_buf(bs, (seed as u8) ^ 0x5a);
    let mut ios = 0u64;
    loop {
        let phase = shared.phase.load(Ordering::Acquire);
        if phase == PHASE_STOP || shared.errors.load(Ordering::Relaxed) != 0 {
            break;
        }
        let sector = shared.start_sector + rng.below(shared.blocks) * shared.sectors;
        let started = Instant::now();
        let result = match shared.rw {
            Rw::Randread => shared.cache.read_with(sector, &mut buf, shared.flags),
            Rw::Randwrite => shared.cache.write_with(sector, &buf, shared.flags),
        };
        let now = Instant::now();
        if let Err(e) = result {
            shared.fail(format!("{} at sector {sector} failed: {e}", shared.rw.name()));
            break;
        }
        if phase == PHASE_MEASURE {
            record_latency(&mut hist, started, now);
            ios += 1;
        }
    }
    WorkerResult { hist: Some(hist), ios }
}

/// Records the latency of a request submitted at `started` and done at `now`
/// (at least 1 ns: the histogram's lowest value).
fn record_latency(hist: &mut Histogram<u64>, started: Instant, now: Instant) {
    let ns = now.saturating_duration_since(started).as_nanos();
    hist.saturating_record(u64::try_from(ns).unwrap_or(u64::MAX).max(1));
}

/// How long the main thread waits, after the stop, for the async engine's
/// last requests to complete. A cache hit takes microseconds and a throttled
/// miss milliseconds, so running out of this means a lost completion: an
/// error, not a hang.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// One slot of the async engine: the state of one of the `--iodepth` requests
/// kept in flight.
///
/// The slot moves into its request's completion callback and from there into
/// the next request's, so exactly one thread owns it at a time: recording a
/// latency takes no lock and slots never contend with each other. Its buffer
/// travels through the cache instead (`submit_*` takes it, the callback hands
/// it back), so the benchmark allocates no buffer per I/O (the cache boxes
/// each callback, as any caller's).
struct AsyncSlot {
    shared: Arc<Shared>,
    rng: SplitMix64,
    /// Requests recorded.
    ios: u64,
    /// When the request in flight was submitted.
    started: Instant,
    /// Whether the request in flight was submitted in the measure phase. The
    /// sync worker's rule (the phase read before a call decides whether the
    /// call counts), so both engines count the same requests.
    measured: bool,
}

impl AsyncSlot {
    /// A slot whose random offsets come from `seed` (like a sync worker's).
    fn new(shared: Arc<Shared>, seed: u64) -> AsyncSlot {
        let rng = SplitMix64::new(seed);
        AsyncSlot { shared, rng, ios: 0, started: Instant::now(), measured: false }
    }

    /// Submits the slot's next request with `buf`, or ends the slot when the
    /// run has stopped or failed. Runs on the main thread for the first
    /// request and inside the previous request's callback after that, so it
    /// must not block: it reads atomics and calls `submit_*`, which does not.
    fn submit_next(mut self, buf: AlignedBuf) {
        let phase = self.shared.phase.load(Ordering::Acquire);
        if phase == PHASE_STOP || self.shared.errors.load(Ordering::Relaxed) != 0 {
            self.finish();
            return;
        }
        // The callback takes the slot (and its reference to `Shared`) and may
        // run on another thread before `submit_*` returns, so this call needs
        // a reference of its own.
        let shared = self.shared.clone();
        let sector = shared.start_sector + self.rng.below(shared.blocks) * shared.sectors;
        self.measured = phase == PHASE_MEASURE;
        self.started = Instant::now();
        let done = move |result: Result<(), CacheError>, buf: AlignedBuf| {
            self.complete(sector, result, buf);
        };
        let submitted = match shared.rw {
            Rw::Randread => shared.cache.submit_read(sector, buf, shared.flags, done),
            Rw::Randwrite => shared.cache.submit_write(sector, buf, shared.flags, done),
        };
        if let Err(e) = submitted {
            // The callback was dropped uncalled, and the slot with it: the
            // slot ends here (its measurements do not matter, the run failed).
            shared.fail(format!("submitting {} at sector {sector} failed: {e}", shared.rw.name()));
            shared.slots_running.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The completion callback of the slot's request at `sector`: records it
    /// and submits the next one with the same buffer.
    fn complete(mut self, sector: u64, result: Result<(), CacheError>, buf: AlignedBuf) {
        let now = Instant::now();
        if let Err(e) = result {
            self.shared.fail(format!("{} at sector {sector} failed: {e}", self.shared.rw.name()));
            self.finish();
            return;
        }
        if self.measured {
            let mut hist = self.shared.async_hist.lock().unwrap_or_else(|e| e.into_inner());
            record_latency(&mut hist, self.started, now);
            drop(hist);
            self.ios += 1;
        }
        self.submit_next(buf);
    }

    /// Ends the slot: hands its request count to the main thread (its
    /// latencies are in [`Shared::async_hist`] already).
    fn finish(self) {
        let AsyncSlot { shared, ios, .. } = self;
        shared
            .slot_results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(WorkerResult { hist: None, ios });
        shared.slots_running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The load of the measured phase while it runs.
enum Load {
    /// Sync engine: the worker threads.
    Threads(Vec<JoinHandle<WorkerResult>>),
    /// Async engine: the slots keep themselves going from their callbacks;
    /// [`Shared::slots_running`] and [`Shared::slot_results`] track them.
    Slots,
}

/// Starts `iodepth` sync workers, seeded from `rng`. A thread that cannot be
/// started stops the run (recorded in `shared`); the ones started are returned
/// to be joined.
fn start_threads(
    shared: &Arc<Shared>,
    iodepth: usize,
    bs: usize,
    rng: &mut SplitMix64,
) -> Result<Load, String> {
    let mut handles = Vec::with_capacity(iodepth);
    for i in 0..iodepth {
        let worker_shared = shared.clone();
        let hist = new_histogram()?;
        let thread_seed = rng.next_u64();
        let handle = std::thread::Builder::new()
            .name(format!("cache-bench-{i}"))
            .spawn(move || worker(worker_shared, thread_seed, bs, hist))
            .map_err(|e| format!("cannot start worker thread {i}: {e}"));
        match handle {
            Ok(h) => handles.push(h),
            Err(e) => {
                shared.phase.store(PHASE_STOP, Ordering::Release);
                shared.fail(e);
                break;
            }
        }
    }
    Ok(Load::Threads(handles))
}

/// Starts `iodepth` async slots, seeded from `rng` like the sync workers, each
/// with a `bs`-byte buffer filled like a sync worker's (what writes write).
/// Everything is allocated before the first submission, so an error here
/// leaves nothing in flight.
fn start_slots(
    shared: &Arc<Shared>,
    iodepth: usize,
    bs: usize,
    mem: Mem,
    rng: &mut SplitMix64,
) -> Result<Load, String> {
    let mut slots = Vec::with_capacity(iodepth);
    for _ in 0..iodepth {
        let seed = rng.next_u64();
        let slot = AsyncSlot::new(shared.clone(), seed);
        let mut buf = match mem {
            Mem::Pool => shared.cache.io_buffer(bs),
            Mem::Heap => AlignedBuf::new(bs),
        };
        buf.fill((seed as u8) ^ 0x5a);
        slots.push((slot, buf));
    }
    for (slot, buf) in slots {
        shared.slots_running.fetch_add(1, Ordering::AcqRel);
        slot.submit_next(buf);
    }
    Ok(Load::Slots)
}

/// Waits, after the stop, until the load has ended (threads joined, or every
/// async slot ended and every callback let go of `shared`), and merges what it
/// measured. A panicked thread or a slot that does not end within
/// [`DRAIN_TIMEOUT`] is recorded in `shared` as the run's error.
fn finish_load(load: Load, shared: &Arc<Shared>) -> Result<(Histogram<u64>, u64), String> {
    let mut results = Vec::new();
    match load {
        Load::Threads(handles) => {
            for h in handles {
                match h.join() {
                    Ok(r) => results.push(r),
                    Err(_) => shared.fail("a worker thread panicked".into()),
                }
            }
        }
        Load::Slots => {
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            // A callback drops its references to `shared` just after its slot
            // ends; the cache can only be shut down once they are all gone, so
            // both are waited for. Neither takes long: a short sleep loop.
            let busy = || {
                shared.slots_running.load(Ordering::Acquire) != 0 || Arc::strong_count(shared) > 1
            };
            while busy() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if busy() {
                shared.fail(format!(
                    "{} async requests were still in flight (or their callbacks running) {} s \
                     after the run stopped",
                    shared.slots_running.load(Ordering::Acquire),
                    DRAIN_TIMEOUT.as_secs()
                ));
            }
            results =
                std::mem::take(&mut *shared.slot_results.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }
    let mut hist = std::mem::replace(
        &mut *shared.async_hist.lock().unwrap_or_else(|e| e.into_inner()),
        new_histogram()?,
    );
    let mut ios = 0u64;
    for r in results {
        if let Some(h) = &r.hist {
            hist.add(h).map_err(|e| format!("merging latency histograms: {e}"))?;
        }
        ios += r.ios;
    }
    Ok((hist, ios))
}

/// Reads or writes every block of the working set once, `threads` at a time,
/// in chunks of up to 64 KiB. Returns the seconds it took.
fn warm(
    cache: &Arc<Cache>,
    op: Rw,
    start_sector: u64,
    bytes: u64,
    threads: usize,
) -> Result<f64, String> {
    const CHUNK: u64 = 64 * 1024;
    let t0 = Instant::now();
    let chunks = bytes.div_ceil(CHUNK);
    let next = Arc::new(AtomicU64::new(0));
    let failed: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let mut handles = Vec::new();
    for t in 0..threads.max(1) {
        let (cache, next, failed) = (cache.clone(), next.clone(), failed.clone());
        handles.push(std::thread::spawn(move || {
            let mut buf = filled_buf(CHUNK as usize, 0xc3 ^ t as u8);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= chunks || failed.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                    return;
                }
                let len = (bytes - i * CHUNK).min(CHUNK) as usize;
                let sector = start_sector + i * CHUNK / 512;
                let result = match op {
                    Rw::Randread => cache.read(sector, &mut buf[..len]),
                    Rw::Randwrite => cache.write(sector, &buf[..len]),
                };
                if let Err(e) = result {
                    let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                    f.get_or_insert(format!("warming (sector {sector}) failed: {e}"));
                    return;
                }
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e);
    }
    cache.flush().map_err(|e| format!("the flush after warming failed: {e}"))?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Moves this process (every thread) into the cgroup-v1 directory `dir`.
fn join_cgroup(dir: &Path) -> Result<(), String> {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, format!("{}\n", std::process::id()))
        .map_err(|e| format!("cannot join the cgroup {}: {e}", procs.display()))
}

/// Sleeps `secs` seconds, returning early (false) when a worker failed.
fn sleep_watching(shared: &Shared, secs: f64) -> bool {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        if shared.errors.load(Ordering::Relaxed) != 0 {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Counter differences `b - a`.
fn stats_delta(a: &CacheStats, b: &CacheStats) -> Vec<(&'static str, u64)> {
    a.fields()
        .iter()
        .zip(b.fields())
        .map(|((name, x), (_, y))| (*name, y.saturating_sub(*x)))
        .collect()
}

/// What one run measured.
struct Report {
    args_summary: serde_json::Value,
    warm_s: Option<f64>,
    runtime_s: f64,
    ios: u64,
    hist: Histogram<u64>,
    cpu_user_s: f64,
    cpu_sys_s: f64,
    system_busy_s: f64,
    system_idle_s: f64,
    steal_s: f64,
    delta: Vec<(&'static str, u64)>,
    index_bytes: u64,
    index_bytes_per_block: f64,
    cache_blocks: u64,
    working_set_blocks: u64,
    cached_blocks_before: u64,
    dirty_blocks_before: u64,
    dirty_blocks_after: u64,
    shutdown_s: f64,
    ssd_dio: Option<bool>,
    disk_dio: Option<bool>,
    rw: Rw,
    engine: Engine,
}

impl Report {
    fn counter(&self, name: &str) -> u64 {
        self.delta.iter().find(|(n, _)| *n == name).map_or(0, |(_, v)| *v)
    }

    fn iops(&self) -> f64 {
        if self.runtime_s > 0.0 { self.ios as f64 / self.runtime_s } else { 0.0 }
    }

    fn hit_ratio(&self) -> f64 {
        let (hits, all) = match self.rw {
            Rw::Randread => (self.counter("read_hits"), self.counter("reads")),
            Rw::Randwrite => (self.counter("write_hits"), self.counter("writes")),
        };
        if all == 0 { 0.0 } else { hits as f64 / all as f64 }
    }

    fn per_io_us(&self, seconds: f64) -> f64 {
        if self.ios == 0 { 0.0 } else { seconds * 1e6 / self.ios as f64 }
    }

    fn json(&self) -> serde_json::Value {
        let h = &self.hist;
        let counters: serde_json::Map<String, serde_json::Value> =
            self.delta.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect();
        serde_json::json!({
            "tool": "cache-bench",
            "engine": self.engine.name(),
            "args": self.args_summary,
            "warm_s": self.warm_s,
            "runtime_s": self.runtime_s,
            "ios": self.ios,
            "iops": self.iops(),
            "hit_ratio": self.hit_ratio(),
            "lat_min_ns": h.min(),
            "lat_mean_ns": h.mean(),
            "lat_p50_ns": h.value_at_quantile(0.50),
            "lat_p90_ns": h.value_at_quantile(0.90),
            "lat_p99_ns": h.value_at_quantile(0.99),
            "lat_p999_ns": h.value_at_quantile(0.999),
            "lat_max_ns": h.max(),
            "cpu_user_s": self.cpu_user_s,
            "cpu_sys_s": self.cpu_sys_s,
            "cpu_us_per_io": self.per_io_us(self.cpu_user_s + self.cpu_sys_s),
            "system_busy_s": self.system_busy_s,
            "system_idle_s": self.system_idle_s,
            "system_cpu_us_per_io": self.per_io_us(self.system_busy_s),
            "steal_s": self.steal_s,
            "index_bytes": self.index_bytes,
            "index_bytes_per_block": self.index_bytes_per_block,
            "cache_blocks": self.cache_blocks,
            "working_set_blocks": self.working_set_blocks,
            "cached_blocks_before": self.cached_blocks_before,
            "dirty_blocks_before": self.dirty_blocks_before,
            "dirty_blocks_after": self.dirty_blocks_after,
            "shutdown_s": self.shutdown_s,
            "ssd_loop_dio": self.ssd_dio,
            "disk_loop_dio": self.disk_dio,
            "counters": counters,
        })
    }

    fn human(&self) -> String {
        let mut out = String::new();
        let h = &self.hist;
        let _ = writeln!(out, "cache-bench: {}", self.args_summary);
        if let Some(w) = self.warm_s {
            let _ = writeln!(
                out,
                "  warm: {w:.1}s, then {} of {} cache blocks cached ({} dirty); working set {} blocks",
                self.cached_blocks_before,
                self.cache_blocks,
                self.dirty_blocks_before,
                self.working_set_blocks
            );
        }
        let _ = writeln!(
            out,
            "  IOPS {:.0}  hit ratio {:.4}  ios {}  runtime {:.2}s",
            self.iops(),
            self.hit_ratio(),
            self.ios,
            self.runtime_s
        );
        out.push_str(&cpu::latency_line(h));
        out.push_str(&cpu::cpu_line(
            (self.cpu_user_s, self.cpu_sys_s),
            (self.system_busy_s, self.system_idle_s, self.steal_s),
            |s| self.per_io_us(s),
        ));
        let _ = writeln!(
            out,
            "  index: {} bytes, {:.2} bytes per cache block; dirty blocks at the end {}; shutdown {:.2}s",
            self.index_bytes, self.index_bytes_per_block, self.dirty_blocks_after, self.shutdown_s
        );
        let nonzero: Vec<String> =
            self.delta.iter().filter(|(_, v)| *v != 0).map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "  counters (measured phase): {}", nonzero.join(" "));
        for (name, dio) in [("SSD", self.ssd_dio), ("disk", self.disk_dio)] {
            if dio == Some(false) {
                let _ = writeln!(out, "  WARNING: the {name} loop device has direct I/O OFF");
            }
        }
        out
    }
}

/// Runs the benchmark.
fn run(args: &Args) -> Result<Report, String> {
    if args.iodepth == 0 || args.iodepth > 4096 {
        let what = match args.engine {
            Engine::Sync => "threads",
            Engine::Async => "requests in flight",
        };
        return Err(format!("--iodepth must be 1 to 4096 ({what}), not {}", args.iodepth));
    }
    if args.warm_threads == 0 || args.warm_threads > 4096 {
        return Err(format!("--warm-threads must be 1 to 4096, not {}", args.warm_threads));
    }
    if !(args.runtime > 0.0 && args.runtime.is_finite()) {
        return Err(format!(
            "--runtime must be a positive number of seconds, not {}",
            args.runtime
        ));
    }
    if !(args.settle >= 0.0 && args.settle <= 600.0) {
        return Err(format!("--settle must be 0 to 600 seconds, not {}", args.settle));
    }
    if !(args.ramp >= 0.0 && args.ramp.is_finite()) {
        return Err(format!("--ramp must be >= 0 seconds, not {}", args.ramp));
    }
    let bs = args.bs;
    if bs == 0 || !bs.is_multiple_of(512) || bs > (64 << 20) {
        return Err(format!("--bs must be a positive multiple of 512 up to 64m, not {bs}"));
    }
    let tunables: Vec<(String, u64)> =
        args.tunables.iter().map(|t| parse_tunable(t)).collect::<Result<_, _>>()?;

    let ssd = BlockDevice::open(&args.ssd)
        .map_err(|e| format!("cannot open the SSD {}: {e}", args.ssd.display()))?;
    let disk = BlockDevice::open(&args.disk)
        .map_err(|e| format!("cannot open the disk {}: {e}", args.disk.display()))?;
    let disk_bytes = disk.size_bytes();
    if args.offset >= disk_bytes || !args.offset.is_multiple_of(bs) {
        return Err(format!(
            "--offset {} must be a multiple of --bs ({bs}) below the disk's size ({disk_bytes} bytes)",
            args.offset
        ));
    }
    let ws = args.working_set.unwrap_or(disk_bytes - args.offset);
    if ws > disk_bytes - args.offset {
        return Err(format!(
            "--offset {} + --working-set {ws} is beyond the end of {} ({disk_bytes} bytes)",
            args.offset,
            args.disk.display()
        ));
    }
    let blocks = ws / bs;
    if blocks == 0 {
        return Err(format!(
            "the working set ({ws} bytes) is smaller than one request of {bs} bytes"
        ));
    }
    if let Some(size) = args.cache_size
        && size > ssd.size_bytes()
    {
        return Err(format!(
            "--cache-size {size} is larger than the SSD {} ({} bytes)",
            args.ssd.display(),
            ssd.size_bytes()
        ));
    }

    let options = CreateOptions {
        mode: args.mode.cache_mode(),
        commit: args.commit.commit_mode(),
        block_bytes: args.block_size,
        assoc: args.assoc,
        size_bytes: args.cache_size,
        policy: args.policy.kind(),
        force: true,
        ..CreateOptions::default()
    };
    let cache = Arc::new(
        Cache::create(ssd, disk, &options).map_err(|e| format!("cannot create the cache: {e}"))?,
    );
    let align = cache.io_alignment();
    if !bs.is_multiple_of(align) || !args.offset.is_multiple_of(align) {
        return Err(format!(
            "--bs {bs} and --offset {} must be multiples of the cache's I/O alignment ({align} bytes)",
            args.offset
        ));
    }
    for (name, value) in &tunables {
        cache.set_tunable(name, *value).map_err(|e| format!("--tunable {name}={value}: {e}"))?;
    }
    let geometry = cache.geometry();
    let cache_blocks = geometry.cache_blocks();
    let (index_bytes, index_bytes_per_block) = cache.index_bytes();

    let warm_s = if args.warm {
        let op = match (args.warm_op, args.rw) {
            (WarmOp::Read, _) | (WarmOp::Auto, Rw::Randread) => Rw::Randread,
            (WarmOp::Write, _) | (WarmOp::Auto, Rw::Randwrite) => Rw::Randwrite,
        };
        Some(warm(&cache, op, args.offset / 512, blocks * bs, args.warm_threads)?)
    } else {
        None
    };
    let cached_blocks_before = cache.cached_blocks();
    let dirty_blocks_before = cache.dirty_blocks();
    if let Some(dir) = &args.cgroup {
        join_cgroup(dir)?;
    }
    if args.settle > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(args.settle));
    }

    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x1234_5678)
    });
    let shared = Arc::new(Shared {
        cache: cache.clone(),
        rw: args.rw,
        flags: if args.no_fill { IoFlags::NO_CACHE } else { IoFlags::empty() },
        start_sector: args.offset / 512,
        blocks,
        sectors: bs / 512,
        phase: AtomicU8::new(if args.ramp > 0.0 { PHASE_RAMP } else { PHASE_MEASURE }),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        slots_running: AtomicUsize::new(0),
        slot_results: Mutex::new(Vec::with_capacity(args.iodepth)),
        async_hist: Mutex::new(new_histogram()?),
    });
    let mut rng = SplitMix64::new(seed);
    let mut cpu0 = process_cpu();
    let mut sys0 = SystemCpu::read();
    let mut stats0 = cache.stats();
    let mut t0 = Instant::now();
    let load = match args.engine {
        Engine::Sync => start_threads(&shared, args.iodepth, bs as usize, &mut rng)?,
        Engine::Async => start_slots(&shared, args.iodepth, bs as usize, args.mem, &mut rng)?,
    };
    let mut ok = shared.errors.load(Ordering::Relaxed) == 0;
    if ok && args.ramp > 0.0 {
        ok = sleep_watching(&shared, args.ramp);
        cpu0 = process_cpu();
        sys0 = SystemCpu::read();
        stats0 = cache.stats();
        t0 = Instant::now();
        shared.phase.store(PHASE_MEASURE, Ordering::Release);
    }
    if ok {
        sleep_watching(&shared, args.runtime);
    }
    shared.phase.store(PHASE_STOP, Ordering::Release);
    let t1 = Instant::now();
    let cpu1 = process_cpu();
    let sys1 = SystemCpu::read();
    let stats1 = cache.stats();
    let (hist, ios) = finish_load(load, &shared)?;
    let dirty_blocks_after = cache.dirty_blocks();
    let shutdown_started = Instant::now();
    let first_error = shared.first_error.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(shared);
    let _ = cache.set_tunable("fast_remove", 1);
    let shutdown = match Arc::try_unwrap(cache) {
        Ok(cache) => cache.shutdown().map_err(|e| format!("shutting the cache down failed: {e}")),
        Err(_) => Err("the cache is still shared at shutdown".to_string()),
    };
    let shutdown_s = shutdown_started.elapsed().as_secs_f64();
    if let Some(e) = first_error {
        return Err(e);
    }
    shutdown?;

    let hz = clock_ticks();
    let args_summary = serde_json::json!({
        "ssd": args.ssd.display().to_string(),
        "disk": args.disk.display().to_string(),
        "mode": args.mode.name(),
        "rw": args.rw.name(),
        "bs": bs,
        "engine": args.engine.name(),
        "mem": args.mem.name(),
        "policy": args.policy.name(),
        "iodepth": args.iodepth,
        "runtime": args.runtime,
        "ramp": args.ramp,
        "settle": args.settle,
        "working_set": blocks * bs,
        "offset": args.offset,
        "cache_size": args.cache_size,
        "warm": args.warm,
        "no_fill": args.no_fill,
        "commit": args.commit.name(),
        "block_size": args.block_size,
        "assoc": args.assoc,
        "tunables": args.tunables,
        "cgroup": args.cgroup.as_ref().map(|p| p.display().to_string()),
        "seed": seed,
    });
    Ok(Report {
        args_summary,
        warm_s,
        runtime_s: (t1 - t0).as_secs_f64(),
        ios,
        hist,
        cpu_user_s: cpu1.0 - cpu0.0,
        cpu_sys_s: cpu1.1 - cpu0.1,
        system_busy_s: sys1.busy.saturating_sub(sys0.busy) as f64 / hz,
        system_idle_s: sys1.idle.saturating_sub(sys0.idle) as f64 / hz,
        steal_s: sys1.steal.saturating_sub(sys0.steal) as f64 / hz,
        delta: stats_delta(&stats0, &stats1),
        index_bytes,
        index_bytes_per_block,
        cache_blocks,
        working_set_blocks: blocks,
        cached_blocks_before,
        dirty_blocks_before,
        dirty_blocks_after,
        shutdown_s,
        ssd_dio: loop_dio(&args.ssd),
        disk_dio: loop_dio(&args.disk),
        rw: args.rw,
        engine: args.engine,
    })
}

/// Parses the command line, runs the benchmark and prints its report or a
/// one-line error.
fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("bad arguments");
            let line = line.strip_prefix("error: ").unwrap_or(line);
            eprintln!("cache-bench: error: {line} (see --help)");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(report) => {
            let out = if args.json { format!("{}\n", report.json()) } else { report.human() };
            match std::io::stdout().lock().write_all(out.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    eprintln!("cache-bench: error: writing the report: {e}");
                    ExitCode::FAILURE
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("cache-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_fio() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn tunables_parse() {
        assert_eq!(parse_tunable("dirty_thresh_pct=90"), Ok(("dirty_thresh_pct".into(), 90)));
        assert!(parse_tunable("dirty_thresh_pct").is_err());
        assert!(parse_tunable("a=-1").is_err());
    }

    #[test]
    fn aligned_buffers_are_aligned_and_filled() {
        let b = filled_buf(8192, 0x5b);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert_eq!(b.len(), 8192);
        assert!(b.iter().all(|&x| x == 0x5b));
    }

    /// The arguments every run needs, then `extra`.
    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let base = ["cache-bench", "--ssd", "/dev/null", "--disk", "/dev/null"];
        Args::try_parse_from(base.iter().chain(extra))
    }

    #[test]
    fn engine_defaults_to_sync_and_parses() {
        let args = parse(&[]).map_err(|e| e.to_string());
        assert_eq!(args.map(|a| (a.engine, a.iodepth)), Ok((Engine::Sync, 32)));
        let args = parse(&["--engine", "async", "--iodepth", "8"]).map_err(|e| e.to_string());
        assert_eq!(args.map(|a| (a.engine, a.iodepth)), Ok((Engine::Async, 8)));
        let args = parse(&["--engine=sync"]).map_err(|e| e.to_string());
        assert_eq!(args.map(|a| a.engine), Ok(Engine::Sync));
        assert!(parse(&["--engine", "uring"]).is_err());
        assert_eq!(Engine::Sync.name(), "sync");
        assert_eq!(Engine::Async.name(), "async");
    }
}
