//! cache-bench: an fio-like load generator for [`flashcache_core::cache::Cache`].
//!
//! It creates a cache (with force: whatever was on the SSD is overwritten) on
//! `--ssd` for `--disk`, optionally warms it, then drives it for `--runtime`
//! seconds with 4 KiB (`--bs`) random reads or writes at block-aligned offsets
//! of the working set (`--offset`..`--offset + --working-set` of the disk).
//!
//! The cache's I/O calls are synchronous, so `--iodepth N` means N threads,
//! each with one call in flight (fio's `--ioengine=psync --numjobs=N
//! --thread`): the honest model of the current API. The cache is shared
//! between them with an [`Arc`].
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
//! percentiles (one HDR histogram per thread, merged), the process's CPU time
//! (`getrusage`), the busy time of all CPUs (`/proc/stat`, which also counts
//! loop kworkers), and the RAM the block index takes per cache block
//! ([`Cache::index_bytes`]). At the end the cache is shut down with
//! `fast_remove` set, so a write run does not spend minutes cleaning.
//!
//! ```text
//! cargo run --release -p benches --bin cache-bench -- --ssd /dev/loop0 --disk /dev/loop1 \
//!     --mode back --rw randread --bs 4k --iodepth 32 --runtime 8 --working-set 1g --warm --json
//! ```

#[path = "../shared/args.rs"]
mod args;
#[path = "../shared/cpu.rs"]
mod cpu;
use args::parse_size;
use cpu::{SystemCpu, clock_ticks, loop_dio, process_cpu};
use flashcache_core::sim::SplitMix64;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use flashcache_core::cache::{Cache, IoFlags};
use flashcache_core::dmio::BlockDevice;
use flashcache_core::format::{CacheMode, CommitMode};
use flashcache_core::policy::{CacheStats, PolicyKind};
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

/// The replacement policy (`--policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Policy {
    /// FIFO.
    Fifo,
    /// LRU.
    Lru,
    /// flashcache's segmented LRU.
    Slru,
    /// SIEVE.
    Sieve,
}

impl Policy {
    fn kind(self) -> PolicyKind {
        match self {
            Policy::Fifo => PolicyKind::Fifo,
            Policy::Lru => PolicyKind::Lru,
            Policy::Slru => PolicyKind::FLASHCACHE_LRU,
            Policy::Sieve => PolicyKind::Sieve,
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
    /// Threads, each with one synchronous request in flight.
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

/// A buffer of `len` bytes aligned to 4 KiB (the cache copies through its own
/// aligned buffers; this only keeps the caller's side realistic).
struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Aligned {
        let storage = vec![fill; len + 4096];
        let start = storage.as_ptr().align_offset(4096).min(4096);
        Aligned { storage, start, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// What the measured phase shares between threads.
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

/// What one worker thread measured.
struct WorkerResult {
    hist: Histogram<u64>,
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
    let mut buf = Aligned::new(bs, (seed as u8) ^ 0x5a);
    let mut ios = 0u64;
    loop {
        let phase = shared.phase.load(Ordering::Acquire);
        if phase == PHASE_STOP || shared.errors.load(Ordering::Relaxed) != 0 {
            break;
        }
        let sector = shared.start_sector + rng.below(shared.blocks) * shared.sectors;
        let started = Instant::now();
        let result = match shared.rw {
            Rw::Randread => shared.cache.read_with(sector, buf.as_mut_slice(), shared.flags),
            Rw::Randwrite => shared.cache.write_with(sector, buf.as_slice(), shared.flags),
        };
        let now = Instant::now();
        if let Err(e) = result {
            shared.fail(format!("{} at sector {sector} failed: {e}", shared.rw.name()));
            break;
        }
        if phase == PHASE_MEASURE {
            let ns = now.saturating_duration_since(started).as_nanos();
            hist.saturating_record(u64::try_from(ns).unwrap_or(u64::MAX).max(1));
            ios += 1;
        }
    }
    WorkerResult { hist, ios }
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
            let mut buf = Aligned::new(CHUNK as usize, 0xc3 ^ t as u8);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= chunks || failed.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                    return;
                }
                let len = (bytes - i * CHUNK).min(CHUNK) as usize;
                let sector = start_sector + i * CHUNK / 512;
                let result = match op {
                    Rw::Randread => cache.read(sector, &mut buf.as_mut_slice()[..len]),
                    Rw::Randwrite => cache.write(sector, &buf.as_slice()[..len]),
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
        return Err(format!("--iodepth must be 1 to 4096 (threads), not {}", args.iodepth));
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
    });
    let mut rng = SplitMix64::new(seed);
    let mut cpu0 = process_cpu();
    let mut sys0 = SystemCpu::read();
    let mut stats0 = cache.stats();
    let mut t0 = Instant::now();
    let mut handles = Vec::with_capacity(args.iodepth);
    for i in 0..args.iodepth {
        let worker_shared = shared.clone();
        let hist = new_histogram()?;
        let thread_seed = rng.next_u64();
        let handle = std::thread::Builder::new()
            .name(format!("cache-bench-{i}"))
            .spawn(move || worker(worker_shared, thread_seed, bs as usize, hist))
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
    let mut hist = new_histogram()?;
    let mut ios = 0u64;
    for h in handles {
        match h.join() {
            Ok(r) => {
                hist.add(&r.hist).map_err(|e| format!("merging latency histograms: {e}"))?;
                ios += r.ios;
            }
            Err(_) => shared.fail("a worker thread panicked".into()),
        }
    }
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
        "iodepth": args.iodepth,
        "runtime": args.runtime,
        "ramp": args.ramp,
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
    fn aligned_buffers_are_aligned() {
        let mut b = Aligned::new(4096, 1);
        assert_eq!(b.as_mut_slice().as_ptr() as usize % 4096, 0);
        assert_eq!(b.as_slice().len(), 4096);
    }
}
