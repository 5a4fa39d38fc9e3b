//! Stress: several threads submitting thousands of mixed asynchronous requests
//! (reads, single- and multi-region writes with PREFLUSH/FUA, discards,
//! write-zeroes, flushes, zero-count regions) to three devices while the fault
//! layer adds small delays and fails some sector ranges.
//!
//! Checks (IO-2, IO-14, IO-15): every callback fires exactly once; the memory
//! always comes back with the length submitted; the error bits (and errnos) are
//! exactly those of the regions touching a failing range; reads return the data
//! (or zeros where they failed); when a write's callback runs, every region it
//! reports as written is on the device and every failed region is not; the
//! page pool gets every page back; the client closes cleanly. IO-1: a client
//! with a reserve of 2 and delayed completions takes 10x the reserve from
//! several threads: all complete without error, submitters wait for slots.
//!
//! Runs on every backing of `tests::backings()` with both engines.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dmio::fault::{FaultRule, OpSet, Trigger};
use dmio::{
    AlignedBuf, BioVec, BlockDevice, Bvec, DmIoClient, DmIoCompletion, DmIoConfig, DmIoError,
    DmIoMemory, DmIoOp, DmIoRegion, DmIoRequest, EngineChoice, Errno, Notify, NotifyHandler,
    PagePool, ReqFlags,
};
use tests::{
    Backing, Rng, TestDevice, check_pattern, client, client_with_config, configs, fill_pattern,
    label, write_pattern,
};

const DEVICES: usize = 3;
const DEVICE_BYTES: u64 = 64 << 20;
/// Sectors [0, READ_ZONE) hold a fixed pattern and are only read.
const READ_ZONE: u64 = 8192;
const READ_SEED: u64 = 99;
const THREADS: usize = 4;
const PER_THREAD: usize = 400;

/// A failing sector range: (device, sectors, ops, errno).
type FailRange = (usize, Range<u64>, OpSet, i32);

fn fail_ranges() -> Vec<FailRange> {
    let writes = OpSet::WRITE | OpSet::DISCARD | OpSet::WRITE_ZEROES;
    vec![
        (0, 2048..2304, OpSet::READ, libc::EIO),
        (0, 10240..11264, writes, libc::EIO),
        (1, 12288..13312, writes, libc::ENOSPC),
    ]
}

/// What a request must complete with.
#[derive(Debug)]
struct Expect {
    op: DmIoOp,
    /// The memory length submitted (None for data-less requests).
    mem_len: Option<usize>,
    /// (region index, errno) of each region that must fail.
    failing: Vec<(usize, i32)>,
    /// For reads: (first sector, sectors) of the read-zone pattern expected.
    read: Option<(u64, u64)>,
    /// For writes: (device, sector, bytes) of each region with data, and whether it fails.
    written: Vec<(usize, u64, usize, bool)>,
    /// For writes: the bytes written (a prefix of them per region).
    data: Vec<u8>,
}

struct State {
    devs: Vec<Arc<BlockDevice>>,
    expects: Vec<OnceLock<Expect>>,
    calls: Vec<AtomicU32>,
    completed: AtomicUsize,
    errors: Mutex<Vec<String>>,
    /// A second client that reads the devices from the first client's callbacks.
    verifier: DmIoClient,
}

impl State {
    fn error(&self, msg: String) {
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 20 {
            errors.push(msg);
        }
    }

    /// Reads `bytes` at `sector` of device `dev` through the verifier client.
    fn read_device(&self, dev: usize, sector: u64, bytes: usize) -> Result<Vec<u8>, String> {
        let req = DmIoRequest::read(AlignedBuf::new(bytes));
        let done = self
            .verifier
            .io_sync(req, &[DmIoRegion::new(&self.devs[dev], sector, bytes as u64 / 512)])
            .map_err(|e| e.to_string())?;
        let mem = done.into_result().map_err(|e| e.to_string())?;
        Ok(mem.expect("memory").to_vec())
    }
}

struct Handler(Arc<State>);

impl NotifyHandler for Handler {
    fn notify(&self, done: DmIoCompletion, id: usize) {
        let st = &self.0;
        let previous = st.calls[id].fetch_add(1, Ordering::SeqCst);
        if previous != 0 {
            st.error(format!("request {id}: callback number {}", previous + 1));
        }
        match st.expects[id].get() {
            None => st.error(format!("request {id}: callback before submit returned")),
            Some(expect) => {
                if let Err(e) = check(st, expect, done) {
                    st.error(format!("request {id} ({:?}): {e}", expect.op));
                }
            }
        }
        st.completed.fetch_add(1, Ordering::SeqCst);
    }
}

fn check(st: &State, expect: &Expect, done: DmIoCompletion) -> Result<(), String> {
    // The memory comes back, whole.
    let len = done.memory.as_ref().map(DmIoMemory::len);
    if len != expect.mem_len {
        return Err(format!("memory {len:?}, submitted {:?}", expect.mem_len));
    }
    // Error bits and failures exactly as the failing ranges say.
    let want_bits = expect.failing.iter().fold(0u64, |b, (i, _)| b | 1 << i);
    if done.error_bits.bits() != want_bits {
        return Err(format!(
            "error bits {:#b}, expected {want_bits:#b}: {:?}",
            done.error_bits.bits(),
            done.failures
        ));
    }
    for f in &done.failures {
        let want = expect.failing.iter().find(|(i, _)| *i == f.region);
        if want.map(|(_, e)| Errno(*e)) != Some(f.errno) {
            return Err(format!("unexpected failure {f:?}"));
        }
    }
    for (i, _) in &expect.failing {
        if !done.failures.iter().any(|f| f.region == *i) {
            return Err(format!("no failure detail for region {i}"));
        }
    }
    if let Some((sector, sectors)) = expect.read {
        let bytes = done.memory.as_ref().expect("read memory").to_vec();
        if want_bits != 0 {
            if bytes.iter().any(|&b| b != 0) {
                return Err("failed read not zero-filled".into());
            }
        } else {
            check_pattern(&bytes[..(sectors * 512) as usize], sector, READ_SEED)?;
        }
    }
    // IO-14: when the callback runs, every op of every region has completed.
    // (A deliberate blocking read from the callback, through a second client:
    // io_sync refuses only on its own client's completion thread.)
    for &(dev, sector, bytes, fails) in &expect.written {
        let on_disk = st.read_device(dev, sector, bytes)?;
        if fails {
            if on_disk.iter().any(|&b| b != 0) {
                return Err(format!("failed region at {dev}:{sector} was written"));
            }
        } else if on_disk[..] != expect.data[..bytes] {
            return Err(format!("region at {dev}:{sector} not on the device at callback time"));
        }
    }
    Ok(())
}

/// Fresh sectors in each device's write zone, never handed out twice.
struct Allocator {
    next: Vec<AtomicU64>,
}

impl Allocator {
    fn take(&self, dev: usize, sectors: u64, rng: &mut Rng) -> u64 {
        let gap = 8 * rng.below(4);
        let at = self.next[dev].fetch_add(sectors + gap, Ordering::SeqCst) + gap;
        assert!(at + sectors <= DEVICE_BYTES / 512, "device {dev} write zone exhausted");
        at
    }
}

/// The regions of `regions` that a request of `op` must fail, with the errno.
fn failing(
    op: DmIoOp,
    regions: &[(usize, u64, u64)],
    devs: &[Arc<BlockDevice>],
) -> Vec<(usize, i32)> {
    let kind = match op {
        DmIoOp::Read => OpSet::READ,
        DmIoOp::Write => OpSet::WRITE,
        DmIoOp::Discard => OpSet::DISCARD,
        DmIoOp::WriteZeroes => OpSet::WRITE_ZEROES,
        DmIoOp::Flush => return Vec::new(),
    };
    let mut out = Vec::new();
    for (i, &(dev, sector, count)) in regions.iter().enumerate() {
        if count == 0 {
            continue; // zero-count regions are never flagged
        }
        let unsupported = match op {
            DmIoOp::Discard => !devs[dev].supports_discard(),
            DmIoOp::WriteZeroes => !devs[dev].supports_write_zeroes(),
            _ => false,
        };
        if unsupported {
            out.push((i, libc::EOPNOTSUPP));
            continue;
        }
        let hit = fail_ranges().into_iter().find(|(d, range, ops, _)| {
            *d == dev && ops.contains(kind) && sector < range.end && range.start < sector + count
        });
        if let Some((_, _, _, errno)) = hit {
            out.push((i, errno));
        }
    }
    out
}

/// Memory of `len` bytes (a multiple of 4096) of a random type.
fn memory(len: usize, pool: &PagePool, rng: &mut Rng) -> DmIoMemory {
    let pages = len / 4096;
    match rng.below(3) {
        0 => DmIoMemory::Kmem(AlignedBuf::new(len)),
        1 => DmIoMemory::PageList(pool.alloc_list(pages)),
        _ => DmIoMemory::Bvec(Bvec::new((0..pages).map(|_| BioVec::whole(pool.alloc())).collect())),
    }
}

/// Builds, records and submits request `id`.
fn submit_one(
    client: &DmIoClient,
    st: &Arc<State>,
    handler: &Arc<dyn NotifyHandler>,
    alloc: &Allocator,
    id: usize,
    rng: &mut Rng,
) {
    let devs = &st.devs;
    let pick = rng.below(100);
    let mut flags = ReqFlags::empty();
    let mut mem = None;
    let mut data = Vec::new();
    let mut read = None;
    let mut written = Vec::new();
    // (device, sector, count)
    let mut regions: Vec<(usize, u64, u64)> = Vec::new();
    let op = match pick {
        0..35 => {
            let dev = rng.below(DEVICES as u64) as usize;
            let count = 8 * (1 + rng.below(8));
            let sector = 8 * rng.below((READ_ZONE - count) / 8);
            regions.push((dev, sector, count));
            read = Some((sector, count));
            let mut m = memory((count * 512) as usize, client.page_pool(), rng);
            m.copy_from_slice(0, &vec![0xAA; m.len()]);
            mem = Some(m);
            DmIoOp::Read
        }
        35..72 => {
            let blocks = 1 + rng.below(8);
            let len = (blocks * 4096) as usize;
            let n = 1 + rng.below(4);
            for _ in 0..n {
                let dev = rng.below(DEVICES as u64) as usize;
                match rng.below(8) {
                    // A zero-count region, sometimes right inside a failing range.
                    0 => regions.push((dev, if dev == 0 { 10240 } else { 12288 }, 0)),
                    _ => {
                        let count = 8 * (1 + rng.below(blocks));
                        regions.push((dev, alloc.take(dev, count, rng), count));
                    }
                }
            }
            data = vec![0u8; len];
            fill_pattern(&mut data, 0, 1000 + id as u64);
            let mut m = memory(len, client.page_pool(), rng);
            m.copy_from_slice(0, &data);
            mem = Some(m);
            if rng.below(5) == 0 {
                flags |= ReqFlags::PREFLUSH;
            }
            if rng.below(5) == 0 {
                flags |= ReqFlags::FUA;
            }
            DmIoOp::Write
        }
        72..88 => {
            let n = 1 + rng.below(3);
            for _ in 0..n {
                let dev = rng.below(DEVICES as u64) as usize;
                let count = 8 * (1 + rng.below(16));
                regions.push((dev, alloc.take(dev, count, rng), count));
            }
            if pick < 82 { DmIoOp::Discard } else { DmIoOp::WriteZeroes }
        }
        88..94 => {
            for dev in 0..1 + rng.below(DEVICES as u64) as usize {
                regions.push((dev, 0, 0));
            }
            DmIoOp::Flush
        }
        _ => {
            // A PREFLUSH write whose regions all have count 0: a pure flush.
            for dev in 0..1 + rng.below(DEVICES as u64) as usize {
                regions.push((dev, 64, 0));
            }
            flags |= ReqFlags::PREFLUSH;
            mem = Some(DmIoMemory::Kmem(AlignedBuf::new(4096)));
            DmIoOp::Write
        }
    };
    let fails = failing(op, &regions, devs);
    if op == DmIoOp::Write {
        for (i, &(dev, sector, count)) in regions.iter().enumerate() {
            if count > 0 {
                let bytes = (count * 512) as usize;
                written.push((dev, sector, bytes, fails.iter().any(|(f, _)| *f == i)));
            }
        }
    }
    let expect = Expect {
        op,
        mem_len: mem.as_ref().map(DmIoMemory::len),
        failing: fails,
        read,
        written,
        data,
    };
    st.expects[id].set(expect).unwrap();
    let mut req = DmIoRequest::new(op).with_flags(flags).with_notify(Notify::shared(handler, id));
    req.memory = mem;
    let regions: Vec<DmIoRegion> = regions
        .iter()
        .map(|&(dev, sector, count)| DmIoRegion::new(&devs[dev], sector, count))
        .collect();
    if let Err(e) = client.submit(req, &regions) {
        panic!("request {id} ({op:?}) refused: {e}");
    }
}

fn stress(backing: Backing, engine: EngineChoice) {
    let what = label(backing, engine);
    let started = Instant::now();
    let tds = TestDevice::many(backing, DEVICE_BYTES, DEVICES);
    let devs: Vec<Arc<BlockDevice>> = tds.iter().map(|t| t.dev.clone()).collect();
    let client = Arc::new(client(engine));

    // The read zone holds a known pattern (written before any fault is set).
    for dev in &devs {
        for chunk in 0..READ_ZONE / 2048 {
            write_pattern(&client, dev, chunk * 2048, 2048, READ_SEED);
        }
    }
    let prefill_requests = client.stats().requests;

    for (dev, range, ops, errno) in fail_ranges() {
        devs[dev].faults().add(FaultRule::fail(ops, range, errno));
    }
    for dev in &devs {
        // Small delays on a changing subset of operations.
        let faults = dev.faults();
        faults.add(
            FaultRule::delay(OpSet::all(), Duration::from_micros(200)).when(Trigger::EveryNth(3)),
        );
        faults.add(
            FaultRule::delay(OpSet::all(), Duration::from_micros(900)).when(Trigger::EveryNth(5)),
        );
        faults.add(
            FaultRule::delay(OpSet::all(), Duration::from_millis(3)).when(Trigger::EveryNth(17)),
        );
    }

    let total = THREADS * PER_THREAD;
    let st = Arc::new(State {
        devs: devs.clone(),
        expects: (0..total).map(|_| OnceLock::new()).collect(),
        calls: (0..total).map(|_| AtomicU32::new(0)).collect(),
        completed: AtomicUsize::new(0),
        errors: Mutex::new(Vec::new()),
        verifier: tests::client(engine),
    });
    let handler: Arc<dyn NotifyHandler> = Arc::new(Handler(st.clone()));
    let alloc =
        Arc::new(Allocator { next: (0..DEVICES).map(|_| AtomicU64::new(READ_ZONE)).collect() });

    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (client, st, handler, alloc) = (&client, &st, &handler, &alloc);
            s.spawn(move || {
                let mut rng = Rng(0x5eed_0000 + t as u64);
                for k in 0..PER_THREAD {
                    submit_one(client, st, handler, alloc, t * PER_THREAD + k, &mut rng);
                }
            });
        }
    });
    client.close();
    assert!(client.is_closed());

    let errors = st.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "{what}: {} problems, first: {errors:#?}", errors.len());
    assert_eq!(st.completed.load(Ordering::SeqCst), total, "{what}: callbacks");
    let counts: Vec<u32> = st.calls.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    let bad: Vec<(usize, u32)> =
        counts.iter().copied().enumerate().filter(|&(_, c)| c != 1).collect();
    assert!(bad.is_empty(), "{what}: requests not called back exactly once: {bad:?}");
    let stats = client.stats();
    assert_eq!(stats.requests - prefill_requests, total as u64, "{what}: {stats:?}");
    assert_eq!(stats.callback_panics, 0, "{what}");
    // Every page went back to the pool.
    let pool = client.page_pool();
    assert_eq!(pool.free_reserve_pages(), pool.reserve(), "{what}: pool pages leaked");
    assert_eq!(pool.extra_pages_in_use(), 0, "{what}: heap pages leaked");
    // A closed client refuses work, without calling back.
    let req = DmIoRequest::flush().on_complete(|_| panic!("callback of a refused request"));
    assert!(matches!(
        client.submit(req, &[DmIoRegion::new(&devs[0], 0, 0)]),
        Err(DmIoError::ClientClosed)
    ));
    // The failing ranges were really exercised.
    let kinds: Vec<DmIoOp> = st
        .expects
        .iter()
        .filter_map(|e| {
            let e = e.get().unwrap();
            (!e.failing.is_empty()).then_some(e.op)
        })
        .collect();
    for op in [DmIoOp::Read, DmIoOp::Write] {
        assert!(kinds.contains(&op), "{what}: no {op} hit a failing range");
    }
    eprintln!("{what}: {total} requests in {:?}", started.elapsed());
}

#[test]
fn stress_mixed_requests_every_callback_exactly_once() {
    for (backing, engine) in configs() {
        stress(backing, engine);
    }
}

/// IO-1: a reserve of 2 request slots and 8 pool pages, completions delayed by
/// 10 ms, 10x the reserve submitted from 4 threads: every request completes
/// without error, at most `reserve` run at once (the total time shows it), and
/// submitters wait for a slot instead of failing.
#[test]
fn tiny_reserve_blocks_submitters_instead_of_failing() {
    let delay = Duration::from_millis(10);
    for (backing, engine) in configs() {
        let what = label(backing, engine);
        let td = TestDevice::new(backing, 4 << 20);
        let config =
            DmIoConfig { reserve: 2, pool_pages: 8, pool_extra_pages: 0, ..Default::default() };
        let client = client_with_config(engine, config);
        assert_eq!(client.reserve(), 2);
        let reserve = client.reserve();
        let requests = 10 * reserve;
        td.dev.faults().add(FaultRule::delay(OpSet::all(), delay));
        let done = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let longest_submit = Mutex::new(Duration::ZERO);
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..4usize {
                let (client, td, done, failed, longest) =
                    (&client, &td, &done, &failed, &longest_submit);
                s.spawn(move || {
                    for k in 0..requests / 4 {
                        let n = t * (requests / 4) + k;
                        // Two pool pages each: the pool (8 pages, no extra) is
                        // also a bounded reserve, given back by each completion.
                        let pages = client.page_pool().alloc_list(2);
                        let sector = 16 * n as u64;
                        let (done, failed) = (done.clone(), failed.clone());
                        let req = if n.is_multiple_of(2) {
                            DmIoRequest::write(pages)
                        } else {
                            DmIoRequest::read(pages)
                        }
                        .on_complete(move |c| {
                            if !c.is_ok() || c.memory.map(|m| m.len()) != Some(8192) {
                                failed.fetch_add(1, Ordering::SeqCst);
                            }
                            done.fetch_add(1, Ordering::SeqCst);
                        });
                        let t0 = Instant::now();
                        client
                            .submit(req, &[DmIoRegion::new(&td.dev, sector, 16)])
                            .unwrap_or_else(|e| panic!("submit failed: {e}"));
                        let took = t0.elapsed();
                        let mut longest = longest.lock().unwrap();
                        *longest = (*longest).max(took);
                    }
                });
            }
        });
        client.close();
        let elapsed = start.elapsed();
        assert_eq!(done.load(Ordering::SeqCst), requests, "{what}");
        assert_eq!(failed.load(Ordering::SeqCst), 0, "{what}");
        // At most `reserve` requests in flight, each held for `delay`.
        let floor = delay * (requests / reserve) as u32;
        assert!(elapsed >= floor, "{what}: {requests} requests in {elapsed:?} < {floor:?}");
        let longest = *longest_submit.lock().unwrap();
        assert!(
            longest >= delay / 2,
            "{what}: no submitter ever waited for a slot (longest submit {longest:?})"
        );
        assert_eq!(client.page_pool().free_reserve_pages(), 8, "{what}");
    }
}
