//! Read-your-writes through the cache against a RAM model, in every mode, on
//! files and loop devices: random mixed sizes (sub-block, whole blocks and
//! block-straddling), four threads at once, with the cleaner stopped and with
//! cleaning running beside the I/O; then a flush, a full read-back, an orderly
//! shutdown, the disk itself checked (write-back cleaned everything), and a
//! warm reload read back again.

use std::sync::Arc;

use flashcache_core::cache::{Cache, CacheError, IoFlags};
use flashcache_core::dmio::AlignedBuf;
use flashcache_core::format::{CacheMode, CommitMode};
use flashcache_core::setup::CreateOptions;
use tests::{Backing, Rng, TestDevice, backings};

const MIB: u64 = 1 << 20;
const DISK_BYTES: u64 = 4 * MIB;
const SSD_BYTES: u64 = MIB + 64 * 1024;
/// Each thread owns every fourth stripe of the disk.
const STRIPE: u64 = 64 * 1024;
const THREADS: u64 = 4;

fn options(mode: CacheMode, write_only: bool, commit: CommitMode) -> CreateOptions {
    CreateOptions {
        mode,
        write_only,
        commit,
        assoc: 64,
        disk_assoc_blocks: 8,
        ..CreateOptions::default()
    }
}

/// The disk's starting content: random bytes, so reads of never-written
/// ranges are checked too.
fn seed_disk(disk: &TestDevice) -> Vec<u8> {
    let mut rng = Rng(0xd15c);
    let mut image = vec![0u8; DISK_BYTES as usize];
    for chunk in image.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let io = dmio::DmIoClient::new().unwrap();
    for (i, chunk) in image.chunks(MIB as usize).enumerate() {
        let done = tests::write_at(&io, &disk.dev, i as u64 * 2048, chunk, dmio::ReqFlags::empty());
        assert!(done.is_ok());
    }
    image
}

/// One thread's workload: random reads and writes inside its own stripes,
/// each read checked against the thread's model.
fn workload(cache: &Cache, model: &mut [u8], thread: u64, ops: usize, align: u64) {
    let mut rng = Rng(0x5eed ^ thread);
    let stripes = DISK_BYTES / STRIPE / THREADS;
    for op in 0..ops {
        let stripe = rng.below(stripes) * THREADS + thread;
        // Sizes from one alignment unit to a whole stripe, biased small.
        let max_units = STRIPE / align;
        let units = match rng.below(4) {
            0 => 1 + rng.below(max_units),
            _ => 1 + rng.below(max_units.min(3 * 4096 / align).max(1)),
        };
        let start_unit = rng.below(max_units - units + 1);
        let offset = stripe * STRIPE + start_unit * align;
        let len = (units * align) as usize;
        let sector = offset / 512;
        let range = offset as usize..offset as usize + len;
        if rng.below(2) == 0 {
            let mut data = vec![0u8; len];
            for chunk in data.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            let flags = if rng.below(50) == 0 { IoFlags::FUA } else { IoFlags::empty() };
            cache
                .write_with(sector, &data, flags)
                .unwrap_or_else(|e| panic!("op {op}: write: {e}"));
            model[range].copy_from_slice(&data);
        } else {
            let mut buf = vec![0u8; len];
            cache.read(sector, &mut buf).unwrap_or_else(|e| panic!("op {op}: read: {e}"));
            if buf != model[range.clone()] {
                let first = buf.iter().zip(&model[range]).position(|(a, b)| a != b).unwrap();
                panic!(
                    "thread {thread} op {op}: read of {len} bytes at {offset} differs from the model \
                     at byte {first} (disk offset {})",
                    offset as usize + first
                );
            }
        }
        if rng.below(100) == 0 {
            cache.flush().unwrap();
        }
    }
}

fn read_all(cache: &Cache) -> Vec<u8> {
    let mut out = vec![0u8; DISK_BYTES as usize];
    for (i, chunk) in out.chunks_mut(256 * 1024).enumerate() {
        cache.read(i as u64 * 512, chunk).unwrap();
    }
    out
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn run(backing: Backing, opts: &CreateOptions, cleaning: bool, label: &str) {
    let started = std::time::Instant::now();
    run_inner(backing, opts, cleaning, label);
    eprintln!("{label}: {:.1} s", started.elapsed().as_secs_f64());
}

fn run_inner(backing: Backing, opts: &CreateOptions, cleaning: bool, label: &str) {
    let ssd = TestDevice::new(backing, SSD_BYTES);
    let disk = TestDevice::new(backing, DISK_BYTES);
    let initial = seed_disk(&disk);
    let cache = Arc::new(Cache::create(ssd.dev.clone(), disk.dev.clone(), opts).unwrap());
    if cleaning {
        cache.set_tunable("dirty_thresh_pct", 10).unwrap();
    } else {
        cache.stop_cleaning();
    }
    let align = cache.io_alignment();
    let ops = 500;
    let models: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let cache = cache.clone();
                let mut model = initial.clone();
                s.spawn(move || {
                    workload(&cache, &mut model, t, ops, align);
                    model
                })
            })
            .collect();
        if cleaning {
            // "Clean everything now" racing the I/O, a few times.
            for _ in 0..5 {
                std::thread::sleep(std::time::Duration::from_millis(20));
                let _ = cache.clean_all();
            }
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Merge: each stripe from its owner.
    let mut model = initial.clone();
    for (i, stripe) in model.chunks_mut(STRIPE as usize).enumerate() {
        let owner = &models[i % THREADS as usize];
        stripe.copy_from_slice(&owner[i * STRIPE as usize..(i + 1) * STRIPE as usize]);
    }
    let stats = cache.stats();
    assert!(stats.reads > 0 && stats.writes > 0, "{label}: {stats:?}");
    match opts.mode {
        CacheMode::WriteBack if !opts.write_only => {
            assert!(stats.read_hits > 0 && stats.write_hits > 0, "{label}: {stats:?}");
            assert!(stats.read_fills > 0, "{label}: misses were filled: {stats:?}");
        }
        CacheMode::WriteBack => {
            assert_eq!(stats.read_fills, 0, "{label}: write-only fills nothing")
        }
        CacheMode::WriteThrough => assert!(stats.read_hits > 0, "{label}: {stats:?}"),
        CacheMode::WriteAround => {
            assert!(stats.write_invalidates > 0, "{label}: {stats:?}");
            assert_eq!(cache.dirty_blocks(), 0, "{label}");
        }
    }
    if cleaning && opts.mode == CacheMode::WriteBack {
        assert!(stats.cleanings > 0, "{label}: nothing was cleaned: {stats:?}");
    }
    cache.flush().unwrap();
    let through = read_all(&cache);
    if let Some(at) = first_difference(&through, &model) {
        panic!("{label}: read back through the cache differs from the model at byte {at}");
    }
    let cache = Arc::into_inner(cache).unwrap();
    cache.resume_cleaning();
    cache.shutdown().unwrap();
    let on_disk = disk.read_back();
    if let Some(at) = first_difference(&on_disk, &model) {
        panic!("{label}: after shutdown the disk differs from the model at byte {at}");
    }
    let (cache, report) = Cache::load(ssd.dev.clone(), disk.dev.clone()).unwrap();
    assert_eq!(report.recovered.dirty, 0, "{label}: an orderly shutdown cleaned everything");
    if opts.mode != CacheMode::WriteAround {
        assert!(report.recovered.clean > 0, "{label}: a warm restart keeps clean blocks");
    }
    let warm = read_all(&cache);
    if let Some(at) = first_difference(&warm, &model) {
        panic!("{label}: after a warm reload the cache differs from the model at byte {at}");
    }
    cache.shutdown().unwrap();
}

#[test]
fn writeback_reads_its_writes_with_and_without_cleaning() {
    for backing in backings() {
        for cleaning in [false, true] {
            for commit in [CommitMode::OnFlush, CommitMode::Sync] {
                // Loop devices: the cleaning runs, where most can go wrong.
                if backing != Backing::File && !cleaning {
                    continue;
                }
                let label = format!("{backing} writeback {commit:?} cleaning={cleaning}");
                run(backing, &options(CacheMode::WriteBack, false, commit), cleaning, &label);
            }
        }
    }
}

#[test]
fn write_only_writeback_reads_its_writes() {
    for backing in backings() {
        let label = format!("{backing} write-only");
        run(backing, &options(CacheMode::WriteBack, true, CommitMode::OnFlush), true, &label);
    }
}

#[test]
fn writethrough_reads_its_writes() {
    for backing in backings() {
        let label = format!("{backing} writethrough");
        run(backing, &options(CacheMode::WriteThrough, false, CommitMode::OnFlush), false, &label);
    }
}

#[test]
fn writearound_reads_its_writes() {
    for backing in backings() {
        let label = format!("{backing} writearound");
        run(backing, &options(CacheMode::WriteAround, false, CommitMode::OnFlush), false, &label);
    }
}

#[test]
fn bad_ranges_are_refused_and_do_nothing() {
    let ssd = TestDevice::new(Backing::File, SSD_BYTES);
    let disk = TestDevice::new(Backing::File, DISK_BYTES);
    let opts = options(CacheMode::WriteBack, false, CommitMode::OnFlush);
    let cache = Cache::create(ssd.dev.clone(), disk.dev.clone(), &opts).unwrap();
    let mut buf = vec![0u8; 4096];
    let end = DISK_BYTES / 512;
    for (sector, len) in [(0, 0usize), (0, 100), (end - 4, 4096), (u64::MAX - 1, 4096)] {
        let err = cache.read(sector, &mut buf[..len]).unwrap_err();
        assert!(matches!(err, CacheError::BadRange { .. }), "read {sector}/{len}: {err}");
        let err = cache.write(sector, &buf[..len]).unwrap_err();
        assert!(matches!(err, CacheError::BadRange { .. }), "write {sector}/{len}: {err}");
    }
    let err = cache.discard(end, 8).unwrap_err();
    assert!(matches!(err, CacheError::BadRange { .. }), "{err}");
    let stats = cache.stats();
    assert_eq!((stats.reads, stats.writes, stats.disk_writes, stats.ssd_writes), (0, 0, 0, 0));
    assert!(cache.set_tunable("dirty_thresh_pct", 5).is_err());
    assert!(cache.set_tunable("no_such_tunable", 1).is_err());
    cache.shutdown().unwrap();
}

#[test]
fn asynchronous_io_with_callbacks_and_futures_reads_its_writes() {
    let ssd = TestDevice::new(Backing::File, SSD_BYTES);
    let disk = TestDevice::new(Backing::File, DISK_BYTES);
    let opts = options(CacheMode::WriteBack, false, CommitMode::OnFlush);
    let cache = Cache::create(ssd.dev.clone(), disk.dev.clone(), &opts).unwrap();
    let blocks = DISK_BYTES / 4096;
    let (tx, rx) = std::sync::mpsc::channel();
    for b in 0..blocks {
        let tx = tx.clone();
        let data = AlignedBuf::from_slice(&[(b % 251) as u8; 4096]);
        cache
            .submit_write(b * 8, data, IoFlags::empty(), move |done, _| tx.send((b, done)).unwrap())
            .unwrap();
    }
    drop(tx);
    let mut done: Vec<u64> = rx.iter().map(|(b, r)| r.map(|()| b).unwrap()).collect();
    done.sort_unstable();
    assert_eq!(done, (0..blocks).collect::<Vec<_>>(), "every callback ran once");
    let (tx, rx) = std::sync::mpsc::channel();
    cache.submit_flush(move |r| tx.send(r.is_ok()).unwrap()).unwrap();
    assert!(rx.recv().unwrap());
    let futures: Vec<_> = (0..blocks)
        .map(|b| cache.read_future(b * 8, AlignedBuf::new(4096), IoFlags::empty()).unwrap())
        .collect();
    for (b, f) in futures.into_iter().enumerate() {
        let (done, bytes) = pollster::block_on(f);
        done.unwrap();
        assert!(bytes.iter().all(|&x| x == (b as u64 % 251) as u8), "block {b}");
    }
    // A bad range is refused at once, with no callback.
    let called = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = called.clone();
    let err = cache
        .submit_read(DISK_BYTES / 512, AlignedBuf::new(4096), IoFlags::empty(), move |_, _| {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        })
        .unwrap_err();
    assert!(matches!(err, CacheError::BadRange { .. }), "{err}");
    cache.shutdown().unwrap();
    assert!(!called.load(std::sync::atomic::Ordering::SeqCst));
}
