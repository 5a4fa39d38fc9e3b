//! The kernel dm-io semantics (checklist rows IO-2 … IO-20 of
//! `shared/reference/dm-io-kcopyd.md`, issue 2 section 2), each scenario run on
//! every test backing (a regular file, and loop devices with 512- and 4096-byte
//! sectors when root) with both engines:
//!
//! exactly one callback per request (IO-2), the error bits of a blocking call
//! (IO-3) and of an asynchronous one (IO-15), fan-out writes with a shorter
//! region writing a prefix (IO-4), reads naming one region (IO-5), the 64-region
//! cap (IO-6), zero-count regions (IO-7), empty flushes (IO-8), PREFLUSH and FUA
//! ordering in the write log (IO-9), discard and write-zeroes with and without
//! device support (IO-10, IO-11), scattered memory (IO-12), splitting at the op
//! cap, the iovec limit and after short transfers (IO-13), zero-filled failed
//! reads (IO-16), sibling regions unaffected by a failing one (IO-17), the I/O
//! priority on every op (IO-18), atomic writes never split (IO-20), dropping a
//! client waiting for its I/O, the `Future` adapter, the shared-handler and
//! channel notifies, and read-only devices.
//!
//! Data is verified with the per-sector pattern of the `tests` crate, read back
//! both through dmio and through the device node (or image file) directly;
//! what was issued is verified with each device's fault-injection trace.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dmio::fault::{
    FaultAction, FaultRule, LimitOverrides, LogEntry, OpSet, Replay, TracedOp, Trigger,
};
use dmio::{
    AlignedBuf, BioVec, BlockDevice, Bvec, DmIoClient, DmIoCompletion, DmIoError, DmIoMemory,
    DmIoOp, DmIoRegion, DmIoRequest, ErrorBits, IoPriority, IoPriorityClass, MAX_REGIONS, Notify,
    NotifyHandler, PAGE_SIZE, Page, PageList, ReqFlags,
};
use tests::{
    ENGINES, Rng, TestDevice, backings, check_pattern, client, client_with, configs, label, ops_of,
    pattern, read_region, scenarios, scenarios_with, sectors_of, write_pattern,
};

/// The size of every test device: small, so that the whole file runs in seconds.
const DEV_SIZE: u64 = 8 << 20;

/// Opens the device node (or image file) with `O_DIRECT`, bypassing dmio.
fn open_direct(dev: &BlockDevice) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev.path())
        .expect("opening the device for a check")
}

/// Reads `sectors` sectors at `sector` from `file` (opened by [`open_direct`])
/// with a plain `pread`, rounding out to 4 KiB as direct I/O needs.
fn pread_direct(file: &File, sector: u64, sectors: u64) -> std::io::Result<Vec<u8>> {
    let start = sector / 8 * 8;
    let end = (sector + sectors).div_ceil(8) * 8;
    let mut buf = AlignedBuf::new(((end - start) * 512) as usize);
    file.read_exact_at(&mut buf, start * 512)?;
    let skip = ((sector - start) * 512) as usize;
    Ok(buf[skip..skip + (sectors * 512) as usize].to_vec())
}

/// Reads `sectors` sectors at `sector` through the device node (or image file)
/// with `O_DIRECT` `pread`, not through dmio: an independent check of what dmio
/// wrote. (Direct, so that no stale page cache from read-ahead can interfere.)
fn disk(dev: &BlockDevice, sector: u64, sectors: u64) -> Vec<u8> {
    pread_direct(&open_direct(dev), sector, sectors).expect("reading the device for a check")
}

/// Asserts that `ops`, all of operation `op` and region `region`, cover
/// `sector..sector + sectors` exactly (no gap, no overlap, nothing outside), each
/// at most `max_sectors` long. Returns the number of ops.
fn assert_covers(
    ops: &[TracedOp],
    op: DmIoOp,
    region: usize,
    sector: u64,
    sectors: u64,
    max_sectors: u64,
    at: &str,
) -> usize {
    let mine = ops_of(ops, op);
    assert!(!mine.is_empty(), "{at}: no {op} op traced");
    let mut next = sector;
    for o in &mine {
        assert_eq!(o.region, region, "{at}: op {o:?} names the wrong region");
        assert_eq!(o.sector, next, "{at}: ops leave a gap or overlap at sector {next}: {mine:?}");
        assert!(o.sectors > 0, "{at}: empty {op} op {o:?}");
        assert!(
            o.sectors <= max_sectors,
            "{at}: op {o:?} exceeds the cap of {max_sectors} sectors"
        );
        next += o.sectors;
    }
    assert_eq!(next, sector + sectors, "{at}: the ops end at sector {next}");
    mine.len()
}

/// A name and a way to build a request of that kind.
type NamedRequest = (&'static str, fn() -> DmIoRequest);

/// `n` pages sorted by descending address, so that no two consecutive pages are
/// ever merged into one iovec: the memory is truly scattered.
fn scattered_pages(pool: &dmio::PagePool, n: usize) -> Vec<Page> {
    let mut pages: Vec<Page> = (0..n).map(|_| pool.alloc()).collect();
    pages.sort_by_key(|p| std::cmp::Reverse(p.as_ptr() as usize));
    pages
}

/// A bio vector of `len` bytes (a multiple of `lbs`) made of segments at odd
/// multiples of the block size within their pages (whole pages when the block
/// is a page), of varying lengths, in descending page-address order.
fn scattered_bvec(pool: &dmio::PagePool, len: usize, lbs: usize, rng: &mut Rng) -> Bvec {
    let blocks_per_page = PAGE_SIZE / lbs;
    let mut segments = Vec::new();
    let mut total = 0;
    let mut pages = scattered_pages(pool, len / lbs + 1).into_iter();
    while total < len {
        let page = pages.next().expect("enough pages");
        let (offset, max_blocks) = if blocks_per_page == 1 {
            (0, 1)
        } else {
            // An odd block index: 1, 3, 5, ...
            let odd = 1 + 2 * rng.below((blocks_per_page / 2) as u64) as usize;
            (odd * lbs, blocks_per_page - odd)
        };
        let blocks = (1 + rng.below(max_blocks as u64) as usize).min((len - total) / lbs);
        segments.push(BioVec::new(page, offset, blocks * lbs).expect("a segment within its page"));
        total += blocks * lbs;
    }
    Bvec::new(segments)
}

/// IO-2: 120 random multi-region writes (random flags, counts and devices),
/// submitted from two threads while the fault layer delays some operations:
/// every request is notified exactly once, with its memory, and only after all
/// of its regions hold the data.
#[test]
fn io2_exactly_one_callback_per_request() {
    const REQUESTS: usize = 120;
    const AREA: u64 = 64; // sectors per request and device
    for backing in backings() {
        let tds = TestDevice::many(backing, DEV_SIZE, 3);
        for td in &tds {
            td.dev.faults().add(
                FaultRule::delay(OpSet::all(), Duration::from_micros(700))
                    .when(Trigger::EveryNth(3)),
            );
            td.dev.faults().add(
                FaultRule::delay(OpSet::all(), Duration::from_millis(2)).when(Trigger::EveryNth(7)),
            );
        }
        for (e, engine) in ENGINES.into_iter().enumerate() {
            let at = label(backing, engine);
            let client = client(engine);
            let mut rng = Rng(0x1234_5678 + e as u64);
            // The plan: for each request, its regions as (device, count) and flags.
            let plan: Vec<(Vec<(usize, u64)>, ReqFlags)> = (0..REQUESTS)
                .map(|_| {
                    let n = 1 + rng.below(3) as usize;
                    let first = rng.below(3) as usize;
                    let regions =
                        (0..n).map(|j| ((first + j) % 3, 8 * (1 + rng.below(AREA / 8)))).collect();
                    let mut flags = ReqFlags::empty();
                    if rng.below(4) == 0 {
                        flags |= ReqFlags::PREFLUSH;
                    }
                    if rng.below(5) == 0 {
                        flags |= ReqFlags::FUA;
                    }
                    (regions, flags)
                })
                .collect();
            let seed = |k: usize| 1000 * (e as u64 + 1) + k as u64;
            struct Checker {
                plan: Vec<(Vec<(usize, u64)>, ReqFlags)>,
                files: Vec<File>,
                seeds: Vec<u64>,
                calls: Vec<AtomicU32>,
                problems: Mutex<Vec<String>>,
            }
            impl NotifyHandler for Checker {
                fn notify(&self, done: DmIoCompletion, k: usize) {
                    self.calls[k].fetch_add(1, Ordering::SeqCst);
                    let mut problems = Vec::new();
                    if !done.is_ok() {
                        problems.push(format!("request {k} failed: {:?}", done.failures));
                    }
                    match &done.memory {
                        Some(m) if m.len() == (AREA * 512) as usize => {}
                        other => problems.push(format!("request {k}: memory {other:?}")),
                    }
                    // Every region's data must be on its device when the callback runs.
                    let base = k as u64 * AREA;
                    for &(dev, count) in &self.plan[k].0 {
                        match pread_direct(&self.files[dev], base, count) {
                            Err(e) => problems.push(format!("request {k}: reading back: {e}")),
                            Ok(buf) => {
                                if let Err(e) = check_pattern(&buf, base, self.seeds[k]) {
                                    problems.push(format!("request {k}, device {dev}: {e}"));
                                }
                            }
                        }
                    }
                    self.problems.lock().unwrap().extend(problems);
                }
            }
            let checker = Arc::new(Checker {
                plan: plan.clone(),
                files: tds.iter().map(|td| open_direct(&td.dev)).collect(),
                seeds: (0..REQUESTS).map(seed).collect(),
                calls: (0..REQUESTS).map(|_| AtomicU32::new(0)).collect(),
                problems: Mutex::new(Vec::new()),
            });
            let handler: Arc<dyn NotifyHandler> = checker.clone();
            std::thread::scope(|s| {
                for t in 0..2 {
                    let (client, plan, handler, tds) = (&client, &plan, &handler, &tds);
                    s.spawn(move || {
                        for k in (t..REQUESTS).step_by(2) {
                            let base = k as u64 * AREA;
                            let data = AlignedBuf::from_slice(&pattern(base, AREA, seed(k)));
                            let regions: Vec<DmIoRegion> = plan[k]
                                .0
                                .iter()
                                .map(|&(d, count)| DmIoRegion::new(&tds[d].dev, base, count))
                                .collect();
                            let req = DmIoRequest::write(data)
                                .with_flags(plan[k].1)
                                .with_notify(Notify::shared(handler, k));
                            client.submit(req, &regions).expect("a valid request");
                        }
                    });
                }
            });
            client.close();
            for (k, calls) in checker.calls.iter().enumerate() {
                assert_eq!(
                    calls.load(Ordering::SeqCst),
                    1,
                    "{at}: request {k} was notified that often"
                );
            }
            let problems = checker.problems.lock().unwrap();
            assert!(problems.is_empty(), "{at}: {problems:#?}");
            assert_eq!(client.stats().requests, REQUESTS as u64, "{at}");
        }
    }
}

/// IO-3: a blocking call returns the error bits: the fault layer fails writes
/// to region 1 of 3, so the bits are 0b010 only, the errno (ENOSPC) is kept, and
/// regions 0 and 2 are written.
#[test]
fn io3_io_sync_returns_error_bits() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let starts = [0u64, 1024, 2048];
        td.dev.faults().add(FaultRule::fail(OpSet::WRITE, 1024..1088, libc::ENOSPC));
        let data = AlignedBuf::from_slice(&pattern(0, 64, 3));
        let regions: Vec<DmIoRegion> =
            starts.iter().map(|&s| DmIoRegion::new(&td.dev, s, 64)).collect();
        let done = client.io_sync(DmIoRequest::write(data), &regions).expect("valid");
        assert_eq!(done.error_bits, ErrorBits::from_bits(0b010), "{at}");
        assert_eq!(done.error_bits.iter().collect::<Vec<_>>(), vec![1], "{at}");
        assert!(!done.failures.is_empty(), "{at}: no failure detail");
        for f in &done.failures {
            assert_eq!(f.region, 1, "{at}: {f:?}");
            assert_eq!(f.errno.raw(), libc::ENOSPC, "{at}: {f:?}");
            assert_eq!(f.op, DmIoOp::Write, "{at}: {f:?}");
            assert_eq!(f.device.path(), td.dev.path(), "{at}: {f:?}");
            assert!((1024..1088).contains(&f.sector), "{at}: {f:?}");
        }
        // The memory comes back even when a region failed.
        let memory = done.memory.as_ref().expect("the memory is handed back");
        check_pattern(&memory.to_vec(), 0, 3).unwrap();
        // The completion turns into an error naming the region and keeping the errno.
        let err = done.into_result().expect_err("a region failed");
        assert_eq!(err.errno().map(|e| e.raw()), Some(libc::ENOSPC), "{at}");
        match &err {
            DmIoError::Regions(r) => assert_eq!(r.error_bits.bits(), 0b010, "{at}"),
            other => panic!("{at}: expected Regions, got {other:?}"),
        }
        assert!(err.to_string().contains("region 1"), "{at}: {err}");
        td.dev.faults().clear_rules();
        // Regions 0 and 2 were written; region 1 was not.
        check_pattern(&disk(&td.dev, 0, 64), 0, 3).unwrap_or_else(|e| panic!("{at}: {e}"));
        check_pattern(&disk(&td.dev, 2048, 64), 0, 3).unwrap_or_else(|e| panic!("{at}: {e}"));
        assert!(disk(&td.dev, 1024, 64).iter().all(|&b| b == 0), "{at}: region 1 was written");
    }
}

/// IO-4: one write fanned out to three regions on three devices at different
/// offsets, one of them shorter: each region receives the memory from its start,
/// the short one only a prefix, and the bytes after the prefix are untouched.
#[test]
fn io4_fan_out_write_with_a_prefix() {
    for backing in backings() {
        let tds = TestDevice::many(backing, DEV_SIZE, 3);
        for (e, engine) in ENGINES.into_iter().enumerate() {
            let at = label(backing, engine);
            let client = client(engine);
            let seed_old = 40 + e as u64;
            let seed_new = 50 + e as u64;
            let layout = [(0usize, 0u64, 128u64), (1, 1024, 128), (2, 4096, 64)];
            for &(d, start, _) in &layout {
                write_pattern(&client, &tds[d].dev, start, 256, seed_old);
                tds[d].dev.faults().start_trace();
            }
            let data = AlignedBuf::from_slice(&pattern(0, 128, seed_new));
            let regions: Vec<DmIoRegion> = layout
                .iter()
                .map(|&(d, start, count)| DmIoRegion::new(&tds[d].dev, start, count))
                .collect();
            let done = client.io_sync(DmIoRequest::write(data), &regions).expect("valid");
            assert!(done.is_ok(), "{at}: {:?}", done.failures);
            assert_eq!(
                done.memory.expect("memory back").to_vec(),
                pattern(0, 128, seed_new),
                "{at}: a write changed its memory"
            );
            for (i, &(d, start, count)) in layout.iter().enumerate() {
                let ops = tds[d].dev.faults().take_trace();
                assert_covers(&ops, DmIoOp::Write, i, start, count, count, &at);
                let bytes = disk(&tds[d].dev, start, 256);
                let (prefix, rest) = bytes.split_at((count * 512) as usize);
                check_pattern(prefix, 0, seed_new)
                    .unwrap_or_else(|e| panic!("{at}: region {i}: {e}"));
                check_pattern(rest, start + count, seed_old)
                    .unwrap_or_else(|e| panic!("{at}: region {i}, after the prefix: {e}"));
            }
        }
    }
}

/// IO-5: a read naming two regions is refused before anything is issued, and its
/// callback is never called (as in current kernels); a read of one region works.
#[test]
fn io5_read_names_exactly_one_region() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let regions = [DmIoRegion::new(&td.dev, 0, 8), DmIoRegion::new(&td.dev, 64, 8)];
        td.dev.faults().start_trace();
        let (tx, rx) = std::sync::mpsc::channel::<DmIoCompletion>();
        let req = DmIoRequest::read(AlignedBuf::new(8 * 512)).on_complete(move |done| {
            let _ = tx.send(done);
        });
        let err = client.submit(req, &regions).expect_err("a read of two regions");
        assert!(matches!(err, DmIoError::ReadWithMultipleRegions { regions: 2 }), "{at}: {err:?}");
        // The callback was dropped without being called.
        assert!(
            matches!(
                rx.recv_timeout(Duration::from_millis(200)),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
            ),
            "{at}: the callback of a refused read ran"
        );
        let err = client
            .io_sync(DmIoRequest::read(AlignedBuf::new(8 * 512)), &regions)
            .expect_err("a read of two regions");
        assert!(matches!(err, DmIoError::ReadWithMultipleRegions { regions: 2 }), "{at}: {err:?}");
        let err = client
            .submit_future(DmIoRequest::read(AlignedBuf::new(8 * 512)), &regions)
            .expect_err("a read of two regions");
        assert!(matches!(err, DmIoError::ReadWithMultipleRegions { regions: 2 }), "{at}: {err:?}");
        assert!(td.dev.faults().take_trace().is_empty(), "{at}: something was issued");
        // One region is fine.
        td.dev.faults().start_trace();
        let done = client
            .io_sync(DmIoRequest::read(AlignedBuf::new(8 * 512)), &regions[1..])
            .expect("a read of one region");
        assert!(done.is_ok(), "{at}");
        assert_eq!(td.dev.faults().take_trace().len(), 1, "{at}");
    }
}

/// IO-6: 65 regions are refused (`TooManyRegions`) before anything is issued;
/// 64 regions work and bit 63 reports region 63.
#[test]
fn io6_at_most_64_regions() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let regions: Vec<DmIoRegion> =
            (0..65).map(|i| DmIoRegion::new(&td.dev, i * 64, 8)).collect();
        td.dev.faults().start_trace();
        let data = || AlignedBuf::from_slice(&pattern(0, 8, 6));
        let err = client.io_sync(DmIoRequest::write(data()), &regions).expect_err("65 regions");
        assert!(
            matches!(err, DmIoError::TooManyRegions { regions: 65, max: MAX_REGIONS }),
            "{at}: {err:?}"
        );
        assert!(td.dev.faults().take_trace().is_empty(), "{at}: something was issued");
        // Exactly 64: accepted; region 63 fails alone and sets bit 63.
        td.dev.faults().add(FaultRule::fail(OpSet::WRITE, 63 * 64..63 * 64 + 8, libc::EIO));
        td.dev.faults().start_trace();
        let done = client.io_sync(DmIoRequest::write(data()), &regions[..64]).expect("64 regions");
        assert_eq!(done.error_bits.bits(), 1 << 63, "{at}");
        assert_eq!(td.dev.faults().take_trace().len(), 64, "{at}: one op per region");
        for i in 0..63 {
            check_pattern(&disk(&td.dev, i * 64, 8), 0, 6).unwrap_or_else(|e| panic!("{at}: {e}"));
        }
    }
}

/// IO-7: a zero-count region is skipped: with every operation failing on its
/// device, a write, a read and a discard still succeed, and nothing is issued
/// to it. With PREFLUSH its device is flushed (once), and a failing flush there
/// sets its bit.
#[test]
fn io7_zero_count_regions_are_skipped_unless_flushing() {
    for backing in backings() {
        let tds = TestDevice::many(backing, DEV_SIZE, 3);
        for (e, engine) in ENGINES.into_iter().enumerate() {
            let at = label(backing, engine);
            let client = client(engine);
            let seed = 70 + e as u64;
            let skipped = &tds[1].dev;
            skipped.faults().add(FaultRule::fail(OpSet::all(), 0..u64::MAX, libc::EIO));
            let regions = [
                DmIoRegion::new(&tds[0].dev, 0, 64),
                DmIoRegion::new(skipped, 0, 0),
                DmIoRegion::new(&tds[2].dev, 512, 64),
            ];
            skipped.faults().start_trace();
            let data = || AlignedBuf::from_slice(&pattern(0, 64, seed));
            let done = client.io_sync(DmIoRequest::write(data()), &regions).expect("valid");
            assert!(done.error_bits.is_empty(), "{at}: {:?}", done.failures);
            check_pattern(&disk(&tds[0].dev, 0, 64), 0, seed).unwrap();
            check_pattern(&disk(&tds[2].dev, 512, 64), 0, seed).unwrap();
            // A read of a zero-count region: nothing to do, memory untouched.
            let mut buf = AlignedBuf::new(4096);
            buf.fill(0x5c);
            let done = client.io_sync(DmIoRequest::read(buf), &regions[1..2]).expect("valid");
            assert!(done.error_bits.is_empty(), "{at}: {:?}", done.failures);
            assert!(done.memory.unwrap().to_vec().iter().all(|&b| b == 0x5c), "{at}");
            // Data-less ops skip it too.
            let done = client.io_sync(DmIoRequest::discard(), &regions[..2]).expect("valid");
            assert!(done.error_bits.is_empty(), "{at}: {:?}", done.failures);
            let done = client.io_sync(DmIoRequest::write_zeroes(), &regions[1..]).expect("valid");
            assert!(done.error_bits.is_empty(), "{at}: {:?}", done.failures);
            assert_eq!(
                skipped.faults().take_trace(),
                vec![],
                "{at}: I/O reached the skipped region"
            );
            assert!(disk(skipped, 0, 64).iter().all(|&b| b == 0), "{at}");

            // With PREFLUSH the zero-count region's device is flushed: the failing
            // flush sets bit 1 (and only bit 1).
            skipped.faults().start_trace();
            let req = DmIoRequest::write(data()).with_flags(ReqFlags::PREFLUSH);
            let done = client.io_sync(req, &regions).expect("valid");
            assert_eq!(done.error_bits.bits(), 0b010, "{at}: {:?}", done.failures);
            assert!(done.failures.iter().all(|f| f.op == DmIoOp::Flush && f.region == 1), "{at}");
            let trace = skipped.faults().take_trace();
            assert_eq!(trace.len(), 1, "{at}: {trace:?}");
            assert_eq!((trace[0].op, trace[0].region), (DmIoOp::Flush, 1), "{at}");

            // Flushes allowed, everything else still failing: no bit, exactly one flush.
            skipped.faults().clear_rules();
            skipped.faults().add(FaultRule::fail(
                OpSet::READ | OpSet::WRITE | OpSet::DISCARD | OpSet::WRITE_ZEROES,
                0..u64::MAX,
                libc::EIO,
            ));
            skipped.faults().start_trace();
            let req = DmIoRequest::write(data()).with_flags(ReqFlags::PREFLUSH);
            let done = client.io_sync(req, &regions).expect("valid");
            assert!(done.error_bits.is_empty(), "{at}: {:?}", done.failures);
            let trace = skipped.faults().take_trace();
            assert_eq!(trace.len(), 1, "{at}: {trace:?}");
            assert_eq!((trace[0].op, trace[0].fault), (DmIoOp::Flush, None), "{at}");
            skipped.faults().clear_rules();
        }
    }
}

/// IO-8: an empty flush (a `Flush` request, or a PREFLUSH write whose regions
/// all have count 0) to several devices sends exactly one flush per distinct
/// device, and a failing flush on device 2 sets bit 2 only.
#[test]
fn io8_empty_flush_once_per_device() {
    for backing in backings() {
        let tds = TestDevice::many(backing, DEV_SIZE, 3);
        for engine in ENGINES {
            let at = label(backing, engine);
            let client = client(engine);
            // Device 0 is named twice: it is still flushed once.
            let regions = [
                DmIoRegion::new(&tds[0].dev, 0, 0),
                DmIoRegion::new(&tds[1].dev, 0, 0),
                DmIoRegion::new(&tds[0].dev, 64, 0),
                DmIoRegion::new(&tds[2].dev, 0, 0),
            ];
            let requests: [NamedRequest; 2] = [
                ("Flush", DmIoRequest::flush),
                ("empty PREFLUSH write", || {
                    DmIoRequest::write(AlignedBuf::new(0)).with_flags(ReqFlags::PREFLUSH)
                }),
            ];
            for (what, make) in requests {
                let at = format!("{at}/{what}");
                for td in &tds {
                    td.dev.faults().start_trace();
                }
                let done = client.io_sync(make(), &regions).expect("valid");
                assert!(done.is_ok(), "{at}: {:?}", done.failures);
                for (d, first_region) in [(0, 0), (1, 1), (2, 3)] {
                    let trace = tds[d].dev.faults().take_trace();
                    assert_eq!(trace.len(), 1, "{at}: device {d}: {trace:?}");
                    assert_eq!(trace[0].op, DmIoOp::Flush, "{at}: device {d}");
                    assert_eq!(trace[0].region, first_region, "{at}: device {d}");
                }
                // A failing flush on device 2 sets bit 2 only.
                let id = tds[2].dev.faults().add(FaultRule::fail(OpSet::FLUSH, 0..1, libc::EIO));
                let done = client.io_sync(make(), &regions[1..]).expect("valid");
                assert_eq!(done.error_bits.bits(), 0b100, "{at}: {:?}", done.failures);
                assert_eq!(done.failures.len(), 1, "{at}");
                assert_eq!(
                    (done.failures[0].op, done.failures[0].errno.raw()),
                    (DmIoOp::Flush, libc::EIO),
                    "{at}"
                );
                assert_eq!(tds[2].dev.faults().fired(id), 1, "{at}");
                tds[2].dev.faults().remove(id);
            }
        }
    }
}

/// IO-9: PREFLUSH with data: the write log shows the flush (covering the earlier
/// write) before the data, on every device of the request; a FUA write is logged
/// and traced with `fua`; power-loss replay keeps exactly what is durable.
#[test]
fn io9_preflush_before_data_and_fua() {
    for (backing, engine) in configs() {
        let at = label(backing, engine);
        let tds = TestDevice::many(backing, DEV_SIZE, 2);
        let (a, b) = (&tds[0].dev, &tds[1].dev);
        let client = client(engine);
        for dev in [a, b] {
            dev.faults().start_write_log();
            dev.faults().start_trace();
        }
        // W1: a plain write; W2: PREFLUSH to both devices; W3: FUA.
        write_pattern(&client, a, 0, 64, 1);
        let req = DmIoRequest::write(AlignedBuf::from_slice(&pattern(1024, 64, 2)))
            .with_flags(ReqFlags::PREFLUSH);
        let done = client
            .io_sync(req, &[DmIoRegion::new(a, 1024, 64), DmIoRegion::new(b, 1024, 64)])
            .expect("valid");
        assert!(done.is_ok(), "{at}: {:?}", done.failures);
        let req = DmIoRequest::write(AlignedBuf::from_slice(&pattern(2048, 64, 3)))
            .with_flags(ReqFlags::FUA);
        let done = client.io_sync(req, &[DmIoRegion::new(a, 2048, 64)]).expect("valid");
        assert!(done.is_ok(), "{at}: {:?}", done.failures);

        let log = a.faults().take_write_log();
        let entries = log.entries();
        assert_eq!(entries.len(), 4, "{at}: {entries:#?}");
        assert!(
            matches!(&entries[0], LogEntry::Write { sector: 0, fua: false, dropped: false, .. }),
            "{at}: {:?}",
            entries[0]
        );
        assert_eq!(entries[1], LogEntry::Flush { issued_at: 1 }, "{at}: the preflush");
        match &entries[2] {
            LogEntry::Write { sector: 1024, data, fua: false, dropped: false } => {
                assert_eq!(data, &pattern(1024, 64, 2), "{at}")
            }
            other => panic!("{at}: expected the PREFLUSH data, got {other:?}"),
        }
        assert!(
            matches!(&entries[3], LogEntry::Write { sector: 2048, fua: true, .. }),
            "{at}: the FUA write: {:?}",
            entries[3]
        );
        // Device b: its own preflush, then the data.
        let log_b = b.faults().take_write_log();
        assert_eq!(log_b.len(), 2, "{at}: {:?}", log_b.entries());
        assert_eq!(log_b.entries()[0], LogEntry::Flush { issued_at: 0 }, "{at}");
        assert!(matches!(log_b.entries()[1], LogEntry::Write { sector: 1024, .. }), "{at}");
        // The trace agrees, and marks only the FUA write.
        let trace = a.faults().take_trace();
        let kinds: Vec<(DmIoOp, u64, bool)> =
            trace.iter().map(|o| (o.op, o.sector, o.fua)).collect();
        assert_eq!(
            kinds,
            vec![
                (DmIoOp::Write, 0, false),
                (DmIoOp::Flush, 0, false),
                (DmIoOp::Write, 1024, false),
                (DmIoOp::Write, 2048, true)
            ],
            "{at}"
        );
        let trace_b = b.faults().take_trace();
        assert_eq!(trace_b.first().map(|o| o.op), Some(DmIoOp::Flush), "{at}: {trace_b:?}");
        // Power loss: W1 (flushed) and W3 (FUA) survive, W2 (after the flush,
        // not FUA) need not.
        let base = vec![0u8; 4096 * 512];
        let durable = log.image_at(log.len(), &base, Replay::DurableOnly);
        check_pattern(sectors_of(&durable, 0, 64), 0, 1).unwrap_or_else(|e| panic!("{at}: {e}"));
        assert!(sectors_of(&durable, 1024, 64).iter().all(|&x| x == 0), "{at}");
        check_pattern(sectors_of(&durable, 2048, 64), 2048, 3)
            .unwrap_or_else(|e| panic!("{at}: {e}"));
        // No prefix of the log shows W2's data before its preflush completed.
        for upto in 0..=log.len() {
            let image = log.image_at(upto, &base, Replay::Everything);
            let has_w2 = sectors_of(&image, 1024, 64).iter().any(|&x| x != 0);
            let flushed = log.entries()[..upto].iter().any(|e| matches!(e, LogEntry::Flush { .. }));
            assert!(!has_w2 || flushed, "{at}: W2 before its preflush at prefix {upto}");
        }
        // Everything replayed equals the device.
        let all = log.image_at(log.len(), &base, Replay::Everything);
        assert_eq!(all, disk(a, 0, 4096), "{at}: the log does not rebuild the device");
    }
}

/// Checks that `bytes` (sectors from `first`) hold the pattern except zeros in
/// `zero` (absolute sectors).
fn check_zeroed(bytes: &[u8], first: u64, zero: std::ops::Range<u64>, seed: u64, at: &str) {
    for (i, chunk) in bytes.chunks(512).enumerate() {
        let sector = first + i as u64;
        if zero.contains(&sector) {
            assert!(chunk.iter().all(|&b| b == 0), "{at}: sector {sector} is not zero");
        } else {
            check_pattern(chunk, sector, seed).unwrap_or_else(|e| panic!("{at}: {e}"));
        }
    }
}

/// IO-10 and IO-11: discard and write-zeroes (with and without NOUNMAP) zero
/// their range and nothing else, split by the device's limit; a device
/// reporting a limit of 0 fails only its region with EOPNOTSUPP, with nothing
/// issued and its data untouched.
#[test]
fn io10_io11_discard_and_write_zeroes() {
    let kinds: [NamedRequest; 3] = [
        ("discard", DmIoRequest::discard),
        ("write-zeroes", DmIoRequest::write_zeroes),
        ("write-zeroes NOUNMAP", || DmIoRequest::write_zeroes().with_flags(ReqFlags::NOUNMAP)),
    ];
    for backing in backings() {
        let tds = TestDevice::many(backing, DEV_SIZE, 2);
        let (a, b) = (&tds[0].dev, &tds[1].dev);
        for (e, engine) in ENGINES.into_iter().enumerate() {
            let client = client(engine);
            for (k, (what, make)) in kinds.iter().enumerate() {
                let at = format!("{backing}/{engine:?}/{what}");
                let op = make().op;
                let seed = 100 + 10 * e as u64 + k as u64;
                write_pattern(&client, a, 0, 1024, seed);
                write_pattern(&client, b, 0, 1024, seed);
                let nounmap = what.contains("NOUNMAP");
                let supported = |dev: &BlockDevice| {
                    if op == DmIoOp::Discard {
                        dev.supports_discard()
                    } else if nounmap && dev.is_block_device() {
                        // No fallback-free no-unmap zeroing exists for block
                        // devices: dm-io reports EOPNOTSUPP instead.
                        false
                    } else {
                        dev.supports_write_zeroes()
                    }
                };
                // Whole range at once.
                a.faults().start_trace();
                let done = client.io_sync(make(), &[DmIoRegion::new(a, 256, 128)]).expect("valid");
                let trace = a.faults().take_trace();
                if supported(a) {
                    assert!(done.is_ok(), "{at}: {:?}", done.failures);
                    assert_covers(&trace, op, 0, 256, 128, 128, &at);
                    check_zeroed(&disk(a, 0, 1024), 0, 256..384, seed, &at);
                    check_zeroed(&read_region(&client, a, 0, 1024), 0, 256..384, seed, &at);
                } else {
                    assert_eq!(done.error_bits.bits(), 1, "{at}");
                    assert!(done.failures[0].is_not_supported(), "{at}");
                    assert!(
                        trace.iter().all(|t| t.op != op),
                        "{at}: {op} issued to a device that cannot do it: {trace:?}"
                    );
                    check_pattern(&disk(a, 0, 1024), 0, seed)
                        .unwrap_or_else(|e| panic!("{at}: {e}"));
                    continue;
                }
                // Split by a 32 KiB limit.
                let limit = LimitOverrides {
                    max_discard_bytes: Some(32 << 10),
                    max_write_zeroes_bytes: Some(32 << 10),
                    ..Default::default()
                };
                a.faults().override_limits(limit);
                a.faults().start_trace();
                let done = client.io_sync(make(), &[DmIoRegion::new(a, 512, 256)]).expect("valid");
                assert!(done.is_ok(), "{at}: {:?}", done.failures);
                let n = assert_covers(&a.faults().take_trace(), op, 0, 512, 256, 64, &at);
                assert_eq!(n, 4, "{at}: 128 KiB in 32 KiB pieces");
                check_zeroed(&disk(a, 0, 512), 0, 256..384, seed, &at);
                check_zeroed(&disk(a, 512, 512), 512, 512..768, seed, &at);
                // Not supported on device a only: bit 0 alone, EOPNOTSUPP, nothing
                // issued to a, data untouched; region 1 on device b is done.
                a.faults().override_limits(LimitOverrides {
                    max_discard_bytes: Some(0),
                    max_write_zeroes_bytes: Some(0),
                    ..Default::default()
                });
                a.faults().start_trace();
                b.faults().start_trace();
                let regions = [DmIoRegion::new(a, 768, 128), DmIoRegion::new(b, 768, 128)];
                let done = client.io_sync(make(), &regions).expect("valid");
                assert_eq!(done.error_bits.bits(), 0b01, "{at}: {:?}", done.failures);
                assert_eq!(done.failures.len(), 1, "{at}");
                let f = &done.failures[0];
                assert!(f.is_not_supported(), "{at}: {f:?}");
                assert_eq!((f.region, f.op, f.errno.raw()), (0, op, libc::EOPNOTSUPP), "{at}");
                assert_eq!(
                    a.faults().take_trace(),
                    vec![],
                    "{at}: I/O issued to an unsupported device"
                );
                assert_covers(&b.faults().take_trace(), op, 1, 768, 128, 128, &at);
                check_pattern(&disk(a, 768, 256), 768, seed)
                    .unwrap_or_else(|e| panic!("{at}: {e}"));
                check_zeroed(&disk(b, 512, 512), 512, 768..896, seed, &at);
                a.faults().override_limits(LimitOverrides::default());
            }
        }
    }
}

/// IO-12: scattered memory (bio vector segments at odd block-aligned offsets in
/// pages at descending addresses, a page list with a block-aligned start offset)
/// puts the same bytes on the device as a contiguous buffer, and reads back
/// into scattered memory correctly.
#[test]
fn io12_scattered_memory_gives_the_same_bytes() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let lbs = td.dev.logical_block_size() as usize;
        let pool = client.page_pool();
        let mut rng = Rng(0xfeed + lbs as u64);
        let sectors = 200 * 8; // 800 KiB: a multiple of any block size
        let len = sectors as usize * 512;
        let bytes = pattern(0, sectors, 12);
        // Contiguous at sector 0, bio vector at 2048, page list at 4096.
        let contiguous = DmIoMemory::Kmem(AlignedBuf::from_slice(&bytes));
        let mut bvec = DmIoMemory::Bvec(scattered_bvec(pool, len, lbs, &mut rng));
        bvec.copy_from_slice(0, &bytes);
        let offset = if lbs < PAGE_SIZE { 3 * lbs } else { PAGE_SIZE };
        let pages = scattered_pages(pool, (offset + len).div_ceil(PAGE_SIZE));
        let mut list = DmIoMemory::PageList(PageList::with_offset(pages, offset));
        list.copy_from_slice(0, &bytes);
        for (start, mem) in [(0u64, contiguous), (2048, bvec), (4096, list)] {
            let kind = mem.kind_name();
            let done = client
                .io_sync(DmIoRequest::write(mem), &[DmIoRegion::new(&td.dev, start, sectors)])
                .expect("valid");
            assert!(done.is_ok(), "{at}/{kind}: {:?}", done.failures);
        }
        let reference = disk(&td.dev, 0, sectors);
        check_pattern(&reference, 0, 12).unwrap_or_else(|e| panic!("{at}: {e}"));
        assert!(
            disk(&td.dev, 2048, sectors) == reference,
            "{at}: the bio vector wrote other bytes"
        );
        assert!(disk(&td.dev, 4096, sectors) == reference, "{at}: the page list wrote other bytes");
        // Read back into fresh scattered memory.
        let back = DmIoMemory::Bvec(scattered_bvec(pool, len, lbs, &mut rng));
        let done = client
            .io_sync(DmIoRequest::read(back), &[DmIoRegion::new(&td.dev, 2048, sectors)])
            .expect("valid");
        let back = done.into_result().unwrap().unwrap().to_vec();
        assert!(back == reference, "{at}: a scattered read returned other bytes");
    }
}

/// IO-13: a 4 MiB region is split into ops of at most `max_op_bytes` (64 KiB)
/// that cover it exactly, for writes and reads; a page list of scattered pages
/// with 3 iovecs per op is split into ops of at most 3 pages; short transfers
/// are resubmitted and the data is still correct, with no error.
#[test]
fn io13_splitting_and_short_transfers() {
    for (backing, engine) in configs() {
        let at = label(backing, engine);
        let td = TestDevice::new(backing, DEV_SIZE);
        let dev = &td.dev;
        let lbs = dev.logical_block_size() as usize;

        // The op cap.
        let client = client_with(engine, 64 << 10, 256);
        let sectors = 8192; // 4 MiB
        dev.faults().start_trace();
        write_pattern(&client, dev, 4096, sectors, 13);
        let n =
            assert_covers(&dev.faults().take_trace(), DmIoOp::Write, 0, 4096, sectors, 128, &at);
        assert_eq!(n, 64, "{at}: 4 MiB in 64 KiB ops");
        dev.faults().start_trace();
        let back = read_region(&client, dev, 4096, sectors);
        assert_covers(&dev.faults().take_trace(), DmIoOp::Read, 0, 4096, sectors, 128, &at);
        check_pattern(&back, 4096, 13).unwrap_or_else(|e| panic!("{at}: {e}"));
        check_pattern(&disk(dev, 4096, sectors), 4096, 13).unwrap_or_else(|e| panic!("{at}: {e}"));
        drop(client);

        // The iovec limit: 3 iovecs of never-adjacent pages per op.
        let client = client_with(engine, 1 << 20, 3);
        let region_sectors = 512; // 256 KiB
        let len = region_sectors as usize * 512;
        let offset = if lbs < PAGE_SIZE { lbs } else { 0 };
        let pages = scattered_pages(client.page_pool(), (offset + len).div_ceil(PAGE_SIZE));
        let mut list = DmIoMemory::PageList(PageList::with_offset(pages, offset));
        list.copy_from_slice(0, &pattern(0, region_sectors, 14));
        dev.faults().start_trace();
        let done = client
            .io_sync(DmIoRequest::write(list), &[DmIoRegion::new(dev, 0, region_sectors)])
            .expect("valid");
        assert!(done.is_ok(), "{at}: {:?}", done.failures);
        let max = (3 * PAGE_SIZE / 512) as u64;
        let n = assert_covers(
            &dev.faults().take_trace(),
            DmIoOp::Write,
            0,
            0,
            region_sectors,
            max,
            &at,
        );
        assert!(n >= len.div_ceil(3 * PAGE_SIZE), "{at}: only {n} ops for 3 iovecs each");
        check_pattern(&disk(dev, 0, region_sectors), 0, 14).unwrap_or_else(|e| panic!("{at}: {e}"));
        let pages = scattered_pages(client.page_pool(), (offset + len).div_ceil(PAGE_SIZE));
        let list = DmIoMemory::PageList(PageList::with_offset(pages, offset));
        dev.faults().start_trace();
        let done = client
            .io_sync(DmIoRequest::read(list), &[DmIoRegion::new(dev, 0, region_sectors)])
            .expect("valid");
        assert_covers(&dev.faults().take_trace(), DmIoOp::Read, 0, 0, region_sectors, max, &at);
        let back = done.into_result().unwrap().unwrap().to_vec()[..len].to_vec();
        check_pattern(&back, 0, 14).unwrap_or_else(|e| panic!("{at}: {e}"));
        drop(client);

        // Short transfers: every op first transfers only one or two blocks.
        let client = client_with(engine, 64 << 10, 256);
        dev.faults().add(FaultRule::short_transfers(OpSet::WRITE, 2 * lbs as u64));
        dev.faults()
            .add(FaultRule::short_transfers(OpSet::READ, lbs as u64).when(Trigger::EveryNth(2)));
        write_pattern(&client, dev, 1024, 1024, 15);
        let back = read_region(&client, dev, 1024, 1024);
        dev.faults().clear_rules();
        check_pattern(&back, 1024, 15).unwrap_or_else(|e| panic!("{at}: {e}"));
        check_pattern(&disk(dev, 1024, 1024), 1024, 15).unwrap_or_else(|e| panic!("{at}: {e}"));
        let stats = client.stats();
        // 8 write ops and 4 of the 8 read ops were cut short.
        assert!(stats.short_transfers >= 12, "{at}: {stats:?}");
    }
}

/// IO-15: the error bits of an asynchronous request: writes fail on regions 0
/// and 2 (of 4, on two devices) with different errnos; the one callback gets
/// bits 0b0101, each failure with its region, device, sector and errno.
#[test]
fn io15_per_region_error_bits_async() {
    for backing in backings() {
        let tds = TestDevice::many(backing, DEV_SIZE, 2);
        let (a, b) = (&tds[0].dev, &tds[1].dev);
        for engine in ENGINES {
            let at = label(backing, engine);
            let client = client(engine);
            a.faults().add(FaultRule::fail(OpSet::WRITE, 0..64, libc::EIO));
            b.faults().add(FaultRule::fail(OpSet::WRITE, 1024..1088, libc::ENOSPC));
            let regions = [
                DmIoRegion::new(a, 0, 64),
                DmIoRegion::new(b, 0, 64),
                DmIoRegion::new(b, 1024, 64),
                DmIoRegion::new(a, 1024, 64),
            ];
            let (tx, rx) = std::sync::mpsc::channel();
            let req = DmIoRequest::write(AlignedBuf::from_slice(&pattern(0, 64, 15)))
                .on_complete(move |done| tx.send(done).unwrap());
            client.submit(req, &regions).expect("valid");
            let done = rx.recv_timeout(Duration::from_secs(10)).expect("the callback ran");
            assert!(rx.recv_timeout(Duration::from_millis(50)).is_err(), "{at}: a second callback");
            assert_eq!(done.error_bits.bits(), 0b0101, "{at}: {:?}", done.failures);
            let failed: BTreeSet<(usize, i32)> =
                done.failures.iter().map(|f| (f.region, f.errno.raw())).collect();
            assert_eq!(failed, BTreeSet::from([(0, libc::EIO), (2, libc::ENOSPC)]), "{at}");
            for f in &done.failures {
                let region = &regions[f.region];
                assert_eq!(f.device.path(), region.device.path(), "{at}: {f:?}");
                assert!(
                    (region.sector..region.sector + region.count).contains(&f.sector),
                    "{at}: {f:?}"
                );
            }
            assert!(done.memory.is_some(), "{at}: memory not handed back");
            a.faults().clear_rules();
            b.faults().clear_rules();
        }
    }
}

/// IO-16: a failed read leaves zeros, exactly over the failed op's range, in
/// memory pre-filled with 0xAA; the other ops' data arrive and the bytes after
/// the region are untouched. Checked with a contiguous buffer and a bio vector.
#[test]
fn io16_failed_read_is_zero_filled() {
    for (at, td, client) in scenarios_with(DEV_SIZE, |e| client_with(e, 64 << 10, 256)) {
        let dev = &td.dev;
        let (start, sectors) = (2048u64, 1024u64); // 512 KiB in 64 KiB ops
        write_pattern(&client, dev, start, sectors, 16);
        let fail_at = start + 200;
        dev.faults().add(FaultRule::fail(OpSet::READ, fail_at..fail_at + 1, libc::EIO));
        let len = (sectors * 512) as usize;
        let tail = 8192;
        let mut kmem = AlignedBuf::new(len + tail);
        kmem.fill(0xaa);
        let mut bvec = DmIoMemory::Bvec(scattered_bvec(
            client.page_pool(),
            len + tail,
            dev.logical_block_size() as usize,
            &mut Rng(16),
        ));
        bvec.for_each_slice_mut(|_, s| s.fill(0xaa));
        for mem in [DmIoMemory::Kmem(kmem), bvec] {
            let kind = mem.kind_name();
            let at = format!("{at}/{kind}");
            dev.faults().start_trace();
            let done = client
                .io_sync(DmIoRequest::read(mem), &[DmIoRegion::new(dev, start, sectors)])
                .expect("valid");
            let trace = dev.faults().take_trace();
            assert_eq!(done.error_bits.bits(), 1, "{at}");
            let failed: Vec<&TracedOp> = trace.iter().filter(|o| o.fault.is_some()).collect();
            assert_eq!(failed.len(), 1, "{at}: {trace:?}");
            let op = failed[0];
            assert_eq!(op.fault, Some(FaultAction::Fail(libc::EIO)), "{at}");
            assert!((op.sector..op.sector + op.sectors).contains(&fail_at), "{at}: {op:?}");
            assert_eq!(done.failures.len(), 1, "{at}");
            assert_eq!(
                (done.failures[0].sector, done.failures[0].errno.raw(), done.failures[0].op),
                (op.sector, libc::EIO, DmIoOp::Read),
                "{at}"
            );
            let bytes = done.memory.expect("memory back").to_vec();
            let (region, after) = bytes.split_at(len);
            check_zeroed(region, start, op.sector..op.sector + op.sectors, 16, &at);
            assert!(after.iter().all(|&b| b == 0xaa), "{at}: bytes after the region changed");
        }
        dev.faults().clear_rules();
    }
}

/// IO-17: one region failing does not stop the others: with every write to
/// region 0's device failing, regions 1 and 2 (on two other devices, split in
/// several ops each) are fully written and only bit 0 is set.
#[test]
fn io17_one_region_fails_the_others_are_written() {
    for backing in backings() {
        let tds = TestDevice::many(backing, DEV_SIZE, 3);
        for (e, engine) in ENGINES.into_iter().enumerate() {
            let at = label(backing, engine);
            let client = client_with(engine, 64 << 10, 256);
            let seed = 170 + e as u64;
            tds[0].dev.faults().add(FaultRule::fail(OpSet::WRITE, 0..u64::MAX, libc::EIO));
            let starts = [0u64, 2048, 8192];
            let regions: Vec<DmIoRegion> =
                (0..3).map(|i| DmIoRegion::new(&tds[i].dev, starts[i], 1024)).collect();
            for td in &tds {
                td.dev.faults().start_trace();
            }
            let data = AlignedBuf::from_slice(&pattern(0, 1024, seed));
            let done = client.io_sync(DmIoRequest::write(data), &regions).expect("valid");
            assert_eq!(done.error_bits.bits(), 0b001, "{at}: {:?}", done.failures);
            assert!(done.failures.iter().all(|f| f.region == 0), "{at}");
            for i in 1..3 {
                let trace = tds[i].dev.faults().take_trace();
                assert!(trace.iter().all(|o| o.fault.is_none()), "{at}");
                assert_covers(&trace, DmIoOp::Write, i, starts[i], 1024, 128, &at);
                check_pattern(&disk(&tds[i].dev, starts[i], 1024), 0, seed)
                    .unwrap_or_else(|e| panic!("{at}: region {i}: {e}"));
            }
            let trace = tds[0].dev.faults().take_trace();
            assert!(trace.iter().all(|o| o.fault.is_some()), "{at}");
            tds[0].dev.faults().clear_rules();
        }
    }
}

/// IO-18: the request's I/O priority is on every read and write op: every
/// piece of a split write and read, including ops whose transfers came back
/// short and were resubmitted. The preflush carries none (userspace flushes
/// have no priority field), and the trace says so.
#[test]
fn io18_ioprio_on_every_op() {
    for (at, td, client) in scenarios_with(DEV_SIZE, |e| client_with(e, 64 << 10, 256)) {
        let dev = &td.dev;
        let lbs = u64::from(dev.logical_block_size());
        let prio = IoPriority::new(IoPriorityClass::BestEffort, 3);
        dev.faults().add(FaultRule::short_transfers(OpSet::READ | OpSet::WRITE, lbs));
        dev.faults().start_trace();
        let req = DmIoRequest::write(AlignedBuf::from_slice(&pattern(512, 1024, 18)))
            .with_flags(ReqFlags::PREFLUSH)
            .with_ioprio(prio);
        let done = client.io_sync(req, &[DmIoRegion::new(dev, 512, 1024)]).expect("valid");
        assert!(done.is_ok(), "{at}: {:?}", done.failures);
        let req = DmIoRequest::read(AlignedBuf::new(1024 * 512)).with_ioprio(prio);
        let done = client.io_sync(req, &[DmIoRegion::new(dev, 512, 1024)]).expect("valid");
        let back = done.into_result().unwrap().unwrap().to_vec();
        check_pattern(&back, 512, 18).unwrap_or_else(|e| panic!("{at}: {e}"));
        let trace = dev.faults().take_trace();
        dev.faults().clear_rules();
        assert_eq!(trace.len(), 1 + 8 + 8, "{at}: {trace:?}");
        for o in &trace {
            let expected = if o.op == DmIoOp::Flush { 0 } else { prio.raw() };
            assert_eq!(o.ioprio, expected, "{at}: {o:?}");
        }
        assert_eq!(trace[0].op, DmIoOp::Flush, "{at}: the preflush comes first");
        assert!(client.stats().short_transfers >= 16, "{at}: {:?}", client.stats());
        // The default priority is recorded as such.
        dev.faults().start_trace();
        let _ = read_region(&client, dev, 512, 8);
        assert_eq!(dev.faults().take_trace()[0].ioprio, 0, "{at}");
    }
}

/// Sets the device's atomic write unit to `unit` bytes (0: no atomic writes).
fn set_atomic_unit(dev: &BlockDevice, unit: u32) {
    dev.faults().override_limits(LimitOverrides {
        atomic_write_max_bytes: Some(unit),
        ..Default::default()
    });
}

/// An ATOMIC write of `sectors` sectors of pattern.
fn atomic_write(sectors: u64) -> DmIoRequest {
    DmIoRequest::write(AlignedBuf::from_slice(&pattern(0, sectors, 20)))
        .with_flags(ReqFlags::ATOMIC)
}

/// Asserts that `req` is refused with `AtomicWrite` naming `region` and `dev`,
/// with nothing issued to `dev`.
fn assert_atomic_refused(
    client: &DmIoClient,
    dev: &BlockDevice,
    req: DmIoRequest,
    regions: &[DmIoRegion],
    region: usize,
    what: &str,
) {
    dev.faults().start_trace();
    let result = client.io_sync(req, regions);
    let trace = dev.faults().take_trace();
    match &result {
        Err(DmIoError::AtomicWrite { region: r, path, .. }) => {
            assert_eq!(*r, region, "{what}: {result:?}");
            assert_eq!(path, dev.path(), "{what}");
        }
        other => panic!("{what}: expected AtomicWrite for region {region}, got {other:?}"),
    }
    assert_eq!(trace, vec![], "{what}: something was issued");
}

/// IO-20: atomic writes the device cannot do are refused before anything is
/// issued: a region larger than the device's atomic unit, not a power of two,
/// not naturally aligned, on scattered memory, on a device without atomic
/// writes, and ATOMIC on a read.
#[test]
fn io20_impossible_atomic_writes_are_refused() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let dev = &td.dev;
        set_atomic_unit(dev, 16384);
        let one = |sector, count| [DmIoRegion::new(dev, sector, count)];
        let check = |req, regions: &[DmIoRegion], what: &str| {
            assert_atomic_refused(&client, dev, req, regions, 0, &format!("{at}: {what}"))
        };
        check(atomic_write(64), &one(0, 64), "larger than the unit");
        check(atomic_write(24), &one(0, 24), "not a power of two");
        check(atomic_write(16), &one(8, 16), "not naturally aligned");
        let pages = scattered_pages(client.page_pool(), 2);
        let scattered = DmIoRequest::write(PageList::new(pages)).with_flags(ReqFlags::ATOMIC);
        check(scattered, &one(0, 16), "scattered memory");
        let read = DmIoRequest::read(AlignedBuf::new(8192)).with_flags(ReqFlags::ATOMIC);
        check(read, &one(0, 16), "an atomic read");
        set_atomic_unit(dev, 0);
        check(atomic_write(8), &one(0, 8), "a device without atomic writes");
        dev.faults().override_limits(LimitOverrides::default());
    }
}

/// IO-20: every region of an atomic write is checked, not only the first one
/// on each device: a second, oversized region on the same device is refused.
#[test]
fn io20_every_region_of_an_atomic_write_is_checked() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let dev = &td.dev;
        set_atomic_unit(dev, 16384);
        let regions = [DmIoRegion::new(dev, 0, 16), DmIoRegion::new(dev, 1024, 64)];
        let what = format!("{at}: a 32 KiB second region with a 16 KiB unit");
        assert_atomic_refused(&client, dev, atomic_write(64), &regions, 1, &what);
    }
}

/// IO-20: an atomic region the device accepts is never split, even when it is
/// larger than the client's op cap: it goes out as one op (or is refused).
#[test]
fn io20_atomic_region_is_never_split() {
    for (at, td, client) in scenarios_with(DEV_SIZE, |e| client_with(e, 4096, 256)) {
        let dev = &td.dev;
        set_atomic_unit(dev, 16384);
        dev.faults().start_trace();
        let result = client.io_sync(atomic_write(16), &[DmIoRegion::new(dev, 0, 16)]);
        let trace = dev.faults().take_trace();
        match result {
            // The kernel may refuse RWF_ATOMIC on this device: only the split matters.
            Ok(_) => {
                let ops: Vec<(u64, u64)> = trace.iter().map(|o| (o.sector, o.sectors)).collect();
                assert_eq!(ops, vec![(0, 16)], "{at}: an atomic region was split");
            }
            Err(DmIoError::AtomicWrite { .. }) => assert_eq!(trace, vec![], "{at}"),
            Err(other) => panic!("{at}: {other:?}"),
        }
    }
}

/// Dropping a client, or closing it, waits until every submitted request has
/// completed and its callback has run (`dm_io_client_destroy`).
#[test]
fn dropping_or_closing_a_client_waits_for_its_io() {
    for (backing, engine) in configs() {
        let at = label(backing, engine);
        let td = TestDevice::new(backing, DEV_SIZE);
        let dev = &td.dev;
        dev.faults().add(FaultRule::delay(OpSet::WRITE, Duration::from_millis(60)));
        for close in [false, true] {
            let at = format!("{at}/{}", if close { "close" } else { "drop" });
            let seed = 30 + u64::from(close);
            let client = client(engine);
            let done = Arc::new(AtomicUsize::new(0));
            for k in 0..8u64 {
                let done = done.clone();
                let data = AlignedBuf::from_slice(&pattern(k * 64, 64, seed));
                let req = DmIoRequest::write(data).on_complete(move |c| {
                    if c.is_ok() && c.memory.is_some() {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                });
                client.submit(req, &[DmIoRegion::new(dev, k * 64, 64)]).expect("valid");
            }
            assert_eq!(done.load(Ordering::SeqCst), 0, "{at}: the delay did not hold the writes");
            if close {
                client.close();
                assert_eq!(done.load(Ordering::SeqCst), 8, "{at}: close returned early");
                assert!(client.is_closed(), "{at}");
                drop(client);
            } else {
                drop(client);
                assert_eq!(done.load(Ordering::SeqCst), 8, "{at}: drop returned early");
            }
            check_pattern(&disk(dev, 0, 512), 0, seed).unwrap_or_else(|e| panic!("{at}: {e}"));
        }
        dev.faults().clear_rules();
    }
}

/// The `Future` adapter, driven by `pollster`: writes and reads complete with
/// the data and the error bits; a dropped future does not cancel its request.
#[test]
fn future_adapter() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let dev = &td.dev;
        let region = DmIoRegion::new(dev, 256, 64);
        let data = AlignedBuf::from_slice(&pattern(256, 64, 21));
        let done = pollster::block_on(
            client.submit_future(DmIoRequest::write(data), std::slice::from_ref(&region)).unwrap(),
        );
        assert!(done.is_ok(), "{at}: {:?}", done.failures);
        let read = client.submit_future(
            DmIoRequest::read(client.page_pool().alloc_list(8)),
            std::slice::from_ref(&region),
        );
        let done = pollster::block_on(read.unwrap());
        let bytes = done.into_result().unwrap().unwrap().to_vec();
        check_pattern(&bytes, 256, 21).unwrap_or_else(|e| panic!("{at}: {e}"));
        // Error bits through the future.
        dev.faults().add(FaultRule::fail(OpSet::READ, 256..264, libc::EIO));
        let read = client.submit_future(
            DmIoRequest::read(AlignedBuf::new(64 * 512)),
            std::slice::from_ref(&region),
        );
        let done = pollster::block_on(read.unwrap());
        assert_eq!(done.error_bits.bits(), 1, "{at}");
        assert_eq!(done.failures[0].errno.raw(), libc::EIO, "{at}");
        dev.faults().clear_rules();
        // A dropped future: the write still happens.
        dev.faults().add(FaultRule::delay(OpSet::WRITE, Duration::from_millis(20)));
        let data = AlignedBuf::from_slice(&pattern(1024, 64, 22));
        let future = client
            .submit_future(DmIoRequest::write(data), &[DmIoRegion::new(dev, 1024, 64)])
            .unwrap();
        drop(future);
        drop(client);
        dev.faults().clear_rules();
        check_pattern(&disk(dev, 1024, 64), 1024, 22).unwrap_or_else(|e| panic!("{at}: {e}"));
    }
}

/// A shared handler (`Notify::shared`) serves many requests, each notified once
/// with its own context, error bits and memory.
#[test]
fn shared_handler_notify() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let dev = &td.dev;
        type Seen = Mutex<Vec<(usize, u64, Option<Vec<u8>>)>>;
        let seen: Arc<Seen> = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let handler: Arc<dyn NotifyHandler> = Arc::new(move |done: DmIoCompletion, ctx: usize| {
            let bytes = done.memory.as_ref().map(DmIoMemory::to_vec);
            sink.lock().unwrap().push((ctx, done.error_bits.bits(), bytes));
        });
        // Request 105 writes to a failing range.
        dev.faults().add(FaultRule::fail(OpSet::WRITE, 5 * 64..5 * 64 + 8, libc::EIO));
        for ctx in 100..116usize {
            let sector = (ctx as u64 - 100) * 64;
            let data = AlignedBuf::from_slice(&pattern(sector, 64, ctx as u64));
            let req = DmIoRequest::write(data).with_notify(Notify::shared(&handler, ctx));
            client.submit(req, &[DmIoRegion::new(dev, sector, 64)]).expect("valid");
        }
        client.close();
        dev.faults().clear_rules();
        let mut seen = std::mem::take(&mut *seen.lock().unwrap());
        seen.sort_by_key(|s| s.0);
        let contexts: Vec<usize> = seen.iter().map(|s| s.0).collect();
        assert_eq!(contexts, (100..116).collect::<Vec<_>>(), "{at}: each context exactly once");
        for (ctx, bits, bytes) in seen {
            assert_eq!(bits, u64::from(ctx == 105), "{at}: context {ctx}");
            let sector = (ctx as u64 - 100) * 64;
            let bytes = bytes.expect("memory back");
            check_pattern(&bytes, sector, ctx as u64).unwrap_or_else(|e| panic!("{at}: {e}"));
            if ctx != 105 {
                check_pattern(&disk(dev, sector, 64), sector, ctx as u64)
                    .unwrap_or_else(|e| panic!("{at}: {e}"));
            }
        }
    }
}

/// A channel notify (`Notify::channel`) delivers `(context, completion)` once
/// per request, with the memory holding what was read.
#[test]
fn channel_notify() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let dev = &td.dev;
        for k in 0..16u64 {
            write_pattern(&client, dev, k * 128, 64, 200 + k);
        }
        let (tx, rx) = dmio::crossbeam_channel::unbounded();
        for k in 0..16usize {
            let req = DmIoRequest::read(AlignedBuf::new(64 * 512))
                .with_notify(Notify::channel(tx.clone(), k).expect("an unbounded channel"));
            client.submit(req, &[DmIoRegion::new(dev, k as u64 * 128, 64)]).expect("valid");
        }
        drop(tx);
        let mut got = BTreeSet::new();
        for _ in 0..16 {
            let (k, done) = rx.recv_timeout(Duration::from_secs(10)).expect("a completion");
            assert!(got.insert(k), "{at}: context {k} twice");
            let bytes = done.into_result().unwrap().expect("memory back").to_vec();
            check_pattern(&bytes, k as u64 * 128, 200 + k as u64)
                .unwrap_or_else(|e| panic!("{at}: {e}"));
        }
        let (bounded_tx, _bounded_rx) = dmio::crossbeam_channel::bounded(4);
        assert!(
            matches!(Notify::channel(bounded_tx, 0), Err(dmio::DmIoError::Config(_))),
            "{at}: a bounded channel could block the completion thread"
        );
        drop(client);
        // Every sender is gone (the client dropped the requests' notifies) and
        // nothing more arrived.
        assert!(
            matches!(
                rx.recv_timeout(Duration::from_secs(1)),
                Err(dmio::crossbeam_channel::RecvTimeoutError::Disconnected)
            ),
            "{at}: an extra completion, or a notify was kept"
        );
    }
}

/// A device opened read-only serves reads and refuses writes, discards,
/// write-zeroes and flushes (naming the region) before anything is issued.
#[test]
fn read_only_device_refuses_writes() {
    for (backing, engine) in configs() {
        let at = label(backing, engine);
        let td =
            TestDevice::with_options(backing, DEV_SIZE, dmio::DeviceOptions::new().read_only(true));
        let ro = &td.dev;
        assert!(ro.is_read_only(), "{at}");
        let rw = BlockDevice::open(ro.path()).expect("opening read-write alongside");
        let client = client(engine);
        write_pattern(&client, &rw, 64, 64, 9);
        ro.faults().start_trace();
        rw.faults().start_trace();
        check_pattern(&read_region(&client, ro, 64, 64), 64, 9)
            .unwrap_or_else(|e| panic!("{at}: {e}"));
        assert_eq!(ro.faults().take_trace().len(), 1, "{at}: the read");
        ro.faults().start_trace();
        let data = || AlignedBuf::from_slice(&pattern(0, 64, 10));
        let requests: [(DmIoOp, DmIoRequest); 4] = [
            (DmIoOp::Write, DmIoRequest::write(data())),
            (DmIoOp::Discard, DmIoRequest::discard()),
            (DmIoOp::WriteZeroes, DmIoRequest::write_zeroes()),
            (DmIoOp::Flush, DmIoRequest::flush()),
        ];
        for (op, req) in requests {
            let regions = [DmIoRegion::new(&rw, 0, 64), DmIoRegion::new(ro, 64, 64)];
            let err = client.io_sync(req, &regions).expect_err("a write to a read-only device");
            match &err {
                DmIoError::ReadOnlyDevice { region: 1, path, op: o } => {
                    assert_eq!(path, ro.path(), "{at}");
                    assert_eq!(*o, op, "{at}");
                }
                other => panic!("{at}: {op}: expected ReadOnlyDevice for region 1, got {other:?}"),
            }
            assert!(err.to_string().contains("region 1"), "{at}: {err}");
            assert!(err.to_string().contains(&ro.path().display().to_string()), "{at}: {err}");
        }
        assert_eq!(ro.faults().take_trace(), vec![], "{at}: I/O reached the read-only device");
        assert_eq!(rw.faults().take_trace().len(), 0, "{at}: the request was partly issued");
        check_pattern(&disk(ro, 64, 64), 64, 9).unwrap_or_else(|e| panic!("{at}: {e}"));
    }
}
