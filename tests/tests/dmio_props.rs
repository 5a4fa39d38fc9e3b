//! Property tests (proptest) of dmio against simple models, on regular-file
//! devices with either engine:
//!
//! - splitting (IO-12, IO-13): random regions, operation caps
//!   (`max_op_bytes`), iovec limits (`iovecs_per_op`) and memory layouts (page
//!   lists with a block-aligned offset, bio vectors of block-aligned segments,
//!   contiguous buffers): the file equals a RAM model after writes, reads return
//!   the model, and the operation trace shows that no operation exceeds the cap
//!   or the iovec limit and that the operations tile each region exactly once;
//! - error bits (IO-15, IO-7, IO-17): multi-region writes with a random subset
//!   of regions in failing sector ranges: the bits are exactly that subset (never
//!   a zero-count region), every failure names its region, device, operation
//!   and the injected errno, failed regions are untouched and the others hold
//!   the data;
//! - short transfers and transient errors (IO-13): random short transfers and
//!   EAGAIN/EINTR/EBUSY on the first operations never corrupt data nor set a bit,
//!   and the client's counters account for every injected fault.

use std::sync::Arc;

use dmio::fault::{FaultAction, FaultRule, OpSet, TracedOp, Trigger};
use dmio::{
    AlignedBuf, BioVec, BlockDevice, Bvec, DmIoMemory, DmIoOp, DmIoRegion, DmIoRequest,
    EngineChoice, Errno, PAGE_SIZE, Page, PageList, PagePool, ReqFlags,
};
use proptest::prelude::*;
use tests::{Backing, TestDevice, client_with, fill_pattern, ops_of};

const DEVICE_BYTES: u64 = 4 << 20;

fn engine(sync: bool) -> EngineChoice {
    if sync { EngineChoice::Sync } else { EngineChoice::Uring }
}

/// The unit of memory offsets and lengths: the device's logical block size or
/// memory alignment, whichever is larger.
fn mem_unit(dev: &BlockDevice) -> usize {
    let info = dev.info();
    (info.logical_block_size.max(info.dio_mem_align) as usize).clamp(512, PAGE_SIZE)
}

/// A memory layout, in units of `mem_unit` (512 bytes on ordinary filesystems).
#[derive(Debug, Clone)]
enum Layout {
    Kmem,
    /// A page list starting `offset` units into the first page.
    PageList {
        offset: usize,
        heap: bool,
    },
    /// A bio vector cycling through these (offset, length) segments.
    Bvec {
        segs: Vec<(usize, usize)>,
        heap: bool,
    },
}

fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![
        Just(Layout::Kmem),
        (0usize..8, any::<bool>()).prop_map(|(offset, heap)| Layout::PageList { offset, heap }),
        (prop::collection::vec((0usize..8, 1usize..=8), 1..24), any::<bool>())
            .prop_map(|(segs, heap)| Layout::Bvec { segs, heap }),
    ]
}

fn page(pool: &PagePool, heap: bool) -> Page {
    if heap { Page::new() } else { pool.alloc() }
}

/// Memory of at least `len` bytes with `layout`.
fn build_memory(layout: &Layout, len: usize, unit: usize, pool: &PagePool) -> DmIoMemory {
    let per_page = PAGE_SIZE / unit;
    match layout {
        Layout::Kmem => DmIoMemory::Kmem(AlignedBuf::new(len)),
        Layout::PageList { offset, heap } => {
            let offset = (offset % per_page) * unit;
            let pages = (offset + len).div_ceil(PAGE_SIZE).max(1);
            let pages = (0..pages).map(|_| page(pool, *heap)).collect();
            DmIoMemory::PageList(PageList::with_offset(pages, offset))
        }
        Layout::Bvec { segs, heap } => {
            let mut out = Vec::new();
            let mut total = 0;
            for &(off, n) in segs.iter().cycle() {
                if total >= len.max(1) {
                    break;
                }
                let n = n.min(per_page).max(1);
                let off = off.min(per_page - n);
                let seg = BioVec::new(page(pool, *heap), off * unit, n * unit).unwrap();
                total += seg.len();
                out.push(seg);
            }
            DmIoMemory::Bvec(Bvec::new(out))
        }
    }
}

/// The (address, length) of each segment of `memory`, in I/O order.
fn segments(memory: &DmIoMemory) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    memory.for_each_slice(|_, bytes| out.push((bytes.as_ptr() as usize, bytes.len())));
    out
}

/// The number of iovecs needed for bytes [start, start + len) of memory with
/// these segments, merging physically adjacent pieces.
fn iovecs_needed(segs: &[(usize, usize)], start: usize, len: usize) -> usize {
    let (mut pos, mut count, mut last_end) = (0usize, 0usize, None);
    for &(addr, n) in segs {
        let (seg_start, seg_end) = (pos, pos + n);
        pos = seg_end;
        let from = start.max(seg_start);
        let to = (start + len).min(seg_end);
        if from >= to {
            continue;
        }
        let piece = addr + (from - seg_start);
        if last_end != Some(piece) {
            count += 1;
        }
        last_end = Some(addr + (to - seg_start));
    }
    count
}

/// Checks that the traced `op` operations of region `index` tile it exactly,
/// each within `cap` bytes and `max_iov` iovecs of `segs`.
fn check_tiling(
    trace: &[TracedOp],
    op: DmIoOp,
    index: usize,
    region: &DmIoRegion,
    cap: u64,
    max_iov: usize,
    segs: &[(usize, usize)],
) -> Result<(), TestCaseError> {
    let ops: Vec<TracedOp> = ops_of(trace, op).into_iter().filter(|t| t.region == index).collect();
    let mut next = region.sector;
    for t in &ops {
        prop_assert_eq!(t.sector, next, "region {} not tiled: {:?}", index, ops);
        prop_assert!(t.sectors > 0, "empty op {:?}", t);
        prop_assert!(t.sectors * 512 <= cap, "op {:?} exceeds the cap of {} bytes", t, cap);
        let mem_start = ((t.sector - region.sector) * 512) as usize;
        let iov = iovecs_needed(segs, mem_start, (t.sectors * 512) as usize);
        prop_assert!(iov <= max_iov, "op {:?} needs {} iovecs > {}", t, iov, max_iov);
        next += t.sectors;
    }
    prop_assert_eq!(next, region.sector + region.count, "region {} not covered: {:?}", index, ops);
    Ok(())
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, seed.wrapping_mul(7919), seed);
    v
}

fn span(region: &DmIoRegion) -> std::ops::Range<usize> {
    region.byte_offset() as usize..(region.byte_offset() + region.byte_len()) as usize
}

// ---------------------------------------------------------------------------
// (a) Splitting
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct SplitCase {
    sync: bool,
    max_op_pages: u64,
    iovecs: usize,
    /// (slot, offset in units, length in units): each region in its own 1 MiB slot.
    regions: Vec<(usize, u64, u64)>,
    write_layout: Layout,
    read_layout: Layout,
    seed: u64,
}

fn split_case() -> impl Strategy<Value = SplitCase> {
    (
        any::<bool>(),
        prop_oneof![1u64..=4, 5u64..=64],
        prop_oneof![1usize..=4, 5usize..=12, Just(256usize)],
        Just(vec![0usize, 1, 2, 3]).prop_shuffle(),
        prop::collection::vec((0u64..1536, 1u64..=512), 1..=3),
        layout(),
        layout(),
        any::<u64>(),
    )
        .prop_map(|(sync, max_op_pages, iovecs, slots, regs, wl, rl, seed)| SplitCase {
            sync,
            max_op_pages,
            iovecs,
            regions: regs
                .into_iter()
                .zip(slots)
                .map(|((off, len), slot)| (slot, off, len))
                .collect(),
            write_layout: wl,
            read_layout: rl,
            seed,
        })
}

fn run_split(case: &SplitCase) -> Result<(), TestCaseError> {
    let td = TestDevice::new(Backing::File, DEVICE_BYTES);
    let dev = &td.dev;
    let unit = mem_unit(dev);
    let lbs_sectors = td.block_sectors();
    let cap = case.max_op_pages * 4096;
    let client = client_with(engine(case.sync), cap, case.iovecs);
    let pool = client.page_pool();
    let slot_sectors = DEVICE_BYTES / 512 / 4;
    let regions: Vec<DmIoRegion> = case
        .regions
        .iter()
        .map(|&(slot, off, len)| {
            let count = (len * unit as u64 / 512).div_ceil(lbs_sectors) * lbs_sectors;
            let off = (off * unit as u64 / 512) / lbs_sectors * lbs_sectors;
            let off = off.min(slot_sectors - count);
            DmIoRegion::new(dev, slot as u64 * slot_sectors + off, count)
        })
        .collect();
    let len = regions.iter().map(|r| r.byte_len()).max().unwrap() as usize;
    let bytes = data(len, case.seed);
    let mut memory = build_memory(&case.write_layout, len, unit, pool);
    memory.copy_from_slice(0, &bytes);
    let segs = segments(&memory);

    let mut model = vec![0u8; DEVICE_BYTES as usize];
    dev.faults().start_trace();
    let done = client.io_sync(DmIoRequest::write(memory), &regions).unwrap();
    let trace = dev.faults().take_trace();
    prop_assert!(done.is_ok(), "write failed: {:?}", done.failures);
    for r in &regions {
        let range = span(r);
        let n = range.len();
        model[range].copy_from_slice(&bytes[..n]);
    }
    prop_assert!(td.read_back() == model, "the file differs from the model");
    let total: u64 = trace.iter().map(|t| t.sectors).sum();
    prop_assert_eq!(total, regions.iter().map(|r| r.count).sum::<u64>());
    for (i, r) in regions.iter().enumerate() {
        check_tiling(&trace, DmIoOp::Write, i, r, cap, case.iovecs, &segs)?;
    }

    // Read each region back with another layout.
    for r in &regions {
        let n = r.byte_len() as usize;
        let memory = build_memory(&case.read_layout, n, unit, pool);
        let segs = segments(&memory);
        dev.faults().start_trace();
        let done = client.io_sync(DmIoRequest::read(memory), std::slice::from_ref(r)).unwrap();
        let trace = dev.faults().take_trace();
        prop_assert!(done.is_ok(), "read failed: {:?}", done.failures);
        let got = done.memory.unwrap().to_vec();
        prop_assert!(got[..n] == model[span(r)], "read of {:?} differs", r);
        check_tiling(&trace, DmIoOp::Read, 0, r, cap, case.iovecs, &segs)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// (b) Error bits
// ---------------------------------------------------------------------------

const ERRNOS: [i32; 5] = [libc::EIO, libc::ENOSPC, libc::ENODATA, libc::EILSEQ, libc::EREMOTEIO];
/// Each device fails writes in [FAIL_ZONE, FAIL_ZONE + 64 * SLOT).
const FAIL_ZONE: u64 = 4096;
const SLOT: u64 = 64;

#[derive(Debug, Clone)]
struct BitsCase {
    sync: bool,
    max_op_pages: u64,
    errnos: [i32; 2],
    /// (device 0/1, in the failing range, sectors in 8-sector blocks 0..=4, offset in blocks)
    regions: Vec<(usize, bool, u64, u64)>,
    seed: u64,
}

fn bits_case() -> impl Strategy<Value = BitsCase> {
    (
        any::<bool>(),
        1u64..=4,
        (prop::sample::select(&ERRNOS[..]), prop::sample::select(&ERRNOS[..])),
        prop::collection::vec((0usize..2, any::<bool>(), 0u64..=4, 0u64..4), 1..=64),
        any::<u64>(),
    )
        .prop_map(|(sync, max_op_pages, (a, b), regions, seed)| BitsCase {
            sync,
            max_op_pages,
            errnos: [a, b],
            regions,
            seed,
        })
}

fn run_bits(case: &BitsCase) -> Result<(), TestCaseError> {
    let tds = TestDevice::many(Backing::File, DEVICE_BYTES, 2);
    let devs: Vec<Arc<BlockDevice>> = tds.iter().map(|t| t.dev.clone()).collect();
    for (dev, errno) in devs.iter().zip(case.errnos) {
        dev.faults().add(FaultRule::fail(OpSet::WRITE, FAIL_ZONE..FAIL_ZONE + 64 * SLOT, errno));
    }
    let cap = case.max_op_pages * 4096;
    let client = client_with(engine(case.sync), cap, 256);
    // Region i sits in slot i of its zone (good: sectors 0.., failing: FAIL_ZONE..).
    let regions: Vec<DmIoRegion> = case
        .regions
        .iter()
        .enumerate()
        .map(|(i, &(d, fail, blocks, off))| {
            let zone = if fail { FAIL_ZONE } else { 0 };
            DmIoRegion::new(&devs[d], zone + i as u64 * SLOT + off * 8, blocks * 8)
        })
        .collect();
    let len = regions.iter().map(|r| r.byte_len()).max().unwrap().max(4096) as usize;
    let bytes = data(len, case.seed);
    let done =
        client.io_sync(DmIoRequest::write(AlignedBuf::from_slice(&bytes)), &regions).unwrap();

    let expected: u64 = case
        .regions
        .iter()
        .enumerate()
        .filter(|&(_, &(_, fail, blocks, _))| fail && blocks > 0)
        .fold(0, |bits, (i, _)| bits | 1 << i);
    prop_assert_eq!(done.error_bits.bits(), expected, "failures: {:?}", done.failures);
    for f in &done.failures {
        let (d, ..) = case.regions[f.region];
        let r = &regions[f.region];
        prop_assert!(done.error_bits.is_set(f.region));
        prop_assert_eq!(f.errno, Errno(case.errnos[d]));
        prop_assert_eq!(f.op, DmIoOp::Write);
        prop_assert_eq!(f.device.id(), devs[d].id());
        prop_assert!(f.sector >= r.sector && f.sector < r.sector + r.count, "{:?}", f);
        // A failure names the first sector of its operation.
        prop_assert_eq!((f.sector - r.sector) % (cap / 512), 0, "{:?}", f);
    }
    for i in done.error_bits.iter() {
        let ops = regions[i].byte_len().div_ceil(cap);
        let n = done.failures.iter().filter(|f| f.region == i).count() as u64;
        prop_assert_eq!(n, ops, "region {}: one failure per operation", i);
    }
    let images = [tds[0].read_back(), tds[1].read_back()];
    for (i, r) in regions.iter().enumerate() {
        let (d, ..) = case.regions[i];
        let on_disk = &images[d][span(r)];
        if done.error_bits.is_set(i) {
            prop_assert!(on_disk.iter().all(|&b| b == 0), "failed region {} was written", i);
        } else {
            prop_assert!(on_disk == &bytes[..on_disk.len()], "region {} lacks the data", i);
        }
    }
    let err = done.into_result().err();
    prop_assert_eq!(err.is_some(), expected != 0);
    if let Some(dmio::DmIoError::Regions(r)) = err {
        prop_assert_eq!(r.error_bits.bits(), expected);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// (c) Short transfers and transient errors
// ---------------------------------------------------------------------------

const TRANSIENT: [i32; 3] = [libc::EAGAIN, libc::EINTR, libc::EBUSY];

#[derive(Debug, Clone)]
struct ShortCase {
    sync: bool,
    max_op_pages: u64,
    cut: u64,
    short_trigger: Trigger,
    transient: i32,
    transient_first: u64,
    transient_rule_first: bool,
    /// (slot, offset in units, length in units, layout, flags 0..4)
    writes: Vec<(u64, u64, u64, Layout, u8)>,
    seed: u64,
}

fn trigger() -> impl Strategy<Value = Trigger> {
    prop_oneof![
        Just(Trigger::Always),
        (2u64..=4).prop_map(Trigger::EveryNth),
        (1u64..=6).prop_map(Trigger::FirstN),
        (1u64..=3).prop_map(Trigger::Nth),
    ]
}

fn short_case() -> impl Strategy<Value = ShortCase> {
    (
        (any::<bool>(), 1u64..=64, 1u64..20000, trigger()),
        (prop::sample::select(&TRANSIENT[..]), 0u64..6, any::<bool>()),
        prop::collection::vec((0u64..4, 0u64..1024, 1u64..=256, layout(), 0u8..4), 1..=4),
        any::<u64>(),
    )
        .prop_map(
            |(
                (sync, max_op_pages, cut, short_trigger),
                (transient, first, order),
                writes,
                seed,
            )| {
                ShortCase {
                    sync,
                    max_op_pages,
                    cut,
                    short_trigger,
                    transient,
                    transient_first: first,
                    transient_rule_first: order,
                    writes,
                    seed,
                }
            },
        )
}

fn run_short(case: &ShortCase) -> Result<(), TestCaseError> {
    let td = TestDevice::new(Backing::File, DEVICE_BYTES);
    let dev = &td.dev;
    let unit = mem_unit(dev);
    let lbs = u64::from(dev.logical_block_size());
    let client = client_with(engine(case.sync), case.max_op_pages * 4096, 256);
    let pool = client.page_pool();
    let short =
        FaultRule::short_transfers(OpSet::READ | OpSet::WRITE, case.cut).when(case.short_trigger);
    let transient = FaultRule::fail(OpSet::all(), 0..u64::MAX, case.transient)
        .when(Trigger::FirstN(case.transient_first));
    if case.transient_rule_first {
        dev.faults().add(transient);
        dev.faults().add(short);
    } else {
        dev.faults().add(short);
        dev.faults().add(transient);
    }
    dev.faults().start_trace();

    let slot_sectors = DEVICE_BYTES / 512 / 4;
    let mut model = vec![0u8; DEVICE_BYTES as usize];
    let mut regions = Vec::new();
    for (k, (slot, off, len, layout, flags)) in case.writes.iter().enumerate() {
        let count = (len * unit as u64).div_ceil(lbs) * lbs / 512;
        let off = ((off * unit as u64) / lbs * lbs / 512).min(slot_sectors - count);
        let r = DmIoRegion::new(dev, slot * slot_sectors + off, count);
        let n = r.byte_len() as usize;
        let bytes = data(n, case.seed.wrapping_add(k as u64));
        let mut memory = build_memory(layout, n, unit, pool);
        memory.copy_from_slice(0, &bytes);
        let flags = [
            ReqFlags::empty(),
            ReqFlags::FUA,
            ReqFlags::PREFLUSH,
            ReqFlags::PREFLUSH | ReqFlags::FUA,
        ][*flags as usize];
        let done = client
            .io_sync(DmIoRequest::write(memory).with_flags(flags), std::slice::from_ref(&r))
            .unwrap();
        prop_assert!(done.is_ok(), "write {} failed: {:?}", k, done.failures);
        model[span(&r)].copy_from_slice(&bytes);
        regions.push((r, layout.clone()));
    }
    for (r, layout) in &regions {
        let n = r.byte_len() as usize;
        let memory = build_memory(layout, n, unit, pool);
        let done = client.io_sync(DmIoRequest::read(memory), std::slice::from_ref(r)).unwrap();
        prop_assert!(done.is_ok(), "read failed: {:?}", done.failures);
        let got = done.memory.unwrap().to_vec();
        prop_assert!(got[..n] == model[span(r)], "read of {:?} differs", r);
    }
    prop_assert!(td.read_back() == model, "the file differs from the model");

    let trace = dev.faults().take_trace();
    let stats = client.stats();
    let transients =
        trace.iter().filter(|t| t.fault == Some(FaultAction::Fail(case.transient))).count() as u64;
    prop_assert_eq!(stats.retries, transients, "{:?}", stats);
    let effective_cut = (case.cut / lbs * lbs).max(lbs);
    let shortened = trace
        .iter()
        .filter(|t| {
            matches!(t.fault, Some(FaultAction::ShortTransfer(_)))
                && t.sectors * 512 > effective_cut
        })
        .count() as u64;
    prop_assert!(stats.short_transfers >= shortened, "{:?}, {} cut ops", stats, shortened);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn splitting_matches_the_model_and_tiles_regions(case in split_case()) {
        run_split(&case)?;
    }

    #[test]
    fn error_bits_are_exactly_the_failing_regions(case in bits_case()) {
        run_bits(&case)?;
    }

    #[test]
    fn short_transfers_and_transient_errors_never_corrupt(case in short_case()) {
        run_short(&case)?;
    }
}
