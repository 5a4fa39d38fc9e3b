//! flashcache: create, load, inspect, drive and remove a flashcache-core cache
//! (flashcache's `flashcache_create / load / destroy / setioctl` and its /proc
//! statistics, as one tool), plus the one-command demo.
//!
//! Every command that opens the cache (stats, write, read, run) loads it and
//! shuts it down again keeping dirty blocks (a fast shutdown): write-back data
//! stays on the SSD between commands until `sync` cleans it.
//!
//! On any failure it exits with status 1 and one line `flashcache: <reason>`
//! on stderr (clap's usage errors exit with status 2).

#[path = "../../shared/errors.rs"]
mod errors;

mod demo;
mod simulate;
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use errors::{Failure, error_line};
use flashcache_core::cache::{Cache, IoFlags};
use flashcache_core::dmio::{BlockDevice, DmIoClient, SECTOR_SIZE};
use flashcache_core::format::{CacheMode, CommitMode, SbState, SlotState, Superblock};
use flashcache_core::policy::PolicyKind;
use flashcache_core::setup::{self, CreateOptions};
use serde_json::json;

const EXAMPLES: &str = "\
Examples:
  A write-back cache on a RAM-backed loop device in front of a disk:
    flashcache create --mode back /dev/loop0 /dev/sdb
  Write a file through the cache at byte 1 MiB, read it back, compare:
    flashcache write /dev/loop0 /dev/sdb --offset 1m --input data.bin
    flashcache read /dev/loop0 /dev/sdb --offset 1m --length 64k --output back.bin
  What the cache holds, and its counters:
    flashcache status /dev/loop0
    flashcache stats /dev/loop0 /dev/sdb --json
  A verified Zipf workload for 10 seconds at 16 threads:
    flashcache run /dev/loop0 /dev/sdb --workload zipf --iodepth 16 --runtime 10 --verify
  Clean every dirty block, then remove the cache:
    flashcache sync /dev/loop0 /dev/sdb && flashcache destroy /dev/loop0
  Hit ratios of every policy on a trace, with a chart:
    flashcache simulate --trace hm_0.csv --plot miss.svg
  The guided tour on temporary loop devices (or files when not root):
    flashcache demo

SSD and DISK are block devices or regular files. Sizes take k, m, g and t suffixes
(powers of 1024). Exit status: 0 on success, 1 on failure (one line on stderr),
2 on bad usage.";

/// Command-line arguments.
#[derive(Parser, Debug)]
#[command(
    name = "flashcache",
    version,
    about = "Create, inspect, drive and remove a flashcache-core SSD cache",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a new, empty cache on SSD for DISK.
    #[command(
        after_help = "Example:\n  flashcache create --mode back --assoc 512 --policy sieve /dev/loop0 /dev/sdb"
    )]
    Create(CreateArgs),
    /// Describe the cache on SSD: mode, geometry, policy, state, block counts, disk.
    #[command(after_help = "Example:\n  flashcache status /dev/loop0")]
    Status {
        /// The cache device.
        ssd: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the cache's counters as key=value lines (flashcache's names).
    #[command(after_help = "Example:\n  flashcache stats /dev/loop0 /dev/sdb --json")]
    Stats {
        /// The cache device.
        ssd: PathBuf,
        /// The cached disk.
        disk: PathBuf,
        /// One JSON object instead of key=value lines.
        #[arg(long)]
        json: bool,
    },
    /// Write a file through the cache at a byte offset.
    #[command(
        after_help = "Example:\n  flashcache write /dev/loop0 /dev/sdb --offset 4096 --input data.bin"
    )]
    Write {
        /// The cache device.
        ssd: PathBuf,
        /// The cached disk.
        disk: PathBuf,
        /// Where to write, in bytes (a multiple of 512, or 4096 on 4 KiB-sector devices).
        #[arg(long, value_parser = parse_size)]
        offset: u64,
        /// The file to write.
        #[arg(long)]
        input: PathBuf,
    },
    /// Read a byte range through the cache into a file.
    #[command(
        after_help = "Example:\n  flashcache read /dev/loop0 /dev/sdb --offset 0 --length 1m --output out.bin"
    )]
    Read {
        /// The cache device.
        ssd: PathBuf,
        /// The cached disk.
        disk: PathBuf,
        /// Where to start, in bytes.
        #[arg(long, value_parser = parse_size)]
        offset: u64,
        /// How many bytes.
        #[arg(long, value_parser = parse_size)]
        length: u64,
        /// The file to write them to.
        #[arg(long)]
        output: PathBuf,
    },
    /// Clean every dirty block to the disk, then shut the cache down cleanly.
    #[command(after_help = "Example:\n  flashcache sync /dev/loop0 /dev/sdb")]
    Sync {
        /// The cache device.
        ssd: PathBuf,
        /// The cached disk.
        disk: PathBuf,
    },
    /// Remove the cache from SSD (refused while it may hold dirty blocks).
    #[command(after_help = "Example:\n  flashcache destroy /dev/loop0")]
    Destroy {
        /// Remove it even if it holds dirty blocks (their data is lost).
        #[arg(long)]
        force: bool,
        /// The cache device.
        ssd: PathBuf,
    },
    /// Drive a workload through the cache with a live progress line.
    #[command(after_help = workload::RUN_HELP)]
    Run(workload::RunArgs),
    /// Hit ratios of the replacement policies on a trace, without any I/O.
    #[command(after_help = simulate::SIMULATE_HELP)]
    Simulate(simulate::SimulateArgs),
    /// The guided tour: a cache on temporary devices, a verified workload, a
    /// restart, cleaning, and everything tidied up. Under a minute.
    #[command(after_help = demo::DEMO_HELP)]
    Demo(demo::DemoArgs),
}

#[derive(clap::Args, Debug)]
struct CreateArgs {
    /// Cache mode: back (write-back), thru (write-through), around (write-around).
    #[arg(long, value_parser = parse_mode)]
    mode: CacheMode,
    /// Write-back without filling read misses.
    #[arg(long)]
    write_only: bool,
    /// Cache block size (a power of two, at least 4k).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    block_size: u64,
    /// Blocks per set (a power of two).
    #[arg(long, default_value_t = 512)]
    assoc: u32,
    /// Use this much of the SSD [default: all of it].
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Replacement policy: fifo, lru, slru (flashcache's LRU) or sieve.
    #[arg(long, default_value = "sieve", value_parser = parse_policy)]
    policy: PolicyKind,
    /// Metadata commits: on-flush (grouped, at flushes) or sync (flashcache's).
    #[arg(long, default_value = "on-flush", value_parser = parse_commit)]
    commit: CommitMode,
    /// Overwrite an existing cache on SSD.
    #[arg(long)]
    force: bool,
    /// The cache device.
    ssd: PathBuf,
    /// The disk to cache.
    disk: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("flashcache: {reason}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Create(args) => create(&args),
        Command::Status { ssd, json } => status(&ssd, json),
        Command::Stats { ssd, disk, json } => stats(&ssd, &disk, json),
        Command::Write { ssd, disk, offset, input } => write(&ssd, &disk, offset, &input),
        Command::Read { ssd, disk, offset, length, output } => {
            read(&ssd, &disk, offset, length, &output)
        }
        Command::Sync { ssd, disk } => sync(&ssd, &disk),
        Command::Destroy { force, ssd } => destroy(&ssd, force),
        Command::Run(args) => workload::run_command(&args),
        Command::Simulate(args) => simulate::run(&args),
        Command::Demo(args) => demo::run(&args),
    }
}

/// Parses `4096`, `4k`, `1m`, `2g`, `1t` (powers of 1024).
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let (digits, shift) = match t.strip_suffix(['k', 'm', 'g', 't']) {
        Some(d) => (
            d,
            match t.as_bytes()[t.len() - 1] {
                b'k' => 10,
                b'm' => 20,
                b'g' => 30,
                _ => 40,
            },
        ),
        None => (t.strip_suffix('b').unwrap_or(&t), 0),
    };
    let n: u64 =
        digits.trim().parse().map_err(|_| format!("{text:?} is not a size like 4096, 4k or 1g"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

fn parse_mode(text: &str) -> Result<CacheMode, String> {
    match text {
        "back" | "writeback" => Ok(CacheMode::WriteBack),
        "thru" | "through" | "writethrough" => Ok(CacheMode::WriteThrough),
        "around" | "writearound" => Ok(CacheMode::WriteAround),
        _ => Err(format!("{text:?} is not a mode: back, thru or around")),
    }
}

fn parse_policy(text: &str) -> Result<PolicyKind, String> {
    PolicyKind::from_name(text).ok_or_else(|| {
        let names: Vec<&str> = PolicyKind::ALL.iter().map(|p| p.name()).collect();
        format!("{text:?} is not a policy: {}", names.join(", "))
    })
}

fn parse_commit(text: &str) -> Result<CommitMode, String> {
    match text {
        "on-flush" | "onflush" => Ok(CommitMode::OnFlush),
        "sync" => Ok(CommitMode::Sync),
        _ => Err(format!("{text:?} is not a commit mode: on-flush or sync")),
    }
}

pub(crate) fn mode_name(mode: CacheMode, write_only: bool) -> &'static str {
    match (mode, write_only) {
        (CacheMode::WriteBack, true) => "write-back, write-only",
        (CacheMode::WriteBack, false) => "write-back",
        (CacheMode::WriteThrough, _) => "write-through",
        (CacheMode::WriteAround, _) => "write-around",
    }
}

/// Opens a device, with the error naming it.
pub(crate) fn open(path: &Path) -> Result<Arc<BlockDevice>, Failure> {
    BlockDevice::open(path).map_err(|e| error_line(&e))
}

/// Opens SSD and DISK, refusing the same device twice.
pub(crate) fn open_pair(
    ssd: &Path,
    disk: &Path,
) -> Result<(Arc<BlockDevice>, Arc<BlockDevice>), Failure> {
    let s = open(ssd)?;
    let d = open(disk)?;
    if s.is_same_device(&d) {
        return Err(format!("{} is given as both the SSD and the disk", ssd.display()));
    }
    Ok((s, d))
}

/// Loads the cache on SSD for DISK.
pub(crate) fn load(ssd: &Path, disk: &Path) -> Result<Cache, Failure> {
    let (s, d) = open_pair(ssd, disk)?;
    let (cache, _) = Cache::load(s, d).map_err(|e| error_line(&e))?;
    Ok(cache)
}

/// Shuts a cache down keeping its dirty blocks (they stay on the SSD).
pub(crate) fn close_keeping_dirty(cache: Cache) -> Result<(), Failure> {
    cache.set_tunable("fast_remove", 1).map_err(|e| error_line(&e))?;
    cache.shutdown().map_err(|e| error_line(&e))
}

fn create(args: &CreateArgs) -> Result<(), Failure> {
    if !args.block_size.is_power_of_two() || args.block_size < 4096 {
        return Err(format!(
            "block size {} is not a power of two of at least 4096",
            args.block_size
        ));
    }
    if !args.assoc.is_power_of_two() {
        return Err(format!("associativity {} is not a power of two", args.assoc));
    }
    let (ssd, disk) = open_pair(&args.ssd, &args.disk)?;
    if let Some(size) = args.size
        && size > ssd.size_bytes()
    {
        return Err(format!(
            "{}: a cache of {size} bytes was asked for, the SSD has {}",
            args.ssd.display(),
            ssd.size_bytes()
        ));
    }
    let options = CreateOptions {
        mode: args.mode,
        write_only: args.write_only,
        commit: args.commit,
        block_bytes: args.block_size,
        assoc: args.assoc,
        size_bytes: args.size,
        policy: args.policy,
        force: args.force,
        ..CreateOptions::default()
    };
    let cache = Cache::create(ssd, disk, &options).map_err(|e| error_line(&e))?;
    let sb = cache.superblock();
    let layout = sb.layout().map_err(|e| error_line(&e))?;
    let (index, per_block) = cache.index_bytes();
    println!(
        "created a {} cache of {} blocks of {} KiB ({}) in {} sets of {} on {} for {}",
        mode_name(sb.mode, sb.write_only),
        layout.num_blocks(),
        layout.block_bytes() / 1024,
        human(layout.num_blocks() * layout.block_bytes()),
        layout.num_sets(),
        layout.assoc(),
        args.ssd.display(),
        args.disk.display()
    );
    println!(
        "note: loading this cache takes {} of RAM for its index ({per_block:.1} bytes per block)",
        human(index)
    );
    cache.shutdown().map_err(|e| error_line(&e))
}

/// Bytes in words.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

/// Valid and dirty slots as recorded on the SSD.
fn count_slots(
    dmio: &DmIoClient,
    ssd: &Arc<BlockDevice>,
    sb: &Superblock,
) -> Result<(u64, u64), Failure> {
    let layout = sb.layout().map_err(|e| error_line(&e))?;
    let per_set = u64::from(layout.md_blocks_per_set()) * u64::from(layout.md_block_bytes());
    let (mut valid, mut dirty) = (0, 0);
    for set in 0..layout.num_sets() {
        let offset = layout.set_md_offset(set).unwrap_or(0);
        let req = flashcache_core::dmio::DmIoRequest::read(flashcache_core::dmio::AlignedBuf::new(
            per_set as usize,
        ));
        let region = flashcache_core::dmio::DmIoRegion::new(
            ssd,
            offset / SECTOR_SIZE,
            per_set / SECTOR_SIZE,
        );
        let bytes = dmio
            .io_sync(req, &[region])
            .and_then(|done| done.into_result())
            .map_err(|e| {
                format!("reading the metadata of {}: {}", ssd.path().display(), error_line(&e))
            })?
            .map(|m| m.to_vec())
            .unwrap_or_default();
        for m in 0..layout.md_blocks_per_set() {
            let md_block = u64::from(set) * u64::from(layout.md_blocks_per_set()) + u64::from(m);
            let at = (m * layout.md_block_bytes()) as usize;
            let chunk = &bytes[at..at + layout.md_block_bytes() as usize];
            let decoded = layout.decode_md_block(md_block, chunk).map_err(|e| error_line(&e))?;
            for (_, record) in decoded.records() {
                match record.state {
                    SlotState::Valid => valid += 1,
                    SlotState::Dirty => dirty += 1,
                    SlotState::Invalid => {}
                }
            }
        }
    }
    Ok((valid + dirty, dirty))
}

fn state_words(state: SbState) -> &'static str {
    match state {
        SbState::Clean => "clean (orderly shutdown, no dirty blocks)",
        SbState::FastClean => "dirty (orderly shutdown keeping dirty blocks)",
        SbState::Loaded => "in use, or crashed (dirty blocks are recovered at the next load)",
        SbState::Unstable => "unstable (a metadata write failed at shutdown)",
    }
}

fn status(ssd_path: &Path, json_out: bool) -> Result<(), Failure> {
    let ssd = open(ssd_path)?;
    let dmio = DmIoClient::new().map_err(|e| error_line(&e))?;
    let sb = setup::read_superblock(&dmio, &ssd).map_err(|e| error_line(&e))?;
    let layout = sb.layout().map_err(|e| error_line(&e))?;
    let (cached, dirty) = count_slots(&dmio, &ssd, &sb)?;
    let policy = flashcache_core::cache::policy_from_id(sb.policy).name();
    let commit = match sb.commit {
        CommitMode::OnFlush => "on-flush",
        CommitMode::Sync => "sync",
    };
    let index = Cache::index_bytes_for(&layout);
    if json_out {
        let out = json!({
            "ssd": ssd_path.display().to_string(),
            "disk": sb.disk_identity.as_str(),
            "disk_sectors": sb.disk_sectors,
            "mode": mode_name(sb.mode, sb.write_only),
            "commit": commit,
            "block_bytes": layout.block_bytes(),
            "assoc": layout.assoc(),
            "sets": layout.num_sets(),
            "blocks": layout.num_blocks(),
            "disk_assoc_blocks": sb.disk_assoc_blocks,
            "policy": policy,
            "state": format!("{:?}", sb.state),
            "cached_blocks": cached,
            "dirty_blocks": dirty,
            "generation": sb.generation,
            "index_bytes": index,
        });
        println!("{out}");
        return Ok(());
    }
    println!("cache on {}", ssd_path.display());
    println!("  disk:      {} ({} sectors)", sb.disk_identity.as_str(), sb.disk_sectors);
    println!("  mode:      {}, metadata commits {commit}", mode_name(sb.mode, sb.write_only));
    println!(
        "  geometry:  {} blocks of {} KiB ({}) in {} sets of {}, disk runs of {} blocks per set",
        layout.num_blocks(),
        layout.block_bytes() / 1024,
        human(layout.num_blocks() * layout.block_bytes()),
        layout.num_sets(),
        layout.assoc(),
        sb.disk_assoc_blocks
    );
    println!("  policy:    {policy}");
    println!("  state:     {}", state_words(sb.state));
    let note = if sb.state == SbState::Loaded { " (as last committed)" } else { "" };
    println!("  blocks:    {cached} cached, {dirty} dirty{note}");
    println!("  index RAM: {} when loaded", human(index));
    Ok(())
}

fn stats(ssd: &Path, disk: &Path, json_out: bool) -> Result<(), Failure> {
    let cache = load(ssd, disk)?;
    let stats = cache.stats();
    let (cached, dirty) = (cache.cached_blocks(), cache.dirty_blocks());
    close_keeping_dirty(cache)?;
    if json_out {
        let mut map = serde_json::Map::new();
        for (k, v) in stats.fields() {
            map.insert(k.to_string(), json!(v));
        }
        map.insert("cached_blocks".into(), json!(cached));
        map.insert("dirty_blocks".into(), json!(dirty));
        println!("{}", serde_json::Value::Object(map));
    } else {
        print!("{}", stats.to_key_value_lines());
        println!("cached_blocks={cached}\ndirty_blocks={dirty}");
    }
    Ok(())
}

fn write(ssd: &Path, disk: &Path, offset: u64, input: &Path) -> Result<(), Failure> {
    let data = std::fs::read(input).map_err(|e| format!("reading {}: {e}", input.display()))?;
    let cache = load(ssd, disk)?;
    let result = write_bytes(&cache, disk, offset, &data);
    let closed = close_keeping_dirty(cache);
    result?;
    closed?;
    println!("wrote {} bytes at offset {offset}", data.len());
    Ok(())
}

/// Writes `data` at byte `offset`, filling a partial last unit from what is
/// there now.
fn write_bytes(cache: &Cache, disk: &Path, offset: u64, data: &[u8]) -> Result<(), Failure> {
    let align = cache.io_alignment();
    if !offset.is_multiple_of(align) {
        return Err(format!("offset {offset} is not a multiple of {align} bytes"));
    }
    if data.is_empty() {
        return Ok(());
    }
    let end = offset.checked_add(data.len() as u64).ok_or("offset + length overflows")?;
    let disk_bytes = cache.superblock().disk_sectors * SECTOR_SIZE;
    if end > disk_bytes {
        return Err(format!(
            "{}: writing up to byte {end} goes past its end ({disk_bytes} bytes)",
            disk.display()
        ));
    }
    let padded = (data.len() as u64).div_ceil(align) * align;
    let mut buf = vec![0u8; padded as usize];
    if padded != data.len() as u64 {
        let tail = offset + padded - align;
        cache
            .read(tail / SECTOR_SIZE, &mut buf[(padded - align) as usize..])
            .map_err(|e| error_line(&e))?;
    }
    buf[..data.len()].copy_from_slice(data);
    cache.write_with(offset / SECTOR_SIZE, &buf, IoFlags::empty()).map_err(|e| error_line(&e))?;
    cache.flush().map_err(|e| error_line(&e))
}

fn read(ssd: &Path, disk: &Path, offset: u64, length: u64, output: &Path) -> Result<(), Failure> {
    let cache = load(ssd, disk)?;
    let result = read_bytes(&cache, disk, offset, length);
    let closed = close_keeping_dirty(cache);
    let bytes = result?;
    closed?;
    std::fs::write(output, &bytes).map_err(|e| format!("writing {}: {e}", output.display()))?;
    println!("read {length} bytes at offset {offset} into {}", output.display());
    Ok(())
}

/// Reads `length` bytes at byte `offset` (any offset: the aligned range around
/// it is read).
fn read_bytes(cache: &Cache, disk: &Path, offset: u64, length: u64) -> Result<Vec<u8>, Failure> {
    let end = offset.checked_add(length).ok_or("offset + length overflows")?;
    let disk_bytes = cache.superblock().disk_sectors * SECTOR_SIZE;
    if end > disk_bytes {
        return Err(format!(
            "{}: reading up to byte {end} goes past its end ({disk_bytes} bytes)",
            disk.display()
        ));
    }
    if length == 0 {
        return Ok(Vec::new());
    }
    let align = cache.io_alignment();
    let start = offset / align * align;
    let stop = end.div_ceil(align) * align;
    let mut buf = vec![0u8; (stop - start) as usize];
    // In pieces of at most 8 MiB, so a large read needs no large buffer twice.
    for (i, chunk) in buf.chunks_mut(8 << 20).enumerate() {
        let at = start + i as u64 * (8 << 20);
        cache.read(at / SECTOR_SIZE, chunk).map_err(|e| error_line(&e))?;
    }
    Ok(buf[(offset - start) as usize..(end - start) as usize].to_vec())
}

fn sync(ssd: &Path, disk: &Path) -> Result<(), Failure> {
    let cache = load(ssd, disk)?;
    let dirty = cache.dirty_blocks();
    let bar = progress_bar(dirty, "cleaning");
    let done = std::sync::atomic::AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                bar.set_position(dirty.saturating_sub(cache.dirty_blocks()));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let r = cache.clean_all();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    });
    bar.finish_and_clear();
    let report = result.map_err(|e| error_line(&e))?;
    cache.shutdown().map_err(|e| error_line(&e))?;
    println!("cleaned {} blocks; the cache is clean", report.cleaned);
    Ok(())
}

/// A progress bar on a terminal, hidden otherwise.
pub(crate) fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} blocks")
    {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

fn destroy(ssd_path: &Path, force: bool) -> Result<(), Failure> {
    let ssd = open(ssd_path)?;
    let dmio = DmIoClient::new().map_err(|e| error_line(&e))?;
    setup::destroy(&dmio, &ssd, force).map_err(|e| error_line(&e))?;
    println!("removed the cache from {}", ssd_path.display());
    Ok(())
}
