//! Helpers shared by the kcopyd integration tests (`mod kcopyd_common;` in each
//! `kcopyd_*.rs` file): clients, blocking waits for job outcomes with a
//! timeout, reads that bypass dmio, chunk classification and trace analysis.

// Each test file uses a different subset of the helpers.
#![allow(dead_code)]

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::mpsc;
use std::time::Duration;

use dmio::fault::{FaultAction, TracedOp};
use dmio::{AlignedBuf, BlockDevice, DmIoOp, DmIoRegion};
use kcopyd::{CopyFlags, JobHandle, JobOutcome, KcopydClient, KcopydConfig, KcopydStats};
use tests::TestDevice;

/// One KiB.
pub const KIB: u64 = 1 << 10;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// How long a test waits for a callback before it declares a hang.
pub const WAIT: Duration = Duration::from_secs(60);

/// A kcopyd client with its own dm-io client, or a panic saying why not.
pub fn kc(config: KcopydConfig) -> KcopydClient {
    KcopydClient::with_config(config).unwrap_or_else(|e| panic!("creating a kcopyd client: {e}"))
}

/// Bytes to 512-byte sectors.
pub fn secs(bytes: u64) -> u64 {
    bytes / 512
}

/// A region of `td`'s device, in bytes (which must be sector multiples).
pub fn region(td: &TestDevice, byte_offset: u64, bytes: u64) -> DmIoRegion {
    DmIoRegion::new(&td.dev, secs(byte_offset), secs(bytes))
}

/// Starts a copy that must be accepted; returns its handle and a receiver of
/// its outcome.
pub fn start_copy(
    kc: &KcopydClient,
    from: &DmIoRegion,
    dests: &[DmIoRegion],
    flags: CopyFlags,
) -> (JobHandle, mpsc::Receiver<JobOutcome>) {
    let (tx, rx) = mpsc::channel();
    let handle = kc
        .copy(from, dests, flags, move |outcome| {
            let _ = tx.send(outcome);
        })
        .unwrap_or_else(|e| panic!("the copy was refused: {e}"));
    (handle, rx)
}

/// Starts a zero job that must be accepted; returns its handle and a receiver
/// of its outcome.
pub fn start_zero(
    kc: &KcopydClient,
    dests: &[DmIoRegion],
    flags: CopyFlags,
) -> (JobHandle, mpsc::Receiver<JobOutcome>) {
    let (tx, rx) = mpsc::channel();
    let handle = kc
        .zero(dests, flags, move |outcome| {
            let _ = tx.send(outcome);
        })
        .unwrap_or_else(|e| panic!("the zero job was refused: {e}"));
    (handle, rx)
}

/// Waits (at most [`WAIT`]) for a value from a callback.
pub fn wait_for<T>(rx: &mpsc::Receiver<T>, at: &str) -> T {
    rx.recv_timeout(WAIT).unwrap_or_else(|e| panic!("{at}: no callback within {WAIT:?}: {e}"))
}

/// Copies asynchronously and waits for the outcome.
pub fn copy_wait(
    kc: &KcopydClient,
    from: &DmIoRegion,
    dests: &[DmIoRegion],
    flags: CopyFlags,
    at: &str,
) -> JobOutcome {
    let (_handle, rx) = start_copy(kc, from, dests, flags);
    wait_for(&rx, at)
}

/// Zeroes asynchronously and waits for the outcome.
pub fn zero_wait(
    kc: &KcopydClient,
    dests: &[DmIoRegion],
    flags: CopyFlags,
    at: &str,
) -> JobOutcome {
    let (_handle, rx) = start_zero(kc, dests, flags);
    wait_for(&rx, at)
}

/// Asserts that a job finished cleanly and moved `total` bytes.
pub fn assert_clean(outcome: &JobOutcome, total: u64, at: &str) {
    assert!(outcome.is_ok(), "{at}: job failed: {outcome:?}");
    assert!(!outcome.read_err, "{at}: read_err: {outcome:?}");
    assert!(outcome.write_err.is_empty(), "{at}: write_err: {outcome:?}");
    assert!(!outcome.cancelled, "{at}: cancelled: {outcome:?}");
    assert!(outcome.failures.is_empty(), "{at}: failures: {:?}", outcome.failures);
    assert_eq!(outcome.total_bytes, total, "{at}: total_bytes");
    assert_eq!(outcome.bytes_done, total, "{at}: bytes_done");
    assert_eq!(outcome.completed_prefix_bytes, total, "{at}: completed_prefix_bytes");
}

/// The difference of two stats snapshots (`after - before`), field by field.
pub fn stats_delta(before: &KcopydStats, after: &KcopydStats) -> KcopydStats {
    KcopydStats {
        jobs: after.jobs - before.jobs,
        sub_jobs: after.sub_jobs - before.sub_jobs,
        bytes_read: after.bytes_read - before.bytes_read,
        bytes_written: after.bytes_written - before.bytes_written,
        write_zeroes_ops: after.write_zeroes_ops - before.write_zeroes_ops,
        page_waits: after.page_waits - before.page_waits,
        throttle_waits: after.throttle_waits - before.throttle_waits,
        callback_panics: after.callback_panics - before.callback_panics,
    }
}

/// Reads `sectors` sectors at `sector` through the device node (or image file)
/// with `O_DIRECT` `pread`, not through dmio or kcopyd: an independent check.
pub fn disk(dev: &BlockDevice, sector: u64, sectors: u64) -> Vec<u8> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev.path())
        .expect("opening the device for a check");
    read_direct(&file, sector, sectors)
}

fn read_direct(file: &File, sector: u64, sectors: u64) -> Vec<u8> {
    let start = sector / 8 * 8;
    let end = (sector + sectors).div_ceil(8) * 8;
    if end == start {
        return Vec::new();
    }
    let mut buf = AlignedBuf::new(((end - start) * 512) as usize);
    file.read_exact_at(&mut buf, start * 512).expect("reading the device for a check");
    let skip = ((sector - start) * 512) as usize;
    buf[skip..skip + (sectors * 512) as usize].to_vec()
}

/// Panics unless `bytes` hold the pattern of `seed` from `first_sector`.
pub fn expect_pattern(bytes: &[u8], first_sector: u64, seed: u64, at: &str) {
    if let Err(e) = tests::check_pattern(bytes, first_sector, seed) {
        panic!("{at}: {e}");
    }
}

/// Panics unless `bytes` are all zero (naming the first non-zero sector,
/// counted from `first_sector`).
pub fn expect_zeros(bytes: &[u8], first_sector: u64, at: &str) {
    if let Some(i) = bytes.iter().position(|&b| b != 0) {
        panic!("{at}: sector {} is not zero", first_sector + i as u64 / 512);
    }
}

/// What a chunk of a destination holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// The copied data.
    New,
    /// The data from before the job.
    Old,
    /// Neither (torn, zeros, garbage).
    Other,
}

/// Classifies each `chunk_bytes` piece of a destination: `bytes` were read
/// from the destination, `new` is what the job should have put there and `old`
/// what was there before (both as long as `bytes`).
pub fn classify(bytes: &[u8], chunk_bytes: u64, new: &[u8], old: &[u8]) -> Vec<Chunk> {
    assert_eq!(bytes.len(), new.len());
    assert_eq!(bytes.len(), old.len());
    let n = chunk_bytes as usize;
    bytes
        .chunks(n)
        .zip(new.chunks(n).zip(old.chunks(n)))
        .map(|(got, (new, old))| {
            if got == new {
                Chunk::New
            } else if got == old {
                Chunk::Old
            } else {
                Chunk::Other
            }
        })
        .collect()
}

/// Panics unless `got == expected`, naming the first differing sector
/// (counted from `first_sector`).
pub fn assert_same(got: &[u8], expected: &[u8], first_sector: u64, at: &str) {
    assert_eq!(got.len(), expected.len(), "{at}: lengths differ");
    if got != expected {
        let s = got.chunks(512).zip(expected.chunks(512)).position(|(a, b)| a != b).unwrap();
        panic!("{at}: sector {} differs from the expected data", first_sector + s as u64);
    }
}

/// The bytes of sectors `sector..sector + count` of a device image.
pub fn sectors(image: &[u8], sector: u64, count: u64) -> &[u8] {
    &image[(sector * 512) as usize..((sector + count) * 512) as usize]
}

/// Writes `image[sector..sector + count]` (sectors) to the same place of `dev`.
pub fn write_image(
    io: &dmio::DmIoClient,
    dev: &std::sync::Arc<BlockDevice>,
    image: &[u8],
    sector: u64,
    count: u64,
) {
    let done =
        tests::write_at(io, dev, sector, sectors(image, sector, count), dmio::ReqFlags::empty());
    assert!(done.is_ok(), "writing at sector {sector} failed: {:?}", done.failures);
}

/// The sector ranges covered by the ops of kind `op` in `trace`, merged.
pub fn union(trace: &[TracedOp], op: DmIoOp) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> =
        trace.iter().filter(|t| t.op == op).map(|t| t.sector..t.sector + t.sectors).collect();
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Asserts that the ops of kind `op` in `trace` tile `range` exactly: no gap,
/// no overlap, nothing outside.
pub fn assert_tiles(trace: &[TracedOp], op: DmIoOp, range: Range<u64>, at: &str) {
    let mut ops: Vec<&TracedOp> = trace.iter().filter(|t| t.op == op).collect();
    ops.sort_by_key(|t| t.sector);
    let mut next = range.start;
    for o in &ops {
        assert_eq!(o.sector, next, "{at}: {op} ops leave a gap or overlap at sector {next}: {o:?}");
        assert!(o.sectors > 0, "{at}: empty {op} op {o:?}");
        next += o.sectors;
    }
    assert_eq!(next, range.end, "{at}: the {op} ops end at sector {next}, not {}", range.end);
}

/// The sector ranges of the ops a fault rule failed.
pub fn failed_ranges(trace: &[TracedOp]) -> Vec<Range<u64>> {
    trace
        .iter()
        .filter(|t| matches!(t.fault, Some(FaultAction::Fail(_))))
        .map(|t| t.sector..t.sector + t.sectors)
        .collect()
}

/// Whether `sector` lies in one of `ranges`.
pub fn in_ranges(ranges: &[Range<u64>], sector: u64) -> bool {
    ranges.iter().any(|r| r.contains(&sector))
}

/// Flushes the client and checks that every page of its pool is back (no
/// sub-job kept its pages after its job called back).
pub fn assert_pages_back(kc: &KcopydClient, at: &str) {
    kc.flush().expect("flush");
    let pool = kc.page_pool();
    assert_eq!(
        pool.free_reserve_pages(),
        pool.reserve(),
        "{at}: {} of {} pool pages still in use after every callback",
        pool.reserve() - pool.free_reserve_pages(),
        pool.reserve()
    );
    assert_eq!(pool.extra_pages_in_use(), 0, "{at}: extra pages in use");
}
