//! Completion notification: callbacks, the blocking waiter and the `Future` adapter.
//!
//! Every request is notified exactly once, after every operation of every region
//! has completed and after its request slot went back to the client's pool (as
//! the kernel frees its `struct io` before calling `fn`). Callbacks run on the
//! client's completion thread: they must not block (no blocking dm-io calls, no
//! long locks); hand work to another thread if it is slow.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use crate::error::{DmIoError, ErrorBits, RegionFailure, RegionFailures};
use crate::memory::DmIoMemory;

/// What a finished request hands back: the per-region error bits, the detail of
/// each failure, and the memory.
#[must_use = "a completion carries the error bits of the request; check them"]
#[derive(Debug)]
pub struct DmIoCompletion {
    /// Bit *i* set when region *i* failed.
    pub error_bits: ErrorBits,
    /// One entry per failed operation, with the region, device, sector and errno.
    /// Empty (and not allocated) when the request succeeded.
    pub failures: Vec<RegionFailure>,
    /// The request's memory, handed back.
    pub memory: Option<DmIoMemory>,
}

impl DmIoCompletion {
    /// Whether every region succeeded.
    pub fn is_ok(&self) -> bool {
        self.error_bits.is_empty()
    }

    /// The memory if every region succeeded, otherwise
    /// [`DmIoError::Regions`] with the error bits and failures (the memory is
    /// dropped; take it out of [`memory`](Self::memory) first to keep it).
    pub fn into_result(self) -> Result<Option<DmIoMemory>, DmIoError> {
        if self.error_bits.is_empty() {
            Ok(self.memory)
        } else {
            Err(DmIoError::Regions(RegionFailures {
                error_bits: self.error_bits,
                failures: self.failures,
            }))
        }
    }
}

/// A callback shared by many requests, called with each completion and the
/// request's `context` (the kernel's `io_notify_fn` plus its `context` pointer).
///
/// Using one shared handler avoids allocating a boxed closure per request. Any
/// `Fn(DmIoCompletion, usize) + Send + Sync` closure is a handler.
pub trait NotifyHandler: Send + Sync {
    /// Called once per request, on the client's completion thread.
    fn notify(&self, completion: DmIoCompletion, context: usize);
}

impl<F: Fn(DmIoCompletion, usize) + Send + Sync> NotifyHandler for F {
    fn notify(&self, completion: DmIoCompletion, context: usize) {
        self(completion, context)
    }
}

/// A request's completion callback as a value: the state it needs plus what
/// to do with it. Unlike a closure, the state can be taken back out of a
/// [`Notify`] ([`Notify::into_state`]), for instance from a request that
/// [`DmIoClient::try_submit`](crate::DmIoClient::try_submit) refused, without
/// sharing it behind a lock in case of refusal.
///
/// ```
/// use dmio::{CompletionState, DmIoCompletion, Notify};
/// struct Tag(u32);
/// impl CompletionState for Tag {
///     fn complete(self: Box<Self>, done: DmIoCompletion) {
///         println!("request {} done: {}", self.0, done.error_bits);
///     }
/// }
/// let notify = Notify::with_state(Tag(7));
/// // A refused request's notify gives its state back, by type.
/// let tag: Tag = notify.into_state().unwrap();
/// assert_eq!(tag.0, 7);
/// ```
pub trait CompletionState: Send + 'static {
    /// Called once, on the client's completion thread, with the completion.
    fn complete(self: Box<Self>, done: DmIoCompletion);
}

/// A boxed [`CompletionState`] that can also be downcast back to its type.
trait BoxedState: Send {
    fn complete(self: Box<Self>, done: DmIoCompletion);
    fn state_type(&self) -> std::any::TypeId;
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send>;
}

impl<S: CompletionState> BoxedState for S {
    fn complete(self: Box<Self>, done: DmIoCompletion) {
        CompletionState::complete(self, done);
    }

    fn state_type(&self) -> std::any::TypeId {
        std::any::TypeId::of::<S>()
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

/// How a request is notified of its completion (the kernel's `struct dm_io_notify`).
///
/// ```
/// use std::sync::Arc;
/// use dmio::{Notify, NotifyHandler};
/// // A one-shot closure (boxed: one allocation per request unless it captures nothing).
/// let once = Notify::new(|done| assert!(done.is_ok()));
/// // A shared handler with a per-request context: no allocation per request.
/// let handler: Arc<dyn NotifyHandler> = Arc::new(|done: dmio::DmIoCompletion, ctx: usize| {
///     println!("request {ctx}: {}", done.error_bits);
/// });
/// let shared = Notify::shared(&handler, 42);
/// // A channel.
/// let (tx, rx) = crossbeam_channel::unbounded();
/// let chan = Notify::channel(tx, 7).unwrap();
/// # drop((once, shared, chan, rx));
/// ```
pub struct Notify(NotifyKind);

enum NotifyKind {
    Once(Box<dyn FnOnce(DmIoCompletion) + Send>),
    State(Box<dyn BoxedState>),
    Shared { handler: Arc<dyn NotifyHandler>, context: usize },
    Channel { tx: crossbeam_channel::Sender<(usize, DmIoCompletion)>, context: usize },
    Waiter(Arc<Waiter>),
    Future(Arc<FutureShared>),
}

impl Notify {
    /// Calls `f` once with the completion.
    pub fn new(f: impl FnOnce(DmIoCompletion) + Send + 'static) -> Notify {
        Notify(NotifyKind::Once(Box::new(f)))
    }

    /// Calls `state.complete(completion)` (one allocation, for the box).
    pub fn with_state<S: CompletionState>(state: S) -> Notify {
        Notify(NotifyKind::State(Box::new(state)))
    }

    /// The state of a [`with_state`](Self::with_state) notify of type `S`,
    /// taken back without calling it; any other notify comes back unchanged.
    pub fn into_state<S: CompletionState>(self) -> Result<S, Notify> {
        match self.0 {
            NotifyKind::State(state) if state.state_type() == std::any::TypeId::of::<S>() => {
                match state.into_any().downcast::<S>() {
                    Ok(state) => Ok(*state),
                    // Unreachable: the type was just checked.
                    Err(_) => Err(Notify::new(|_| {})),
                }
            }
            kind => Err(Notify(kind)),
        }
    }

    /// Calls `handler.notify(completion, context)`.
    pub fn shared(handler: &Arc<dyn NotifyHandler>, context: usize) -> Notify {
        Notify(NotifyKind::Shared { handler: handler.clone(), context })
    }

    /// Sends `(context, completion)` on `tx`, which must be an unbounded channel:
    /// the completion thread must never block on a full one. A send to a
    /// disconnected channel drops the completion and its memory.
    ///
    /// Returns [`DmIoError::Config`] for a bounded sender.
    pub fn channel(
        tx: crossbeam_channel::Sender<(usize, DmIoCompletion)>,
        context: usize,
    ) -> Result<Notify, DmIoError> {
        if tx.capacity().is_some() {
            return Err(DmIoError::Config(
                "Notify::channel needs an unbounded channel: the completion thread must not block"
                    .into(),
            ));
        }
        Ok(Notify(NotifyKind::Channel { tx, context }))
    }

    pub(crate) fn waiter(waiter: Arc<Waiter>) -> Notify {
        Notify(NotifyKind::Waiter(waiter))
    }

    pub(crate) fn future(shared: Arc<FutureShared>) -> Notify {
        Notify(NotifyKind::Future(shared))
    }

    /// Delivers the completion. Runs on the completion thread.
    pub(crate) fn fire(self, completion: DmIoCompletion) {
        match self.0 {
            NotifyKind::Once(f) => f(completion),
            NotifyKind::State(state) => state.complete(completion),
            NotifyKind::Shared { handler, context } => handler.notify(completion, context),
            NotifyKind::Channel { tx, context } => {
                let _ = tx.send((context, completion));
            }
            NotifyKind::Waiter(waiter) => waiter.complete(completion),
            NotifyKind::Future(shared) => shared.complete(completion),
        }
    }
}

impl fmt::Debug for Notify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            NotifyKind::Once(_) => "Notify::Once",
            NotifyKind::State(_) => "Notify::State",
            NotifyKind::Shared { .. } => "Notify::Shared",
            NotifyKind::Channel { .. } => "Notify::Channel",
            NotifyKind::Waiter(_) => "Notify::Waiter",
            NotifyKind::Future(_) => "Notify::Future",
        })
    }
}

/// Where a blocking call waits for its completion. One per thread, reused, so a
/// blocking call allocates nothing.
pub(crate) struct Waiter {
    slot: Mutex<Option<DmIoCompletion>>,
    ready: Condvar,
}

impl Waiter {
    fn new() -> Waiter {
        Waiter { slot: Mutex::new(None), ready: Condvar::new() }
    }

    /// This thread's waiter.
    pub(crate) fn for_this_thread() -> Arc<Waiter> {
        thread_local! {
            static WAITER: Arc<Waiter> = Arc::new(Waiter::new());
        }
        WAITER.with(Arc::clone)
    }

    fn complete(&self, completion: DmIoCompletion) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(completion);
        // Notify after unlocking, so the woken thread does not block on the mutex.
        self.ready.notify_one();
    }

    /// Blocks until the completion arrives.
    pub(crate) fn wait(&self) -> DmIoCompletion {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(done) = slot.take() {
                return done;
            }
            slot = self.ready.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }
}

pub(crate) struct FutureShared {
    state: Mutex<(Option<DmIoCompletion>, Option<Waker>)>,
}

impl FutureShared {
    pub(crate) fn new() -> Arc<FutureShared> {
        Arc::new(FutureShared { state: Mutex::new((None, None)) })
    }

    fn complete(&self, completion: DmIoCompletion) {
        let waker = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.0 = Some(completion);
            state.1.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// A request's completion as a [`Future`]; works with any executor (it needs no
/// particular runtime: the completion thread calls the task's waker).
///
/// Dropping the future does not cancel the request: it runs to completion and
/// its memory is dropped afterwards.
#[must_use = "futures do nothing unless polled; the request runs anyway"]
pub struct DmIoFuture {
    shared: Arc<FutureShared>,
}

impl DmIoFuture {
    pub(crate) fn new(shared: Arc<FutureShared>) -> DmIoFuture {
        DmIoFuture { shared }
    }
}

impl Future for DmIoFuture {
    type Output = DmIoCompletion;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<DmIoCompletion> {
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(done) = state.0.take() {
            return Poll::Ready(done);
        }
        match &state.1 {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => state.1 = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl fmt::Debug for DmIoFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DmIoFuture")
    }
}

#[cfg(test)]
mod state_tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::{CompletionState, DmIoCompletion, Notify};
    use crate::error::ErrorBits;

    struct Count(Arc<AtomicU32>);
    impl CompletionState for Count {
        fn complete(self: Box<Self>, _done: DmIoCompletion) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    struct Other;
    impl CompletionState for Other {
        fn complete(self: Box<Self>, _done: DmIoCompletion) {}
    }

    fn done() -> DmIoCompletion {
        DmIoCompletion { error_bits: ErrorBits::NONE, failures: Vec::new(), memory: None }
    }

    #[test]
    fn a_state_comes_back_only_as_its_own_type_and_otherwise_still_fires() {
        let calls = Arc::new(AtomicU32::new(0));
        let notify = Notify::with_state(Count(calls.clone()));
        let notify = match notify.into_state::<Other>() {
            Ok(_) => panic!("a Count came back as an Other"),
            Err(notify) => notify,
        };
        notify.fire(done());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let back = Notify::with_state(Count(calls.clone())).into_state::<Count>();
        assert!(back.is_ok_and(|c| Arc::ptr_eq(&c.0, &calls)));
        assert!(Notify::new(|_| {}).into_state::<Count>().is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a state taken back was called");
    }
}
