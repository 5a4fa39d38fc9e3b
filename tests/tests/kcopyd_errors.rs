//! kcopyd under I/O errors injected by the dmio fault layer, on every backing
//! of `tests::backings()`:
//!
//! - KC-6: a failed source read without IGNORE_ERROR leaves that chunk of the
//!   destination untouched; with IGNORE_ERROR the destination gets zeros exactly
//!   over the failed read operation and everything else is copied; `read_err`
//!   is set either way and the failure names the source, sector and errno;
//! - KC-7: a failed write to destination 1 of 2 sets `write_err = 0b10` only,
//!   destination 0 gets its data, the failure names the device, sector and
//!   errno (single chunk; split with IGNORE_ERROR; split without);
//! - KC-8 / KC-9: a 64 MiB copy whose source read fails at 10 MiB stops
//!   (nothing beyond the chunks in flight is written, the completed prefix is
//!   10 MiB) unless IGNORE_ERROR, which copies everything but the failed range;
//! - `JobOutcome::into_result` turns failures into `KcopydError::JobFailed`.

mod kcopyd_common;

use dmio::fault::{FaultRule, OpSet};
use dmio::{DmIoOp, Errno};
use kcopyd::{CopyFlags, JobOutcome, KcopydConfig, KcopydError};
use kcopyd_common::{
    Chunk, KIB, MIB, assert_pages_back, assert_same, classify, copy_wait, disk, failed_ranges,
    in_ranges, kc, region, secs, sectors, write_image,
};
use tests::{TestDevice, backings, pattern};

const SRC_SEED: u64 = 0xfeed;
const OLD_SEED: u64 = 0xdead;

/// Checks a failed outcome's first failure: region, device, op, errno, and a
/// first sector in `sectors` (the failing op starts at or before the failing
/// range's end).
fn assert_failure(
    outcome: &JobOutcome,
    region: usize,
    device: u64,
    op: DmIoOp,
    errno: i32,
    sectors: std::ops::Range<u64>,
    at: &str,
) {
    let f = outcome
        .failures
        .iter()
        .find(|f| f.op == op)
        .unwrap_or_else(|| panic!("{at}: no {op} failure reported: {outcome:?}"));
    assert_eq!(f.region, region, "{at}: {f:?}");
    assert_eq!(f.device.id(), device, "{at}: the failure names another device: {f:?}");
    assert_eq!(f.errno, Errno(errno), "{at}: {f:?}");
    assert!(sectors.contains(&f.sector), "{at}: failure sector {} not in {sectors:?}", f.sector);
}

/// Checks each destination sector (`bytes`, from destination sector `dst`):
/// inside one of `zeroed` (destination sectors) zeros, elsewhere the copied
/// data `copied` (as long as `bytes`).
fn assert_copied_except(
    bytes: &[u8],
    copied: &[u8],
    dst: u64,
    zeroed: &[std::ops::Range<u64>],
    at: &str,
) {
    assert_eq!(bytes.len(), copied.len());
    let mut zeros = 0;
    for (i, (s, c)) in bytes.chunks(512).zip(copied.chunks(512)).enumerate() {
        let sector = dst + i as u64;
        if in_ranges(zeroed, sector) {
            assert!(s.iter().all(|&b| b == 0), "{at}: sector {sector} should be zeros");
            zeros += 1;
        } else {
            assert!(s == c, "{at}: destination sector {sector} does not hold the copied data");
        }
    }
    assert!(zeros > 0, "{at}: no zeroed sector at all");
}

/// KC-6: 1 MiB copied with 64 KiB sub-jobs; source reads overlapping 4 KiB in
/// chunk 5 fail with EIO.
///
/// Without IGNORE_ERROR: `read_err`, no write error, chunk 5 of the destination
/// keeps its old data, chunks 0-4 (claimed before it) are copied, every chunk
/// is whole (copied or old), the completed prefix is 5 chunks and `bytes_done`
/// counts the copied chunks plus the failed one. With IGNORE_ERROR: `read_err`,
/// every byte copied except zeros exactly over the failed read op, `bytes_done`
/// is the total, the prefix stops at the failed op.
#[test]
fn kc6_source_read_error() {
    let src_image = pattern(0, secs(4 * MIB), SRC_SEED);
    let old_image = pattern(0, secs(4 * MIB), OLD_SEED);
    for backing in backings() {
        let src = TestDevice::new(backing, 4 * MIB);
        let dst = TestDevice::new(backing, 4 * MIB);
        let kc = kc(KcopydConfig::new().sub_job_kb(64));
        let io = kc.dmio().clone();
        write_image(&io, &src.dev, &src_image, 0, secs(4 * MIB));
        let len = MIB;
        let chunk = 64 * KIB;
        let from = region(&src, 128 * KIB, len);
        let to = region(&dst, 512 * KIB, len);
        let chunk5 = from.sector + secs(5 * chunk);
        let bad = chunk5 + 16..chunk5 + 24;
        src.dev.faults().add(FaultRule::fail(OpSet::READ, bad.clone(), libc::EIO));
        for flags in [CopyFlags::empty(), CopyFlags::IGNORE_ERROR] {
            let at = format!("{backing}/{flags:?}");
            write_image(&io, &dst.dev, &old_image, 0, secs(4 * MIB));
            src.dev.faults().start_trace();
            let outcome = copy_wait(&kc, &from, std::slice::from_ref(&to), flags, &at);
            let failed = failed_ranges(&src.dev.faults().take_trace());
            assert!(!failed.is_empty(), "{at}: the fault never fired");
            assert!(outcome.read_err, "{at}: read_err not set: {outcome:?}");
            assert!(outcome.write_err.is_empty(), "{at}: {outcome:?}");
            assert!(!outcome.cancelled, "{at}: {outcome:?}");
            assert!(!outcome.is_ok(), "{at}");
            assert_eq!(outcome.total_bytes, len, "{at}");
            assert_failure(
                &outcome,
                0,
                src.dev.id(),
                DmIoOp::Read,
                libc::EIO,
                chunk5..bad.end,
                &at,
            );
            let got = disk(&dst.dev, to.sector, to.count);
            let new = sectors(&src_image, from.sector, from.count);
            let old = sectors(&old_image, to.sector, to.count);
            if flags.is_empty() {
                let chunks = classify(&got, chunk, new, old);
                assert_eq!(chunks[5], Chunk::Old, "{at}: the failed chunk was written");
                assert!(chunks[..5].iter().all(|c| *c == Chunk::New), "{at}: {chunks:?}");
                assert!(!chunks.contains(&Chunk::Other), "{at}: a torn chunk: {chunks:?}");
                // At most chunks 5-12 were in flight when chunk 5 failed.
                assert!(
                    chunks[13..].iter().all(|c| *c == Chunk::Old),
                    "{at}: chunks started after the error: {chunks:?}"
                );
                let copied = chunks.iter().filter(|c| **c == Chunk::New).count() as u64;
                assert_eq!(outcome.bytes_done, (copied + 1) * chunk, "{at}: {outcome:?}");
                assert_eq!(outcome.completed_prefix_bytes, 5 * chunk, "{at}: {outcome:?}");
            } else {
                let zeroed: Vec<_> = failed
                    .iter()
                    .map(|r| r.start - from.sector + to.sector..r.end - from.sector + to.sector)
                    .collect();
                assert_copied_except(&got, new, to.sector, &zeroed, &at);
                assert_eq!(outcome.bytes_done, len, "{at}: {outcome:?}");
                let failed_at = (failed.iter().map(|r| r.start).min().unwrap() - from.sector) * 512;
                assert!(
                    (5 * chunk..=failed_at).contains(&outcome.completed_prefix_bytes),
                    "{at}: completed_prefix_bytes {} not in {}..={failed_at}",
                    outcome.completed_prefix_bytes,
                    5 * chunk
                );
            }
            assert_pages_back(&kc, &at);
            // The rest of the destination device is never touched.
            let whole = disk(&dst.dev, 0, secs(4 * MIB));
            assert_same(
                &whole[..to.sector as usize * 512],
                sectors(&old_image, 0, to.sector),
                0,
                &at,
            );
            let end = (to.sector + to.count) as usize * 512;
            assert_same(&whole[end..], &old_image[end..], to.sector + to.count, &at);
        }
    }
}

/// KC-7: writes to destination 1 of 2 fail with ENOSPC in one range.
///
/// (a) One chunk: `write_err = 0b10`, no read error, destination 0 holds the
/// data, destination 1 keeps its old data over the failed ops and has the data
/// elsewhere. (b) 1 MiB in 64 KiB chunks with IGNORE_ERROR, failure in chunk 2:
/// the same, over the whole range, `bytes_done` the total, the prefix 2 chunks.
/// (c) The same without IGNORE_ERROR: `write_err = 0b10`, chunks 0-2 reached
/// destination 0 (the failed chunk's write to the other destination still
/// happens), every chunk of both destinations is whole or old, chunks from 10
/// on (beyond those in flight at the error) are not written, the prefix is 2
/// chunks.
#[test]
fn kc7_write_error_on_one_destination() {
    let src_image = pattern(0, secs(4 * MIB), SRC_SEED);
    let old_image = pattern(0, secs(4 * MIB), OLD_SEED);
    for backing in backings() {
        let src = TestDevice::new(backing, 4 * MIB);
        let d0 = TestDevice::new(backing, 4 * MIB);
        let d1 = TestDevice::new(backing, 4 * MIB);
        let kc = kc(KcopydConfig::new().sub_job_kb(64));
        let io = kc.dmio().clone();
        write_image(&io, &src.dev, &src_image, 0, secs(4 * MIB));
        let chunk = 64 * KIB;
        let cases = [
            ("single chunk", chunk, 0u64, CopyFlags::empty()),
            ("split, IGNORE_ERROR", MIB, 2, CopyFlags::IGNORE_ERROR),
            ("split", MIB, 2, CopyFlags::empty()),
        ];
        for (what, len, k, flags) in cases {
            let at = format!("{backing}/{what}");
            for d in [&d0, &d1] {
                write_image(&io, &d.dev, &old_image, 0, secs(4 * MIB));
            }
            let from = region(&src, 64 * KIB, len);
            let dests = [region(&d0, 256 * KIB, len), region(&d1, 1024 * KIB, len)];
            let chunk_k = dests[1].sector + secs(k * chunk);
            let bad = chunk_k + 8..chunk_k + 16;
            let rule =
                d1.dev.faults().add(FaultRule::fail(OpSet::WRITE, bad.clone(), libc::ENOSPC));
            d1.dev.faults().start_trace();
            let outcome = copy_wait(&kc, &from, &dests, flags, &at);
            let failed = failed_ranges(&d1.dev.faults().take_trace());
            d1.dev.faults().remove(rule);
            assert!(!failed.is_empty(), "{at}: the fault never fired");
            assert_eq!(outcome.write_err.bits(), 0b10, "{at}: {outcome:?}");
            assert!(!outcome.read_err, "{at}: {outcome:?}");
            assert!(!outcome.cancelled, "{at}: {outcome:?}");
            assert_failure(
                &outcome,
                1,
                d1.dev.id(),
                DmIoOp::Write,
                libc::ENOSPC,
                chunk_k..bad.end,
                &at,
            );
            assert!(
                outcome.failures.iter().all(|f| f.region == 1 && f.device.id() == d1.dev.id()),
                "{at}: a failure names another destination: {:?}",
                outcome.failures
            );
            assert_eq!(outcome.completed_prefix_bytes, k * chunk, "{at}: {outcome:?}");
            let got0 = disk(&d0.dev, dests[0].sector, dests[0].count);
            let got1 = disk(&d1.dev, dests[1].sector, dests[1].count);
            let new = sectors(&src_image, from.sector, from.count);
            let old0 = sectors(&old_image, dests[0].sector, dests[0].count);
            let old1 = sectors(&old_image, dests[1].sector, dests[1].count);
            if len == chunk || flags.contains(CopyFlags::IGNORE_ERROR) {
                assert_same(&got0, new, dests[0].sector, &format!("{at}: destination 0"));
                assert_eq!(outcome.bytes_done, len, "{at}: {outcome:?}");
                let parts = got1.chunks(512).zip(new.chunks(512).zip(old1.chunks(512)));
                for (i, (s, (n, o))) in parts.enumerate() {
                    let sector = dests[1].sector + i as u64;
                    let (expected, what) =
                        if in_ranges(&failed, sector) { (o, "old data") } else { (n, "the copy") };
                    assert!(s == expected, "{at}: destination 1 sector {sector} lacks {what}");
                }
            } else {
                let c0 = classify(&got0, chunk, new, old0);
                let c1 = classify(&got1, chunk, new, old1);
                assert!(c0[..=k as usize].iter().all(|c| *c == Chunk::New), "{at}: {c0:?}");
                assert!(c1[..k as usize].iter().all(|c| *c == Chunk::New), "{at}: {c1:?}");
                assert!(!c0.contains(&Chunk::Other), "{at}: destination 0: {c0:?}");
                assert_ne!(c1[k as usize], Chunk::New, "{at}: the failed write landed");
                assert!(!c1[k as usize + 1..].contains(&Chunk::Other), "{at}: {c1:?}");
                let limit = k as usize + kcopyd::SUB_JOBS_IN_FLIGHT;
                assert!(
                    c0[limit..].iter().all(|c| *c == Chunk::Old),
                    "{at}: chunks started after the error: {c0:?}"
                );
                assert_eq!(
                    c0,
                    {
                        let mut c = c1.clone();
                        c[k as usize] = Chunk::New;
                        c
                    },
                    "{at}: the destinations got different chunks"
                );
            }
            assert_pages_back(&kc, &at);
            let err = outcome.into_result().expect_err("a failed job");
            match err {
                KcopydError::JobFailed { read_err, write_err, cancelled, first_failure } => {
                    assert!(!read_err && !cancelled, "{at}");
                    assert_eq!(write_err.bits(), 0b10, "{at}");
                    let f = first_failure.expect("the first failure");
                    assert_eq!(f.errno, Errno(libc::ENOSPC), "{at}");
                }
                other => panic!("{at}: expected JobFailed, got {other:?}"),
            }
        }
    }
}

/// KC-8 and KC-9: 64 MiB in 512 KiB sub-jobs, source reads overlapping the
/// first 4 KiB at 10 MiB fail.
///
/// KC-8, no flags: `read_err`, the first 10 MiB copied, the completed prefix is
/// 10 MiB, the failed chunk is not written, every chunk is whole or old, and
/// nothing beyond 10 MiB + 8 × 512 KiB (chunks in flight) + 1 MiB of slack is
/// written; `bytes_done` counts the copied chunks plus the failed one.
/// KC-9, IGNORE_ERROR: the whole range is copied except zeros exactly over the
/// failed read op; `read_err` still set, `bytes_done` the total.
#[test]
fn kc8_kc9_stop_on_error_unless_ignore_error() {
    let len = 64 * MIB;
    let src_image = pattern(0, secs(len), SRC_SEED);
    let old_image = pattern(0, secs(len), OLD_SEED);
    for backing in backings() {
        let src = TestDevice::new(backing, len);
        let dst = TestDevice::new(backing, len);
        let kc = kc(KcopydConfig::new().sub_job_kb(512));
        let io = kc.dmio().clone();
        let chunk = kc.sub_job_bytes();
        assert_eq!(chunk, 512 * KIB);
        write_image(&io, &src.dev, &src_image, 0, secs(len));
        let from = region(&src, 0, len);
        let to = region(&dst, 0, len);
        let fail_at = secs(10 * MIB);
        src.dev.faults().add(FaultRule::fail(OpSet::READ, fail_at..fail_at + 8, libc::EIO));
        for flags in [CopyFlags::empty(), CopyFlags::IGNORE_ERROR] {
            let at = format!("{backing}/{flags:?}");
            write_image(&io, &dst.dev, &old_image, 0, secs(len));
            src.dev.faults().start_trace();
            let outcome = copy_wait(&kc, &from, std::slice::from_ref(&to), flags, &at);
            let failed = failed_ranges(&src.dev.faults().take_trace());
            assert!(!failed.is_empty(), "{at}: the fault never fired");
            assert!(outcome.read_err, "{at}: {outcome:?}");
            assert!(outcome.write_err.is_empty(), "{at}: {outcome:?}");
            assert!(!outcome.cancelled, "{at}: {outcome:?}");
            assert_eq!(outcome.total_bytes, len, "{at}");
            assert_eq!(outcome.completed_prefix_bytes, 10 * MIB, "{at}: {outcome:?}");
            assert_failure(
                &outcome,
                0,
                src.dev.id(),
                DmIoOp::Read,
                libc::EIO,
                fail_at..fail_at + 8,
                &at,
            );
            assert_pages_back(&kc, &at);
            let got = disk(&dst.dev, 0, secs(len));
            if flags.is_empty() {
                let chunks = classify(&got, chunk, &src_image, &old_image);
                let first_bad = (10 * MIB / chunk) as usize;
                let limit = ((10 * MIB + 8 * chunk + MIB) / chunk) as usize;
                assert!(chunks[..first_bad].iter().all(|c| *c == Chunk::New), "{at}: {chunks:?}");
                assert_eq!(chunks[first_bad], Chunk::Old, "{at}: the failed chunk was written");
                assert!(!chunks.contains(&Chunk::Other), "{at}: a torn chunk: {chunks:?}");
                let late: Vec<usize> =
                    (limit..chunks.len()).filter(|&c| chunks[c] != Chunk::Old).collect();
                assert!(late.is_empty(), "{at}: chunks {late:?} were written after the error");
                let copied = chunks.iter().filter(|c| **c == Chunk::New).count() as u64;
                assert_eq!(outcome.bytes_done, (copied + 1) * chunk, "{at}: {outcome:?}");
                assert!(outcome.bytes_done < len, "{at}: {outcome:?}");
            } else {
                assert_copied_except(&got, &src_image, 0, &failed, &at);
                assert_eq!(outcome.bytes_done, len, "{at}: {outcome:?}");
            }
        }
    }
}

/// `read_err` from a failed source read surfaces through `into_result` as
/// `JobFailed` with the first failure; a clean outcome passes through.
#[test]
fn into_result_reports_read_failures() {
    let src = TestDevice::new(tests::Backing::File, MIB);
    let dst = TestDevice::new(tests::Backing::File, MIB);
    let kc = kc(KcopydConfig::new());
    let from = region(&src, 0, 64 * KIB);
    let to = region(&dst, 0, 64 * KIB);
    let ok = kc.copy_sync(&from, std::slice::from_ref(&to), CopyFlags::empty()).expect("valid");
    assert_eq!(ok.into_result().expect("a clean job").total_bytes, 64 * KIB);
    src.dev.faults().add(FaultRule::fail(OpSet::READ, 0..8, libc::EILSEQ));
    let bad = kc.copy_sync(&from, std::slice::from_ref(&to), CopyFlags::empty()).expect("valid");
    match bad.into_result() {
        Err(KcopydError::JobFailed {
            read_err: true,
            write_err,
            cancelled: false,
            first_failure,
        }) => {
            assert!(write_err.is_empty());
            let f = first_failure.expect("the first failure");
            assert_eq!((f.region, f.op, f.errno), (0, DmIoOp::Read, Errno(libc::EILSEQ)));
            assert_eq!(f.device.id(), src.dev.id());
        }
        other => panic!("expected JobFailed with read_err, got {other:?}"),
    }
}

/// KC-11 errors: zeroing two destinations (plain writes: write-zeroes disabled
/// on both) with IGNORE_ERROR, writes to destination 1 failing in one range:
/// `write_err = 0b10`, destination 0 all zeros, destination 1 zeros except
/// over the failed ops, which keep their old data; no read error.
#[test]
fn zero_job_write_error() {
    for backing in backings() {
        let at = backing.to_string();
        let old_image = pattern(0, secs(2 * MIB), OLD_SEED);
        let devs = TestDevice::many(backing, 2 * MIB, 2);
        let kc = kc(KcopydConfig::new().sub_job_kb(64));
        let no_wz =
            dmio::fault::LimitOverrides { max_write_zeroes_bytes: Some(0), ..Default::default() };
        for td in &devs {
            write_image(kc.dmio(), &td.dev, &old_image, 0, secs(2 * MIB));
            td.dev.faults().override_limits(no_wz);
        }
        let dests = [region(&devs[0], 0, MIB), region(&devs[1], 512 * KIB, MIB)];
        let bad = dests[1].sector + 300..dests[1].sector + 308;
        devs[1].dev.faults().add(FaultRule::fail(OpSet::WRITE, bad.clone(), libc::EIO));
        devs[1].dev.faults().start_trace();
        let outcome = kc.zero_sync(&dests, CopyFlags::IGNORE_ERROR).expect("valid");
        let failed = failed_ranges(&devs[1].dev.faults().take_trace());
        assert!(!failed.is_empty(), "{at}: the fault never fired");
        assert_eq!(outcome.write_err.bits(), 0b10, "{at}: {outcome:?}");
        assert!(!outcome.read_err && !outcome.used_write_zeroes, "{at}: {outcome:?}");
        assert_eq!(outcome.bytes_done, MIB, "{at}: {outcome:?}");
        let f = &outcome.failures[0];
        assert_eq!((f.region, f.op, f.errno), (1, DmIoOp::Write, Errno(libc::EIO)), "{at}");
        let got0 = disk(&devs[0].dev, dests[0].sector, dests[0].count);
        assert!(got0.iter().all(|&b| b == 0), "{at}: destination 0 not zeroed");
        let got1 = disk(&devs[1].dev, dests[1].sector, dests[1].count);
        let old1 = sectors(&old_image, dests[1].sector, dests[1].count);
        for (i, (s, o)) in got1.chunks(512).zip(old1.chunks(512)).enumerate() {
            let sector = dests[1].sector + i as u64;
            if in_ranges(&failed, sector) {
                assert!(s == o, "{at}: failed sector {sector} changed");
            } else {
                assert!(s.iter().all(|&b| b == 0), "{at}: sector {sector} not zeroed");
            }
        }
    }
}

/// KC-11, a device that reports write-zeroes support but refuses the op with
/// EOPNOTSUPP (destination 1, every write-zeroes): the zero job falls back to
/// writing zeros (as documented by the implementation) and ends without
/// error, both destinations zeroed, the sectors around them untouched, every
/// pool page back.
#[test]
fn zero_job_falls_back_when_write_zeroes_is_refused() {
    let old_image = pattern(0, secs(2 * MIB), OLD_SEED);
    let devs = TestDevice::many(tests::Backing::File, 2 * MIB, 2);
    if !devs.iter().all(|td| td.dev.supports_write_zeroes()) {
        eprintln!("skipping: the test filesystem has no write-zeroes (hole punching)");
        return;
    }
    let kc = kc(KcopydConfig::new().sub_job_kb(64));
    for td in &devs {
        write_image(kc.dmio(), &td.dev, &old_image, 0, secs(2 * MIB));
    }
    devs[1].dev.faults().add(FaultRule::fail(OpSet::WRITE_ZEROES, 0..u64::MAX, libc::EOPNOTSUPP));
    let dests = [region(&devs[0], 64 * KIB, MIB), region(&devs[1], 256 * KIB, MIB)];
    let outcome = kc.zero_sync(&dests, CopyFlags::empty()).expect("valid");
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(outcome.bytes_done, MIB, "{outcome:?}");
    assert_eq!(outcome.completed_prefix_bytes, MIB, "{outcome:?}");
    assert_pages_back(&kc, "write-zeroes refused");
    for (i, d) in dests.iter().enumerate() {
        let got = disk(&d.device, 0, secs(2 * MIB));
        let (s, e) = (d.sector as usize * 512, (d.sector + d.count) as usize * 512);
        assert!(got[s..e].iter().all(|&b| b == 0), "destination {i} not zeroed");
        assert_same(&got[..s], &old_image[..s], 0, &format!("before destination {i}"));
        assert_same(&got[e..], &old_image[e..], d.sector + d.count, &format!("after {i}"));
    }
}
