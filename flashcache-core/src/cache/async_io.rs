//! Asynchronous I/O through the cache: the callbacks, the futures and the
//! worker pool; hits served from dm-io callbacks are in
//! [`async_hit`](super::async_hit). The contract is in the [cache module
//! docs](crate::cache#asynchronous-io).

use std::cell::Cell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, unbounded};
use dmio::AlignedBuf;

use super::error::CacheError;
use super::io_path::{Cacheable, Pieces};
use super::{Cache, Inner, IoFlags};

/// Worker threads the asynchronous pool starts with (on first use).
pub const ASYNC_WORKERS: usize = 4;

/// The most worker threads the asynchronous pool grows to. A job queued
/// while every worker is busy starts one more, so up to this many misses,
/// fills and other blocking requests from the asynchronous API are in flight
/// at once (the rest wait in the queue). Workers stay until the cache shuts
/// down.
pub const MAX_ASYNC_WORKERS: usize = 64;

/// What an asynchronous read or write resolves to: its result and the
/// caller's buffer, handed back whether it succeeded or not (tokio-uring's
/// `BufResult`).
pub type BufResult = (Result<(), CacheError>, AlignedBuf);

/// The notify callback of an asynchronous read or write: the result and the
/// caller's buffer, handed back.
pub(crate) type IoNotify = Box<dyn FnOnce(Result<(), CacheError>, AlignedBuf) + Send>;

/// A job for the pool: called with `true` to run, or `false` when the pool
/// refused it after the request was accepted (it then reports
/// [`CacheError::ShutDown`] to its callback).
pub(super) type Job = Box<dyn FnOnce(bool) + Send>;

thread_local! {
    /// On a pool worker, the address of the [`AsyncState`] it works for (else
    /// 0): a shutdown from inside one of that cache's callbacks must not wait
    /// for the request whose callback is running, but must wait for every
    /// request of any other cache.
    static WORKER_OF: Cell<usize> = const { Cell::new(0) };
}

/// The asynchronous side of a cache: the worker pool and the requests in
/// flight.
#[derive(Default)]
pub(crate) struct AsyncState {
    /// The queue's ends, once the pool has started (the receiver is cloned
    /// for each worker the pool grows by).
    tx: Mutex<Option<(Sender<Job>, Receiver<Job>)>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Workers waiting for a job: when the queue holds at least as many jobs,
    /// a new job starts another worker (up to [`MAX_ASYNC_WORKERS`]).
    idle: Arc<AtomicUsize>,
    /// No new submissions (the cache is shutting down).
    closed: AtomicBool,
    /// Accepted requests whose callback has not returned yet.
    in_flight: AtomicUsize,
}

/// One accepted asynchronous request, from its acceptance until its callback
/// returned (the drop counts it done, also when the callback panics).
pub(crate) struct InFlight {
    pub(crate) inner: Arc<Inner>,
}

impl InFlight {
    fn start(inner: &Arc<Inner>) -> Result<InFlight, CacheError> {
        let state = &inner.async_state;
        // Counted before checking `closed`, and `close` sets it before
        // reading the count (both sequentially consistent): either the close
        // sees this request and waits for it, or this sees the close.
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        if state.closed.load(Ordering::SeqCst) {
            state.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(CacheError::ShutDown);
        }
        Ok(InFlight { inner: inner.clone() })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.inner.async_state.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AsyncState {
    /// Queues `job` on the pool, starting the workers on first use and one
    /// more when every idle worker already has a queued job (up to
    /// [`MAX_ASYNC_WORKERS`]). A refused job comes back. Jobs of accepted
    /// requests are taken until every one of them is done, also while the
    /// cache is closing.
    pub(super) fn submit(&self, job: Job) -> Result<(), Job> {
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let lock_workers = || self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if tx.is_none() {
            let (sender, receiver) = unbounded::<Job>();
            let mut workers = lock_workers();
            for _ in 0..ASYNC_WORKERS {
                self.spawn_worker(&mut workers, &receiver);
            }
            if workers.is_empty() {
                return Err(job);
            }
            *tx = Some((sender, receiver));
        }
        let Some((sender, receiver)) = tx.as_ref() else { return Err(job) };
        if receiver.len() >= self.idle.load(Ordering::Acquire) {
            // Every idle worker already has a queued job to take: this one
            // would wait for a busy worker, though its I/O could run beside
            // theirs.
            let mut workers = lock_workers();
            if workers.len() < MAX_ASYNC_WORKERS {
                self.spawn_worker(&mut workers, receiver);
            }
        }
        sender.send(job).map_err(|e| e.into_inner())
    }

    /// Starts one more worker on `queue` (a failed spawn leaves the pool as
    /// it is: the job waits for a running worker).
    fn spawn_worker(&self, workers: &mut Vec<JoinHandle<()>>, queue: &Receiver<Job>) {
        // Stable: the state lives in the cache's `Arc<Inner>`, which outlives
        // its workers (`close` joins them).
        let owner = std::ptr::from_ref(self) as usize;
        let rx = queue.clone();
        let idle = self.idle.clone();
        let name = format!("flashcache-io-{}", workers.len());
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            WORKER_OF.with(|c| c.set(owner));
            loop {
                idle.fetch_add(1, Ordering::AcqRel);
                let next = rx.recv();
                idle.fetch_sub(1, Ordering::AcqRel);
                let Ok(job) = next else { return };
                // A panicking callback must not take a worker with it.
                let _ = std::panic::catch_unwind(AssertUnwindSafe(|| job(true)));
            }
        });
        if let Ok(handle) = spawned {
            workers.push(handle);
        }
    }

    /// Refuses new submissions, waits until every accepted request's callback
    /// has returned (but for one running on this very thread), runs every
    /// queued job and joins the workers.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // A worker runs one job at a time: on one of this cache's workers, that
        // is the request whose callback is closing the cache.
        let mine = usize::from(WORKER_OF.with(Cell::get) == std::ptr::from_ref(self) as usize);
        while self.in_flight.load(Ordering::SeqCst) > mine {
            std::thread::sleep(Duration::from_micros(200));
        }
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        let me = std::thread::current().id();
        for handle in workers {
            // A callback that shuts the cache down runs on a worker: it cannot
            // join itself.
            if handle.thread().id() != me {
                let _ = handle.join();
            }
        }
    }
}

impl Inner {
    /// Starts an asynchronous read: natively when it is a hit the dm-io
    /// completion thread can serve, else on the pool.
    pub(crate) fn submit_read(
        self: &Arc<Self>,
        sector: u64,
        buf: AlignedBuf,
        flags: IoFlags,
        notify: IoNotify,
    ) -> Result<(), CacheError> {
        if self.async_state.closed.load(Ordering::Acquire) {
            return Err(CacheError::ShutDown);
        }
        let (pieces, cacheable) = self.begin(sector, buf.len(), flags, false)?;
        let request = InFlight::start(self)?;
        let (request, buf, notify) = match &*pieces {
            [piece] => match request.try_read_hit(self, *piece, cacheable, buf, notify) {
                Ok(()) => return Ok(()),
                Err(declined) => *declined,
            },
            _ => (request, buf, notify),
        };
        // Refused: the request was never accepted, and its callback is dropped.
        request.read_on_pool(pieces, cacheable, buf, notify).map_err(|_| CacheError::ShutDown)
    }

    /// Starts an asynchronous write: natively when it is a write-back hit
    /// that needs no commit, else on the pool.
    pub(crate) fn submit_write(
        self: &Arc<Self>,
        sector: u64,
        data: AlignedBuf,
        flags: IoFlags,
        notify: IoNotify,
    ) -> Result<(), CacheError> {
        if self.async_state.closed.load(Ordering::Acquire) {
            return Err(CacheError::ShutDown);
        }
        let (pieces, cacheable) = self.begin(sector, data.len(), flags, true)?;
        let request = InFlight::start(self)?;
        let (request, data, notify) = match &*pieces {
            [piece] if !flags.contains(IoFlags::FUA) => {
                match request.try_write_hit(self, *piece, data, notify) {
                    Ok(()) => return Ok(()),
                    Err(declined) => *declined,
                }
            }
            _ => (request, data, notify),
        };
        request
            .write_on_pool(pieces, cacheable, data, flags, notify)
            .map_err(|_| CacheError::ShutDown)
    }
}

impl InFlight {
    /// Runs an accepted read on the pool. A refused job comes back (call it
    /// with `false` to report the refusal to its callback).
    pub(super) fn read_on_pool(
        self,
        pieces: Pieces,
        cacheable: Cacheable,
        mut buf: AlignedBuf,
        notify: IoNotify,
    ) -> Result<(), Job> {
        let inner = self.inner.clone();
        let job: Job = Box::new(move |run: bool| {
            let result = if run {
                self.inner.read_pieces(&pieces, cacheable, &mut buf)
            } else {
                Err(CacheError::ShutDown)
            };
            notify(result, buf);
            drop(self);
        });
        inner.async_state.submit(job)
    }

    /// Runs an accepted write on the pool (see [`read_on_pool`](Self::read_on_pool)).
    pub(super) fn write_on_pool(
        self,
        pieces: Pieces,
        cacheable: Cacheable,
        data: AlignedBuf,
        flags: IoFlags,
        notify: IoNotify,
    ) -> Result<(), Job> {
        let inner = self.inner.clone();
        let job: Job = Box::new(move |run: bool| {
            let result = if run {
                self.inner.write_pieces(&pieces, cacheable, &data, flags)
            } else {
                Err(CacheError::ShutDown)
            };
            notify(result, data);
            drop(self);
        });
        inner.async_state.submit(job)
    }
}

/// Calls a refused job, so that its callback hears of the refusal.
pub(super) fn refuse(job: Job) {
    job(false);
}

impl Cache {
    /// A zero-filled buffer of `len` bytes for this cache's asynchronous I/O.
    /// Up to one page (4 KiB), it is a page of the cache's dm-io page pool
    /// while one is free (256 pages; none is used by the cache itself); larger
    /// buffers, and all once the pool is lent out, come from the heap.
    ///
    /// The pool is registered with dm-io's ring, so a hit read into or written
    /// from such a buffer uses io_uring's fixed-buffer opcodes, which skip
    /// pinning the caller's memory on every I/O. Worth it for buffers reused
    /// across many requests; the page goes back to the pool on drop.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let (s, d) = (dir.path().join("ssd"), dir.path().join("disk"));
    /// # std::fs::File::create(&s).unwrap().set_len(4 << 20).unwrap();
    /// # std::fs::File::create(&d).unwrap().set_len(16 << 20).unwrap();
    /// # let ssd = flashcache_core::dmio::BlockDevice::open(&s).unwrap();
    /// # let disk = flashcache_core::dmio::BlockDevice::open(&d).unwrap();
    /// use flashcache_core::cache::{Cache, IoFlags};
    /// use flashcache_core::setup::CreateOptions;
    /// let options = CreateOptions { assoc: 64, ..CreateOptions::default() };
    /// let cache = Cache::create(ssd, disk, &options).unwrap();
    /// let buf = cache.io_buffer(4096);
    /// assert!(buf.is_pool_page());
    /// let (done, buf) = pollster::block_on(cache.read_future(0, buf, IoFlags::empty()).unwrap());
    /// done.unwrap();
    /// assert_eq!(buf.len(), 4096);
    /// ```
    pub fn io_buffer(&self, len: usize) -> AlignedBuf {
        self.inner.io.dmio.page_pool().buffer(len)
    }

    /// Reads `buf.len()` bytes at `sector` into `buf` in the background and
    /// calls `notify` with the result and the buffer. The range is checked
    /// now: a bad one is an error here, and `notify` is never called.
    ///
    /// A hit is read straight from the SSD into `buf` and `notify` runs on the
    /// dm-io completion thread; anything else runs on a cache worker. Either
    /// way `notify` must not block: see the [module docs](crate::cache#callbacks-must-not-block).
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let (s, d) = (dir.path().join("ssd"), dir.path().join("disk"));
    /// # std::fs::File::create(&s).unwrap().set_len(4 << 20).unwrap();
    /// # std::fs::File::create(&d).unwrap().set_len(16 << 20).unwrap();
    /// # let ssd = flashcache_core::dmio::BlockDevice::open(&s).unwrap();
    /// # let disk = flashcache_core::dmio::BlockDevice::open(&d).unwrap();
    /// use flashcache_core::cache::{Cache, IoFlags};
    /// use flashcache_core::dmio::AlignedBuf;
    /// use flashcache_core::setup::CreateOptions;
    /// let options = CreateOptions { assoc: 64, ..CreateOptions::default() };
    /// let cache = Cache::create(ssd, disk, &options).unwrap();
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// let data = AlignedBuf::from_slice(&[1u8; 8192]);
    /// cache.submit_write(0, data, IoFlags::empty(), move |done, _data| {
    ///     tx.send(done.is_ok()).unwrap();
    /// }).unwrap();
    /// assert!(rx.recv().unwrap());
    /// // The same through a future, with any executor.
    /// let read = cache.read_future(0, AlignedBuf::new(8192), IoFlags::empty()).unwrap();
    /// let (done, bytes) = pollster::block_on(read);
    /// done.unwrap();
    /// assert_eq!(&bytes[..], &[1u8; 8192][..]);
    /// ```
    pub fn submit_read(
        &self,
        sector: u64,
        buf: AlignedBuf,
        flags: IoFlags,
        notify: impl FnOnce(Result<(), CacheError>, AlignedBuf) + Send + 'static,
    ) -> Result<(), CacheError> {
        self.inner.submit_read(sector, buf, flags, Box::new(notify))
    }

    /// Writes `data` at `sector` in the background and calls `notify` with the
    /// result and the buffer when it is done (durable, with
    /// [`IoFlags::FUA`]). The range is checked now. In write-back, a write
    /// that hits a cached block goes straight to the SSD from `data` and
    /// `notify` runs on the dm-io completion thread; it must not block.
    pub fn submit_write(
        &self,
        sector: u64,
        data: AlignedBuf,
        flags: IoFlags,
        notify: impl FnOnce(Result<(), CacheError>, AlignedBuf) + Send + 'static,
    ) -> Result<(), CacheError> {
        self.inner.submit_write(sector, data, flags, Box::new(notify))
    }

    /// Flushes in the background (see [`flush`](Cache::flush)) and calls
    /// `notify` on a cache worker when it is done.
    pub fn submit_flush(
        &self,
        notify: impl FnOnce(Result<(), CacheError>) + Send + 'static,
    ) -> Result<(), CacheError> {
        self.inner.check_open()?;
        let request = InFlight::start(&self.inner)?;
        let job: Job = Box::new(move |run: bool| {
            notify(if run { request.inner.flush() } else { Err(CacheError::ShutDown) });
            drop(request);
        });
        self.inner.async_state.submit(job).map_err(|_| CacheError::ShutDown)
    }

    /// [`submit_read`](Self::submit_read) as a future (no runtime needed): it
    /// resolves to the result and the buffer.
    pub fn read_future(
        &self,
        sector: u64,
        buf: AlignedBuf,
        flags: IoFlags,
    ) -> Result<CacheFuture<BufResult>, CacheError> {
        let (future, complete) = CacheFuture::pair();
        self.submit_read(sector, buf, flags, move |done, buf| complete((done, buf)))?;
        Ok(future)
    }

    /// [`submit_write`](Self::submit_write) as a future.
    pub fn write_future(
        &self,
        sector: u64,
        data: AlignedBuf,
        flags: IoFlags,
    ) -> Result<CacheFuture<BufResult>, CacheError> {
        let (future, complete) = CacheFuture::pair();
        self.submit_write(sector, data, flags, move |done, data| complete((done, data)))?;
        Ok(future)
    }
}

struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

/// The future of an asynchronous cache I/O; it resolves once the I/O is done.
/// It needs no particular runtime (any executor, or `pollster::block_on`).
pub struct CacheFuture<T> {
    slot: Arc<Mutex<Slot<T>>>,
}

impl<T> std::fmt::Debug for CacheFuture<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheFuture").finish_non_exhaustive()
    }
}

impl<T: Send + 'static> CacheFuture<T> {
    /// A future and the completion that resolves it.
    fn pair() -> (CacheFuture<T>, impl FnOnce(T) + Send + 'static) {
        let slot = Arc::new(Mutex::new(Slot { value: None, waker: None }));
        let theirs = slot.clone();
        let complete = move |value: T| {
            let waker = {
                let mut s = theirs.lock().unwrap_or_else(|e| e.into_inner());
                s.value = Some(value);
                s.waker.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        };
        (CacheFuture { slot }, complete)
    }
}

impl<T> Future for CacheFuture<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match s.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
