//! Asynchronous I/O through the cache: notify callbacks and a runtime-free
//! `Future`.
//!
//! Submissions are checked on the caller's thread (a bad range is an
//! immediate error and no callback), then run on a small pool of the cache's
//! worker threads, started on first use, which call the notify callback when
//! the I/O is done. Callbacks run on those workers: they may call the cache's
//! blocking methods, but a slow callback holds up a worker.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, unbounded};

use super::error::CacheError;
use super::{Cache, Inner, IoFlags};

/// Worker threads in the asynchronous pool.
pub const ASYNC_WORKERS: usize = 4;

type Job = Box<dyn FnOnce(&Inner) + Send>;

/// The worker pool.
#[derive(Default)]
pub(crate) struct AsyncPool {
    tx: Mutex<Option<Sender<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    closed: std::sync::atomic::AtomicBool,
}

impl AsyncPool {
    fn submit(&self, inner: &Arc<Inner>, job: Job) -> Result<(), CacheError> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(CacheError::ShutDown);
        }
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if tx.is_none() {
            let (sender, receiver) = unbounded::<Job>();
            let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            for i in 0..ASYNC_WORKERS {
                let rx = receiver.clone();
                let inner = inner.clone();
                let spawned = std::thread::Builder::new().name(format!("flashcache-io-{i}")).spawn(
                    move || {
                        for job in rx {
                            job(&inner);
                        }
                    },
                );
                if let Ok(handle) = spawned {
                    workers.push(handle);
                }
            }
            if workers.is_empty() {
                return Err(CacheError::ShutDown);
            }
            *tx = Some(sender);
        }
        match tx.as_ref() {
            Some(sender) => sender.send(job).map_err(|_| CacheError::ShutDown),
            None => Err(CacheError::ShutDown),
        }
    }

    /// Refuses new submissions, runs every queued one, and joins the workers.
    pub(crate) fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Release);
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        let me = std::thread::current().id();
        for handle in workers {
            // A callback that drops the last handle runs on a worker: it cannot
            // join itself.
            if handle.thread().id() != me {
                let _ = handle.join();
            }
        }
    }
}

impl Cache {
    /// Reads `len` bytes at `sector` in the background and calls `notify` with
    /// the bytes. The range is checked now: a bad one is an error here and
    /// `notify` is never called.
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
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// cache.submit_write(0, vec![1u8; 8192], IoFlags::empty(), move |done| {
    ///     tx.send(done.is_ok()).unwrap();
    /// }).unwrap();
    /// assert!(rx.recv().unwrap());
    /// // The same through a future, with any executor.
    /// let bytes = pollster::block_on(cache.read_future(0, 8192, IoFlags::empty()).unwrap()).unwrap();
    /// assert_eq!(bytes, vec![1u8; 8192]);
    /// ```
    pub fn submit_read(
        &self,
        sector: u64,
        len: usize,
        flags: IoFlags,
        notify: impl FnOnce(Result<Vec<u8>, CacheError>) + Send + 'static,
    ) -> Result<(), CacheError> {
        self.inner.check_open()?;
        self.inner.check_range(sector, len)?;
        self.pool.submit(
            &self.inner,
            Box::new(move |inner: &Inner| {
                let mut buf = vec![0u8; len];
                notify(inner.read(sector, &mut buf, flags).map(|()| buf));
            }),
        )
    }

    /// Writes `data` at `sector` in the background and calls `notify` when it
    /// is done (durable, with [`IoFlags::FUA`]). The range is checked now.
    pub fn submit_write(
        &self,
        sector: u64,
        data: Vec<u8>,
        flags: IoFlags,
        notify: impl FnOnce(Result<(), CacheError>) + Send + 'static,
    ) -> Result<(), CacheError> {
        self.inner.check_open()?;
        self.inner.check_range(sector, data.len())?;
        self.pool.submit(
            &self.inner,
            Box::new(move |inner: &Inner| notify(inner.write(sector, &data, flags))),
        )
    }

    /// Flushes in the background (see [`flush`](Cache::flush)) and calls
    /// `notify` when it is done.
    pub fn submit_flush(
        &self,
        notify: impl FnOnce(Result<(), CacheError>) + Send + 'static,
    ) -> Result<(), CacheError> {
        self.inner.check_open()?;
        self.pool.submit(&self.inner, Box::new(move |inner: &Inner| notify(inner.flush())))
    }

    /// [`submit_read`](Self::submit_read) as a future (no runtime needed).
    pub fn read_future(
        &self,
        sector: u64,
        len: usize,
        flags: IoFlags,
    ) -> Result<CacheFuture<Result<Vec<u8>, CacheError>>, CacheError> {
        let (future, complete) = CacheFuture::pair();
        self.submit_read(sector, len, flags, complete)?;
        Ok(future)
    }

    /// [`submit_write`](Self::submit_write) as a future.
    pub fn write_future(
        &self,
        sector: u64,
        data: Vec<u8>,
        flags: IoFlags,
    ) -> Result<CacheFuture<Result<(), CacheError>>, CacheError> {
        let (future, complete) = CacheFuture::pair();
        self.submit_write(sector, data, flags, complete)?;
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
