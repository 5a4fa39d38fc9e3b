//! cache-sim: replay a block I/O trace through flashcache-core's policy core
//! and print miss ratios per replacement policy and cache size.
//!
//! The trace comes from a file (`--trace`: `R|W sector count` lines or the MSR
//! Cambridge CSV) or from the seeded Zipf generator (`--zipf`). Every
//! (policy, size) combination runs on the same trace in memory, on all CPUs;
//! the result is a table (rows policies, columns sizes) or, with `--json`, one
//! JSON object. See `flashcache_core::sim` for what a hit and a miss do.
//!
//! On any failure it exits with status 1 and one line `cache-sim: <reason>`
//! on stderr (clap's usage errors exit with status 2).

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use clap::{ArgGroup, Parser};
use flashcache_core::policy::{PolicyKind, SetMapping};
use flashcache_core::sim::{
    CacheSize, Organization, SimJob, SimReport, TraceFormat, TraceReader, TraceRecord, Zipf,
    footprint, plan, write_text,
};
use serde_json::{Value, json};

/// Examples shown at the end of `--help`.
const EXAMPLES: &str = "\
Examples:
  Every policy on an MSR Cambridge trace, caches of 1, 5, 10 and 20% of its footprint:
    cache-sim --trace hm_0.csv
  A seeded Zipf(0.8) trace of 1M requests over 100k shuffled 4 KiB blocks, fully
  associative, written out for other simulators:
    cache-sim --zipf 100000,0.8,1000000,42 --shuffle --assoc full --write-trace zipf.txt
  Absolute sizes in blocks, flashcache v1's linear set mapping, JSON:
    cache-sim --trace t.txt --sizes 4096,65536 --mapping linear --policy lru,sieve --json

A text trace has one request per line: `R|W <sector> <count>` in 512-byte sectors
(blank lines and `#` comments are skipped). An MSR trace has the CSV columns
Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime (offset and size in
bytes). A Zipf object is one block; the trace reads it whole.

Each request is split into the cache blocks it touches; every block access is a
lookup: a hit updates the policy, a miss fills the block (reads and writes alike,
nothing dirty). Sizes in % are of the footprint (distinct blocks of the trace);
set-associative sizes are rounded to the nearest whole number of sets (at least one).

Exit status: 0 on success; 1 on any failure (one line `cache-sim: <reason>` on
stderr); 2 on bad usage.";

/// Command-line arguments.
#[derive(Parser, Debug)]
#[command(
    name = "cache-sim",
    version,
    about = "Replay a block trace through flashcache-core's replacement policies and print miss ratios",
    after_help = EXAMPLES,
    group(ArgGroup::new("source").required(true).args(["trace", "zipf"]))
)]
struct Args {
    /// The trace file (`-` for standard input).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// The trace file's format [default: auto: MSR when the first line with
    /// content has a comma, else text].
    #[arg(long, value_name = "auto|text|msr", conflicts_with = "zipf")]
    format: Option<TraceFormat>,
    /// A synthetic trace: REQUESTS one-block reads of N objects drawn from
    /// Zipf(ALPHA), seeded with SEED.
    #[arg(long, value_name = "N,ALPHA,REQUESTS,SEED", value_parser = parse_zipf)]
    zipf: Option<ZipfSpec>,
    /// Map Zipf ranks to object ids through a seeded random permutation (no
    /// spatial locality).
    #[arg(long, conflicts_with = "trace")]
    shuffle: bool,
    /// Also write the trace, in the text format, to FILE.
    #[arg(long, value_name = "FILE")]
    write_trace: Option<PathBuf>,
    /// The policies: `all`, or a comma-separated list of fifo, lru, slru
    /// (flashcache's segmented LRU) and sieve.
    #[arg(long, value_name = "all|fifo|lru|slru|sieve", default_value = "all", value_parser = parse_policies)]
    policy: PolicyList,
    /// Cache sizes, comma-separated: a percentage of the trace's footprint
    /// (`5%`) or a number of blocks.
    #[arg(long, value_name = "SIZES", default_value = "1%,5%,10%,20%", value_parser = parse_sizes)]
    sizes: SizeList,
    /// Blocks per set (a power of two from 2 to 32768), or `full` for one
    /// fully associative set (at most 65535 blocks).
    #[arg(long, value_name = "512|full", default_value = "512", value_parser = parse_assoc)]
    assoc: Assoc,
    /// How disk blocks map to sets: `linear` (flashcache v1/v2), or
    /// `hashed:BLOCKS`, clusters of BLOCKS consecutive blocks hashed to sets
    /// (flashcache v3's disk associativity). Default: hashed, with clusters of
    /// 256 KiB (flashcache's default).
    #[arg(long, value_name = "linear|hashed:BLOCKS", value_parser = parse_mapping)]
    mapping: Option<SetMapping>,
    /// The cache block size: a power of two from 512 bytes; suffixes k, m
    /// (or KiB, MiB) are powers of 1024.
    #[arg(long, value_name = "SIZE", default_value = "4k", value_parser = parse_block_size)]
    block_size: u32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Simulations run at once (default: the number of CPUs).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    jobs: Option<u32>,
}

/// `--zipf N,ALPHA,REQUESTS,SEED`.
#[derive(Clone, Copy, Debug)]
struct ZipfSpec {
    objects: u64,
    alpha: f64,
    requests: u64,
    seed: u64,
}

/// `--policy`, parsed.
#[derive(Clone, Debug)]
struct PolicyList(Vec<PolicyKind>);

/// `--sizes`, parsed.
#[derive(Clone, Debug)]
struct SizeList(Vec<CacheSize>);

/// `--assoc`, parsed.
#[derive(Clone, Copy, Debug)]
enum Assoc {
    Full,
    Ways(u32),
}

/// An integer that may contain `_` separators.
fn integer(field: &str, text: &str) -> Result<u64, String> {
    text.trim()
        .replace('_', "")
        .parse()
        .map_err(|_| format!("{field} {text:?} is not an unsigned integer"))
}

fn parse_zipf(text: &str) -> Result<ZipfSpec, String> {
    let fields: Vec<&str> = text.split(',').collect();
    let [n, alpha, requests, seed] = fields[..] else {
        return Err(format!("expected N,ALPHA,REQUESTS,SEED, got {text:?}"));
    };
    let alpha_value: f64 =
        alpha.trim().parse().map_err(|_| format!("ALPHA {alpha:?} is not a number"))?;
    if !alpha_value.is_finite() || alpha_value < 0.0 {
        return Err(format!("ALPHA {alpha:?} is not a finite number >= 0"));
    }
    let spec = ZipfSpec {
        objects: integer("N", n)?,
        alpha: alpha_value,
        requests: integer("REQUESTS", requests)?,
        seed: integer("SEED", seed)?,
    };
    if spec.objects == 0 {
        return Err("N must be at least 1".into());
    }
    Ok(spec)
}

fn parse_policies(text: &str) -> Result<PolicyList, String> {
    let mut list = Vec::new();
    for name in text.split(',').map(str::trim) {
        let add: Vec<PolicyKind> = if name.eq_ignore_ascii_case("all") {
            PolicyKind::ALL.to_vec()
        } else {
            vec![PolicyKind::from_name(name).ok_or_else(|| {
                format!("unknown policy {name:?} (expected all, fifo, lru, slru or sieve)")
            })?]
        };
        for kind in add {
            if !list.contains(&kind) {
                list.push(kind);
            }
        }
    }
    Ok(PolicyList(list))
}

fn parse_sizes(text: &str) -> Result<SizeList, String> {
    let sizes: Vec<CacheSize> = text
        .split(',')
        .map(|s| s.parse::<CacheSize>().map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    Ok(SizeList(sizes))
}

fn parse_assoc(text: &str) -> Result<Assoc, String> {
    if text.trim().eq_ignore_ascii_case("full") {
        return Ok(Assoc::Full);
    }
    let n = integer("associativity", text)?;
    u32::try_from(n)
        .map(Assoc::Ways)
        .map_err(|_| format!("associativity {n} is not a power of two from 2 to 32768"))
}

fn parse_mapping(text: &str) -> Result<SetMapping, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("linear") {
        return Ok(SetMapping::Linear);
    }
    let Some(blocks) = text.strip_prefix("hashed:") else {
        return Err(format!("unknown mapping {text:?} (expected linear or hashed:BLOCKS)"));
    };
    let blocks = integer("cluster size", blocks)?;
    match u32::try_from(blocks) {
        Ok(b) if b.is_power_of_two() => Ok(SetMapping::Hashed { cluster_blocks: b }),
        _ => Err(format!("cluster size {blocks} is not a power of two of blocks")),
    }
}

fn parse_block_size(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        _ => return Err(format!("{text:?} is not a size (digits, then k, m, KiB or MiB)")),
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|v| v.checked_mul(1 << shift))
        .ok_or_else(|| format!("{text:?} is not a size"))?;
    if bytes < 512 || !bytes.is_power_of_two() || bytes / 512 > u64::from(u32::MAX) {
        return Err(format!("block size {bytes} is not a power of two from 512 bytes"));
    }
    Ok((bytes / 512) as u32)
}

#[path = "../shared/errors.rs"]
mod errors;
use errors::{Failure, error_line};

/// Where the trace came from, for the report.
enum Source {
    File { name: String, format: TraceFormat },
    Zipf(ZipfSpec, bool),
}

/// Reads the trace file (or standard input) into memory.
fn read_file(path: &PathBuf, format: TraceFormat) -> Result<(Vec<TraceRecord>, Source), Failure> {
    let name = path.display().to_string();
    let input: Box<dyn BufRead> = if name == "-" {
        Box::new(BufReader::new(io::stdin()))
    } else {
        let file = File::open(path).map_err(|e| format!("{name}: {}", error_line(&e)))?;
        Box::new(BufReader::with_capacity(1 << 20, file))
    };
    let mut reader = TraceReader::new(input, format);
    let mut records = Vec::new();
    for record in reader.by_ref() {
        records.push(record.map_err(|e| format!("{name}: {}", error_line(&e)))?);
    }
    if records.is_empty() {
        return Err(format!("{name}: the trace has no records"));
    }
    let format = match reader.format() {
        TraceFormat::Auto => TraceFormat::Text,
        f => f,
    };
    Ok((records, Source::File { name, format }))
}

/// Generates the Zipf trace.
fn generate(
    spec: ZipfSpec,
    shuffle: bool,
    block_sectors: u32,
) -> Result<Vec<TraceRecord>, Failure> {
    let zipf = Zipf::new(spec.objects, spec.alpha, spec.seed).map_err(|e| e.to_string())?;
    let mut zipf = if shuffle { zipf.shuffled() } else { zipf };
    let n = usize::try_from(spec.requests)
        .map_err(|_| format!("{} requests are too many", spec.requests))?;
    let mut records = Vec::new();
    records.try_reserve_exact(n).map_err(|_| format!("{n} requests do not fit in memory"))?;
    records.extend(zipf.records(block_sectors).take(n));
    if records.is_empty() {
        return Err("REQUESTS must be at least 1".into());
    }
    Ok(records)
}

fn write_trace(path: &PathBuf, records: &[TraceRecord]) -> Result<(), Failure> {
    let name = path.display();
    let file = File::create(path).map_err(|e| format!("{name}: {}", error_line(&e)))?;
    write_text(BufWriter::with_capacity(1 << 20, file), records)
        .map_err(|e| format!("writing {name}: {}", error_line(&e)))?;
    Ok(())
}

/// Runs every job on `threads` threads; reports in job order.
fn run_jobs(jobs: &[SimJob], records: &[TraceRecord], threads: usize) -> Vec<SimReport> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<SimReport>>> = Mutex::new(vec![None; jobs.len()]);
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, jobs.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let report = job.run(records);
                    results.lock().unwrap_or_else(PoisonError::into_inner)[i] = Some(report);
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(PoisonError::into_inner).into_iter().flatten().collect()
}

fn mapping_name(mapping: Option<SetMapping>) -> Option<String> {
    mapping.map(|m| match m {
        SetMapping::Linear => "linear".to_owned(),
        SetMapping::Hashed { cluster_blocks } => format!("hashed:{cluster_blocks}"),
    })
}

fn block_size_name(block_sectors: u32) -> String {
    let bytes = u64::from(block_sectors) * 512;
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1024 && bytes % 1024 == 0 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

/// Everything the output needs.
struct Outcome<'a> {
    source: Source,
    records: &'a [TraceRecord],
    block_sectors: u32,
    footprint: u64,
    organization: Organization,
    sizes: &'a [CacheSize],
    policies: &'a [PolicyKind],
    jobs: &'a [SimJob],
    reports: &'a [SimReport],
}

impl Outcome<'_> {
    fn source_json(&self) -> Value {
        match &self.source {
            Source::File { name, format } => {
                json!({ "kind": "file", "path": name, "format": format.name() })
            }
            Source::Zipf(z, shuffled) => json!({
                "kind": "zipf",
                "objects": z.objects,
                "alpha": z.alpha,
                "requests": z.requests,
                "seed": z.seed,
                "shuffled": shuffled,
            }),
        }
    }

    fn to_json(&self) -> Value {
        let (assoc, mapping) = match self.organization {
            Organization::Full => (None, None),
            Organization::SetAssociative { assoc, mapping } => {
                (Some(assoc), mapping_name(Some(mapping)))
            }
        };
        let results: Vec<Value> = self
            .jobs
            .iter()
            .zip(self.reports)
            .map(|(job, r)| {
                json!({
                    "policy": r.policy.name(),
                    "size": job.size.to_string(),
                    "cache_blocks": r.cache_blocks,
                    "sets": r.assoc.map(|a| r.cache_blocks / u64::from(a)),
                    "accesses": r.accesses,
                    "hits": r.hits,
                    "misses": r.accesses - r.hits,
                    "miss_ratio": r.miss_ratio(),
                    "hit_ratio": r.hit_ratio(),
                    "reads": r.reads,
                    "read_hits": r.read_hits,
                    "read_hit_ratio": r.read_hit_ratio(),
                    "writes": r.writes,
                    "write_hits": r.write_hits,
                    "write_hit_ratio": r.write_hit_ratio(),
                    "evictions": r.evictions,
                    "no_room": r.no_room,
                })
            })
            .collect();
        json!({
            "trace": self.source_json(),
            "records": self.records.len(),
            "block_bytes": u64::from(self.block_sectors) * 512,
            "footprint_blocks": self.footprint,
            "assoc": assoc,
            "mapping": mapping,
            "sizes": self.sizes.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "results": results,
        })
    }

    fn table(&self) -> String {
        let mut out = String::new();
        let source = match &self.source {
            Source::File { name, format } => format!("{name} ({format})"),
            Source::Zipf(z, shuffled) => format!(
                "zipf {} objects, alpha {}, seed {}{}",
                z.objects,
                z.alpha,
                z.seed,
                if *shuffled { ", shuffled ids" } else { "" }
            ),
        };
        let accesses = self.reports.first().map_or(0, |r| r.accesses);
        let reads = self.reports.first().map_or(0, |r| r.reads);
        let _ = writeln!(out, "trace:     {source}, {} records", self.records.len());
        let _ = writeln!(
            out,
            "accesses:  {accesses} blocks of {} ({reads} reads, {} writes), footprint {} blocks",
            block_size_name(self.block_sectors),
            accesses - reads,
            self.footprint
        );
        let cache = match self.organization {
            Organization::Full => "fully associative".to_owned(),
            Organization::SetAssociative { assoc, mapping } => {
                format!("{assoc}-way, {} mapping", mapping_name(Some(mapping)).unwrap_or_default())
            }
        };
        let _ = writeln!(out, "cache:     {cache}");
        let _ = writeln!(out, "\nmiss ratio (rows: policy; columns: cache size, in blocks below)");
        let width = 9;
        let _ = write!(out, "{:<8}", "policy");
        for size in self.sizes {
            let _ = write!(out, "{:>width$}", size.to_string());
        }
        let _ = write!(out, "\n{:<8}", "");
        for job in self.jobs.iter().take(self.sizes.len()) {
            let _ = write!(out, "{:>width$}", job.shape.cache_blocks());
        }
        out.push('\n');
        for (p, policy) in self.policies.iter().enumerate() {
            let _ = write!(out, "{:<8}", policy.name());
            for r in self.reports.iter().skip(p * self.sizes.len()).take(self.sizes.len()) {
                let _ = write!(out, "{:>width$.4}", r.miss_ratio());
            }
            out.push('\n');
        }
        out
    }
}

fn run(args: &Args) -> Result<String, Failure> {
    let block_sectors = args.block_size;
    let (records, source) = match (&args.trace, args.zipf) {
        (Some(path), _) => read_file(path, args.format.unwrap_or(TraceFormat::Auto))?,
        (None, Some(spec)) => {
            (generate(spec, args.shuffle, block_sectors)?, Source::Zipf(spec, args.shuffle))
        }
        (None, None) => return Err("give --trace FILE or --zipf N,ALPHA,REQUESTS,SEED".into()),
    };
    if let Some(path) = &args.write_trace {
        write_trace(path, &records)?;
    }
    let organization = match args.assoc {
        Assoc::Full => Organization::Full,
        Assoc::Ways(assoc) => {
            let default_cluster = ((256 * 2) / block_sectors).max(1);
            let mapping =
                args.mapping.unwrap_or(SetMapping::Hashed { cluster_blocks: default_cluster });
            Organization::SetAssociative { assoc, mapping }
        }
    };
    let footprint = footprint(&records, block_sectors);
    let policies = &args.policy.0;
    let sizes = &args.sizes.0;
    let jobs = plan(policies, sizes, organization, footprint, block_sectors)
        .map_err(|e| error_line(&e))?;
    let threads = match args.jobs {
        Some(n) => n as usize,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let reports = run_jobs(&jobs, &records, threads);
    let outcome = Outcome {
        source,
        records: &records,
        block_sectors,
        footprint,
        organization,
        sizes,
        policies,
        jobs: &jobs,
        reports: &reports,
    };
    Ok(if args.json { outcome.to_json().to_string() } else { outcome.table() })
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(text) => {
            // A closed pipe on stdout must not panic.
            let mut stdout = io::stdout().lock();
            let _ = writeln!(stdout, "{}", text.trim_end());
            let _ = stdout.flush();
            ExitCode::SUCCESS
        }
        Err(reason) => {
            let _ = writeln!(io::stderr(), "cache-sim: {}", reason.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_parsers() {
        let z = parse_zipf("100_000,0.8,1000000,42").unwrap();
        assert_eq!((z.objects, z.alpha, z.requests, z.seed), (100_000, 0.8, 1_000_000, 42));
        assert!(parse_zipf("100,0.8,10").is_err());
        assert!(parse_zipf("0,0.8,10,1").is_err());
        assert!(parse_zipf("10,-1,10,1").is_err());
        assert!(parse_zipf("10,x,10,1").is_err());
        assert_eq!(parse_policies("all").unwrap().0, PolicyKind::ALL.to_vec());
        assert_eq!(
            parse_policies("sieve,LRU,sieve").unwrap().0,
            vec![PolicyKind::Sieve, PolicyKind::Lru]
        );
        assert!(parse_policies("arc").is_err());
        assert_eq!(
            parse_sizes("1%,4096").unwrap().0,
            vec![CacheSize::Fraction(0.01), CacheSize::Blocks(4096)]
        );
        assert!(parse_sizes("1%,").is_err());
        assert!(matches!(parse_assoc("full"), Ok(Assoc::Full)));
        assert!(matches!(parse_assoc("512"), Ok(Assoc::Ways(512))));
        assert!(parse_assoc("many").is_err());
        assert_eq!(parse_mapping("linear"), Ok(SetMapping::Linear));
        assert_eq!(parse_mapping("hashed:64"), Ok(SetMapping::Hashed { cluster_blocks: 64 }));
        assert!(parse_mapping("hashed:48").is_err());
        assert!(parse_mapping("random").is_err());
        assert_eq!(parse_block_size("4k"), Ok(8));
        assert_eq!(parse_block_size("512"), Ok(1));
        assert_eq!(parse_block_size("1MiB"), Ok(2048));
        assert!(parse_block_size("256").is_err());
        assert!(parse_block_size("3k").is_err());
        assert!(parse_block_size("4x").is_err());
        assert_eq!(block_size_name(8), "4 KiB");
        assert_eq!(block_size_name(1), "512 B");
    }
}
