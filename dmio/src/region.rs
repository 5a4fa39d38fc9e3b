//! Regions: a device, a start sector and a sector count.

use std::sync::Arc;

use crate::device::{BlockDevice, SECTOR_SIZE};
use crate::error::DmIoError;

/// A range of a device in 512-byte sectors (the kernel's `struct dm_io_region`).
///
/// A region with `count == 0` is skipped by reads and writes (no I/O, its error
/// bit can never be set) unless the request flushes, in which case its device is
/// flushed.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let file = tempfile::NamedTempFile::new_in(std::env::temp_dir())?;
/// # file.as_file().set_len(1 << 20)?;
/// let dev = dmio::BlockDevice::open(file.path())?;
/// let region = dmio::DmIoRegion::new(&dev, 8, 8); // 4 KiB at byte 4096
/// assert_eq!(region.byte_offset(), 4096);
/// assert_eq!(region.byte_len(), 4096);
/// region.validate(0)?;
/// assert!(dmio::DmIoRegion::new(&dev, 2048, 8).validate(0).is_err()); // beyond the end
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct DmIoRegion {
    /// The device.
    pub device: Arc<BlockDevice>,
    /// The first sector (512-byte units).
    pub sector: u64,
    /// The number of sectors (512-byte units).
    pub count: u64,
}

impl DmIoRegion {
    /// A region of `count` sectors starting at `sector` of `device`.
    pub fn new(device: &Arc<BlockDevice>, sector: u64, count: u64) -> DmIoRegion {
        DmIoRegion { device: device.clone(), sector, count }
    }

    /// The start in bytes.
    pub fn byte_offset(&self) -> u64 {
        self.sector.saturating_mul(SECTOR_SIZE)
    }

    /// The length in bytes.
    pub fn byte_len(&self) -> u64 {
        self.count.saturating_mul(SECTOR_SIZE)
    }

    /// Checks the region against its device: the start and the count must be
    /// multiples of the logical block size and the region must lie within the
    /// device. `index` is the region's position in a request, used in errors.
    ///
    /// A zero-count region is always valid, wherever it starts: no data moves
    /// through it (the kernel ignores it, or only flushes its device).
    pub fn validate(&self, index: usize) -> Result<(), DmIoError> {
        if self.count == 0 {
            return Ok(());
        }
        let dev = &self.device;
        let lbs = dev.logical_block_size();
        let lbs_sectors = (lbs as u64 / SECTOR_SIZE).max(1);
        if !self.sector.is_multiple_of(lbs_sectors) {
            return Err(DmIoError::MisalignedSector {
                region: index,
                path: dev.path().to_path_buf(),
                sector: self.sector,
                block_size: lbs,
            });
        }
        if !self.count.is_multiple_of(lbs_sectors) {
            return Err(DmIoError::MisalignedCount {
                region: index,
                path: dev.path().to_path_buf(),
                count: self.count,
                block_size: lbs,
            });
        }
        let device_sectors = dev.size_sectors();
        let end = self.sector.checked_add(self.count);
        if end.is_none_or(|end| end > device_sectors) {
            return Err(DmIoError::OutOfRange {
                region: index,
                path: dev.path().to_path_buf(),
                sector: self.sector,
                count: self.count,
                device_sectors,
            });
        }
        Ok(())
    }
}
