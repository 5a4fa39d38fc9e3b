//! The worker: one thread per client that owns every job's state.
//!
//! Callers and dm-io completions only send messages; the worker alone touches
//! jobs, sub-jobs, the page queue and the throttle queue, so none of that needs a
//! lock, and every user callback runs here, one at a time. One pass of the
//! worker handles every message waiting (completions hand pages back, finished
//! jobs run their callbacks), then retries throttled I/O, then starts sub-jobs
//! from the page queue: the kernel's complete → pages → io order.
//!
//! The one exception is a copy job's relay (no throttle, no WRITE_SEQ): its
//! chunks go from read to write to the next chunk's read in dm-io callbacks on
//! the completion thread, which claim chunks from the job's shared cursor, and
//! the worker only records the written chunks, in batches (see [`Relay`]).

use std::collections::{BTreeMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::thread::ThreadId;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use dmio::{
    DmIoClient, DmIoCompletion, DmIoMemory, DmIoOp, DmIoRegion, DmIoRequest, Errno, ErrorBits,
    IoPriority, Notify, NotifyHandler, PAGE_SIZE, PageList, PagePool, RegionFailure, SECTOR_SIZE,
};

use crate::config::SUB_JOBS_IN_FLIGHT;
use crate::job::{CopyFlags, JobOutcome, JobShared};
use crate::stats::Counters;
use crate::throttle::{MAX_RETRIES, RETRY_STEP, Throttle};

/// How many failures an outcome keeps in detail.
const MAX_FAILURES: usize = 16;

/// A user callback.
pub(crate) type NotifyFn = Box<dyn FnOnce(JobOutcome) + Send>;

/// A completed [`CallbackToken`](crate::CallbackToken) on its way to the worker.
pub(crate) struct TokenDone {
    pub(crate) notify: NotifyFn,
    pub(crate) outcome: JobOutcome,
}

/// What the worker receives.
pub(crate) enum Msg {
    /// A new, validated job.
    Job(Box<JobSpec>),
    /// A dm-io request of sub-job `sub` completed.
    Io { sub: usize, completion: DmIoCompletion },
    /// A prepared callback was completed.
    Token(Box<TokenDone>),
    /// Some job's cancel flag was set.
    Cancel,
    /// Answer once everything received so far has been processed.
    Flush(Sender<()>),
    /// Exit once no job is left.
    Shutdown,
    /// A relayed sub-job `sub` comes back to the worker, now at chunk
    /// (`offset`, `sectors`) (the relay may have moved it on since the worker
    /// last heard of it), with the completion of that chunk's `stage`: a read
    /// that failed or whose write dm-io refused, or a write.
    Relay { sub: usize, offset: u64, sectors: u64, stage: Stage, completion: DmIoCompletion },
    /// The relay claimed chunk (`offset`, `sectors`) for sub-job `sub`, but
    /// dm-io refused its read: the worker issues it into `memory`.
    RelayRefused { sub: usize, offset: u64, sectors: u64, memory: Option<DmIoMemory> },
    /// Relays have written chunks to account (see `Relay::done`).
    RelayDone,
}

/// Sends messages to a client's worker.
#[derive(Clone)]
pub(crate) struct Notifier {
    tx: Sender<Msg>,
}

impl Notifier {
    pub(crate) fn send(&self, msg: Msg) {
        // The worker holds the receiver until it exits, and it exits only when no
        // job, token or handle can still be waiting on it.
        let _ = self.tx.send(msg);
    }
}

/// What a job does.
pub(crate) enum JobKind {
    /// Copy from this source region.
    Copy(DmIoRegion),
    /// Zero the destinations.
    Zero,
}

/// A validated job, as the caller's thread hands it over.
pub(crate) struct JobSpec {
    pub(crate) kind: JobKind,
    pub(crate) dests: Vec<DmIoRegion>,
    pub(crate) flags: CopyFlags,
    pub(crate) notify: NotifyFn,
    pub(crate) shared: Arc<JobShared>,
}

/// The job count and the closed flag, under one lock so that a job can never be
/// accepted after destroy has seen the count reach zero.
#[derive(Debug, Default)]
struct JobCount {
    count: usize,
    closed: bool,
}

/// State shared between the client handle, tokens and the worker.
pub(crate) struct ClientShared {
    pub(crate) notifier: Notifier,
    jobs: Mutex<JobCount>,
    all_done: Condvar,
    pub(crate) worker: OnceLock<ThreadId>,
    pub(crate) counters: Counters,
    /// Some job waits in the page queue: relayed sub-jobs then hand their pages
    /// back through the worker instead of claiming the next chunk themselves.
    pages_wanted: AtomicBool,
}

impl ClientShared {
    pub(crate) fn new(tx: Sender<Msg>) -> Arc<ClientShared> {
        Arc::new(ClientShared {
            notifier: Notifier { tx },
            jobs: Mutex::new(JobCount::default()),
            all_done: Condvar::new(),
            worker: OnceLock::new(),
            counters: Counters::default(),
            pages_wanted: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JobCount> {
        // Two integers and a flag: always consistent, even after a panic elsewhere.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new job (or token), unless the client is closing.
    pub(crate) fn begin_job(&self) -> bool {
        let mut jobs = self.lock();
        if jobs.closed {
            return false;
        }
        jobs.count += 1;
        true
    }

    fn end_job(&self) {
        let mut jobs = self.lock();
        jobs.count = jobs.count.saturating_sub(1);
        if jobs.count == 0 {
            self.all_done.notify_all();
        }
    }

    pub(crate) fn jobs_in_flight(&self) -> usize {
        self.lock().count
    }

    /// Refuses new jobs from now on.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
    }

    /// Waits until every counted job has run its callback.
    pub(crate) fn wait_all_done(&self) {
        let mut jobs = self.lock();
        while jobs.count > 0 {
            jobs = self.all_done.wait(jobs).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Whether the calling thread is this client's worker.
    pub(crate) fn on_worker(&self) -> bool {
        self.worker.get() == Some(&std::thread::current().id())
    }
}

thread_local! {
    /// Set on every kcopyd worker thread (of any client).
    static ON_A_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is the worker of any kcopyd client, that is,
/// whether this code runs inside a kcopyd callback. Blocking there would stall
/// that client, and two clients waiting on each other would deadlock.
pub(crate) fn in_kcopyd_callback() -> bool {
    ON_A_WORKER.with(std::cell::Cell::get)
}

/// A minimal slab: stable keys for jobs and sub-jobs, reused after removal.
struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
    len: usize,
}

impl<T> Slab<T> {
    fn new() -> Slab<T> {
        Slab { items: Vec::new(), free: Vec::new(), len: 0 }
    }

    fn insert(&mut self, item: T) -> usize {
        self.len += 1;
        if let Some(key) = self.free.pop() {
            self.items[key] = Some(item);
            key
        } else {
            self.items.push(Some(item));
            self.items.len() - 1
        }
    }

    fn remove(&mut self, key: usize) -> Option<T> {
        let item = self.items.get_mut(key)?.take()?;
        self.free.push(key);
        self.len -= 1;
        Some(item)
    }

    fn get(&self, key: usize) -> Option<&T> {
        self.items.get(key)?.as_ref()
    }

    fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        self.items.get_mut(key)?.as_mut()
    }

    fn keys(&self) -> Vec<usize> {
        self.items.iter().enumerate().filter(|(_, i)| i.is_some()).map(|(k, _)| k).collect()
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A job in the worker.
struct Job {
    source: Option<DmIoRegion>,
    dests: Vec<DmIoRegion>,
    flags: CopyFlags,
    notify: Option<NotifyFn>,
    shared: Arc<JobShared>,
    /// For zero jobs: write-zeroes, or writes of zero memory.
    zero_op: DmIoOp,
    total_sectors: u64,
    /// Everything below this (relative to the regions' starts) has been claimed.
    /// Shared with the relay, whose callbacks claim chunks too.
    next_sector: Arc<AtomicU64>,
    /// Set for copy jobs without a throttle or WRITE_SEQ: their chunks go from
    /// read to write to the next chunk's read on the dm-io completion thread.
    relay: Option<Arc<Relay>>,
    in_flight: usize,
    /// Entries of this job in the page queue.
    queued: usize,
    /// No new sub-job starts (an error without IGNORE_ERROR, or a cancel).
    stopped: bool,
    /// An error happened that stops the job.
    failed: bool,
    /// WRITE_SEQ: the offset of the first chunk that failed. No chunk from there
    /// on is written; the chunks before it still are, in order.
    seq_fail_at: Option<u64>,
    read_err: bool,
    write_err: ErrorBits,
    failures: Vec<RegionFailure>,
    used_write_zeroes: bool,
    /// WRITE_SEQ: the offset of the next chunk that may be written.
    seq_next: u64,
    /// WRITE_SEQ: sub-jobs whose data is in, waiting for their turn, by offset.
    seq_parked: BTreeMap<u64, usize>,
    /// The error-free prefix (sectors), and finished error-free chunks beyond it.
    prefix: u64,
    ok_beyond: BTreeMap<u64, u64>,
}

impl Job {
    fn is_seq(&self) -> bool {
        self.flags.contains(CopyFlags::WRITE_SEQ)
    }

    fn ignores_errors(&self) -> bool {
        self.flags.contains(CopyFlags::IGNORE_ERROR) && !self.is_seq()
    }

    fn cancel_requested(&self) -> bool {
        self.shared.cancel.load(Ordering::Acquire)
    }

    fn next_sector(&self) -> u64 {
        self.next_sector.load(Ordering::Acquire)
    }

    fn can_claim(&self) -> bool {
        !self.stopped && !self.cancel_requested() && self.next_sector() < self.total_sectors
    }

    fn add_failures(&mut self, failures: Vec<RegionFailure>) {
        let room = MAX_FAILURES.saturating_sub(self.failures.len());
        self.failures.extend(failures.into_iter().take(room));
    }

    fn record_ok(&mut self, offset: u64, sectors: u64) {
        if offset != self.prefix {
            self.ok_beyond.insert(offset, offset + sectors);
            return;
        }
        self.prefix += sectors;
        while let Some(end) = self.ok_beyond.remove(&self.prefix) {
            self.prefix = end;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Read,
    Write,
}

/// One chunk of a job: read into pages, then written to every destination.
struct SubJob {
    job: usize,
    offset: u64,
    sectors: u64,
    stage: Stage,
    memory: Option<DmIoMemory>,
    read_failed: bool,
    /// The operation of the last submission (a zero chunk may switch from
    /// write-zeroes to writes).
    op: DmIoOp,
}

/// A sub-job's I/O held back by the throttle.
struct Throttled {
    sub: usize,
    next_try: Instant,
    tries: u32,
}

/// A stage that ended without a dm-io completion (the submission was refused).
struct LocalFailure {
    sub: usize,
    error_bits: ErrorBits,
    failures: Vec<RegionFailure>,
}

/// The worker's state.
pub(crate) struct Worker {
    shared: Arc<ClientShared>,
    rx: Receiver<Msg>,
    dmio: Arc<DmIoClient>,
    pool: PagePool,
    handler: Arc<dyn NotifyHandler>,
    throttle: Option<Arc<Throttle>>,
    ioprio: IoPriority,
    sub_job_sectors: u64,
    pages_per_sub_job: usize,
    jobs: Slab<Job>,
    subs: Slab<SubJob>,
    page_queue: VecDeque<usize>,
    /// Whether the head of the page queue is already counted as waiting.
    page_blocked: bool,
    throttled: VecDeque<Throttled>,
    local_failures: VecDeque<LocalFailure>,
    flushes: Vec<Sender<()>>,
    regions: Vec<DmIoRegion>,
    exiting: bool,
}

/// Everything the worker needs from the client.
pub(crate) struct WorkerSetup {
    pub(crate) shared: Arc<ClientShared>,
    pub(crate) rx: Receiver<Msg>,
    pub(crate) dmio: Arc<DmIoClient>,
    pub(crate) pool: PagePool,
    pub(crate) throttle: Option<Arc<Throttle>>,
    pub(crate) ioprio: IoPriority,
    pub(crate) sub_job_bytes: u64,
}

impl Worker {
    pub(crate) fn new(setup: WorkerSetup) -> Worker {
        let tx = setup.shared.notifier.tx.clone();
        // dm-io completions become messages; the sub-job key rides in the context.
        let handler: Arc<dyn NotifyHandler> =
            Arc::new(move |completion: DmIoCompletion, sub: usize| {
                let _ = tx.send(Msg::Io { sub, completion });
            });

        Worker {
            shared: setup.shared,
            rx: setup.rx,
            dmio: setup.dmio,
            pool: setup.pool,
            handler,
            throttle: setup.throttle,
            ioprio: setup.ioprio,
            sub_job_sectors: setup.sub_job_bytes / SECTOR_SIZE,
            pages_per_sub_job: (setup.sub_job_bytes as usize).div_ceil(PAGE_SIZE),
            jobs: Slab::new(),
            subs: Slab::new(),
            page_queue: VecDeque::new(),
            page_blocked: false,
            throttled: VecDeque::new(),
            local_failures: VecDeque::new(),
            flushes: Vec::new(),
            regions: Vec::with_capacity(crate::MAX_DESTINATIONS),
            exiting: false,
        }
    }

    /// The worker thread's body.
    pub(crate) fn run(mut self) {
        let _ = self.shared.worker.set(std::thread::current().id());
        ON_A_WORKER.with(|c| c.set(true));
        loop {
            // Wake for the throttle's next retry, and, while the page queue waits,
            // now and then: pages handed out by `page_pool()` to others come back
            // without a message.
            let deadline = match (self.throttled.front(), self.page_blocked) {
                (Some(t), true) => Some(t.next_try.min(Instant::now() + RETRY_STEP)),
                (Some(t), false) => Some(t.next_try),
                (None, true) => Some(Instant::now() + RETRY_STEP),
                (None, false) => None,
            };
            let first = match deadline {
                Some(deadline) => match self.rx.recv_deadline(deadline) {
                    Ok(msg) => Some(msg),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
                None => match self.rx.recv() {
                    Ok(msg) => Some(msg),
                    Err(_) => return,
                },
            };
            if let Some(msg) = first {
                self.handle(msg);
            }
            // Take what else is waiting, but not forever: a steady stream of
            // completions must not starve the queues below.
            for _ in 0..1024 {
                match self.rx.try_recv() {
                    Ok(msg) => self.handle(msg),
                    Err(_) => break,
                }
            }
            self.retry_throttled();
            loop {
                self.handle_local_failures();
                self.service_page_queue();
                if self.local_failures.is_empty() {
                    break;
                }
            }
            self.shared.pages_wanted.store(!self.page_queue.is_empty(), Ordering::Release);
            for flush in self.flushes.drain(..) {
                let _ = flush.send(());
            }
            if self.exiting && self.jobs.is_empty() && self.shared.jobs_in_flight() == 0 {
                return;
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Job(spec) => self.accept(*spec),
            Msg::Io { sub, completion } => {
                if let Some(t) = &self.throttle {
                    t.io_end();
                }
                self.stage_done(sub, completion.error_bits, completion.failures, completion.memory);
            }
            Msg::Token(done) => {
                let TokenDone { notify, outcome } = *done;
                self.run_callback(notify, outcome, None);
            }
            Msg::Cancel => {
                for key in self.jobs.keys() {
                    let Some(job) = self.jobs.get(key) else { continue };
                    if job.cancel_requested() && !job.stopped {
                        self.stop(key);
                        self.maybe_finish(key);
                    }
                }
            }
            Msg::Flush(reply) => self.flushes.push(reply),
            Msg::Shutdown => self.exiting = true,
            Msg::Relay { sub: key, offset, sectors, stage, completion } => {
                if let Some(sub) = self.subs.get_mut(key) {
                    sub.offset = offset;
                    sub.sectors = sectors;
                    sub.stage = stage;
                    sub.op = if stage == Stage::Read { DmIoOp::Read } else { DmIoOp::Write };
                    sub.read_failed = false;
                    let job = sub.job;
                    self.account_relayed(job);
                }
                self.stage_done(key, completion.error_bits, completion.failures, completion.memory);
            }
            Msg::RelayRefused { sub: key, offset, sectors, memory } => {
                if let Some(sub) = self.subs.get_mut(key) {
                    sub.offset = offset;
                    sub.sectors = sectors;
                    sub.stage = Stage::Read;
                    sub.op = DmIoOp::Read;
                    sub.read_failed = false;
                    sub.memory = memory;
                    self.issue(key);
                }
            }
            Msg::RelayDone => {
                for key in self.jobs.keys() {
                    self.account_relayed(key);
                }
            }
        }
    }

    /// A relayed chunk was written to every destination without error, and its
    /// sub-job went on with the next chunk: account the one, adopt the other.
    /// Records the chunks the job's relay wrote without error as done.
    fn account_relayed(&mut self, job_key: usize) {
        let Some(job) = self.jobs.get_mut(job_key) else { return };
        let Some(relay) = job.relay.clone() else { return };
        let done = std::mem::take(&mut *relay.done.lock().unwrap_or_else(|e| e.into_inner()));
        for (offset, sectors) in done {
            job.record_ok(offset, sectors);
        }
    }

    fn accept(&mut self, spec: JobSpec) {
        let counters = &self.shared.counters;
        counters.jobs.fetch_add(1, Ordering::Relaxed);
        let (source, total_sectors) = match spec.kind {
            JobKind::Copy(from) => {
                let count = from.count;
                (Some(from), count)
            }
            JobKind::Zero => (None, spec.dests.first().map_or(0, |d| d.count)),
        };
        let zero_op = if spec.dests.iter().all(|d| d.device.supports_write_zeroes()) {
            DmIoOp::WriteZeroes
        } else {
            DmIoOp::Write
        };
        let is_copy = source.is_some();
        let next_sector = Arc::new(AtomicU64::new(0));
        let relay = match &source {
            Some(source)
                if self.throttle.is_none() && !spec.flags.contains(CopyFlags::WRITE_SEQ) =>
            {
                Some(Arc::new(Relay {
                    dmio: Arc::downgrade(&self.dmio),
                    client: self.shared.clone(),
                    job: spec.shared.clone(),
                    source: source.clone(),
                    dests: spec.dests.clone(),
                    next_sector: next_sector.clone(),
                    total_sectors,
                    sub_job_sectors: self.sub_job_sectors,
                    ignores_errors: spec.flags.contains(CopyFlags::IGNORE_ERROR),
                    ioprio: self.ioprio,
                    stopped: AtomicBool::new(false),
                    done: Mutex::new(Vec::with_capacity(RELAY_DONE_BATCH)),
                }))
            }
            _ => None,
        };
        let key = self.jobs.insert(Job {
            source,
            relay,
            dests: spec.dests,
            flags: spec.flags,
            notify: Some(spec.notify),
            shared: spec.shared,
            zero_op,
            total_sectors,
            next_sector,
            in_flight: 0,
            queued: 0,
            stopped: false,
            failed: false,
            seq_fail_at: None,
            read_err: false,
            write_err: ErrorBits::NONE,
            failures: Vec::new(),
            used_write_zeroes: false,
            seq_next: 0,
            seq_parked: BTreeMap::new(),
            prefix: 0,
            ok_beyond: BTreeMap::new(),
        });
        if total_sectors == 0 {
            self.maybe_finish(key);
        } else if is_copy {
            let chunks = total_sectors.div_ceil(self.sub_job_sectors);
            let entries = chunks.min(SUB_JOBS_IN_FLIGHT as u64) as usize;
            if let Some(job) = self.jobs.get_mut(key) {
                job.queued = entries;
            }
            self.page_queue.extend(std::iter::repeat_n(key, entries));
        } else {
            self.start_zero_sub_jobs(key);
        }
    }

    /// Claims the job's next chunk: (offset, sectors).
    fn claim(&mut self, key: usize) -> Option<(u64, u64)> {
        let job = self.jobs.get_mut(key)?;
        let (offset, sectors) =
            claim_chunk(&job.next_sector, job.total_sectors, self.sub_job_sectors)?;
        job.in_flight += 1;
        self.shared.counters.sub_jobs.fetch_add(1, Ordering::Relaxed);
        Some((offset, sectors))
    }

    /// Starts zeroing sub-jobs (no pages needed). Under WRITE_SEQ one at a time:
    /// with no reads to overlap, that alone keeps the writes in order.
    fn start_zero_sub_jobs(&mut self, key: usize) {
        while let Some(job) = self.jobs.get(key) {
            let limit = if job.is_seq() { 1 } else { SUB_JOBS_IN_FLIGHT };
            if job.in_flight >= limit || !job.can_claim() {
                break;
            }
            let Some((offset, sectors)) = self.claim(key) else { break };
            let sub = self.subs.insert(SubJob {
                job: key,
                offset,
                sectors,
                stage: Stage::Write,
                memory: None,
                read_failed: false,
                op: DmIoOp::Write,
            });
            self.issue(sub);
        }
    }

    /// Starts copy sub-jobs from the head of the page queue while pages last.
    /// The queue is strictly FIFO: when the head cannot get its pages, nobody
    /// behind it may take pages either.
    fn service_page_queue(&mut self) {
        while let Some(&key) = self.page_queue.front() {
            let Some(job) = self.jobs.get_mut(key) else {
                self.page_queue.pop_front();
                continue;
            };
            if !job.can_claim() {
                self.page_queue.pop_front();
                job.queued -= 1;
                self.maybe_finish(key);
                continue;
            }
            // Always a whole sub-job's pages, even for a shorter last chunk: every
            // allocation then takes, and every finished sub-job gives back, one
            // whole run of the arena's free list, so each sub-job's pages stay
            // physically contiguous and reach the kernel as one iovec.
            let needed = self.pages_per_sub_job;
            let mut pages = Vec::with_capacity(needed);
            while pages.len() < needed {
                match self.pool.try_alloc() {
                    Some(page) => pages.push(page),
                    None => break,
                }
            }
            if pages.len() < needed {
                // Give back what was taken and wait for a sub-job to return pages.
                drop(pages);
                if !self.page_blocked {
                    self.page_blocked = true;
                    self.shared.counters.page_waits.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            self.page_blocked = false;
            self.page_queue.pop_front();
            job.queued -= 1;
            let Some((offset, sectors)) = self.claim(key) else {
                self.maybe_finish(key);
                continue;
            };
            let sub = self.subs.insert(SubJob {
                job: key,
                offset,
                sectors,
                stage: Stage::Read,
                memory: Some(DmIoMemory::PageList(PageList::new(pages))),
                read_failed: false,
                op: DmIoOp::Read,
            });
            self.issue(sub);
        }
    }

    /// Issues the sub-job's current stage, unless the throttle holds it back.
    fn issue(&mut self, sub: usize) {
        if let Some(t) = &self.throttle {
            // Throttled I/O stays in order: nothing overtakes what is waiting.
            if !self.throttled.is_empty() || t.should_wait() {
                self.shared.counters.throttle_waits.fetch_add(1, Ordering::Relaxed);
                self.throttled.push_back(Throttled {
                    sub,
                    next_try: Instant::now() + RETRY_STEP,
                    tries: 0,
                });
                return;
            }
        }
        self.submit(sub);
    }

    /// Lets throttled I/O go, in order. Once the gate opens, everything queued
    /// behind the head that the gate still admits goes too, so the I/O keeps its
    /// parallelism in the time the throttle allows.
    fn retry_throttled(&mut self) {
        let Some(throttle) = self.throttle.clone() else { return };
        let now = Instant::now();
        let mut opened = false;
        while let Some(head) = self.throttled.front_mut() {
            if head.next_try > now && !opened {
                break;
            }
            head.tries += 1;
            if head.tries < MAX_RETRIES && throttle.should_wait() {
                head.next_try = now + RETRY_STEP;
                break;
            }
            opened = true;
            let sub = head.sub;
            self.throttled.pop_front();
            self.submit(sub);
        }
    }

    /// Hands the sub-job's current stage to dm-io.
    fn submit(&mut self, key: usize) {
        let Some(sub) = self.subs.get_mut(key) else { return };
        let Some(job) = self.jobs.get(sub.job) else { return };
        self.regions.clear();
        let (offset, sectors) = (sub.offset, sub.sectors);
        let at = |r: &DmIoRegion| DmIoRegion::new(&r.device, r.sector + offset, sectors);
        let req = match (sub.stage, &job.source) {
            (Stage::Read, Some(source)) => {
                self.regions.push(at(source));
                DmIoRequest::read(sub.memory.take().unwrap_or(DmIoMemory::Zeroes(0)))
            }
            (Stage::Read, None) => return,
            (Stage::Write, source) => {
                self.regions.extend(job.dests.iter().map(at));
                if source.is_some() {
                    // The pages come back with the read's completion. Without them
                    // (the read was refused before any I/O, and IGNORE_ERROR goes
                    // on), the chunk is written as zeros, as a failed read leaves it.
                    let bytes = (sectors * SECTOR_SIZE) as usize;
                    DmIoRequest::write(sub.memory.take().unwrap_or(DmIoMemory::Zeroes(bytes)))
                } else if job.zero_op == DmIoOp::WriteZeroes {
                    DmIoRequest::write_zeroes()
                } else {
                    DmIoRequest::write(DmIoMemory::Zeroes((sectors * SECTOR_SIZE) as usize))
                }
            }
        };
        let op = req.op;
        sub.op = op;
        let req = req.with_ioprio(self.ioprio);
        // A copy chunk's write normally starts from the worker once the read's
        // completion reaches it. Without a throttle to ask and without WRITE_SEQ
        // ordering to keep, the job's relay takes over: the read's callback
        // submits the write, and the write's callback the next chunk's read, all
        // on the completion thread (see `Relay`).
        let req = if let (DmIoOp::Read, Some(relay)) = (op, &job.relay) {
            let relay = relay.clone();
            req.with_notify(Notify::new(move |completion| {
                relay.read_done(key, offset, sectors, completion)
            }))
        } else {
            req.with_notify(Notify::shared(&self.handler, key))
        };
        if let Some(t) = &self.throttle {
            t.io_start();
        }
        if let Err(error) = self.dmio.submit(req, &self.regions) {
            if let Some(t) = &self.throttle {
                t.io_end();
            }
            // Refused (the dm-io client is closed, or a device changed under us):
            // every region of this stage failed, with the errno when there is one.
            let errno = Errno(error.errno().map_or(libc::EIO, Errno::raw));
            let mut error_bits = ErrorBits::NONE;
            let failures = self
                .regions
                .iter()
                .enumerate()
                .map(|(region, r)| {
                    error_bits.set(region);
                    RegionFailure { region, device: r.device.clone(), sector: r.sector, op, errno }
                })
                .collect();
            self.local_failures.push_back(LocalFailure { sub: key, error_bits, failures });
        }
    }

    fn handle_local_failures(&mut self) {
        while let Some(f) = self.local_failures.pop_front() {
            self.stage_done(f.sub, f.error_bits, f.failures, None);
        }
    }

    /// A sub-job's read or write ended.
    fn stage_done(
        &mut self,
        key: usize,
        error_bits: ErrorBits,
        failures: Vec<RegionFailure>,
        memory: Option<DmIoMemory>,
    ) {
        let Some(sub) = self.subs.get_mut(key) else { return };
        let (stage, op, job_key) = (sub.stage, sub.op, sub.job);
        let bytes = sub.sectors * SECTOR_SIZE;
        let (offset, end) = (sub.offset, sub.offset + sub.sectors);
        let read_failed = sub.read_failed || (stage == Stage::Read && !error_bits.is_empty());
        sub.read_failed = read_failed;
        if stage == Stage::Read {
            sub.memory = memory;
            sub.stage = Stage::Write;
        }
        let Some(job) = self.jobs.get_mut(job_key) else { return };
        let counters = &self.shared.counters;
        match stage {
            Stage::Read => {
                if error_bits.is_empty() {
                    counters.bytes_read.fetch_add(bytes, Ordering::Relaxed);
                } else {
                    job.read_err = true;
                    job.add_failures(failures);
                    if !job.ignores_errors() {
                        // Nothing of this chunk is written, and no chunk after it.
                        job.failed = true;
                        self.seq_failed_at(job_key, offset);
                        self.stop(job_key);
                        self.finish_sub(key, false);
                        return;
                    }
                }
                if job.is_seq() {
                    if job.seq_fail_at.is_some_and(|at| offset >= at) {
                        self.finish_sub(key, false);
                    } else if offset != job.seq_next {
                        job.seq_parked.insert(offset, key);
                    } else {
                        self.issue(key);
                    }
                    return;
                }
                self.issue(key);
            }
            Stage::Write => {
                if op == DmIoOp::WriteZeroes
                    && !error_bits.is_empty()
                    && failures.iter().all(RegionFailure::is_not_supported)
                {
                    // A device that claimed write-zeroes support refused it: write
                    // zero memory instead, for this chunk and the rest of the job.
                    job.zero_op = DmIoOp::Write;
                    job.used_write_zeroes = false;
                    self.issue(key);
                    return;
                }
                let written = job.dests.len() as u64 - u64::from(error_bits.count());
                counters.bytes_written.fetch_add(bytes * written, Ordering::Relaxed);
                if op == DmIoOp::WriteZeroes && error_bits.is_empty() {
                    counters.write_zeroes_ops.fetch_add(1, Ordering::Relaxed);
                    if job.zero_op == DmIoOp::WriteZeroes {
                        job.used_write_zeroes = true;
                    }
                }
                let ok = error_bits.is_empty() && !read_failed;
                let mut stop = false;
                if !error_bits.is_empty() {
                    job.write_err = ErrorBits::from_bits(job.write_err.bits() | error_bits.bits());
                    job.add_failures(failures);
                    if !job.ignores_errors() {
                        job.failed = true;
                        stop = true;
                    }
                }
                let seq = job.is_seq();
                if seq {
                    job.seq_next = end;
                }
                if stop {
                    // This chunk was (partly) written; no later one may be.
                    self.seq_failed_at(job_key, end);
                    self.stop(job_key);
                }
                self.finish_sub(key, ok);
                if seq {
                    self.release_parked(job_key);
                }
            }
        }
    }

    /// WRITE_SEQ: no chunk at or after `offset` may be written any more; the
    /// parked ones there end unwritten.
    fn seq_failed_at(&mut self, job_key: usize, offset: u64) {
        let Some(job) = self.jobs.get_mut(job_key) else { return };
        if !job.is_seq() {
            return;
        }
        let at = job.seq_fail_at.map_or(offset, |at| at.min(offset));
        job.seq_fail_at = Some(at);
        let dropped: Vec<usize> = job.seq_parked.split_off(&at).into_values().collect();
        for sub in dropped {
            self.finish_sub(sub, false);
        }
    }

    /// WRITE_SEQ: issues the parked write whose turn it is.
    fn release_parked(&mut self, job_key: usize) {
        let Some(job) = self.jobs.get_mut(job_key) else { return };
        let next = job.seq_next;
        if let Some(sub) = job.seq_parked.remove(&next) {
            self.issue(sub);
        }
    }

    /// No new sub-job of this job starts.
    fn stop(&mut self, job_key: usize) {
        let Some(job) = self.jobs.get_mut(job_key) else { return };
        job.stopped = true;
        if let Some(relay) = &job.relay {
            relay.stopped.store(true, Ordering::Release);
        }
        if job.queued > 0 {
            job.queued = 0;
            self.page_queue.retain(|&k| k != job_key);
        }
    }

    /// A sub-job is over: return its pages, account it, and start the job's
    /// next chunk or finish the job.
    fn finish_sub(&mut self, key: usize, ok: bool) {
        let Some(sub) = self.subs.remove(key) else { return };
        drop(sub.memory);
        let job_key = sub.job;
        let Some(job) = self.jobs.get_mut(job_key) else { return };
        job.in_flight -= 1;
        // Shared with the relay, which adds the chunks it finishes.
        job.shared.bytes_done.fetch_add(sub.sectors * SECTOR_SIZE, Ordering::AcqRel);
        if ok {
            job.record_ok(sub.offset, sub.sectors);
        }
        if job.can_claim() {
            if job.source.is_some() {
                job.queued += 1;
                self.page_queue.push_back(job_key);
            } else {
                self.start_zero_sub_jobs(job_key);
            }
        }
        self.maybe_finish(job_key);
    }

    /// Runs the job's callback once nothing of it is left in flight or queued.
    fn maybe_finish(&mut self, key: usize) {
        let Some(job) = self.jobs.get(key) else { return };
        if job.in_flight > 0 || job.queued > 0 || !job.seq_parked.is_empty() || job.can_claim() {
            return;
        }
        self.account_relayed(key);
        let Some(mut job) = self.jobs.remove(key) else { return };
        let outcome = JobOutcome {
            read_err: job.read_err,
            write_err: job.write_err,
            // A job that had already failed reports its error, not the cancel.
            cancelled: job.cancel_requested()
                && !job.failed
                && job.next_sector() < job.total_sectors,
            total_bytes: job.total_sectors * SECTOR_SIZE,
            bytes_done: job.shared.bytes_done.load(Ordering::Acquire),
            completed_prefix_bytes: job.prefix * SECTOR_SIZE,
            used_write_zeroes: job.used_write_zeroes,
            failures: std::mem::take(&mut job.failures),
        };
        if let Some(notify) = job.notify.take() {
            self.run_callback(notify, outcome, Some(&job.shared));
        }
    }

    /// Runs a user callback. A panic in it is caught and counted: the job is
    /// already accounted for, so the worker and the other jobs go on.
    fn run_callback(&mut self, notify: NotifyFn, outcome: JobOutcome, job: Option<&JobShared>) {
        if catch_unwind(AssertUnwindSafe(|| notify(outcome))).is_err() {
            self.shared.counters.callback_panics.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(job) = job {
            job.finished.store(true, Ordering::Release);
        }
        self.shared.end_job();
    }
}

/// Claims the next chunk below `total` (sectors): (offset, sectors).
fn claim_chunk(cursor: &AtomicU64, total: u64, step: u64) -> Option<(u64, u64)> {
    let offset = cursor
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |next| {
            (next < total).then(|| next + step.min(total - next))
        })
        .ok()?;
    Some((offset, step.min(total - offset)))
}

/// The fast path of a copy job without throttle or WRITE_SEQ, run by dm-io
/// callbacks on the completion thread: a chunk's read callback submits its
/// write to every destination, and that write's callback claims the job's next
/// chunk and submits its read into the same pages. The callbacks count each
/// written chunk's bytes themselves and list it for the worker's error-free
/// prefix; the worker is woken only every `RELAY_DONE_BATCH` chunks, and none
/// of its work is on the I/O path. Anything unusual (an error, a refused submission, a cancel or stop, another
/// job waiting for pages, the job's end) hands the sub-job back to the worker,
/// which then goes on exactly as without the relay.
struct Relay {
    /// Weak: a callback must never hold the last reference to the client it
    /// runs on (the worker and the kcopyd client hold strong ones until every
    /// job is over, but a weak one makes that not matter).
    dmio: Weak<DmIoClient>,
    client: Arc<ClientShared>,
    job: Arc<JobShared>,
    source: DmIoRegion,
    dests: Vec<DmIoRegion>,
    /// The job's claim cursor, shared with the worker.
    next_sector: Arc<AtomicU64>,
    total_sectors: u64,
    sub_job_sectors: u64,
    ignores_errors: bool,
    ioprio: IoPriority,
    /// No more chunks are claimed here: set by the worker when it stops the
    /// job, and here at the first error that will stop it (so that no chunk
    /// starts after an error, as when the worker sees the error first).
    stopped: AtomicBool,
    /// Chunks (offset, sectors) written without error whose sub-job went on
    /// with the next chunk, for the worker's error-free prefix. Their bytes
    /// are already counted; the worker takes the list when it hears from the
    /// relay (every `RELAY_DONE_BATCH` chunks, and whenever a sub-job comes
    /// back), so the worker is not woken for every chunk.
    done: Mutex<Vec<(u64, u64)>>,
}

/// How many relayed chunks wait for the worker's accounting before it is woken.
const RELAY_DONE_BATCH: usize = 64;

impl Relay {
    fn send(&self, msg: Msg) {
        self.client.notifier.send(msg);
    }

    /// Notes an error: unless the job goes on after errors, nothing more is
    /// claimed here.
    fn error(&self) {
        if !self.ignores_errors {
            self.stopped.store(true, Ordering::Release);
        }
    }

    /// Submits the read of chunk (`offset`, `sectors`) of sub-job `sub` into
    /// `memory`; gives the memory back when dm-io refuses it.
    fn submit_read(
        self: &Arc<Self>,
        dmio: &DmIoClient,
        sub: usize,
        offset: u64,
        sectors: u64,
        memory: DmIoMemory,
    ) -> Result<(), Option<DmIoMemory>> {
        let relay = self.clone();
        let read = DmIoRequest::read(memory).with_ioprio(self.ioprio).with_notify(Notify::new(
            move |completion| relay.read_done(sub, offset, sectors, completion),
        ));
        let region = DmIoRegion::new(&self.source.device, self.source.sector + offset, sectors);
        dmio.try_submit(read, std::slice::from_ref(&region))
            .map_err(|refused| refused.request.memory)
    }

    /// The read of chunk (`offset`, `sectors`) of sub-job `sub` ended.
    fn read_done(
        self: Arc<Self>,
        sub: usize,
        offset: u64,
        sectors: u64,
        mut completion: DmIoCompletion,
    ) {
        if !completion.error_bits.is_empty() {
            self.error();
        } else if let (Some(memory), Some(dmio)) = (completion.memory.take(), self.dmio.upgrade()) {
            let dests: Vec<DmIoRegion> = self
                .dests
                .iter()
                .map(|r| DmIoRegion::new(&r.device, r.sector + offset, sectors))
                .collect();
            let relay = self.clone();
            let write = DmIoRequest::write(memory).with_ioprio(self.ioprio).with_notify(
                Notify::new(move |completion| relay.write_done(sub, offset, sectors, completion)),
            );
            match dmio.try_submit(write, &dests) {
                Ok(()) => {
                    let bytes = sectors * SECTOR_SIZE;
                    self.client.counters.bytes_read.fetch_add(bytes, Ordering::Relaxed);
                    return;
                }
                Err(refused) => completion.memory = refused.request.memory,
            }
        }
        self.send(Msg::Relay { sub, offset, sectors, stage: Stage::Read, completion });
    }

    /// The write of chunk (`offset`, `sectors`) of sub-job `sub` ended: on
    /// success, go on with the job's next chunk in the same pages when nothing
    /// stands in the way.
    fn write_done(
        self: Arc<Self>,
        sub: usize,
        offset: u64,
        sectors: u64,
        mut completion: DmIoCompletion,
    ) {
        if !completion.error_bits.is_empty() {
            self.error();
        } else if !self.stopped.load(Ordering::Acquire)
            && !self.job.cancel.load(Ordering::Acquire)
            && !self.client.pages_wanted.load(Ordering::Acquire)
            && completion.memory.is_some()
            && let Some(dmio) = self.dmio.upgrade()
            && let Some((next, next_sectors)) =
                claim_chunk(&self.next_sector, self.total_sectors, self.sub_job_sectors)
            && let Some(memory) = completion.memory.take()
        {
            // This chunk is done: account it here; the worker records it in
            // the job's error-free prefix later.
            let bytes = sectors * SECTOR_SIZE;
            let counters = &self.client.counters;
            counters.bytes_written.fetch_add(bytes * self.dests.len() as u64, Ordering::Relaxed);
            counters.sub_jobs.fetch_add(1, Ordering::Relaxed);
            self.job.bytes_done.fetch_add(bytes, Ordering::AcqRel);
            let waiting = {
                let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
                done.push((offset, sectors));
                done.len()
            };
            if waiting == RELAY_DONE_BATCH {
                self.send(Msg::RelayDone);
            }
            if let Err(memory) = self.submit_read(&dmio, sub, next, next_sectors, memory) {
                self.send(Msg::RelayRefused { sub, offset: next, sectors: next_sectors, memory });
            }
            return;
        }
        self.send(Msg::Relay { sub, offset, sectors, stage: Stage::Write, completion });
    }
}
