//! Shared fixtures for the integration tests: temporary devices (regular files,
//! and loop devices with 512- and 4096-byte sectors when root), engines and
//! clients, a per-sector data pattern, blocking read and write helpers, a
//! trace filter and a small deterministic generator.
//!
//! Loop-device scenarios are skipped with a printed reason when loop devices are
//! unavailable, unless `DMIO_REQUIRE_LOOP=1` is set (CI sets it): then a missing
//! loop device is a test failure.

/// The README's code examples, compiled and run as doc tests (so the README
/// shows only code that runs as written).
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeExamples;

pub mod cache_blocks;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dmio::fault::TracedOp;
use dmio::loopdev::{LoopDevice, LoopOptions};
use dmio::{
    AlignedBuf, BlockDevice, DeviceOptions, DmIoClient, DmIoCompletion, DmIoConfig, DmIoOp,
    DmIoRegion, DmIoRequest, EngineChoice, ReqFlags,
};

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

/// Every (backing, engine) pair: each backing of [`backings`] with each of
/// [`ENGINES`], backing by backing.
pub fn configs() -> Vec<(Backing, EngineChoice)> {
    backings().into_iter().flat_map(|b| ENGINES.into_iter().map(move |e| (b, e))).collect()
}

/// The label of a (backing, engine) pair, such as `loop4096/Uring`, for
/// assertion messages.
pub fn label(backing: Backing, engine: EngineChoice) -> String {
    format!("{backing}/{engine:?}")
}

/// For each pair of [`configs`], in order: its [`label`], a fresh zero-filled
/// device of `size` bytes, and a client with default settings. Each device and
/// client is created when the iteration reaches its pair. Bind the three as
/// `(at, td, client)` so that the client is dropped (which waits for its I/O)
/// before the device.
pub fn scenarios(size: u64) -> impl Iterator<Item = (String, TestDevice, DmIoClient)> {
    scenarios_with(size, client)
}

/// [`scenarios`] with each client made by `make_client` for the pair's engine.
pub fn scenarios_with(
    size: u64,
    make_client: impl Fn(EngineChoice) -> DmIoClient,
) -> impl Iterator<Item = (String, TestDevice, DmIoClient)> {
    configs().into_iter().map(move |(backing, engine)| {
        (label(backing, engine), TestDevice::new(backing, size), make_client(engine))
    })
}

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

    /// `n` zero-filled devices of `size` bytes each, all backed by `backing`.
    pub fn many(backing: Backing, size: u64, n: usize) -> Vec<TestDevice> {
        (0..n).map(|_| TestDevice::new(backing, size)).collect()
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
    client_with_config(engine, DmIoConfig::default())
}

/// A client with `engine` and the other settings of `config` (its `engine` is
/// ignored).
pub fn client_with_config(engine: EngineChoice, config: DmIoConfig) -> DmIoClient {
    DmIoClient::with_config(DmIoConfig { engine, ..config })
        .unwrap_or_else(|e| panic!("creating a {engine:?} client: {e}"))
}

/// A client with `engine`, an op cap of `max_op_bytes`, `iovecs_per_op` iovecs
/// per op, and otherwise default settings.
pub fn client_with(engine: EngineChoice, max_op_bytes: u64, iovecs_per_op: usize) -> DmIoClient {
    client_with_config(engine, DmIoConfig { max_op_bytes, iovecs_per_op, ..Default::default() })
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

/// The bytes of sectors `sector..sector + count` of a device `image`.
pub fn sectors_of(image: &[u8], sector: u64, count: u64) -> &[u8] {
    &image[(sector * 512) as usize..((sector + count) * 512) as usize]
}

/// Writes `data` (a whole number of sectors) at `sector` of `dev` with `flags`,
/// blocking, and returns the completion; panics if the request is refused.
pub fn write_at(
    client: &DmIoClient,
    dev: &Arc<BlockDevice>,
    sector: u64,
    data: &[u8],
    flags: ReqFlags,
) -> DmIoCompletion {
    let req = DmIoRequest::write(AlignedBuf::from_slice(data)).with_flags(flags);
    client
        .io_sync(req, &[DmIoRegion::new(dev, sector, data.len() as u64 / 512)])
        .unwrap_or_else(|e| panic!("write at sector {sector} rejected: {e}"))
}

/// Writes the pattern of `seed` to `sectors` sectors at `sector` of `dev`,
/// blocking; panics if the write is refused or fails.
pub fn write_pattern(
    client: &DmIoClient,
    dev: &Arc<BlockDevice>,
    sector: u64,
    sectors: u64,
    seed: u64,
) {
    let done = write_at(client, dev, sector, &pattern(sector, sectors, seed), ReqFlags::empty());
    assert!(done.is_ok(), "writing the pattern at sector {sector} failed: {:?}", done.failures);
}

/// Reads `sectors` sectors at `sector` of `dev`, blocking, into a buffer
/// pre-filled with 0xAA; returns the completion (its memory taken) and the
/// bytes. Panics if the read is refused.
pub fn read_at(
    client: &DmIoClient,
    dev: &Arc<BlockDevice>,
    sector: u64,
    sectors: u64,
) -> (DmIoCompletion, Vec<u8>) {
    let buf = AlignedBuf::from_slice(&vec![0xAA; (sectors * 512) as usize]);
    let mut done = client
        .io_sync(DmIoRequest::read(buf), &[DmIoRegion::new(dev, sector, sectors)])
        .unwrap_or_else(|e| panic!("read at sector {sector} rejected: {e}"));
    let bytes = done.memory.take().expect("a read hands its memory back").to_vec();
    assert_eq!(bytes.len(), (sectors * 512) as usize);
    (done, bytes)
}

/// Reads `sectors` sectors at `sector` of `dev`, blocking, and returns the
/// bytes; panics if the read is refused or fails.
pub fn read_region(
    client: &DmIoClient,
    dev: &Arc<BlockDevice>,
    sector: u64,
    sectors: u64,
) -> Vec<u8> {
    let (done, bytes) = read_at(client, dev, sector, sectors);
    assert!(done.is_ok(), "reading at sector {sector} failed: {:?}", done.failures);
    bytes
}

/// The operations of kind `op` in `trace`, sorted by first sector.
pub fn ops_of(trace: &[TracedOp], op: DmIoOp) -> Vec<TracedOp> {
    let mut ops: Vec<TracedOp> = trace.iter().filter(|t| t.op == op).cloned().collect();
    ops.sort_by_key(|t| t.sector);
    ops
}

/// A small deterministic generator for workloads (splitmix64); the state is
/// the seed.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (which must not be 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `assert_eq!` for data: on a mismatch it says what each side holds rather
/// than printing kilobytes.
#[macro_export]
macro_rules! assert_data {
    ($got:expr, $want:expr $(,)?) => {
        assert_data!($got, $want, "data")
    };
    ($got:expr, $want:expr, $($what:tt)+) => {{
        let (got, want): (&[u8], &[u8]) = (&$got, &$want);
        if got != want {
            panic!("{}: got {}; expected {}", format_args!($($what)+), $crate::describe_sectors(got), $crate::describe_sectors(want));
        }
    }};
}

/// What `buf` holds, sector by sector: runs of the pattern of one seed, zeros,
/// or anything else.
pub fn describe_sectors(buf: &[u8]) -> String {
    let decode = |chunk: &[u8]| -> String {
        if chunk.iter().all(|&b| b == 0) {
            return "zeros".into();
        }
        let w0 = u64::from_le_bytes(chunk[..8].try_into().unwrap());
        (0..256u64)
            .find_map(|seed| {
                let sector = (w0 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)) >> 8;
                (chunk == sector_pattern(sector, seed)).then(|| format!("seed {seed} @{sector}"))
            })
            .unwrap_or_else(|| "other bytes".into())
    };
    let mut runs: Vec<(String, usize)> = Vec::new();
    for chunk in buf.chunks(512) {
        let label = decode(chunk);
        let label = label.split(" @").next().unwrap().to_string();
        match runs.last_mut() {
            Some((last, n)) if *last == label => *n += 1,
            _ => runs.push((label, 1)),
        }
    }
    let first = buf.chunks(512).next().map(decode).unwrap_or_default();
    let runs: Vec<String> = runs.into_iter().map(|(l, n)| format!("{n} x {l}")).collect();
    format!("[{}] (first sector: {first})", runs.join(", "))
}
