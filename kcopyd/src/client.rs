//! The kcopyd client: validation on the caller's thread, work on the worker.

use std::fmt;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, unbounded};
use dmio::{DmIoClient, DmIoConfig, DmIoRegion, PAGE_SIZE, PagePool};

use crate::config::KcopydConfig;
use crate::error::KcopydError;
use crate::job::{CallbackToken, CopyFlags, JobHandle, JobOutcome, JobShared};
use crate::stats::KcopydStats;
use crate::validate;
use crate::worker::{ClientShared, JobKind, JobSpec, Msg, TokenDone, Worker, WorkerSetup};

/// A kcopyd client (the kernel's `struct dm_kcopyd_client`): copies one region to
/// up to eight and zeroes regions, asynchronously, through a [`DmIoClient`].
///
/// # Jobs
///
/// [`copy`](Self::copy) and [`zero`](Self::zero) check their input on the
/// caller's thread (a typed error, and nothing starts, when it is bad) and return
/// at once with a [`JobHandle`]. The worker splits a job into sub-jobs of
/// [`sub_job_bytes`](Self::sub_job_bytes) (512 KiB by default) and keeps up to
/// eight of them in flight: each reads its chunk of the source into pages from
/// the client's pool once, then writes it to every destination with one dm-io
/// fan-out write. Chunks finish out of order (except with
/// [`CopyFlags::WRITE_SEQ`]). When the last chunk is done, the notify callback
/// gets a [`JobOutcome`]: `read_err`, `write_err` (bit *i* = destination *i*),
/// and this crate's additions (progress, cancellation, failure detail).
///
/// After the first error, unless [`CopyFlags::IGNORE_ERROR`] is set, no new
/// chunk starts; the chunks in flight finish.
///
/// # Threads and callbacks
///
/// Every client has one worker thread. All of its callbacks (jobs and prepared
/// callbacks) run there, one at a time, never concurrently with each other: a
/// long callback delays the client's other completions, as in the kernel. A
/// callback may start new jobs (that never blocks), but must not call the
/// blocking methods ([`copy_sync`](Self::copy_sync), [`zero_sync`](Self::zero_sync),
/// [`flush`](Self::flush)) of any client, which return
/// [`KcopydError::BlockingInCallback`] there. Submitting a job or completing a [`CallbackToken`] never blocks, so
/// both may also be done from dm-io notify callbacks.
///
/// # Memory
///
/// The client owns a page pool of [`KcopydConfig::pool_sub_jobs`] sub-jobs of
/// pages, allocated when it is created. One sub-job's worth is the reserve that
/// guarantees progress: jobs wait for pages in FIFO order and never fail for
/// lack of memory. Every sub-job takes a whole sub-job's run of pages, so its
/// pages stay contiguous and each transfer is one iovec; a client that owns its
/// dm-io client ([`new`](Self::new), [`with_config`](Self::with_config)) uses
/// that client's registered pool, so transfers use the fixed-buffer opcodes and
/// pin no pages. Zeroing needs no pages (it writes one shared zero area, or
/// uses write-zeroes when every destination supports it).
///
/// # Shutdown
///
/// [`destroy`](Self::destroy), or dropping the client, waits until every job and
/// every prepared callback has run its callback. There is no forced cancel of
/// in-flight I/O; cancel jobs with [`JobHandle::cancel`] first for a quick exit.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use dmio::{BlockDevice, DmIoRegion};
/// use kcopyd::{CopyFlags, KcopydClient};
///
/// let dir = tempfile::tempdir_in(std::env::temp_dir())?;
/// let (src_path, dst_path) = (dir.path().join("src"), dir.path().join("dst"));
/// std::fs::write(&src_path, vec![0x5a; 4 << 20])?;
/// std::fs::write(&dst_path, vec![0; 4 << 20])?;
/// let src = BlockDevice::open(&src_path)?;
/// let dst = BlockDevice::open(&dst_path)?;
///
/// let kc = KcopydClient::new()?;
/// // Copy the first 2 MiB of src to dst at 1 MiB, asynchronously.
/// let (tx, rx) = std::sync::mpsc::channel();
/// let job = kc.copy(
///     &DmIoRegion::new(&src, 0, 4096),
///     &[DmIoRegion::new(&dst, 2048, 4096)],
///     CopyFlags::empty(),
///     move |outcome| tx.send(outcome).unwrap(),
/// )?;
/// let outcome = rx.recv()?;
/// assert!(outcome.is_ok(), "{outcome:?}");
/// assert_eq!(job.bytes_done(), 2 << 20);
///
/// // Zero the first MiB, blocking.
/// kc.zero_sync(&[DmIoRegion::new(&dst, 0, 2048)], CopyFlags::empty())?.into_result()?;
/// drop(kc);
/// let data = std::fs::read(&dst_path)?;
/// assert!(data[..1 << 20].iter().all(|&b| b == 0));
/// assert!(data[1 << 20..3 << 20].iter().all(|&b| b == 0x5a));
/// # Ok(()) }
/// ```
pub struct KcopydClient {
    shared: Arc<ClientShared>,
    dmio: Arc<DmIoClient>,
    pool: PagePool,
    sub_job_bytes: u64,
    worker: Option<JoinHandle<()>>,
}

impl KcopydClient {
    /// A client with the default configuration and its own dm-io client.
    pub fn new() -> Result<KcopydClient, KcopydError> {
        KcopydClient::with_config(KcopydConfig::default())
    }

    /// A client with its own dm-io client.
    ///
    /// The dm-io client's page pool becomes the kcopyd pool, so it is registered
    /// with the ring and every sub-job's transfer uses the fixed-buffer opcodes
    /// (no page pinning per I/O).
    pub fn with_config(config: KcopydConfig) -> Result<KcopydClient, KcopydError> {
        let sub_job_bytes = config.validate()?;
        let dmio_config = DmIoConfig {
            pool_pages: pool_pages(sub_job_bytes, &config),
            pool_extra_pages: 0,
            ..DmIoConfig::default()
        };
        let dmio = DmIoClient::with_config(dmio_config).map_err(KcopydError::DmIo)?;
        let pool = dmio.page_pool().clone();
        KcopydClient::build(Arc::new(dmio), pool, sub_job_bytes, config)
    }

    /// A client issuing its I/O through `dmio`, which it may share with others.
    /// The client allocates its own page pool (not registered with the ring).
    pub fn with_dmio(
        dmio: Arc<DmIoClient>,
        config: KcopydConfig,
    ) -> Result<KcopydClient, KcopydError> {
        let sub_job_bytes = config.validate()?;
        let pool = PagePool::new(pool_pages(sub_job_bytes, &config), 0).map_err(|e| {
            KcopydError::DmIo(dmio::DmIoError::Io { what: "allocating the page pool", source: e })
        })?;
        KcopydClient::build(dmio, pool, sub_job_bytes, config)
    }

    fn build(
        dmio: Arc<DmIoClient>,
        pool: PagePool,
        sub_job_bytes: u64,
        config: KcopydConfig,
    ) -> Result<KcopydClient, KcopydError> {
        let (tx, rx) = unbounded();
        let shared = ClientShared::new(tx);
        let worker = Worker::new(WorkerSetup {
            shared: shared.clone(),
            rx,
            dmio: dmio.clone(),
            pool: pool.clone(),
            throttle: config.throttle.clone(),
            ioprio: config.ioprio,
            sub_job_bytes,
        });
        let handle = std::thread::Builder::new()
            .name("kcopyd".to_string())
            .spawn(move || worker.run())
            .map_err(KcopydError::Thread)?;
        Ok(KcopydClient { shared, dmio, pool, sub_job_bytes, worker: Some(handle) })
    }

    /// The dm-io client this client issues its I/O through.
    pub fn dmio(&self) -> &Arc<DmIoClient> {
        &self.dmio
    }

    /// The sub-job (chunk) size in bytes, after the configuration's rules.
    pub fn sub_job_bytes(&self) -> u64 {
        self.sub_job_bytes
    }

    /// The client's page pool (its size is the configured number of sub-jobs).
    pub fn page_pool(&self) -> &PagePool {
        &self.pool
    }

    /// Copies `from` to every region of `dests` (`dm_kcopyd_copy`).
    ///
    /// `dests` names 1 to [`MAX_DESTINATIONS`](crate::MAX_DESTINATIONS) regions,
    /// each exactly as long as `from`, on writable devices, none overlapping
    /// `from` or each other. A zero-length job makes no I/O; its callback still
    /// runs on the worker. `notify` runs once, on the worker, when the job ends.
    pub fn copy(
        &self,
        from: &DmIoRegion,
        dests: &[DmIoRegion],
        flags: CopyFlags,
        notify: impl FnOnce(JobOutcome) + Send + 'static,
    ) -> Result<JobHandle, KcopydError> {
        validate::copy(from, dests)?;
        validate::chunking(Some(from), dests, self.sub_job_bytes)?;
        self.start(JobKind::Copy(from.clone()), dests, flags, from.byte_len(), Box::new(notify))
    }

    /// Zeroes every region of `dests` (`dm_kcopyd_zero`).
    ///
    /// `dests` names 1 to [`MAX_DESTINATIONS`](crate::MAX_DESTINATIONS) regions of
    /// the same length on writable devices, not overlapping each other. When
    /// every destination supports write-zeroes, that operation is used; otherwise
    /// every destination gets plain writes of a shared zero area. No pages are
    /// taken from the pool.
    pub fn zero(
        &self,
        dests: &[DmIoRegion],
        flags: CopyFlags,
        notify: impl FnOnce(JobOutcome) + Send + 'static,
    ) -> Result<JobHandle, KcopydError> {
        let expected = dests.first().map_or(0, |d| d.count);
        validate::destinations(dests, expected)?;
        validate::chunking(None, dests, self.sub_job_bytes)?;
        let bytes = dests[0].byte_len();
        self.start(JobKind::Zero, dests, flags, bytes, Box::new(notify))
    }

    /// [`copy`](Self::copy), waiting for the outcome. I/O errors are in the
    /// outcome (see [`JobOutcome::into_result`]); `Err` means the job did not start.
    pub fn copy_sync(
        &self,
        from: &DmIoRegion,
        dests: &[DmIoRegion],
        flags: CopyFlags,
    ) -> Result<JobOutcome, KcopydError> {
        self.check_may_block()?;
        let (tx, rx) = bounded(1);
        self.copy(from, dests, flags, move |outcome| {
            let _ = tx.send(outcome);
        })?;
        rx.recv().map_err(|_| KcopydError::ClientClosed)
    }

    /// [`zero`](Self::zero), waiting for the outcome.
    pub fn zero_sync(
        &self,
        dests: &[DmIoRegion],
        flags: CopyFlags,
    ) -> Result<JobOutcome, KcopydError> {
        self.check_may_block()?;
        let (tx, rx) = bounded(1);
        self.zero(dests, flags, move |outcome| {
            let _ = tx.send(outcome);
        })?;
        rx.recv().map_err(|_| KcopydError::ClientClosed)
    }

    /// Prepares a callback to be completed later, from any thread, into this
    /// client's serialized callback stream (`dm_kcopyd_prepare_callback`). The
    /// client counts it as a job until its callback has run.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let kc = kcopyd::KcopydClient::new()?;
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// let token = kc.prepare_callback(move |outcome| tx.send(outcome.write_err).unwrap())?;
    /// std::thread::spawn(move || token.complete(false, dmio::ErrorBits::from_bits(0b10)));
    /// assert_eq!(rx.recv()?.bits(), 0b10);
    /// # Ok(()) }
    /// ```
    pub fn prepare_callback(
        &self,
        notify: impl FnOnce(JobOutcome) + Send + 'static,
    ) -> Result<CallbackToken, KcopydError> {
        if !self.shared.begin_job() {
            return Err(KcopydError::ClientClosed);
        }
        Ok(CallbackToken {
            done: Some(TokenDone { notify: Box::new(notify), outcome: JobOutcome::default() }),
            notifier: self.shared.notifier.clone(),
        })
    }

    /// Waits until every job submitted and every I/O completion received before
    /// this call has been processed by the worker, and the callbacks due have run
    /// (`dm_kcopyd_client_flush`). It does not wait for I/O still in flight.
    pub fn flush(&self) -> Result<(), KcopydError> {
        self.check_may_block()?;
        let (tx, rx) = bounded(1);
        self.shared.notifier.send(Msg::Flush(tx));
        rx.recv().map_err(|_| KcopydError::ClientClosed)
    }

    /// Jobs and prepared callbacks whose callback has not returned yet. A job
    /// counts until its callback returns, so right after [`copy_sync`](Self::copy_sync)
    /// or [`zero_sync`](Self::zero_sync) (whose internal callback hands the
    /// outcome over, then returns) it may still count for a moment;
    /// [`flush`](Self::flush) waits until it does not.
    pub fn jobs_in_flight(&self) -> usize {
        self.shared.jobs_in_flight()
    }

    /// The client's counters.
    pub fn stats(&self) -> KcopydStats {
        self.shared.counters.snapshot()
    }

    /// Waits for every job and prepared callback, then stops the worker
    /// (`dm_kcopyd_client_destroy`). Dropping the client does the same.
    ///
    /// Inside one of this client's callbacks, or inside a dm-io notify callback,
    /// it cannot wait (the jobs need that very thread to finish): there it only
    /// refuses new jobs, and the worker exits once the remaining jobs are done.
    pub fn destroy(self) {
        drop(self);
    }

    fn check_may_block(&self) -> Result<(), KcopydError> {
        if crate::worker::in_kcopyd_callback() || dmio::in_notify_callback() {
            return Err(KcopydError::BlockingInCallback);
        }
        Ok(())
    }

    fn start(
        &self,
        kind: JobKind,
        dests: &[DmIoRegion],
        flags: CopyFlags,
        total_bytes: u64,
        notify: Box<dyn FnOnce(JobOutcome) + Send>,
    ) -> Result<JobHandle, KcopydError> {
        if !self.shared.begin_job() {
            return Err(KcopydError::ClientClosed);
        }
        // A zoned destination must be written sequentially: the kernel sets
        // WRITE_SEQ itself when one is (`bdev_is_zoned`), and so does this.
        let flags = if dests.iter().any(|d| d.device.is_zoned()) {
            flags | CopyFlags::WRITE_SEQ
        } else {
            flags
        };
        let job = JobShared::new(total_bytes);
        let handle = JobHandle { shared: job.clone(), notifier: self.shared.notifier.clone() };
        self.shared.notifier.send(Msg::Job(Box::new(JobSpec {
            kind,
            dests: dests.to_vec(),
            flags,
            notify,
            shared: job,
        })));
        Ok(handle)
    }
}

/// The pool size in pages. Every page lives in one arena allocated up front: the
/// reserve of one sub-job is part of it, and no page is allocated per sub-job.
fn pool_pages(sub_job_bytes: u64, config: &KcopydConfig) -> usize {
    (sub_job_bytes as usize).div_ceil(PAGE_SIZE) * config.pool_sub_jobs
}

impl Drop for KcopydClient {
    fn drop(&mut self) {
        self.shared.close();
        if self.shared.on_worker() || dmio::in_notify_callback() {
            // Dropped by one of our own callbacks, or in a dm-io callback whose
            // thread has to deliver our remaining completions: waiting here would
            // wait for ourselves. The worker finishes the remaining jobs and exits
            // on its own.
            self.shared.notifier.send(Msg::Shutdown);
            return;
        }
        self.shared.wait_all_done();
        self.shared.notifier.send(Msg::Shutdown);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl fmt::Debug for KcopydClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KcopydClient")
            .field("sub_job_bytes", &self.sub_job_bytes)
            .field("jobs_in_flight", &self.jobs_in_flight())
            .field("pool", &self.pool)
            .field("dmio", &self.dmio)
            .finish()
    }
}
