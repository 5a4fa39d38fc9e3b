//! Loop devices: attach a file as a block device (direct I/O on, a chosen sector
//! size, optionally read-only) and detach it on drop. Used by the tests, examples
//! and benchmarks of this project; needs root (`CAP_SYS_ADMIN`) and `/dev/loop-control`.
//!
//! ```no_run
//! use dmio::loopdev::{LoopDevice, LoopOptions};
//! let file = tempfile::NamedTempFile::new()?;
//! file.as_file().set_len(64 << 20)?;
//! let lo = LoopDevice::attach(file.path(), LoopOptions::new().sector_size(4096))?;
//! assert!(lo.direct_io_active());
//! let dev = dmio::BlockDevice::open(lo.path())?;
//! assert_eq!(dev.logical_block_size(), 4096);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![allow(unsafe_code)]

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::DmIoError;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// How to attach a loop device.
#[derive(Debug, Clone, Copy)]
pub struct LoopOptions {
    direct_io: bool,
    sector_size: u32,
    read_only: bool,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions { direct_io: true, sector_size: 512, read_only: false }
    }
}

impl LoopOptions {
    /// Direct I/O on, 512-byte sectors, read-write.
    pub fn new() -> LoopOptions {
        LoopOptions::default()
    }

    /// Whether the loop device does direct I/O to its backing file (default on).
    pub fn direct_io(mut self, on: bool) -> LoopOptions {
        self.direct_io = on;
        self
    }

    /// The logical sector size: 512, 1024, 2048 or 4096 (default 512).
    pub fn sector_size(mut self, bytes: u32) -> LoopOptions {
        self.sector_size = bytes;
        self
    }

    /// Attach read-only.
    pub fn read_only(mut self, on: bool) -> LoopOptions {
        self.read_only = on;
        self
    }
}

/// An attached loop device; detached when dropped.
pub struct LoopDevice {
    path: PathBuf,
    number: u32,
    device: Option<File>,
    backing: PathBuf,
    options: LoopOptions,
}

/// Why loop devices cannot be used here, or `None` when they can (root and
/// `/dev/loop-control` present). Tests use this to skip with a reason.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("loop devices need root".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("/dev/loop-control does not exist".into());
    }
    None
}

fn loop_error(path: &Path, what: &'static str, source: io::Error) -> DmIoError {
    DmIoError::Device { path: path.to_path_buf(), what, source }
}

fn ioctl_result(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

impl LoopDevice {
    /// Attaches `backing` (a regular file) as a new loop device.
    pub fn attach(
        backing: impl AsRef<Path>,
        options: LoopOptions,
    ) -> Result<LoopDevice, DmIoError> {
        let backing = backing.as_ref();
        if ![512, 1024, 2048, 4096].contains(&options.sector_size) {
            return Err(DmIoError::Config(format!(
                "loop sector size must be 512, 1024, 2048 or 4096, not {}",
                options.sector_size
            )));
        }
        let control_path = Path::new("/dev/loop-control");
        let control =
            OpenOptions::new().read(true).write(true).open(control_path).map_err(|e| {
                match e.raw_os_error() {
                    Some(libc::EACCES) | Some(libc::EPERM) => DmIoError::PermissionDenied {
                        path: control_path.to_path_buf(),
                        read_only: false,
                    },
                    Some(libc::ENOENT) => DmIoError::NotFound { path: control_path.to_path_buf() },
                    _ => loop_error(control_path, "open", e),
                }
            })?;
        let file = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .open(backing)
            .map_err(|e| loop_error(backing, "open backing file", e))?;
        let mut flags = LO_FLAGS_AUTOCLEAR;
        if options.direct_io {
            flags |= LO_FLAGS_DIRECT_IO;
        }
        if options.read_only {
            flags |= LO_FLAGS_READ_ONLY;
        }
        // Another process may take the free device between GET_FREE and CONFIGURE:
        // then CONFIGURE says EBUSY and we ask again.
        let mut last_err = None;
        for _ in 0..64 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
            let number =
                ioctl_result(unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) })
                    .map_err(|e| loop_error(control_path, "LOOP_CTL_GET_FREE", e))?;
            let path = PathBuf::from(format!("/dev/loop{number}"));
            let device = match open_device_node(&path, options.read_only) {
                Ok(device) => device,
                Err(e) => {
                    last_err = Some(loop_error(&path, "open", e));
                    continue;
                }
            };
            let mut config = LoopConfig {
                fd: file.as_raw_fd() as u32,
                block_size: options.sector_size,
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: 0,
                    lo_sizelimit: 0,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: flags,
                    lo_file_name: [0; 64],
                    lo_crypt_name: [0; 64],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            let name = backing.as_os_str().as_encoded_bytes();
            let n = name.len().min(63);
            config.info.lo_file_name[..n].copy_from_slice(&name[..n]);
            // SAFETY: `config` is a live, fully initialised loop_config that the
            // kernel only reads during the call.
            let rc = unsafe {
                libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &config as *const LoopConfig)
            };
            match ioctl_result(rc) {
                Ok(_) => {
                    return Ok(LoopDevice {
                        path,
                        number: number as u32,
                        device: Some(device),
                        backing: backing.to_path_buf(),
                        options,
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    last_err = Some(loop_error(&path, "LOOP_CONFIGURE", e));
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(loop_error(&path, "LOOP_CONFIGURE", e)),
            }
        }
        Err(last_err.unwrap_or_else(|| DmIoError::Busy { path: control_path.to_path_buf() }))
    }

    /// The device node, `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The loop number N.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The backing file.
    pub fn backing_file(&self) -> &Path {
        &self.backing
    }

    /// The sector size the device was attached with.
    pub fn sector_size(&self) -> u32 {
        self.options.sector_size
    }

    /// Whether the kernel really does direct I/O to the backing file
    /// (`/sys/block/loopN/loop/dio`); it may refuse when the backing file's
    /// alignment does not fit the sector size.
    pub fn direct_io_active(&self) -> bool {
        std::fs::read_to_string(format!("/sys/block/loop{}/loop/dio", self.number))
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    }

    /// The block device's major:minor numbers, as in `/sys/block/loopN/dev`.
    pub fn major_minor(&self) -> Option<(u32, u32)> {
        let text = std::fs::read_to_string(format!("/sys/block/loop{}/dev", self.number)).ok()?;
        let (major, minor) = text.trim().split_once(':')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    }

    /// Detaches the device now, reporting errors (dropping detaches too, silently).
    pub fn detach(mut self) -> Result<(), DmIoError> {
        self.clear().map_err(|e| loop_error(&self.path, "LOOP_CLR_FD", e))
    }

    fn clear(&mut self) -> io::Result<()> {
        let Some(device) = self.device.take() else {
            return Ok(());
        };
        // SAFETY: LOOP_CLR_FD takes no argument.
        let rc = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CLR_FD) };
        match ioctl_result(rc) {
            // ENXIO: already detached (autoclear did it).
            Err(e) if e.raw_os_error() != Some(libc::ENXIO) => Err(e),
            _ => Ok(()),
        }
    }
}

/// Opens a loop node, waiting briefly for devtmpfs to create it.
fn open_device_node(path: &Path, read_only: bool) -> io::Result<File> {
    let mut tries = 0;
    loop {
        match OpenOptions::new().read(true).write(!read_only).open(path) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = self.clear();
    }
}

impl fmt::Debug for LoopDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopDevice")
            .field("path", &self.path)
            .field("backing", &self.backing)
            .field("options", &self.options)
            .finish()
    }
}
