//! kcopyd callbacks, client lifetime and job control:
//!
//! - KC-12: thousands of small jobs from four threads with irregular
//!   fault-layer delays: callbacks never overlap, each runs exactly once, all on
//!   one worker thread that is none of the submitters;
//! - KC-1: destroying (or dropping) a client with jobs pending waits until every
//!   callback ran;
//! - KC-13: prepared callbacks completed from another thread (or from a dm-io
//!   callback) run on the worker; destroy waits for an outstanding token; a
//!   dropped token calls back with `cancelled`;
//! - KC-14: `flush` waits for queued callbacks, even slow ones; `flush`,
//!   `copy_sync` and `zero_sync` from a kcopyd callback, and `copy_sync` from a
//!   dm-io callback, return `BlockingInCallback`; `copy` from a callback works;
//! - cancel: a large copy cancelled after its first chunks reports `cancelled`,
//!   copied exactly a prefix of `bytes_done` bytes and left the rest untouched;
//!   progress grows monotonically.

mod kcopyd_common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use dmio::fault::{FaultRule, OpSet, Trigger};
use dmio::{AlignedBuf, DmIoRegion, DmIoRequest, ErrorBits};
use kcopyd::{CopyFlags, JobOutcome, KcopydClient, KcopydConfig, KcopydError};
use kcopyd_common::{
    Chunk, KIB, MIB, WAIT, assert_clean, assert_pages_back, classify, disk, expect_pattern, kc,
    region, secs, start_copy, stats_delta, wait_for, write_image,
};
use tests::{Backing, TestDevice, backings, pattern, write_pattern};

const SRC_SEED: u64 = 0xca11;
const OLD_SEED: u64 = 0xb0b;

/// The worker's thread id: the thread a zero-length job calls back on.
fn worker_thread(kc: &KcopydClient, dev: &TestDevice) -> ThreadId {
    let (tx, rx) = mpsc::channel();
    let empty = DmIoRegion::new(&dev.dev, 0, 0);
    let dest = DmIoRegion::new(&dev.dev, 8, 0);
    kc.copy(&empty, &[dest], CopyFlags::empty(), move |_| {
        let _ = tx.send(thread::current().id());
    })
    .expect("a zero-length job");
    wait_for(&rx, "zero-length job")
}

/// KC-12: 3000 jobs of 4 KiB submitted from four threads at once, with
/// irregular read and write delays: a flag set for the duration of each
/// callback is never found already set, every job calls back exactly once and
/// cleanly, always on the same thread, which submitted nothing; the data is
/// correct and no callback panicked.
#[test]
fn kc12_callbacks_never_run_concurrently() {
    const JOBS: usize = 3000;
    const THREADS: usize = 4;
    let src = TestDevice::new(Backing::File, JOBS as u64 * 4 * KIB);
    let dst = TestDevice::new(Backing::File, JOBS as u64 * 4 * KIB);
    let kc = Arc::new(kc(KcopydConfig::new()));
    write_pattern(kc.dmio(), &src.dev, 0, secs(JOBS as u64 * 4 * KIB), SRC_SEED);
    let faults = [
        (&src, OpSet::READ, 7, 1),
        (&src, OpSet::READ, 11, 3),
        (&dst, OpSet::WRITE, 5, 2),
        (&dst, OpSet::WRITE, 13, 1),
    ];
    for (td, ops, nth, ms) in faults {
        td.dev
            .faults()
            .add(FaultRule::delay(ops, Duration::from_millis(ms)).when(Trigger::EveryNth(nth)));
    }
    struct Seen {
        in_callback: AtomicBool,
        overlaps: AtomicUsize,
        calls: Vec<AtomicU8>,
        failed: AtomicUsize,
        threads: Mutex<HashSet<ThreadId>>,
    }
    let seen = Arc::new(Seen {
        in_callback: AtomicBool::new(false),
        overlaps: AtomicUsize::new(0),
        calls: (0..JOBS).map(|_| AtomicU8::new(0)).collect(),
        failed: AtomicUsize::new(0),
        threads: Mutex::new(HashSet::new()),
    });
    let (tx, rx) = mpsc::channel();
    let before = kc.stats();
    let submitters: Vec<_> = (0..THREADS)
        .map(|t| {
            let (kc, seen, tx) = (kc.clone(), seen.clone(), tx.clone());
            let (src, dst) = (src.dev.clone(), dst.dev.clone());
            thread::spawn(move || {
                for j in (t..JOBS).step_by(THREADS) {
                    let (seen, tx) = (seen.clone(), tx.clone());
                    let from = DmIoRegion::new(&src, j as u64 * 8, 8);
                    let to = DmIoRegion::new(&dst, j as u64 * 8, 8);
                    kc.copy(&from, &[to], CopyFlags::empty(), move |o: JobOutcome| {
                        if seen.in_callback.swap(true, Ordering::SeqCst) {
                            seen.overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                        seen.threads.lock().unwrap().insert(thread::current().id());
                        seen.calls[j].fetch_add(1, Ordering::SeqCst);
                        if !o.is_ok() {
                            seen.failed.fetch_add(1, Ordering::SeqCst);
                        }
                        // Stay a little, so that an overlapping callback would
                        // find the flag set.
                        for _ in 0..200 {
                            std::hint::spin_loop();
                        }
                        thread::yield_now();
                        seen.in_callback.store(false, Ordering::SeqCst);
                        let _ = tx.send(j);
                    })
                    .unwrap_or_else(|e| panic!("job {j} refused: {e}"));
                }
                thread::current().id()
            })
        })
        .collect();
    let submitter_ids: Vec<ThreadId> = submitters.into_iter().map(|h| h.join().unwrap()).collect();
    for _ in 0..JOBS {
        wait_for(&rx, "kc12 callbacks");
    }
    kc.flush().expect("flush");
    assert_eq!(seen.overlaps.load(Ordering::SeqCst), 0, "callbacks overlapped");
    for (j, c) in seen.calls.iter().enumerate() {
        assert_eq!(c.load(Ordering::SeqCst), 1, "job {j} called back a wrong number of times");
    }
    assert_eq!(seen.failed.load(Ordering::SeqCst), 0, "some jobs failed");
    let threads = seen.threads.lock().unwrap().clone();
    assert_eq!(threads.len(), 1, "callbacks ran on {} threads", threads.len());
    let worker = *threads.iter().next().unwrap();
    assert!(!submitter_ids.contains(&worker), "a callback ran on a submitting thread");
    assert_ne!(worker, thread::current().id());
    let delta = stats_delta(&before, &kc.stats());
    assert_eq!(delta.jobs, JOBS as u64, "{delta:?}");
    assert_eq!(delta.callback_panics, 0, "{delta:?}");
    assert_eq!(kc.jobs_in_flight(), 0);
    assert_pages_back(&kc, "kc12");
    src.dev.faults().clear_rules();
    dst.dev.faults().clear_rules();
    expect_pattern(&disk(&dst.dev, 0, secs(JOBS as u64 * 4 * KIB)), 0, SRC_SEED, "kc12 data");
}

/// KC-1: 16 jobs whose source reads are held back 100 ms; destroying the client
/// (explicitly, and by dropping it) blocks until every callback ran, which
/// takes at least the delay; the data is there afterwards.
#[test]
fn kc1_destroy_waits_for_pending_jobs() {
    for explicit in [true, false] {
        let at = if explicit { "destroy()" } else { "drop" };
        let src = TestDevice::new(Backing::File, 2 * MIB);
        let dst = TestDevice::new(Backing::File, 2 * MIB);
        let kc = kc(KcopydConfig::new().sub_job_kb(64));
        write_pattern(kc.dmio(), &src.dev, 0, secs(2 * MIB), SRC_SEED);
        src.dev.faults().add(FaultRule::delay(OpSet::READ, Duration::from_millis(100)));
        let called = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        for j in 0..16u64 {
            let called = called.clone();
            let from = region(&src, j * 64 * KIB, 64 * KIB);
            let to = region(&dst, j * 64 * KIB, 64 * KIB);
            kc.copy(&from, &[to], CopyFlags::empty(), move |o| {
                assert!(o.is_ok(), "job {j}: {o:?}");
                called.fetch_add(1, Ordering::SeqCst);
            })
            .expect("valid job");
        }
        assert_eq!(kc.jobs_in_flight(), 16, "{at}: jobs in flight before destroy");
        assert_eq!(called.load(Ordering::SeqCst), 0, "{at}: callbacks before the delay");
        if explicit {
            kc.destroy();
        } else {
            drop(kc);
        }
        let took = start.elapsed();
        assert_eq!(called.load(Ordering::SeqCst), 16, "{at}: returned before every callback");
        assert!(took >= Duration::from_millis(95), "{at}: returned after {took:?}");
        src.dev.faults().clear_rules();
        expect_pattern(&disk(&dst.dev, 0, secs(MIB)), 0, SRC_SEED, at);
    }
}

/// KC-13: a prepared callback completed from another thread runs on the
/// worker (the thread other jobs call back on), not on the completing thread,
/// with the errors passed; it counts as a job until then. A token completed
/// from a dm-io callback works too (complete never blocks).
#[test]
fn kc13_prepared_callback_runs_on_the_worker() {
    let td = TestDevice::new(Backing::File, MIB);
    let kc = kc(KcopydConfig::new());
    let worker = worker_thread(&kc, &td);
    assert_ne!(worker, thread::current().id());
    kc.flush().expect("flush");
    assert_eq!(kc.jobs_in_flight(), 0);

    let (tx, rx) = mpsc::channel();
    let token = kc
        .prepare_callback(move |o| {
            let _ = tx.send((thread::current().id(), o));
        })
        .expect("prepare_callback");
    assert_eq!(kc.jobs_in_flight(), 1, "a prepared callback counts as a job");
    let completer = thread::spawn(move || {
        token.complete(true, ErrorBits::from_bits(0b101));
        thread::current().id()
    })
    .join()
    .unwrap();
    let (tid, outcome) = wait_for(&rx, "token");
    assert_eq!(tid, worker, "the callback did not run on the worker");
    assert_ne!(tid, completer, "the callback ran on the completing thread");
    assert!(outcome.read_err, "{outcome:?}");
    assert_eq!(outcome.write_err.bits(), 0b101, "{outcome:?}");
    assert!(!outcome.cancelled, "{outcome:?}");
    kc.flush().expect("flush");
    assert_eq!(kc.jobs_in_flight(), 0);

    // Completed from a dm-io notify callback.
    let (tx, rx) = mpsc::channel();
    let token = kc
        .prepare_callback(move |o| {
            let _ = tx.send((thread::current().id(), o));
        })
        .expect("prepare_callback");
    let req = DmIoRequest::read(AlignedBuf::new(4096)).on_complete(move |_| {
        token.complete(false, ErrorBits::from_bits(0b1));
    });
    kc.dmio().submit(req, &[DmIoRegion::new(&td.dev, 0, 8)]).expect("dm-io read");
    let (tid, outcome) = wait_for(&rx, "token from a dm-io callback");
    assert_eq!(tid, worker);
    assert_eq!((outcome.read_err, outcome.write_err.bits()), (false, 0b1), "{outcome:?}");
}

/// KC-13: a dropped token calls back with `cancelled` (and no error bits).
#[test]
fn kc13_dropped_token_calls_back_cancelled() {
    let kc = kc(KcopydConfig::new());
    let (tx, rx) = mpsc::channel();
    let token = kc
        .prepare_callback(move |o| {
            let _ = tx.send(o);
        })
        .expect("prepare_callback");
    thread::spawn(move || drop(token)).join().unwrap();
    let outcome = wait_for(&rx, "dropped token");
    assert!(outcome.cancelled, "{outcome:?}");
    assert!(!outcome.read_err && outcome.write_err.is_empty(), "{outcome:?}");
    assert!(!outcome.is_ok());
    kc.flush().expect("flush");
    assert_eq!(kc.jobs_in_flight(), 0);
}

/// KC-13: destroy waits for an outstanding token, completed 200 ms later from
/// another thread: destroy returns after the completion and after the
/// callback ran.
#[test]
fn kc13_destroy_waits_for_an_outstanding_token() {
    let kc = kc(KcopydConfig::new());
    let called = Arc::new(AtomicBool::new(false));
    let flag = called.clone();
    let token = kc
        .prepare_callback(move |o| {
            assert!(!o.cancelled, "{o:?}");
            flag.store(true, Ordering::SeqCst);
        })
        .expect("prepare_callback");
    let start = Instant::now();
    let completer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        let at = Instant::now();
        token.complete(false, ErrorBits::NONE);
        at
    });
    kc.destroy();
    let returned = Instant::now();
    let completed = completer.join().unwrap();
    assert!(called.load(Ordering::SeqCst), "destroy returned before the token's callback ran");
    assert!(completed <= returned, "destroy returned before the token was completed");
    assert!(returned - start >= Duration::from_millis(195), "{:?}", returned - start);
}

/// KC-14: flush waits for queued callbacks, however slow: a zero-length job
/// whose callback sleeps 200 ms, and a completed token whose callback sleeps
/// 100 ms, have both run when flush returns.
#[test]
fn kc14_flush_waits_for_slow_callbacks() {
    let td = TestDevice::new(Backing::File, MIB);
    let kc = kc(KcopydConfig::new());
    let done = Arc::new(AtomicUsize::new(0));
    let empty = DmIoRegion::new(&td.dev, 0, 0);
    let dest = DmIoRegion::new(&td.dev, 8, 0);
    let d = done.clone();
    kc.copy(&empty, &[dest], CopyFlags::empty(), move |_| {
        thread::sleep(Duration::from_millis(200));
        d.fetch_add(1, Ordering::SeqCst);
    })
    .expect("zero-length job");
    let d = done.clone();
    let token = kc
        .prepare_callback(move |_| {
            thread::sleep(Duration::from_millis(100));
            d.fetch_add(1, Ordering::SeqCst);
        })
        .expect("prepare_callback");
    token.complete(false, ErrorBits::NONE);
    let start = Instant::now();
    kc.flush().expect("flush");
    assert_eq!(done.load(Ordering::SeqCst), 2, "flush returned before the callbacks ran");
    assert!(start.elapsed() >= Duration::from_millis(150), "{:?}", start.elapsed());
}

/// KC-14: from a kcopyd callback, flush, copy_sync and zero_sync refuse with
/// `BlockingInCallback` (instead of deadlocking), while an asynchronous copy
/// is accepted and completes; copy_sync from a dm-io callback refuses too.
#[test]
fn kc14_blocking_calls_from_callbacks_are_refused() {
    let src = TestDevice::new(Backing::File, MIB);
    let dst = TestDevice::new(Backing::File, MIB);
    let kc = Arc::new(kc(KcopydConfig::new()));
    write_pattern(kc.dmio(), &src.dev, 0, secs(MIB), SRC_SEED);
    let from = region(&src, 0, 64 * KIB);
    let to = region(&dst, 128 * KIB, 64 * KIB);
    let (tx, rx) = mpsc::channel::<(String, Result<(), String>)>();
    let kc2 = kc.clone();
    let (f2, t2) = (from.clone(), to.clone());
    let tx2 = tx.clone();
    kc.copy(&from, std::slice::from_ref(&to), CopyFlags::empty(), move |o| {
        assert!(o.is_ok(), "{o:?}");
        let refused = |r: Result<String, KcopydError>| match r {
            Err(KcopydError::BlockingInCallback) => Ok(()),
            Err(other) => Err(format!("wrong error {other:?}")),
            Ok(what) => Err(format!("accepted: {what}")),
        };
        let _ = tx2.send(("flush".into(), refused(kc2.flush().map(|()| "flush".into()))));
        let r = kc2.copy_sync(&f2, std::slice::from_ref(&t2), CopyFlags::empty());
        let _ = tx2.send(("copy_sync".into(), refused(r.map(|o| format!("{o:?}")))));
        let r = kc2.zero_sync(std::slice::from_ref(&t2), CopyFlags::empty());
        let _ = tx2.send(("zero_sync".into(), refused(r.map(|o| format!("{o:?}")))));
        // Chaining an asynchronous job from a callback is the normal use.
        let tx3 = tx2.clone();
        let r = kc2.copy(&f2, std::slice::from_ref(&t2), CopyFlags::empty(), move |o| {
            let _ = tx3
                .send(("chained".into(), if o.is_ok() { Ok(()) } else { Err(format!("{o:?}")) }));
        });
        if let Err(e) = r {
            let _ = tx2.send(("chained".into(), Err(format!("refused: {e}"))));
        }
    })
    .expect("valid job");
    for _ in 0..4 {
        let (what, r) = wait_for(&rx, "callback results");
        if let Err(e) = r {
            panic!("{what} from a kcopyd callback: {e}");
        }
    }
    // From a dm-io notify callback (of another dm-io client, so that the last
    // reference to the kcopyd client can never be dropped on its own threads).
    let io = tests::client(dmio::EngineChoice::Auto);
    let kc3 = kc.clone();
    let (f3, t3) = (from.clone(), to.clone());
    let req = DmIoRequest::read(AlignedBuf::new(4096)).on_complete(move |_| {
        let r = kc3.copy_sync(&f3, std::slice::from_ref(&t3), CopyFlags::empty());
        let res = match r {
            Err(KcopydError::BlockingInCallback) => Ok(()),
            other => Err(format!("{other:?}")),
        };
        let _ = tx.send(("copy_sync from dm-io".into(), res));
    });
    io.submit(req, &[DmIoRegion::new(&src.dev, 0, 8)]).expect("dm-io read");
    let (what, r) = wait_for(&rx, "dm-io callback result");
    if let Err(e) = r {
        panic!("{what}: {e}");
    }
    kc.flush().expect("flush");
    // The callbacks dropped their clones of the client: ours is the last.
    let deadline = Instant::now() + WAIT;
    while Arc::strong_count(&kc) > 1 {
        assert!(Instant::now() < deadline, "a callback kept the client");
        thread::sleep(Duration::from_millis(1));
    }
    expect_pattern(&disk(&dst.dev, to.sector, to.count), from.sector, SRC_SEED, "chained copy");
}

/// Cancel: 32 MiB in 512 KiB sub-jobs with source reads delayed 20 ms,
/// cancelled once some chunks finished. The outcome is cancelled (not ok, and
/// `into_result` says so), fewer bytes are done than the total, exactly the
/// first `bytes_done` bytes reached the destination (claimed chunks all finish,
/// later ones never start) and the rest keeps its old data; the progress
/// polled while running never decreases and ends at `bytes_done`. Cancelling a
/// finished job does nothing.
#[test]
fn cancel_stops_a_running_copy() {
    let len = 32 * MIB;
    let src_image = pattern(0, secs(len), SRC_SEED);
    let old_image = pattern(0, secs(len), OLD_SEED);
    for backing in backings() {
        let at = backing.to_string();
        let src = TestDevice::new(backing, len);
        let dst = TestDevice::new(backing, len);
        let kc = kc(KcopydConfig::new());
        let chunk = kc.sub_job_bytes();
        write_image(kc.dmio(), &src.dev, &src_image, 0, secs(len));
        write_image(kc.dmio(), &dst.dev, &old_image, 0, secs(len));
        src.dev.faults().add(FaultRule::delay(OpSet::READ, Duration::from_millis(20)));
        let from = region(&src, 0, len);
        let to = region(&dst, 0, len);
        let (handle, rx) = start_copy(&kc, &from, std::slice::from_ref(&to), CopyFlags::empty());
        let mut samples = vec![];
        let deadline = Instant::now() + WAIT;
        loop {
            let done = handle.bytes_done();
            samples.push(done);
            if done > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{at}: no progress");
            thread::sleep(Duration::from_millis(1));
        }
        handle.cancel();
        while !handle.is_finished() && Instant::now() < deadline {
            samples.push(handle.bytes_done());
            thread::sleep(Duration::from_millis(1));
        }
        let outcome = wait_for(&rx, &at);
        src.dev.faults().clear_rules();
        assert!(outcome.cancelled, "{at}: {outcome:?}");
        assert!(!outcome.is_ok(), "{at}");
        assert!(!outcome.read_err && outcome.write_err.is_empty(), "{at}: {outcome:?}");
        assert!(outcome.bytes_done > 0 && outcome.bytes_done < len, "{at}: {outcome:?}");
        assert!(
            outcome.bytes_done <= samples[samples.len() - 1].max(chunk) + 16 * chunk,
            "{at}: {} bytes done after cancelling at {:?}",
            outcome.bytes_done,
            samples.last()
        );
        assert_eq!(outcome.completed_prefix_bytes, outcome.bytes_done, "{at}: {outcome:?}");
        assert_eq!(outcome.bytes_done % chunk, 0, "{at}: {outcome:?}");
        assert!(samples.windows(2).all(|w| w[0] <= w[1]), "{at}: progress went back: {samples:?}");
        assert!(samples.iter().all(|&s| s <= outcome.bytes_done), "{at}: {samples:?}");
        assert_pages_back(&kc, &at);
        assert_eq!(handle.bytes_done(), outcome.bytes_done, "{at}");
        handle.cancel();
        assert!(handle.is_finished(), "{at}");
        let got = disk(&dst.dev, 0, secs(len));
        let chunks = classify(&got, chunk, &src_image, &old_image);
        let copied = (outcome.bytes_done / chunk) as usize;
        assert!(chunks[..copied].iter().all(|c| *c == Chunk::New), "{at}: {chunks:?}");
        assert!(chunks[copied..].iter().all(|c| *c == Chunk::Old), "{at}: {chunks:?}");
        match outcome.into_result() {
            Err(KcopydError::JobFailed { cancelled: true, read_err: false, .. }) => {}
            other => panic!("{at}: expected JobFailed with cancelled, got {other:?}"),
        }
    }
}

/// Cancel right after submission, with reads delayed 20 ms: at most the eight
/// chunks already claimed finish; the destination holds exactly a prefix of
/// `bytes_done` bytes.
#[test]
fn cancel_immediately() {
    let len = 16 * MIB;
    let src = TestDevice::new(Backing::File, len);
    let dst = TestDevice::new(Backing::File, len);
    let kc = kc(KcopydConfig::new());
    let chunk = kc.sub_job_bytes();
    let old_image = pattern(0, secs(len), OLD_SEED);
    write_pattern(kc.dmio(), &src.dev, 0, secs(len), SRC_SEED);
    write_image(kc.dmio(), &dst.dev, &old_image, 0, secs(len));
    src.dev.faults().add(FaultRule::delay(OpSet::READ, Duration::from_millis(20)));
    let (handle, rx) =
        start_copy(&kc, &region(&src, 0, len), &[region(&dst, 0, len)], CopyFlags::empty());
    handle.cancel();
    let outcome = wait_for(&rx, "cancel immediately");
    assert!(outcome.cancelled, "{outcome:?}");
    assert!(outcome.bytes_done <= 8 * chunk, "{outcome:?}");
    assert_pages_back(&kc, "cancel immediately");
    assert_eq!(outcome.completed_prefix_bytes, outcome.bytes_done, "{outcome:?}");
    let got = disk(&dst.dev, 0, secs(len));
    let chunks = classify(&got, chunk, &pattern(0, secs(len), SRC_SEED), &old_image);
    let copied = (outcome.bytes_done / chunk) as usize;
    assert!(chunks[..copied].iter().all(|c| *c == Chunk::New), "{chunks:?}");
    assert!(chunks[copied..].iter().all(|c| *c == Chunk::Old), "{chunks:?}");
    assert_clean_after(&kc, &src, &dst);
}

/// After a cancelled job the client still copies normally.
fn assert_clean_after(kc: &KcopydClient, src: &TestDevice, dst: &TestDevice) {
    src.dev.faults().clear_rules();
    let outcome = kc
        .copy_sync(&region(src, 0, MIB), &[region(dst, 0, MIB)], CopyFlags::empty())
        .expect("valid");
    assert_clean(&outcome, MIB, "copy after a cancel");
    expect_pattern(&disk(&dst.dev, 0, secs(MIB)), 0, SRC_SEED, "copy after a cancel");
}

/// A panicking callback is caught: the worker goes on with the next
/// callbacks, the panic is counted, and the client can still be destroyed.
#[test]
fn panicking_callback_is_contained() {
    let td = TestDevice::new(Backing::File, MIB);
    let kc = kc(KcopydConfig::new());
    let before = kc.stats();
    let empty = DmIoRegion::new(&td.dev, 0, 0);
    let dest = DmIoRegion::new(&td.dev, 8, 0);
    kc.copy(&empty, std::slice::from_ref(&dest), CopyFlags::empty(), |_| {
        panic!("a deliberately panicking kcopyd callback");
    })
    .expect("valid job");
    let token = kc.prepare_callback(|_| panic!("a deliberately panicking token callback"));
    token.expect("prepare_callback").complete(false, ErrorBits::NONE);
    let (tx, rx) = mpsc::channel();
    kc.copy(&empty, &[dest], CopyFlags::empty(), move |o| {
        let _ = tx.send(o);
    })
    .expect("valid job");
    assert_clean(&wait_for(&rx, "the job after the panics"), 0, "after the panics");
    kc.flush().expect("flush");
    assert_eq!(stats_delta(&before, &kc.stats()).callback_panics, 2);
    assert_eq!(kc.jobs_in_flight(), 0);
    kc.destroy();
}

/// The thread-safety the API promises: clients and handles are Send + Sync,
/// tokens and outcomes Send (checked at compile time).
#[test]
fn types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<KcopydClient>();
    send_sync::<kcopyd::JobHandle>();
    send_sync::<std::sync::Arc<kcopyd::Throttle>>();
    send::<kcopyd::CallbackToken>();
    send::<JobOutcome>();
}

/// Regression: dropping the last handle of a client inside a dm-io notify
/// callback, with a job still reading, must not wait there (that thread has to
/// deliver the job's completions); the job still finishes.
#[test]
fn dropping_the_client_in_a_dmio_callback_does_not_hang() {
    let src = TestDevice::new(Backing::File, 4 * MIB);
    let dst = TestDevice::new(Backing::File, 4 * MIB);
    let io = Arc::new(dmio::DmIoClient::new().unwrap());
    let kc = Arc::new(KcopydClient::with_dmio(io.clone(), KcopydConfig::new()).unwrap());
    src.dev.faults().add(FaultRule::delay(OpSet::READ, Duration::from_millis(300)));
    let (job_tx, job_rx) = mpsc::channel();
    kc.copy(
        &DmIoRegion::new(&src.dev, 0, 2048),
        &[DmIoRegion::new(&dst.dev, 0, 2048)],
        CopyFlags::empty(),
        move |outcome| job_tx.send(outcome).unwrap(),
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    let last = kc.clone();
    drop(kc);
    let req = DmIoRequest::write(AlignedBuf::new(4096)).on_complete(move |_| {
        drop(last);
        tx.send(()).unwrap();
    });
    io.submit(req, &[DmIoRegion::new(&dst.dev, 4096, 8)]).unwrap();
    rx.recv_timeout(Duration::from_secs(10)).expect("the drop in the dm-io callback hung");
    let outcome = job_rx.recv_timeout(Duration::from_secs(10)).expect("the job never finished");
    assert!(outcome.is_ok(), "{outcome:?}");
}

/// Regression: a job waiting for pages starts when pages taken from
/// `page_pool()` by someone else come back, without any other message.
#[test]
fn a_job_waiting_for_pages_starts_when_outside_pages_come_back() {
    let src = TestDevice::new(Backing::File, MIB);
    let dst = TestDevice::new(Backing::File, MIB);
    let kc = KcopydClient::with_config(KcopydConfig::new().pool_sub_jobs(1)).unwrap();
    let mut held = Vec::new();
    while let Some(page) = kc.page_pool().try_alloc() {
        held.push(page);
    }
    let (tx, rx) = mpsc::channel();
    kc.copy(
        &DmIoRegion::new(&src.dev, 0, 1024),
        &[DmIoRegion::new(&dst.dev, 0, 1024)],
        CopyFlags::empty(),
        move |outcome| tx.send(outcome).unwrap(),
    )
    .unwrap();
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "copied without pages");
    drop(held);
    let outcome = rx.recv_timeout(Duration::from_secs(5)).expect("the job stalled");
    assert!(outcome.is_ok(), "{outcome:?}");
}

/// A kcopyd callback of one client may not block on another client either: two
/// clients waiting on each other would deadlock.
#[test]
fn blocking_on_another_client_from_a_callback_is_refused() {
    let dst = TestDevice::new(Backing::File, MIB);
    let a = KcopydClient::new().unwrap();
    let b = Arc::new(KcopydClient::new().unwrap());
    let (tx, rx) = mpsc::channel();
    let b2 = b.clone();
    let target = DmIoRegion::new(&dst.dev, 0, 8);
    let first = [target.clone()];
    a.zero(&first, CopyFlags::empty(), move |_| {
        let sync = b2.zero_sync(std::slice::from_ref(&target), CopyFlags::empty());
        let flush = b2.flush();
        tx.send((sync.err(), flush.err())).unwrap();
    })
    .unwrap();
    let (sync, flush) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(matches!(sync, Some(KcopydError::BlockingInCallback)), "{sync:?}");
    assert!(matches!(flush, Some(KcopydError::BlockingInCallback)), "{flush:?}");
}
