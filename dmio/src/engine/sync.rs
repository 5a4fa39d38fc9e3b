//! The synchronous fallback engine: worker threads doing blocking system calls.
//!
//! Chosen automatically when io_uring cannot be set up, or on request
//! (`EngineChoice::Sync`, `DMIO_ENGINE=sync`). Each worker takes ops from a shared
//! queue, runs `preadv2`/`pwritev2`/`fdatasync`/`fallocate`/`BLKDISCARD`, and sends
//! the result back to the completion thread.
#![allow(unsafe_code)]

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};

use super::{Engine, EngineKind, EngineWaker, IoOp, Wait};

/// The user_data of a wake-up message.
const WAKE_TOKEN: u64 = u64::MAX;

struct ChannelWaker {
    tx: Sender<(u64, i32)>,
    /// A wake token is in the channel and not yet received: at most one ever is,
    /// so the bounded channel always has room for it.
    pending: AtomicBool,
}

impl EngineWaker for ChannelWaker {
    fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            let _ = self.tx.try_send((WAKE_TOKEN, 0));
        }
    }
}

pub(crate) struct SyncEngine {
    ops: Option<Sender<IoOp>>,
    done_rx: Receiver<(u64, i32)>,
    waker: Arc<ChannelWaker>,
    workers: Vec<JoinHandle<()>>,
    /// Completions received while waiting, not yet reaped.
    received: Vec<(u64, i32)>,
}

impl SyncEngine {
    /// Starts `threads` worker threads for at most `max_in_flight` ops at a time.
    ///
    /// Both queues are bounded and preallocated (an unbounded channel allocates a
    /// block every few dozen messages): the dispatcher never has more than
    /// `max_in_flight` ops out, and at most one wake token is queued.
    pub(crate) fn new(threads: usize, max_in_flight: usize) -> io::Result<SyncEngine> {
        let (ops_tx, ops_rx) = bounded::<IoOp>(max_in_flight);
        let (done_tx, done_rx) = bounded(max_in_flight + 1);
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let ops_rx = ops_rx.clone();
            let done_tx = done_tx.clone();
            let worker =
                std::thread::Builder::new().name(format!("dmio-sync-{i}")).spawn(move || {
                    let mut ioprio = 0u16;
                    for op in ops_rx {
                        // Blocking I/O carries the thread's priority: set it when the
                        // op asks for another one.
                        // (The dispatcher passes 0 for ops that carry no priority.)
                        if op.ioprio != ioprio && crate::sys::set_thread_ioprio(op.ioprio).is_ok() {
                            ioprio = op.ioprio;
                        }
                        // SAFETY: the dispatcher keeps the op's memory (its request's
                        // buffers and its op slot's iovec array) alive and untouched
                        // until it has reaped this op's completion.
                        let res = unsafe { crate::sys::execute_blocking(&op) };
                        if done_tx.send((op.user_data, res)).is_err() {
                            break;
                        }
                    }
                })?;
            workers.push(worker);
        }
        Ok(SyncEngine {
            ops: Some(ops_tx),
            done_rx,
            waker: Arc::new(ChannelWaker { tx: done_tx, pending: AtomicBool::new(false) }),
            workers,
            received: Vec::with_capacity(max_in_flight + 1),
        })
    }
}

impl Engine for SyncEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn push(&mut self, op: &IoOp) -> bool {
        match &self.ops {
            Some(tx) if tx.try_send(*op).is_ok() => {}
            // The workers are gone (cannot happen while the engine lives); fail the op.
            _ => self.received.push((op.user_data, -libc::EIO)),
        }
        true
    }

    fn submit_and_wait(&mut self, wait: Wait) -> io::Result<()> {
        if !self.received.is_empty() {
            return Ok(());
        }
        let got = match wait {
            Wait::No => return Ok(()),
            Wait::Forever | Wait::Batch(_) => self.done_rx.recv().ok(),
            Wait::Timeout(d) => match self.done_rx.recv_timeout(d) {
                Ok(v) => Some(v),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => None,
            },
        };
        if let Some(done) = got {
            self.received.push(done);
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        self.received.extend(self.done_rx.try_iter());
        for (token, res) in self.received.drain(..) {
            if token == WAKE_TOKEN {
                // The token is out of the channel: the next wake sends a new one.
                self.waker.pending.store(false, Ordering::Release);
            } else {
                out.push((token, res));
            }
        }
    }

    fn waker(&self) -> Arc<dyn EngineWaker> {
        self.waker.clone()
    }

    fn register_buffer(&mut self, _addr: usize, _len: usize) -> Option<u16> {
        None
    }
}

impl Drop for SyncEngine {
    fn drop(&mut self) {
        // Closing the queue ends the workers once they finish their current op.
        self.ops = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
