//! Property test of kcopyd against a model (proptest, regular files): random
//! sub-job sizes, lengths (including zero and non-multiples of the sub-job
//! size), source offsets, 1 to 5 destinations placed at random offsets in
//! distinct slots of three devices (one slot on the source's own device), and
//! copy or zero jobs. After each job every device, read back without dmio,
//! equals a `Vec<u8>` model per device, and the outcome is clean.

mod kcopyd_common;

use dmio::DmIoRegion;
use kcopyd::{CopyFlags, KcopydConfig};
use kcopyd_common::{KIB, MIB, disk, kc, secs};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use tests::{Backing, TestDevice, fill_pattern, write_at};

/// Each device's size; a slot is half of it.
const DEV: u64 = 4 * MIB;
const SLOT: u64 = DEV / 2;
/// The unit of offsets and lengths: 4 KiB, valid on any device.
const UNIT: u64 = 4 * KIB;

#[derive(Debug, Clone)]
struct Case {
    sub_kb: u32,
    len_units: u64,
    src_frac: u64,
    /// Slot indices (device, half) in a random order; the first `dests` are used.
    slots: Vec<(usize, u64)>,
    dest_fracs: Vec<u64>,
    dests: usize,
    zero: bool,
    ignore_error: bool,
}

fn case() -> impl Strategy<Value = Case> {
    // Slot (0, 0) holds the source; (0, 1) is the source device's other half.
    let slots = vec![(0usize, 1u64), (1, 0), (1, 1), (2, 0), (2, 1)];
    (
        prop_oneof![Just(4u32), Just(8), Just(60), Just(64), Just(128), Just(512), Just(1024)],
        prop_oneof![1 => Just(0u64), 2 => 1u64..8, 4 => 1u64..=(SLOT / UNIT)],
        0u64..=1000,
        Just(slots).prop_shuffle(),
        proptest::collection::vec(0u64..=1000, 5),
        1usize..=5,
        prop::bool::weighted(0.25),
        any::<bool>(),
    )
        .prop_map(
            |(sub_kb, len_units, src_frac, slots, dest_fracs, dests, zero, ignore_error)| Case {
                sub_kb,
                len_units,
                src_frac,
                slots,
                dest_fracs,
                dests,
                zero,
                ignore_error,
            },
        )
}

/// A unit-aligned offset `frac`/1000 of the way into the room left in a slot.
fn place(slot_start: u64, len: u64, frac: u64) -> u64 {
    let room = (SLOT - len) / UNIT;
    slot_start + room * frac / 1000 * UNIT
}

/// The index of the first 512-byte sector where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(512).zip(b.chunks(512)).position(|(x, y)| x != y)
}

/// Checks the device images against the model; on a mismatch, resyncs the
/// model from the devices (so that shrinking starts from the real state) and
/// names the first differing sector.
fn compare(devs: &[TestDevice], model: &mut [Vec<u8>], what: &str) -> Result<(), TestCaseError> {
    let mut error = None;
    for (i, td) in devs.iter().enumerate() {
        let got = disk(&td.dev, 0, secs(DEV));
        if let Some(s) = first_difference(&got, &model[i]) {
            error
                .get_or_insert(format!("device {i} differs from the model at sector {s} ({what})"));
            model[i] = got;
        }
    }
    error.map_or(Ok(()), |e| Err(TestCaseError::fail(e)))
}

/// Random copy and zero jobs against the model. The devices and the model
/// persist from case to case (so each case starts from the previous one's
/// result); each case uses a fresh client with its sub-job size.
#[test]
fn kcopyd_matches_a_model() {
    let devs = TestDevice::many(Backing::File, DEV, 3);
    let io = tests::client(dmio::EngineChoice::Auto);
    let mut model: Vec<Vec<u8>> = Vec::new();
    for (i, td) in devs.iter().enumerate() {
        let mut image = vec![0u8; DEV as usize];
        fill_pattern(&mut image, 0, 0x9e0 + i as u64);
        assert!(write_at(&io, &td.dev, 0, &image, dmio::ReqFlags::empty()).is_ok());
        model.push(image);
    }
    let model = std::cell::RefCell::new(model);
    let config =
        ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case(), |c| {
        let mut model = model.borrow_mut();
        let kc = kc(KcopydConfig::new().sub_job_kb(c.sub_kb));
        prop_assert_eq!(kc.sub_job_bytes(), u64::from(c.sub_kb) * KIB);
        let len = c.len_units * UNIT;
        let src_off = place(0, len, c.src_frac);
        let from = DmIoRegion::new(&devs[0].dev, secs(src_off), secs(len));
        let dests: Vec<(usize, u64)> = c.slots[..c.dests]
            .iter()
            .zip(&c.dest_fracs)
            .map(|(&(dev, half), &frac)| (dev, place(half * SLOT, len, frac)))
            .collect();
        let regions: Vec<DmIoRegion> = dests
            .iter()
            .map(|&(dev, off)| DmIoRegion::new(&devs[dev].dev, secs(off), secs(len)))
            .collect();
        let flags = if c.ignore_error { CopyFlags::IGNORE_ERROR } else { CopyFlags::empty() };
        let outcome = if c.zero {
            kc.zero_sync(&regions, flags)
        } else {
            kc.copy_sync(&from, &regions, flags)
        }
        .map_err(|e| TestCaseError::fail(format!("refused: {e}")))?;
        // The model: every destination gets the source's bytes (read before
        // any write: the regions never overlap) or zeros.
        let data = if c.zero {
            vec![0u8; len as usize]
        } else {
            model[0][src_off as usize..(src_off + len) as usize].to_vec()
        };
        for &(dev, off) in &dests {
            model[dev][off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        let what = format!("destinations {dests:?}, source at {src_off}, {len} bytes");
        compare(&devs, &mut model, &what)?;
        prop_assert!(outcome.is_ok(), "{:?}", outcome);
        prop_assert_eq!(outcome.total_bytes, len);
        prop_assert_eq!(outcome.bytes_done, len);
        prop_assert_eq!(outcome.completed_prefix_bytes, len);
        prop_assert!(c.zero || !outcome.used_write_zeroes, "a copy used write-zeroes");
        if c.zero && len > 0 {
            let offload = dests.iter().all(|&(dev, _)| devs[dev].dev.supports_write_zeroes());
            prop_assert_eq!(outcome.used_write_zeroes, offload);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
