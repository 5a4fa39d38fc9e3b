//! Power loss: a write-back workload with flushes, FUA writes, reads (fills and
//! evictions) and cleaning runs with the dmio write log on both devices; then,
//! for every flush boundary and a sample of points between them, both device
//! images are rebuilt as a power loss would leave them (only durable writes,
//! or durable writes plus a random subset of the rest), the cache is loaded
//! from them, and every sector read through it is checked:
//!
//! - it holds a version some write put there (never bytes of another sector or
//!   block: every sector's pattern encodes its sector number and the write);
//! - never older than the newest write acknowledged before the last completed
//!   flush (or FUA write) covering it;
//! - loading never fails (no torn or dangling metadata).
//!
//! Also: a corrupted superblock and a torn metadata slot are refused at load.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use dmio::BlockDevice;
use dmio::fault::{Replay, WriteLog};
use flashcache_core::cache::{Cache, CacheError, IoFlags};
use flashcache_core::format::{CacheMode, CommitMode};
use flashcache_core::setup::{CreateOptions, SetupError};
use tests::{Backing, Rng, TestDevice, sector_pattern};

const MIB: u64 = 1 << 20;
const DISK_BYTES: u64 = 2 * MIB;
const DISK_SECTORS: u64 = DISK_BYTES / 512;
const SSD_BYTES: u64 = MIB / 2 + 64 * 1024;

fn options(commit: CommitMode) -> CreateOptions {
    CreateOptions {
        mode: CacheMode::WriteBack,
        commit,
        assoc: 64,
        disk_assoc_blocks: 4,
        ..CreateOptions::default()
    }
}

/// One write of the workload: `seed` is its tag (its index + 1; 0 is the
/// disk's initial content).
#[derive(Clone, Copy, Debug)]
struct Write {
    sector: u64,
    sectors: u64,
    seed: u64,
    fua: bool,
}

/// What the workload did, and the log positions after each step.
struct Record {
    writes: Vec<Write>,
    /// After each step: (writes issued so far, last completed flush as a count
    /// of writes before it, SSD log length, disk log length).
    points: Vec<Point>,
}

#[derive(Clone, Copy, Debug)]
struct Point {
    writes_done: usize,
    flushed_writes: usize,
    ssd_log: usize,
    disk_log: usize,
    is_flush: bool,
}

fn pattern(sector: u64, sectors: u64, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((sectors * 512) as usize);
    for s in sector..sector + sectors {
        out.extend_from_slice(&sector_pattern(s, seed));
    }
    out
}

fn run_workload(
    cache: &Cache,
    ssd: &BlockDevice,
    disk: &BlockDevice,
    steps: usize,
    seed: u64,
) -> Record {
    let mut rng = Rng(seed);
    let mut record = Record { writes: Vec::new(), points: Vec::new() };
    let mut flushed_writes = 0;
    for _ in 0..steps {
        let roll = rng.below(100);
        let mut is_flush = false;
        if roll < 60 {
            // Whole blocks, a few blocks, or a partial block.
            let (sector, sectors) = match rng.below(3) {
                0 => (rng.below(DISK_SECTORS / 8) * 8, 8),
                1 => {
                    let n = 1 + rng.below(4);
                    (rng.below(DISK_SECTORS / 8 - n) * 8, n * 8)
                }
                _ => (rng.below(DISK_SECTORS - 3), 1 + rng.below(3)),
            };
            let fua = rng.below(12) == 0;
            let tag = record.writes.len() as u64 + 1;
            let flags = if fua { IoFlags::FUA } else { IoFlags::empty() };
            cache.write_with(sector, &pattern(sector, sectors, tag), flags).unwrap();
            record.writes.push(Write { sector, sectors, seed: tag, fua });
        } else if roll < 85 {
            let sector = rng.below(DISK_SECTORS / 8) * 8;
            let mut buf = vec![0u8; 4096];
            cache.read(sector, &mut buf).unwrap();
        } else if roll < 95 {
            cache.flush().unwrap();
            flushed_writes = record.writes.len();
            is_flush = true;
        } else {
            cache.clean_all().unwrap();
        }
        // The SSD's log first: whatever it holds had its disk prerequisites
        // (flushes of cleaned data) complete earlier, so they are in the disk's.
        let ssd_log = ssd.faults().write_log().len();
        let disk_log = disk.faults().write_log().len();
        record.points.push(Point {
            writes_done: record.writes.len(),
            flushed_writes,
            ssd_log,
            disk_log,
            is_flush,
        });
    }
    record
}

/// For each sector, the tags it may hold after a crash at `point`.
fn allowed(record: &Record, point: &Point) -> HashMap<u64, Vec<u64>> {
    // Per sector: (floor tag, later tags).
    let mut floor: HashMap<u64, u64> = HashMap::new();
    let mut later: HashMap<u64, Vec<u64>> = HashMap::new();
    for (i, w) in record.writes[..point.writes_done].iter().enumerate() {
        let durable = i < point.flushed_writes || w.fua;
        for s in w.sector..w.sector + w.sectors {
            if durable {
                floor.insert(s, w.seed);
                // Anything before a durable version is no longer allowed.
                later.remove(&s);
            } else {
                later.entry(s).or_default().push(w.seed);
            }
        }
    }
    let mut out: HashMap<u64, Vec<u64>> = HashMap::new();
    for s in 0..DISK_SECTORS {
        let mut tags = vec![floor.get(&s).copied().unwrap_or(0)];
        tags.extend(later.get(&s).into_iter().flatten().copied());
        out.insert(s, tags);
    }
    out
}

fn write_image(path: &Path, bytes: &[u8]) -> Arc<BlockDevice> {
    std::fs::write(path, bytes).unwrap();
    BlockDevice::open(path).unwrap()
}

#[allow(clippy::too_many_arguments)]
fn check_point(
    label: &str,
    dir: &Path,
    record: &Record,
    point: &Point,
    logs: (&WriteLog, &WriteLog),
    bases: (&[u8], &[u8]),
    mode: Replay,
) {
    let ssd_img = logs.0.image_at(point.ssd_log, bases.0, mode);
    let disk_img = logs.1.image_at(point.disk_log, bases.1, mode);
    let ssd = write_image(&dir.join("ssd.img"), &ssd_img);
    let disk = write_image(&dir.join("disk.img"), &disk_img);
    // The identity recorded is the original disk's path: load against a
    // device that claims it by opening the crashed image under that name.
    let (cache, _report) = Cache::load(ssd, disk)
        .unwrap_or_else(|e| panic!("{label}: loading after the crash failed: {e}"));
    let allowed = allowed(record, point);
    let mut buf = vec![0u8; 4096];
    for block in 0..DISK_SECTORS / 8 {
        cache.read(block * 8, &mut buf).unwrap();
        for i in 0..8u64 {
            let s = block * 8 + i;
            let got = &buf[(i * 512) as usize..((i + 1) * 512) as usize];
            let tags = &allowed[&s];
            if !tags.iter().any(|&t| got == sector_pattern(s, t)) {
                let owner = (0..=record.writes.len() as u64)
                    .flat_map(|t| (0..DISK_SECTORS).map(move |x| (x, t)))
                    .find(|&(x, t)| got == sector_pattern(x, t));
                panic!(
                    "{label}: sector {s} holds {} but only tags {tags:?} are allowed",
                    match owner {
                        Some((x, t)) => format!("sector {x}'s data of write {t}"),
                        None => "bytes no write produced".to_string(),
                    }
                );
            }
        }
    }
    // Shut down without cleaning (the image is thrown away).
    cache.stop_cleaning();
    cache.set_tunable("fast_remove", 1).unwrap();
    drop(cache);
}

fn power_loss(commit: CommitMode, seed: u64) {
    let dir = tempfile::tempdir_in(tests::image_dir()).unwrap();
    // The crashed images are loaded from these paths: the cache's disk identity
    // is the disk's path, so the workload's disk lives at the same path.
    let disk_path = dir.path().join("disk.img");
    let ssd_path = dir.path().join("ssd.img");
    std::fs::write(&disk_path, pattern(0, DISK_SECTORS, 0)).unwrap();
    std::fs::write(&ssd_path, vec![0u8; SSD_BYTES as usize]).unwrap();
    let ssd = BlockDevice::open(&ssd_path).unwrap();
    let disk = BlockDevice::open(&disk_path).unwrap();
    let cache = Cache::create(ssd.clone(), disk.clone(), &options(commit)).unwrap();
    cache.set_tunable("dirty_thresh_pct", 10).unwrap();
    ssd.faults().start_write_log();
    disk.faults().start_write_log();
    let bases = (std::fs::read(&ssd_path).unwrap(), std::fs::read(&disk_path).unwrap());
    let record = run_workload(&cache, &ssd, &disk, 260, seed);
    let stats = cache.stats();
    cache.stop_cleaning();
    drop(cache);
    let logs = (ssd.faults().take_write_log(), disk.faults().take_write_log());
    drop((ssd, disk));
    assert!(stats.cleanings > 0 && stats.replacement + stats.write_replacement > 0, "{stats:?}");
    assert!(stats.metadata_ssd_writes > 0, "{stats:?}");

    // Every flush boundary and every 9th step between them, each with only the
    // durable writes and with a random subset of the rest.
    let mut checked = 0;
    for (i, point) in record.points.iter().enumerate() {
        if !point.is_flush && i % 9 != 4 {
            continue;
        }
        for mode in [Replay::DurableOnly, Replay::Crash { seed: seed ^ i as u64 }] {
            let label = format!("{commit:?} seed {seed:#x}: step {i} ({point:?}) {mode:?}");
            check_point(
                &label,
                dir.path(),
                &record,
                point,
                (&logs.0, &logs.1),
                (&bases.0, &bases.1),
                mode,
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} crash points");
}

#[test]
fn every_crash_point_keeps_flushed_writes_on_flush_commit() {
    power_loss(CommitMode::OnFlush, 0xc0ffee);
}

#[test]
fn every_crash_point_keeps_flushed_writes_sync_commit() {
    power_loss(CommitMode::Sync, 0xbeef);
}

#[test]
fn a_corrupted_superblock_and_a_torn_slot_are_refused() {
    let ssd = TestDevice::new(Backing::File, SSD_BYTES);
    let disk = TestDevice::new(Backing::File, DISK_BYTES);
    let cache =
        Cache::create(ssd.dev.clone(), disk.dev.clone(), &options(CommitMode::OnFlush)).unwrap();
    for block in 0..16u64 {
        cache.write(block * 8, &pattern(block * 8, 8, 1)).unwrap();
    }
    cache.set_tunable("fast_remove", 1).unwrap();
    let layout = cache.superblock().layout().unwrap();
    cache.shutdown().unwrap();
    let io = dmio::DmIoClient::new().unwrap();
    let image = ssd.read_back();

    // A torn slot: one byte of a written slot flipped (its CRC no longer matches).
    let slots = &image[layout.md_start() as usize..layout.md_start() as usize + 4096];
    let used = slots.chunks(16).position(|s| s.iter().any(|&b| b != 0)).expect("a written slot");
    let mut torn = slots.to_vec();
    torn[used * 16 + 2] ^= 0x40;
    let md_sector = layout.md_start() / 512;
    assert!(tests::write_at(&io, &ssd.dev, md_sector, &torn, dmio::ReqFlags::empty()).is_ok());
    let err = Cache::load(ssd.dev.clone(), disk.dev.clone()).unwrap_err();
    assert!(matches!(err, CacheError::CorruptMetadata { set: 0, .. }), "{err}");

    // A corrupted superblock.
    let mut sb = image[..4096].to_vec();
    sb[30] ^= 0x01;
    assert!(tests::write_at(&io, &ssd.dev, 0, &sb, dmio::ReqFlags::empty()).is_ok());
    let err = Cache::load(ssd.dev.clone(), disk.dev.clone()).unwrap_err();
    assert!(matches!(err, CacheError::Setup(SetupError::BadSuperblock { .. })), "{err}");
}
