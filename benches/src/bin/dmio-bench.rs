//! dmio-bench: an fio-like load generator that drives only the public
//! [`dmio::DmIoClient`] API.
//!
//! It keeps `--iodepth` requests in flight on one device: every request is
//! resubmitted from its own notify callback (a [`Notify::shared`] handler with
//! the slot number as context), reusing the memory the completion hands back, so
//! the steady state allocates nothing. Memory is pool pages
//! ([`DmIoClient::page_pool`], registered with the ring, so io_uring uses its
//! fixed-buffer opcodes) or one [`AlignedBuf`] per slot (`--mem buf`). Random
//! offsets come from a splitmix64 generator, aligned to the block size, over
//! `--offset`..`--offset + --size` (the whole device by default), like fio's
//! `--norandommap --randrepeat=0`.
//!
//! Statistics of the first `--ramp` seconds are discarded; then, for `--runtime`
//! seconds, every completion's submit-to-callback latency goes into an HDR
//! histogram. The report gives IOPS, bandwidth, latency percentiles, the
//! process's CPU time (`getrusage`, which includes the client's completion
//! thread) and the busy time of all CPUs from `/proc/stat` (which also counts
//! the loop device's kworkers and interrupts, charged to no process). At the end
//! resubmission stops and in-flight requests are waited for.
//!
//! ```text
//! cargo run --release -p benches --bin dmio-bench -- \
//!     --device /dev/loop0 --rw randread --bs 4k --iodepth 32 --runtime 5 [--json]
//! ```
//!
//! `--json` prints one JSON object (`iops`, `bw_bytes`, `lat_p50_ns`,
//! `lat_p99_ns`, `lat_p999_ns`, `cpu_user_s`, `cpu_sys_s`, `system_busy_s`, ...);
//! `benches/run-fio-compare.sh` runs it side by side with fio.

#[path = "../shared/args.rs"]
mod args;
#[path = "../shared/cpu.rs"]
mod cpu;
use args::parse_size;
use cpu::{SystemCpu, clock_ticks, loop_dio, process_cpu};
use flashcache_core::sim::SplitMix64;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use dmio::{
    AlignedBuf, BlockDevice, ClientStats, DeviceOptions, DmIoClient, DmIoCompletion, DmIoConfig,
    DmIoMemory, DmIoOp, DmIoRegion, DmIoRequest, EngineChoice, Notify, NotifyHandler, PAGE_SIZE,
    SECTOR_SIZE,
};
use hdrhistogram::Histogram;

/// The access pattern (fio's `--rw`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Rw {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
}

impl Rw {
    /// The dm-io operation.
    fn op(self) -> DmIoOp {
        match self {
            Rw::Randread | Rw::Read => DmIoOp::Read,
            Rw::Randwrite | Rw::Write => DmIoOp::Write,
        }
    }

    /// Whether offsets are random.
    fn random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite)
    }

    /// fio's name for the pattern.
    fn name(self) -> &'static str {
        match self {
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Read => "read",
            Rw::Write => "write",
        }
    }
}

/// The engine to ask the client for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Engine {
    /// io_uring, or the sync engine when io_uring cannot be set up.
    Auto,
    /// io_uring or an error.
    Uring,
    /// The synchronous engine (worker threads).
    Sync,
}

/// Where each slot's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mem {
    /// A page list from the client's page pool (registered with the ring).
    Pool,
    /// One contiguous `AlignedBuf` per slot (not registered).
    Buf,
}

/// Which client API drives the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Api {
    /// Asynchronous submission; each request is resubmitted from its notify callback.
    Callback,
    /// The blocking `io_sync` call, from `--iodepth` threads (fio's psync engine
    /// with `--numjobs`).
    Blocking,
}

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "dmio-bench",
    about = "fio-like benchmark of the dmio client: IOPS, bandwidth, latency and CPU"
)]
struct Args {
    /// The block device (or O_DIRECT-capable file) to use. Writes destroy its data.
    #[arg(long)]
    device: PathBuf,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Block size of each request (suffixes k, m, g are powers of 1024).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests kept in flight.
    #[arg(long, default_value_t = 32)]
    iodepth: usize,
    /// Seconds of measurement (after the ramp).
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Seconds of load before measuring; their statistics are discarded (fio's
    /// --ramp_time).
    #[arg(long, default_value_t = 0.0)]
    ramp: f64,
    /// Bytes of the device to use, from --offset (default: to the end).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// First byte of the range to use.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    offset: u64,
    /// Engine (the DMIO_ENGINE environment variable overrides it).
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
    /// Print one JSON object instead of the human-readable report.
    #[arg(long)]
    json: bool,
    /// Request slots of the client (DmIoConfig::reserve); default --iodepth, and
    /// never fewer (a callback cannot wait for a slot).
    #[arg(long)]
    reserve: Option<usize>,
    /// io_uring entries (DmIoConfig::ring_entries, a power of two); default: the
    /// library's (256), or more when --iodepth needs it.
    #[arg(long)]
    ring_entries: Option<u32>,
    /// Sync-engine worker threads (DmIoConfig::sync_threads); default --iodepth.
    #[arg(long)]
    sync_threads: Option<usize>,
    /// Memory for each slot.
    #[arg(long, value_enum, default_value_t = Mem::Pool)]
    mem: Mem,
    /// Do not register the page pool with the ring (no fixed-buffer opcodes).
    #[arg(long)]
    no_fixed: bool,
    /// Seed of the random offsets (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// The client API that drives the load.
    #[arg(long, value_enum, default_value_t = Api::Callback)]
    api: Api,
}

/// Run phases, as seen by the callbacks.
const PHASE_RAMP: u8 = 0;
/// Completions are recorded.
const PHASE_MEASURE: u8 = 1;
/// Completions are not resubmitted.
const PHASE_STOP: u8 = 2;

/// State touched on every completion; only the completion thread uses it once
/// the initial requests are in, so its lock is uncontended.
struct Hot {
    /// Submission time of each slot's request in flight.
    start: Vec<Instant>,
    /// Submit-to-callback latencies (ns) of measured completions.
    hist: Histogram<u64>,
    /// Random offsets.
    rng: SplitMix64,
    /// Next block of a sequential run, in blocks from the start of the range.
    seq_next: u64,
    /// The shared handler: each request's [`Notify`] holds a clone. Taken out at
    /// the end to break the handler -> driver -> handler cycle.
    handler: Option<Arc<dyn NotifyHandler>>,
    /// The first error seen (I/O failure or a refused submission).
    first_error: Option<String>,
}

/// The benchmark's shared state and notify handler.
struct Driver {
    /// The client under test.
    client: Arc<DmIoClient>,
    /// The device under test.
    device: Arc<BlockDevice>,
    /// Read or write.
    op: DmIoOp,
    /// Random (or sequential) offsets.
    random: bool,
    /// Start of the range in sectors.
    range_start: u64,
    /// Blocks in the range.
    range_blocks: u64,
    /// Sectors per request.
    sectors: u64,
    /// `PHASE_RAMP`, `PHASE_MEASURE` or `PHASE_STOP`.
    phase: AtomicU8,
    /// Slots whose request is in flight.
    in_flight: AtomicUsize,
    /// Failed requests and refused submissions.
    errors: AtomicU64,
    /// Per-completion state.
    hot: Mutex<Hot>,
}

impl Driver {
    /// Locks the hot state (a panicked holder does not make it unusable).
    fn hot(&self) -> MutexGuard<'_, Hot> {
        self.hot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Picks the next request's first sector.
    fn next_sector(&self, hot: &mut Hot) -> u64 {
        let block = if self.random {
            hot.rng.below(self.range_blocks)
        } else {
            let b = hot.seq_next;
            hot.seq_next = if b + 1 >= self.range_blocks { 0 } else { b + 1 };
            b
        };
        self.range_start + block * self.sectors
    }

    /// Records an error and stops the slot.
    fn fail(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut hot = self.hot();
        if hot.first_error.is_none() {
            hot.first_error = Some(message);
        }
    }

    /// Submits slot `slot`'s next request with `memory`, stamped at `now`;
    /// when `record` is set, first records the latency of the slot's previous
    /// request (completed at `now`), under the same lock of the hot state.
    /// Returns false (after recording why) when the slot stopped.
    fn submit(&self, slot: usize, memory: DmIoMemory, now: Instant, record: bool) -> bool {
        let (sector, notify) = {
            let mut hot = self.hot();
            if record {
                record_latency(&mut hot, slot, now);
            }
            let sector = self.next_sector(&mut hot);
            hot.start[slot] = now;
            match &hot.handler {
                Some(handler) => (sector, Notify::shared(handler, slot)),
                None => return false,
            }
        };
        let req = DmIoRequest::new(self.op).with_memory(memory).with_notify(notify);
        let region = DmIoRegion::new(&self.device, sector, self.sectors);
        match self.client.submit(req, &[region]) {
            Ok(()) => true,
            Err(e) => {
                self.fail(format!("submitting a request failed: {e}"));
                false
            }
        }
    }
}

/// Records the latency of slot `slot`'s request, completed at `now`.
fn record_latency(hot: &mut Hot, slot: usize, now: Instant) {
    let ns = now.saturating_duration_since(hot.start[slot]).as_nanos();
    hot.hist.saturating_record(u64::try_from(ns).unwrap_or(u64::MAX).max(1));
}

impl NotifyHandler for Driver {
    fn notify(&self, done: DmIoCompletion, slot: usize) {
        let now = Instant::now();
        let phase = self.phase.load(Ordering::Acquire);
        if !done.error_bits.is_empty() {
            let what = done
                .failures
                .first()
                .map(|f| format!("{} at sector {} failed: {}", f.op, f.sector, f.errno))
                .unwrap_or_else(|| "a request failed".into());
            self.fail(what);
            self.in_flight.fetch_sub(1, Ordering::Release);
            return;
        }
        let Some(memory) = done.memory else {
            self.fail("a completion came back without its memory".into());
            self.in_flight.fetch_sub(1, Ordering::Release);
            return;
        };
        if phase == PHASE_STOP || self.errors.load(Ordering::Relaxed) != 0 {
            if phase == PHASE_MEASURE {
                record_latency(&mut self.hot(), slot, now);
            }
            drop(memory);
            self.in_flight.fetch_sub(1, Ordering::Release);
            return;
        }
        if !self.submit(slot, memory, now, phase == PHASE_MEASURE) {
            self.in_flight.fetch_sub(1, Ordering::Release);
        }
    }
}

/// What one run measured.
#[derive(Debug)]
struct Report {
    /// The device path as given.
    device: PathBuf,
    /// The access pattern.
    rw: Rw,
    /// Bytes per request.
    bs: u64,
    /// Requests in flight.
    iodepth: usize,
    /// The engine the client used.
    engine: String,
    /// Where the memory came from.
    mem: Mem,
    /// First byte of the range.
    offset: u64,
    /// Bytes in the range (whole blocks).
    size: u64,
    /// Seconds of ramp.
    ramp_s: f64,
    /// Seconds measured.
    runtime_s: f64,
    /// Requests completed while measuring.
    ios: u64,
    /// Their latencies (ns).
    hist: Histogram<u64>,
    /// Process user CPU seconds while measuring.
    cpu_user_s: f64,
    /// Process system CPU seconds while measuring.
    cpu_sys_s: f64,
    /// Busy seconds of all CPUs while measuring.
    system_busy_s: f64,
    /// Idle seconds of all CPUs while measuring.
    system_idle_s: f64,
    /// Stolen seconds of all CPUs while measuring.
    steal_s: f64,
    /// The client's counters while measuring.
    stats: ClientStats,
    /// Whether the loop device has direct I/O on (None: not a loop device).
    loop_dio: Option<bool>,
}

impl Report {
    /// Completions per second.
    fn iops(&self) -> f64 {
        self.ios as f64 / self.runtime_s
    }

    /// Bytes per second.
    fn bw_bytes(&self) -> f64 {
        self.iops() * self.bs as f64
    }

    /// `seconds` of CPU per I/O, in microseconds.
    fn per_io_us(&self, seconds: f64) -> f64 {
        if self.ios == 0 { 0.0 } else { seconds * 1e6 / self.ios as f64 }
    }

    /// `n` per operation issued.
    fn ratio(&self, n: u64) -> f64 {
        if self.stats.ops == 0 { 0.0 } else { n as f64 / self.stats.ops as f64 }
    }

    /// The report as one JSON object.
    fn json(&self) -> serde_json::Value {
        let h = &self.hist;
        serde_json::json!({
            "tool": "dmio-bench",
            "device": self.device.display().to_string(),
            "rw": self.rw.name(),
            "bs": self.bs,
            "iodepth": self.iodepth,
            "engine": self.engine,
            "mem": match self.mem { Mem::Pool => "pool", Mem::Buf => "buf" },
            "offset": self.offset,
            "size": self.size,
            "ramp_s": self.ramp_s,
            "runtime_s": self.runtime_s,
            "ios": self.ios,
            "iops": self.iops(),
            "bw_bytes": self.bw_bytes(),
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
            "ops": self.stats.ops,
            "submit_calls": self.stats.submit_calls,
            "submit_calls_per_op": self.ratio(self.stats.submit_calls),
            "fixed_buffer_ops": self.stats.fixed_buffer_ops,
            "fixed_buffer_share": self.ratio(self.stats.fixed_buffer_ops),
            "retries": self.stats.retries,
            "short_transfers": self.stats.short_transfers,
            "loop_dio": self.loop_dio,
        })
    }

    /// The report for a person.
    fn human(&self) -> String {
        let mut out = String::new();
        let h = &self.hist;
        let _ = writeln!(
            out,
            "dmio-bench: {} bs={} iodepth={} engine={} mem={} device={} range={}+{} ramp={}s runtime={:.2}s",
            self.rw.name(),
            self.bs,
            self.iodepth,
            self.engine,
            match self.mem {
                Mem::Pool => "pool",
                Mem::Buf => "buf",
            },
            self.device.display(),
            self.offset,
            self.size,
            self.ramp_s,
            self.runtime_s
        );
        let _ = writeln!(
            out,
            "  IOPS {:.0}  bandwidth {:.1} MB/s ({:.1} MiB/s)  ios {}",
            self.iops(),
            self.bw_bytes() / 1e6,
            self.bw_bytes() / (1u64 << 20) as f64,
            self.ios
        );
        out.push_str(&cpu::latency_line(h));
        out.push_str(&cpu::cpu_line(
            (self.cpu_user_s, self.cpu_sys_s),
            (self.system_busy_s, self.system_idle_s, self.steal_s),
            |s| self.per_io_us(s),
        ));
        let _ = writeln!(
            out,
            "  client: {} ops, {:.3} engine calls/op, {:.0}% fixed-buffer ops, {} retries, {} short transfers{}",
            self.stats.ops,
            self.ratio(self.stats.submit_calls),
            100.0 * self.ratio(self.stats.fixed_buffer_ops),
            self.stats.retries,
            self.stats.short_transfers,
            match self.loop_dio {
                Some(true) => ", loop direct I/O on",
                Some(false) => ", WARNING: loop direct I/O is OFF (page cache in the path)",
                None => "",
            }
        );
        out
    }
}

/// One thread of the blocking mode: `io_sync` in a loop until the run stops,
/// recording each call's latency while measuring.
fn blocking_worker(driver: Arc<Driver>, mut memory: DmIoMemory) {
    loop {
        let phase = driver.phase.load(Ordering::Acquire);
        if phase == PHASE_STOP || driver.errors.load(Ordering::Relaxed) != 0 {
            break;
        }
        let sector = driver.next_sector(&mut driver.hot());
        let started = Instant::now();
        let req = DmIoRequest::new(driver.op).with_memory(memory);
        let region = DmIoRegion::new(&driver.device, sector, driver.sectors);
        let done = match driver.client.io_sync(req, &[region]) {
            Ok(done) => done,
            Err(e) => {
                driver.fail(format!("a blocking call failed: {e}"));
                break;
            }
        };
        let now = Instant::now();
        if !done.error_bits.is_empty() {
            driver.fail(format!("a request failed: {:?}", done.failures.first()));
            break;
        }
        let Some(back) = done.memory else {
            driver.fail("a completion came back without its memory".into());
            break;
        };
        memory = back;
        if phase == PHASE_MEASURE {
            let ns = now.saturating_duration_since(started).as_nanos();
            driver.hot().hist.saturating_record(u64::try_from(ns).unwrap_or(u64::MAX).max(1));
        }
    }
    driver.in_flight.fetch_sub(1, Ordering::AcqRel);
}

/// Sleeps `secs` seconds, returning early when an error was recorded or no
/// request is left in flight. Returns false in that case.
fn sleep_watching(driver: &Driver, secs: f64) -> bool {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        if driver.errors.load(Ordering::Relaxed) != 0
            || driver.in_flight.load(Ordering::Acquire) == 0
        {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Runs the benchmark.
fn run(args: &Args) -> Result<Report, String> {
    if args.iodepth == 0 || args.iodepth > 65536 {
        return Err(format!("--iodepth must be 1 to 65536, not {}", args.iodepth));
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
    if bs == 0 || !bs.is_multiple_of(SECTOR_SIZE) {
        return Err(format!("--bs must be a positive multiple of 512, not {bs}"));
    }
    let reserve = args.reserve.unwrap_or(args.iodepth);
    if reserve < args.iodepth {
        return Err(format!(
            "--reserve ({reserve}) must be at least --iodepth ({}): requests are resubmitted from \
             their callbacks, which cannot wait for a slot",
            args.iodepth
        ));
    }

    let op = args.rw.op();
    let options = DeviceOptions::new().read_only(op == DmIoOp::Read);
    let device = BlockDevice::open_with(&args.device, options).map_err(|e| e.to_string())?;
    let lbs = u64::from(device.logical_block_size());
    if !bs.is_multiple_of(lbs) {
        return Err(format!(
            "--bs {bs} is not a multiple of the logical block size of {} ({lbs} bytes)",
            args.device.display()
        ));
    }
    let dev_size = device.size_bytes();
    if args.offset >= dev_size || !args.offset.is_multiple_of(lbs) {
        return Err(format!(
            "--offset {} must be a multiple of {lbs} below the device size ({dev_size} bytes)",
            args.offset
        ));
    }
    let size = args.size.unwrap_or(dev_size - args.offset);
    if size > dev_size - args.offset {
        return Err(format!(
            "--offset {} + --size {size} is beyond the end of {} ({dev_size} bytes)",
            args.offset,
            args.device.display()
        ));
    }
    let range_blocks = size / bs;
    if range_blocks == 0 {
        return Err(format!("the range ({size} bytes) is smaller than one block of {bs} bytes"));
    }

    let pages_per_io = (bs as usize).div_ceil(PAGE_SIZE);
    let defaults = DmIoConfig::default();
    let ops_per_io = bs.div_ceil(defaults.max_op_bytes) as usize;
    let needed_ring = (args.iodepth * ops_per_io + 2).next_power_of_two();
    let ring_entries = match args.ring_entries {
        Some(n) => n,
        None => defaults.ring_entries.max(u32::try_from(needed_ring.min(32768)).unwrap_or(32768)),
    };
    let config = DmIoConfig {
        reserve,
        engine: match args.engine {
            Engine::Auto => EngineChoice::Auto,
            Engine::Uring => EngineChoice::Uring,
            Engine::Sync => EngineChoice::Sync,
        },
        ring_entries,
        pool_pages: match args.mem {
            Mem::Pool => (args.iodepth * pages_per_io).max(1),
            Mem::Buf => 1,
        },
        register_pool: !args.no_fixed,
        sync_threads: args.sync_threads.unwrap_or(args.iodepth.min(1024)),
        ..defaults
    };
    let client = Arc::new(
        DmIoClient::with_config(config).map_err(|e| format!("cannot create the client: {e}"))?,
    );

    // One memory per slot, allocated up front and reused for every request.
    let fill = |bytes: &mut [u8], slot: usize| {
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8) ^ (slot as u8) ^ 0xa5;
        }
    };
    let mut memories = Vec::with_capacity(args.iodepth);
    for slot in 0..args.iodepth {
        let memory = match args.mem {
            Mem::Pool => {
                let mut list = client.page_pool().alloc_list(pages_per_io);
                for page in list.pages.iter_mut() {
                    fill(page, slot);
                }
                DmIoMemory::from(list)
            }
            Mem::Buf => {
                let mut buf = AlignedBuf::with_alignment(bs as usize, PAGE_SIZE);
                fill(&mut buf, slot);
                DmIoMemory::from(buf)
            }
        };
        memories.push(memory);
    }

    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x1234_5678)
    });
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| format!("cannot create the latency histogram: {e}"))?;
    hist.auto(false);
    let now = Instant::now();
    let driver = Arc::new(Driver {
        client: client.clone(),
        device,
        op,
        random: args.rw.random(),
        range_start: args.offset / SECTOR_SIZE,
        range_blocks,
        sectors: bs / SECTOR_SIZE,
        phase: AtomicU8::new(if args.ramp > 0.0 { PHASE_RAMP } else { PHASE_MEASURE }),
        in_flight: AtomicUsize::new(0),
        errors: AtomicU64::new(0),
        hot: Mutex::new(Hot {
            start: vec![now; args.iodepth],
            hist,
            rng: SplitMix64::new(seed),
            seq_next: 0,
            handler: None,
            first_error: None,
        }),
    });
    let handler: Arc<dyn NotifyHandler> = driver.clone();
    driver.hot().handler = Some(handler);

    // Measurement starts right after the ramp, or right after the initial
    // submissions when there is none.
    let mut cpu0 = process_cpu();
    let mut sys0 = SystemCpu::read();
    let mut stats0 = client.stats();
    let mut t0 = Instant::now();
    let mut workers = Vec::new();
    for (slot, memory) in memories.into_iter().enumerate() {
        driver.in_flight.fetch_add(1, Ordering::AcqRel);
        match args.api {
            Api::Callback => {
                if !driver.submit(slot, memory, Instant::now(), false) {
                    driver.in_flight.fetch_sub(1, Ordering::AcqRel);
                    break;
                }
            }
            Api::Blocking => {
                let driver = driver.clone();
                workers.push(std::thread::spawn(move || blocking_worker(driver, memory)));
            }
        }
    }
    let mut ok = true;
    if args.ramp > 0.0 {
        ok = sleep_watching(&driver, args.ramp);
        cpu0 = process_cpu();
        sys0 = SystemCpu::read();
        stats0 = client.stats();
        t0 = Instant::now();
        driver.phase.store(PHASE_MEASURE, Ordering::Release);
    }
    if ok {
        sleep_watching(&driver, args.runtime);
    }
    driver.phase.store(PHASE_STOP, Ordering::Release);
    let t1 = Instant::now();
    let cpu1 = process_cpu();
    let sys1 = SystemCpu::read();

    // Drain: no callback resubmits any more.
    let deadline = Instant::now() + Duration::from_secs(60);
    while driver.in_flight.load(Ordering::Acquire) != 0 {
        if Instant::now() > deadline {
            return Err(format!(
                "{} requests were still in flight 60 s after the run ended",
                driver.in_flight.load(Ordering::Acquire)
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for worker in workers {
        let _ = worker.join();
    }
    let stats1 = client.stats();
    // Waits for the completion thread, so every Notify (and its handler clone)
    // is gone before the cycle is broken.
    client.close();
    let (hist, first_error) = {
        let mut hot = driver.hot();
        hot.handler = None;
        (hot.hist.clone(), hot.first_error.take())
    };
    if let Some(e) = first_error {
        let n = driver.errors.load(Ordering::Relaxed);
        return Err(format!("{e} ({n} error(s); run stopped)"));
    }

    let hz = clock_ticks();
    let engine = client.engine().to_string();
    Ok(Report {
        device: args.device.clone(),
        rw: args.rw,
        bs,
        iodepth: args.iodepth,
        engine,
        mem: args.mem,
        offset: args.offset,
        size: range_blocks * bs,
        ramp_s: args.ramp,
        runtime_s: (t1 - t0).as_secs_f64(),
        ios: hist.len(),
        hist,
        cpu_user_s: cpu1.0 - cpu0.0,
        cpu_sys_s: cpu1.1 - cpu0.1,
        system_busy_s: sys1.busy.saturating_sub(sys0.busy) as f64 / hz,
        system_idle_s: sys1.idle.saturating_sub(sys0.idle) as f64 / hz,
        steal_s: sys1.steal.saturating_sub(sys0.steal) as f64 / hz,
        stats: stats1.since(&stats0),
        loop_dio: loop_dio(&args.device),
    })
}

/// Runs the benchmark and prints its report or a one-line error.
fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            let out = if args.json { format!("{}\n", report.json()) } else { report.human() };
            match std::io::stdout().lock().write_all(out.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    eprintln!("dmio-bench: error: writing the report: {e}");
                    ExitCode::FAILURE
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("dmio-bench: error: {e}");
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
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("four").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn below_stays_in_range() {
        let mut rng = SplitMix64::new(7);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let v = rng.below(10);
            assert!(v < 10);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
