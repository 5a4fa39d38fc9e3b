//! Robustness: panicking callbacks and wakers, a device that shrinks under a
//! read, fairness between large and small requests, concurrent closes, batched
//! completion waits that must not hold a fast completion behind slow ones,
//! oversized buffers, and zero-count regions at any sector.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use dmio::fault::{FaultRule, OpSet};
use dmio::{
    AlignedBuf, BlockDevice, DmIoClient, DmIoConfig, DmIoRegion, DmIoRequest, EngineChoice,
    ReqFlags, VirtualArea,
};
use tests::{
    Backing, ENGINES, TestDevice, backings, check_pattern, client, client_with_config, read_region,
    write_pattern,
};

#[test]
fn a_panicking_callback_is_caught_counted_and_the_client_goes_on() {
    for engine in ENGINES {
        let td = TestDevice::new(Backing::File, 1 << 20);
        let client = client(engine);
        let req =
            DmIoRequest::read(AlignedBuf::new(4096)).on_complete(|_| panic!("a buggy callback"));
        client.submit(req, &[DmIoRegion::new(&td.dev, 0, 8)]).unwrap();
        // Blocking calls may run inline on this thread, not after the callback:
        // wait for the panic to be counted.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while client.stats().callback_panics == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(client.stats().callback_panics, 1, "{engine:?}");
        // The client goes on: blocking and asynchronous requests still complete.
        write_pattern(&client, &td.dev, 8, 8, 1);
        check_pattern(&read_region(&client, &td.dev, 8, 8), 8, 1).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let req = DmIoRequest::read(AlignedBuf::new(4096)).on_complete(move |done| {
            let _ = tx.send(done.is_ok());
        });
        client.submit(req, &[DmIoRegion::new(&td.dev, 8, 8)]).unwrap();
        assert!(rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap(), "{engine:?}");
        assert_eq!(client.stats().callback_panics, 1, "{engine:?}");
    }
}

struct PanickingWaker;

impl Wake for PanickingWaker {
    fn wake(self: Arc<Self>) {
        panic!("a buggy waker");
    }
}

#[test]
fn a_panicking_waker_does_not_stop_the_completion_thread() {
    for engine in ENGINES {
        let td = TestDevice::new(Backing::File, 1 << 20);
        td.dev.faults().add(FaultRule::delay(OpSet::READ, Duration::from_millis(20)));
        let client = client(engine);
        let mut future = Box::pin(
            client
                .submit_future(
                    DmIoRequest::read(AlignedBuf::new(4096)),
                    &[DmIoRegion::new(&td.dev, 0, 8)],
                )
                .unwrap(),
        );
        let waker = Waker::from(Arc::new(PanickingWaker));
        assert!(future.as_mut().poll(&mut Context::from_waker(&waker)).is_pending());
        td.dev.faults().clear_rules();
        // The completion calls the panicking waker; the client must survive it.
        std::thread::sleep(Duration::from_millis(50));
        write_pattern(&client, &td.dev, 16, 8, 2);
        assert_eq!(client.stats().callback_panics, 1, "{engine:?}");
        // The future still holds its completion.
        let noop = Waker::noop();
        match future.as_mut().poll(&mut Context::from_waker(noop)) {
            Poll::Ready(done) => assert!(done.is_ok()),
            Poll::Pending => panic!("{engine:?}: the future lost its completion"),
        }
    }
}

#[test]
fn a_file_that_shrinks_under_a_read_fails_it_instead_of_spinning() {
    for engine in ENGINES {
        let td = TestDevice::new(Backing::File, 1 << 20);
        let client = client(engine);
        write_pattern(&client, &td.dev, 0, 2048, 3);
        // Cut the file in the middle of its last block, behind dmio's back.
        let len = (1 << 20) - 100;
        std::fs::OpenOptions::new().write(true).open(td.image()).unwrap().set_len(len).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let req = DmIoRequest::read(AlignedBuf::new(8192)).on_complete(move |done| {
            let _ = tx.send(done);
        });
        // The device still believes it has 2048 sectors; the last 16 straddle the new end.
        client.submit(req, &[DmIoRegion::new(&td.dev, 2032, 16)]).unwrap();
        let done =
            rx.recv_timeout(Duration::from_secs(10)).expect("the read must complete, not spin");
        assert_eq!(done.error_bits.bits(), 1, "{engine:?}");
        assert_eq!(done.failures[0].errno.raw(), libc::EIO, "{engine:?}");
        // A failed read leaves zeros, never partial stale bytes.
        assert!(done.memory.unwrap().to_vec().iter().all(|&b| b == 0), "{engine:?}");
    }
}

#[test]
fn a_small_request_is_not_starved_by_a_large_one() {
    for engine in ENGINES {
        let td = TestDevice::new(Backing::File, 4 << 20);
        let config = DmIoConfig { ring_entries: 8, max_op_bytes: 4096, ..Default::default() };
        let client = client_with_config(engine, config);
        td.dev.faults().add(FaultRule::delay(OpSet::READ | OpSet::WRITE, Duration::from_millis(1)));
        let order = Arc::new(Mutex::new(Vec::new()));
        let (o1, o2) = (order.clone(), order.clone());
        // 256 ops of 4 KiB, 1 ms each, 7 op slots: about 37 ms alone.
        let big = DmIoRequest::write(AlignedBuf::new(1 << 20))
            .on_complete(move |_| o1.lock().unwrap().push("big"));
        client.submit(big, &[DmIoRegion::new(&td.dev, 0, 2048)]).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let small = DmIoRequest::read(AlignedBuf::new(4096))
            .on_complete(move |_| o2.lock().unwrap().push("small"));
        client.submit(small, &[DmIoRegion::new(&td.dev, 4096, 8)]).unwrap();
        client.close();
        assert_eq!(
            *order.lock().unwrap(),
            vec!["small", "big"],
            "{engine:?}: the small read waited for the whole write"
        );
    }
}

/// Submits `n` 4 KiB reads of `dev`, at sectors 0, 8, 16 and so on, each of
/// which counts its completion in `done`.
fn submit_counted_reads(
    client: &DmIoClient,
    dev: &Arc<BlockDevice>,
    n: u64,
    done: &Arc<AtomicUsize>,
) {
    for i in 0..n {
        let d = done.clone();
        let req = DmIoRequest::read(AlignedBuf::new(4096)).on_complete(move |_| {
            d.fetch_add(1, Ordering::SeqCst);
        });
        client.submit(req, &[DmIoRegion::new(dev, i * 8, 8)]).unwrap();
    }
}

#[test]
fn concurrent_closes_both_wait_for_in_flight_io() {
    for engine in ENGINES {
        let td = TestDevice::new(Backing::File, 1 << 20);
        td.dev.faults().add(FaultRule::delay(OpSet::READ, Duration::from_millis(30)));
        let client = Arc::new(client(engine));
        let done = Arc::new(AtomicUsize::new(0));
        submit_counted_reads(&client, &td.dev, 4, &done);
        let closers: Vec<_> = (0..2)
            .map(|_| {
                let (c, d) = (client.clone(), done.clone());
                std::thread::spawn(move || {
                    c.close();
                    d.load(Ordering::SeqCst)
                })
            })
            .collect();
        for closer in closers {
            assert_eq!(
                closer.join().unwrap(),
                4,
                "{engine:?}: close returned before the I/O completed"
            );
        }
    }
}

#[test]
fn batched_waits_do_not_hold_a_fast_completion_behind_slow_ones() {
    let slow = TestDevice::new(Backing::File, 1 << 20);
    let fast = TestDevice::new(Backing::File, 1 << 20);
    slow.dev.faults().add(FaultRule::delay(OpSet::READ, Duration::from_millis(400)));
    let client = client(EngineChoice::Uring);
    let slow_done = Arc::new(AtomicUsize::new(0));
    submit_counted_reads(&client, &slow.dev, 31, &slow_done);
    let started = Instant::now();
    let done = client
        .io_sync(DmIoRequest::read(AlignedBuf::new(4096)), &[DmIoRegion::new(&fast.dev, 0, 8)])
        .unwrap();
    let took = started.elapsed();
    assert!(done.is_ok());
    assert_eq!(
        slow_done.load(Ordering::SeqCst),
        0,
        "the slow reads finished first: the test proves nothing"
    );
    assert!(took < Duration::from_millis(200), "a fast read took {took:?} behind 31 slow ones");
}

#[test]
fn oversized_buffers_are_refused_instead_of_wrapping() {
    assert!(AlignedBuf::try_new(usize::MAX).is_none());
    assert!(AlignedBuf::try_new(usize::MAX - 4000).is_none());
    assert!(AlignedBuf::try_with_alignment(1, usize::MAX).is_none());
    assert!(AlignedBuf::try_new(1 << 20).is_some_and(|b| b.len() == 1 << 20));
    assert!(VirtualArea::new(usize::MAX).is_err());
    let result = std::panic::catch_unwind(|| AlignedBuf::new(usize::MAX));
    assert!(result.is_err(), "AlignedBuf::new documents a panic on overflow, like Vec");
}

#[test]
fn zero_count_regions_need_neither_alignment_nor_range() {
    for backing in backings() {
        let td = TestDevice::new(backing, 1 << 20);
        let client = client(EngineChoice::Uring);
        td.dev.faults().start_trace();
        // A PREFLUSH-only write naming a zero-count region at an odd sector far
        // beyond the device: the device is flushed, nothing else happens.
        let req = DmIoRequest::new(dmio::DmIoOp::Write).with_flags(ReqFlags::PREFLUSH);
        let done = client.io_sync(req, &[DmIoRegion::new(&td.dev, u64::MAX - 3, 0)]).unwrap();
        assert!(done.is_ok(), "{backing}: {:?}", done.failures);
        let trace = td.dev.faults().take_trace();
        assert_eq!(trace.len(), 1, "{backing}: {trace:?}");
        assert_eq!(trace[0].op, dmio::DmIoOp::Flush, "{backing}");
    }
}

/// A callback may submit: the completing request's slot is already back in the
/// pool, so one more request fits; a second one, with every slot busy, gets
/// `NoSlotInCallback` instead of deadlocking the completion thread.
#[test]
fn a_callback_can_resubmit_but_never_waits_for_a_slot() {
    for engine in ENGINES {
        let td = TestDevice::new(Backing::File, 1 << 20);
        let config = DmIoConfig { engine, reserve: 2, ..Default::default() };
        let client = Arc::new(DmIoClient::with_config(config).unwrap());
        // Keep one slot busy for a while with a delayed read at sector 64.
        td.dev.faults().add(FaultRule {
            sectors: 64..72,
            ..FaultRule::delay(OpSet::READ, Duration::from_millis(300))
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let slow = DmIoRequest::read(AlignedBuf::new(4096)).on_complete(|_| {});
        client.submit(slow, &[DmIoRegion::new(&td.dev, 64, 8)]).unwrap();
        let (c, dev) = (client.clone(), td.dev.clone());
        let first = DmIoRequest::read(AlignedBuf::new(4096)).on_complete(move |_| {
            let resubmitted_tx = tx.clone();
            let again = DmIoRequest::read(AlignedBuf::new(4096)).on_complete(move |done| {
                let _ = resubmitted_tx.send(("resubmitted request completed", done.is_ok()));
            });
            let first = c.submit(again, &[DmIoRegion::new(&dev, 0, 8)]);
            let extra = DmIoRequest::read(AlignedBuf::new(4096)).on_complete(|_| {});
            let second = c.submit(extra, &[DmIoRegion::new(&dev, 8, 8)]);
            let _ = tx.send(("first resubmission accepted", first.is_ok()));
            let _ = tx
                .send(("second refused", matches!(second, Err(dmio::DmIoError::NoSlotInCallback))));
        });
        client.submit(first, &[DmIoRegion::new(&td.dev, 0, 8)]).unwrap();
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(rx.recv_timeout(Duration::from_secs(5)).expect("the callbacks ran"));
        }
        seen.sort();
        assert_eq!(
            seen,
            vec![
                ("first resubmission accepted", true),
                ("resubmitted request completed", true),
                ("second refused", true)
            ],
            "{engine:?}"
        );
    }
}
