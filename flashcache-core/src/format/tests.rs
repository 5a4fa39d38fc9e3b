//! Unit and property tests of the on-SSD format.

use proptest::prelude::*;

use super::*;

// ---------------------------------------------------------------------------
// Superblock
// ---------------------------------------------------------------------------

fn sample_superblock() -> Superblock {
    Superblock {
        state: SbState::FastClean,
        mode: CacheMode::WriteBack,
        write_only: true,
        commit: CommitMode::OnFlush,
        policy: 3,
        block_sectors: 8,
        assoc: 512,
        num_sets: 100,
        disk_assoc_blocks: 256,
        md_block_bytes: 8192,
        ssd_sectors: 1 << 21,
        disk_sectors: 1 << 30,
        generation: 0x0123_4567_89AB_CDEF,
        created_unix_secs: 1_750_000_000,
        cache_uuid: *b"0123456789abcdef",
        disk_identity: DiskIdentity::new("wwn-0x5000c500a1b2c3d4 (disque dur)").unwrap(),
    }
}

/// Recomputes the CRC of an edited superblock record.
fn reseal(rec: &mut [u8; SUPERBLOCK_BYTES]) {
    let crc = crc32c(&rec[..508]);
    rec[508..].copy_from_slice(&crc.to_le_bytes());
}

/// Overwrites bytes at `offset` and recomputes the CRC.
fn patched(sb: &Superblock, offset: usize, bytes: &[u8]) -> [u8; SUPERBLOCK_BYTES] {
    let mut rec = sb.encode();
    rec[offset..offset + bytes.len()].copy_from_slice(bytes);
    reseal(&mut rec);
    rec
}

fn corruption(bytes: &[u8]) -> Corruption {
    match Superblock::decode(bytes) {
        Err(FormatError::Corrupt { reason }) => reason,
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

fn geometry_corruption(bytes: &[u8]) -> GeometryError {
    match corruption(bytes) {
        Corruption::Geometry(g) => g,
        other => panic!("expected a geometry corruption, got {other:?}"),
    }
}

#[test]
fn superblock_field_offsets_match_the_table() {
    let sb = sample_superblock();
    let rec = sb.encode();
    assert_eq!(&rec[0..8], b"FCCORE\0\x01");
    assert_eq!(rec[8..12], 1u32.to_le_bytes());
    assert_eq!(rec[12..16], 3u32.to_le_bytes());
    assert_eq!(rec[16..20], [1, 1, 2, 3]);
    assert_eq!(rec[20..24], 8u32.to_le_bytes());
    assert_eq!(rec[24..28], 512u32.to_le_bytes());
    assert_eq!(rec[28..32], 100u32.to_le_bytes());
    assert_eq!(rec[32..36], 256u32.to_le_bytes());
    assert_eq!(rec[36..40], 8192u32.to_le_bytes());
    assert_eq!(rec[40..48], (1u64 << 21).to_le_bytes());
    assert_eq!(rec[48..56], (1u64 << 30).to_le_bytes());
    assert_eq!(rec[56..64], 0x0123_4567_89AB_CDEFu64.to_le_bytes());
    assert_eq!(rec[64..72], 1_750_000_000u64.to_le_bytes());
    assert_eq!(&rec[72..88], b"0123456789abcdef");
    let id = sb.disk_identity.as_str().as_bytes();
    assert_eq!(rec[88..90], (id.len() as u16).to_le_bytes());
    assert_eq!(&rec[90..90 + id.len()], id);
    assert!(rec[90 + id.len()..508].iter().all(|&b| b == 0));
    assert_eq!(rec[508..512], crc32c(&rec[..508]).to_le_bytes());
}

#[test]
fn superblock_round_trips_and_ignores_the_rest_of_the_region() {
    let sb = sample_superblock();
    let mut region = vec![0xEE; SUPERBLOCK_REGION_BYTES as usize];
    region[..SUPERBLOCK_BYTES].copy_from_slice(&sb.encode());
    assert_eq!(Superblock::decode(&region), Ok(sb.clone()));
    assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
}

#[test]
fn every_single_bit_flip_in_the_superblock_is_detected() {
    let rec = sample_superblock().encode();
    for bit in 0..SUPERBLOCK_BYTES * 8 {
        let mut flipped = rec;
        flipped[bit / 8] ^= 1 << (bit % 8);
        let err = Superblock::decode(&flipped).expect_err("a flipped bit must be detected");
        match bit / 8 {
            0..8 => assert!(matches!(err, FormatError::NotACache { .. }), "bit {bit}: {err:?}"),
            // Flipping a version bit gives 0 (corrupt) or a "newer" version.
            8..12 => assert!(
                matches!(err, FormatError::NewerVersion { .. } | FormatError::Corrupt { .. }),
                "bit {bit}: {err:?}"
            ),
            _ => assert!(
                matches!(err, FormatError::Corrupt { reason: Corruption::Crc { .. } }),
                "bit {bit}: {err:?}"
            ),
        }
    }
}

#[test]
fn blank_and_foreign_devices_are_not_caches() {
    assert_eq!(Superblock::decode(&[0; 4096]), Err(FormatError::NotACache { found: [0; 8] }));
    let mut rec = sample_superblock().encode();
    rec[..8].fill(0);
    assert!(matches!(Superblock::decode(&rec), Err(FormatError::NotACache { .. })));
    // An ext4 superblock region starts with zeros; an XFS one with "XFSB".
    let mut xfs = [0u8; 512];
    xfs[..4].copy_from_slice(b"XFSB");
    assert!(matches!(Superblock::decode(&xfs), Err(FormatError::NotACache { .. })));
}

#[test]
fn newer_versions_are_refused_clearly() {
    let sb = sample_superblock();
    let rec = patched(&sb, 8, &2u32.to_le_bytes());
    let err = Superblock::decode(&rec).unwrap_err();
    assert_eq!(err, FormatError::NewerVersion { found: 2, supported: 1 });
    assert!(err.to_string().contains("newer"), "{err}");
    // Checked before the CRC: a newer format may checksum differently.
    let mut unsealed = sb.encode();
    unsealed[8..12].copy_from_slice(&7u32.to_le_bytes());
    assert_eq!(
        Superblock::decode(&unsealed),
        Err(FormatError::NewerVersion { found: 7, supported: FORMAT_VERSION })
    );
    let rec = patched(&sb, 8, &0u32.to_le_bytes());
    assert_eq!(corruption(&rec), Corruption::Version { found: 0 });
}

#[test]
fn short_buffers_are_refused() {
    let rec = sample_superblock().encode();
    assert!(matches!(
        Superblock::decode(&rec[..511]),
        Err(FormatError::BufferSize { expected: 512, found: 511, .. })
    ));
    assert!(matches!(Superblock::decode(&[]), Err(FormatError::BufferSize { .. })));
}

#[test]
fn every_out_of_range_superblock_field_is_rejected() {
    let sb = sample_superblock();
    let u32le = |v: u32| v.to_le_bytes();

    for state in [0, 5, u32::MAX] {
        assert_eq!(
            corruption(&patched(&sb, 12, &u32le(state))),
            Corruption::State { found: state }
        );
    }
    for mode in [0, 4, 255] {
        assert_eq!(corruption(&patched(&sb, 16, &[mode])), Corruption::Mode { found: mode });
    }
    assert_eq!(corruption(&patched(&sb, 17, &[2])), Corruption::WriteOnly { found: 2 });
    for commit in [0, 3] {
        assert_eq!(corruption(&patched(&sb, 18, &[commit])), Corruption::Commit { found: commit });
    }
    for block_sectors in [0, 1, 4, 12, 9] {
        assert_eq!(
            geometry_corruption(&patched(&sb, 20, &u32le(block_sectors))),
            GeometryError::BlockSize { block_bytes: u64::from(block_sectors) * 512 }
        );
    }
    for assoc in [0, 1, 3, 48, 65536] {
        assert_eq!(
            geometry_corruption(&patched(&sb, 24, &u32le(assoc))),
            GeometryError::Assoc { assoc }
        );
    }
    assert_eq!(geometry_corruption(&patched(&sb, 28, &u32le(0))), GeometryError::NoSets);
    assert_eq!(corruption(&patched(&sb, 32, &u32le(3))), Corruption::DiskAssocBlocks { found: 3 });
    for md_block_bytes in [0, 512, 2048, 6144, 131_072] {
        assert_eq!(
            geometry_corruption(&patched(&sb, 36, &u32le(md_block_bytes))),
            GeometryError::MdBlockSize { md_block_bytes }
        );
    }
    // The geometry must fit the SSD it was created on.
    let needed = sb.layout().unwrap().total_bytes();
    let small = needed / 512 - 1;
    assert_eq!(
        geometry_corruption(&patched(&sb, 40, &small.to_le_bytes())),
        GeometryError::DoesNotFit { needed_bytes: needed, ssd_bytes: small * 512 }
    );
    assert!(Superblock::decode(&patched(&sb, 40, &(needed / 512).to_le_bytes())).is_ok());
    // The disk's blocks must be nameable by a 48-bit block number.
    let too_big = (SlotRecord::MAX_BLOCK + 1) * 8 + 1;
    assert_eq!(
        corruption(&patched(&sb, 48, &too_big.to_le_bytes())),
        Corruption::DiskTooLarge { disk_sectors: too_big, block_sectors: 8 }
    );
    assert!(Superblock::decode(&patched(&sb, 48, &(too_big - 1).to_le_bytes())).is_ok());
    // Disk identity: length, padding, UTF-8.
    assert_eq!(
        corruption(&patched(&sb, 88, &257u16.to_le_bytes())),
        Corruption::IdentityLength { found: 257, max: 256 }
    );
    assert_eq!(
        corruption(&patched(&sb, 88, &u16::MAX.to_le_bytes())),
        Corruption::IdentityLength { found: u16::MAX, max: 256 }
    );
    assert_eq!(corruption(&patched(&sb, 300, &[1])), Corruption::IdentityPadding { offset: 300 });
    assert_eq!(corruption(&patched(&sb, 90, &[0xFF])), Corruption::IdentityNotUtf8);
    // Reserved bytes.
    for offset in [346, 400, 507] {
        assert_eq!(corruption(&patched(&sb, offset, &[0x80])), Corruption::Reserved { offset });
    }
}

#[test]
fn superblock_geometry_overflow_is_corrupt_not_a_panic() {
    let mut sb = sample_superblock();
    sb.block_sectors = 1 << 31;
    sb.assoc = 32768;
    sb.num_sets = u32::MAX;
    sb.ssd_sectors = u64::MAX;
    assert_eq!(
        sb.validate(),
        Err(FormatError::Corrupt { reason: Corruption::Geometry(GeometryError::Overflow) })
    );
    assert_eq!(geometry_corruption(&sb.encode()), GeometryError::Overflow);
}

#[test]
fn disk_identities_up_to_256_bytes() {
    let max = "é".repeat(128); // 256 bytes
    let mut sb = sample_superblock();
    sb.disk_identity = DiskIdentity::new(max.clone()).unwrap();
    assert_eq!(Superblock::decode(&sb.encode()).unwrap().disk_identity.as_str(), max);
    sb.disk_identity = DiskIdentity::default();
    assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
    assert_eq!(
        DiskIdentity::new("a".repeat(257)),
        Err(FormatError::IdentityTooLong { len: 257, max: 256 })
    );
    assert!(DiskIdentity::try_from("dm-uuid-LVM-abc").is_ok());
}

fn arb_state() -> impl Strategy<Value = SbState> {
    prop_oneof![
        Just(SbState::Loaded),
        Just(SbState::Clean),
        Just(SbState::FastClean),
        Just(SbState::Unstable)
    ]
}

fn arb_mode() -> impl Strategy<Value = CacheMode> {
    prop_oneof![
        Just(CacheMode::WriteBack),
        Just(CacheMode::WriteThrough),
        Just(CacheMode::WriteAround)
    ]
}

fn arb_commit() -> impl Strategy<Value = CommitMode> {
    prop_oneof![Just(CommitMode::Sync), Just(CommitMode::OnFlush)]
}

/// Any valid superblock: every field over its whole valid range.
fn arb_superblock() -> impl Strategy<Value = Superblock> {
    let flags = (arb_state(), arb_mode(), any::<bool>(), arb_commit(), any::<u8>());
    let geometry = (
        3u32..=31,
        1u32..=15,
        prop_oneof![1u32..=64, 1u32..=1 << 20, Just(u32::MAX)],
        0u32..=4,
        prop_oneof![Just(0u32), (0u32..32).prop_map(|s| 1 << s)],
        prop_oneof![Just(0u64), any::<u64>()],
        any::<u64>(),
    );
    let rest = (any::<u64>(), any::<u64>(), any::<[u8; 16]>(), "\\PC{0,100}");
    (flags, geometry, rest).prop_filter_map(
        "geometry overflows or identity too long",
        |(flags, geometry, rest)| {
            let (state, mode, write_only, commit, policy) = flags;
            let (bs_shift, assoc_shift, num_sets, md_shift, disk_assoc_blocks, slack, disk) =
                geometry;
            let (generation, created_unix_secs, cache_uuid, identity) = rest;
            let block_sectors = 1u32 << bs_shift;
            let assoc = 1u32 << assoc_shift;
            let md_block_bytes = 4096u32 << md_shift;
            let layout =
                Layout::new(u64::from(block_sectors) * 512, assoc, num_sets, md_block_bytes)
                    .ok()?;
            let ssd_sectors = (layout.total_bytes() / 512).saturating_add(slack);
            let disk_limit = (SlotRecord::MAX_BLOCK + 1).checked_mul(u64::from(block_sectors));
            let disk_sectors = match disk_limit {
                Some(limit) => disk % (limit + 1),
                None => disk,
            };
            Some(Superblock {
                state,
                mode,
                write_only,
                commit,
                policy,
                block_sectors,
                assoc,
                num_sets,
                disk_assoc_blocks,
                md_block_bytes,
                ssd_sectors,
                disk_sectors,
                generation,
                created_unix_secs,
                cache_uuid,
                disk_identity: DiskIdentity::new(identity).ok()?,
            })
        },
    )
}

proptest! {
    #[test]
    fn superblock_round_trips(sb in arb_superblock()) {
        prop_assert_eq!(sb.validate(), Ok(()));
        let rec = sb.encode();
        prop_assert_eq!(Superblock::decode(&rec), Ok(sb.clone()));
        // Encoding is deterministic and canonical.
        prop_assert_eq!(Superblock::decode(&rec).unwrap().encode(), rec);
    }

    #[test]
    fn superblock_bit_flips_are_detected(sb in arb_superblock(), bit in 0usize..4096) {
        let mut rec = sb.encode();
        rec[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(Superblock::decode(&rec).is_err());
    }

    #[test]
    fn superblock_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Superblock::decode(&bytes);
    }

    #[test]
    fn superblock_decode_of_garbage_after_the_magic_never_panics(
        tail in proptest::collection::vec(any::<u8>(), 504),
        reseal_it in any::<bool>(),
    ) {
        let mut rec = [0u8; 512];
        rec[..8].copy_from_slice(&MAGIC);
        rec[8..].copy_from_slice(&tail);
        rec[8..12].copy_from_slice(&1u32.to_le_bytes());
        if reseal_it {
            reseal(&mut rec);
        }
        // Random fields almost never validate; what matters is an error, not a panic.
        if let Ok(sb) = Superblock::decode(&rec) {
            prop_assert_eq!(sb.encode(), rec);
        }
    }
}

// ---------------------------------------------------------------------------
// Slots
// ---------------------------------------------------------------------------

fn arb_slot_state() -> impl Strategy<Value = SlotState> {
    prop_oneof![Just(SlotState::Invalid), Just(SlotState::Valid), Just(SlotState::Dirty)]
}

fn arb_record() -> impl Strategy<Value = SlotRecord> {
    (
        prop_oneof![Just(0), Just(SlotRecord::MAX_BLOCK), 0..=SlotRecord::MAX_BLOCK],
        arb_slot_state(),
        any::<u32>(),
    )
        .prop_map(|(block, state, generation)| SlotRecord { block, state, generation })
}

/// A slot with a correct CRC over arbitrary bytes 0..12.
fn sealed_slot(head: [u8; 12], index: u64) -> [u8; 16] {
    let mut crc_input = head.to_vec();
    crc_input.extend_from_slice(&index.to_le_bytes());
    let mut slot = [0u8; 16];
    slot[..12].copy_from_slice(&head);
    slot[12..].copy_from_slice(&crc32c(&crc_input).to_le_bytes());
    slot
}

#[test]
fn slot_field_offsets_match_the_table() {
    let rec = SlotRecord { block: 0x0000_A1B2_C3D4_E5F6, state: SlotState::Dirty, generation: 9 };
    let bytes = rec.encode(77);
    assert_eq!(bytes[..6], [0xF6, 0xE5, 0xD4, 0xC3, 0xB2, 0xA1]);
    assert_eq!(bytes[6], 2);
    assert_eq!(bytes[7], 0);
    assert_eq!(bytes[8..12], 9u32.to_le_bytes());
    assert_eq!(bytes, sealed_slot(bytes[..12].try_into().unwrap(), 77));
    assert_eq!(SLOTS_PER_SECTOR, 32);
}

#[test]
fn never_written_slots_are_invalid_at_any_index() {
    for index in [0, 1, 31, 32, u64::MAX] {
        assert_eq!(SlotRecord::decode(&[0; 16], index), Ok(SlotRecord::NEVER_WRITTEN));
    }
    // Content zero but a wrong non-zero CRC is not "never written".
    let mut slot = [0u8; 16];
    slot[15] = 1;
    assert_eq!(SlotRecord::decode(&slot, 5), Err(FormatError::TornSlot { index: 5 }));
    // An explicitly encoded never-written record round-trips too.
    let enc = SlotRecord::NEVER_WRITTEN.encode(5);
    assert_eq!(SlotRecord::decode(&enc, 5), Ok(SlotRecord::NEVER_WRITTEN));
}

#[test]
fn slots_with_a_valid_crc_but_bad_content_are_corrupt() {
    let slot = sealed_slot([1, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0], 4);
    assert_eq!(
        SlotRecord::decode(&slot, 4),
        Err(FormatError::CorruptSlot { index: 4, reason: SlotCorruption::State { found: 3 } })
    );
    let slot = sealed_slot([1, 0, 0, 0, 0, 0, 1, 0x40, 0, 0, 0, 0], 4);
    assert_eq!(
        SlotRecord::decode(&slot, 4),
        Err(FormatError::CorruptSlot {
            index: 4,
            reason: SlotCorruption::Reserved { found: 0x40 }
        })
    );
}

#[test]
fn out_of_range_blocks_are_never_stored_as_a_wrong_block() {
    let rec =
        SlotRecord { block: SlotRecord::MAX_BLOCK + 1, state: SlotState::Dirty, generation: 1 };
    assert_eq!(
        rec.try_encode(3),
        Err(FormatError::BlockOutOfRange { block: 1 << 48, max: SlotRecord::MAX_BLOCK })
    );
    assert_eq!(SlotRecord::decode(&rec.encode(3), 3), Err(FormatError::TornSlot { index: 3 }));
    let rec = SlotRecord { block: u64::MAX, state: SlotState::Invalid, generation: 0 };
    assert_eq!(SlotRecord::decode(&rec.encode(0), 0), Err(FormatError::TornSlot { index: 0 }));
}

#[test]
fn a_slot_moved_by_one_index_bit_is_always_caught() {
    let rec = SlotRecord { block: 42, state: SlotState::Valid, generation: 5 };
    for index in [0u64, 1, 1000, u64::MAX] {
        let bytes = rec.encode(index);
        for bit in 0..64 {
            let other = index ^ (1 << bit);
            assert_eq!(
                SlotRecord::decode(&bytes, other),
                Err(FormatError::TornSlot { index: other })
            );
        }
        assert_eq!(
            SlotRecord::decode(&bytes, index.wrapping_add(1)),
            Err(FormatError::TornSlot { index: index.wrapping_add(1) })
        );
    }
}

proptest! {
    #[test]
    fn slot_round_trips(rec in arb_record(), index in any::<u64>()) {
        let bytes = rec.encode(index);
        prop_assert_eq!(rec.try_encode(index), Ok(bytes));
        prop_assert_eq!(SlotRecord::decode(&bytes, index), Ok(rec));
    }

    #[test]
    fn slot_crc_catches_every_single_bit_flip(rec in arb_record(), index in any::<u64>()) {
        let bytes = rec.encode(index);
        for bit in 0..128 {
            let mut flipped = bytes;
            flipped[bit / 8] ^= 1 << (bit % 8);
            let decoded = SlotRecord::decode(&flipped, index);
            if flipped == [0; 16] {
                // Only possible when the record was all zeros but its CRC: it reads
                // as never written, which is what it was.
                prop_assert_eq!(rec, SlotRecord::NEVER_WRITTEN);
                prop_assert_eq!(decoded, Ok(SlotRecord::NEVER_WRITTEN));
            } else {
                prop_assert_eq!(decoded, Err(FormatError::TornSlot { index }), "bit {}", bit);
            }
        }
    }

    #[test]
    fn slot_copied_to_another_index_is_caught(
        rec in arb_record(),
        index in any::<u64>(),
        other in any::<u64>(),
    ) {
        prop_assume!(index != other);
        let bytes = rec.encode(index);
        prop_assume!(bytes != [0; 16]);
        prop_assert_eq!(SlotRecord::decode(&bytes, other), Err(FormatError::TornSlot { index: other }));
    }

    #[test]
    fn slot_decode_never_panics(bytes in any::<[u8; 16]>(), index in any::<u64>()) {
        if let Ok(rec) = SlotRecord::decode(&bytes, index) {
            prop_assert!(rec.block <= SlotRecord::MAX_BLOCK);
            if bytes != [0; 16] {
                prop_assert_eq!(rec.encode(index), bytes);
            }
        }
    }

    #[test]
    fn slot_runs_round_trip(
        records in proptest::collection::vec(arb_record(), 0..64),
        first in any::<u64>(),
        spare in 0usize..40,
    ) {
        let mut buf = vec![0xA5; records.len() * SLOT_BYTES + spare];
        encode_slots(&records, first, &mut buf).unwrap();
        prop_assert!(buf[records.len() * SLOT_BYTES..].iter().all(|&b| b == 0));
        let whole = buf.len() - buf.len() % SLOT_BYTES;
        let decoded = decode_slots(&buf[..whole], first).unwrap();
        prop_assert!(decoded.is_clean());
        prop_assert_eq!(decoded.slots.len(), whole / SLOT_BYTES);
        for (i, (index, rec)) in decoded.records().enumerate() {
            prop_assert_eq!(index, first.wrapping_add(i as u64));
            match records.get(i) {
                Some(expected) => prop_assert_eq!(rec, expected),
                None => prop_assert_eq!(rec, &SlotRecord::NEVER_WRITTEN),
            }
        }
    }
}

#[test]
fn slot_runs_report_every_bad_slot() {
    let records: Vec<SlotRecord> = (0..64)
        .map(|i| SlotRecord { block: i * 3, state: SlotState::Valid, generation: 2 })
        .collect();
    let mut buf = vec![0; 64 * SLOT_BYTES];
    encode_slots(&records, 1000, &mut buf).unwrap();
    buf[5 * 16 + 2] ^= 0x10; // slot 1005: torn
    buf[40 * 16 + 15] ^= 0x01; // slot 1040: CRC damaged
    buf[63 * 16..].copy_from_slice(&sealed_slot([0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0], 1063));
    let decoded = decode_slots(&buf, 1000).unwrap();
    assert!(!decoded.is_clean());
    assert_eq!(decoded.bad_indices(), [1005, 1040, 1063]);
    let errors: Vec<_> = decoded.errors().cloned().collect();
    assert_eq!(
        errors,
        [
            FormatError::TornSlot { index: 1005 },
            FormatError::TornSlot { index: 1040 },
            FormatError::CorruptSlot { index: 1063, reason: SlotCorruption::State { found: 9 } },
        ]
    );
    assert_eq!(
        errors.iter().map(|e| e.slot_index()).collect::<Vec<_>>(),
        [Some(1005), Some(1040), Some(1063)]
    );
    assert_eq!(decoded.records().count(), 61);
    assert_eq!(decoded.slots[6], Ok(records[6]));
}

#[test]
fn slot_run_buffer_sizes_are_checked() {
    let rec = SlotRecord { block: 1, state: SlotState::Valid, generation: 0 };
    let mut small = [0x11u8; 31];
    assert!(matches!(
        encode_slots(&[rec, rec], 0, &mut small),
        Err(FormatError::BufferSize { expected: 32, found: 31, .. })
    ));
    assert_eq!(small, [0x11; 31], "left unchanged on failure");
    let bad = SlotRecord { block: u64::MAX, ..rec };
    let mut buf = [0x11u8; 32];
    assert!(matches!(
        encode_slots(&[rec, bad], 0, &mut buf),
        Err(FormatError::BlockOutOfRange { .. })
    ));
    assert_eq!(buf, [0x11; 32], "left unchanged on failure");
    assert!(matches!(decode_slots(&[0; 17], 0), Err(FormatError::BufferSize { found: 17, .. })));
    assert_eq!(decode_slots(&[], 0).unwrap().slots, []);
}

// ---------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------

#[test]
fn layout_rejects_bad_geometry() {
    let bad = |r: Result<Layout, FormatError>| match r {
        Err(FormatError::InvalidGeometry { reason }) => reason,
        other => panic!("expected InvalidGeometry, got {other:?}"),
    };
    for block_bytes in [0, 512, 2048, 6144, 1 << 41, u64::MAX] {
        assert_eq!(
            bad(Layout::new(block_bytes, 2, 1, 4096)),
            GeometryError::BlockSize { block_bytes }
        );
    }
    for assoc in [0, 1, 3, 65536, u32::MAX] {
        assert_eq!(bad(Layout::new(4096, assoc, 1, 4096)), GeometryError::Assoc { assoc });
    }
    assert_eq!(bad(Layout::new(4096, 2, 0, 4096)), GeometryError::NoSets);
    for md_block_bytes in [0, 2048, 4097, 131_072] {
        assert_eq!(
            bad(Layout::new(4096, 2, 1, md_block_bytes)),
            GeometryError::MdBlockSize { md_block_bytes }
        );
    }
    assert_eq!(
        bad(Layout::new(MAX_BLOCK_BYTES, MAX_ASSOC, u32::MAX, 4096)),
        GeometryError::Overflow
    );
    for (b, a, m) in [(0, 2, 4096), (4096, 3, 4096), (4096, 2, 100)] {
        assert!(Layout::max_blocks_for(1 << 30, b, a, m).is_err());
    }
}

#[test]
fn layout_example_numbers() {
    // Small sets: one metadata block per set, mostly padding.
    let l = Layout::new(4096, 2, 3, 4096).unwrap();
    assert_eq!(l.md_blocks_per_set(), 1);
    assert_eq!(l.md_block_slots(1), Some(2..4));
    assert_eq!(l.slot_offset(3), Some(4096 + 4096 + 16));
    assert_eq!(l.md_bytes(), 3 * 4096);
    assert_eq!(l.data_start(), 4 * 4096);
    assert_eq!(l.total_bytes(), 4 * 4096 + 6 * 4096);
    assert_eq!(l.block_offset(6), None);
    // Large blocks: the data area is aligned to the block size.
    let l = Layout::new(1 << 20, 256, 10, 4096).unwrap();
    assert_eq!(l.block_sectors(), 2048);
    assert_eq!(l.md_blocks_per_set(), 1);
    assert_eq!(l.data_start(), 1 << 20);
    // Big sets: several metadata blocks per set, the last one partly used.
    let l = Layout::new(4096, 32768, 2, 65536).unwrap();
    assert_eq!(l.md_blocks_per_set(), 8);
    let l = Layout::new(4096, 8, 2, 4096).unwrap();
    assert_eq!(l.set_md_offset(1), Some(8192));
    assert_eq!(l.set_md_offset(2), None);
    assert_eq!(l.slot_index(1, 7), Some(15));
    assert_eq!(l.slot_index(2, 0), None);
    assert_eq!(l.slot_index(0, 8), None);
    assert_eq!(l.set_and_way(15), Some((1, 7)));
    assert_eq!(l.set_and_way(16), None);
}

#[test]
fn max_blocks_for_extremes() {
    // Not even the superblock fits.
    assert_eq!(Layout::max_blocks_for(0, 4096, 2, 4096), Ok(0));
    assert_eq!(Layout::max_blocks_for(4096, 4096, 2, 4096), Ok(0));
    // Superblock + one metadata block + two data blocks.
    assert_eq!(Layout::max_blocks_for(4 * 4096 - 1, 4096, 2, 4096), Ok(0));
    assert_eq!(Layout::max_blocks_for(4 * 4096, 4096, 2, 4096), Ok(2));
    // An enormous SSD is capped at u32::MAX sets.
    assert_eq!(Layout::max_blocks_for(u64::MAX, 4096, 2, 4096), Ok(u64::from(u32::MAX) * 2));
}

fn arb_shape() -> impl Strategy<Value = (u64, u32, u32)> {
    (12u32..=40, 1u32..=15, 12u32..=16).prop_map(|(b, a, m)| (1u64 << b, 1u32 << a, 1u32 << m))
}

/// Indices worth checking in a range: both ends, the middle and some others.
fn probe(len: u64, extra: &[u64]) -> Vec<u64> {
    let mut v = vec![0, len / 2, len.saturating_sub(1)];
    v.extend(extra.iter().map(|x| x % len.max(1)));
    v.retain(|&i| i < len);
    v
}

proptest! {
    #[test]
    fn layout_invariants(
        (block_bytes, assoc, md_block_bytes) in arb_shape(),
        num_sets in prop_oneof![1u32..=16, 1u32..=100_000, Just(u32::MAX)],
        picks in proptest::collection::vec(any::<u64>(), 8),
    ) {
        let Ok(l) = Layout::new(block_bytes, assoc, num_sets, md_block_bytes) else {
            // Only an overflow of the 64-bit extent may be refused.
            let err = Layout::new(block_bytes, assoc, num_sets, md_block_bytes).unwrap_err();
            prop_assert_eq!(err, FormatError::InvalidGeometry { reason: GeometryError::Overflow });
            return Ok(());
        };
        let mbb = u64::from(md_block_bytes);
        let set_md_bytes = u64::from(l.md_blocks_per_set()) * mbb;
        // The per-set metadata is just enough for its slots.
        prop_assert!(set_md_bytes >= u64::from(assoc) * 16);
        prop_assert!(set_md_bytes - u64::from(assoc) * 16 < mbb);
        // Every region is 4096-aligned; the data area is block-aligned and follows
        // the metadata with less than one block of padding.
        prop_assert_eq!(l.md_start() % 4096, 0);
        prop_assert_eq!(l.md_bytes() % 4096, 0);
        prop_assert_eq!(l.md_bytes(), u64::from(num_sets) * set_md_bytes);
        prop_assert_eq!(l.data_start() % block_bytes, 0);
        prop_assert!(l.data_start() >= l.md_start() + l.md_bytes());
        prop_assert!(l.data_start() - (l.md_start() + l.md_bytes()) < block_bytes);
        // The last block ends exactly at total_bytes.
        let last = l.num_blocks() - 1;
        prop_assert_eq!(l.block_offset(last).unwrap() + block_bytes, l.total_bytes());
        prop_assert_eq!(l.block_offset(l.num_blocks()), None);
        prop_assert!(l.fits(l.total_bytes()) && !l.fits(l.total_bytes() - 1));

        // No metadata block spans two sets.
        for m in probe(l.md_block_count(), &picks) {
            let slots = l.md_block_slots(m).unwrap();
            prop_assert!(!slots.is_empty());
            prop_assert!(slots.end - slots.start <= u64::from(l.slots_per_md_block()));
            let (first_set, _) = l.set_and_way(slots.start).unwrap();
            let (last_set, _) = l.set_and_way(slots.end - 1).unwrap();
            prop_assert_eq!(first_set, last_set);
            let off = l.md_block_offset(m).unwrap();
            let set_start = l.set_md_offset(first_set).unwrap();
            prop_assert!(off >= set_start && off + mbb <= set_start + set_md_bytes);
            prop_assert_eq!(off % mbb, l.md_start() % mbb);
            prop_assert_eq!(l.slot_offset(slots.start), Some(off));
        }
        prop_assert_eq!(l.md_block_slots(l.md_block_count()), None);
        prop_assert_eq!(
            l.md_block_offset(l.md_block_count() - 1).unwrap() + mbb,
            l.md_start() + l.md_bytes()
        );

        // No slot crosses a 512-byte boundary, and each is where the spec says.
        for index in probe(l.num_blocks(), &picks) {
            let off = l.slot_offset(index).unwrap();
            prop_assert_eq!(off / 512, (off + 15) / 512);
            let (set, way) = l.set_and_way(index).unwrap();
            prop_assert_eq!(l.slot_index(set, way), Some(index));
            prop_assert_eq!(off, l.set_md_offset(set).unwrap() + u64::from(way) * 16);
            let (m, within) = l.md_block_of_slot(index).unwrap();
            prop_assert_eq!(off, l.md_block_offset(m).unwrap() + within as u64);
            prop_assert!(l.md_block_slots(m).unwrap().contains(&index));
            prop_assert!(off + 16 <= l.md_start() + l.md_bytes());
            prop_assert_eq!(l.block_offset(index), Some(l.data_start() + index * block_bytes));
        }
        prop_assert_eq!(l.slot_offset(l.num_blocks()), None);
    }

    #[test]
    fn max_blocks_for_is_maximal(
        (block_bytes, assoc, md_block_bytes) in arb_shape(),
        ssd_bytes in prop_oneof![0u64..1 << 24, 0u64..1 << 40, any::<u64>()],
    ) {
        let blocks = Layout::max_blocks_for(ssd_bytes, block_bytes, assoc, md_block_bytes).unwrap();
        prop_assert_eq!(blocks % u64::from(assoc), 0);
        let sets = u32::try_from(blocks / u64::from(assoc)).unwrap();
        if sets > 0 {
            let l = Layout::new(block_bytes, assoc, sets, md_block_bytes).unwrap();
            prop_assert!(l.fits(ssd_bytes));
            prop_assert_eq!(l.check_fits(ssd_bytes), Ok(()));
        }
        // One more set would not fit (or there cannot be more sets).
        if let Some(more) = sets.checked_add(1) {
            match Layout::new(block_bytes, assoc, more, md_block_bytes) {
                Ok(l) => {
                    prop_assert!(!l.fits(ssd_bytes));
                    let is_does_not_fit = matches!(
                        l.check_fits(ssd_bytes),
                        Err(FormatError::InvalidGeometry { reason: GeometryError::DoesNotFit { .. } })
                    );
                    prop_assert!(is_does_not_fit);
                }
                Err(e) => prop_assert_eq!(
                    e,
                    FormatError::InvalidGeometry { reason: GeometryError::Overflow }
                ),
            }
        }
    }

    #[test]
    fn md_blocks_round_trip(
        (block_bytes, assoc, md_block_bytes) in arb_shape(),
        num_sets in 1u32..=8,
        pick in any::<u64>(),
        generation in any::<u32>(),
    ) {
        let l = Layout::new(block_bytes.min(1 << 20), assoc, num_sets, md_block_bytes).unwrap();
        let m = pick % l.md_block_count();
        let slots = l.md_block_slots(m).unwrap();
        let records: Vec<SlotRecord> = slots
            .clone()
            .map(|i| SlotRecord { block: i * 7 % (1 << 40), state: SlotState::Dirty, generation })
            .collect();
        let bytes = l.encode_md_block(m, &records).unwrap();
        prop_assert_eq!(bytes.len(), md_block_bytes as usize);
        // Each slot sits where slot_offset says, relative to its metadata block.
        let base = l.md_block_offset(m).unwrap();
        for (index, rec) in slots.clone().zip(&records) {
            let at = usize::try_from(l.slot_offset(index).unwrap() - base).unwrap();
            prop_assert_eq!(&bytes[at..at + 16], &rec.encode(index)[..]);
        }
        prop_assert!(bytes[records.len() * 16..].iter().all(|&b| b == 0));
        let decoded = l.decode_md_block(m, &bytes).unwrap();
        prop_assert_eq!(decoded.first_index, slots.start);
        prop_assert_eq!(decoded.slots, records.into_iter().map(Ok).collect::<Vec<_>>());
        // A metadata block written at another block's place is caught (when both
        // hold the same number of slots, its bytes have the length to be read).
        let other = (m + 1) % l.md_block_count();
        if other != m {
            let wrong = l.decode_md_block(other, &bytes).unwrap();
            prop_assert!(!wrong.is_clean());
            prop_assert_eq!(wrong.bad_indices().len(), wrong.slots.len().min(slots.clone().count()));
        }
    }
}

#[test]
fn md_block_helpers_check_their_arguments() {
    let l = Layout::new(4096, 512, 4, 4096).unwrap(); // 2 md blocks per set, 8 in all
    assert_eq!(l.md_block_count(), 8);
    let rec = SlotRecord { block: 1, state: SlotState::Valid, generation: 0 };
    assert_eq!(
        l.encode_md_block(8, &[]),
        Err(FormatError::NoSuchMdBlock { md_block: 8, count: 8 })
    );
    assert_eq!(
        l.encode_md_block(0, &[rec; 255]),
        Err(FormatError::SlotCount { md_block: 0, expected: 256, found: 255 })
    );
    let mut short = vec![0; 4095];
    assert!(matches!(
        l.encode_md_block_into(0, &[rec; 256], &mut short),
        Err(FormatError::BufferSize { expected: 4096, found: 4095, .. })
    ));
    assert!(matches!(l.decode_md_block(0, &short), Err(FormatError::BufferSize { .. })));
    assert!(matches!(l.decode_md_block(9, &[0; 4096]), Err(FormatError::NoSuchMdBlock { .. })));
    // A zeroed metadata area is an empty cache.
    let decoded = l.decode_md_block(5, &[0; 4096]).unwrap();
    assert_eq!(decoded.first_index, 2 * 512 + 256);
    assert!(decoded.slots.iter().all(|s| *s == Ok(SlotRecord::NEVER_WRITTEN)));
    // With tiny sets the padding after the set's slots is ignored on read.
    let l = Layout::new(4096, 2, 4, 4096).unwrap();
    let mut bytes = l.encode_md_block(3, &[rec, rec]).unwrap();
    bytes[100] = 0xFF;
    let decoded = l.decode_md_block(3, &bytes).unwrap();
    assert_eq!(decoded.slots, [Ok(rec), Ok(rec)]);
    assert_eq!(decoded.first_index, 6);
}

#[test]
fn errors_display_what_is_wrong() {
    let msg = |e: FormatError| e.to_string();
    assert!(msg(FormatError::NotACache { found: [0; 8] }).contains("not a flashcache-core cache"));
    assert!(
        msg(FormatError::Corrupt { reason: Corruption::Crc { stored: 1, computed: 2 } })
            .contains("CRC mismatch")
    );
    assert!(
        msg(FormatError::Corrupt {
            reason: Corruption::Geometry(GeometryError::Assoc { assoc: 3 })
        })
        .contains("associativity 3")
    );
    assert!(msg(FormatError::TornSlot { index: 17 }).contains("slot 17"));
}
