//! Bad input (issue 2 section 4) on every test backing with both engines: a
//! misaligned sector, count or memory segment, a region beyond the device, a
//! read with two regions, 65 regions, memory shorter than a region, a write to
//! a device opened read-only, a closed client, missing memory, a missing
//! notify, and a blocking call from inside a callback.
//!
//! Each gets its typed `DmIoError` naming the region and the reason, the same
//! through `submit`, `io_sync` and `submit_future`, before anything is issued
//! (the devices' fault-injection traces stay empty) and without calling the
//! request's callback; random garbage never panics. The `Display` text of the
//! region errors names the region index and the device path.

use std::mem::discriminant;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use dmio::{
    AlignedBuf, BioVec, BlockDevice, Bvec, DeviceOptions, DmIoClient, DmIoError, DmIoMemory,
    DmIoOp, DmIoRegion, DmIoRequest, EngineChoice, MAX_REGIONS, PAGE_SIZE, Page, PageList,
    ReqFlags,
};
use tests::{
    Rng, TestDevice, backings, check_pattern, client, configs, label, pattern, read_region,
    scenarios,
};

/// The size of every test device.
const DEV_SIZE: u64 = 8 << 20;

/// Submits the request `make` builds in all three ways (`submit` with a
/// callback, `io_sync`, `submit_future`), expecting the same kind of error from
/// each, no callback, and nothing issued to any of `devs`. Returns the error
/// from `submit`.
fn rejected(
    client: &DmIoClient,
    make: impl Fn() -> DmIoRequest,
    regions: &[DmIoRegion],
    devs: &[&BlockDevice],
    at: &str,
) -> DmIoError {
    for dev in devs {
        dev.faults().start_trace();
    }
    let (tx, rx) = mpsc::channel();
    let req = make().on_complete(move |done| {
        let _ = tx.send(done);
    });
    let err = client.submit(req, regions).expect_err(at);
    // The callback was dropped with the request, never called.
    assert!(
        matches!(
            rx.recv_timeout(Duration::from_millis(100)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        ),
        "{at}: the callback of a refused request ran"
    );
    let sync_err = client.io_sync(make(), regions).expect_err(at);
    assert_eq!(
        discriminant(&sync_err),
        discriminant(&err),
        "{at}: io_sync: {sync_err:?} vs {err:?}"
    );
    let future_err = client.submit_future(make(), regions).expect_err(at);
    assert_eq!(discriminant(&future_err), discriminant(&err), "{at}: future: {future_err:?}");
    for dev in devs {
        let trace = dev.faults().take_trace();
        assert!(trace.is_empty(), "{at}: a refused request issued {trace:?}");
    }
    err
}

/// A write of `sectors` sectors of pattern.
fn write_of(sectors: u64) -> DmIoRequest {
    DmIoRequest::write(AlignedBuf::from_slice(&pattern(0, sectors, 1)))
}

/// A misaligned start sector is refused with `MisalignedSector` naming the
/// region, the device, the sector and the block size. Only possible where the
/// logical block is larger than a sector (4096-byte loop devices, files on
/// 4 KiB filesystems); on 512-byte devices every sector is aligned, and a
/// one-sector region there is accepted.
#[test]
fn misaligned_sector() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let dev = &td.dev;
        let bs = td.block_sectors();
        if bs == 1 {
            eprintln!("{at}: 512-byte blocks: no sector is misaligned; checking one is accepted");
            let done = client.io_sync(write_of(1), &[DmIoRegion::new(dev, 1, 1)]).unwrap();
            assert!(done.is_ok(), "{at}: {:?}", done.failures);
            continue;
        }
        for sector in [1, bs / 2, bs + 1] {
            let regions = [DmIoRegion::new(dev, 0, bs), DmIoRegion::new(dev, sector, bs)];
            for (what, make) in [
                ("write", (|| write_of(64)) as fn() -> DmIoRequest),
                ("discard", DmIoRequest::discard),
                ("flush", DmIoRequest::flush),
            ] {
                let at = format!("{at}/{what} at sector {sector}");
                let err = rejected(&client, make, &regions, &[dev], &at);
                match &err {
                    DmIoError::MisalignedSector { region: 1, path, sector: s, block_size } => {
                        assert_eq!(path, dev.path(), "{at}");
                        assert_eq!(*s, sector, "{at}");
                        assert_eq!(*block_size, dev.logical_block_size(), "{at}");
                    }
                    other => panic!("{at}: expected MisalignedSector for region 1, got {other:?}"),
                }
            }
            let read = move || DmIoRequest::read(AlignedBuf::new(64 * 512));
            let err = rejected(&client, read, &regions[1..], &[dev], &at);
            assert!(matches!(err, DmIoError::MisalignedSector { region: 0, .. }), "{at}: {err:?}");
        }
    }
}

/// A sector count that is not a whole number of logical blocks is refused with
/// `MisalignedCount` (4096-byte loop devices, and the file when its block size,
/// as read from the device, is larger than 512; skipped with a note otherwise).
#[test]
fn misaligned_count() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let dev = &td.dev;
        let bs = td.block_sectors();
        if bs == 1 {
            eprintln!("{at}: 512-byte blocks: every count is aligned; sub-case skipped");
            continue;
        }
        for count in [1, bs - 1, bs + 1, 3 * bs / 2] {
            let at = format!("{at}/count {count}");
            let regions = [DmIoRegion::new(dev, 0, bs), DmIoRegion::new(dev, 8 * bs, count)];
            let err = rejected(&client, || write_of(4 * bs), &regions, &[dev], &at);
            match &err {
                DmIoError::MisalignedCount { region: 1, path, count: c, block_size } => {
                    assert_eq!(path, dev.path(), "{at}");
                    assert_eq!((*c, *block_size), (count, dev.logical_block_size()), "{at}");
                }
                other => panic!("{at}: expected MisalignedCount for region 1, got {other:?}"),
            }
            let read = || DmIoRequest::read(AlignedBuf::new(8192));
            let err = rejected(&client, read, &regions[1..], &[dev], &at);
            assert!(matches!(err, DmIoError::MisalignedCount { region: 0, .. }), "{at}: {err:?}");
            let err = rejected(&client, DmIoRequest::write_zeroes, &regions, &[dev], &at);
            assert!(matches!(err, DmIoError::MisalignedCount { region: 1, .. }), "{at}: {err:?}");
        }
    }
}

/// A bio vector of a whole page, then `(offset, len)` in a page, then whole pages.
fn bvec_with(offset: usize, len: usize, pages: usize) -> Bvec {
    let mut segments = vec![BioVec::whole(Page::new())];
    segments.push(BioVec::new(Page::new(), offset, len).expect("a segment within its page"));
    segments.extend((0..pages).map(|_| BioVec::whole(Page::new())));
    Bvec::new(segments)
}

/// Memory that breaks the device's direct-I/O alignment is refused with
/// `MisalignedMemory` naming the region, the device, the segment and the rule:
/// a segment at an address that is not a multiple of the memory alignment (on
/// every device), and, where the logical block is larger than 512 bytes, a
/// segment or page-list start at a block-unaligned offset. On 512-byte devices
/// such 512-aligned memory is accepted and works.
#[test]
fn misaligned_memory() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let dev = &td.dev;
        let lbs = dev.logical_block_size() as usize;
        let mem_align = dev.info().dio_mem_align as usize;
        // Region 0 has count 0 (skipped, not checked); region 1 is the one.
        let regions = [DmIoRegion::new(dev, 0, 0), DmIoRegion::new(dev, 64, 16)];
        let expect = |err: &DmIoError, segment: usize, kind: &str, reason: &str, at: &str| match err
        {
            DmIoError::MisalignedMemory {
                region: 1, path, segment: s, kind: k, reason: r, ..
            } => {
                assert_eq!(path, dev.path(), "{at}");
                assert_eq!((*s, *k), (segment, kind), "{at}: {err}");
                assert!(r.contains(reason), "{at}: {err}");
            }
            other => panic!("{at}: expected MisalignedMemory for region 1, got {other:?}"),
        };

        // A misaligned address, in segment 1.
        if mem_align > 1 {
            let off = mem_align / 2;
            let make = || DmIoRequest::write(bvec_with(off, PAGE_SIZE - off, 2));
            let err = rejected(&client, make, &regions, &[dev], &format!("{at}/address"));
            expect(&err, 1, "bio vector", "address", &format!("{at}/address"));
            let make = || DmIoRequest::read(bvec_with(off, PAGE_SIZE - off, 2));
            let err = rejected(&client, make, &regions[1..], &[dev], &format!("{at}/address"));
            assert!(
                matches!(err, DmIoError::MisalignedMemory { region: 0, segment: 1, .. }),
                "{at}: {err:?}"
            );
        } else {
            eprintln!("{at}: memory alignment of 1 byte: no address is misaligned");
        }

        // A 512-aligned segment and a page list starting 512 bytes in.
        let bvec = || {
            DmIoRequest::write(Bvec::new(vec![
                BioVec::new(Page::new(), 512, PAGE_SIZE - 512).unwrap(),
                BioVec::whole(Page::new()),
                BioVec::whole(Page::new()),
            ]))
        };
        let list = || {
            DmIoRequest::write(PageList::with_offset(
                vec![Page::new(), Page::new(), Page::new()],
                512,
            ))
        };
        if lbs > 512 {
            let at = format!("{at}/block-unaligned segment");
            let err = rejected(&client, bvec, &regions, &[dev], &at);
            expect(&err, 0, "bio vector", "logical block size", &at);
            let err = rejected(&client, list, &regions, &[dev], &at);
            expect(&err, 0, "page list", "logical block size", &at);
        } else {
            for (what, make) in [("bio vector", bvec as fn() -> DmIoRequest), ("page list", list)] {
                let mut req = make();
                req.memory.as_mut().unwrap().copy_from_slice(0, &pattern(64, 16, 5));
                let done =
                    client.io_sync(req, &regions).expect("512-aligned memory on 512-byte blocks");
                assert!(done.is_ok(), "{at}/{what}: {:?}", done.failures);
                let back = read_region(&client, dev, 64, 16);
                check_pattern(&back, 64, 5).unwrap_or_else(|e| panic!("{at}/{what}: {e}"));
            }
        }
    }
}

/// A region reaching beyond the end of its device (or overflowing) is refused
/// with `OutOfRange`; a region ending exactly at the end is accepted.
#[test]
fn region_beyond_the_device() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let dev = &td.dev;
        let bs = td.block_sectors();
        let end = dev.size_sectors();
        assert_eq!(end, DEV_SIZE / 512, "{at}");
        let huge = u64::MAX / bs * bs;
        for (sector, count) in [(end - bs, 2 * bs), (end, bs), (huge, bs), (0, huge), (huge, huge)]
        {
            let at = format!("{at}/sectors {sector}+{count}");
            let regions = [DmIoRegion::new(dev, 0, bs), DmIoRegion::new(dev, sector, count)];
            for (what, make) in [
                ("write", (|| write_of(64)) as fn() -> DmIoRequest),
                ("discard", DmIoRequest::discard),
                ("write-zeroes", DmIoRequest::write_zeroes),
                ("flush", DmIoRequest::flush),
            ] {
                let at = format!("{at}/{what}");
                let err = rejected(&client, make, &regions, &[dev], &at);
                match &err {
                    DmIoError::OutOfRange {
                        region: 1,
                        path,
                        sector: s,
                        count: c,
                        device_sectors,
                    } => {
                        assert_eq!(path, dev.path(), "{at}");
                        assert_eq!((*s, *c, *device_sectors), (sector, count, end), "{at}");
                    }
                    other => panic!("{at}: expected OutOfRange for region 1, got {other:?}"),
                }
            }
            let read = || DmIoRequest::read(AlignedBuf::new(4096));
            let err = rejected(&client, read, &regions[1..], &[dev], &at);
            assert!(matches!(err, DmIoError::OutOfRange { region: 0, .. }), "{at}: {err:?}");
        }
        // The last block is fine.
        let done = client.io_sync(write_of(bs), &[DmIoRegion::new(dev, end - bs, bs)]).unwrap();
        assert!(done.is_ok(), "{at}: {:?}", done.failures);
    }
}

/// A read naming two regions is refused with `ReadWithMultipleRegions`.
#[test]
fn read_with_two_regions() {
    for (backing, engine) in configs() {
        let at = label(backing, engine);
        let tds = TestDevice::many(backing, DEV_SIZE, 2);
        let client = client(engine);
        let regions = [DmIoRegion::new(&tds[0].dev, 0, 8), DmIoRegion::new(&tds[1].dev, 0, 8)];
        let read = || DmIoRequest::read(AlignedBuf::new(4096));
        let err = rejected(&client, read, &regions, &[&tds[0].dev, &tds[1].dev], &at);
        assert!(matches!(err, DmIoError::ReadWithMultipleRegions { regions: 2 }), "{at}: {err:?}");
    }
}

/// 65 regions are refused with `TooManyRegions`, whatever the operation.
#[test]
fn sixty_five_regions() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let regions: Vec<DmIoRegion> =
            (0..65).map(|i| DmIoRegion::new(&td.dev, i * 64, 8)).collect();
        for (what, make) in [
            ("write", (|| write_of(8)) as fn() -> DmIoRequest),
            ("discard", DmIoRequest::discard),
            ("flush", DmIoRequest::flush),
            ("read", || DmIoRequest::read(AlignedBuf::new(4096))),
        ] {
            let at = format!("{at}/{what}");
            let err = rejected(&client, make, &regions, &[&td.dev], &at);
            assert!(
                matches!(err, DmIoError::TooManyRegions { regions: 65, max: MAX_REGIONS }),
                "{at}: {err:?}"
            );
        }
    }
}

/// Memory shorter than a region is refused with `MemoryTooShort` naming the
/// region and both lengths.
#[test]
fn memory_shorter_than_the_region() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let dev = &td.dev;
        let regions = [DmIoRegion::new(dev, 0, 8), DmIoRegion::new(dev, 64, 16)];
        let err = rejected(&client, || write_of(8), &regions, &[dev], &at);
        assert!(
            matches!(err, DmIoError::MemoryTooShort { region: 1, needed: 8192, available: 4096 }),
            "{at}: {err:?}"
        );
        assert!(err.to_string().contains("region 1"), "{at}: {err}");
        let read = || DmIoRequest::read(PageList::new(vec![Page::new()]));
        let err = rejected(&client, read, &regions[1..], &[dev], &at);
        assert!(
            matches!(err, DmIoError::MemoryTooShort { region: 0, needed: 8192, available: 4096 }),
            "{at}: {err:?}"
        );
    }
}

/// Writes, discards, write-zeroes and flushes naming a device opened read-only
/// are refused with `ReadOnlyDevice` naming the region, the device and the op.
#[test]
fn write_to_a_read_only_device() {
    for (backing, engine) in configs() {
        let at = label(backing, engine);
        let td = TestDevice::with_options(backing, DEV_SIZE, DeviceOptions::new().read_only(true));
        let ro = &td.dev;
        let rw = BlockDevice::open(ro.path()).expect("opening read-write alongside");
        let client = client(engine);
        let regions = [DmIoRegion::new(&rw, 0, 8), DmIoRegion::new(ro, 8, 8)];
        for (op, make) in [
            (DmIoOp::Write, (|| write_of(8)) as fn() -> DmIoRequest),
            (DmIoOp::Discard, DmIoRequest::discard),
            (DmIoOp::WriteZeroes, DmIoRequest::write_zeroes),
            (DmIoOp::Flush, DmIoRequest::flush),
            (DmIoOp::Write, || write_of(8).with_flags(ReqFlags::PREFLUSH | ReqFlags::FUA)),
        ] {
            let at = format!("{at}/{op}");
            let err = rejected(&client, make, &regions, &[ro, &rw], &at);
            match &err {
                DmIoError::ReadOnlyDevice { region: 1, path, op: o } => {
                    assert_eq!((path.as_path(), *o), (ro.path(), op), "{at}");
                }
                other => panic!("{at}: expected ReadOnlyDevice for region 1, got {other:?}"),
            }
        }
        // Reads are fine.
        let done = client.io_sync(DmIoRequest::read(AlignedBuf::new(4096)), &regions[1..]).unwrap();
        assert!(done.is_ok(), "{at}: {:?}", done.failures);
    }
}

/// After `close`, every submission fails with `ClientClosed`, nothing is
/// issued and no callback runs.
#[test]
fn closed_client() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let region = [DmIoRegion::new(&td.dev, 0, 8)];
        let done = client.io_sync(write_of(8), &region).unwrap();
        assert!(done.is_ok(), "{at}");
        client.close();
        assert!(client.is_closed(), "{at}");
        for (what, make) in [
            ("write", (|| write_of(8)) as fn() -> DmIoRequest),
            ("read", || DmIoRequest::read(AlignedBuf::new(4096))),
            ("flush", DmIoRequest::flush),
        ] {
            let err = rejected(&client, make, &region, &[&td.dev], &format!("{at}/{what}"));
            assert!(matches!(err, DmIoError::ClientClosed), "{at}/{what}: {err:?}");
        }
        // Closing twice is harmless.
        client.close();
    }
}

/// A read or write without memory is refused with `MissingMemory`; data-less
/// operations need none.
#[test]
fn missing_memory() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let region = [DmIoRegion::new(&td.dev, 0, 8)];
        for op in [DmIoOp::Read, DmIoOp::Write] {
            let err = rejected(&client, || DmIoRequest::new(op), &region, &[&td.dev], &at);
            assert!(matches!(err, DmIoError::MissingMemory { op: o } if o == op), "{at}: {err:?}");
        }
        for op in [DmIoOp::Flush, DmIoOp::Discard, DmIoOp::WriteZeroes] {
            let done = client.io_sync(DmIoRequest::new(op), &region).expect("no memory needed");
            assert!(done.is_ok(), "{at}/{op}: {:?}", done.failures);
        }
    }
}

/// `submit` without a notify callback is refused with `MissingNotify` (a
/// blocking call is `io_sync`); nothing is issued.
#[test]
fn missing_notify() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        td.dev.faults().start_trace();
        let err = client.submit(write_of(8), &[DmIoRegion::new(&td.dev, 0, 8)]).expect_err(&at);
        assert!(matches!(err, DmIoError::MissingNotify), "{at}: {err:?}");
        client.close();
        assert!(td.dev.faults().take_trace().is_empty(), "{at}: something was issued");
        assert_eq!(client.stats().requests, 0, "{at}");
    }
}

/// A blocking call from inside a notify callback (which runs on the completion
/// thread) returns `BlockingInCallback` instead of deadlocking; it issues
/// nothing, and the client goes on working.
#[test]
fn blocking_call_from_a_callback() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let client = Arc::new(client);
        let (tx, rx) = mpsc::channel();
        let inner_client = client.clone();
        let dev = td.dev.clone();
        td.dev.faults().start_trace();
        let req = DmIoRequest::write(AlignedBuf::from_slice(&pattern(0, 8, 4))).on_complete(
            move |done| {
                let region = [DmIoRegion::new(&dev, 64, 8)];
                let inner = inner_client.io_sync(DmIoRequest::read(AlignedBuf::new(4096)), &region);
                let _ = tx.send((done.is_ok(), inner.map(|_| ())));
            },
        );
        client.submit(req, &[DmIoRegion::new(&td.dev, 0, 8)]).unwrap();
        let (outer_ok, inner) = rx.recv_timeout(Duration::from_secs(10)).expect("the callback ran");
        assert!(outer_ok, "{at}");
        assert!(matches!(inner, Err(DmIoError::BlockingInCallback)), "{at}: {inner:?}");
        // Only the outer write was issued.
        let trace = td.dev.faults().take_trace();
        assert_eq!(trace.len(), 1, "{at}: {trace:?}");
        assert_eq!((trace[0].op, trace[0].sector), (DmIoOp::Write, 0), "{at}");
        // The client still works from an ordinary thread.
        let bytes = read_region(&client, &td.dev, 0, 8);
        check_pattern(&bytes, 0, 4).unwrap_or_else(|e| panic!("{at}: {e}"));
    }
}

/// The `Display` text of region errors names the region index and the device
/// path, and says what is wrong.
#[test]
fn error_text_names_the_region_and_the_device() {
    for backing in backings() {
        let td = TestDevice::new(backing, DEV_SIZE);
        let dev = &td.dev;
        let client = client(EngineChoice::Sync);
        let path = dev.path().display().to_string();
        let bs = td.block_sectors();
        let end = dev.size_sectors();
        let ok = DmIoRegion::new(dev, 0, bs);
        let mut cases: Vec<(Vec<DmIoRegion>, DmIoRequest, &str, &str)> = vec![
            (
                vec![ok.clone(), ok.clone(), DmIoRegion::new(dev, end, bs)],
                write_of(bs),
                "region 2",
                "beyond the end",
            ),
            (
                // Region 0 has count 0, so region 1 is the first to use the memory.
                vec![DmIoRegion::new(dev, 0, 0), DmIoRegion::new(dev, 64, 16)],
                DmIoRequest::write(bvec_with(256, 256, 1)),
                "region 1",
                "not aligned",
            ),
        ];
        if bs > 1 {
            cases.push((
                vec![ok.clone(), DmIoRegion::new(dev, 1, bs)],
                write_of(bs),
                "region 1",
                "sector 1 is not aligned",
            ));
            cases.push((
                vec![ok.clone(), DmIoRegion::new(dev, 0, 1)],
                write_of(bs),
                "region 1",
                "not a multiple of the logical block size",
            ));
        }
        for (regions, req, region, reason) in cases {
            let err = client.io_sync(req, &regions).expect_err(reason);
            let text = err.to_string();
            assert!(text.contains(region), "{backing}: {text:?} does not name {region}");
            assert!(text.contains(&path), "{backing}: {text:?} does not name {path}");
            assert!(text.contains(reason), "{backing}: {text:?} does not say {reason:?}");
        }
    }
}

/// Random garbage (any sector, count, memory length and offset, operation and
/// number of regions) never panics, and whatever is refused issued nothing.
#[test]
fn random_input_never_panics() {
    for (at, td, client) in scenarios(DEV_SIZE) {
        let dev = &td.dev;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ dev.logical_block_size() as u64);
        let mut next = move || rng.next_u64();
        let (mut refused, mut accepted) = (0, 0);
        for _ in 0..300 {
            let pick = |r: u64, choices: &[u64]| choices[(r % choices.len() as u64) as usize];
            let n = pick(next(), &[0, 1, 1, 2, 3, 64, 65, 70]) as usize;
            let regions: Vec<DmIoRegion> = (0..n)
                .map(|_| {
                    let sector =
                        pick(next(), &[0, 1, 7, 8, 64, 16376, 16384, u64::MAX - 7, u64::MAX]);
                    let count = pick(next(), &[0, 1, 7, 8, 16, 16384, u64::MAX]);
                    DmIoRegion::new(dev, sector, count)
                })
                .collect();
            let len = pick(next(), &[0, 1, 511, 512, 4096, 8192, 65536]) as usize;
            let memory: DmIoMemory = match next() % 4 {
                0 => AlignedBuf::new(len).into(),
                1 => PageList::with_offset(
                    (0..len.div_ceil(PAGE_SIZE) + 1).map(|_| Page::new()).collect(),
                    pick(next(), &[0, 1, 512, 4096]) as usize,
                )
                .into(),
                2 => {
                    let offset = pick(next(), &[0, 2, 512, 1024]) as usize;
                    let seg_len = (len.max(1)).min(PAGE_SIZE - offset);
                    Bvec::new(vec![BioVec::new(Page::new(), offset, seg_len).unwrap()]).into()
                }
                _ => dmio::VirtualArea::new(len.max(1)).unwrap().into(),
            };
            let mut req = match next() % 6 {
                0 => DmIoRequest::read(memory),
                1 => DmIoRequest::write(memory),
                2 => DmIoRequest::discard(),
                3 => DmIoRequest::write_zeroes(),
                4 => DmIoRequest::flush(),
                _ => DmIoRequest::new(DmIoOp::Write),
            };
            if next() % 3 == 0 {
                req.flags |= ReqFlags::PREFLUSH;
            }
            dev.faults().start_trace();
            match client.io_sync(req, &regions) {
                Ok(_) => accepted += 1,
                Err(e) => {
                    refused += 1;
                    let trace = dev.faults().take_trace();
                    assert!(trace.is_empty(), "{at}: refused ({e}) yet issued {trace:?}");
                }
            }
        }
        assert!(refused > 0 && accepted > 0, "{at}: {refused} refused, {accepted} accepted");
    }
}
