//! The cache's I/O to its two devices: one blocking helper per kind of
//! request, each counting itself and turning a dm-io failure into a
//! [`CacheError::Io`] that names the device and sector.

use std::sync::Arc;

use dmio::{
    AlignedBuf, BlockDevice, DmIoClient, DmIoCompletion, DmIoError, DmIoMemory, DmIoRegion,
    DmIoRequest, ErrorBits, ReqFlags, SECTOR_SIZE, SubmitRefused,
};

use super::error::{CacheError, Device};
use crate::policy::Counters;

/// The two devices and the dm-io client that reaches them.
pub(crate) struct DevIo {
    pub(crate) dmio: Arc<DmIoClient>,
    pub(crate) ssd: Arc<BlockDevice>,
    pub(crate) disk: Arc<BlockDevice>,
}

/// What became of a write to both devices at once.
pub(crate) struct FanOut {
    /// The disk's part failed.
    pub(crate) disk: Option<CacheError>,
    /// The SSD's part failed.
    pub(crate) ssd: Option<CacheError>,
}

impl DevIo {
    fn device(&self, which: Device) -> &Arc<BlockDevice> {
        match which {
            Device::Ssd => &self.ssd,
            Device::Disk => &self.disk,
        }
    }

    pub(crate) fn error(
        &self,
        what: &'static str,
        which: Device,
        sector: u64,
        e: DmIoError,
    ) -> CacheError {
        CacheError::Io {
            what,
            device: which,
            path: self.device(which).path().to_path_buf(),
            sector,
            source: Box::new(e),
        }
    }

    /// Reads `bytes` bytes at `sector` of `which` into a new aligned buffer.
    pub(crate) fn read(
        &self,
        which: Device,
        sector: u64,
        bytes: usize,
        counters: &Counters,
    ) -> Result<AlignedBuf, CacheError> {
        Counters::bump(match which {
            Device::Ssd => &counters.ssd_reads,
            Device::Disk => &counters.disk_reads,
        });
        let region = DmIoRegion::new(self.device(which), sector, bytes as u64 / SECTOR_SIZE);
        let req = DmIoRequest::read(AlignedBuf::new(bytes));
        let memory =
            self.dmio.io_sync(req, &[region]).and_then(|done| done.into_result()).map_err(|e| {
                Counters::bump(match which {
                    Device::Ssd => &counters.ssd_read_errors,
                    Device::Disk => &counters.disk_read_errors,
                });
                self.error("reading", which, sector, e)
            })?;
        match memory {
            Some(DmIoMemory::Kmem(buf)) => Ok(buf),
            // dm-io hands back the memory it was given.
            other => {
                let mut buf = AlignedBuf::new(bytes);
                if let Some(m) = other {
                    m.copy_to_slice(0, &mut buf[..]);
                }
                Ok(buf)
            }
        }
    }

    /// Writes `data` at `sector` of `which`.
    pub(crate) fn write(
        &self,
        which: Device,
        sector: u64,
        data: DmIoMemory,
        flags: ReqFlags,
        counters: &Counters,
    ) -> Result<(), CacheError> {
        Counters::bump(match which {
            Device::Ssd => &counters.ssd_writes,
            Device::Disk => &counters.disk_writes,
        });
        let region = DmIoRegion::new(self.device(which), sector, data.len() as u64 / SECTOR_SIZE);
        let req = DmIoRequest::write(data).with_flags(flags);
        self.dmio.io_sync(req, &[region]).and_then(|done| done.into_result()).map(drop).map_err(
            |e| {
                Counters::bump(match which {
                    Device::Ssd => &counters.ssd_write_errors,
                    Device::Disk => &counters.disk_write_errors,
                });
                self.error("writing", which, sector, e)
            },
        )
    }

    /// Submits `req` for `sectors` sectors at `sector` of the SSD without
    /// waiting (its notify runs on the dm-io completion thread), counting it.
    /// A refused request comes back whole, uncounted.
    pub(crate) fn submit_ssd(
        &self,
        sector: u64,
        req: DmIoRequest,
        counters: &Counters,
    ) -> Result<(), Box<SubmitRefused>> {
        let write = req.op.is_write();
        let bytes = req.memory.as_ref().map_or(0, |m| m.len() as u64);
        let region = DmIoRegion::new(&self.ssd, sector, bytes / SECTOR_SIZE);
        self.dmio.try_submit(req, &[region])?;
        Counters::bump(if write { &counters.ssd_writes } else { &counters.ssd_reads });
        Ok(())
    }

    /// The error of a failed asynchronous SSD request, counted, or `None` when
    /// it succeeded.
    pub(crate) fn ssd_completion_error(
        &self,
        write: bool,
        sector: u64,
        done: &DmIoCompletion,
        counters: &Counters,
    ) -> Option<CacheError> {
        if done.is_ok() {
            return None;
        }
        Counters::bump(if write { &counters.ssd_write_errors } else { &counters.ssd_read_errors });
        let source = DmIoError::Regions(dmio::RegionFailures {
            error_bits: done.error_bits,
            failures: done.failures.clone(),
        });
        Some(self.error(if write { "writing" } else { "reading" }, Device::Ssd, sector, source))
    }

    /// Writes `data` to the disk at `disk_sector` and to the SSD at
    /// `ssd_sector` with one dm-io request (write-through's fan-out).
    pub(crate) fn write_both(
        &self,
        disk_sector: u64,
        ssd_sector: u64,
        data: AlignedBuf,
        flags: ReqFlags,
        counters: &Counters,
    ) -> Result<FanOut, CacheError> {
        Counters::bump(&counters.disk_writes);
        Counters::bump(&counters.ssd_writes);
        let sectors = data.len() as u64 / SECTOR_SIZE;
        let regions = [
            DmIoRegion::new(&self.disk, disk_sector, sectors),
            DmIoRegion::new(&self.ssd, ssd_sector, sectors),
        ];
        let done = self
            .dmio
            .io_sync(DmIoRequest::write(data).with_flags(flags), &regions)
            .map_err(|e| self.error("writing", Device::Disk, disk_sector, e))?;
        let bits: ErrorBits = done.error_bits;
        let part = |region: usize, which: Device, sector: u64| {
            bits.is_set(region).then(|| {
                Counters::bump(match which {
                    Device::Ssd => &counters.ssd_write_errors,
                    Device::Disk => &counters.disk_write_errors,
                });
                let failures: Vec<_> =
                    done.failures.iter().filter(|f| f.region == region).cloned().collect();
                let source = DmIoError::Regions(dmio::RegionFailures {
                    error_bits: ErrorBits::from_bits(1 << region),
                    failures,
                });
                self.error("writing", which, sector, source)
            })
        };
        Ok(FanOut {
            disk: part(0, Device::Disk, disk_sector),
            ssd: part(1, Device::Ssd, ssd_sector),
        })
    }

    /// Flushes `which`'s volatile write cache.
    pub(crate) fn flush(&self, which: Device, counters: &Counters) -> Result<(), CacheError> {
        let region = DmIoRegion::new(self.device(which), 0, 0);
        self.dmio
            .io_sync(DmIoRequest::flush(), &[region])
            .and_then(|d| d.into_result())
            .map(drop)
            .map_err(|e| {
                Counters::bump(match which {
                    Device::Ssd => &counters.ssd_write_errors,
                    Device::Disk => &counters.disk_write_errors,
                });
                self.error("flushing", which, 0, e)
            })
    }

    /// Discards `sectors` sectors at `sector` of the disk, if it supports
    /// discard (a hint: nothing happens otherwise).
    pub(crate) fn discard_disk(&self, sector: u64, sectors: u64) -> Result<(), CacheError> {
        if !self.disk.supports_discard() || sectors == 0 {
            return Ok(());
        }
        let region = DmIoRegion::new(&self.disk, sector, sectors);
        match self.dmio.io_sync(DmIoRequest::discard(), &[region]).and_then(|d| d.into_result()) {
            Ok(_) => Ok(()),
            Err(DmIoError::Regions(r)) if r.failures.iter().all(|f| f.is_not_supported()) => Ok(()),
            Err(e) => Err(self.error("discarding", Device::Disk, sector, e)),
        }
    }
}
