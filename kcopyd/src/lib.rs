//! # kcopyd: the dm-kcopyd analogue
//!
//! Asynchronous copying of one block-device region to up to eight others, and
//! zeroing of regions, on top of [`dmio`]. A job is split into sub-jobs of
//! 512 KiB (configurable up to 1 MiB), up to eight in flight; each reads its
//! chunk of the source into pages once and writes it to every destination with
//! one dm-io fan-out write. The job's callback runs on the client's worker
//! thread, serialized with every other callback of that client, with the
//! kernel's `read_err` and `write_err` (bit *i* = destination *i*).
//!
//! Beyond the kernel: input is validated (destination count, equal lengths,
//! overlaps, alignment) with typed errors; jobs report progress and can be
//! cancelled; outcomes carry the failing device, sector and errno; a throttled
//! I/O waits without holding up the worker.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use dmio::{BlockDevice, DmIoRegion};
//! use kcopyd::{CopyFlags, KcopydClient};
//!
//! let dir = tempfile::tempdir_in(std::env::temp_dir())?;
//! let paths: Vec<_> = (0..3).map(|i| dir.path().join(format!("dev{i}"))).collect();
//! std::fs::write(&paths[0], vec![7u8; 2 << 20])?;
//! for p in &paths[1..] {
//!     std::fs::write(p, vec![0u8; 2 << 20])?;
//! }
//! let devs: Vec<_> = paths.iter().map(BlockDevice::open).collect::<Result<_, _>>()?;
//!
//! // One source, two destinations, 2 MiB (4096 sectors), blocking.
//! let kc = KcopydClient::new()?;
//! let from = DmIoRegion::new(&devs[0], 0, 4096);
//! let dests = [DmIoRegion::new(&devs[1], 0, 4096), DmIoRegion::new(&devs[2], 0, 4096)];
//! let outcome = kc.copy_sync(&from, &dests, CopyFlags::empty())?;
//! assert!(!outcome.read_err && outcome.write_err.is_empty());
//! drop(kc);
//! assert_eq!(std::fs::read(&paths[2])?, vec![7u8; 2 << 20]);
//! # Ok(()) }
//! ```
//!
//! ## Kernel names
//!
//! | Kernel (`include/linux/dm-kcopyd.h`) | Here |
//! |---|---|
//! | `struct dm_kcopyd_client`, `dm_kcopyd_client_create(throttle)` | [`KcopydClient`], [`KcopydClient::new`] / [`with_config`](KcopydClient::with_config) / [`with_dmio`](KcopydClient::with_dmio) |
//! | `dm_kcopyd_client_destroy` | [`KcopydClient::destroy`] or drop (waits for every job) |
//! | `dm_kcopyd_client_flush` | [`KcopydClient::flush`] |
//! | `dm_kcopyd_copy(kc, from, num_dests, dests, flags, fn, context)` | [`KcopydClient::copy`] (a closure instead of `fn` + `context`) |
//! | `dm_kcopyd_zero(kc, num_dests, dests, flags, fn, context)` | [`KcopydClient::zero`] |
//! | `dm_kcopyd_notify_fn(read_err, write_err, context)` | `FnOnce(`[`JobOutcome`]`)` with [`read_err`](JobOutcome::read_err), [`write_err`](JobOutcome::write_err) |
//! | `dm_kcopyd_prepare_callback`, `dm_kcopyd_do_callback` | [`KcopydClient::prepare_callback`], [`CallbackToken::complete`] |
//! | `DM_KCOPYD_MAX_REGIONS` | [`MAX_DESTINATIONS`] (checked; the kernel trusts callers) |
//! | `DM_KCOPYD_IGNORE_ERROR`, `DM_KCOPYD_WRITE_SEQ` (bit numbers) | [`CopyFlags::IGNORE_ERROR`], [`CopyFlags::WRITE_SEQ`] (masks) |
//! | `struct dm_kcopyd_throttle`, `DECLARE_DM_KCOPYD_THROTTLE_WITH_MODULE_PARM` | [`Throttle`] (`Arc`-shared, [`set_percent`](Throttle::set_percent) at run time) |
//! | `dm_mod.kcopyd_subjob_size_kb` | [`KcopydConfig::sub_job_kb`](field@KcopydConfig::sub_job_kb) (0 → 512, clamped to 1024) |
//! | `SPLIT_COUNT` (8 sub-jobs) | [`SUB_JOBS_IN_FLIGHT`] |
//! | reserved pages (`reserve_pages`) | [`KcopydConfig::pool_sub_jobs`](field@KcopydConfig::pool_sub_jobs) (at least one sub-job) |
//! | — (`kcopyd_cancel` was never implemented) | [`JobHandle::cancel`], [`JobHandle::bytes_done`] |
//!
//! ## Decisions where this crate differs from the kernel
//!
//! - **Validation.** More than eight destinations, destinations shorter or longer
//!   than the source, a destination overlapping the source or another
//!   destination, misaligned or out-of-range regions and read-only destination
//!   devices are errors before anything starts (the kernel trusts its callers).
//! - **WRITE_SEQ** is set for a job, as in the kernel, when a destination is
//!   zoned (sysfs `queue/zoned` is not `none`). A sequential
//!   job keeps one destination write in flight, so writes reach the device in
//!   offset order, not just leave in it. After an error no later chunk is
//!   written (the kernel fails them with the inherited `write_err`).
//! - **Write-zeroes refused** (`EOPNOTSUPP`) by a device that advertised it: the
//!   job falls back to writing zeros rather than failing.
//! - **Throttle**: a waiting I/O waits in 10 ms steps, at most about a second,
//!   without blocking the worker (the kernel sleeps 100 ms at a time in it). As
//!   in the kernel, the limit is on the share of time with *any* I/O in flight,
//!   so throughput falls faster than the percentage when the gate serializes
//!   sub-jobs that would otherwise overlap; when the gate opens, every waiting
//!   I/O it admits goes at once to keep them overlapping.
//! - **Panicking callbacks** are caught and counted in
//!   [`KcopydStats::callback_panics`]; the worker goes on.
//! - **Copy offload** is not done: the data always passes through memory (no
//!   block-device copy primitive exists in userspace).
#![forbid(unsafe_code)]

mod client;
mod config;
mod error;
mod job;
mod stats;
mod throttle;
mod validate;
mod worker;

pub use client::KcopydClient;
pub use config::{
    DEFAULT_POOL_SUB_JOBS, DEFAULT_SUB_JOB_KB, KcopydConfig, MAX_DESTINATIONS, MAX_SUB_JOB_KB,
    SUB_JOBS_IN_FLIGHT,
};
pub use error::KcopydError;
pub use job::{CallbackToken, CopyFlags, JobHandle, JobOutcome};
pub use stats::KcopydStats;
pub use throttle::Throttle;

/// The dm-io layer this crate builds on, re-exported for convenience.
pub use dmio;
