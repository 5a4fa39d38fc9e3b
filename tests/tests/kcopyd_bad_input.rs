//! Bad input to kcopyd: every refusal is a typed error returned on the
//! caller's thread, with no I/O issued (the devices' traces stay empty), no
//! callback, and no job counted. Covers KC-2's validation (1 to 8 destinations,
//! equal lengths), overlaps (destination and source, two destinations, also
//! through a second open of the same device or through the image file behind
//! a loop device; adjacent regions are fine),
//! alignment and range (on 4096-byte-sector loop devices), read-only
//! destinations (a read-only source is fine), the zero job's checks, KC-16's
//! sub-job size rules, other configuration errors, and a kcopyd client whose
//! dm-io client was closed under it.

mod kcopyd_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;

use dmio::{BlockDevice, DeviceOptions, DmIoClient, DmIoError, DmIoRegion};
use kcopyd::{
    CopyFlags, DEFAULT_SUB_JOB_KB, KcopydClient, KcopydConfig, KcopydError, MAX_DESTINATIONS,
    MAX_SUB_JOB_KB,
};
use kcopyd_common::{KIB, MIB, WAIT, assert_clean, disk, expect_pattern, kc, region, secs};
use tests::{Backing, TestDevice, backings, write_pattern};

const SEED: u64 = 0xbad;

/// Runs `copy` (or `zero` when `from` is `None`) with a callback that counts
/// its calls, expecting a refusal; checks that no callback ran, no job was
/// counted and no I/O reached any of `devs`; returns the error.
fn refused(
    kc: &KcopydClient,
    from: Option<&DmIoRegion>,
    dests: &[DmIoRegion],
    devs: &[&Arc<BlockDevice>],
    at: &str,
) -> KcopydError {
    for d in devs {
        d.faults().start_trace();
    }
    let before = kc.stats();
    let called = Arc::new(AtomicUsize::new(0));
    let c = called.clone();
    let notify = move |_| {
        c.fetch_add(1, Ordering::SeqCst);
    };
    let result = match from {
        Some(from) => kc.copy(from, dests, CopyFlags::empty(), notify),
        None => kc.zero(dests, CopyFlags::empty(), notify),
    };
    let err = match result {
        Ok(handle) => panic!("{at}: accepted: {handle:?}"),
        Err(e) => e,
    };
    // The blocking forms refuse the same way.
    let sync = match from {
        Some(from) => kc.copy_sync(from, dests, CopyFlags::empty()),
        None => kc.zero_sync(dests, CopyFlags::empty()),
    };
    match sync {
        Ok(outcome) => panic!("{at}: the blocking form accepted: {outcome:?}"),
        Err(e) => assert_eq!(
            std::mem::discriminant(&e),
            std::mem::discriminant(&err),
            "{at}: the blocking form refused differently: {e:?} vs {err:?}"
        ),
    }
    kc.flush().expect("flush");
    assert_eq!(called.load(Ordering::SeqCst), 0, "{at}: the callback of a refused job ran");
    assert_eq!(kc.stats().jobs, before.jobs, "{at}: a refused job was counted");
    assert_eq!(kc.jobs_in_flight(), 0, "{at}");
    for (i, d) in devs.iter().enumerate() {
        assert_eq!(d.faults().take_trace(), vec![], "{at}: I/O reached device {i} ({err})");
    }
    assert!(!err.to_string().is_empty());
    err
}

/// Destination counts: none, and nine (one more than MAX_DESTINATIONS), for
/// copy and zero; eight is fine.
#[test]
fn destination_count() {
    let src = TestDevice::new(Backing::File, MIB);
    let dst = TestDevice::new(Backing::File, 4 * MIB);
    let devs = [&src.dev, &dst.dev];
    let kc = kc(KcopydConfig::new());
    let from = region(&src, 0, 8 * KIB);
    let nine: Vec<DmIoRegion> = (0..9).map(|i| region(&dst, i * 64 * KIB, 8 * KIB)).collect();
    assert_eq!(MAX_DESTINATIONS, 8);
    for zero in [false, true] {
        let f = (!zero).then_some(&from);
        let at = if zero { "zero" } else { "copy" };
        match refused(&kc, f, &[], &devs, &format!("{at}, no destination")) {
            KcopydError::NoDestinations => {}
            other => panic!("{at}: no destination: expected NoDestinations, got {other:?}"),
        }
        match refused(&kc, f, &nine, &devs, &format!("{at}, nine destinations")) {
            KcopydError::TooManyDestinations { count: 9, max: 8 } => {}
            other => panic!("{at}: nine destinations: expected TooManyDestinations, got {other:?}"),
        }
    }
    let outcome = kc.copy_sync(&from, &nine[..8], CopyFlags::empty()).expect("eight destinations");
    assert_clean(&outcome, 8 * KIB, "eight destinations");
}

/// Lengths: a destination of another length than the source (or, zeroing,
/// than destination 0) names that destination and both counts; a zero-length
/// source with a non-empty destination is a mismatch too.
#[test]
fn unequal_lengths() {
    let src = TestDevice::new(Backing::File, MIB);
    let dst = TestDevice::new(Backing::File, MIB);
    let devs = [&src.dev, &dst.dev];
    let kc = kc(KcopydConfig::new());
    let from = DmIoRegion::new(&src.dev, 0, 64);
    let dests = [
        DmIoRegion::new(&dst.dev, 0, 64),
        DmIoRegion::new(&dst.dev, 128, 64),
        DmIoRegion::new(&dst.dev, 256, 72),
    ];
    match refused(&kc, Some(&from), &dests, &devs, "copy") {
        KcopydError::LengthMismatch { dest: 2, expected_sectors: 64, found_sectors: 72 } => {}
        other => panic!("copy: expected LengthMismatch for destination 2, got {other:?}"),
    }
    match refused(&kc, None, &dests, &devs, "zero") {
        KcopydError::LengthMismatch { dest: 2, expected_sectors: 64, found_sectors: 72 } => {}
        other => panic!("zero: expected LengthMismatch for destination 2, got {other:?}"),
    }
    let shorter = [DmIoRegion::new(&dst.dev, 0, 56)];
    match refused(&kc, Some(&from), &shorter, &devs, "shorter") {
        KcopydError::LengthMismatch { dest: 0, expected_sectors: 64, found_sectors: 56 } => {}
        other => panic!("shorter: expected LengthMismatch for destination 0, got {other:?}"),
    }
    let empty = DmIoRegion::new(&src.dev, 0, 0);
    match refused(&kc, Some(&empty), &dests[..1], &devs, "empty source") {
        KcopydError::LengthMismatch { dest: 0, expected_sectors: 0, found_sectors: 64 } => {}
        other => panic!("empty source: expected LengthMismatch, got {other:?}"),
    }
}

/// Overlaps: a destination sharing one sector with the source on the same
/// device (also when the device was opened a second time), two destinations
/// sharing one sector, for copy and zero; regions that only touch are fine.
#[test]
fn overlapping_regions() {
    for backing in backings() {
        let td = TestDevice::new(backing, 4 * MIB);
        let other = TestDevice::new(backing, 4 * MIB);
        let again = BlockDevice::open(td.dev.path()).expect("opening the device again");
        let devs = [&td.dev, &other.dev, &again];
        let kc = kc(KcopydConfig::new());
        let b = td.block_sectors();
        let from = DmIoRegion::new(&td.dev, 64 * b, 16 * b);
        let ok = DmIoRegion::new(&other.dev, 64 * b, 16 * b);
        let cases = [
            ("destination ends inside the source", DmIoRegion::new(&td.dev, 49 * b, 16 * b)),
            ("destination starts inside the source", DmIoRegion::new(&td.dev, 79 * b, 16 * b)),
            ("destination equals the source", from.clone()),
            ("through a second open", DmIoRegion::new(&again, 70 * b, 16 * b)),
        ];
        for (what, dest) in cases {
            let at = format!("{backing}: {what}");
            let dests = [ok.clone(), dest];
            match refused(&kc, Some(&from), &dests, &devs, &at) {
                KcopydError::DestinationOverlapsSource { dest: 1, path } => {
                    assert_eq!(path, td.dev.path(), "{at}");
                }
                other => panic!("{at}: expected DestinationOverlapsSource, got {other:?}"),
            }
        }
        let dests = [
            DmIoRegion::new(&other.dev, 0, 16 * b),
            ok.clone(),
            DmIoRegion::new(&other.dev, 79 * b, 16 * b),
        ];
        for zero in [false, true] {
            let at = format!("{backing}: destinations overlap, zero={zero}");
            let f = (!zero).then_some(&from);
            match refused(&kc, f, &dests, &devs, &at) {
                KcopydError::DestinationsOverlap { first: 1, second: 2, path } => {
                    assert_eq!(path, other.dev.path(), "{at}");
                }
                other => panic!("{at}: expected DestinationsOverlap(1, 2), got {other:?}"),
            }
        }
        // A loop device and the image file behind it are one device.
        if backing != Backing::File {
            let image = BlockDevice::open(td.image()).expect("opening the image file");
            let at = format!("{backing}: through the image behind the loop device");
            let dest = DmIoRegion::new(&image, 72 * b, 16 * b);
            match refused(&kc, Some(&from), &[dest], &[&td.dev, &image], &at) {
                KcopydError::DestinationOverlapsSource { dest: 0, .. } => {}
                other => panic!("{at}: expected DestinationOverlapsSource, got {other:?}"),
            }
        }
        // Touching is not overlapping: right before and right after the
        // source, and destinations end to end.
        write_pattern(kc.dmio(), &td.dev, 0, 256 * b, SEED);
        let dests = [
            DmIoRegion::new(&td.dev, 48 * b, 16 * b),
            DmIoRegion::new(&td.dev, 80 * b, 16 * b),
            DmIoRegion::new(&td.dev, 96 * b, 16 * b),
        ];
        let outcome = kc.copy_sync(&from, &dests, CopyFlags::empty()).expect("adjacent regions");
        assert_clean(&outcome, 16 * b * 512, &format!("{backing}: adjacent"));
        for d in &dests {
            expect_pattern(&disk(&td.dev, d.sector, d.count), from.sector, SEED, "adjacent");
        }
    }
}

/// Alignment and range: on a device with 4096-byte blocks, a source or a
/// destination starting or ending off a block boundary is refused with the
/// dm-io reason inside (`InvalidSource` / `InvalidDestination` with the index);
/// so is a region beyond the end of its device, on every backing.
#[test]
fn misaligned_and_out_of_range_regions() {
    for backing in backings() {
        let src = TestDevice::new(backing, MIB);
        let dst = TestDevice::new(backing, MIB);
        let devs = [&src.dev, &dst.dev];
        let kc = kc(KcopydConfig::new());
        let at = backing.to_string();
        let end = src.dev.size_sectors();
        let good = DmIoRegion::new(&dst.dev, 0, 64);
        let beyond = DmIoRegion::new(&src.dev, end - 32, 64);
        match refused(&kc, Some(&beyond), std::slice::from_ref(&good), &devs, &at) {
            KcopydError::InvalidSource(DmIoError::OutOfRange { .. }) => {}
            other => panic!("{at}: source beyond the end: expected InvalidSource, got {other:?}"),
        }
        let from = DmIoRegion::new(&src.dev, 0, 64);
        let dests = [good.clone(), DmIoRegion::new(&dst.dev, end - 32, 64)];
        for zero in [false, true] {
            let f = (!zero).then_some(&from);
            match refused(&kc, f, &dests, &devs, &at) {
                KcopydError::InvalidDestination {
                    dest: 1,
                    source: DmIoError::OutOfRange { .. },
                } => {}
                other => panic!("{at}: destination beyond the end: got {other:?}"),
            }
        }
        if src.block_sectors() == 1 {
            continue;
        }
        let b = src.block_sectors();
        assert_eq!(b, 8, "{at}");
        let misaligned_source = DmIoRegion::new(&src.dev, 4, 64);
        match refused(&kc, Some(&misaligned_source), std::slice::from_ref(&good), &devs, &at) {
            KcopydError::InvalidSource(DmIoError::MisalignedSector { sector: 4, .. }) => {}
            other => panic!("{at}: misaligned source: expected InvalidSource, got {other:?}"),
        }
        let odd = [DmIoRegion::new(&src.dev, 0, 60)];
        let odd_from = DmIoRegion::new(&dst.dev, 512, 60);
        // Source and destination are both misaligned here (equal lengths):
        // either may be named.
        match refused(&kc, Some(&odd_from), &odd, &devs, &at) {
            KcopydError::InvalidSource(DmIoError::MisalignedCount { count: 60, .. })
            | KcopydError::InvalidDestination {
                dest: 0,
                source: DmIoError::MisalignedCount { count: 60, .. },
            } => {}
            other => panic!("{at}: misaligned count: expected a MisalignedCount, got {other:?}"),
        }
        let dests = [good.clone(), DmIoRegion::new(&dst.dev, 68, 64)];
        for zero in [false, true] {
            let f = (!zero).then_some(&from);
            match refused(&kc, f, &dests, &devs, &at) {
                KcopydError::InvalidDestination {
                    dest: 1,
                    source: DmIoError::MisalignedSector { sector: 68, .. },
                } => {}
                other => panic!("{at}: misaligned destination: got {other:?}"),
            }
        }
    }
}

/// Read-only devices: a destination on one is refused (copy and zero), naming
/// the destination; copying from one works.
#[test]
fn read_only_devices() {
    for backing in backings() {
        let at = backing.to_string();
        let ro = TestDevice::with_options(backing, MIB, DeviceOptions::new().read_only(true));
        let rw = TestDevice::new(backing, MIB);
        let devs = [&ro.dev, &rw.dev];
        let kc = kc(KcopydConfig::new());
        let from = DmIoRegion::new(&rw.dev, 0, 64);
        let dests = [DmIoRegion::new(&rw.dev, 128, 64), DmIoRegion::new(&ro.dev, 0, 64)];
        for zero in [false, true] {
            let f = (!zero).then_some(&from);
            match refused(&kc, f, &dests, &devs, &at) {
                KcopydError::InvalidDestination {
                    dest: 1,
                    source: DmIoError::ReadOnlyDevice { .. },
                } => {}
                other => panic!("{at}: read-only destination: got {other:?}"),
            }
        }
        // The read-only device as the source (its content written through a
        // read-write open of the same image).
        let writer = BlockDevice::open(ro.dev.path()).expect("a read-write open");
        write_pattern(kc.dmio(), &writer, 0, 64, SEED);
        let outcome = kc
            .copy_sync(&DmIoRegion::new(&ro.dev, 0, 64), &dests[..1], CopyFlags::empty())
            .expect("copying from a read-only device");
        assert_clean(&outcome, 64 * 512, &at);
        expect_pattern(&disk(&rw.dev, 128, 64), 0, SEED, &at);
    }
}

/// KC-16: sub_job_kb 0 means 512 KiB, sizes above 1 MiB are clamped to it,
/// multiples of 4 KiB up to 1 MiB are kept, others are refused with a Config
/// error, through every constructor; a pool of 0 sub-jobs is refused too.
#[test]
fn kc16_sub_job_size_rules() {
    assert_eq!((DEFAULT_SUB_JOB_KB, MAX_SUB_JOB_KB), (512, 1024));
    let io = Arc::new(DmIoClient::new().expect("a dm-io client"));
    for (kb, bytes) in
        [(0, 512 * KIB), (4, 4 * KIB), (64, 64 * KIB), (1024, MIB), (1028, MIB), (4096, MIB)]
    {
        let kc = kc(KcopydConfig::new().sub_job_kb(kb));
        assert_eq!(kc.sub_job_bytes(), bytes, "sub_job_kb {kb}");
        let kc = KcopydClient::with_dmio(io.clone(), KcopydConfig::new().sub_job_kb(kb))
            .unwrap_or_else(|e| panic!("with_dmio, sub_job_kb {kb}: {e}"));
        assert_eq!(kc.sub_job_bytes(), bytes, "with_dmio, sub_job_kb {kb}");
        assert!(Arc::ptr_eq(kc.dmio(), &io), "with_dmio does not use the given client");
    }
    for kb in [1, 2, 6, 510, 1022] {
        match KcopydClient::with_config(KcopydConfig::new().sub_job_kb(kb)) {
            Err(KcopydError::Config(msg)) => assert!(!msg.is_empty()),
            Err(other) => panic!("sub_job_kb {kb}: expected Config, got {other:?}"),
            Ok(kc) => panic!("sub_job_kb {kb} accepted: {} bytes", kc.sub_job_bytes()),
        }
        assert!(
            matches!(
                KcopydClient::with_dmio(io.clone(), KcopydConfig::new().sub_job_kb(kb)),
                Err(KcopydError::Config(_))
            ),
            "with_dmio accepted sub_job_kb {kb}"
        );
    }
    assert_eq!(KcopydClient::new().expect("default client").sub_job_bytes(), 512 * KIB);
    assert!(
        matches!(
            KcopydClient::with_config(KcopydConfig::new().pool_sub_jobs(0)),
            Err(KcopydError::Config(_))
        ),
        "a pool of 0 sub-jobs was accepted"
    );
}

/// A kcopyd client whose dm-io client was closed under it neither panics nor
/// hangs: copies and zeroing are refused with an error or complete with a
/// failed outcome, the destination keeps its data, and the client can be
/// destroyed. Runs in a thread so that a hang fails the test.
#[test]
fn closed_dmio_client() {
    let src = TestDevice::new(Backing::File, MIB);
    let dst = TestDevice::new(Backing::File, MIB);
    let io = Arc::new(DmIoClient::new().expect("a dm-io client"));
    write_pattern(&io, &src.dev, 0, secs(MIB), SEED);
    write_pattern(&io, &dst.dev, 0, secs(MIB), SEED + 1);
    let kc = KcopydClient::with_dmio(io.clone(), KcopydConfig::new()).expect("kcopyd client");
    io.close();
    let (from, to) = (region(&src, 0, 256 * KIB), region(&dst, 0, 256 * KIB));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut report = vec![];
        let (otx, orx) = mpsc::channel();
        match kc.copy(&from, std::slice::from_ref(&to), CopyFlags::empty(), move |o| {
            let _ = otx.send(o);
        }) {
            Err(e) => report.push(format!("copy refused: {e}")),
            Ok(_) => {
                let o = orx.recv_timeout(WAIT).expect("a callback for an accepted copy");
                assert!(!o.is_ok(), "a copy through a closed dm-io client succeeded: {o:?}");
                report.push(format!("copy failed: {o:?}"));
            }
        }
        match kc.copy_sync(&from, std::slice::from_ref(&to), CopyFlags::empty()) {
            Err(e) => report.push(format!("copy_sync refused: {e}")),
            Ok(o) => {
                assert!(!o.is_ok(), "copy_sync through a closed dm-io client succeeded: {o:?}");
                report.push("copy_sync failed".into());
            }
        }
        match kc.zero_sync(std::slice::from_ref(&to), CopyFlags::empty()) {
            Err(e) => report.push(format!("zero_sync refused: {e}")),
            Ok(o) => {
                assert!(!o.is_ok(), "zero_sync through a closed dm-io client succeeded: {o:?}");
                report.push("zero_sync failed".into());
            }
        }
        kc.destroy();
        let _ = tx.send(report);
    });
    let report = rx.recv_timeout(WAIT).expect("the closed-client scenario hung or panicked");
    eprintln!("closed dm-io client: {report:?}");
    expect_pattern(&disk(&dst.dev, 0, secs(MIB)), 0, SEED + 1, "destination after closed client");
}
