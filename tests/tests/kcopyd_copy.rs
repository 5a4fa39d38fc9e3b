//! kcopyd copies and zeroing that succeed, on every backing of
//! `tests::backings()` (a regular file, loop devices with 512- and 4096-byte
//! sectors):
//!
//! - KC-2: copies to 1, 3 and 8 destinations at offsets other than the
//!   source's, of one block, exactly one sub-job, and sizes that are not
//!   multiples of the sub-job size, with both dm-io engines; the bytes around
//!   every destination are untouched; outcome, handle and stats agree;
//! - KC-4: zero-length jobs (copy and zero) call back on the worker, not the
//!   caller, with an all-ok outcome and no I/O at all;
//! - KC-11: zeroing uses write-zeroes when every destination supports it, plain
//!   writes to every destination when one does not; zeros verified;
//! - KC-3: a 20 MiB copy through the operation trace: chunk reads of exactly
//!   the sub-job size (the last shorter) that tile the range, never more than
//!   eight chunks between their read and their write;
//! - KC-5: a page pool of one sub-job (the reserve alone) serves 50 concurrent
//!   jobs, all finishing, in submission order.

mod kcopyd_common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use dmio::fault::{FaultRule, LimitOverrides, OpSet};
use dmio::{DmIoOp, DmIoRegion, ReqFlags};
use kcopyd::{CopyFlags, KcopydClient, KcopydConfig, SUB_JOBS_IN_FLIGHT};
use kcopyd_common::{
    KIB, MIB, assert_clean, assert_pages_back, assert_same, assert_tiles, copy_wait, disk,
    expect_pattern, expect_zeros, kc, region, secs, sectors, start_copy, start_zero, stats_delta,
    wait_for, write_image, zero_wait,
};
use tests::{Backing, ENGINES, TestDevice, backings, client, pattern, write_at, write_pattern};

/// Seed of the source data.
const SRC_SEED: u64 = 0x5eed;
/// Seed of the data a destination held before a job.
const OLD_SEED: u64 = 0x01d;
/// Sectors checked on each side of a destination for stray writes.
const MARGIN: u64 = 16;

/// Where the destinations of a copy go: `n` of them spread over `devs`
/// round-robin, each device holding up to two in slots 4 MiB apart, at
/// offsets that differ from the source's and from each other.
fn layout(devs: &[TestDevice], n: usize, len: u64) -> Vec<DmIoRegion> {
    (0..n)
        .map(|i| {
            let dev = &devs[i % devs.len()];
            let slot = (i / devs.len()) as u64;
            let offset = slot * 4 * MIB + MARGIN * 512 + 28 * KIB + i as u64 * 12 * KIB;
            region(dev, offset, len)
        })
        .collect()
}

/// KC-2: 1 → 1, 1 → 3 and 1 → 8 copies of one block, one sub-job, one sub-job
/// plus a block, 1 MiB + 12 KiB and 3 MiB with 64 KiB sub-jobs, to
/// destinations at other offsets than the source (and, for 1 → 1, on the source
/// device itself, right after the source): each destination holds the source's
/// data, the sectors around it keep their old data, and the outcome, the handle
/// and the client's counters account for every byte. Both dm-io engines.
#[test]
fn kc2_copies_to_one_three_and_eight_destinations() {
    let src_image = pattern(0, secs(8 * MIB), SRC_SEED);
    for backing in backings() {
        let src = TestDevice::new(backing, 8 * MIB);
        let devs = TestDevice::many(backing, 8 * MIB, 4);
        let lbs = src.dev.logical_block_size() as u64;
        for engine in ENGINES {
            let kc = KcopydClient::with_dmio(
                Arc::new(client(engine)),
                KcopydConfig::new().sub_job_kb(64),
            )
            .expect("creating a kcopyd client");
            assert_eq!(kc.sub_job_bytes(), 64 * KIB);
            let io = kc.dmio().clone();
            write_image(&io, &src.dev, &src_image, 0, secs(8 * MIB));
            let sizes = [lbs, 64 * KIB, 64 * KIB + 4 * KIB, MIB + 12 * KIB, 3 * MIB];
            for (k, &len) in sizes.iter().enumerate() {
                for n in [1usize, 3, 8] {
                    let at = format!("{backing}/{engine:?}/{len} bytes to {n}");
                    // The source starts at another offset for every size, never
                    // one of the destinations' offsets.
                    let from = region(&src, (k as u64 + 1) * 20 * KIB + 4 * KIB, len);
                    let expected = sectors(&src_image, from.sector, from.count);
                    let dests = layout(&devs, n, len);
                    let old = OLD_SEED + k as u64 * 10 + n as u64;
                    // Old data around each destination, zeros inside.
                    for d in &dests {
                        write_pattern(&io, &d.device, d.sector - MARGIN, MARGIN, old);
                        write_pattern(&io, &d.device, d.sector + d.count, MARGIN, old);
                        let zeros = vec![0; len as usize];
                        let done = write_at(&io, &d.device, d.sector, &zeros, ReqFlags::empty());
                        assert!(done.is_ok(), "{at}: zeroing a destination failed");
                    }
                    let before = kc.stats();
                    let (handle, rx) = start_copy(&kc, &from, &dests, CopyFlags::empty());
                    assert_eq!(handle.total_bytes(), len, "{at}: handle.total_bytes");
                    let outcome = wait_for(&rx, &at);
                    assert_clean(&outcome, len, &at);
                    assert!(!outcome.used_write_zeroes, "{at}: a copy used write-zeroes");
                    kc.flush().expect("flush");
                    assert!(handle.is_finished(), "{at}: not finished after its callback");
                    assert_eq!(handle.bytes_done(), len, "{at}: handle.bytes_done");
                    let delta = stats_delta(&before, &kc.stats());
                    assert_eq!(delta.jobs, 1, "{at}: {delta:?}");
                    assert_eq!(delta.sub_jobs, len.div_ceil(64 * KIB), "{at}: {delta:?}");
                    assert_eq!(delta.bytes_read, len, "{at}: {delta:?}");
                    assert_eq!(delta.bytes_written, len * n as u64, "{at}: {delta:?}");
                    assert_eq!(delta.write_zeroes_ops, 0, "{at}: {delta:?}");
                    for (i, d) in dests.iter().enumerate() {
                        let at = format!("{at}, destination {i}");
                        let got = disk(&d.device, d.sector - MARGIN, d.count + 2 * MARGIN);
                        let (head, rest) = got.split_at((MARGIN * 512) as usize);
                        let (body, tail) = rest.split_at((d.count * 512) as usize);
                        expect_pattern(head, d.sector - MARGIN, old, &format!("{at}, before"));
                        assert_same(body, expected, d.sector, &at);
                        expect_pattern(tail, d.sector + d.count, old, &format!("{at}, after"));
                    }
                    let around = from.sector - MARGIN..from.sector + from.count + MARGIN;
                    let got = disk(&src.dev, around.start, around.end - around.start);
                    let want = sectors(&src_image, around.start, around.end - around.start);
                    assert_same(&got, want, around.start, &format!("{at}, source"));
                }
            }
            // On the source device itself, right after the source (adjacent,
            // not overlapping), through copy_sync.
            let at = format!("{backing}/{engine:?}/same device");
            let len = MIB + 12 * KIB;
            let from = region(&src, 64 * KIB, len);
            let to = region(&src, 64 * KIB + len, len);
            let outcome = kc
                .copy_sync(&from, std::slice::from_ref(&to), CopyFlags::empty())
                .unwrap_or_else(|e| panic!("{at}: {e}"));
            assert_clean(&outcome, len, &at);
            let expected = sectors(&src_image, from.sector, from.count);
            assert_same(&disk(&src.dev, to.sector, to.count), expected, to.sector, &at);
            assert_same(&disk(&src.dev, from.sector, from.count), expected, from.sector, &at);
        }
    }
}

/// KC-2 with the default 512 KiB sub-jobs: a 5 MiB + 4 KiB copy (11 chunks,
/// the last one block) to two destinations.
#[test]
fn kc2_default_sub_job_size() {
    for backing in backings() {
        let at = backing.to_string();
        let src = TestDevice::new(backing, 8 * MIB);
        let dst = TestDevice::new(backing, 16 * MIB);
        let kc = kc(KcopydConfig::new());
        assert_eq!(kc.sub_job_bytes(), 512 * KIB);
        let io = kc.dmio().clone();
        let len = 5 * MIB + 4 * KIB;
        write_pattern(&io, &src.dev, 0, secs(8 * MIB), SRC_SEED);
        let from = region(&src, 12 * KIB, len);
        let dests = [region(&dst, 0, len), region(&dst, 8 * MIB + 4 * KIB, len)];
        let before = kc.stats();
        let outcome = copy_wait(&kc, &from, &dests, CopyFlags::empty(), &at);
        assert_clean(&outcome, len, &at);
        let delta = stats_delta(&before, &kc.stats());
        assert_eq!(delta.sub_jobs, 11, "{at}: {delta:?}");
        assert_eq!((delta.bytes_read, delta.bytes_written), (len, 2 * len), "{at}: {delta:?}");
        for d in &dests {
            expect_pattern(&disk(&dst.dev, d.sector, d.count), from.sector, SRC_SEED, &at);
        }
    }
}

/// KC-4: zero-length copy and zero jobs (to one and three destinations) call
/// back on another thread than the caller's, with an all-ok outcome, and issue
/// no I/O at all; the blocking forms return the same outcome.
#[test]
fn kc4_zero_length_jobs_call_back_without_io() {
    for backing in backings() {
        let at = backing.to_string();
        let devs = TestDevice::many(backing, MIB, 2);
        let kc = kc(KcopydConfig::new());
        let caller = thread::current().id();
        for d in &devs {
            d.dev.faults().start_trace();
        }
        let from = DmIoRegion::new(&devs[0].dev, 64, 0);
        let dests = [
            DmIoRegion::new(&devs[1].dev, 128, 0),
            DmIoRegion::new(&devs[1].dev, 256, 0),
            DmIoRegion::new(&devs[0].dev, 512, 0),
        ];
        let before = kc.stats();
        for (what, n) in [("copy to 1", 1), ("copy to 3", 3), ("zero 1", 1), ("zero 3", 3)] {
            let at = format!("{at}/{what}");
            let (tx, rx) = mpsc::channel();
            let notify = move |o| {
                let _ = tx.send((thread::current().id(), o));
            };
            let handle = if what.starts_with("copy") {
                kc.copy(&from, &dests[..n], CopyFlags::empty(), notify)
            } else {
                kc.zero(&dests[..n], CopyFlags::empty(), notify)
            }
            .unwrap_or_else(|e| panic!("{at}: refused: {e}"));
            assert_eq!(handle.total_bytes(), 0, "{at}");
            let (tid, outcome) = wait_for(&rx, &at);
            assert_ne!(tid, caller, "{at}: the callback ran on the caller's thread");
            assert_clean(&outcome, 0, &at);
            kc.flush().expect("flush");
            assert!(handle.is_finished(), "{at}");
        }
        let outcome = kc.copy_sync(&from, &dests, CopyFlags::empty()).expect("copy_sync");
        assert_clean(&outcome, 0, &format!("{at}/copy_sync"));
        let outcome = kc.zero_sync(&dests[..2], CopyFlags::empty()).expect("zero_sync");
        assert_clean(&outcome, 0, &format!("{at}/zero_sync"));
        let delta = stats_delta(&before, &kc.stats());
        assert_eq!(delta.jobs, 6, "{at}: {delta:?}");
        assert_eq!(
            (delta.sub_jobs, delta.bytes_read, delta.bytes_written, delta.write_zeroes_ops),
            (0, 0, 0, 0),
            "{at}: {delta:?}"
        );
        // A job counts until its callback has returned: the sync calls'
        // callbacks hand the outcome over first.
        kc.flush().expect("flush");
        assert_eq!(kc.jobs_in_flight(), 0, "{at}");
        for (i, d) in devs.iter().enumerate() {
            assert_eq!(d.dev.faults().take_trace(), vec![], "{at}: I/O issued to device {i}");
        }
    }
}

/// KC-11: zeroing two destinations of 1 MiB + 12 KiB (64 KiB sub-jobs). When
/// both support write-zeroes, the trace shows only write-zeroes tiling each
/// range and the outcome says so; otherwise, and whenever one of them reports
/// a write-zeroes limit of 0, every destination gets plain writes. The ranges
/// read back as zeros either way, the sectors around them are untouched.
#[test]
fn kc11_zero_uses_write_zeroes_only_when_every_destination_can() {
    let images = [pattern(0, secs(4 * MIB), OLD_SEED), pattern(0, secs(4 * MIB), OLD_SEED + 1)];
    for backing in backings() {
        let devs = TestDevice::many(backing, 4 * MIB, 2);
        let (a, b) = (&devs[0].dev, &devs[1].dev);
        let kc = kc(KcopydConfig::new().sub_job_kb(64));
        let io = kc.dmio().clone();
        let len = MIB + 12 * KIB;
        let dests = [region(&devs[0], 256 * KIB, len), region(&devs[1], 1028 * KIB, len)];
        for disable in [false, true] {
            let at = format!("{backing}, write-zeroes disabled on a: {disable}");
            if disable {
                a.faults().override_limits(LimitOverrides {
                    max_write_zeroes_bytes: Some(0),
                    ..Default::default()
                });
                assert!(!a.supports_write_zeroes(), "{at}: the override did not take");
            }
            for (i, d) in dests.iter().enumerate() {
                write_image(&io, &d.device, &images[i], 0, secs(4 * MIB));
            }
            let offload = a.supports_write_zeroes() && b.supports_write_zeroes();
            a.faults().start_trace();
            b.faults().start_trace();
            let before = kc.stats();
            let outcome = if disable {
                zero_wait(&kc, &dests, CopyFlags::empty(), &at)
            } else {
                kc.zero_sync(&dests, CopyFlags::empty()).expect("zero_sync")
            };
            let delta = stats_delta(&before, &kc.stats());
            assert_clean(&outcome, len, &at);
            assert_eq!(outcome.used_write_zeroes, offload, "{at}: {outcome:?}");
            assert_eq!(delta.bytes_read, 0, "{at}: a zero job read something: {delta:?}");
            assert_eq!(delta.bytes_written, 2 * len, "{at}: {delta:?}");
            if offload {
                assert!(delta.write_zeroes_ops > 0, "{at}: {delta:?}");
            } else {
                assert_eq!(delta.write_zeroes_ops, 0, "{at}: {delta:?}");
            }
            for (i, (d, dev)) in dests.iter().zip([a, b]).enumerate() {
                let at = format!("{at}, destination {i}");
                let trace = dev.faults().take_trace();
                let (used, unused) = if offload {
                    (DmIoOp::WriteZeroes, DmIoOp::Write)
                } else {
                    (DmIoOp::Write, DmIoOp::WriteZeroes)
                };
                assert!(
                    trace.iter().all(|t| t.op != unused && t.op != DmIoOp::Read),
                    "{at}: expected only {used} ops: {trace:?}"
                );
                assert_tiles(&trace, used, d.sector..d.sector + d.count, &at);
                let got = disk(&d.device, 0, secs(4 * MIB));
                let s = d.sector as usize * 512;
                let e = s + len as usize;
                assert_same(&got[..s], &images[i][..s], 0, &at);
                expect_zeros(&got[s..e], d.sector, &at);
                assert_same(&got[e..], &images[i][e..], d.sector + d.count, &at);
            }
        }
        a.faults().override_limits(LimitOverrides::default());
    }
}

/// KC-3: a 20 MiB + 12 KiB copy with the default 512 KiB sub-jobs, source and
/// destination on one device so that one trace shows reads and writes in issue
/// order, source reads delayed 20 ms so that chunks overlap. Every read stays
/// within one chunk, each chunk is read exactly once (one read of the chunk size
/// when the device takes such I/O whole; the last chunk shorter), the reads tile
/// the source and the writes the destination, no chunk is written before it is
/// read, and at no point are more than eight chunks between their first read
/// and their first write — yet eight are reached (the job runs its sub-jobs in
/// parallel).
#[test]
fn kc3_chunks_of_the_sub_job_size_at_most_eight_in_flight() {
    let len = 20 * MIB + 12 * KIB;
    let image = pattern(0, secs(len), SRC_SEED);
    for backing in backings() {
        let at = backing.to_string();
        let td = TestDevice::new(backing, 48 * MIB);
        let kc = kc(KcopydConfig::new());
        let sub = kc.sub_job_bytes();
        assert_eq!(sub, 512 * KIB, "{at}");
        let io = kc.dmio().clone();
        let chunks = len.div_ceil(sub);
        let from = region(&td, 0, len);
        let to = region(&td, 24 * MIB, len);
        write_image(&io, &td.dev, &image, 0, from.count);
        td.dev.faults().add(FaultRule::delay(OpSet::READ, Duration::from_millis(20)));
        td.dev.faults().start_trace();
        let outcome = copy_wait(&kc, &from, std::slice::from_ref(&to), CopyFlags::empty(), &at);
        let trace = td.dev.faults().take_trace();
        td.dev.faults().clear_rules();
        assert_clean(&outcome, len, &at);
        let per = secs(sub);
        let chunk_of = |sector: u64, base: u64, sectors: u64| {
            let c = (sector - base) / per;
            assert_eq!(
                (sector + sectors - 1 - base) / per,
                c,
                "{at}: an op at sector {sector} of {sectors} sectors crosses a chunk boundary"
            );
            c
        };
        let mut read_sectors = vec![0u64; chunks as usize];
        let mut read_ops = vec![0usize; chunks as usize];
        let mut started = vec![false; chunks as usize];
        let mut written = vec![false; chunks as usize];
        let mut in_flight = 0usize;
        let mut max_in_flight = 0usize;
        for t in &trace {
            match t.op {
                DmIoOp::Read => {
                    assert!(
                        t.sector >= from.sector && t.sector + t.sectors <= from.sector + from.count,
                        "{at}: read outside the source: {t:?}"
                    );
                    let c = chunk_of(t.sector, from.sector, t.sectors) as usize;
                    assert!(!written[c], "{at}: chunk {c} read after it was written");
                    read_sectors[c] += t.sectors;
                    read_ops[c] += 1;
                    if !started[c] {
                        started[c] = true;
                        in_flight += 1;
                        max_in_flight = max_in_flight.max(in_flight);
                        assert!(
                            in_flight <= SUB_JOBS_IN_FLIGHT,
                            "{at}: {in_flight} chunks read but not yet written"
                        );
                    }
                }
                DmIoOp::Write => {
                    assert!(
                        t.sector >= to.sector && t.sector + t.sectors <= to.sector + to.count,
                        "{at}: write outside the destination: {t:?}"
                    );
                    let c = chunk_of(t.sector, to.sector, t.sectors) as usize;
                    assert!(started[c], "{at}: chunk {c} written before it was read");
                    if !written[c] {
                        written[c] = true;
                        in_flight -= 1;
                    }
                }
                other => panic!("{at}: unexpected {other} op: {t:?}"),
            }
        }
        for c in 0..chunks {
            let expected = secs(sub.min(len - c * sub));
            assert_eq!(read_sectors[c as usize], expected, "{at}: chunk {c} read sectors");
            if td.dev.info().max_io_bytes >= sub {
                assert_eq!(read_ops[c as usize], 1, "{at}: chunk {c} was not read with one op");
            }
        }
        assert_tiles(&trace, DmIoOp::Read, from.sector..from.sector + from.count, &at);
        assert_tiles(&trace, DmIoOp::Write, to.sector..to.sector + to.count, &at);
        assert_eq!(
            max_in_flight, SUB_JOBS_IN_FLIGHT,
            "{at}: the job never had {SUB_JOBS_IN_FLIGHT} chunks in flight"
        );
        assert_same(&disk(&td.dev, to.sector, to.count), &image, to.sector, &at);
    }
}

/// KC-5: with a page pool of one sub-job (the reserve alone), 50 single-chunk
/// jobs submitted at once (reads delayed 1 ms) all finish cleanly, their
/// callbacks run in submission order, the page queue had to wait, and every
/// destination holds its data.
#[test]
fn kc5_reserve_only_pool_serves_jobs_in_fifo_order() {
    for backing in backings().into_iter().filter(|b| *b != Backing::Loop512) {
        let at = backing.to_string();
        let src = TestDevice::new(backing, 4 * MIB);
        let dst = TestDevice::new(backing, 4 * MIB);
        let kc = kc(KcopydConfig::new().sub_job_kb(64).pool_sub_jobs(1));
        let io = kc.dmio().clone();
        write_pattern(&io, &src.dev, 0, secs(4 * MIB), SRC_SEED);
        src.dev.faults().add(FaultRule::delay(OpSet::READ, Duration::from_millis(1)));
        let order = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let before = kc.stats();
        for j in 0..50u64 {
            let order = order.clone();
            let tx = tx.clone();
            // Job j copies source chunk j to destination chunk 49 - j.
            let from = region(&src, j * 64 * KIB, 64 * KIB);
            let to = region(&dst, (49 - j) * 64 * KIB, 64 * KIB);
            kc.copy(&from, &[to], CopyFlags::empty(), move |o| {
                order.lock().unwrap().push(j);
                let _ = tx.send(o);
            })
            .unwrap_or_else(|e| panic!("{at}: job {j} refused: {e}"));
        }
        for j in 0..50 {
            let outcome = wait_for(&rx, &format!("{at}: callback {j}"));
            assert_clean(&outcome, 64 * KIB, &at);
        }
        src.dev.faults().clear_rules();
        kc.flush().expect("flush");
        assert_eq!(*order.lock().unwrap(), (0..50).collect::<Vec<u64>>(), "{at}: callback order");
        assert_eq!(kc.page_pool().reserve(), 16, "{at}: a pool of one 64 KiB sub-job");
        assert_pages_back(&kc, &at);
        let delta = stats_delta(&before, &kc.stats());
        assert!(delta.page_waits > 0, "{at}: no job ever waited for pages: {delta:?}");
        assert_eq!(delta.jobs, 50, "{at}: {delta:?}");
        let got = disk(&dst.dev, 0, secs(50 * 64 * KIB));
        for j in 0..50u64 {
            let d = ((49 - j) * 64 * KIB) as usize;
            expect_pattern(&got[d..d + 64 * KIB as usize], secs(j * 64 * KIB), SRC_SEED, &at);
        }
    }
}

/// A zero job with IGNORE_ERROR on a device region that needs several
/// sub-jobs, started asynchronously: the handle reports the total and
/// finishes; the zeros are there.
#[test]
fn kc11_async_zero_handle() {
    let td = TestDevice::new(Backing::File, 4 * MIB);
    let kc = kc(KcopydConfig::new().sub_job_kb(128));
    write_pattern(kc.dmio(), &td.dev, 0, secs(4 * MIB), OLD_SEED);
    let d = region(&td, 4 * KIB, 3 * MIB);
    let (handle, rx) = start_zero(&kc, std::slice::from_ref(&d), CopyFlags::IGNORE_ERROR);
    assert_eq!(handle.total_bytes(), 3 * MIB);
    let outcome = wait_for(&rx, "async zero");
    assert_clean(&outcome, 3 * MIB, "async zero");
    kc.flush().expect("flush");
    assert!(handle.is_finished());
    assert_eq!(handle.bytes_done(), 3 * MIB);
    expect_zeros(&disk(&td.dev, d.sector, d.count), d.sector, "async zero");
    expect_pattern(&disk(&td.dev, 0, 8), 0, OLD_SEED, "async zero, before");
    expect_pattern(&disk(&td.dev, d.sector + d.count, 8), d.sector + d.count, OLD_SEED, "after");
}

/// KC-4 / KC-11: a zero-length zero job issues no operation at all, so it was
/// not "served by the write-zeroes op": `used_write_zeroes` stays false (as
/// the write-zeroes counter does).
#[test]
fn kc4_zero_length_zero_job_does_not_claim_write_zeroes() {
    let td = TestDevice::new(Backing::File, MIB);
    let kc = kc(KcopydConfig::new());
    let before = kc.stats();
    let outcome =
        kc.zero_sync(&[DmIoRegion::new(&td.dev, 0, 0)], CopyFlags::empty()).expect("valid");
    assert_clean(&outcome, 0, "zero-length zero job");
    assert_eq!(stats_delta(&before, &kc.stats()).write_zeroes_ops, 0);
    assert!(!outcome.used_write_zeroes, "no op was issued, yet: {outcome:?}");
}

/// KC-5 with split jobs: a pool of two sub-jobs shared by four concurrent
/// 4 MiB copies (64 KiB sub-jobs, each wanting eight in flight) and a zero job:
/// no deadlock, everything correct, and the page queue had to wait.
#[test]
fn kc5_small_pool_with_concurrent_split_jobs() {
    let image = pattern(0, secs(16 * MIB), SRC_SEED);
    let src = TestDevice::new(Backing::File, 16 * MIB);
    let dst = TestDevice::new(Backing::File, 20 * MIB);
    let kc = kc(KcopydConfig::new().sub_job_kb(64).pool_sub_jobs(2));
    write_image(kc.dmio(), &src.dev, &image, 0, secs(16 * MIB));
    write_pattern(kc.dmio(), &dst.dev, secs(16 * MIB), secs(4 * MIB), OLD_SEED);
    src.dev.faults().add(FaultRule::delay(OpSet::READ, Duration::from_millis(1)));
    let before = kc.stats();
    let mut pending = vec![];
    for j in 0..4u64 {
        let from = region(&src, j * 4 * MIB, 4 * MIB);
        let to = region(&dst, (3 - j) * 4 * MIB, 4 * MIB);
        pending.push((j, start_copy(&kc, &from, &[to], CopyFlags::empty())));
    }
    let zero = start_zero(&kc, &[region(&dst, 16 * MIB, 4 * MIB)], CopyFlags::empty());
    for (j, (_handle, rx)) in &pending {
        let outcome = wait_for(rx, &format!("job {j}"));
        assert_clean(&outcome, 4 * MIB, &format!("job {j}"));
    }
    assert_clean(&wait_for(&zero.1, "zero job"), 4 * MIB, "zero job");
    src.dev.faults().clear_rules();
    assert_eq!(kc.page_pool().reserve(), 32, "a pool of two 64 KiB sub-jobs");
    assert_pages_back(&kc, "small pool");
    let delta = stats_delta(&before, &kc.stats());
    assert!(delta.page_waits > 0, "no job waited for pages with a pool of two: {delta:?}");
    assert_eq!(delta.sub_jobs, 4 * 64 + 64, "{delta:?}");
    let got = disk(&dst.dev, 0, secs(20 * MIB));
    for j in 0..4usize {
        let d = (3 - j) * 4 * MIB as usize;
        let s = j * 4 * MIB as usize;
        let at = format!("job {j}");
        assert_same(&got[d..d + 4 * MIB as usize], &image[s..s + 4 * MIB as usize], 0, &at);
    }
    expect_zeros(&got[16 * MIB as usize..], secs(16 * MIB), "zero job");
}

/// The configured I/O priority is stamped on every read and write a copy
/// issues, and a zero job's writes (when it writes zeros).
#[test]
fn ioprio_on_every_op() {
    let src = TestDevice::new(Backing::File, 4 * MIB);
    let dst = TestDevice::new(Backing::File, 4 * MIB);
    let prio = dmio::IoPriority::new(dmio::IoPriorityClass::BestEffort, 5);
    assert_ne!(prio.raw(), 0);
    let kc = kc(KcopydConfig::new().sub_job_kb(64).ioprio(prio));
    src.dev.faults().start_trace();
    dst.dev.faults().start_trace();
    dst.dev
        .faults()
        .override_limits(LimitOverrides { max_write_zeroes_bytes: Some(0), ..Default::default() });
    let outcome = kc
        .copy_sync(&region(&src, 0, MIB), &[region(&dst, 0, MIB)], CopyFlags::empty())
        .expect("valid");
    assert_clean(&outcome, MIB, "copy");
    let outcome = kc.zero_sync(&[region(&dst, 2 * MIB, MIB)], CopyFlags::empty()).expect("valid");
    assert_clean(&outcome, MIB, "zero");
    let trace: Vec<_> =
        src.dev.faults().take_trace().into_iter().chain(dst.dev.faults().take_trace()).collect();
    assert_eq!(trace.len(), 16 + 16 + 16, "{trace:?}");
    for t in &trace {
        assert_eq!(t.ioprio, prio.raw(), "{t:?}");
    }
}

/// A client that owns its dm-io client reads and writes every chunk from one
/// contiguous run of its registered pool: every operation uses the fixed-buffer
/// opcodes (no page pinning per I/O) when the ring accepted the registration.
#[test]
fn owned_dmio_client_moves_every_chunk_through_fixed_buffers() {
    let src = TestDevice::new(Backing::File, 8 * MIB);
    let dst = TestDevice::new(Backing::File, 8 * MIB);
    write_pattern(&client(dmio::EngineChoice::Auto), &src.dev, 0, 16384, SRC_SEED);
    let kc = KcopydClient::with_config(KcopydConfig::new().sub_job_kb(256)).unwrap();
    if kc.dmio().engine() != dmio::EngineKind::Uring {
        eprintln!("skipping: the io_uring engine is not in use");
        return;
    }
    // Churn the pool first so that pages come back out of order.
    for _ in 0..3 {
        let outcome = kc
            .copy_sync(
                &DmIoRegion::new(&src.dev, 0, 16384),
                &[DmIoRegion::new(&dst.dev, 0, 16384)],
                CopyFlags::empty(),
            )
            .unwrap();
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    let stats = kc.dmio().stats();
    assert_eq!(stats.ops, 3 * 2 * 32, "one read and one write per 256 KiB chunk");
    if stats.fixed_buffer_ops == 0 {
        eprintln!("skipping the fixed-buffer check: the ring refused the registration");
        return;
    }
    assert_eq!(stats.fixed_buffer_ops, stats.ops, "some chunk was not one contiguous run");
    expect_pattern(&dst.read_back()[..8 << 20], 0, SRC_SEED, "fixed buffers");
}

/// With a single dm-io request slot, a chunk's write cannot be submitted from
/// its read's callback (the read still holds the slot): dm-io hands the request
/// back and the worker submits the write instead. Every chunk still arrives.
#[test]
fn chunk_writes_fall_back_to_the_worker_when_no_slot_is_free_in_the_callback() {
    for backing in backings() {
        let src = TestDevice::new(backing, 4 * MIB);
        let dst = TestDevice::new(backing, 4 * MIB);
        write_pattern(&client(dmio::EngineChoice::Auto), &src.dev, 0, 4096, SRC_SEED);
        let config = dmio::DmIoConfig { reserve: 1, ..dmio::DmIoConfig::default() };
        let io = Arc::new(dmio::DmIoClient::with_config(config).unwrap());
        let kc = KcopydClient::with_dmio(io, KcopydConfig::new().sub_job_kb(64)).unwrap();
        let outcome = kc
            .copy_sync(
                &DmIoRegion::new(&src.dev, 0, 4096),
                &[DmIoRegion::new(&dst.dev, 0, 4096)],
                CopyFlags::empty(),
            )
            .unwrap();
        assert!(outcome.is_ok(), "{backing}: {outcome:?}");
        assert_eq!(kc.stats().bytes_read, 2 * MIB, "{backing}");
        assert_eq!(kc.stats().bytes_written, 2 * MIB, "{backing}");
        expect_pattern(&dst.read_back()[..2 << 20], 0, SRC_SEED, &format!("{backing}"));
    }
}
