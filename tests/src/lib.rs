//! Shared fixtures for the integration tests: temporary devices (regular files,
//! and loop devices with 512- and 4096-byte sectors when root), engines, and a
//! per-sector data pattern.
//!
//! Loop-device scenarios are skipped with a printed reason when loop devices are
//! unavailable, unless `DMIO_REQUIRE_LOOP=1` is set (CI sets it): then a missing
//! loop device is a test failure.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dmio::loopdev::{LoopDevice, LoopOptions};
use dmio::{BlockDevice, DeviceOptions, DmIoClient, DmIoConfig, EngineChoice};

/// What a test device is backed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// A regular file opened with O_DIRECT (no root needed).
    File,
    /// A loop device with 512-byte sectors over a file, direct I/O on.
    Loop512,
    /// A loop device with 4096-byte sectors over a file, direct I/O on.
    Loop4096,
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backing::File => "file",
            Backing::Loop512 => "loop512",
            Backing::Loop4096 => "loop4096",
        })
    }
}

/// Whether loop devices must be available (`DMIO_REQUIRE_LOOP=1`).
pub fn loop_required() -> bool {
    std::env::var("DMIO_REQUIRE_LOOP").is_ok_and(|v| v.trim() == "1")
}

/// The backings to run a scenario on: always a file, plus both loop kinds when
/// loop devices are available. Prints why loop devices are skipped; panics
/// instead when they are required and missing.
pub fn backings() -> Vec<Backing> {
    match dmio::loopdev::unavailable_reason() {
        None => vec![Backing::File, Backing::Loop512, Backing::Loop4096],
        Some(reason) => {
            assert!(
                !loop_required(),
                "DMIO_REQUIRE_LOOP=1 but loop devices are unavailable: {reason}"
            );
            eprintln!("skipping loop-device scenarios: {reason}");
            vec![Backing::File]
        }
    }
}

/// Both engines.
pub const ENGINES: [EngineChoice; 2] = [EngineChoice::Uring, EngineChoice::Sync];

/// A directory for test images on a filesystem that supports O_DIRECT (the
/// system temporary directory; tmpfs would not exercise real direct I/O).
pub fn image_dir() -> PathBuf {
    std::env::var_os("DMIO_TEST_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir)
}

/// A device for one test, removed (and its loop device detached) on drop.
#[derive(Debug)]
pub struct TestDevice {
    /// The opened device.
    pub dev: Arc<BlockDevice>,
    /// What it is backed by.
    pub backing: Backing,
    // Drop order: the device, then the loop device, then the image.
    _loop: Option<LoopDevice>,
    _dir: tempfile::TempDir,
    image: PathBuf,
}

impl TestDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(backing: Backing, size: u64) -> TestDevice {
        Self::with_options(backing, size, DeviceOptions::new())
    }

    /// A zero-filled device of `size` bytes, opened with `options`.
    pub fn with_options(backing: Backing, size: u64, options: DeviceOptions) -> TestDevice {
        let dir = tempfile::tempdir_in(image_dir()).expect("creating a temporary directory");
        let image = dir.path().join("device.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("creating the image file");
        let (path, lo) = match backing {
            Backing::File => (image.clone(), None),
            Backing::Loop512 | Backing::Loop4096 => {
                let sector_size = if backing == Backing::Loop512 { 512 } else { 4096 };
                let lo = LoopDevice::attach(&image, LoopOptions::new().sector_size(sector_size))
                    .unwrap_or_else(|e| panic!("attaching a loop device: {e}"));
                assert!(lo.direct_io_active(), "{} did not enable direct I/O", lo.path().display());
                (lo.path().to_path_buf(), Some(lo))
            }
        };
        let dev = BlockDevice::open_with(&path, options)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        TestDevice { dev, backing, _loop: lo, _dir: dir, image }
    }

    /// The path of the backing image file.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The device's logical block size in sectors.
    pub fn block_sectors(&self) -> u64 {
        u64::from(self.dev.logical_block_size()) / 512
    }

    /// Reads the whole device content through a separate O_DIRECT-free path (the
    /// image file for files, the loop node for loop devices), as an independent
    /// check of what dmio wrote.
    pub fn read_back(&self) -> Vec<u8> {
        std::fs::read(self.dev.path()).expect("reading the device back")
    }
}

/// A client with `engine` and otherwise default settings.
pub fn client(engine: EngineChoice) -> DmIoClient {
    DmIoClient::with_config(DmIoConfig { engine, ..Default::default() })
        .unwrap_or_else(|e| panic!("creating a {engine:?} client: {e}"))
}

/// The 512 bytes of the pattern for `sector` under `seed`: every 8-byte word
/// encodes the seed, the sector and the word's index, so a misplaced, stale or
/// torn sector is always detected.
pub fn sector_pattern(sector: u64, seed: u64) -> [u8; 512] {
    let mut out = [0u8; 512];
    for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
        let word = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (sector << 8) ^ i as u64;
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    out
}

/// Fills `buf` with the pattern of consecutive sectors starting at `first_sector`.
pub fn fill_pattern(buf: &mut [u8], first_sector: u64, seed: u64) {
    for (i, chunk) in buf.chunks_mut(512).enumerate() {
        let pattern = sector_pattern(first_sector + i as u64, seed);
        chunk.copy_from_slice(&pattern[..chunk.len()]);
    }
}

/// A buffer of `sectors` sectors holding the pattern from `first_sector`.
pub fn pattern(first_sector: u64, sectors: u64, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; (sectors * 512) as usize];
    fill_pattern(&mut buf, first_sector, seed);
    buf
}

/// Checks that `buf` holds the pattern from `first_sector`; the error names the
/// first wrong sector.
pub fn check_pattern(buf: &[u8], first_sector: u64, seed: u64) -> Result<(), String> {
    for (i, chunk) in buf.chunks(512).enumerate() {
        let sector = first_sector + i as u64;
        if chunk != &sector_pattern(sector, seed)[..chunk.len()] {
            return Err(format!("sector {sector} does not hold the pattern of seed {seed}"));
        }
    }
    Ok(())
}
