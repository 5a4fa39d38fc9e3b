//! Client configuration and the kernel's constants.

use std::sync::Arc;

use dmio::IoPriority;

use crate::error::KcopydError;
use crate::throttle::Throttle;

/// The most destinations one job may name (the kernel's `DM_KCOPYD_MAX_REGIONS`).
pub const MAX_DESTINATIONS: usize = 8;

/// The default sub-job size in KiB (the kernel's `kcopyd_subjob_size_kb` default).
pub const DEFAULT_SUB_JOB_KB: u32 = 512;

/// The largest sub-job size in KiB; larger settings are clamped to it.
pub const MAX_SUB_JOB_KB: u32 = 1024;

/// How many sub-jobs of one job are in flight at most (the kernel's `SPLIT_COUNT`).
pub const SUB_JOBS_IN_FLIGHT: usize = 8;

/// The default size of a client's page pool, in sub-jobs: two jobs' worth of
/// sub-jobs in flight.
pub const DEFAULT_POOL_SUB_JOBS: usize = 2 * SUB_JOBS_IN_FLIGHT;

/// How a [`KcopydClient`](crate::KcopydClient) is set up.
///
/// ```
/// use kcopyd::{KcopydConfig, Throttle};
/// let config = KcopydConfig::new()
///     .sub_job_kb(1024)
///     .pool_sub_jobs(4)
///     .throttle(Throttle::new(50).unwrap());
/// assert_eq!(config.sub_job_kb, 1024);
/// ```
#[derive(Clone, Debug)]
pub struct KcopydConfig {
    /// The sub-job size in KiB: 0 means [`DEFAULT_SUB_JOB_KB`]; values above
    /// [`MAX_SUB_JOB_KB`] are clamped to it; otherwise it must be a multiple of 4
    /// (whole pages, so that every chunk stays aligned for 4 KiB-sector devices).
    /// Sampled once, when the client is created, as the kernel does.
    pub sub_job_kb: u32,
    /// A throttle, possibly shared with other clients; `None` runs at full speed.
    pub throttle: Option<Arc<Throttle>>,
    /// The size of the client's page pool in sub-jobs (at least 1). One sub-job's
    /// worth of pages is the reserve that guarantees progress; with 1 the client
    /// runs on the reserve alone, one copy sub-job at a time.
    pub pool_sub_jobs: usize,
    /// The I/O priority of every request the client issues.
    pub ioprio: IoPriority,
}

impl Default for KcopydConfig {
    fn default() -> Self {
        KcopydConfig {
            sub_job_kb: DEFAULT_SUB_JOB_KB,
            throttle: None,
            pool_sub_jobs: DEFAULT_POOL_SUB_JOBS,
            ioprio: IoPriority::DEFAULT,
        }
    }
}

impl KcopydConfig {
    /// The default configuration.
    pub fn new() -> KcopydConfig {
        KcopydConfig::default()
    }

    /// Sets the sub-job size in KiB (see [`KcopydConfig::sub_job_kb`](field@KcopydConfig::sub_job_kb)).
    pub fn sub_job_kb(mut self, kb: u32) -> KcopydConfig {
        self.sub_job_kb = kb;
        self
    }

    /// Sets a throttle.
    pub fn throttle(mut self, throttle: Arc<Throttle>) -> KcopydConfig {
        self.throttle = Some(throttle);
        self
    }

    /// Sets the page pool size in sub-jobs.
    pub fn pool_sub_jobs(mut self, sub_jobs: usize) -> KcopydConfig {
        self.pool_sub_jobs = sub_jobs;
        self
    }

    /// Sets the I/O priority.
    pub fn ioprio(mut self, ioprio: IoPriority) -> KcopydConfig {
        self.ioprio = ioprio;
        self
    }

    /// The sub-job size in bytes after the kernel's rules (0 → default, clamped
    /// to the maximum), or an error for a size that is not whole pages.
    ///
    /// ```
    /// use kcopyd::KcopydConfig;
    /// assert_eq!(KcopydConfig::new().sub_job_kb(0).sub_job_bytes().unwrap(), 512 << 10);
    /// assert_eq!(KcopydConfig::new().sub_job_kb(4096).sub_job_bytes().unwrap(), 1 << 20);
    /// assert!(KcopydConfig::new().sub_job_kb(6).sub_job_bytes().is_err());
    /// ```
    pub fn sub_job_bytes(&self) -> Result<u64, KcopydError> {
        let kb = match self.sub_job_kb {
            0 => DEFAULT_SUB_JOB_KB,
            kb if kb > MAX_SUB_JOB_KB => MAX_SUB_JOB_KB,
            kb => kb,
        };
        if !kb.is_multiple_of(4) {
            return Err(KcopydError::Config(format!(
                "sub_job_kb = {kb} is not a multiple of 4 KiB (one page)"
            )));
        }
        Ok(u64::from(kb) << 10)
    }

    /// Checks every field; returns the sub-job size in bytes.
    pub(crate) fn validate(&self) -> Result<u64, KcopydError> {
        let bytes = self.sub_job_bytes()?;
        if self.pool_sub_jobs == 0 {
            return Err(KcopydError::Config(
                "pool_sub_jobs must be at least 1 (the reserve of one sub-job)".to_string(),
            ));
        }
        if self.pool_sub_jobs > 4096 {
            return Err(KcopydError::Config(format!(
                "pool_sub_jobs = {} is more than 4096 sub-jobs of pages",
                self.pool_sub_jobs
            )));
        }
        Ok(bytes)
    }
}
