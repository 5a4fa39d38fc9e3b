//! index-bench: the cost of a cache hit's index work, without any I/O.
//!
//! A read hit in `flashcache-core` finds its block in the set's index
//! (`CacheSet::lookup`) and records the access (`CacheSet::touch`), with the
//! set's mutex held. On a large cache those few loads miss the CPU caches and
//! the TLB, and in the all-hit benchmarks they are the largest part of the
//! cache's own time per I/O (see BENCHMARKS.md). IOPS on this project's shared
//! VMs move with the hypervisor's steal time; this binary times the index
//! work alone, single-threaded and in a tight loop, so that a change to the
//! index's layout can be judged in nanoseconds per hit rather than in noisy
//! IOPS ratios.
//!
//! It builds `--sets` sets of `--ways` ways (the policy core's own
//! `CacheSet`, each behind a `Mutex` as in the cache), fills `--occupancy` of
//! every set, then looks up and touches `--hits` random cached blocks, and
//! prints nanoseconds per hit: the minimum and the median of `--reps`
//! repetitions. Each hit's block depends on the previous hit's result, so
//! the CPU cannot overlap one hit's cache misses with the next one's: on the
//! I/O path other work separates the hits and every miss is paid in full.
//! `--overlap` drops that dependency (throughput rather than latency).
//!
//! ```text
//! cargo run --release -p benches --bin index-bench -- --sets 2048 --ways 512 --occupancy 0.25
//! cargo run --release -p benches --bin index-bench -- --sets 16 --ways 512 --json   # fits in L2
//! ```

use std::hint::black_box;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use clap::Parser;
use flashcache_core::policy::{CacheSet, Replacement};
use flashcache_core::sim::SplitMix64;

#[path = "../shared/policy.rs"]
mod policy;
use policy::Policy;

#[derive(Debug, Parser)]
#[command(about = "Nanoseconds per cache hit of the policy core's index work (no I/O)")]
struct Args {
    /// Sets (a 4 GiB cache of 4 KiB blocks at 512 ways has 2048).
    #[arg(long, default_value_t = 2048)]
    sets: u32,
    /// Ways per set (1 to 65535).
    #[arg(long, default_value_t = 512)]
    ways: u16,
    /// Share of each set's ways holding a block (0 < x <= 1).
    #[arg(long, default_value_t = 0.25)]
    occupancy: f64,
    /// Hits timed per repetition.
    #[arg(long, default_value_t = 2_000_000)]
    hits: usize,
    /// Repetitions (the minimum and the median are reported).
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// Replacement policy.
    #[arg(long, value_enum, default_value_t = Policy::Sieve)]
    policy: Policy,
    /// Seed of the random hit sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Let consecutive hits overlap in the CPU (no dependency between them).
    #[arg(long)]
    overlap: bool,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// One set as the cache holds it: the index behind the set's mutex.
struct LockedSet {
    set: Mutex<CacheSet>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("index-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    if args.sets == 0 || args.ways == 0 || args.hits == 0 || args.reps == 0 {
        return Err("--sets, --ways, --hits and --reps must be at least 1".into());
    }
    if !(args.occupancy > 0.0 && args.occupancy <= 1.0) {
        return Err(format!("--occupancy {} is not in (0, 1]", args.occupancy));
    }
    let policy = args.policy.kind().build();
    let per_set = ((f64::from(args.ways) * args.occupancy).round() as u64).max(1);
    let sets = u64::from(args.sets);
    // Set s holds blocks s, s + sets, s + 2 * sets, ...: every block maps to
    // its set by `block % sets`, as a hashed mapping spreads them.
    let table: Vec<LockedSet> = (0..sets)
        .map(|s| {
            let mut set = CacheSet::new(usize::from(args.ways));
            for k in 0..per_set {
                set.allocate(&*policy, s + k * sets);
            }
            LockedSet { set: Mutex::new(set) }
        })
        .collect();
    // The hit sequence, generated up front (read sequentially while timing).
    let mut rng = SplitMix64::new(args.seed);
    let blocks = per_set * sets;
    let sequence: Vec<u64> = (0..args.hits).map(|_| rng.below(blocks)).collect();
    let index_bytes = CacheSet::index_bytes(usize::from(args.ways)) as u64 * sets;

    let mut per_hit_ns = Vec::with_capacity(args.reps);
    for _ in 0..args.reps {
        let start = Instant::now();
        let found = hits(&table, &*policy, &sequence, args.overlap);
        let elapsed = start.elapsed();
        if found != sequence.len() {
            return Err(format!(
                "{} of {} hits found no block",
                sequence.len() - found,
                sequence.len()
            ));
        }
        per_hit_ns.push(elapsed.as_nanos() as f64 / sequence.len() as f64);
    }
    per_hit_ns.sort_by(f64::total_cmp);
    let min = per_hit_ns[0];
    let median = per_hit_ns[per_hit_ns.len() / 2];
    if args.json {
        let out = serde_json::json!({
            "tool": "index-bench",
            "sets": args.sets,
            "ways": args.ways,
            "occupancy": args.occupancy,
            "policy": args.policy.name(),
            "cached_blocks": blocks,
            "index_bytes": index_bytes,
            "hits_per_rep": args.hits,
            "reps": args.reps,
            "overlap": args.overlap,
            "ns_per_hit_min": min,
            "ns_per_hit_median": median,
        });
        println!("{out}");
    } else {
        println!(
            "index-bench: {} sets x {} ways, {:.0} % full ({} blocks, index {:.1} MiB), policy {:?}, \
             {}: {:.1} ns per hit (median of {}), {:.1} min",
            args.sets,
            args.ways,
            args.occupancy * 100.0,
            blocks,
            index_bytes as f64 / f64::from(1 << 20),
            args.policy,
            if args.overlap { "overlapping hits" } else { "dependent hits" },
            median,
            args.reps,
            min,
        );
    }
    Ok(())
}

/// Looks up and touches each block of `sequence` in its set, with the set's
/// mutex held, as a read hit does; returns how many were found. Unless
/// `overlap`, each block's number depends on the previous lookup's result
/// (times an opaque zero), which serializes the hits in the CPU.
fn hits(table: &[LockedSet], policy: &dyn Replacement, sequence: &[u64], overlap: bool) -> usize {
    let sets = table.len() as u64;
    let zero = black_box(0u64);
    let mut found = 0;
    let mut last = 0u64;
    for &next in sequence {
        let block = if overlap { next } else { next + last * zero };
        let entry = &table[(block % sets) as usize];
        let mut set = entry.set.lock().unwrap_or_else(|e| e.into_inner());
        last = match set.lookup(black_box(block)) {
            Some(way) => {
                black_box(set.touch(policy, way));
                found += 1;
                u64::from(way)
            }
            None => 0,
        };
    }
    found
}
