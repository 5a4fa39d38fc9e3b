//! `flashcache simulate`: miss ratios of the replacement policies on a trace,
//! from the policy core alone (no I/O), as a table and an SVG chart.

use std::fmt::Write as _;
use std::path::PathBuf;

use flashcache_core::policy::{PolicyKind, SetMapping};
use flashcache_core::sim::{
    CacheSize, Organization, SimReport, TraceFormat, read_trace, run_matrix,
};

use crate::errors::{Failure, error_line};
use crate::parse_size;

pub(crate) const SIMULATE_HELP: &str = "\
Examples:
  flashcache simulate --trace hm_0.csv
  flashcache simulate --trace t.txt --policy lru,sieve --sizes 2%,8%,32% --plot miss.svg

The trace is `R|W sector count` lines or the MSR Cambridge CSV. Sizes are
percentages of the trace's footprint (its distinct cache blocks) or block counts.
The cache is set-associative like the real one (--assoc ways, flashcache's
hashed mapping of --disk-assoc blocks per run).";

/// Arguments of `simulate`.
#[derive(clap::Args, Debug)]
pub(crate) struct SimulateArgs {
    /// The trace file.
    #[arg(long)]
    trace: PathBuf,
    /// `all`, or policy names separated by commas (fifo, lru, slru, sieve).
    #[arg(long, default_value = "all")]
    policy: String,
    /// Cache sizes: percentages of the footprint or block counts.
    #[arg(long, default_value = "1%,5%,10%,20%", value_delimiter = ',')]
    sizes: Vec<CacheSize>,
    /// Cache block size.
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    block_size: u64,
    /// Blocks per set.
    #[arg(long, default_value_t = 512)]
    assoc: u32,
    /// Consecutive disk blocks kept in one set (0: linear mapping).
    #[arg(long, default_value_t = 64)]
    disk_assoc: u32,
    /// Also draw miss ratio against cache size, one line per policy, as SVG.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
}

pub(crate) fn run(args: &SimulateArgs) -> Result<(), Failure> {
    let policies: Vec<PolicyKind> = if args.policy == "all" {
        PolicyKind::ALL.to_vec()
    } else {
        args.policy
            .split(',')
            .map(|n| {
                PolicyKind::from_name(n.trim()).ok_or_else(|| format!("{n:?} is not a policy"))
            })
            .collect::<Result<_, _>>()?
    };
    if !args.block_size.is_power_of_two() || args.block_size < 512 {
        return Err(format!(
            "block size {} is not a power of two of at least 512",
            args.block_size
        ));
    }
    let file = std::fs::File::open(&args.trace)
        .map_err(|e| format!("reading {}: {e}", args.trace.display()))?;
    let records = read_trace(std::io::BufReader::new(file), TraceFormat::Auto)
        .map_err(|e| format!("{}: {}", args.trace.display(), error_line(&e)))?;
    if records.is_empty() {
        return Err(format!("{}: the trace holds no requests", args.trace.display()));
    }
    let mapping = match args.disk_assoc {
        0 => SetMapping::Linear,
        n => SetMapping::Hashed { cluster_blocks: n },
    };
    let organization = Organization::SetAssociative { assoc: args.assoc, mapping };
    let block_sectors = (args.block_size / 512) as u32;
    let reports = run_matrix(&records, &policies, &args.sizes, organization, block_sectors)
        .map_err(|e| error_line(&e))?;
    print!("{}", table(&policies, &args.sizes, &reports));
    if let Some(path) = &args.plot {
        std::fs::write(path, svg(&policies, &args.sizes, &reports))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("chart written to {}", path.display());
    }
    Ok(())
}

/// Miss ratios, one row per policy, one column per size.
fn table(policies: &[PolicyKind], sizes: &[CacheSize], reports: &[SimReport]) -> String {
    let mut out = format!("{:<8}", "policy");
    for size in sizes {
        let _ = write!(out, " {:>10}", size.to_string());
    }
    out.push_str("   (miss ratio)\n");
    for (p, policy) in policies.iter().enumerate() {
        let _ = write!(out, "{:<8}", policy.name());
        for s in 0..sizes.len() {
            let _ = write!(out, " {:>10.4}", reports[p * sizes.len() + s].miss_ratio());
        }
        out.push('\n');
    }
    out
}

/// An SVG line chart of miss ratio against cache size (in blocks).
fn svg(policies: &[PolicyKind], sizes: &[CacheSize], reports: &[SimReport]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 400.0;
    const M: f64 = 60.0;
    const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
    let blocks: Vec<f64> = (0..sizes.len()).map(|s| reports[s].cache_blocks as f64).collect();
    let (x_min, x_max) = blocks.iter().fold((f64::MAX, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
    let x_span = (x_max - x_min).max(1.0);
    let x = |v: f64| M + (v - x_min) / x_span * (W - 2.0 * M);
    let y = |r: f64| H - M - r.clamp(0.0, 1.0) * (H - 2.0 * M);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{M}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{M}\" y1=\"{M}\" x2=\"{M}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{cx}\" y=\"{ty}\" text-anchor=\"middle\">cache size (blocks)</text>\n\
         <text x=\"15\" y=\"{cy}\" transform=\"rotate(-90 15 {cy})\" text-anchor=\"middle\">miss ratio</text>\n",
        b = H - M,
        r = W - M,
        cx = W / 2.0,
        ty = H - 15.0,
        cy = H / 2.0
    );
    for tick in 0..=4 {
        let r = f64::from(tick) / 4.0;
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{r:.2}</text>",
            M - 5.0,
            y(r) + 4.0
        );
    }
    for (s, &b) in blocks.iter().enumerate() {
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{} ({})</text>",
            x(b),
            H - M + 16.0,
            b,
            sizes[s]
        );
    }
    for (p, policy) in policies.iter().enumerate() {
        let color = COLORS[p % COLORS.len()];
        let points: Vec<String> = (0..sizes.len())
            .map(|s| {
                format!("{:.1},{:.1}", x(blocks[s]), y(reports[p * sizes.len() + s].miss_ratio()))
            })
            .collect();
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>",
            W - M - 80.0,
            M + 16.0 * p as f64,
            policy.name()
        );
    }
    out.push_str("</svg>\n");
    out
}
