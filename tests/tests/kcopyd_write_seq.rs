//! KC-10, WRITE_SEQ, on every backing of `tests::backings()`: destination
//! writes are issued in strictly increasing offset order while source reads
//! complete out of order (irregular fault-layer delays) and stay parallel, and
//! they complete in that order too (write log); data is correct; after a write
//! error on chunk k no later chunk is written, with or without IGNORE_ERROR
//! (which WRITE_SEQ overrides), for copies and for zero jobs; a source read
//! error keeps the earlier chunks that were in flight, as without WRITE_SEQ; a
//! zoned destination gets WRITE_SEQ without the flag.

mod kcopyd_common;

use std::time::Duration;

use dmio::DmIoOp;
use dmio::fault::{FaultAction, FaultRule, OpSet, TracedOp, Trigger};
use kcopyd::{CopyFlags, KcopydConfig};
use kcopyd_common::{
    Chunk, KIB, MIB, assert_clean, assert_pages_back, assert_tiles, classify, copy_wait, disk,
    expect_pattern, failed_ranges, kc, region, secs, sectors, write_image,
};
use tests::{TestDevice, backings, pattern, write_pattern};

const SRC_SEED: u64 = 0x5e9;
const OLD_SEED: u64 = 0x01d5;
const CHUNK: u64 = 64 * KIB;

/// Irregular read delays: every third read of the device 40 ms, every second
/// of the others 4 ms, the rest none, so chunk reads complete out of order.
fn irregular_read_delays(dev: &dmio::BlockDevice) {
    dev.faults()
        .add(FaultRule::delay(OpSet::READ, Duration::from_millis(40)).when(Trigger::EveryNth(3)));
    dev.faults()
        .add(FaultRule::delay(OpSet::READ, Duration::from_millis(4)).when(Trigger::EveryNth(2)));
}

/// The destination chunk index of each chunk write in `trace`, in issue order
/// (one entry per write op).
fn write_chunks(trace: &[TracedOp], dst: u64) -> Vec<u64> {
    trace.iter().filter(|t| t.op == DmIoOp::Write).map(|t| (t.sector - dst) / secs(CHUNK)).collect()
}

/// The largest number of chunks whose read was issued but whose write was not
/// yet, over every prefix of a trace holding both (source and destination on
/// one device).
fn max_reads_ahead(trace: &[TracedOp], src: u64, dst: u64, chunks: usize) -> usize {
    let mut read = vec![false; chunks];
    let mut written = vec![false; chunks];
    let (mut ahead, mut max) = (0usize, 0usize);
    for t in trace {
        match t.op {
            DmIoOp::Read => {
                let c = ((t.sector - src) / secs(CHUNK)) as usize;
                if !read[c] {
                    read[c] = true;
                    ahead += 1;
                    max = max.max(ahead);
                }
            }
            DmIoOp::Write => {
                let c = ((t.sector - dst) / secs(CHUNK)) as usize;
                if !written[c] {
                    written[c] = true;
                    ahead = ahead.saturating_sub(1);
                }
            }
            _ => {}
        }
    }
    max
}

/// KC-10: 2 MiB in 64 KiB chunks from sector 0 to 4 MiB of one device, reads
/// delayed irregularly. Without WRITE_SEQ the writes come out of order (a
/// check that the setup can reorder at all); with WRITE_SEQ the write ops'
/// sectors strictly increase in issue order, the writes tile the destination,
/// several chunks are read ahead of the writes, and the data is correct.
#[test]
fn kc10_write_seq_orders_destination_writes() {
    for backing in backings() {
        let td = TestDevice::new(backing, 8 * MIB);
        let kc = kc(KcopydConfig::new().sub_job_kb(64));
        let io = kc.dmio().clone();
        let len = 2 * MIB;
        let chunks = (len / CHUNK) as usize;
        let from = region(&td, 0, len);
        let to = region(&td, 4 * MIB, len);
        write_pattern(&io, &td.dev, from.sector, from.count, SRC_SEED);
        // Without WRITE_SEQ the writes must come out of order at least once in
        // a few tries (a loaded machine may stall the completion thread long
        // enough to hide the delays), or the WRITE_SEQ check proves nothing.
        let mut orders = vec![];
        for attempt in 0..3 {
            let at = format!("{backing}/no flags/attempt {attempt}");
            let trace = run(&kc, &td, &from, &to, CopyFlags::empty(), &at);
            let order = write_chunks(&trace, to.sector);
            if !order.windows(2).all(|w| w[0] < w[1]) {
                orders.clear();
                break;
            }
            orders.push(order);
        }
        assert!(
            orders.is_empty(),
            "{backing}: the setup never reordered writes without WRITE_SEQ: {orders:?}"
        );
        let at = format!("{backing}/WRITE_SEQ");
        let trace = run(&kc, &td, &from, &to, CopyFlags::WRITE_SEQ, &at);
        let writes: Vec<u64> =
            trace.iter().filter(|t| t.op == DmIoOp::Write).map(|t| t.sector).collect();
        assert!(
            writes.windows(2).all(|w| w[0] < w[1]),
            "{at}: writes out of order: chunks {:?}",
            write_chunks(&trace, to.sector)
        );
        let ahead = max_reads_ahead(&trace, from.sector, to.sector, chunks);
        assert!(ahead >= 2, "{at}: reads did not run ahead of the ordered writes");
        assert!(ahead <= kcopyd::SUB_JOBS_IN_FLIGHT, "{at}: {ahead} chunks in flight");
    }
}

/// One copy of `from` to `to` (one device) with irregular read delays:
/// checks the outcome, that the writes tile the destination and the data;
/// returns the device's trace.
fn run(
    kc: &kcopyd::KcopydClient,
    td: &TestDevice,
    from: &dmio::DmIoRegion,
    to: &dmio::DmIoRegion,
    flags: CopyFlags,
    at: &str,
) -> Vec<TracedOp> {
    write_pattern(kc.dmio(), &td.dev, to.sector, to.count, OLD_SEED);
    irregular_read_delays(&td.dev);
    td.dev.faults().start_trace();
    let outcome = copy_wait(kc, from, std::slice::from_ref(to), flags, at);
    let trace = td.dev.faults().take_trace();
    td.dev.faults().clear_rules();
    assert_clean(&outcome, from.count * 512, at);
    assert_tiles(&trace, DmIoOp::Write, to.sector..to.sector + to.count, at);
    expect_pattern(&disk(&td.dev, to.sector, to.count), from.sector, SRC_SEED, at);
    trace
}

/// KC-10 errors: with WRITE_SEQ (alone, and with IGNORE_ERROR, which it
/// overrides) a write failing in chunk 5 of 32 stops the job: no write op at or
/// beyond chunk 6 is issued (their source reads are held back 100 ms so that they
/// cannot be ready before the failure is known), chunks 0-4 are copied, chunk 5
/// is not fully written, later chunks keep their old data, `write_err = 0b1`
/// and the completed prefix is 5 chunks.
#[test]
fn kc10_write_seq_stops_after_a_write_error() {
    let src_image = pattern(0, secs(4 * MIB), SRC_SEED);
    let old_image = pattern(0, secs(4 * MIB), OLD_SEED);
    for backing in backings() {
        let src = TestDevice::new(backing, 4 * MIB);
        let dst = TestDevice::new(backing, 4 * MIB);
        let kc = kc(KcopydConfig::new().sub_job_kb(64));
        let io = kc.dmio().clone();
        let len = 2 * MIB;
        let from = region(&src, 256 * KIB, len);
        let to = region(&dst, 1024 * KIB, len);
        write_image(&io, &src.dev, &src_image, 0, secs(4 * MIB));
        let k = 5u64;
        let bad_chunk = to.sector + k * secs(CHUNK);
        src.dev.faults().add(FaultRule {
            ops: OpSet::READ,
            sectors: from.sector + (k + 1) * secs(CHUNK)..from.sector + from.count,
            action: FaultAction::Delay(Duration::from_millis(100)),
            trigger: Trigger::Always,
        });
        for flags in [CopyFlags::WRITE_SEQ, CopyFlags::WRITE_SEQ | CopyFlags::IGNORE_ERROR] {
            let at = format!("{backing}/{flags:?}");
            write_image(&io, &dst.dev, &old_image, 0, secs(4 * MIB));
            let bad = bad_chunk + 8..bad_chunk + 16;
            let rule = dst.dev.faults().add(FaultRule::fail(OpSet::WRITE, bad, libc::EIO));
            dst.dev.faults().start_trace();
            let outcome = copy_wait(&kc, &from, std::slice::from_ref(&to), flags, &at);
            let trace = dst.dev.faults().take_trace();
            dst.dev.faults().remove(rule);
            assert!(!failed_ranges(&trace).is_empty(), "{at}: the fault never fired");
            assert_eq!(outcome.write_err.bits(), 0b1, "{at}: {outcome:?}");
            assert!(!outcome.read_err, "{at}: {outcome:?}");
            assert_eq!(outcome.completed_prefix_bytes, k * CHUNK, "{at}: {outcome:?}");
            assert_pages_back(&kc, &at);
            let late: Vec<&TracedOp> = trace
                .iter()
                .filter(|t| t.op == DmIoOp::Write && t.sector >= bad_chunk + secs(CHUNK))
                .collect();
            assert!(late.is_empty(), "{at}: writes after the failed chunk: {late:?}");
            let got = disk(&dst.dev, to.sector, to.count);
            let new = sectors(&src_image, from.sector, from.count);
            let chunks = classify(&got, CHUNK, new, sectors(&old_image, to.sector, to.count));
            assert!(chunks[..k as usize].iter().all(|c| *c == Chunk::New), "{at}: {chunks:?}");
            assert_ne!(chunks[k as usize], Chunk::New, "{at}: the failed chunk was written");
            assert!(
                chunks[k as usize + 1..].iter().all(|c| *c == Chunk::Old),
                "{at}: chunks after the error were written: {chunks:?}"
            );
            assert!(outcome.bytes_done < len, "{at}: {outcome:?}");
        }
    }
}

/// KC-10 with a source read error: the read of chunk 5 of 32 fails while the
/// reads of chunks 0-4 are held back 50 ms (so they are still in flight when
/// the error arrives). In-flight sub-jobs finish, and with WRITE_SEQ only
/// later chunks are never written: chunks 0-4 reach the destination (in order
/// with WRITE_SEQ), chunk 5 is not written, `read_err` is set and the
/// completed prefix is 5 chunks. With WRITE_SEQ nothing from chunk 5 on is
/// written. Without WRITE_SEQ (the reference) the same holds for chunks 0-5.
#[test]
fn kc10_write_seq_read_error_keeps_earlier_chunks() {
    let src_image = pattern(0, secs(4 * MIB), SRC_SEED);
    let old_image = pattern(0, secs(4 * MIB), OLD_SEED);
    for backing in backings() {
        let src = TestDevice::new(backing, 4 * MIB);
        let dst = TestDevice::new(backing, 4 * MIB);
        let kc = kc(KcopydConfig::new().sub_job_kb(64));
        let io = kc.dmio().clone();
        let len = 2 * MIB;
        let from = region(&src, 256 * KIB, len);
        let to = region(&dst, 1024 * KIB, len);
        write_image(&io, &src.dev, &src_image, 0, secs(4 * MIB));
        let k = 5usize;
        let bad = from.sector + k as u64 * secs(CHUNK);
        src.dev.faults().add(FaultRule::fail(OpSet::READ, bad + 8..bad + 16, libc::EIO));
        src.dev.faults().add(FaultRule {
            ops: OpSet::READ,
            sectors: from.sector..bad,
            action: FaultAction::Delay(Duration::from_millis(50)),
            trigger: Trigger::Always,
        });
        for flags in [CopyFlags::empty(), CopyFlags::WRITE_SEQ] {
            let at = format!("{backing}/{flags:?}");
            write_image(&io, &dst.dev, &old_image, 0, secs(4 * MIB));
            dst.dev.faults().start_trace();
            let outcome = copy_wait(&kc, &from, std::slice::from_ref(&to), flags, &at);
            let trace = dst.dev.faults().take_trace();
            assert!(outcome.read_err, "{at}: {outcome:?}");
            assert!(outcome.write_err.is_empty(), "{at}: {outcome:?}");
            assert_pages_back(&kc, &at);
            let got = disk(&dst.dev, to.sector, to.count);
            let new = sectors(&src_image, from.sector, from.count);
            let chunks = classify(&got, CHUNK, new, sectors(&old_image, to.sector, to.count));
            assert!(
                chunks[..k].iter().all(|c| *c == Chunk::New),
                "{at}: chunks before the failed one, in flight at the error, were dropped: \
                 {chunks:?} ({outcome:?})"
            );
            assert_eq!(chunks[k], Chunk::Old, "{at}: the failed chunk was written");
            assert_eq!(outcome.completed_prefix_bytes, k as u64 * CHUNK, "{at}: {outcome:?}");
            if flags.contains(CopyFlags::WRITE_SEQ) {
                let writes = write_chunks(&trace, to.sector);
                assert!(writes.windows(2).all(|w| w[0] < w[1]), "{at}: out of order: {writes:?}");
                assert!(
                    chunks[k..].iter().all(|c| *c == Chunk::Old),
                    "{at}: chunks at or after the error were written: {chunks:?}"
                );
            }
        }
    }
}

/// KC-10 for zero jobs: zeroing 2 MiB in 64 KiB chunks with WRITE_SEQ (plain
/// writes: write-zeroes disabled), the write of chunk 2 failing. As for
/// copies, the writes are issued in increasing order and, after the error, no
/// later chunk is written: chunks 0-1 are zeroed, chunks 3-31 keep their old
/// data, `write_err = 0b1`.
#[test]
fn kc10_write_seq_zero_job_stops_after_a_write_error() {
    let old_image = pattern(0, secs(4 * MIB), OLD_SEED);
    for backing in backings() {
        let at = backing.to_string();
        let dst = TestDevice::new(backing, 4 * MIB);
        let kc = kc(KcopydConfig::new().sub_job_kb(64));
        write_image(kc.dmio(), &dst.dev, &old_image, 0, secs(4 * MIB));
        dst.dev.faults().override_limits(dmio::fault::LimitOverrides {
            max_write_zeroes_bytes: Some(0),
            ..Default::default()
        });
        let to = region(&dst, 1024 * KIB, 2 * MIB);
        let k = 2usize;
        let bad = to.sector + k as u64 * secs(CHUNK);
        dst.dev.faults().add(FaultRule::fail(OpSet::WRITE, bad + 8..bad + 16, libc::EIO));
        dst.dev.faults().start_trace();
        let outcome = kc.zero_sync(std::slice::from_ref(&to), CopyFlags::WRITE_SEQ).expect("valid");
        let trace = dst.dev.faults().take_trace();
        assert_eq!(outcome.write_err.bits(), 0b1, "{at}: {outcome:?}");
        assert_eq!(outcome.completed_prefix_bytes, k as u64 * CHUNK, "{at}: {outcome:?}");
        assert_pages_back(&kc, &at);
        let writes = write_chunks(&trace, to.sector);
        assert!(writes.windows(2).all(|w| w[0] < w[1]), "{at}: out of order: {writes:?}");
        assert!(
            writes.iter().all(|&c| c as usize <= k),
            "{at}: chunks after the failed one were written: {writes:?}"
        );
        let got = disk(&dst.dev, to.sector, to.count);
        let zeros = vec![0u8; to.count as usize * 512];
        let chunks = classify(&got, CHUNK, &zeros, sectors(&old_image, to.sector, to.count));
        assert!(chunks[..k].iter().all(|c| *c == Chunk::New), "{at}: {chunks:?}");
        assert!(
            chunks[k + 1..].iter().all(|c| *c == Chunk::Old),
            "{at}: chunks after the error were zeroed: {chunks:?}"
        );
    }
}

/// KC-10, what a zoned device needs: with WRITE_SEQ the destination writes
/// also *complete* in increasing order (the write log records completions)
/// even when every other write is held back 10 ms and reads are delayed
/// irregularly; the data is correct.
#[test]
fn kc10_write_seq_writes_complete_in_order() {
    let src_image = pattern(0, secs(4 * MIB), SRC_SEED);
    let src = TestDevice::new(tests::Backing::File, 4 * MIB);
    let dst = TestDevice::new(tests::Backing::File, 4 * MIB);
    let kc = kc(KcopydConfig::new().sub_job_kb(64));
    write_image(kc.dmio(), &src.dev, &src_image, 0, secs(4 * MIB));
    irregular_read_delays(&src.dev);
    dst.dev
        .faults()
        .add(FaultRule::delay(OpSet::WRITE, Duration::from_millis(10)).when(Trigger::EveryNth(2)));
    let from = region(&src, 0, 2 * MIB);
    let to = region(&dst, 512 * KIB, 2 * MIB);
    dst.dev.faults().start_write_log();
    let outcome =
        copy_wait(&kc, &from, std::slice::from_ref(&to), CopyFlags::WRITE_SEQ, "write log");
    let log = dst.dev.faults().take_write_log();
    assert_clean(&outcome, 2 * MIB, "write log");
    let sectors_written: Vec<u64> = log
        .entries()
        .iter()
        .filter_map(|e| match e {
            dmio::fault::LogEntry::Write { sector, .. } => Some(*sector),
            _ => None,
        })
        .collect();
    assert!(!sectors_written.is_empty());
    assert!(
        sectors_written.windows(2).all(|w| w[0] < w[1]),
        "writes completed out of order: {sectors_written:?}"
    );
    let got = disk(&dst.dev, to.sector, to.count);
    kcopyd_common::assert_same(&got, sectors(&src_image, 0, to.count), to.sector, "write log");
}

/// KC-10, detection: a job whose destination is zoned writes in order without
/// being asked (the kernel sets WRITE_SEQ for `bdev_is_zoned` destinations).
/// The same setup reorders writes to the device when it is not zoned.
#[test]
fn kc10_a_zoned_destination_gets_write_seq_by_itself() {
    let td = TestDevice::new(tests::Backing::File, 8 * MIB);
    let kc = kc(KcopydConfig::new().sub_job_kb(64));
    let len = 2 * MIB;
    let from = region(&td, 0, len);
    let to = region(&td, 4 * MIB, len);
    write_pattern(kc.dmio(), &td.dev, from.sector, from.count, SRC_SEED);
    let in_order = |trace: &[TracedOp]| {
        let order = write_chunks(trace, to.sector);
        order.windows(2).all(|w| w[0] < w[1])
    };
    let reordered = (0..3).any(|attempt| {
        let trace = run(&kc, &td, &from, &to, CopyFlags::empty(), &format!("not zoned/{attempt}"));
        !in_order(&trace)
    });
    assert!(reordered, "the setup never reordered writes to a device that is not zoned");
    td.dev.faults().override_limits(dmio::fault::LimitOverrides {
        zoned: Some(dmio::ZonedModel::HostManaged),
        ..Default::default()
    });
    assert!(td.dev.is_zoned());
    for attempt in 0..3 {
        let trace = run(&kc, &td, &from, &to, CopyFlags::empty(), &format!("zoned/{attempt}"));
        assert!(
            in_order(&trace),
            "zoned/{attempt}: writes out of order: {:?}",
            write_chunks(&trace, to.sector)
        );
    }
    td.dev.faults().override_limits(dmio::fault::LimitOverrides::default());
    assert!(!td.dev.is_zoned());
}
