//! Creating, loading and destroying a cache superblock on the SSD, on files and
//! loop devices: the round trip, and every refusal with its typed error.

use flashcache_core::format::{FormatError, SbState, Superblock};
use flashcache_core::setup::{self, CreateOptions, SetupError};
use tests::{Backing, TestDevice, backings, write_at};

const MIB: u64 = 1 << 20;

fn dmio() -> dmio::DmIoClient {
    dmio::DmIoClient::new().unwrap()
}

#[test]
fn create_then_load_round_trips_and_marks_the_cache_loaded() {
    for backing in backings() {
        let ssd = TestDevice::new(backing, 16 * MIB);
        let disk = TestDevice::new(backing, 64 * MIB);
        let io = dmio();
        // Garbage where the metadata goes: create must zero it.
        assert!(write_at(&io, &ssd.dev, 8, &vec![0xff; 1 << 20], dmio::ReqFlags::empty()).is_ok());
        let created = setup::create(&io, &ssd.dev, &disk.dev, &CreateOptions::default()).unwrap();
        assert_eq!(created.state, SbState::Clean, "{backing}");
        assert_eq!(created.assoc, 512);
        let layout = created.layout().unwrap();
        assert!(layout.total_bytes() <= 16 * MIB, "{backing}: the cache does not fit the SSD");
        let image = ssd.read_back();
        let md =
            &image[layout.md_start() as usize..(layout.md_start() + layout.md_bytes()) as usize];
        assert!(md.iter().all(|&b| b == 0), "{backing}: metadata not zeroed");

        let first = setup::load(&io, &ssd.dev, &disk.dev).unwrap();
        assert_eq!(first, created, "{backing}: load returns the superblock as found");
        let second = setup::load(&io, &ssd.dev, &disk.dev).unwrap();
        assert_eq!(second.state, SbState::Loaded, "{backing}: the first load marked it unclean");
        assert_eq!(second.generation, 1, "{backing}");
        assert_eq!(second.cache_uuid, created.cache_uuid);
    }
}

#[test]
fn create_refuses_an_existing_cache_unless_forced() {
    let ssd = TestDevice::new(Backing::File, 8 * MIB);
    let disk = TestDevice::new(Backing::File, 8 * MIB);
    let io = dmio();
    let first = setup::create(&io, &ssd.dev, &disk.dev, &CreateOptions::default()).unwrap();
    let err = setup::create(&io, &ssd.dev, &disk.dev, &CreateOptions::default()).unwrap_err();
    assert!(matches!(err, SetupError::AlreadyACache { .. }), "{err}");
    let forced = CreateOptions { force: true, ..CreateOptions::default() };
    let second = setup::create(&io, &ssd.dev, &disk.dev, &forced).unwrap();
    assert_ne!(first.cache_uuid, second.cache_uuid);
}

#[test]
fn load_refuses_a_blank_ssd_another_disk_a_resized_disk_and_damaged_superblocks() {
    let ssd = TestDevice::new(Backing::File, 8 * MIB);
    let disk = TestDevice::new(Backing::File, 8 * MIB);
    let other = TestDevice::new(Backing::File, 8 * MIB);
    let io = dmio();
    let err = setup::load(&io, &ssd.dev, &disk.dev).unwrap_err();
    assert!(matches!(err, SetupError::NotACache { .. }), "{err}");

    setup::create(&io, &ssd.dev, &disk.dev, &CreateOptions::default()).unwrap();
    let err = setup::load(&io, &ssd.dev, &other.dev).unwrap_err();
    assert!(matches!(err, SetupError::WrongDisk { .. }), "{err}");

    std::fs::OpenOptions::new().write(true).open(disk.image()).unwrap().set_len(4 * MIB).unwrap();
    let shrunk = dmio::BlockDevice::open(disk.image()).unwrap();
    let err = setup::load(&io, &ssd.dev, &shrunk).unwrap_err();
    assert!(
        matches!(err, SetupError::DiskSizeChanged { expected: 16384, found: 8192, .. }),
        "{err}"
    );

    // A flipped bit anywhere in the superblock is caught.
    let mut image = std::fs::read(ssd.image()).unwrap();
    image[100] ^= 0x10;
    assert!(write_at(&io, &ssd.dev, 0, &image[..4096], dmio::ReqFlags::empty()).is_ok());
    let err = setup::load(&io, &ssd.dev, &disk.dev).unwrap_err();
    assert!(
        matches!(err, SetupError::BadSuperblock { source: FormatError::Corrupt { .. }, .. }),
        "{err}"
    );

    // A newer format version is refused as such.
    image[100] ^= 0x10;
    let mut sb = Superblock::decode(&image).unwrap().encode();
    sb[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = flashcache_core::format::crc32c(&sb[..508]);
    sb[508..512].copy_from_slice(&crc.to_le_bytes());
    image[..512].copy_from_slice(&sb);
    assert!(write_at(&io, &ssd.dev, 0, &image[..4096], dmio::ReqFlags::empty()).is_ok());
    let err = setup::load(&io, &ssd.dev, &disk.dev).unwrap_err();
    assert!(
        matches!(err, SetupError::BadSuperblock { source: FormatError::NewerVersion { .. }, .. }),
        "{err}"
    );
}

#[test]
fn destroy_refuses_a_cache_that_may_be_dirty_unless_forced() {
    let ssd = TestDevice::new(Backing::File, 8 * MIB);
    let disk = TestDevice::new(Backing::File, 8 * MIB);
    let io = dmio();
    setup::create(&io, &ssd.dev, &disk.dev, &CreateOptions::default()).unwrap();
    setup::load(&io, &ssd.dev, &disk.dev).unwrap(); // now Loaded: a crash would leave it so
    let err = setup::destroy(&io, &ssd.dev, false).unwrap_err();
    assert!(matches!(err, SetupError::MayBeDirty { state: SbState::Loaded, .. }), "{err}");
    setup::destroy(&io, &ssd.dev, true).unwrap();
    let err = setup::load(&io, &ssd.dev, &disk.dev).unwrap_err();
    assert!(matches!(err, SetupError::NotACache { .. }), "{err}");
    // A clean cache goes without force.
    setup::create(&io, &ssd.dev, &disk.dev, &CreateOptions::default()).unwrap();
    setup::destroy(&io, &ssd.dev, false).unwrap();
}

#[test]
fn bad_create_options_are_refused_before_anything_is_written() {
    let ssd = TestDevice::new(Backing::File, 8 * MIB);
    let disk = TestDevice::new(Backing::File, 8 * MIB);
    let io = dmio();
    ssd.dev.faults().start_trace();
    let same = dmio::BlockDevice::open(ssd.image()).unwrap();
    let err = setup::create(&io, &ssd.dev, &same, &CreateOptions::default()).unwrap_err();
    assert!(matches!(err, SetupError::SameDevice { .. }), "{err}");
    let odd = CreateOptions { block_bytes: 6144, ..CreateOptions::default() };
    let err = setup::create(&io, &ssd.dev, &disk.dev, &odd).unwrap_err();
    assert!(matches!(err, SetupError::Option(_)), "{err}");
    let big = CreateOptions { size_bytes: Some(16 * MIB), ..CreateOptions::default() };
    let err = setup::create(&io, &ssd.dev, &disk.dev, &big).unwrap_err();
    assert!(matches!(err, SetupError::SsdTooSmall { .. }), "{err}");
    let huge_sets = CreateOptions { block_bytes: 1 << 20, assoc: 512, ..CreateOptions::default() };
    let err = setup::create(&io, &ssd.dev, &disk.dev, &huge_sets).unwrap_err();
    assert!(matches!(err, SetupError::SsdTooSmall { .. }), "{err}");
    let writes = ssd.dev.faults().take_trace().iter().filter(|op| op.op.is_write()).count();
    assert_eq!(writes, 0, "a refused create wrote to the SSD");
}

/// A superblock left Unstable (a metadata write failed at shutdown) is refused:
/// its slots cannot be trusted.
#[test]
fn load_refuses_an_unstable_cache() {
    let ssd = TestDevice::new(Backing::File, 8 * MIB);
    let disk = TestDevice::new(Backing::File, 8 * MIB);
    let io = dmio();
    let mut sb = setup::create(&io, &ssd.dev, &disk.dev, &CreateOptions::default()).unwrap();
    sb.state = SbState::Unstable;
    let mut region = vec![0u8; 4096];
    region[..512].copy_from_slice(&sb.encode());
    assert!(write_at(&io, &ssd.dev, 0, &region, dmio::ReqFlags::empty()).is_ok());
    let err = setup::load(&io, &ssd.dev, &disk.dev).unwrap_err();
    assert!(matches!(err, SetupError::Unstable { .. }), "{err}");
    // Nothing was changed by the refusal.
    assert_eq!(setup::read_superblock(&io, &ssd.dev).unwrap().state, SbState::Unstable);
}
