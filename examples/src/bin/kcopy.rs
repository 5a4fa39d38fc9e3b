//! kcopy: copy one region of a block device (or file) to up to eight others, or
//! zero regions, with kcopyd.
//!
//! `kcopy SRC DST [DST...]` copies SRC (the whole device, or the range given by
//! `--offset` and `--length`) to the same range of every DST; `kcopy --zero DST
//! [DST...]` zeroes that range of every DST. It shows a progress bar when stderr
//! is a terminal, can check the result afterwards (`--verify`: a 64-bit xxh3
//! checksum per chunk of the source, or of zeros, against each destination) and
//! prints a one-line summary, or one JSON object with `--json`.
//!
//! On any failure it exits with status 1 and one line `kcopy: <reason>` on
//! stderr (clap's usage errors exit with status 2).

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use dmio::{AlignedBuf, BlockDevice, DeviceOptions, DmIoClient, DmIoMemory, DmIoRegion};
use dmio::{DmIoRequest, SECTOR_SIZE};
use indicatif::{ProgressBar, ProgressStyle};
use kcopyd::{CopyFlags, JobOutcome, KcopydClient, KcopydConfig, Throttle};
use serde_json::json;
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

/// Examples shown at the end of `--help`.
const EXAMPLES: &str = "\
Examples:
  Copy a whole device to two others and check the result:
    kcopy --verify /dev/sdb /dev/sdc /dev/sdd
  Copy 64 MiB starting at sector 2048, at most 50% of the time busy with I/O:
    kcopy --offset 2048 --length 64M --throttle 50 disk.img copy.img
  Zero the first GiB of two devices:
    kcopy --zero --length 1G /dev/loop1 /dev/loop2
  Machine-readable result:
    kcopy --json --verify src.img dst.img | jq .mib_per_s

SRC is opened read-only, each DST read-write (it must already exist and be at
least as large as the end of the range). Everything goes through O_DIRECT, so a
regular file must be on a filesystem that supports it (ext4, xfs, btrfs; tmpfs
since Linux 6.6). The range must be aligned to every device's logical block size.

Exit status: 0 on success; 1 on any failure (one line `kcopy: <reason>` on
stderr, and with --json the JSON object still goes to stdout); 2 on bad usage.";

/// Command-line arguments.
#[derive(Parser, Debug)]
#[command(
    name = "kcopy",
    version,
    about = "Copy a block-device region to up to eight destinations, or zero regions, with kcopyd",
    override_usage = "kcopy [OPTIONS] SRC DST [DST...]\n       kcopy --zero [OPTIONS] DST [DST...]",
    after_help = EXAMPLES
)]
struct Args {
    /// Zero the range of every path instead of copying (there is no SRC).
    #[arg(long)]
    zero: bool,
    /// Start of the range in 512-byte sectors, the same on every device.
    #[arg(long, value_name = "SECTORS", default_value_t = 0)]
    offset: u64,
    /// Length of the range in bytes; suffixes k, m, g, t (or KiB, MiB, GiB, TiB,
    /// any case) are powers of 1024. Default: the rest of SRC after the offset
    /// (with --zero: of the smallest DST).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    length: Option<u64>,
    /// Size of each kcopyd sub-job in KiB (a multiple of 4, at most 1024;
    /// default 512).
    #[arg(long, value_name = "N")]
    sub_job_kb: Option<u32>,
    /// Go on after read errors (the failed part is written as zeros) and write
    /// errors; the run still fails at the end.
    #[arg(long)]
    ignore_errors: bool,
    /// Write destinations strictly in increasing offset order (--ignore-errors
    /// has no effect then).
    #[arg(long)]
    write_seq: bool,
    /// Keep kcopyd's I/O in flight for at most PCT percent of the time (0-100,
    /// 100 = unthrottled).
    #[arg(long, value_name = "PCT")]
    throttle: Option<u32>,
    /// Afterwards, read the range of SRC and of every DST back and compare
    /// checksums (with --zero: check that every DST reads as zeros).
    #[arg(long)]
    verify: bool,
    /// Print one JSON object on stdout instead of the summary line.
    #[arg(long)]
    json: bool,
    /// SRC then one to eight DSTs; with --zero, the DSTs only.
    #[arg(value_name = "PATH", required = true, num_args = 1..)]
    paths: Vec<PathBuf>,
}

/// Parses a size in bytes with an optional binary suffix (`4096`, `64k`, `1MiB`, `2G`).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!("{text:?} is not a size (digits, then k, m, g, KiB, MiB, GiB...)"));
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => {
            return Err(format!(
                "unknown size suffix {suffix:?} (use k, m, g, t or KiB, MiB, GiB, TiB)"
            ));
        }
    };
    let value: u64 = digits.parse().map_err(|_| format!("{digits} is too large"))?;
    value.checked_mul(1u64 << shift).ok_or_else(|| format!("{text} is too large"))
}

#[path = "../shared/errors.rs"]
mod errors;
use errors::{Failure, error_line};

/// `bytes` as a human-readable binary size.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} bytes") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// MiB per second, 0 when no time passed (JSON has no infinity).
fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 { bytes as f64 / (1u64 << 20) as f64 / seconds } else { 0.0 }
}

/// A progress bar on stderr when it is a terminal, a hidden one otherwise.
fn progress_bar(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{msg:>9} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} \
         ({binary_bytes_per_sec}, {eta} left)",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}

/// What the run did, for the summary line or the JSON object.
#[derive(Debug, Default)]
struct Report {
    /// Whether this was a zero job.
    zero: bool,
    /// The source path (copy only).
    source: Option<PathBuf>,
    /// The destination paths.
    destinations: Vec<PathBuf>,
    /// The start of the range in sectors.
    offset_sectors: u64,
    /// The length of the range in bytes.
    total_bytes: u64,
    /// The kcopyd sub-job size in bytes.
    sub_job_bytes: u64,
    /// The job's outcome, once it completed.
    outcome: Option<JobOutcome>,
    /// Seconds from submitting the job to its completion.
    seconds: f64,
    /// The verification result: None when not asked for or not done.
    verified: Option<bool>,
    /// The xxh3-64 checksum of the range (of the source, or of the zeros).
    checksum: Option<u64>,
    /// Seconds spent verifying.
    verify_seconds: f64,
    /// The job's dm-io work (before verifying): operations and calls into the
    /// engine (`io_uring_enter`), KC-17's batching measure.
    io: Option<dmio::ClientStats>,
    /// The job's sub-jobs (chunks).
    sub_jobs: u64,
}

impl Report {
    /// The JSON object for `--json`; `error` is the failure, if any.
    fn to_json(&self, error: Option<&str>) -> serde_json::Value {
        let outcome = self.outcome.as_ref();
        let bytes = outcome.map_or(0, |o| o.bytes_done);
        let destinations: Vec<String> =
            self.destinations.iter().map(|p| p.display().to_string()).collect();
        let failures: Vec<String> =
            outcome.map_or(Vec::new(), |o| o.failures.iter().map(|f| f.to_string()).collect());
        json!({
            "ok": error.is_none(),
            "error": error,
            "mode": if self.zero { "zero" } else { "copy" },
            "source": self.source.as_ref().map(|p| p.display().to_string()),
            "destinations": destinations,
            "offset_sectors": self.offset_sectors,
            "total_bytes": self.total_bytes,
            "bytes": bytes,
            "completed_prefix_bytes": outcome.map_or(0, |o| o.completed_prefix_bytes),
            "seconds": self.seconds,
            "mib_per_s": mib_per_s(bytes, self.seconds),
            "read_err": outcome.is_some_and(|o| o.read_err),
            "write_err": outcome.map_or(0, |o| o.write_err.bits()),
            "cancelled": outcome.is_some_and(|o| o.cancelled),
            "used_write_zeroes": outcome.is_some_and(|o| o.used_write_zeroes),
            "failures": failures,
            "sub_job_bytes": self.sub_job_bytes,
            "verified": self.verified,
            "checksum": self.checksum.map(|c| format!("{c:016x}")),
            "verify_seconds": self.verify_seconds,
            "sub_jobs": self.sub_jobs,
            "io_ops": self.io.map_or(0, |io| io.ops),
            "io_enters": self.io.map_or(0, |io| io.submit_calls),
            "enters_per_op": self.io.filter(|io| io.ops > 0).map(|io| io.submit_calls as f64 / io.ops as f64),
        })
    }

    /// The summary line of a successful run.
    fn summary(&self) -> String {
        let bytes = self.outcome.as_ref().map_or(0, |o| o.bytes_done);
        let n = self.destinations.len();
        let size =
            if bytes < 1024 { human(bytes) } else { format!("{} ({bytes} bytes)", human(bytes)) };
        let mut line = format!(
            "{} {size} {} {n} destination{} in {:.3} s ({:.1} MiB/s)",
            if self.zero { "zeroed" } else { "copied" },
            if self.zero { "on" } else { "to" },
            if n == 1 { "" } else { "s" },
            self.seconds,
            mib_per_s(bytes, self.seconds),
        );
        if self.outcome.as_ref().is_some_and(|o| o.used_write_zeroes) {
            line.push_str(" with write-zeroes");
        }
        if self.verified == Some(true) {
            let _ = write!(line, ", verified in {:.3} s", self.verify_seconds);
            if let Some(sum) = self.checksum {
                let _ = write!(line, " (xxh3 {sum:016x})");
            }
        }
        line
    }
}

/// The one-line reason of a job that did not fully succeed.
fn job_failure(outcome: &JobOutcome, src: Option<&Path>, dsts: &[Arc<BlockDevice>]) -> Failure {
    let mut parts = Vec::new();
    if outcome.read_err {
        let path = src.map_or_else(|| "the source".to_string(), |p| p.display().to_string());
        parts.push(format!("read error on {path}"));
    }
    for i in outcome.write_err.iter() {
        let path = dsts.get(i).map_or_else(|| format!("#{i}"), |d| d.path().display().to_string());
        parts.push(format!("write error on {path}"));
    }
    if outcome.cancelled {
        parts.push("cancelled".to_string());
    }
    if parts.is_empty() {
        parts.push("unknown error".to_string());
    }
    let mut line =
        format!("{} failed: {}", if src.is_some() { "copy" } else { "zero" }, parts.join(", "));
    let _ = write!(
        line,
        " (write_err {}; {} of {} bytes done, the first {} on every destination)",
        outcome.write_err, outcome.bytes_done, outcome.total_bytes, outcome.completed_prefix_bytes
    );
    if let Some(first) = outcome.failures.first() {
        let _ = write!(line, "; first failure: {first}");
    }
    line
}

/// The checksums of one device's range: one per chunk, and one of the whole range.
#[derive(Debug)]
struct Digest {
    /// xxh3-64 of each chunk.
    chunks: Vec<u64>,
    /// xxh3-64 of the whole range.
    whole: u64,
}

/// The chunk size for verification reads.
const VERIFY_CHUNK: u64 = 4 << 20;

/// Reads `len` bytes at byte `start` of `dev` into `buf` (reused), which is
/// handed back.
fn read_chunk(
    client: &DmIoClient,
    dev: &Arc<BlockDevice>,
    start: u64,
    len: u64,
    mut buf: AlignedBuf,
) -> Result<AlignedBuf, Failure> {
    if !buf.set_len(len as usize) {
        buf = AlignedBuf::new(len as usize);
    }
    let region = DmIoRegion::new(dev, start / SECTOR_SIZE, len / SECTOR_SIZE);
    let what = || format!("verify: reading {} at byte {start}", dev.path().display());
    let done = client
        .io_sync(DmIoRequest::read(buf), &[region])
        .map_err(|e| format!("{}: {}", what(), error_line(&e)))?;
    match done.into_result() {
        Ok(Some(DmIoMemory::Kmem(buf))) => Ok(buf),
        Ok(_) => Err(format!("{}: dm-io did not hand the buffer back", what())),
        Err(e) => Err(format!("{}: {}", what(), error_line(&e))),
    }
}

/// The checksums of `len` bytes at byte `start` of `dev` (or of zeros when `dev`
/// is None), read in [`VERIFY_CHUNK`] pieces; `done` counts the bytes read.
fn digest(
    client: &DmIoClient,
    dev: Option<&Arc<BlockDevice>>,
    start: u64,
    len: u64,
    done: &AtomicU64,
) -> Result<Digest, Failure> {
    let mut whole = Xxh3::new();
    let mut chunks = Vec::new();
    let mut buf = AlignedBuf::new(VERIFY_CHUNK.min(len) as usize);
    let mut pos = 0;
    while pos < len {
        let n = VERIFY_CHUNK.min(len - pos);
        match dev {
            Some(dev) => {
                buf = read_chunk(client, dev, start + pos, n, buf)?;
                done.fetch_add(n, Ordering::Relaxed);
            }
            None => {
                // AlignedBuf is zero-filled and never written here.
                let _ = buf.set_len(n as usize);
            }
        }
        whole.update(&buf);
        chunks.push(xxh3_64(&buf));
        pos += n;
    }
    Ok(Digest { chunks, whole: whole.digest() })
}

/// Reads the range back from the source (or expects zeros) and every destination
/// and compares checksums. Returns the checksum of the range.
fn verify(
    client: &DmIoClient,
    src: Option<&Arc<BlockDevice>>,
    dsts: &[Arc<BlockDevice>],
    start: u64,
    len: u64,
) -> Result<u64, Failure> {
    let done = AtomicU64::new(0);
    let reads = len * (dsts.len() as u64 + u64::from(src.is_some()));
    let bar = progress_bar(reads, "verifying");
    let (expected, results) = std::thread::scope(|s| {
        let done = &done;
        // Each reader says when it has finished, so that the bar is updated while
        // they run and the wait ends as soon as the last one is done.
        let (tx, rx) = mpsc::channel::<()>();
        let mut readers: Vec<_> = std::iter::once(src)
            .chain(dsts.iter().map(Some))
            .map(|dev| {
                let tx = tx.clone();
                s.spawn(move || {
                    let result = digest(client, dev, start, len, done);
                    let _ = tx.send(());
                    result
                })
            })
            .collect();
        drop(tx);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bar.set_position(done.load(Ordering::Relaxed))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let join = |h: std::thread::ScopedJoinHandle<'_, Result<Digest, Failure>>| {
            h.join().unwrap_or_else(|_| Err("verify: a reader thread panicked".to_string()))
        };
        let workers = readers.split_off(1);
        let expected = readers.into_iter().map(join).next();
        (expected, workers.into_iter().map(join).collect::<Vec<_>>())
    });
    bar.finish_and_clear();
    let expected = expected.ok_or("verify: no source reader")??;
    let mut mismatches = Vec::new();
    for (dst, result) in dsts.iter().zip(results) {
        let digest = result?;
        if let Some(chunk) = expected.chunks.iter().zip(&digest.chunks).position(|(a, b)| a != b) {
            mismatches.push((dst, chunk as u64));
        }
    }
    let Some(&(dst, chunk)) = mismatches.first() else {
        return Ok(expected.whole);
    };
    // Find the first differing byte of the first differing chunk.
    let chunk_start = start + chunk * VERIFY_CHUNK;
    let n = VERIFY_CHUNK.min(start + len - chunk_start);
    let want = match src {
        Some(src) => read_chunk(client, src, chunk_start, n, AlignedBuf::new(n as usize))?,
        None => AlignedBuf::new(n as usize),
    };
    let got = read_chunk(client, dst, chunk_start, n, AlignedBuf::new(n as usize))?;
    let others = match mismatches.len() {
        1 => String::new(),
        k => format!(" (and {} other destination{})", k - 1, if k == 2 { "" } else { "s" }),
    };
    let what = if src.is_some() { "the source" } else { "zeros" };
    match want.iter().zip(got.iter()).position(|(a, b)| a != b) {
        Some(i) => {
            let at = chunk_start + i as u64;
            Err(format!(
                "verify failed: {} differs from {what} at byte {at} (byte {} of the range: {:#04x}, expected {:#04x}){others}",
                dst.path().display(),
                at - start,
                got[i],
                want[i],
            ))
        }
        None => Err(format!(
            "verify failed: the checksum of {} differed from {what} in bytes {chunk_start}..{} but a second read matched (is something else writing?){others}",
            dst.path().display(),
            chunk_start + n
        )),
    }
}

/// Copies or zeroes as `args` says, filling `report`.
fn run(args: &Args, report: &mut Report) -> Result<(), Failure> {
    report.zero = args.zero;
    report.offset_sectors = args.offset;
    let (src_path, dst_paths) = match args.paths.split_first() {
        Some((src, dsts)) if !args.zero => (Some(src), dsts),
        _ => (None, &args.paths[..]),
    };
    report.source = src_path.cloned();
    report.destinations = dst_paths.to_vec();

    // Configuration first: nothing is opened if it is wrong.
    let mut config = KcopydConfig::new();
    if let Some(kb) = args.sub_job_kb {
        config = config.sub_job_kb(kb);
    }
    if let Some(pct) = args.throttle {
        config = config.throttle(Throttle::new(pct).map_err(|e| error_line(&e))?);
    }
    let mut flags = CopyFlags::empty();
    if args.ignore_errors {
        flags |= CopyFlags::IGNORE_ERROR;
    }
    if args.write_seq {
        flags |= CopyFlags::WRITE_SEQ;
    }

    let src = match src_path {
        Some(path) => Some(
            BlockDevice::open_with(path, DeviceOptions::new().read_only(true))
                .map_err(|e| error_line(&e))?,
        ),
        None => None,
    };
    let dsts = dst_paths
        .iter()
        .map(|path| BlockDevice::open(path).map_err(|e| error_line(&e)))
        .collect::<Result<Vec<_>, _>>()?;

    // The range.
    let start = args
        .offset
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| format!("--offset {} is too large", args.offset))?;
    let len = match args.length {
        Some(len) => {
            if !len.is_multiple_of(SECTOR_SIZE) {
                return Err(format!(
                    "--length {len} is not a multiple of the 512-byte sector (the range must be aligned to every device's logical block size)"
                ));
            }
            len
        }
        None => {
            let (what, size) = match &src {
                Some(src) => (format!("SRC {}", src.path().display()), src.size_bytes()),
                None => {
                    let smallest = dsts.iter().min_by_key(|d| d.size_bytes());
                    let smallest = smallest.ok_or("no destination given")?;
                    (format!("DST {}", smallest.path().display()), smallest.size_bytes())
                }
            };
            if start > size {
                return Err(format!(
                    "--offset {} (byte {start}) lies beyond the end of {what} ({size} bytes)",
                    args.offset
                ));
            }
            let len = size - start;
            if !len.is_multiple_of(SECTOR_SIZE) {
                return Err(format!(
                    "{what} holds {size} bytes, leaving {len} bytes after the offset: not a whole number of 512-byte sectors (give --length)"
                ));
            }
            len
        }
    };
    let end = start.checked_add(len).ok_or("the range ends beyond 2^64 bytes")?;
    report.total_bytes = len;
    if let Some(src) = &src
        && src.size_bytes() < end
    {
        return Err(format!(
            "SRC {} is smaller than the range: it holds {} bytes, the range ends at byte {end}",
            src.path().display(),
            src.size_bytes()
        ));
    }
    for dst in &dsts {
        if dst.size_bytes() < end {
            return Err(format!(
                "DST {} is smaller than the range: it holds {} bytes, the range ends at byte {end}",
                dst.path().display(),
                dst.size_bytes()
            ));
        }
    }

    let client = KcopydClient::with_config(config).map_err(|e| error_line(&e))?;
    report.sub_job_bytes = client.sub_job_bytes();
    let (sector, count) = (start / SECTOR_SIZE, len / SECTOR_SIZE);
    let regions: Vec<DmIoRegion> = dsts.iter().map(|d| DmIoRegion::new(d, sector, count)).collect();
    let (tx, rx) = mpsc::channel();
    let notify = move |outcome: JobOutcome| {
        let _ = tx.send(outcome);
    };
    let io_before = client.dmio().stats();
    let started = Instant::now();
    let job = match &src {
        Some(src) => client.copy(&DmIoRegion::new(src, sector, count), &regions, flags, notify),
        None => client.zero(&regions, flags, notify),
    }
    .map_err(|e| error_line(&e))?;
    let bar = progress_bar(job.total_bytes(), if args.zero { "zeroing" } else { "copying" });
    let outcome = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(outcome) => break outcome,
            Err(mpsc::RecvTimeoutError::Timeout) => bar.set_position(job.bytes_done()),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bar.finish_and_clear();
                return Err("kcopyd dropped the job without calling back".to_string());
            }
        }
    };
    report.seconds = started.elapsed().as_secs_f64();
    report.io = Some(client.dmio().stats().since(&io_before));
    report.sub_jobs = client.stats().sub_jobs;
    bar.finish_and_clear();
    let failure =
        (!outcome.is_ok()).then(|| job_failure(&outcome, src_path.map(PathBuf::as_path), &dsts));
    report.outcome = Some(outcome);
    if let Some(reason) = failure {
        return Err(reason);
    }

    if args.verify {
        let started = Instant::now();
        let result = verify(client.dmio(), src.as_ref(), &dsts, start, len);
        report.verify_seconds = started.elapsed().as_secs_f64();
        report.verified = Some(result.is_ok());
        report.checksum = Some(result?);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.zero && args.paths.len() < 2 {
        Args::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "a copy needs SRC and at least one DST (or --zero to zero the given paths)",
            )
            .exit();
    }
    let mut report = Report::default();
    let result = run(&args, &mut report);
    // Write errors on stdout or stderr (a closed pipe) must not panic.
    if args.json {
        let line = report.to_json(result.as_ref().err().map(String::as_str)).to_string();
        let _ = writeln!(std::io::stdout(), "{line}");
    } else if result.is_ok() {
        let _ = writeln!(std::io::stdout(), "{}", report.summary());
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            let _ = writeln!(std::io::stderr(), "kcopy: {}", reason.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn sizes_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("3m"), Ok(3 << 20));
        assert_eq!(parse_size("3MiB"), Ok(3 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1.5M").is_err());
        assert!(parse_size("3x").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("16777216T").is_err());
    }

    #[test]
    fn human_sizes_and_rates() {
        assert_eq!(human(1000), "1000 bytes");
        assert_eq!(human(4 << 20), "4.0 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(mib_per_s(1 << 20, 0.0), 0.0);
        assert_eq!(mib_per_s(4 << 20, 2.0), 2.0);
    }

    #[test]
    fn error_lines_skip_repeated_sources() {
        #[derive(Debug)]
        struct Outer(std::io::Error, bool);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                if self.1 { write!(f, "outer: {}", self.0) } else { f.write_str("outer") }
            }
        }
        impl Error for Outer {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                Some(&self.0)
            }
        }
        let inner = || std::io::Error::other("inner\nline");
        assert_eq!(error_line(&Outer(inner(), false)), "outer: inner line");
        assert_eq!(error_line(&Outer(inner(), true)), "outer: inner line");
    }
}
