//! `flashcache run`: workloads driven through the cache by many threads, with
//! an optional check of every read against what the run wrote.

use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flashcache_core::cache::Cache;
use std::sync::Arc;

use flashcache_core::dmio::{
    AlignedBuf, BlockDevice, DmIoClient, DmIoRegion, DmIoRequest, SECTOR_SIZE,
};
use flashcache_core::sim::{SplitMix64, TraceFormat, TraceOp, TraceRecord, Zipf, read_trace};
use serde_json::json;

use crate::errors::{Failure, error_line};
use crate::{close_keeping_dirty, load, parse_size};

pub(crate) const RUN_HELP: &str = "\
Examples:
  flashcache run /dev/loop0 /dev/sdb --workload zipf --iodepth 16 --runtime 10 --verify
  flashcache run ssd.img disk.img --workload uniform --read-pct 50 --bs 16k --runtime 5
  flashcache run ssd.img disk.img --workload trace:hm_0.csv --iodepth 4

Workloads: zipf (Zipf(--alpha) over the working set, hot blocks scattered),
uniform, seq (each thread streams through its share), trace:FILE (a
`R|W sector count` or MSR Cambridge trace, replayed in order, split over the
threads). Each of --iodepth threads does one synchronous I/O of --bs bytes at a
time, on its own share of the working set. With --verify every read of a unit
written during the run is compared with what was written (not for traces).
Writes destroy the disk's data in the working set.";

/// Arguments of `run`.
#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// The cache device.
    ssd: PathBuf,
    /// The cached disk.
    disk: PathBuf,
    /// zipf, uniform, seq or trace:FILE.
    #[arg(long, default_value = "zipf")]
    workload: String,
    /// Percent of I/Os that are reads.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u32).range(0..=100))]
    read_pct: u32,
    /// Bytes per I/O.
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Threads, each with one I/O in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    iodepth: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,
    /// Check every read against what the run wrote.
    #[arg(long)]
    verify: bool,
    /// The part of the disk to use, from its start [default: all of it].
    #[arg(long, value_parser = parse_size)]
    working_set: Option<u64>,
    /// The Zipf exponent.
    #[arg(long, default_value_t = 0.9)]
    alpha: f64,
    /// One JSON object at the end instead of text.
    #[arg(long)]
    json: bool,
}

/// What to drive.
#[derive(Clone, Debug)]
pub(crate) enum Pattern {
    Zipf(f64),
    Uniform,
    Sequential,
    Trace(Vec<TraceRecord>),
}

/// A workload.
#[derive(Clone, Debug)]
pub(crate) struct Spec {
    pub(crate) pattern: Pattern,
    pub(crate) read_pct: u32,
    pub(crate) bs: u64,
    pub(crate) threads: u32,
    pub(crate) runtime: Duration,
    pub(crate) verify: bool,
    pub(crate) seed: u64,
}

/// The version of every unit (`bs` bytes) written so far: 0 = not written by
/// this program. A unit's content is a function of its number and version.
pub(crate) struct Versions {
    bs: u64,
    units: Vec<AtomicU32>,
}

impl Versions {
    pub(crate) fn new(working_set: u64, bs: u64) -> Versions {
        let n = (working_set / bs) as usize;
        Versions { bs, units: (0..n).map(|_| AtomicU32::new(0)).collect() }
    }

    pub(crate) fn units(&self) -> u64 {
        self.units.len() as u64
    }
}

/// The content of `unit` at `version`.
fn fill(buf: &mut [u8], unit: u64, version: u32) {
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        let v = unit.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (u64::from(version) << 40) ^ i as u64;
        word.copy_from_slice(&v.to_le_bytes());
    }
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Summary {
    pub(crate) ops: u64,
    pub(crate) reads: u64,
    pub(crate) writes: u64,
    pub(crate) verified: u64,
    pub(crate) seconds: f64,
    pub(crate) hit_ratio: f64,
}

impl Summary {
    pub(crate) fn iops(&self) -> f64 {
        self.ops as f64 / self.seconds.max(1e-9)
    }
}

/// Runs `spec` on `cache` until its runtime is over or `stop` is set, printing
/// a progress line on a terminal when `progress`.
pub(crate) fn drive(
    cache: &Cache,
    versions: &Versions,
    spec: &Spec,
    stop: &AtomicBool,
    progress: bool,
) -> Result<Summary, Failure> {
    let before = cache.stats();
    let ops = AtomicU64::new(0);
    let reads = AtomicU64::new(0);
    let verified = AtomicU64::new(0);
    let failed: std::sync::Mutex<Option<Failure>> = std::sync::Mutex::new(None);
    let started = Instant::now();
    let deadline = started + spec.runtime;
    let tty = progress && std::io::stderr().is_terminal();
    std::thread::scope(|s| {
        for t in 0..spec.threads {
            let (ops, reads, verified, failed) = (&ops, &reads, &verified, &failed);
            s.spawn(move || {
                if let Err(e) =
                    worker(cache, versions, spec, t, stop, deadline, ops, reads, verified)
                {
                    stop.store(true, Ordering::Relaxed);
                    failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                }
            });
        }
        let mut last = (Instant::now(), 0u64);
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            if tty && last.0.elapsed() >= Duration::from_secs(1) {
                let now = ops.load(Ordering::Relaxed);
                let rate = (now - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), now);
                let st = cache.stats();
                let r = st.reads.saturating_sub(before.reads).max(1);
                let hits = st.read_hits.saturating_sub(before.read_hits);
                eprint!(
                    "\r  {:>4.0} s  {:>9.0} IOPS  read hits {:>5.1} %  dirty blocks {:>8}   ",
                    started.elapsed().as_secs_f64(),
                    rate,
                    100.0 * hits as f64 / r as f64,
                    cache.dirty_blocks()
                );
                let _ = std::io::stderr().flush();
            }
        }
    });
    if tty {
        eprint!("\r{:80}\r", "");
    }
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let after = cache.stats();
    let cache_reads = after.reads.saturating_sub(before.reads);
    let ops = ops.into_inner();
    let reads = reads.into_inner();
    Ok(Summary {
        ops,
        reads,
        writes: ops - reads,
        verified: verified.into_inner(),
        seconds: started.elapsed().as_secs_f64(),
        hit_ratio: after.read_hits.saturating_sub(before.read_hits) as f64
            / cache_reads.max(1) as f64,
    })
}

#[allow(clippy::too_many_arguments)]
fn worker(
    cache: &Cache,
    versions: &Versions,
    spec: &Spec,
    thread: u32,
    stop: &AtomicBool,
    deadline: Instant,
    ops: &AtomicU64,
    reads: &AtomicU64,
    verified: &AtomicU64,
) -> Result<(), Failure> {
    let threads = u64::from(spec.threads);
    let mine = (versions.units() / threads).max(1);
    let mut rng = SplitMix64::new(spec.seed ^ u64::from(thread).wrapping_mul(0x51_7cc1));
    let mut zipf = match spec.pattern {
        Pattern::Zipf(alpha) => Some(
            Zipf::new(mine, alpha, spec.seed.wrapping_add(u64::from(thread)))
                .map_err(|e| error_line(&e))?
                .shuffled(),
        ),
        _ => None,
    };
    let mut buf = vec![0u8; spec.bs as usize];
    let mut expect = vec![0u8; spec.bs as usize];
    let mut next_seq = 0u64;
    let mut trace_at = thread as usize;
    let sectors = spec.bs / SECTOR_SIZE;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        if let Pattern::Trace(records) = &spec.pattern {
            let Some(record) = records.get(trace_at) else { break };
            trace_at += spec.threads as usize;
            trace_io(cache, record, versions.units() * spec.bs, &mut buf)?;
            ops.fetch_add(1, Ordering::Relaxed);
            if record.op == TraceOp::Read {
                reads.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        let k = match (&mut zipf, &spec.pattern) {
            (Some(z), _) => z.next_id() % mine,
            (None, Pattern::Sequential) => {
                next_seq = (next_seq + 1) % mine;
                next_seq
            }
            _ => rng.below(mine),
        };
        let unit = (k * threads + u64::from(thread)).min(versions.units() - 1);
        let read = rng.below(100) < u64::from(spec.read_pct);
        let sector = unit * sectors;
        if read {
            cache.read(sector, &mut buf).map_err(|e| error_line(&e))?;
            reads.fetch_add(1, Ordering::Relaxed);
            let version = versions.units[unit as usize].load(Ordering::Relaxed);
            if spec.verify && version > 0 {
                fill(&mut expect, unit, version);
                if buf != expect {
                    return Err(format!(
                        "verify: the read at byte {} returned data other than the last write there",
                        unit * spec.bs
                    ));
                }
                verified.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            // Only this thread writes this unit: the version stays consistent.
            let version = versions.units[unit as usize].load(Ordering::Relaxed) + 1;
            fill(&mut buf, unit, version);
            cache.write(sector, &buf).map_err(|e| error_line(&e))?;
            versions.units[unit as usize].store(version, Ordering::Relaxed);
        }
        ops.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Replays one trace record, aligned to the cache's I/O unit and clamped to
/// the working set.
fn trace_io(
    cache: &Cache,
    record: &TraceRecord,
    limit: u64,
    buf: &mut Vec<u8>,
) -> Result<(), Failure> {
    let align = cache.io_alignment();
    let start = (record.sector * SECTOR_SIZE) / align * align % limit.max(align);
    let len = (u64::from(record.sectors) * SECTOR_SIZE).div_ceil(align).max(1) * align;
    let len = len.min(limit - start).min(1 << 20);
    buf.resize(len as usize, 0);
    match record.op {
        TraceOp::Read => cache.read(start / SECTOR_SIZE, buf),
        TraceOp::Write => cache.write(start / SECTOR_SIZE, buf),
    }
    .map_err(|e| error_line(&e))
}

/// Reads back every unit the run wrote through the cache and checks it;
/// returns how many.
pub(crate) fn verify_all(
    cache: &Cache,
    versions: &Versions,
    stop: &AtomicBool,
) -> Result<u64, Failure> {
    verify_units(versions, stop, "", |sector, buf| {
        cache.read(sector, buf).map_err(|e| error_line(&e))
    })
}

/// [`verify_all`] straight on the disk, without the cache.
pub(crate) fn verify_raw(
    dmio: &DmIoClient,
    disk: &Arc<BlockDevice>,
    versions: &Versions,
    stop: &AtomicBool,
) -> Result<u64, Failure> {
    verify_units(versions, stop, "the disk's ", |sector, buf| {
        let region = DmIoRegion::new(disk, sector, buf.len() as u64 / SECTOR_SIZE);
        let memory = dmio
            .io_sync(DmIoRequest::read(AlignedBuf::new(buf.len())), &[region])
            .and_then(|done| done.into_result())
            .map_err(|e| error_line(&e))?;
        if let Some(memory) = memory {
            memory.copy_to_slice(0, buf);
        }
        Ok(())
    })
}

/// Reads every unit written so far with `read(sector, buf)` and compares it
/// with its last write; returns how many were checked.
fn verify_units(
    versions: &Versions,
    stop: &AtomicBool,
    whose: &str,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), Failure>,
) -> Result<u64, Failure> {
    let bs = versions.bs;
    let mut buf = vec![0u8; bs as usize];
    let mut expect = vec![0u8; bs as usize];
    let mut checked = 0;
    for (unit, v) in versions.units.iter().enumerate() {
        if stop.load(Ordering::Relaxed) {
            return Err("interrupted".into());
        }
        let version = v.load(Ordering::Relaxed);
        if version == 0 {
            continue;
        }
        read(unit as u64 * bs / SECTOR_SIZE, &mut buf)?;
        fill(&mut expect, unit as u64, version);
        if buf != expect {
            return Err(format!(
                "verify: {whose}byte {} does not hold its last write",
                unit as u64 * bs
            ));
        }
        checked += 1;
    }
    Ok(checked)
}

pub(crate) fn parse_pattern(text: &str, alpha: f64) -> Result<Pattern, Failure> {
    match text {
        "zipf" => Ok(Pattern::Zipf(alpha)),
        "uniform" => Ok(Pattern::Uniform),
        "seq" | "sequential" => Ok(Pattern::Sequential),
        _ => match text.strip_prefix("trace:") {
            Some(path) => {
                let file = std::fs::File::open(path).map_err(|e| format!("reading {path}: {e}"))?;
                let records = read_trace(std::io::BufReader::new(file), TraceFormat::Auto)
                    .map_err(|e| format!("{path}: {}", error_line(&e)))?;
                if records.is_empty() {
                    return Err(format!("{path}: the trace holds no requests"));
                }
                Ok(Pattern::Trace(records))
            }
            None => Err(format!("{text:?} is not a workload: zipf, uniform, seq or trace:FILE")),
        },
    }
}

pub(crate) fn run_command(args: &RunArgs) -> Result<(), Failure> {
    let pattern = parse_pattern(&args.workload, args.alpha)?;
    if !(args.runtime > 0.0 && args.runtime.is_finite()) {
        return Err(format!("runtime {} is not a positive number of seconds", args.runtime));
    }
    let cache = load(&args.ssd, &args.disk)?;
    let result = run_loaded(&cache, &args.disk, args, pattern);
    let closed = close_keeping_dirty(cache);
    let summary = result?;
    closed?;
    if args.json {
        println!(
            "{}",
            json!({
                "ops": summary.ops, "reads": summary.reads, "writes": summary.writes,
                "seconds": summary.seconds, "iops": summary.iops(),
                "hit_ratio": summary.hit_ratio, "verified_reads": summary.verified,
            })
        );
    } else {
        println!(
            "{} I/Os in {:.1} s: {:.0} IOPS, {:.1} MiB/s, read hit ratio {:.1} %{}",
            summary.ops,
            summary.seconds,
            summary.iops(),
            summary.iops() * args.bs as f64 / f64::from(1 << 20),
            100.0 * summary.hit_ratio,
            if args.verify {
                format!(", {} reads verified", summary.verified)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn run_loaded(
    cache: &Cache,
    disk: &Path,
    args: &RunArgs,
    pattern: Pattern,
) -> Result<Summary, Failure> {
    let align = cache.io_alignment();
    if args.bs == 0 || !args.bs.is_multiple_of(align) {
        return Err(format!("--bs {} is not a multiple of {align} bytes", args.bs));
    }
    let disk_bytes = cache.superblock().disk_sectors * SECTOR_SIZE;
    let working_set = args.working_set.unwrap_or(disk_bytes);
    if working_set > disk_bytes {
        return Err(format!(
            "{}: the working set of {working_set} bytes is larger than the disk",
            disk.display()
        ));
    }
    if working_set < args.bs * u64::from(args.iodepth) {
        return Err(format!(
            "the working set of {working_set} bytes is smaller than --bs x --iodepth"
        ));
    }
    if args.verify && matches!(pattern, Pattern::Trace(_)) {
        return Err("--verify is not available with trace workloads".into());
    }
    let versions = Versions::new(working_set, args.bs);
    let spec = Spec {
        pattern,
        read_pct: args.read_pct,
        bs: args.bs,
        threads: args.iodepth,
        runtime: Duration::from_secs_f64(args.runtime),
        verify: args.verify,
        seed: 0x5eed,
    };
    drive(cache, &versions, &spec, &AtomicBool::new(false), true)
}
