//! Checks a job's regions on the caller's thread, before anything starts.

use dmio::{DmIoError, DmIoOp, DmIoRegion};

use crate::config::MAX_DESTINATIONS;
use crate::error::KcopydError;

/// Checks the destinations: 1..=8 of them, each valid for its device and
/// writable, all `expected_sectors` long, no two overlapping.
pub(crate) fn destinations(dests: &[DmIoRegion], expected_sectors: u64) -> Result<(), KcopydError> {
    if dests.is_empty() {
        return Err(KcopydError::NoDestinations);
    }
    if dests.len() > MAX_DESTINATIONS {
        return Err(KcopydError::TooManyDestinations { count: dests.len(), max: MAX_DESTINATIONS });
    }
    for (i, dest) in dests.iter().enumerate() {
        if dest.count != expected_sectors {
            return Err(KcopydError::LengthMismatch {
                dest: i,
                expected_sectors,
                found_sectors: dest.count,
            });
        }
        dest.validate(i).map_err(|source| KcopydError::InvalidDestination { dest: i, source })?;
        if dest.device.is_read_only() {
            return Err(KcopydError::InvalidDestination {
                dest: i,
                source: DmIoError::ReadOnlyDevice {
                    region: i,
                    path: dest.device.path().to_path_buf(),
                    op: DmIoOp::Write,
                },
            });
        }
    }
    for (i, a) in dests.iter().enumerate() {
        for (j, b) in dests.iter().enumerate().skip(i + 1) {
            if overlap(a, b) {
                return Err(KcopydError::DestinationsOverlap {
                    first: i,
                    second: j,
                    path: a.device.path().to_path_buf(),
                });
            }
        }
    }
    Ok(())
}

/// Checks a copy: the source is valid and no destination overlaps it.
pub(crate) fn copy(from: &DmIoRegion, dests: &[DmIoRegion]) -> Result<(), KcopydError> {
    from.validate(0).map_err(KcopydError::InvalidSource)?;
    destinations(dests, from.count)?;
    if let Some(i) = dests.iter().position(|d| overlap(from, d)) {
        return Err(KcopydError::DestinationOverlapsSource {
            dest: i,
            path: dests[i].device.path().to_path_buf(),
        });
    }
    Ok(())
}

/// Checks that every chunk boundary is aligned for every device of the job.
pub(crate) fn chunking(
    from: Option<&DmIoRegion>,
    dests: &[DmIoRegion],
    sub_job_bytes: u64,
) -> Result<(), KcopydError> {
    for region in from.into_iter().chain(dests) {
        let block_size = region.device.logical_block_size();
        if region.count > 0 && !sub_job_bytes.is_multiple_of(u64::from(block_size.max(1))) {
            return Err(KcopydError::BlockLargerThanSubJob {
                path: region.device.path().to_path_buf(),
                block_size,
                sub_job_bytes,
            });
        }
    }
    Ok(())
}

/// Whether two non-empty regions share a sector of the same device.
fn overlap(a: &DmIoRegion, b: &DmIoRegion) -> bool {
    a.count > 0
        && b.count > 0
        && a.sector < b.sector.saturating_add(b.count)
        && b.sector < a.sector.saturating_add(a.count)
        && a.device.is_same_device(&b.device)
}
