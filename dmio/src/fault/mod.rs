//! Fault injection (feature `fault-injection`): the project's stand-in for
//! dm-error, dm-flakey, dm-delay, dm-dust and dm-log-writes, which the target
//! machines do not have.
//!
//! Every [`BlockDevice`](crate::BlockDevice) carries a [`FaultInjector`]
//! ([`BlockDevice::faults`](crate::BlockDevice::faults)). Rules added to it act on
//! the operations any client issues to that device, with either engine, before
//! they reach the kernel:
//!
//! | rule | effect |
//! |---|---|
//! | [`FaultAction::Fail`] | the operation fails with the errno, nothing is sent |
//! | [`FaultAction::DropWrite`] | a write completes successfully, nothing is written |
//! | [`FaultAction::Delay`] | the operation is held back, then issued |
//! | [`FaultAction::ShortTransfer`] | the kernel is asked for fewer bytes, so the transfer comes back short and the remainder is resubmitted |
//!
//! A rule matches operations by kind ([`OpSet`]) and sector range, and fires
//! always, on every Nth match, only on the Nth, or on the first N ([`Trigger`]).
//! [`FaultInjector::override_limits`] makes a device report other discard,
//! write-zeroes or atomic-write limits. A trace records every operation issued;
//! a [`WriteLog`] records every write, flush, discard and write-zeroes in
//! completion order and rebuilds the device image as of any entry.
//!
//! With no rule, trace or log set, the injector costs one atomic load per operation.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use dmio::fault::{FaultRule, OpSet};
//! # let file = tempfile::NamedTempFile::new_in(std::env::temp_dir())?;
//! # file.as_file().set_len(1 << 20)?;
//! let dev = dmio::BlockDevice::open(file.path())?;
//! dev.faults().add(FaultRule::fail(OpSet::WRITE, 0..8, libc::EIO));
//! let client = dmio::DmIoClient::new()?;
//! let req = dmio::DmIoRequest::write(dmio::AlignedBuf::new(4096));
//! let done = client.io_sync(req, &[dmio::DmIoRegion::new(&dev, 0, 8)])?;
//! assert_eq!(done.error_bits.bits(), 0b1);
//! assert_eq!(done.failures[0].errno.raw(), libc::EIO);
//! # Ok(()) }
//! ```

mod write_log;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

pub use write_log::{LogEntry, Replay, WriteLog};

use crate::request::DmIoOp;

bitflags::bitflags! {
    /// The kinds of operation a rule applies to.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct OpSet: u8 {
        /// Reads.
        const READ = 1 << 0;
        /// Writes.
        const WRITE = 1 << 1;
        /// Flushes (PREFLUSH and flush requests). A flush has no sector range:
        /// a flush rule matches whatever its range.
        const FLUSH = 1 << 2;
        /// Discards.
        const DISCARD = 1 << 3;
        /// Write-zeroes.
        const WRITE_ZEROES = 1 << 4;
    }
}

impl OpSet {
    fn of(op: DmIoOp) -> OpSet {
        match op {
            DmIoOp::Read => OpSet::READ,
            DmIoOp::Write => OpSet::WRITE,
            DmIoOp::Flush => OpSet::FLUSH,
            DmIoOp::Discard => OpSet::DISCARD,
            DmIoOp::WriteZeroes => OpSet::WRITE_ZEROES,
        }
    }
}

/// What a firing rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Fail the operation with this errno (e.g. `libc::EIO`). `EINTR`, `EAGAIN`
    /// and `EBUSY` are retried by the client, so they test the retry path.
    Fail(i32),
    /// Complete a write successfully without writing anything (dm-flakey's
    /// `drop_writes`). Other operations pass untouched.
    DropWrite,
    /// Hold the operation back for this long before issuing it.
    Delay(Duration),
    /// Ask the kernel for at most this many bytes (rounded down to the logical
    /// block size, at least one block), so the read or write comes back short.
    ShortTransfer(u64),
}

/// When a matching rule fires. Counting is per rule, over the operations it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Every match.
    Always,
    /// Every Nth match (the Nth, 2Nth, ...).
    EveryNth(u64),
    /// Only the Nth match (1-based).
    Nth(u64),
    /// The first N matches.
    FirstN(u64),
}

/// A fault rule: which operations, in which sectors, do what, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// The kinds of operation.
    pub ops: OpSet,
    /// The sectors (512-byte units): an operation matches when it overlaps them.
    pub sectors: Range<u64>,
    /// The effect.
    pub action: FaultAction,
    /// When it fires.
    pub trigger: Trigger,
}

impl FaultRule {
    /// Fails every operation of `ops` overlapping `sectors` with `errno`.
    pub fn fail(ops: OpSet, sectors: Range<u64>, errno: i32) -> FaultRule {
        FaultRule { ops, sectors, action: FaultAction::Fail(errno), trigger: Trigger::Always }
    }

    /// Fails every Nth operation of `ops` (anywhere on the device) with `errno`.
    pub fn fail_every_nth(ops: OpSet, n: u64, errno: i32) -> FaultRule {
        FaultRule {
            ops,
            sectors: 0..u64::MAX,
            action: FaultAction::Fail(errno),
            trigger: Trigger::EveryNth(n.max(1)),
        }
    }

    /// Drops every write overlapping `sectors`.
    pub fn drop_writes(sectors: Range<u64>) -> FaultRule {
        FaultRule {
            ops: OpSet::WRITE,
            sectors,
            action: FaultAction::DropWrite,
            trigger: Trigger::Always,
        }
    }

    /// Delays every operation of `ops` by `delay`.
    pub fn delay(ops: OpSet, delay: Duration) -> FaultRule {
        FaultRule {
            ops,
            sectors: 0..u64::MAX,
            action: FaultAction::Delay(delay),
            trigger: Trigger::Always,
        }
    }

    /// Makes every read or write of `ops` transfer at most `bytes` at first.
    pub fn short_transfers(ops: OpSet, bytes: u64) -> FaultRule {
        FaultRule {
            ops,
            sectors: 0..u64::MAX,
            action: FaultAction::ShortTransfer(bytes),
            trigger: Trigger::Always,
        }
    }

    /// The same rule with another trigger.
    pub fn when(mut self, trigger: Trigger) -> FaultRule {
        self.trigger = trigger;
        self
    }
}

/// Identifies a rule added to an injector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleId(u64);

/// Device limits a test can override; `None` keeps the probed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitOverrides {
    /// Largest discard in bytes; `Some(0)` makes discard unsupported.
    pub max_discard_bytes: Option<u64>,
    /// Largest write-zeroes in bytes; `Some(0)` makes write-zeroes unsupported.
    pub max_write_zeroes_bytes: Option<u64>,
    /// Largest atomic write in bytes; `Some(0)` makes atomic writes unsupported.
    pub atomic_write_max_bytes: Option<u32>,
    /// The zone model the device reports (a zoned device for tests of code
    /// that must write sequentially to one; I/O itself is not checked).
    pub zoned: Option<crate::ZonedModel>,
}

/// One operation as issued to a device, as recorded by the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracedOp {
    /// The operation.
    pub op: DmIoOp,
    /// First sector (512-byte units); 0 for flushes.
    pub sector: u64,
    /// Sectors covered; 0 for flushes.
    pub sectors: u64,
    /// The I/O priority stamped on it.
    pub ioprio: u16,
    /// Whether it was a FUA write.
    pub fua: bool,
    /// The index of the request region it belongs to.
    pub region: usize,
    /// What the fault rules did: `None` when it was issued normally, otherwise the action.
    pub fault: Option<FaultAction>,
}

/// What the dispatcher should do with an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IssueVerdict {
    Pass,
    Fail(i32),
    Drop,
    Shorten(u64),
    Delay(Duration),
}

/// An operation about to be issued, as the rules see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OpInfo {
    pub op: DmIoOp,
    pub sector: u64,
    pub sectors: u64,
    pub ioprio: u16,
    pub fua: bool,
    pub region: usize,
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<(RuleId, FaultRule, u64, u64)>,
    next_id: u64,
    trace: Option<Vec<TracedOp>>,
    log: Option<WriteLog>,
}

/// The per-device fault injector; see the [module docs](self).
#[derive(Debug, Default)]
pub struct FaultInjector {
    /// Whether anything (rule, trace, log) is set: the fast path checks only this.
    active: AtomicBool,
    logging: AtomicBool,
    /// Entries in the write log (the position a flush records at issue).
    log_len: AtomicU64,
    limits: Mutex<LimitOverrides>,
    has_overrides: AtomicBool,
    state: Mutex<State>,
}

impl FaultInjector {
    pub(crate) fn new() -> FaultInjector {
        FaultInjector::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refresh_active(&self, state: &State) {
        let active = !state.rules.is_empty() || state.trace.is_some() || state.log.is_some();
        self.active.store(active, Ordering::Release);
        self.logging.store(state.log.is_some(), Ordering::Release);
    }

    /// Adds a rule; rules are consulted in the order they were added and the
    /// first that fires decides.
    pub fn add(&self, rule: FaultRule) -> RuleId {
        let mut state = self.state();
        state.next_id += 1;
        let id = RuleId(state.next_id);
        state.rules.push((id, rule, 0, 0));
        self.refresh_active(&state);
        id
    }

    /// Removes a rule; returns whether it existed.
    pub fn remove(&self, id: RuleId) -> bool {
        let mut state = self.state();
        let before = state.rules.len();
        state.rules.retain(|(rid, ..)| *rid != id);
        self.refresh_active(&state);
        state.rules.len() != before
    }

    /// Removes every rule (the trace, log and overrides stay).
    pub fn clear_rules(&self) {
        let mut state = self.state();
        state.rules.clear();
        self.refresh_active(&state);
    }

    /// How many times rule `id` fired.
    pub fn fired(&self, id: RuleId) -> u64 {
        self.state().rules.iter().find(|(rid, ..)| *rid == id).map_or(0, |r| r.3)
    }

    /// Replaces the device's reported limits (discard, write-zeroes, atomic writes).
    pub fn override_limits(&self, overrides: LimitOverrides) {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner()) = overrides;
        self.has_overrides.store(overrides != LimitOverrides::default(), Ordering::Release);
    }

    fn overrides(&self) -> Option<LimitOverrides> {
        if !self.has_overrides.load(Ordering::Acquire) {
            return None;
        }
        Some(*self.limits.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn discard_override(&self) -> Option<u64> {
        self.overrides()?.max_discard_bytes
    }

    pub(crate) fn write_zeroes_override(&self) -> Option<u64> {
        self.overrides()?.max_write_zeroes_bytes
    }

    pub(crate) fn zoned_override(&self) -> Option<crate::ZonedModel> {
        self.overrides()?.zoned
    }

    pub(crate) fn atomic_override(&self) -> Option<u32> {
        self.overrides()?.atomic_write_max_bytes
    }

    /// Starts recording every operation issued to the device (clearing any
    /// earlier trace).
    pub fn start_trace(&self) {
        let mut state = self.state();
        state.trace = Some(Vec::new());
        self.refresh_active(&state);
    }

    /// Stops tracing and returns what was recorded.
    pub fn take_trace(&self) -> Vec<TracedOp> {
        let mut state = self.state();
        let trace = state.trace.take().unwrap_or_default();
        self.refresh_active(&state);
        trace
    }

    /// A copy of the trace so far (tracing goes on).
    pub fn trace(&self) -> Vec<TracedOp> {
        self.state().trace.clone().unwrap_or_default()
    }

    /// Starts a write log (clearing any earlier one).
    pub fn start_write_log(&self) {
        let mut state = self.state();
        state.log = Some(WriteLog::default());
        self.log_len.store(0, Ordering::Release);
        self.refresh_active(&state);
    }

    /// A copy of the write log so far (logging goes on).
    pub fn write_log(&self) -> WriteLog {
        self.state().log.clone().unwrap_or_default()
    }

    /// Stops logging and returns the log.
    pub fn take_write_log(&self) -> WriteLog {
        let mut state = self.state();
        let log = state.log.take().unwrap_or_default();
        self.refresh_active(&state);
        log
    }

    /// Whether any rule, trace or write log is set (the hot path checks only this).
    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Decides what happens to an operation about to be issued.
    pub(crate) fn on_issue(&self, info: &OpInfo) -> IssueVerdict {
        if !self.active.load(Ordering::Acquire) {
            return IssueVerdict::Pass;
        }
        let mut state = self.state();
        let kind = OpSet::of(info.op);
        let end = info.sector.saturating_add(info.sectors.max(1));
        let mut fired = None;
        for (_, rule, matched, hits) in state.rules.iter_mut() {
            if !rule.ops.contains(kind) {
                continue;
            }
            let overlaps = info.op == DmIoOp::Flush
                || (info.sector < rule.sectors.end && rule.sectors.start < end);
            if !overlaps {
                continue;
            }
            if rule.action == FaultAction::DropWrite && info.op != DmIoOp::Write {
                continue;
            }
            *matched += 1;
            let fire = match rule.trigger {
                Trigger::Always => true,
                Trigger::EveryNth(n) => *matched % n.max(1) == 0,
                Trigger::Nth(n) => *matched == n,
                Trigger::FirstN(n) => *matched <= n,
            };
            if fire {
                *hits += 1;
                fired = Some(rule.action);
                break;
            }
        }
        if let Some(trace) = state.trace.as_mut() {
            trace.push(TracedOp {
                op: info.op,
                sector: if info.op == DmIoOp::Flush { 0 } else { info.sector },
                sectors: info.sectors,
                ioprio: info.ioprio,
                fua: info.fua,
                region: info.region,
                fault: fired,
            });
        }
        match fired {
            None => IssueVerdict::Pass,
            Some(FaultAction::Fail(errno)) => IssueVerdict::Fail(errno),
            Some(FaultAction::DropWrite) => IssueVerdict::Drop,
            Some(FaultAction::Delay(d)) => IssueVerdict::Delay(d),
            Some(FaultAction::ShortTransfer(bytes)) => IssueVerdict::Shorten(bytes),
        }
    }

    pub(crate) fn logging(&self) -> bool {
        self.logging.load(Ordering::Acquire)
    }

    pub(crate) fn log_position(&self) -> u64 {
        self.log_len.load(Ordering::Acquire)
    }

    fn push_log(&self, entry: LogEntry) {
        let mut state = self.state();
        if let Some(log) = state.log.as_mut() {
            log.push(entry);
            self.log_len.store(log.len() as u64, Ordering::Release);
        }
    }

    pub(crate) fn log_write(&self, sector: u64, data: Vec<u8>, fua: bool, dropped: bool) {
        self.push_log(LogEntry::Write { sector, data, fua, dropped });
    }

    pub(crate) fn log_flush(&self, issued_at: u64) {
        self.push_log(LogEntry::Flush { issued_at: issued_at as usize });
    }

    pub(crate) fn log_zero(&self, sector: u64, sectors: u64, op: DmIoOp) {
        self.push_log(LogEntry::Zero { sector, sectors, op });
    }
}
