//! The dm-io client: a reserve of request slots, a page pool, an engine and the
//! completion thread that drives it.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};

use crate::device::{BlockDevice, SECTOR_SIZE};
use crate::dispatch::{self, RequestSlot};
use crate::engine::{EngineChoice, EngineKind, EngineWaker};
use crate::error::{DmIoError, Errno, ErrorBits, MAX_REGIONS, RegionFailure};
use crate::memory::{DmIoMemory, PagePool};
use crate::notify::{DmIoCompletion, DmIoFuture, FutureShared, Notify, Waiter};
use crate::region::DmIoRegion;
use crate::request::{DmIoOp, DmIoRequest, ReqFlags};

/// How a [`DmIoClient`] is built. Every field has a sensible default.
///
/// ```
/// let config = dmio::DmIoConfig { reserve: 32, ..Default::default() };
/// assert_eq!(config.ring_entries, 256);
/// ```
#[derive(Debug, Clone)]
pub struct DmIoConfig {
    /// Request slots (the kernel's reserve of `struct io`): at most this many
    /// requests are in flight; further submissions wait for a slot. Default 64.
    pub reserve: usize,
    /// Which engine to use. Default [`EngineChoice::Auto`].
    pub engine: EngineChoice,
    /// Entries of the io_uring submission queue, and the number of operations
    /// (SQEs) in flight at once with either engine. A power of two, 8 to 32768.
    /// Default 256.
    pub ring_entries: u32,
    /// The largest read or write one operation carries (further capped by each
    /// device's largest I/O). A multiple of 4096. Default 1 MiB.
    pub max_op_bytes: u64,
    /// The size of each operation's iovec array: a region whose memory has more
    /// segments is split further. 1 to 1024 (`IOV_MAX`). Default 256.
    pub iovecs_per_op: usize,
    /// Pages in the client's page pool reserve (one arena, registered with the
    /// ring for fixed-buffer I/O). Default 256 (1 MiB).
    pub pool_pages: usize,
    /// Extra heap pages the pool may hand out beyond its reserve. Default 65536.
    pub pool_extra_pages: usize,
    /// Register the page pool with the ring (falls back quietly when refused).
    /// Default true.
    pub register_pool: bool,
    /// Worker threads of the sync engine. Default 8.
    pub sync_threads: usize,
    /// Serve simple blocking requests on the caller's thread: an
    /// [`io_sync`](DmIoClient::io_sync) read or write of one region from or into
    /// one contiguous buffer ([`DmIoMemory::Kmem`](crate::DmIoMemory::Kmem)),
    /// without flags other than `SYNC`/`META`, that needs no splitting, to a
    /// device without fault rules, runs as `pread`/`pwrite` right there,
    /// saving the two thread switches of a trip through the completion thread.
    /// Semantics are the same (retries, short transfers, error bits, zero-filled
    /// failed reads). Default true; `DMIO_INLINE_SYNC=0` turns it off.
    pub inline_sync: bool,
}

impl Default for DmIoConfig {
    fn default() -> Self {
        DmIoConfig {
            reserve: 64,
            engine: EngineChoice::Auto,
            ring_entries: 256,
            max_op_bytes: 1 << 20,
            iovecs_per_op: 256,
            pool_pages: 256,
            pool_extra_pages: 65536,
            register_pool: true,
            sync_threads: 8,
            inline_sync: true,
        }
    }
}

impl DmIoConfig {
    fn validate(&self) -> Result<(), DmIoError> {
        let bad = |msg: String| Err(DmIoError::Config(msg));
        if self.reserve == 0 || self.reserve > 65536 {
            return bad(format!("reserve must be 1 to 65536 request slots, not {}", self.reserve));
        }
        if !self.ring_entries.is_power_of_two() || !(8..=32768).contains(&self.ring_entries) {
            return bad(format!(
                "ring_entries must be a power of two from 8 to 32768, not {}",
                self.ring_entries
            ));
        }
        if self.max_op_bytes < 4096
            || !self.max_op_bytes.is_multiple_of(4096)
            || self.max_op_bytes > 1 << 30
        {
            return bad(format!(
                "max_op_bytes must be a multiple of 4096 from 4 KiB to 1 GiB, not {}",
                self.max_op_bytes
            ));
        }
        if self.iovecs_per_op == 0 || self.iovecs_per_op > 1024 {
            return bad(format!("iovecs_per_op must be 1 to 1024, not {}", self.iovecs_per_op));
        }
        if self.sync_threads == 0 || self.sync_threads > 1024 {
            return bad(format!("sync_threads must be 1 to 1024, not {}", self.sync_threads));
        }
        Ok(())
    }
}

/// Counters of a client's activity, readable at any time.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub ops: AtomicU64,
    pub retries: AtomicU64,
    pub short_transfers: AtomicU64,
    pub fixed_buffer_ops: AtomicU64,
    pub submit_calls: AtomicU64,
    pub callback_panics: AtomicU64,
    /// The inline blocking path's own counts (the completion thread publishes
    /// its tally by overwriting the fields above).
    pub inline_requests: AtomicU64,
    pub inline_ops: AtomicU64,
    pub inline_retries: AtomicU64,
    pub inline_short_transfers: AtomicU64,
}

/// A snapshot of a client's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientStats {
    /// Requests completed.
    pub requests: u64,
    /// Operations (SQEs or system calls) issued, including resubmissions.
    pub ops: u64,
    /// Operations reissued after EINTR, EAGAIN or EBUSY.
    pub retries: u64,
    /// Short transfers whose remainder was resubmitted.
    pub short_transfers: u64,
    /// Operations that used a registered (fixed) buffer.
    pub fixed_buffer_ops: u64,
    /// Calls into the engine to submit or wait (`io_uring_enter` for io_uring).
    pub submit_calls: u64,
    /// Notify callbacks that panicked (the panic is caught and reported on stderr).
    pub callback_panics: u64,
}

impl ClientStats {
    /// The counts since an `earlier` snapshot of the same client.
    ///
    /// ```
    /// let before = dmio::ClientStats { requests: 10, ops: 12, ..Default::default() };
    /// let after = dmio::ClientStats { requests: 15, ops: 20, ..Default::default() };
    /// assert_eq!(after.since(&before).requests, 5);
    /// ```
    pub fn since(&self, earlier: &ClientStats) -> ClientStats {
        ClientStats {
            requests: self.requests.saturating_sub(earlier.requests),
            ops: self.ops.saturating_sub(earlier.ops),
            retries: self.retries.saturating_sub(earlier.retries),
            short_transfers: self.short_transfers.saturating_sub(earlier.short_transfers),
            fixed_buffer_ops: self.fixed_buffer_ops.saturating_sub(earlier.fixed_buffer_ops),
            submit_calls: self.submit_calls.saturating_sub(earlier.submit_calls),
            callback_panics: self.callback_panics.saturating_sub(earlier.callback_panics),
        }
    }
}

/// State shared between the client handle, submitting threads and the
/// completion thread.
pub(crate) struct Shared {
    pub free_tx: Sender<Box<RequestSlot>>,
    pub free_rx: Receiver<Box<RequestSlot>>,
    pub inbox_tx: Sender<Box<RequestSlot>>,
    /// Set by the completion thread once its engine exists.
    pub waker: OnceLock<Arc<dyn EngineWaker>>,
    /// Set by the completion thread before it blocks; a submitter that clears it
    /// wakes the thread.
    pub sleeping: AtomicBool,
    pub closed: AtomicBool,
    /// False once the completion thread has exited.
    pub alive: AtomicBool,
    pub reserve: usize,
    pub counters: Counters,
}

impl Shared {
    /// Wakes the completion thread.
    pub(crate) fn wake(&self) {
        if let Some(waker) = self.waker.get() {
            waker.wake();
        }
    }
}

thread_local! {
    /// The `Shared` (as an address) whose completion thread this is, or 0.
    static COMPLETION_THREAD_OF: Cell<usize> = const { Cell::new(0) };
}

/// Whether the calling thread is a dm-io completion thread, that is, whether this
/// code runs inside a notify callback (of any client).
///
/// Layers built on dm-io use it to refuse blocking calls there: a callback that
/// waits for I/O would wait for the very thread it runs on.
///
/// ```
/// assert!(!dmio::in_notify_callback());
/// ```
pub fn in_notify_callback() -> bool {
    COMPLETION_THREAD_OF.with(|c| c.get() != 0)
}

pub(crate) fn mark_completion_thread(shared: &Arc<Shared>) {
    COMPLETION_THREAD_OF.with(|c| c.set(Arc::as_ptr(shared) as usize));
}

/// A dm-io client (the kernel's `struct dm_io_client`): submit requests to it
/// from any thread.
///
/// A client owns a reserve of request slots (and their iovec arrays), a
/// [`PagePool`], an engine (io_uring or worker threads) and a completion thread
/// that submits operations, reaps their completions and runs notify callbacks.
/// When every slot is busy, submission waits for one: it never allocates and
/// never fails for lack of resources. Dropping the client (or [`close`](Self::close))
/// waits for every submitted request to complete.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use dmio::{AlignedBuf, BlockDevice, DmIoClient, DmIoRegion, DmIoRequest};
/// let file = tempfile::NamedTempFile::new_in(std::env::temp_dir())?;
/// file.as_file().set_len(1 << 20)?;
/// let dev = BlockDevice::open(file.path())?;
/// let client = DmIoClient::new()?;
///
/// // Write 8 KiB at sector 16, blocking.
/// let data = AlignedBuf::from_slice(&[0x5a; 8192]);
/// let done = client.io_sync(DmIoRequest::write(data), &[DmIoRegion::new(&dev, 16, 16)])?;
/// assert!(done.is_ok());
///
/// // Read it back asynchronously, with a callback.
/// let (tx, rx) = std::sync::mpsc::channel();
/// let req = DmIoRequest::read(AlignedBuf::new(8192)).on_complete(move |done| {
///     tx.send(done).unwrap();
/// });
/// client.submit(req, &[DmIoRegion::new(&dev, 16, 16)])?;
/// let done = rx.recv()?;
/// assert_eq!(done.error_bits.bits(), 0);
/// assert!(done.memory.unwrap().to_vec().iter().all(|&b| b == 0x5a));
/// # Ok(()) }
/// ```
pub struct DmIoClient {
    shared: Arc<Shared>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
    pool: PagePool,
    engine: EngineKind,
    engine_note: Option<String>,
    max_op_bytes: u64,
    inline_sync: bool,
}

impl DmIoClient {
    /// A client with the default configuration.
    pub fn new() -> Result<DmIoClient, DmIoError> {
        Self::with_config(DmIoConfig::default())
    }

    /// A client with `config`.
    pub fn with_config(config: DmIoConfig) -> Result<DmIoClient, DmIoError> {
        config.validate()?;
        let choice = match std::env::var("DMIO_ENGINE").ok().as_deref().map(str::trim) {
            Some("sync") => EngineChoice::Sync,
            Some("uring") | Some("io_uring") => EngineChoice::Uring,
            _ => config.engine,
        };
        let pool = PagePool::new(config.pool_pages, config.pool_extra_pages)
            .map_err(|source| DmIoError::Io { what: "creating the page pool", source })?;
        let (free_tx, free_rx) = bounded(config.reserve);
        for id in 0..config.reserve {
            let _ = free_tx.try_send(Box::new(RequestSlot::new(id as u32)));
        }
        let max_op_bytes = config.max_op_bytes;
        let inline_sync = config.inline_sync
            && std::env::var("DMIO_INLINE_SYNC").map_or(true, |v| v.trim() != "0");
        let (inbox_tx, inbox_rx) = bounded(config.reserve);
        let shared = Arc::new(Shared {
            free_tx,
            free_rx,
            inbox_tx,
            waker: OnceLock::new(),
            sleeping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            alive: AtomicBool::new(true),
            reserve: config.reserve,
            counters: Counters::default(),
        });
        let (ready_tx, ready_rx) = bounded(1);
        let thread_pool = pool.clone();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("dmio-completion".into())
            .spawn(move || {
                dispatch::run(choice, config, thread_pool, inbox_rx, thread_shared, ready_tx)
            })
            .map_err(|source| DmIoError::Io { what: "spawning the completion thread", source })?;
        let (engine, engine_note) = match ready_rx.recv() {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(DmIoError::EngineSetup {
                    engine: "dmio",
                    reason: "the completion thread exited during setup".into(),
                });
            }
        };
        Ok(DmIoClient {
            shared,
            thread: std::sync::Mutex::new(Some(thread)),
            pool,
            engine,
            engine_note,
            max_op_bytes,
            inline_sync,
        })
    }

    /// The engine in use.
    pub fn engine(&self) -> EngineKind {
        self.engine
    }

    /// Why the engine is not io_uring, when [`EngineChoice::Auto`] fell back to
    /// the sync engine (the same line was printed on standard error).
    pub fn engine_fallback_reason(&self) -> Option<&str> {
        self.engine_note.as_deref()
    }

    /// The client's page pool (its reserve is registered with the ring: pages
    /// and [`PagePool::buffer`] buffers from it use the fixed-buffer opcodes).
    pub fn page_pool(&self) -> &PagePool {
        &self.pool
    }

    /// The number of request slots.
    pub fn reserve(&self) -> usize {
        self.shared.reserve
    }

    /// A snapshot of the client's counters.
    pub fn stats(&self) -> ClientStats {
        let c = &self.shared.counters;
        ClientStats {
            requests: c.requests.load(Ordering::Relaxed)
                + c.inline_requests.load(Ordering::Relaxed),
            ops: c.ops.load(Ordering::Relaxed) + c.inline_ops.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed) + c.inline_retries.load(Ordering::Relaxed),
            short_transfers: c.short_transfers.load(Ordering::Relaxed)
                + c.inline_short_transfers.load(Ordering::Relaxed),
            fixed_buffer_ops: c.fixed_buffer_ops.load(Ordering::Relaxed),
            submit_calls: c.submit_calls.load(Ordering::Relaxed),
            callback_panics: c.callback_panics.load(Ordering::Relaxed),
        }
    }

    /// Submits an asynchronous request (`dm_io()` with `notify.fn` set).
    ///
    /// The request is checked first: on bad input an error names the region and
    /// the reason, nothing is submitted and the notify callback is not called (as
    /// in current kernels). Otherwise the callback runs exactly once, on the
    /// completion thread, with the error bits and the memory.
    ///
    /// Waits for a free request slot when all are busy, except when called from a
    /// notify callback, where it returns [`DmIoError::NoSlotInCallback`] instead.
    pub fn submit(&self, mut req: DmIoRequest, regions: &[DmIoRegion]) -> Result<(), DmIoError> {
        let notify = req.notify.take().ok_or(DmIoError::MissingNotify)?;
        self.dispatch(req, notify, regions)
    }

    /// Runs a request and waits for it (`dm_io()` without `notify.fn`).
    ///
    /// Returns the completion (error bits, failures and memory); use
    /// [`DmIoCompletion::into_result`] to turn failed regions into an error. Bad
    /// input is an `Err` before anything is submitted. Must not be called from a
    /// notify callback ([`DmIoError::BlockingInCallback`]). Adds [`ReqFlags::SYNC`]
    /// as the kernel does. Any notify in the request is ignored.
    pub fn io_sync(
        &self,
        mut req: DmIoRequest,
        regions: &[DmIoRegion],
    ) -> Result<DmIoCompletion, DmIoError> {
        if self.on_completion_thread() {
            return Err(DmIoError::BlockingInCallback);
        }
        req.notify = None;
        req.flags |= ReqFlags::SYNC;
        if let [region] = regions
            && self.inline_eligible(&req, region)
        {
            validate(&req, regions, self.max_op_bytes)?;
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(DmIoError::ClientClosed);
            }
            return Ok(self.io_inline(req, region));
        }
        let waiter = Waiter::for_this_thread();
        self.dispatch(req, Notify::waiter(waiter.clone()), regions)?;
        Ok(waiter.wait())
    }

    /// Whether a blocking request can run on the caller's thread (see
    /// [`DmIoConfig::inline_sync`]).
    fn inline_eligible(&self, req: &DmIoRequest, region: &DmIoRegion) -> bool {
        let dev = &region.device;
        let bytes = region.byte_len();
        self.inline_sync
            && matches!(req.op, DmIoOp::Read | DmIoOp::Write)
            && (req.flags - (ReqFlags::SYNC | ReqFlags::META)).is_empty()
            && matches!(&req.memory, Some(crate::DmIoMemory::Kmem(buf)) if buf.len() as u64 == bytes)
            && bytes > 0
            && bytes <= self.max_op_bytes.min(dev.info().max_io_bytes)
            && !faults_active(dev)
    }

    /// Runs an eligible blocking request with `pread`/`pwrite` on this thread,
    /// with the completion thread's semantics: EINTR/EAGAIN/EBUSY retried, short
    /// transfers resumed from the last block boundary, a failure reported with
    /// its errno and sector, a failed read zero-filled.
    fn io_inline(&self, mut req: DmIoRequest, region: &DmIoRegion) -> DmIoCompletion {
        use std::os::unix::fs::FileExt;
        let Some(crate::DmIoMemory::Kmem(mut buf)) = req.memory.take() else {
            // `inline_eligible` checked the memory; nothing else reaches here.
            return DmIoCompletion {
                error_bits: ErrorBits::NONE,
                failures: Vec::new(),
                memory: None,
            };
        };
        let dev = &region.device;
        let file = dev.file();
        let offset = region.byte_offset();
        let len = buf.len() as u64;
        let block = u64::from(dev.logical_block_size()).max(1);
        let (mut done, mut ops, mut retries, mut shorts) = (0u64, 0u64, 0u64, 0u64);
        let outcome: Result<(), i32> = loop {
            if done >= len {
                break Ok(());
            }
            ops += 1;
            let at = done as usize;
            let result = match req.op {
                DmIoOp::Read => file.read_at(&mut buf[at..], offset + done),
                _ => file.write_at(&buf[at..], offset + done),
            };
            match result {
                Ok(0) => break Err(libc::EIO),
                Ok(n) => {
                    let before = done;
                    done += n as u64;
                    if done < len {
                        shorts += 1;
                        let resume = done / block * block;
                        if resume <= before / block * block {
                            break Err(libc::EIO);
                        }
                        done = resume;
                    }
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) && retries < u64::from(crate::dispatch::MAX_RETRIES) =>
                {
                    retries += 1;
                }
                Err(e) => break Err(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        };
        let c = &self.shared.counters;
        c.inline_requests.fetch_add(1, Ordering::Relaxed);
        c.inline_ops.fetch_add(ops, Ordering::Relaxed);
        c.inline_retries.fetch_add(retries, Ordering::Relaxed);
        c.inline_short_transfers.fetch_add(shorts, Ordering::Relaxed);
        let (error_bits, failures) = match outcome {
            Ok(()) => (ErrorBits::NONE, Vec::new()),
            Err(errno) => {
                if req.op == DmIoOp::Read {
                    buf.fill(0);
                }
                let failure = RegionFailure {
                    region: 0,
                    device: dev.clone(),
                    sector: (offset + done) / SECTOR_SIZE,
                    op: req.op,
                    errno: Errno(errno),
                };
                (ErrorBits::from_bits(1), vec![failure])
            }
        };
        DmIoCompletion { error_bits, failures, memory: Some(crate::DmIoMemory::Kmem(buf)) }
    }

    /// Submits a request and returns a [`Future`](std::future::Future) of its
    /// completion, usable with any executor. Any notify in the request is ignored.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let file = tempfile::NamedTempFile::new_in(std::env::temp_dir())?;
    /// # file.as_file().set_len(1 << 20)?;
    /// # let dev = dmio::BlockDevice::open(file.path())?;
    /// let client = dmio::DmIoClient::new()?;
    /// let req = dmio::DmIoRequest::read(client.page_pool().alloc());
    /// let future = client.submit_future(req, &[dmio::DmIoRegion::new(&dev, 0, 8)])?;
    /// let done = pollster::block_on(future);
    /// assert!(done.is_ok());
    /// # Ok(()) }
    /// ```
    pub fn submit_future(
        &self,
        mut req: DmIoRequest,
        regions: &[DmIoRegion],
    ) -> Result<DmIoFuture, DmIoError> {
        req.notify = None;
        let shared = FutureShared::new();
        self.dispatch(req, Notify::future(shared.clone()), regions)?;
        Ok(DmIoFuture::new(shared))
    }

    /// Stops accepting requests and waits until every submitted request has
    /// completed and its callback has run (`dm_io_client_destroy`). Later
    /// submissions fail with [`DmIoError::ClientClosed`]. Called by `Drop`.
    ///
    /// When called from a notify callback it cannot wait for itself: it only stops
    /// new submissions, and the completion thread exits by itself once idle.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.wake();
        if self.on_completion_thread() {
            return;
        }
        // Hold the lock while joining, so that a concurrent close also returns
        // only once the completion thread has finished.
        let mut thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(handle) = thread.take() {
            let _ = handle.join();
        }
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    fn on_completion_thread(&self) -> bool {
        COMPLETION_THREAD_OF.with(|c| c.get()) == Arc::as_ptr(&self.shared) as usize
    }

    fn dispatch(
        &self,
        req: DmIoRequest,
        notify: Notify,
        regions: &[DmIoRegion],
    ) -> Result<(), DmIoError> {
        self.dispatch_or_return(req, notify, regions).map_err(|refused| refused.0)
    }

    /// Like [`submit`](Self::submit), but a refused request comes back whole
    /// (memory and notify included) instead of being dropped, so that the caller
    /// can retry it elsewhere: the way to submit from a notify callback, where a
    /// full reserve gives [`DmIoError::NoSlotInCallback`].
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let file = tempfile::NamedTempFile::new_in(std::env::temp_dir())?;
    /// # file.as_file().set_len(1 << 20)?;
    /// let dev = dmio::BlockDevice::open(file.path())?;
    /// let client = dmio::DmIoClient::new()?;
    /// let req = dmio::DmIoRequest::write(dmio::AlignedBuf::new(4096)).on_complete(|_| {});
    /// // A region beyond the end of the device: refused, and the request comes back.
    /// let refused = client.try_submit(req, &[dmio::DmIoRegion::new(&dev, 4096, 8)]).unwrap_err();
    /// assert!(matches!(refused.error, dmio::DmIoError::OutOfRange { .. }));
    /// assert_eq!(refused.request.memory.map(|m| m.len()), Some(4096));
    /// # Ok(()) }
    /// ```
    pub fn try_submit(
        &self,
        mut req: DmIoRequest,
        regions: &[DmIoRegion],
    ) -> Result<(), Box<SubmitRefused>> {
        let Some(notify) = req.notify.take() else {
            return Err(Box::new(SubmitRefused { error: DmIoError::MissingNotify, request: req }));
        };
        self.dispatch_or_return(req, notify, regions).map_err(|refused| {
            let (error, mut request, notify) = *refused;
            request.notify = Some(notify);
            Box::new(SubmitRefused { error, request })
        })
    }

    fn dispatch_or_return(
        &self,
        req: DmIoRequest,
        notify: Notify,
        regions: &[DmIoRegion],
    ) -> Result<(), Box<(DmIoError, DmIoRequest, Notify)>> {
        if let Err(e) = validate(&req, regions, self.max_op_bytes) {
            return Err(Box::new((e, req, notify)));
        }
        let shared = &self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(Box::new((DmIoError::ClientClosed, req, notify)));
        }
        let on_thread = self.on_completion_thread();
        let slot = if on_thread {
            shared.free_rx.try_recv().map_err(|_| DmIoError::NoSlotInCallback)
        } else {
            self.wait_for_slot()
        };
        let mut slot = match slot {
            Ok(slot) => slot,
            Err(e) => return Err(Box::new((e, req, notify))),
        };
        if shared.closed.load(Ordering::Acquire) {
            let _ = shared.free_tx.try_send(slot);
            shared.wake();
            return Err(Box::new((DmIoError::ClientClosed, req, notify)));
        }
        slot.fill(req, notify, regions);
        if let Err(e) = shared.inbox_tx.try_send(slot) {
            // Cannot happen: the inbox has room for every slot. Give the slot back,
            // and the request to the caller.
            let mut slot = e.into_inner();
            let (req, notify) = slot.take_request();
            let _ = shared.free_tx.try_send(slot.reset_for_reuse());
            return Err(Box::new((DmIoError::ClientClosed, req, notify)));
        }
        if !on_thread && shared.sleeping.swap(false, Ordering::SeqCst) {
            shared.wake();
        }
        Ok(())
    }

    fn wait_for_slot(&self) -> Result<Box<RequestSlot>, DmIoError> {
        let shared = &self.shared;
        loop {
            match shared.free_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(slot) => return Ok(slot),
                Err(RecvTimeoutError::Timeout) => {
                    if !shared.alive.load(Ordering::Acquire) {
                        return Err(DmIoError::ClientClosed);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err(DmIoError::ClientClosed),
            }
        }
    }
}

/// A request [`DmIoClient::try_submit`] refused, handed back whole.
#[derive(Debug)]
pub struct SubmitRefused {
    /// Why it was refused.
    pub error: DmIoError,
    /// The request, with its memory and notify.
    pub request: DmIoRequest,
}

impl Drop for DmIoClient {
    fn drop(&mut self) {
        self.close();
    }
}

impl fmt::Debug for DmIoClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmIoClient")
            .field("engine", &self.engine)
            .field("reserve", &self.shared.reserve)
            .field("free_slots", &self.shared.free_rx.len())
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Checks a request against the kernel's rules and the devices' limits, before
/// anything is submitted.
///
/// `max_op_bytes` is the client's largest operation: an atomic write must fit in one.
pub(crate) fn validate(
    req: &DmIoRequest,
    regions: &[DmIoRegion],
    max_op_bytes: u64,
) -> Result<(), DmIoError> {
    if regions.len() > MAX_REGIONS {
        return Err(DmIoError::TooManyRegions { regions: regions.len(), max: MAX_REGIONS });
    }
    if req.flags.contains(ReqFlags::ATOMIC) && req.op != DmIoOp::Write {
        return Err(DmIoError::AtomicWrite {
            region: 0,
            path: regions.first().map(|r| r.device.path().to_path_buf()).unwrap_or_default(),
            bytes: 0,
            reason: "ATOMIC applies to writes only",
        });
    }
    if req.op == DmIoOp::Read && regions.len() > 1 {
        return Err(DmIoError::ReadWithMultipleRegions { regions: regions.len() });
    }
    for (i, region) in regions.iter().enumerate() {
        region.validate(i)?;
        if req.op.is_write() && region.device.is_read_only() {
            return Err(DmIoError::ReadOnlyDevice {
                region: i,
                path: region.device.path().to_path_buf(),
                op: req.op,
            });
        }
    }
    if !req.op.has_data() {
        return Ok(());
    }
    let Some(memory) = &req.memory else {
        // The kernel's "flush these devices" idiom (a PREFLUSH write whose regions
        // are all empty) needs no memory; anything that moves data does.
        if regions.iter().all(|r| r.count == 0) {
            return Ok(());
        }
        return Err(DmIoError::MissingMemory { op: req.op });
    };
    if req.op == DmIoOp::Read && matches!(memory, DmIoMemory::Zeroes(_)) {
        return Err(DmIoError::ReadIntoZeroes);
    }
    let available = memory.len() as u64;
    for (i, region) in regions.iter().enumerate() {
        if region.byte_len() > available {
            return Err(DmIoError::MemoryTooShort {
                region: i,
                needed: region.byte_len(),
                available,
            });
        }
        if region.count == 0 {
            continue;
        }
        if req.flags.contains(ReqFlags::ATOMIC) {
            check_atomic(memory, i, region, max_op_bytes)?;
        }
        // Each distinct device's alignment is checked once, with the first region
        // naming it and the longest prefix of memory any region on it uses.
        if regions[..i].iter().any(|r| r.count > 0 && r.device.id() == region.device.id()) {
            continue;
        }
        let used = regions
            .iter()
            .filter(|r| r.device.id() == region.device.id())
            .map(DmIoRegion::byte_len)
            .max()
            .unwrap_or(0);
        check_memory_alignment(memory, i, region, used)?;
    }
    Ok(())
}

fn check_memory_alignment(
    memory: &DmIoMemory,
    index: usize,
    region: &DmIoRegion,
    used: u64,
) -> Result<(), DmIoError> {
    let info = region.device.info();
    let mem_align = info.dio_mem_align.max(1) as usize;
    let lbs = info.logical_block_size.max(1) as u64;
    let mut error = None;
    memory.for_each_segment(|segment, addr, len, pos| {
        if error.is_some() || pos >= used {
            return;
        }
        let used_len = (len as u64).min(used - pos);
        let reason = if addr % mem_align != 0 {
            Some(format!("the address must be a multiple of {mem_align} bytes"))
        } else if !used_len.is_multiple_of(lbs) {
            Some(format!(
                "the length used must be a multiple of the logical block size ({lbs} bytes)"
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            error = Some(DmIoError::MisalignedMemory {
                region: index,
                path: region.device.path().to_path_buf(),
                segment,
                address: addr,
                len,
                kind: memory.kind_name(),
                reason,
            });
        }
    });
    error.map_or(Ok(()), Err)
}

fn check_atomic(
    memory: &DmIoMemory,
    index: usize,
    region: &DmIoRegion,
    max_op_bytes: u64,
) -> Result<(), DmIoError> {
    let dev = &region.device;
    let bytes = region.byte_len();
    let fail = |reason| {
        Err(DmIoError::AtomicWrite { region: index, path: dev.path().to_path_buf(), bytes, reason })
    };
    let max = dev.atomic_write_max_bytes() as u64;
    if max == 0 {
        return fail("the device does not support atomic writes");
    }
    if bytes > max {
        return fail("the region is larger than the device's atomic write unit");
    }
    if bytes > max_op_bytes.min(dev.info().max_io_bytes) {
        return fail(
            "the region is larger than one operation can carry (the client's max_op_bytes or \
             the device's largest I/O), and an atomic write is never split",
        );
    }
    if bytes < dev.info().atomic_write_min_bytes as u64 {
        return fail("the region is smaller than the device's minimum atomic write unit");
    }
    if !bytes.is_power_of_two() || !region.byte_offset().is_multiple_of(bytes) {
        return fail("an atomic write must be a power of two in size and naturally aligned");
    }
    let mut segments = 0;
    let mut last_end = None;
    memory.for_each_segment(|_, addr, len, pos| {
        if pos < bytes && last_end != Some(addr) {
            segments += 1;
        }
        last_end = Some(addr + len);
    });
    if segments > 1 {
        return fail("the memory for an atomic write must be contiguous");
    }
    Ok(())
}

/// Whether fault rules, a trace or a write log are set on `dev` (then every
/// request goes through the completion thread, where they apply).
#[cfg(feature = "fault-injection")]
fn faults_active(dev: &BlockDevice) -> bool {
    dev.faults().is_active()
}

#[cfg(not(feature = "fault-injection"))]
fn faults_active(_dev: &BlockDevice) -> bool {
    false
}
