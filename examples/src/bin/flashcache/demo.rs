//! `flashcache demo`: the guided tour. Two backing files in a temporary
//! directory (loop devices when root), a slow disk (cgroup blkio throttling
//! when root, the fault layer's delay otherwise), a write-back cache, a
//! verified Zipf workload against the raw disk's speed, a restart that keeps
//! every dirty block, cleaning, and everything made removed again, also after
//! Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flashcache_core::cache::Cache;
use flashcache_core::dmio::fault::{FaultRule, OpSet};
use flashcache_core::dmio::loopdev::{LoopDevice, LoopOptions, unavailable_reason};
use flashcache_core::dmio::{AlignedBuf, BlockDevice, DmIoClient, DmIoRegion, DmIoRequest};
use flashcache_core::setup::CreateOptions;

use crate::errors::{Failure, error_line};
use crate::workload::{Pattern, Spec, Versions, drive, verify_all};
use crate::{human, mode_name};

pub(crate) const DEMO_HELP: &str = "\
Example:
  sudo flashcache demo          # loop devices and a cgroup-throttled disk
  flashcache demo --quick       # a shorter run (as the tests do)

As root: two files in a temporary directory become loop devices (direct I/O),
and the disk is slowed with cgroup-v1 blkio throttling (a real slow device).
Otherwise the files are used directly and the disk's slowness is emulated with
the fault layer's delay. Everything it makes is removed at the end, also when
interrupted with Ctrl-C.";

/// Arguments of `demo`.
#[derive(clap::Args, Debug)]
pub(crate) struct DemoArgs {
    /// A shorter run with smaller devices (a few seconds).
    #[arg(long)]
    quick: bool,
    /// Where to make the backing files [default: /var/tmp, else the temp dir].
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Set by Ctrl-C: every phase stops and the demo tidies up.
static STOP: AtomicBool = AtomicBool::new(false);

/// Sizes and durations.
struct Plan {
    ssd_bytes: u64,
    disk_bytes: u64,
    threads: u32,
    raw_seconds: f64,
    run_seconds: f64,
    disk_iops: u32,
}

/// A cgroup-v1 blkio group holding this process, removed on drop.
struct Throttle {
    dir: PathBuf,
}

impl Throttle {
    fn new(major: u32, minor: u32, iops: u32) -> Result<Throttle, String> {
        let root = Path::new("/sys/fs/cgroup/blkio");
        if !root.join("cgroup.procs").exists() {
            return Err("cgroup-v1 blkio is not mounted at /sys/fs/cgroup/blkio".into());
        }
        let dir = root.join(format!("flashcache-demo-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let throttle = Throttle { dir };
        for (file, value) in [
            ("blkio.throttle.read_iops_device", iops.to_string()),
            ("blkio.throttle.write_iops_device", iops.to_string()),
            ("blkio.throttle.read_bps_device", "104857600".to_string()),
            ("blkio.throttle.write_bps_device", "104857600".to_string()),
        ] {
            let path = throttle.dir.join(file);
            std::fs::write(&path, format!("{major}:{minor} {value}"))
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        let procs = throttle.dir.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .map_err(|e| format!("joining {}: {e}", procs.display()))?;
        Ok(throttle)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        // Back to the root group, then the group can go.
        let _ = std::fs::write("/sys/fs/cgroup/blkio/cgroup.procs", std::process::id().to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The devices of the demo; dropping it detaches the loop devices before the
/// temporary directory (and its files) goes.
struct Devices {
    ssd: Arc<BlockDevice>,
    disk: Arc<BlockDevice>,
    _throttle: Option<Throttle>,
    _loops: Vec<LoopDevice>,
    _dir: tempfile::TempDir,
}

fn make_devices(args: &DemoArgs, plan: &Plan) -> Result<(Devices, String), Failure> {
    let parent = match &args.dir {
        Some(d) => d.clone(),
        None if Path::new("/var/tmp").is_dir() => PathBuf::from("/var/tmp"),
        None => std::env::temp_dir(),
    };
    let dir = tempfile::Builder::new()
        .prefix("flashcache-demo-")
        .tempdir_in(&parent)
        .map_err(|e| format!("making a temporary directory in {}: {e}", parent.display()))?;
    let (ssd_file, disk_file) = (dir.path().join("ssd.img"), dir.path().join("disk.img"));
    for (path, size) in [(&ssd_file, plan.ssd_bytes), (&disk_file, plan.disk_bytes)] {
        std::fs::File::create(path)
            .and_then(|f| f.set_len(size))
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
    }
    println!("  backing files in {}", dir.path().display());
    if let Some(reason) = unavailable_reason() {
        let ssd = BlockDevice::open(&ssd_file).map_err(|e| error_line(&e))?;
        let disk = BlockDevice::open(&disk_file).map_err(|e| error_line(&e))?;
        let delay = emulated_delay(plan);
        disk.faults().add(FaultRule::delay(OpSet::READ | OpSet::WRITE, delay));
        let how = format!(
            "regular files ({reason}); the disk's slowness is EMULATED: {} us added to each I/O",
            delay.as_micros()
        );
        return Ok((Devices { ssd, disk, _throttle: None, _loops: Vec::new(), _dir: dir }, how));
    }
    let attach = |path: &Path| {
        LoopDevice::attach(path, LoopOptions::new().direct_io(true)).map_err(|e| error_line(&e))
    };
    let ssd_loop = attach(&ssd_file)?;
    let disk_loop = attach(&disk_file)?;
    let ssd = BlockDevice::open(ssd_loop.path()).map_err(|e| error_line(&e))?;
    let disk = BlockDevice::open(disk_loop.path()).map_err(|e| error_line(&e))?;
    let mut how = format!(
        "loop devices {} (SSD) and {} (disk)",
        ssd_loop.path().display(),
        disk_loop.path().display()
    );
    let throttle = match disk_loop.major_minor() {
        Some((major, minor)) => match Throttle::new(major, minor, plan.disk_iops) {
            Ok(t) => {
                how.push_str(&format!(
                    "; the disk is throttled to {} IOPS with cgroup blkio (a real slow device)",
                    plan.disk_iops
                ));
                Some(t)
            }
            Err(reason) => {
                let delay = emulated_delay(plan);
                disk.faults().add(FaultRule::delay(OpSet::READ | OpSet::WRITE, delay));
                how.push_str(&format!(
                    "; no throttling ({reason}), the disk's slowness is EMULATED"
                ));
                None
            }
        },
        None => None,
    };
    // Fields drop in order: devices, throttle, loops, directory.
    Ok((
        Devices { ssd, disk, _throttle: throttle, _loops: vec![ssd_loop, disk_loop], _dir: dir },
        how,
    ))
}

/// The delay per I/O that limits `threads` synchronous I/Os at a time to the
/// plan's disk IOPS.
fn emulated_delay(plan: &Plan) -> Duration {
    Duration::from_micros(1_000_000 * u64::from(plan.threads) / u64::from(plan.disk_iops.max(1)))
}

/// After Ctrl-C with a cache open: shut it down fast (no cleaning), so the
/// tidying up is not held up by a slow disk.
fn interrupted(cache: &Cache) -> Result<(), Failure> {
    if STOP.load(Ordering::Relaxed) {
        cache.stop_cleaning();
        let _ = cache.set_tunable("fast_remove", 1);
    }
    stopped()
}

fn stopped() -> Result<(), Failure> {
    if STOP.load(Ordering::Relaxed) {
        Err("interrupted; everything made was removed".into())
    } else {
        Ok(())
    }
}

/// Random 4 KiB reads straight from the disk with `threads` threads.
fn raw_disk_iops(disk: &Arc<BlockDevice>, threads: u32, seconds: f64) -> Result<f64, Failure> {
    let dmio = DmIoClient::new().map_err(|e| error_line(&e))?;
    let blocks = disk.size_bytes() / 4096;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let total = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (dmio, total) = (&dmio, &total);
            s.spawn(move || {
                let mut rng = flashcache_core::sim::SplitMix64::new(0xd15c ^ u64::from(t));
                while Instant::now() < deadline && !STOP.load(Ordering::Relaxed) {
                    let sector = rng.below(blocks) * 8;
                    let req = DmIoRequest::read(AlignedBuf::new(4096));
                    if dmio.io_sync(req, &[DmIoRegion::new(disk, sector, 8)]).is_err() {
                        break;
                    }
                    total.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    Ok(total.into_inner() as f64 / started.elapsed().as_secs_f64())
}

pub(crate) fn run(args: &DemoArgs) -> Result<(), Failure> {
    let _ = ctrlc::set_handler(|| STOP.store(true, Ordering::Relaxed));
    let plan = if args.quick {
        Plan {
            ssd_bytes: 16 << 20,
            disk_bytes: 64 << 20,
            threads: 4,
            raw_seconds: 1.0,
            run_seconds: 2.0,
            disk_iops: 2000,
        }
    } else {
        Plan {
            ssd_bytes: 64 << 20,
            disk_bytes: 256 << 20,
            threads: 8,
            raw_seconds: 3.0,
            run_seconds: 15.0,
            disk_iops: 1000,
        }
    };
    let started = Instant::now();
    println!("flashcache demo: an SSD cache in front of a slow disk");
    let (devices, how) = make_devices(args, &plan)?;
    println!("  devices: {how}");
    let result = tour(&devices, &plan);
    drop(devices);
    println!(
        "  tidied up: devices detached, files removed ({:.0} s in all)",
        started.elapsed().as_secs_f64()
    );
    result
}

fn tour(devices: &Devices, plan: &Plan) -> Result<(), Failure> {
    let raw = raw_disk_iops(&devices.disk, plan.threads, plan.raw_seconds)?;
    stopped()?;
    println!(
        "1. the raw disk: {raw:.0} IOPS of random 4 KiB reads with {} threads ({} of data)",
        plan.threads,
        human(devices.disk.size_bytes())
    );
    let options = CreateOptions { assoc: 512, ..CreateOptions::default() };
    let cache = Cache::create(devices.ssd.clone(), devices.disk.clone(), &options)
        .map_err(|e| error_line(&e))?;
    let geometry = cache.geometry();
    println!(
        "2. created a {} cache of {} ({} blocks of 4 KiB, {} sets of {}, policy SIEVE)",
        mode_name(cache.mode(), false),
        human(geometry.cache_blocks() * 4096),
        geometry.cache_blocks(),
        geometry.num_sets(),
        geometry.assoc()
    );
    let versions = Versions::new(devices.disk.size_bytes(), 4096);
    let spec = Spec {
        pattern: Pattern::Zipf(0.9),
        read_pct: 70,
        bs: 4096,
        threads: plan.threads,
        runtime: Duration::from_secs_f64(plan.run_seconds),
        verify: true,
        seed: 0xde70,
    };
    println!("3. a Zipf(0.9) workload, 70 % reads, every read of written data verified:");
    let summary = drive(&cache, &versions, &spec, &STOP, true);
    interrupted(&cache)?;
    let summary = summary?;
    println!(
        "   {} I/Os in {:.1} s: {:.0} IOPS ({:.1}x the raw disk), read hit ratio {:.1} %, {} reads verified",
        summary.ops,
        summary.seconds,
        summary.iops(),
        summary.iops() / raw.max(1.0),
        100.0 * summary.hit_ratio,
        summary.verified
    );
    cache.set_tunable("fast_remove", 1).map_err(|e| error_line(&e))?;
    cache.shutdown().map_err(|e| error_line(&e))?;
    println!("4. shut down without cleaning: the dirty blocks stay on the SSD");
    let (cache, report) =
        Cache::load(devices.ssd.clone(), devices.disk.clone()).map_err(|e| error_line(&e))?;
    println!(
        "   reloaded: {} dirty and {} clean blocks back (a warm restart)",
        report.recovered.dirty, report.recovered.clean
    );
    let checked = verify_all(&cache, &versions, &STOP);
    interrupted(&cache)?;
    let checked = checked?;
    println!("   verified all {checked} blocks the workload wrote");
    let bar = crate::progress_bar(cache.dirty_blocks(), "cleaning");
    // Ctrl-C stops the cleaning too.
    let cleaning_done = AtomicBool::new(false);
    let cleaned = std::thread::scope(|s| {
        s.spawn(|| {
            while !cleaning_done.load(Ordering::Relaxed) {
                if STOP.load(Ordering::Relaxed) {
                    cache.stop_cleaning();
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let result = cache.clean_all();
        cleaning_done.store(true, Ordering::Relaxed);
        result
    });
    bar.finish_and_clear();
    interrupted(&cache)?;
    let cleaned = cleaned.map_err(|e| error_line(&e))?;
    println!(
        "5. cleaned {} blocks to the disk (merged into larger writes in disk order)",
        cleaned.cleaned
    );
    let stats = cache.stats();
    cache.shutdown().map_err(|e| error_line(&e))?;
    println!(
        "   counters: reads={} read_hits={} writes={} write_hits={} cleanings={} back_merge={}",
        stats.reads,
        stats.read_hits,
        stats.writes,
        stats.write_hits,
        stats.cleanings,
        stats.back_merge
    );
    // The disk itself now holds every write.
    verify_disk(&devices.disk, &versions)?;
    println!("   the disk alone (no cache) holds every block the workload wrote");
    Ok(())
}

/// Checks the disk directly, without the cache, after cleaning.
fn verify_disk(disk: &Arc<BlockDevice>, versions: &Versions) -> Result<(), Failure> {
    let dmio = DmIoClient::new().map_err(|e| error_line(&e))?;
    crate::workload::verify_raw(&dmio, disk, versions, &STOP).map(drop)
}
