//! Zero heap allocations per I/O in steady state (the crate's backpressure
//! contract: "in steady state a request allocates nothing on the heap, with a
//! `Notify::shared` handler").
//!
//! This test binary installs a counting `#[global_allocator]` (wrapping
//! `std::alloc::System`) that counts every allocation and reallocation of every
//! thread (submitters, the completion thread, engine workers) while a window
//! is open. For each engine it warms a client up, then opens the window over:
//! 10 000 asynchronous 4 KiB reads and writes resubmitted from the shared
//! handler (callback chaining); 10 000 submitted from a thread that recycles the
//! memory through preallocated slots, with more requests wanted than the client
//! has request slots (so submitters wait for slots); and 2 000 blocking
//! `io_sync` calls. Each window must see zero allocations; when it does not,
//! the failure message carries backtraces of the first allocations.
//!
//! The tests take a lock so that no other test of this binary runs (and
//! allocates) during a window.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use dmio::{
    BlockDevice, DmIoClient, DmIoCompletion, DmIoConfig, DmIoMemory, DmIoRegion, DmIoRequest,
    EngineChoice, Notify, NotifyHandler, PageList,
};
use tests::{Backing, TestDevice, client_with_config};

/// Counts allocations while `COUNTING` is set.
struct CountingAlloc;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Backtraces of the first allocations in a window.
static TRACES: Mutex<Vec<String>> = Mutex::new(Vec::new());
const MAX_TRACES: usize = 4;

thread_local! {
    /// Set while this thread is inside the hook (capturing a backtrace allocates).
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

impl CountingAlloc {
    fn note(size: usize) {
        if !COUNTING.load(Ordering::Relaxed) {
            return;
        }
        // try_with: the thread-local may already be gone while a thread exits.
        let reentered = IN_HOOK.try_with(|h| h.replace(true)).unwrap_or(true);
        if reentered {
            return;
        }
        let n = ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        if (n as usize) < MAX_TRACES {
            let thread = std::thread::current();
            let trace = format!(
                "allocation {} of {size} bytes on thread {:?}:\n{}",
                n + 1,
                thread.name().unwrap_or("<unnamed>"),
                std::backtrace::Backtrace::force_capture()
            );
            TRACES.lock().unwrap_or_else(|e| e.into_inner()).push(trace);
        }
        let _ = IN_HOOK.try_with(|h| h.set(false));
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments, so the
// GlobalAlloc contract is System's; the bookkeeping only touches atomics, a
// const thread-local and (re-entrantly guarded) a mutex.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::note(layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::note(new_size);
        // SAFETY: forwarded unchanged; `ptr` was allocated by System (every
        // allocation of this allocator is System's) with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; `ptr` came from System with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// One test at a time: the count is global.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `f` with counting on and returns the number of allocations and the
/// backtraces of the first ones.
fn count_allocations(f: impl FnOnce()) -> (u64, Vec<String>) {
    TRACES.lock().unwrap().clear();
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    f();
    COUNTING.store(false, Ordering::SeqCst);
    let traces = std::mem::take(&mut *TRACES.lock().unwrap());
    (ALLOCATIONS.load(Ordering::SeqCst), traces)
}

fn report(what: &str, count: u64, traces: &[String]) -> String {
    let mut out = format!("{what}: {count} heap allocations in steady state");
    for t in traces {
        let _ = write!(out, "\n----\n{t}");
    }
    out
}

const BLOCKS: usize = 64;
/// Request slots of the client.
const RESERVE: usize = 16;
/// Contexts (memories) of the submitter mode: more than the slots.
const DEPTH: usize = 32;
/// Requests in flight in the chained mode: fewer than the slots, so that a
/// callback always finds the slot its own request just gave back.
const CHAIN_DEPTH: usize = 12;

/// The shared handler: chains a new request from each completion until
/// `target` requests were issued, or parks the memory for the submitter.
struct Chain {
    client: OnceLock<Weak<DmIoClient>>,
    this: OnceLock<Weak<dyn NotifyHandler>>,
    dev: Arc<BlockDevice>,
    /// Requests issued so far (including the first ones).
    issued: AtomicUsize,
    /// Requests to issue in all; 0 means "park the memory instead".
    target: AtomicUsize,
    completed: AtomicUsize,
    errors: AtomicUsize,
    /// Parked memory, one slot per context, for the submitting thread.
    parked: Vec<Mutex<Option<DmIoMemory>>>,
    ready: Vec<AtomicBool>,
}

impl Chain {
    fn request(&self, n: usize, memory: DmIoMemory, ctx: usize) -> (DmIoRequest, DmIoRegion) {
        let handler = self.this.get().and_then(Weak::upgrade).expect("handler");
        let req = if n.is_multiple_of(2) {
            DmIoRequest::write(memory)
        } else {
            DmIoRequest::read(memory)
        };
        let req = req.with_notify(Notify::shared(&handler, ctx));
        let sector = (ctx % BLOCKS) as u64 * 8;
        (req, DmIoRegion::new(&self.dev, sector, 8))
    }
}

impl NotifyHandler for Chain {
    fn notify(&self, mut done: DmIoCompletion, ctx: usize) {
        let memory = done.memory.take();
        if !done.is_ok() || memory.as_ref().map(DmIoMemory::len) != Some(4096) {
            self.errors.fetch_add(1, Ordering::SeqCst);
        }
        let Some(memory) = memory else {
            self.completed.fetch_add(1, Ordering::SeqCst);
            return;
        };
        let target = self.target.load(Ordering::SeqCst);
        if target > 0 {
            let n = self.issued.fetch_add(1, Ordering::SeqCst);
            if n < target {
                let client = self.client.get().and_then(Weak::upgrade).expect("client");
                let (req, region) = self.request(n, memory, ctx);
                if client.submit(req, &[region]).is_err() {
                    self.errors.fetch_add(1, Ordering::SeqCst);
                }
                self.completed.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
        *self.parked[ctx].lock().unwrap() = Some(memory);
        self.ready[ctx].store(true, Ordering::SeqCst);
        self.completed.fetch_add(1, Ordering::SeqCst);
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: timed out");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Callback chaining: CHAIN_DEPTH requests in flight, each completion submits
/// the next.
fn run_chained(chain: &Arc<Chain>, client: &DmIoClient, requests: usize) {
    let start_completed = chain.completed.load(Ordering::SeqCst);
    chain.issued.store(CHAIN_DEPTH, Ordering::SeqCst);
    chain.target.store(requests, Ordering::SeqCst);
    for ctx in 0..CHAIN_DEPTH {
        chain.ready[ctx].store(false, Ordering::SeqCst);
        let memory = chain.parked[ctx].lock().unwrap().take().expect("parked memory");
        let (req, region) = chain.request(ctx, memory, ctx);
        client.submit(req, &[region]).unwrap();
    }
    // Every request completes once: the first ones plus the chained ones.
    wait_until("chained requests", || {
        chain.completed.load(Ordering::SeqCst) - start_completed == requests
            && chain.ready.iter().all(|r| r.load(Ordering::SeqCst))
    });
    chain.target.store(0, Ordering::SeqCst);
}

/// A submitting thread (this one) recycling parked memory; DEPTH contexts for a
/// client with fewer request slots, so `submit` waits for slots.
fn run_submitter(chain: &Arc<Chain>, client: &DmIoClient, requests: usize) {
    let start_completed = chain.completed.load(Ordering::SeqCst);
    chain.target.store(0, Ordering::SeqCst);
    let mut n = 0;
    while n < requests {
        let mut progressed = false;
        for ctx in 0..DEPTH {
            if n == requests {
                break;
            }
            if !chain.ready[ctx].swap(false, Ordering::SeqCst) {
                continue;
            }
            let memory = chain.parked[ctx].lock().unwrap().take().expect("parked memory");
            let (req, region) = chain.request(n, memory, ctx);
            client.submit(req, &[region]).unwrap();
            n += 1;
            progressed = true;
        }
        if !progressed {
            std::thread::yield_now();
        }
    }
    wait_until("submitted requests", || {
        chain.completed.load(Ordering::SeqCst) - start_completed == requests
            && chain.ready.iter().all(|r| r.load(Ordering::SeqCst))
    });
}

/// Blocking calls, recycling one page list.
fn run_sync(
    client: &DmIoClient,
    dev: &Arc<BlockDevice>,
    memory: &mut Option<DmIoMemory>,
    n: usize,
) {
    for i in 0..n {
        let mem = memory.take().expect("memory");
        let req =
            if i.is_multiple_of(2) { DmIoRequest::write(mem) } else { DmIoRequest::read(mem) };
        let region = DmIoRegion::new(dev, (i % BLOCKS) as u64 * 8, 8);
        let mut done = client.io_sync(req, &[region]).unwrap();
        assert!(done.is_ok());
        *memory = done.memory.take();
    }
}

fn zero_allocations_per_io(engine: EngineChoice) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let td = TestDevice::new(Backing::File, 4 << 20);
    let client =
        Arc::new(client_with_config(engine, DmIoConfig { reserve: RESERVE, ..Default::default() }));
    let pool = client.page_pool();
    let chain = Arc::new(Chain {
        client: OnceLock::new(),
        this: OnceLock::new(),
        dev: td.dev.clone(),
        issued: AtomicUsize::new(0),
        target: AtomicUsize::new(0),
        completed: AtomicUsize::new(0),
        errors: AtomicUsize::new(0),
        // Every request uses one pool page (registered with the ring), as a page
        // list built once and handed back by each completion.
        parked: (0..DEPTH)
            .map(|_| Mutex::new(Some(DmIoMemory::PageList(PageList::new(vec![pool.alloc()])))))
            .collect(),
        ready: (0..DEPTH).map(|_| AtomicBool::new(true)).collect(),
    });
    let _ = chain.client.set(Arc::downgrade(&client));
    let handler: Arc<dyn NotifyHandler> = chain.clone();
    let _ = chain.this.set(Arc::downgrade(&handler));
    let mut sync_mem = Some(DmIoMemory::PageList(PageList::new(vec![pool.alloc()])));

    // Warm up every path: thread-locals, channel wait lists, vector capacities.
    run_chained(&chain, &client, 1000);
    run_submitter(&chain, &client, 1000);
    run_sync(&client, &td.dev, &mut sync_mem, 200);
    let stats_before = client.stats();

    let mut failures = Vec::new();
    let (count, traces) = count_allocations(|| run_chained(&chain, &client, 10_000));
    if count > 0 {
        failures.push(report(&format!("{engine:?}, callback-chained async"), count, &traces));
    }
    let (count, traces) = count_allocations(|| run_submitter(&chain, &client, 10_000));
    if count > 0 {
        failures.push(report(&format!("{engine:?}, async from a submitter"), count, &traces));
    }
    let (count, traces) = count_allocations(|| run_sync(&client, &td.dev, &mut sync_mem, 2000));
    if count > 0 {
        failures.push(report(&format!("{engine:?}, io_sync"), count, &traces));
    }

    let stats = client.stats();
    assert_eq!(chain.errors.load(Ordering::SeqCst), 0, "{engine:?}: failed requests");
    assert_eq!(stats.requests - stats_before.requests, 22_000, "{engine:?}: {stats:?}");
    if engine == EngineChoice::Uring && stats.fixed_buffer_ops == 0 {
        eprintln!("note: the page pool is not registered (fixed buffers unused)");
    }
    drop(handler);
    client.close();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn zero_allocations_per_io_uring_engine() {
    zero_allocations_per_io(EngineChoice::Uring);
}

#[test]
fn zero_allocations_per_io_sync_engine() {
    zero_allocations_per_io(EngineChoice::Sync);
}
