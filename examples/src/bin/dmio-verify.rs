//! dmio-verify: write a pattern to a region with dm-io, read it back and verify it.
//!
//! With no arguments it works on a temporary 64 MiB image: through a loop device
//! with direct I/O when run as root, otherwise on the regular file itself. It
//! writes the region with every memory type and as a two-region fan-out write,
//! reads everything back with a fresh client, checks every sector, and prints
//! what it did. `--device PATH` uses an existing device or file instead (its
//! first `--size` bytes are overwritten).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use dmio::loopdev::{LoopDevice, LoopOptions};
use dmio::{
    AlignedBuf, BioVec, BlockDevice, Bvec, DmIoClient, DmIoConfig, DmIoMemory, DmIoRegion,
    DmIoRequest, EngineChoice, ReqFlags, VirtualArea,
};

#[derive(Parser, Debug)]
#[command(about = "Write, read back and verify a region with dmio")]
struct Args {
    /// A block device or file to use instead of a temporary image (its first
    /// --size bytes are overwritten).
    #[arg(long)]
    device: Option<PathBuf>,
    /// Bytes of the device to use (a multiple of 1 MiB).
    #[arg(long, default_value_t = 64 << 20)]
    size: u64,
    /// Engine: auto, uring or sync.
    #[arg(long, default_value = "auto")]
    engine: String,
    /// Sector size of the temporary loop device (512 or 4096).
    #[arg(long, default_value_t = 512)]
    sector_size: u32,
}

fn sector_word(sector: u64, word: usize) -> [u8; 8] {
    (0xd1_0000_0000_u64 ^ (sector << 8) ^ word as u64).to_le_bytes()
}

fn fill(buf: &mut [u8], first_sector: u64) {
    for (i, sector) in buf.chunks_mut(512).enumerate() {
        for (w, word) in sector.chunks_mut(8).enumerate() {
            word.copy_from_slice(&sector_word(first_sector + i as u64, w));
        }
    }
}

fn first_bad_sector(buf: &[u8], first_sector: u64) -> Option<u64> {
    let mut expect = vec![0u8; 512];
    for (i, sector) in buf.chunks(512).enumerate() {
        fill(&mut expect, first_sector + i as u64);
        if sector != &expect[..] {
            return Some(first_sector + i as u64);
        }
    }
    None
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let engine = match args.engine.as_str() {
        "auto" => EngineChoice::Auto,
        "uring" | "io_uring" => EngineChoice::Uring,
        "sync" => EngineChoice::Sync,
        other => return Err(format!("unknown engine {other:?} (auto, uring or sync)").into()),
    };
    if args.size == 0 || !args.size.is_multiple_of(1 << 20) {
        return Err("--size must be a positive multiple of 1 MiB".into());
    }
    // Keep the temporary image and loop device alive until the end.
    let mut _tmp = None;
    let mut _lo = None;
    let path = match &args.device {
        Some(path) => path.clone(),
        None => {
            let dir = tempfile::tempdir()?;
            let image = dir.path().join("dmio-verify.img");
            std::fs::File::create(&image)?.set_len(args.size)?;
            let path = match dmio::loopdev::unavailable_reason() {
                None => {
                    let lo = LoopDevice::attach(
                        &image,
                        LoopOptions::new().sector_size(args.sector_size),
                    )?;
                    let path = lo.path().to_path_buf();
                    println!(
                        "device: {} (loop device over {}, direct I/O {})",
                        path.display(),
                        image.display(),
                        if lo.direct_io_active() { "on" } else { "off" }
                    );
                    _lo = Some(lo);
                    path
                }
                Some(reason) => {
                    println!("device: {} (regular file; {reason})", image.display());
                    image
                }
            };
            _tmp = Some(dir);
            path
        }
    };
    let dev = BlockDevice::open(&path)?;
    let info = dev.info();
    if dev.size_bytes() < args.size {
        return Err(format!("{} holds only {} bytes", path.display(), dev.size_bytes()).into());
    }
    println!(
        "logical block {} B, memory alignment {} B ({:?}), largest I/O {} KiB, discard {}, write-zeroes {}",
        info.logical_block_size,
        info.dio_mem_align,
        info.alignment_source,
        info.max_io_bytes / 1024,
        if dev.supports_discard() { "yes" } else { "no" },
        if dev.supports_write_zeroes() { "yes" } else { "no" },
    );
    let config = DmIoConfig { engine, ..Default::default() };
    let client = DmIoClient::with_config(config.clone())?;
    println!("engine: {}", client.engine());
    if let Some(reason) = client.engine_fallback_reason() {
        println!("  (fallback because {reason})");
    }

    // Four quarters, one per memory type; then the whole region again as a
    // two-region fan-out write (first half and second half of a copy).
    let total_sectors = args.size / 512;
    let quarter = total_sectors / 4;
    let qbytes = (quarter * 512) as usize;
    let started = Instant::now();
    for (i, kind) in
        ["page list", "bio vector", "virtual area", "contiguous buffer"].iter().enumerate()
    {
        let first = quarter * i as u64;
        let mut mem = match i {
            0 => DmIoMemory::PageList(client.page_pool().alloc_list(qbytes / 4096)),
            1 => DmIoMemory::Bvec(Bvec::new(
                (0..qbytes / 4096).map(|_| BioVec::whole(dmio::Page::new())).collect(),
            )),
            2 => DmIoMemory::Vma(VirtualArea::new(qbytes)?),
            _ => DmIoMemory::Kmem(AlignedBuf::new(qbytes)),
        };
        let mut bytes = vec![0u8; qbytes];
        fill(&mut bytes, first);
        mem.copy_from_slice(0, &bytes);
        let done =
            client.io_sync(DmIoRequest::write(mem), &[DmIoRegion::new(&dev, first, quarter)])?;
        done.into_result().map_err(|e| format!("writing the {kind} quarter: {e}"))?;
    }
    let flush = client.io_sync(DmIoRequest::flush(), &[DmIoRegion::new(&dev, 0, 0)])?;
    flush.into_result()?;
    let write_secs = started.elapsed().as_secs_f64();
    drop(client);

    // Read back with a fresh client, in 1 MiB requests, and check every sector.
    let client = DmIoClient::with_config(config)?;
    let started = Instant::now();
    let chunk = 2048u64;
    let mut first = 0;
    while first < total_sectors {
        let n = chunk.min(total_sectors - first);
        let req = DmIoRequest::read(AlignedBuf::new((n * 512) as usize));
        let done = client.io_sync(req, &[DmIoRegion::new(&dev, first, n)])?;
        let mem = done.into_result()?.ok_or("no memory came back")?;
        if let Some(bad) = first_bad_sector(&mem.to_vec(), first) {
            return Err(format!(
                "verification failed: sector {bad} does not hold what was written"
            )
            .into());
        }
        first += n;
    }
    let read_secs = started.elapsed().as_secs_f64();

    // A fan-out write: the same memory to the first and second half, FUA.
    let half = total_sectors / 2;
    let mut bytes = vec![0u8; (half * 512) as usize];
    fill(&mut bytes, 0);
    let mem = AlignedBuf::from_slice(&bytes);
    let regions = [DmIoRegion::new(&dev, 0, half), DmIoRegion::new(&dev, half, half)];
    let done = client.io_sync(DmIoRequest::write(mem).with_flags(ReqFlags::FUA), &regions)?;
    done.into_result()?;
    let req = DmIoRequest::read(AlignedBuf::new((half * 512) as usize));
    let back = client
        .io_sync(req, &[DmIoRegion::new(&dev, half, half)])?
        .into_result()?
        .ok_or("no memory")?;
    if first_bad_sector(&back.to_vec(), 0).is_some() {
        return Err("verification of the fan-out write failed".into());
    }
    let mib = args.size as f64 / (1 << 20) as f64;
    println!(
        "wrote {mib:.0} MiB ({:.0} MiB/s), read back and verified {} sectors ({:.0} MiB/s), fan-out write verified",
        mib / write_secs,
        total_sectors,
        mib / read_secs
    );
    println!("OK");
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmio-verify: {e}");
            ExitCode::FAILURE
        }
    }
}
