//! Fault injection (feature `fault-injection`): each fault kind produces the
//! right error bits, errno and data, and the write log records and replays
//! what the device completed.
//!
//! Covers: writes failing in a sector range (IO-15, IO-17), reads failing in a
//! range with the failed operation zero-filled (IO-16), every-Nth failures,
//! dropped writes, delays, short transfers (IO-13), transient errors retried,
//! limit overrides (IO-10, IO-11, IO-20), and the write log: completion order,
//! `Replay::Everything` = the device, `Replay::DurableOnly`, `Replay::Crash`,
//! and a power-loss check over every prefix of the log (IO-9). Data tests run
//! on every backing of `tests::backings()` with both engines.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmio::fault::{FaultAction, FaultRule, LimitOverrides, LogEntry, OpSet, Replay, Trigger};
use dmio::{
    AlignedBuf, BioVec, BlockDevice, Bvec, DmIoClient, DmIoCompletion, DmIoConfig, DmIoError,
    DmIoMemory, DmIoOp, DmIoRegion, DmIoRequest, Errno, Notify, NotifyHandler, PageList, ReqFlags,
};
use tests::{
    Rng, TestDevice, check_pattern, client, client_with_config, configs, ops_of, pattern, read_at,
    scenarios, scenarios_with, sectors_of, write_at,
};

// ---------------------------------------------------------------------------
// Failures in a sector range
// ---------------------------------------------------------------------------

/// IO-15 / IO-17: writes to region 1 of 3 fail: bit 1 only, the errno and sector
/// are kept, regions 0 and 2 are fully written, region 1 is untouched.
#[test]
fn failing_writes_in_a_range_set_only_that_regions_bit() {
    for (what, td, client) in scenarios(8 << 20) {
        let old = pattern(3072, 64, 1);
        assert!(write_at(&client, &td.dev, 3072, &old, ReqFlags::empty()).is_ok());

        let rule = td.dev.faults().add(FaultRule::fail(OpSet::WRITE, 3072..3136, libc::ENOSPC));
        let data = pattern(0, 64, 2);
        let regions = [
            DmIoRegion::new(&td.dev, 1024, 64),
            DmIoRegion::new(&td.dev, 3072, 64),
            DmIoRegion::new(&td.dev, 5120, 64),
        ];
        let req = DmIoRequest::write(AlignedBuf::from_slice(&data));
        let done = client.io_sync(req, &regions).unwrap();
        assert_eq!(done.error_bits.bits(), 0b010, "{what}: {:?}", done.failures);
        assert_eq!(done.failures.len(), 1, "{what}: {:?}", done.failures);
        let f = &done.failures[0];
        assert_eq!(f.region, 1, "{what}");
        assert_eq!(f.errno, Errno(libc::ENOSPC), "{what}");
        assert_eq!(f.op, DmIoOp::Write, "{what}");
        assert_eq!(f.sector, 3072, "{what}");
        assert_eq!(f.device.id(), td.dev.id(), "{what}");
        assert_eq!(done.memory.as_ref().map(DmIoMemory::len), Some(data.len()));
        assert_eq!(td.dev.faults().fired(rule), 1, "{what}");

        let image = td.read_back();
        assert!(sectors_of(&image, 1024, 64) == data, "{what}: region 0 not written");
        assert!(sectors_of(&image, 5120, 64) == data, "{what}: region 2 not written");
        assert!(sectors_of(&image, 3072, 64) == old, "{what}: region 1 was written");

        // The same failure through into_result: a typed error carrying the errno.
        let req = DmIoRequest::write(AlignedBuf::from_slice(&data));
        let err = client.io_sync(req, &regions).unwrap().into_result().unwrap_err();
        assert_eq!(err.errno(), Some(Errno(libc::ENOSPC)), "{what}");
        match err {
            DmIoError::Regions(r) => assert_eq!(r.error_bits.bits(), 0b010, "{what}"),
            other => panic!("{what}: expected Regions, got {other}"),
        }

        // A write rule leaves reads alone.
        let (done, bytes) = read_at(&client, &td.dev, 3072, 64);
        assert!(done.is_ok(), "{what}: {:?}", done.failures);
        assert!(bytes == old, "{what}: read of region 1 returned other data");
    }
}

/// IO-16: a failed read sets the bit, keeps the errno and the failing op's first
/// sector, and leaves zeros exactly over the failed operations (the rest of the
/// buffer holds the data read).
#[test]
fn failing_reads_zero_fill_exactly_the_failed_operations() {
    // 16 KiB per operation: the 128 KiB region below is read in 8 ops of 32 sectors.
    let small_ops =
        |e| client_with_config(e, DmIoConfig { max_op_bytes: 16384, ..Default::default() });
    for (what, td, client) in scenarios_with(8 << 20, small_ops) {
        let start = 2048;
        let data = pattern(start, 256, 3);
        assert!(write_at(&client, &td.dev, start, &data, ReqFlags::empty()).is_ok());

        // (failing sectors, errno, expected failed ops as first sectors)
        let cases: [(std::ops::Range<u64>, i32, Vec<u64>); 2] = [
            // Inside op 3 only.
            (start + 104..start + 112, libc::EIO, vec![start + 96]),
            // Across the boundary of ops 4 and 5.
            (start + 152..start + 168, libc::EILSEQ, vec![start + 128, start + 160]),
        ];
        for (range, errno, failed_ops) in cases {
            let rule = td.dev.faults().add(FaultRule::fail(OpSet::READ, range.clone(), errno));
            td.dev.faults().start_trace();
            let (done, bytes) = read_at(&client, &td.dev, start, 256);
            let trace = td.dev.faults().take_trace();
            td.dev.faults().remove(rule);

            assert_eq!(done.error_bits.bits(), 0b1, "{what} {range:?}");
            let mut sectors: Vec<u64> = done.failures.iter().map(|f| f.sector).collect();
            sectors.sort_unstable();
            assert_eq!(sectors, failed_ops, "{what} {range:?}: failure sectors");
            for f in &done.failures {
                assert_eq!((f.region, f.errno, f.op), (0, Errno(errno), DmIoOp::Read));
            }
            // The trace agrees: 8 ops of 32 sectors, the expected ones failed.
            let reads = ops_of(&trace, DmIoOp::Read);
            assert_eq!(reads.len(), 8, "{what}: {reads:?}");
            for t in &reads {
                assert_eq!(t.sectors, 32, "{what}: {t:?}");
                let failed = failed_ops.contains(&t.sector);
                assert_eq!(t.fault == Some(FaultAction::Fail(errno)), failed, "{what}: {t:?}");
            }
            // Zeros exactly over the failed ops, the data elsewhere (never 0xAA).
            for op in 0..8u64 {
                let first = start + op * 32;
                let got = &bytes[(op * 32 * 512) as usize..((op + 1) * 32 * 512) as usize];
                if failed_ops.contains(&first) {
                    assert!(got.iter().all(|&b| b == 0), "{what}: op at {first} not zeroed");
                } else {
                    check_pattern(got, first, 3).unwrap_or_else(|e| panic!("{what}: {e}"));
                }
            }
        }
    }
}

/// Every Nth write fails: exactly requests 3, 6, 9 and 12 (one op each) report
/// an error and leave their blocks unwritten; then every 4th read fails.
#[test]
fn fail_every_nth_fails_exactly_the_expected_requests() {
    for (what, td, client) in scenarios(8 << 20) {
        let rule = td.dev.faults().add(FaultRule::fail_every_nth(OpSet::WRITE, 3, libc::EIO));
        let block = |i: u64| 4096 + 8 * i;
        let mut write_failed = Vec::new();
        for i in 0..12u64 {
            let done =
                write_at(&client, &td.dev, block(i), &pattern(block(i), 8, 4), ReqFlags::FUA);
            write_failed.push(!done.is_ok());
            if !done.is_ok() {
                assert_eq!(done.error_bits.bits(), 0b1, "{what}");
                assert_eq!(done.failures[0].errno, Errno(libc::EIO), "{what}");
            }
            // Reads are not counted by a write rule.
            let (read, bytes) = read_at(&client, &td.dev, block(i), 8);
            assert!(read.is_ok(), "{what}: read {i} failed: {:?}", read.failures);
            if done.is_ok() {
                check_pattern(&bytes, block(i), 4).unwrap_or_else(|e| panic!("{what}: {e}"));
            } else {
                assert!(bytes.iter().all(|&b| b == 0), "{what}: failed write {i} landed");
            }
        }
        let expected: Vec<bool> = (1..=12).map(|n| n % 3 == 0).collect();
        assert_eq!(write_failed, expected, "{what}");
        assert_eq!(td.dev.faults().fired(rule), 4, "{what}");
        td.dev.faults().clear_rules();

        td.dev.faults().add(FaultRule::fail_every_nth(OpSet::READ, 4, libc::EIO));
        let read_failed: Vec<bool> = (0..12u64)
            .map(|i| {
                let (done, bytes) = read_at(&client, &td.dev, block(i), 8);
                if !done.is_ok() {
                    assert!(bytes.iter().all(|&b| b == 0), "{what}: failed read {i} not zeroed");
                }
                !done.is_ok()
            })
            .collect();
        let expected: Vec<bool> = (1..=12).map(|n| n % 4 == 0).collect();
        assert_eq!(read_failed, expected, "{what}");
    }
}

/// Dropped writes report success, never reach the device, and are marked in the
/// write log; writes outside the range land normally.
#[test]
fn dropped_writes_succeed_without_reaching_the_device() {
    for (what, td, client) in scenarios(8 << 20) {
        let old = pattern(6144, 16, 5);
        assert!(write_at(&client, &td.dev, 6144, &old, ReqFlags::empty()).is_ok());
        let base = td.read_back();

        td.dev.faults().start_write_log();
        let rule = td.dev.faults().add(FaultRule::drop_writes(6144..6152));
        let new_a = pattern(6144, 8, 6);
        let new_b = pattern(6152, 8, 6);
        let a = write_at(&client, &td.dev, 6144, &new_a, ReqFlags::FUA);
        let b = write_at(&client, &td.dev, 6152, &new_b, ReqFlags::empty());
        assert!(a.is_ok() && b.is_ok(), "{what}: {:?} {:?}", a.failures, b.failures);
        assert_eq!(td.dev.faults().fired(rule), 1, "{what}");

        let image = td.read_back();
        assert!(sectors_of(&image, 6144, 8) == &old[..4096], "{what}: dropped write landed");
        assert!(sectors_of(&image, 6152, 8) == new_b, "{what}: kept write missing");
        let (done, bytes) = read_at(&client, &td.dev, 6144, 8);
        assert!(done.is_ok());
        assert!(bytes == old[..4096], "{what}: dmio read sees the dropped write");

        let log = td.dev.faults().take_write_log();
        let expected = [
            LogEntry::Write { sector: 6144, data: new_a, fua: true, dropped: true },
            LogEntry::Write { sector: 6152, data: new_b, fua: false, dropped: false },
        ];
        assert_eq!(log.entries(), &expected[..], "{what}");
        // A replay skips the dropped write, as the device did.
        assert!(
            log.image_at(log.len(), &base, Replay::Everything) == image,
            "{what}: replay differs from the device"
        );
    }
}

/// A delay holds the operation back: the request completes no sooner than the
/// delay, and an undelayed request meanwhile is not held up.
#[test]
fn delayed_writes_complete_after_the_delay_without_blocking_others() {
    let delay = Duration::from_millis(300);
    for (what, td, client) in scenarios(8 << 20) {
        let rule = td.dev.faults().add(FaultRule::delay(OpSet::WRITE, delay));
        let (tx, rx) = mpsc::channel();
        let data = pattern(512, 8, 7);
        let start = Instant::now();
        let req = DmIoRequest::write(AlignedBuf::from_slice(&data)).on_complete(move |done| {
            tx.send((Instant::now(), done.error_bits)).unwrap();
        });
        client.submit(req, &[DmIoRegion::new(&td.dev, 512, 8)]).unwrap();

        // Reads are not delayed and not stuck behind the delayed write.
        let (read, _) = read_at(&client, &td.dev, 4096, 8);
        assert!(read.is_ok());
        assert!(
            rx.try_recv().is_err(),
            "{what}: the delayed write completed before an undelayed read"
        );
        let (when, bits) = rx.recv().unwrap();
        assert!(bits.is_empty(), "{what}");
        assert!(
            when.duration_since(start) >= delay,
            "{what}: completed after {:?}, less than the {delay:?} delay",
            when.duration_since(start)
        );
        assert_eq!(td.dev.faults().fired(rule), 1);
        let (_, bytes) = read_at(&client, &td.dev, 512, 8);
        assert!(bytes == data, "{what}: delayed write lost");
    }
}

/// IO-13: short transfers are resubmitted from the block boundary; the data is
/// correct for every memory type, no error is reported, and the client counts them.
#[test]
fn short_transfers_are_resubmitted_with_correct_data() {
    for (what, td, client) in scenarios(8 << 20) {
        let lbs = td.dev.logical_block_size() as usize;
        let rule =
            td.dev.faults().add(FaultRule::short_transfers(OpSet::READ | OpSet::WRITE, 4096));
        td.dev.faults().start_trace();
        let sectors = 128u64; // 64 KiB, 16 times the cut
        let memories = |pool: &dmio::PagePool| -> Vec<DmIoMemory> {
            let offset = if lbs < 4096 { 1024 } else { 0 };
            let list = PageList::with_offset(pool.alloc_list(17).pages, offset);
            let mut segs = Vec::new();
            if lbs < 4096 {
                segs.push(BioVec::new(pool.alloc(), 1024, 3072).unwrap());
            }
            while segs.iter().map(BioVec::len).sum::<usize>() < 65536 {
                segs.push(BioVec::whole(pool.alloc()));
            }
            vec![
                DmIoMemory::Kmem(AlignedBuf::new(65536)),
                DmIoMemory::PageList(list),
                DmIoMemory::Bvec(Bvec::new(segs)),
            ]
        };
        let writes = memories(client.page_pool());
        let reads = memories(client.page_pool());
        for (i, (mut wmem, rmem)) in writes.into_iter().zip(reads).enumerate() {
            let start = 8192 + i as u64 * 256;
            let kind = wmem.kind_name();
            wmem.copy_from_slice(0, &pattern(start, sectors, 8));
            let done = client
                .io_sync(DmIoRequest::write(wmem), &[DmIoRegion::new(&td.dev, start, sectors)])
                .unwrap();
            assert!(done.is_ok(), "{what}/{kind}: write {:?}", done.failures);
            let done = client
                .io_sync(DmIoRequest::read(rmem), &[DmIoRegion::new(&td.dev, start, sectors)])
                .unwrap();
            assert!(done.is_ok(), "{what}/{kind}: read {:?}", done.failures);
            let bytes = done.memory.unwrap().to_vec();
            check_pattern(&bytes[..65536], start, 8)
                .unwrap_or_else(|e| panic!("{what}/{kind}: {e}"));
        }
        let trace = td.dev.faults().take_trace();
        assert_eq!(trace.len(), 6, "{what}: {trace:?}");
        assert!(
            trace.iter().all(|t| t.fault == Some(FaultAction::ShortTransfer(4096))),
            "{what}: {trace:?}"
        );
        assert_eq!(td.dev.faults().fired(rule), 6);
        let stats = client.stats();
        assert!(stats.short_transfers >= 6, "{what}: {stats:?}");
        let image = td.read_back();
        for i in 0..3u64 {
            let start = 8192 + i * 256;
            check_pattern(sectors_of(&image, start, sectors), start, 8)
                .unwrap_or_else(|e| panic!("{what}: on disk: {e}"));
        }
    }
}

/// EAGAIN, EINTR and EBUSY are retried: the first three ops (a write, a read and
/// a flush) fail once each, the client reissues them, and nothing is reported.
#[test]
fn transient_errors_are_retried_not_reported() {
    for (backing, engine) in configs() {
        for errno in [libc::EAGAIN, libc::EINTR, libc::EBUSY] {
            let what = format!("{backing}/{engine:?}/errno {errno}");
            let td = TestDevice::new(backing, 8 << 20);
            let client = client(engine);
            let rule = td
                .dev
                .faults()
                .add(FaultRule::fail(OpSet::all(), 0..u64::MAX, errno).when(Trigger::FirstN(3)));
            let data = pattern(1024, 16, 9);
            let w = write_at(&client, &td.dev, 1024, &data, ReqFlags::empty());
            assert!(w.is_ok(), "{what}: write {:?}", w.failures);
            let (r, bytes) = read_at(&client, &td.dev, 1024, 16);
            assert!(r.is_ok(), "{what}: read {:?}", r.failures);
            assert!(bytes == data, "{what}: read data");
            let f =
                client.io_sync(DmIoRequest::flush(), &[DmIoRegion::new(&td.dev, 0, 0)]).unwrap();
            assert!(f.is_ok(), "{what}: flush {:?}", f.failures);
            assert_eq!(td.dev.faults().fired(rule), 3, "{what}");
            assert_eq!(client.stats().retries, 3, "{what}: {:?}", client.stats());
            check_pattern(sectors_of(&td.read_back(), 1024, 16), 1024, 9)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
}

/// Limit overrides: a device reporting no discard or write-zeroes gets the
/// "not supported" bit with nothing issued and its data intact; small limits
/// split discards and write-zeroes; no atomic unit refuses atomic writes.
#[test]
fn limit_overrides_change_support_and_splitting() {
    for (what, td, client) in scenarios(8 << 20) {
        assert!(td.dev.supports_discard() && td.dev.supports_write_zeroes(), "{what}");
        let data = pattern(2048, 64, 10);
        assert!(write_at(&client, &td.dev, 2048, &data, ReqFlags::empty()).is_ok());
        let faults = td.dev.faults();

        for (op, overrides) in [
            (DmIoOp::Discard, LimitOverrides { max_discard_bytes: Some(0), ..Default::default() }),
            (
                DmIoOp::WriteZeroes,
                LimitOverrides { max_write_zeroes_bytes: Some(0), ..Default::default() },
            ),
        ] {
            faults.override_limits(overrides);
            assert_eq!(td.dev.supports_discard(), op != DmIoOp::Discard, "{what}");
            assert_eq!(td.dev.supports_write_zeroes(), op != DmIoOp::WriteZeroes);
            faults.start_trace();
            let done = client
                .io_sync(DmIoRequest::new(op), &[DmIoRegion::new(&td.dev, 2048, 64)])
                .unwrap();
            assert!(faults.take_trace().is_empty(), "{what}: {op} issued I/O");
            assert_eq!(done.error_bits.bits(), 0b1, "{what}: {op}");
            assert_eq!(done.failures.len(), 1);
            assert!(done.failures[0].is_not_supported(), "{what}: {:?}", done.failures);
            assert_eq!(done.failures[0].errno, Errno(libc::EOPNOTSUPP));
            assert!(sectors_of(&td.read_back(), 2048, 64) == data, "{what}: {op} wrote");
        }

        // Small limits split the operation; the range reads back as zeros.
        for (op, overrides, per_op) in [
            (
                DmIoOp::Discard,
                LimitOverrides { max_discard_bytes: Some(8192), ..Default::default() },
                16u64,
            ),
            (
                DmIoOp::WriteZeroes,
                LimitOverrides { max_write_zeroes_bytes: Some(4096), ..Default::default() },
                8u64,
            ),
        ] {
            assert!(write_at(&client, &td.dev, 2048, &data, ReqFlags::empty()).is_ok());
            faults.override_limits(overrides);
            faults.start_trace();
            let done = client
                .io_sync(DmIoRequest::new(op), &[DmIoRegion::new(&td.dev, 2048, 64)])
                .unwrap();
            let ops = ops_of(&faults.take_trace(), op);
            assert!(done.is_ok(), "{what}: {op}: {:?}", done.failures);
            let firsts: Vec<u64> = ops.iter().map(|t| t.sector).collect();
            let expected: Vec<u64> = (0..64 / per_op).map(|i| 2048 + i * per_op).collect();
            assert_eq!(firsts, expected, "{what}: {op} split");
            assert!(ops.iter().all(|t| t.sectors == per_op), "{what}: {ops:?}");
            let image = td.read_back();
            assert!(
                sectors_of(&image, 2048, 64).iter().all(|&b| b == 0),
                "{what}: {op} left data behind"
            );
        }

        // No atomic write unit: an atomic write is refused before submission.
        faults.override_limits(LimitOverrides {
            atomic_write_max_bytes: Some(0),
            ..Default::default()
        });
        faults.start_trace();
        let req = DmIoRequest::write(AlignedBuf::new(4096)).with_flags(ReqFlags::ATOMIC);
        let err = client.io_sync(req, &[DmIoRegion::new(&td.dev, 0, 8)]).unwrap_err();
        assert!(matches!(err, DmIoError::AtomicWrite { region: 0, .. }), "{what}: {err}");
        assert!(faults.take_trace().is_empty(), "{what}");

        // Clearing the overrides restores the probed limits.
        faults.override_limits(LimitOverrides::default());
        assert!(td.dev.supports_discard() && td.dev.supports_write_zeroes(), "{what}");
    }
}

// ---------------------------------------------------------------------------
// The write log
// ---------------------------------------------------------------------------

fn write_entry(sector: u64, data: &[u8], fua: bool) -> LogEntry {
    LogEntry::Write { sector, data: data.to_vec(), fua, dropped: false }
}

/// The log records writes, flushes (once per device), discards and
/// write-zeroes in completion order, the preflush of a PREFLUSH write before its
/// data, FUA on FUA writes; replaying everything gives the device's contents.
#[test]
fn write_log_records_every_kind_in_completion_order() {
    for (what, td, client) in scenarios(8 << 20) {
        // Old data under the discard and write-zeroes, so that zeroing shows.
        assert!(write_at(&client, &td.dev, 1040, &pattern(1040, 24, 11), ReqFlags::FUA).is_ok());
        let base = td.read_back();
        td.dev.faults().start_write_log();

        let a = pattern(1024, 8, 12);
        let b = pattern(1032, 8, 12);
        let c = pattern(1064, 8, 12);
        let d = pattern(1072, 8, 12);
        let dev = &td.dev;
        let sync = |req: DmIoRequest, regions: &[DmIoRegion]| {
            let done = client.io_sync(req, regions).unwrap();
            assert!(done.is_ok(), "{what}: {:?}", done.failures);
        };
        sync(DmIoRequest::write(AlignedBuf::from_slice(&a)), &[DmIoRegion::new(dev, 1024, 8)]);
        sync(
            DmIoRequest::write(AlignedBuf::from_slice(&b)).with_flags(ReqFlags::FUA),
            &[DmIoRegion::new(dev, 1032, 8)],
        );
        // Two regions on one device: one flush.
        sync(DmIoRequest::flush(), &[DmIoRegion::new(dev, 0, 0), DmIoRegion::new(dev, 64, 0)]);
        sync(DmIoRequest::discard(), &[DmIoRegion::new(dev, 1040, 16)]);
        sync(DmIoRequest::write_zeroes(), &[DmIoRegion::new(dev, 1056, 8)]);
        sync(
            DmIoRequest::write(AlignedBuf::from_slice(&c)).with_flags(ReqFlags::PREFLUSH),
            &[DmIoRegion::new(dev, 1064, 8)],
        );
        sync(
            DmIoRequest::write(AlignedBuf::from_slice(&d))
                .with_flags(ReqFlags::PREFLUSH | ReqFlags::FUA),
            &[DmIoRegion::new(dev, 1072, 8)],
        );
        let log = td.dev.faults().take_write_log();
        let expected = vec![
            write_entry(1024, &a, false),
            write_entry(1032, &b, true),
            LogEntry::Flush { issued_at: 2 },
            LogEntry::Zero { sector: 1040, sectors: 16, op: DmIoOp::Discard },
            LogEntry::Zero { sector: 1056, sectors: 8, op: DmIoOp::WriteZeroes },
            LogEntry::Flush { issued_at: 5 },
            write_entry(1064, &c, false),
            LogEntry::Flush { issued_at: 7 },
            write_entry(1072, &d, true),
        ];
        assert_eq!(log.entries(), &expected[..], "{what}");
        let image = td.read_back();
        assert!(
            log.image_at(log.len(), &base, Replay::Everything) == image,
            "{what}: Replay::Everything differs from the device"
        );
        // Every prefix replayed in full equals the device state at that point, in
        // particular the zeroing is visible from entry 4 on.
        let at3 = log.image_at(3, &base, Replay::Everything);
        assert!(sectors_of(&at3, 1040, 24) == sectors_of(&base, 1040, 24));
        let at5 = log.image_at(5, &base, Replay::Everything);
        assert!(sectors_of(&at5, 1040, 24).iter().all(|&x| x == 0), "{what}");
    }
}

/// A random mix of concurrent writes (including fan-out and split ones),
/// discards and flushes: replaying the whole log gives the device's contents.
#[test]
fn write_log_everything_replay_equals_the_device() {
    let small_ops =
        |e| client_with_config(e, DmIoConfig { max_op_bytes: 8192, ..Default::default() });
    for (what, td, client) in scenarios_with(4 << 20, small_ops) {
        let base = td.read_back();
        td.dev.faults().start_write_log();
        let mut rng = Rng(0x1234_5678);
        // Three rounds; within a round every request touches its own blocks, so
        // completion order and device order agree; later rounds overwrite.
        for round in 0..3u64 {
            let (tx, rx) = mpsc::channel();
            let mut n = 0;
            for slot in 0..24u64 {
                let kind = rng.below(10);
                let sector = slot * 256 + rng.below(16) * 8;
                let count = 8 * (1 + rng.below(8));
                let tx = tx.clone();
                let notify = move |done: DmIoCompletion| tx.send(done.error_bits).unwrap();
                let regions = [DmIoRegion::new(&td.dev, sector, count)];
                let req = match kind {
                    0 => DmIoRequest::discard(),
                    1 => DmIoRequest::write_zeroes(),
                    2 => DmIoRequest::flush(),
                    _ => {
                        let data = pattern(sector, count, 20 + round);
                        let flags = [ReqFlags::empty(), ReqFlags::FUA, ReqFlags::PREFLUSH]
                            [rng.below(3) as usize];
                        DmIoRequest::write(AlignedBuf::from_slice(&data)).with_flags(flags)
                    }
                };
                client.submit(req.on_complete(notify), &regions).unwrap();
                n += 1;
            }
            for _ in 0..n {
                assert!(rx.recv().unwrap().is_empty(), "{what}");
            }
        }
        let log = td.dev.faults().take_write_log();
        assert!(log.len() >= 72, "{what}: only {} entries", log.len());
        assert!(
            log.image_at(log.len(), &base, Replay::Everything) == td.read_back(),
            "{what}: Replay::Everything differs from the device"
        );
    }
}

/// The blocks and flags of the durability sequence below.
const DURABLE_SEQ: [(u64, ReqFlags); 6] = [
    (0, ReqFlags::empty()),  // W1 at A
    (8, ReqFlags::FUA),      // W2 at B
    (16, ReqFlags::empty()), // W3 at C
    // (a flush request comes here)
    (24, ReqFlags::empty()), // W4 at D
    (32, ReqFlags::FUA),     // W5 at E
    (0, ReqFlags::empty()),  // W6 at A again
];

/// Runs W1, W2, W3, flush, W4, W5, W6 on `dev` and returns the data of each write.
fn durability_sequence(client: &DmIoClient, dev: &Arc<BlockDevice>) -> Vec<Vec<u8>> {
    let mut datas = Vec::new();
    for (i, &(sector, flags)) in DURABLE_SEQ.iter().enumerate() {
        if i == 3 {
            let done = client.io_sync(DmIoRequest::flush(), &[DmIoRegion::new(dev, 0, 0)]).unwrap();
            assert!(done.is_ok());
        }
        let data = pattern(sector, 8, 30 + i as u64);
        assert!(write_at(client, dev, sector, &data, flags).is_ok());
        datas.push(data);
    }
    datas
}

/// Which write's data each block of A..E shows (index into DURABLE_SEQ), or
/// None for the base (zeros).
fn visible(image: &[u8], datas: &[Vec<u8>]) -> [Option<usize>; 5] {
    let mut out = [None; 5];
    for (block, slot) in out.iter_mut().enumerate() {
        let got = sectors_of(image, block as u64 * 8, 8);
        *slot = datas.iter().position(|d| d == got);
        if slot.is_none() {
            assert!(got.iter().all(|&b| b == 0), "block {block} holds unknown data");
        }
    }
    // W1 and W6 both target A: the later one wins when both are applied.
    out
}

/// DurableOnly keeps FUA writes and writes covered by a later completed flush,
/// at every prefix, and nothing else.
#[test]
fn durable_only_keeps_fua_writes_and_flushed_writes() {
    for (what, td, client) in scenarios(1 << 20) {
        td.dev.faults().start_write_log();
        let datas = durability_sequence(&client, &td.dev);
        let log = td.dev.faults().take_write_log();
        let base = vec![0u8; 1 << 20];
        // Entries: 0 W1, 1 W2(FUA), 2 W3, 3 Flush, 4 W4, 5 W5(FUA), 6 W6.
        assert_eq!(log.len(), 7, "{what}: {:?}", log.entries());
        assert_eq!(log.entries()[3], LogEntry::Flush { issued_at: 3 }, "{what}");
        // Expected blocks A..E for each prefix (write index shown, None = zeros).
        let expected: [[Option<usize>; 5]; 8] = [
            [None, None, None, None, None],
            [None, None, None, None, None],
            [None, Some(1), None, None, None],
            [None, Some(1), None, None, None],
            [Some(0), Some(1), Some(2), None, None],
            [Some(0), Some(1), Some(2), None, None],
            [Some(0), Some(1), Some(2), None, Some(4)],
            [Some(0), Some(1), Some(2), None, Some(4)],
        ];
        for (upto, want) in expected.iter().enumerate() {
            let image = log.image_at(upto, &base, Replay::DurableOnly);
            assert_eq!(&visible(&image, &datas), want, "{what}: prefix {upto}");
        }
        // Everything, by contrast, shows W4 and W6.
        let all = log.image_at(log.len(), &base, Replay::Everything);
        assert_eq!(visible(&all, &datas), [Some(5), Some(1), Some(2), Some(3), Some(4)], "{what}");
        assert!(all == td.read_back(), "{what}: Everything differs from the device");
    }
}

/// Crash replay: the same seed gives the same image, every image contains the
/// durable writes, shows nothing but base or written data, and different seeds
/// give different images.
#[test]
fn crash_replay_is_deterministic_and_keeps_durable_writes() {
    for (what, td, client) in scenarios(1 << 20) {
        td.dev.faults().start_write_log();
        let datas = durability_sequence(&client, &td.dev);
        // Twelve more unflushed writes to fresh blocks so that seeds differ visibly.
        let mut extra = Vec::new();
        for i in 0..12u64 {
            let sector = 64 + 8 * i;
            let data = pattern(sector, 8, 50 + i);
            assert!(write_at(&client, &td.dev, sector, &data, ReqFlags::empty()).is_ok());
            extra.push((sector, data));
        }
        let log = td.dev.faults().take_write_log();
        assert_eq!(log.len(), 7 + 12, "{what}");
        let base = vec![0u8; 1 << 20];
        let durable = log.image_at(log.len(), &base, Replay::DurableOnly);
        let mut distinct = Vec::new();
        for seed in 0..32u64 {
            let image = log.image_at(log.len(), &base, Replay::Crash { seed });
            assert!(
                image == log.image_at(log.len(), &base, Replay::Crash { seed }),
                "{what}: seed {seed} is not deterministic"
            );
            let shown = visible(&image, &datas);
            // Durable writes: W1 (or W6 over it), W2, W3, W5.
            assert!(matches!(shown[0], Some(0) | Some(5)), "{what}: seed {seed}: {shown:?}");
            assert_eq!(shown[1], Some(1), "{what}: seed {seed}");
            assert_eq!(shown[2], Some(2), "{what}: seed {seed}");
            assert!(matches!(shown[3], None | Some(3)), "{what}: seed {seed}");
            assert_eq!(shown[4], Some(4), "{what}: seed {seed}");
            // Whatever DurableOnly shows, the crash image shows too (or a later
            // write to the same block).
            for (block, d) in visible(&durable, &datas).iter().enumerate() {
                if let Some(d) = d {
                    assert!(
                        shown[block].is_some_and(|s| s >= *d),
                        "{what}: seed {seed}: block {block} lost durable write {d}"
                    );
                }
            }
            for (sector, data) in &extra {
                let got = sectors_of(&image, *sector, 8);
                assert!(
                    got == &data[..] || got.iter().all(|&b| b == 0),
                    "{what}: seed {seed}: block {sector} holds neither base nor its write"
                );
            }
            if !distinct.contains(&image) {
                distinct.push(image);
            }
        }
        assert!(distinct.len() > 1, "{what}: all 32 seeds gave the same image");
    }
}

/// One write of the power-loss workload.
#[derive(Debug, Clone)]
struct PlWrite {
    sector: u64,
    data: Vec<u8>,
    flags: ReqFlags,
    /// Writes whose callbacks ran before this one was submitted.
    completed_before: Vec<usize>,
}

/// IO-9: concurrent writes with random PREFLUSH/FUA and flush requests; for
/// EVERY prefix of the log, the DurableOnly image (the worst case after a power
/// loss at that point) shows a write only after it completed; shows a FUA write
/// exactly once it completed; shows a plain write only after a later flush
/// completed; and never shows a PREFLUSH write without every write that had
/// completed before it was submitted (the writes its preflush made durable).
#[test]
fn power_loss_at_every_log_prefix_respects_preflush_and_fua() {
    let size = 1u64 << 20;
    for (what, td, client) in scenarios(size) {
        let completed = Arc::new(Mutex::new(Vec::<usize>::new()));
        let errors = Arc::new(Mutex::new(Vec::<String>::new()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let handler: Arc<dyn NotifyHandler> = {
            let (completed, errors, in_flight) =
                (completed.clone(), errors.clone(), in_flight.clone());
            // Never panics: a failure is recorded and asserted on the test thread.
            Arc::new(move |done: DmIoCompletion, ctx: usize| {
                if !done.is_ok() {
                    errors.lock().unwrap().push(format!("request {ctx}: {:?}", done.failures));
                }
                if ctx != usize::MAX {
                    completed.lock().unwrap().push(ctx);
                }
                in_flight.fetch_sub(1, Ordering::SeqCst);
            })
        };
        td.dev.faults().start_write_log();
        let mut rng = Rng(0xfeed_beef);
        let mut writes: Vec<PlWrite> = Vec::new();
        for i in 0..160usize {
            while in_flight.load(Ordering::SeqCst) >= 12 {
                std::thread::yield_now();
            }
            in_flight.fetch_add(1, Ordering::SeqCst);
            if rng.next_u64().is_multiple_of(12) {
                let req = DmIoRequest::flush().with_notify(Notify::shared(&handler, usize::MAX));
                client.submit(req, &[DmIoRegion::new(&td.dev, 0, 0)]).unwrap();
                continue;
            }
            let sector = 8 * i as u64; // distinct 4 KiB blocks
            let flags = [
                ReqFlags::empty(),
                ReqFlags::empty(),
                ReqFlags::PREFLUSH,
                ReqFlags::FUA,
                ReqFlags::PREFLUSH | ReqFlags::FUA,
            ][rng.below(5) as usize];
            let data = pattern(sector, 8, 100 + i as u64);
            let completed_before = completed.lock().unwrap().clone();
            let id = writes.len();
            writes.push(PlWrite { sector, data: data.clone(), flags, completed_before });
            let req = DmIoRequest::write(AlignedBuf::from_slice(&data))
                .with_flags(flags)
                .with_notify(Notify::shared(&handler, id));
            client.submit(req, &[DmIoRegion::new(&td.dev, sector, 8)]).unwrap();
        }
        // A final flush makes everything durable.
        while in_flight.load(Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
        let done = client.io_sync(DmIoRequest::flush(), &[DmIoRegion::new(&td.dev, 0, 0)]).unwrap();
        assert!(done.is_ok());
        assert!(errors.lock().unwrap().is_empty(), "{what}: {:?}", errors.lock().unwrap());
        let log = td.dev.faults().take_write_log();

        // Where each write is in the log.
        let index_of: Vec<usize> = writes
            .iter()
            .map(|w| {
                let hits: Vec<usize> = log
                    .entries()
                    .iter()
                    .enumerate()
                    .filter(
                        |(_, e)| matches!(e, LogEntry::Write { sector, .. } if *sector == w.sector),
                    )
                    .map(|(i, _)| i)
                    .collect();
                assert_eq!(hits.len(), 1, "{what}: write at {} logged {hits:?}", w.sector);
                let LogEntry::Write { data, fua, .. } = &log.entries()[hits[0]] else {
                    unreachable!()
                };
                assert!(*data == w.data, "{what}: logged data of {} differs", w.sector);
                assert_eq!(*fua, w.flags.contains(ReqFlags::FUA), "{what}");
                hits[0]
            })
            .collect();
        let flushes: Vec<usize> = log
            .entries()
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, LogEntry::Flush { .. }))
            .map(|(i, _)| i)
            .collect();
        let preflushes = writes.iter().filter(|w| w.flags.contains(ReqFlags::PREFLUSH)).count();
        assert!(flushes.len() > preflushes, "{what}: {} flushes logged", flushes.len());

        let base = vec![0u8; size as usize];
        let mut image = base.clone();
        let mut dependency_checks = 0;
        for upto in 0..=log.len() {
            image.copy_from_slice(&base);
            log.replay_onto(upto, &mut image, Replay::DurableOnly);
            let shown: Vec<bool> =
                writes.iter().map(|w| sectors_of(&image, w.sector, 8) == &w.data[..]).collect();
            for (id, w) in writes.iter().enumerate() {
                let at = index_of[id];
                if !shown[id] {
                    assert!(
                        !(w.flags.contains(ReqFlags::FUA) && at < upto),
                        "{what}: prefix {upto}: completed FUA write {id} missing"
                    );
                    continue;
                }
                assert!(at < upto, "{what}: prefix {upto}: write {id} shown before it completed");
                if !w.flags.contains(ReqFlags::FUA) {
                    assert!(
                        flushes.iter().any(|&f| f > at && f < upto),
                        "{what}: prefix {upto}: plain write {id} shown with no flush after it"
                    );
                }
                if w.flags.contains(ReqFlags::PREFLUSH) {
                    for &dep in &w.completed_before {
                        dependency_checks += 1;
                        assert!(
                            shown[dep],
                            "{what}: prefix {upto}: PREFLUSH write {id} shown without write \
                             {dep}, which completed before it was submitted"
                        );
                    }
                }
            }
        }
        assert!(dependency_checks > 100, "{what}: preflush ordering barely exercised");
        // After the final flush everything is durable and matches the device.
        assert!(image == td.read_back(), "{what}: full DurableOnly image differs from the device");
    }
}
