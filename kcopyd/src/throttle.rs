//! The throttle: a cap on the fraction of time kcopyd I/O is in flight.

use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::error::KcopydError;

/// How long the busy/total accounting remembers: both periods are halved once
/// the total exceeds this (the kernel's `1 << ACCOUNT_INTERVAL_SHIFT` jiffies,
/// about a second).
const ACCOUNT_INTERVAL_US: u64 = 1_000_000;

/// How long a throttled I/O waits before the gate is asked again. The kernel
/// sleeps 100 ms; a shorter step follows the target more closely.
pub(crate) const RETRY_STEP: Duration = Duration::from_millis(10);

/// After this many waits an I/O goes ahead regardless (the kernel's 10 × 100 ms).
pub(crate) const MAX_RETRIES: u32 = 100;

/// The accounting behind a [`Throttle`], on a microsecond clock supplied by the
/// caller (so it can be driven by a virtual clock in tests).
#[derive(Debug, Default, Clone)]
pub(crate) struct ThrottleState {
    in_flight: u32,
    busy_us: u64,
    total_us: u64,
    last_us: u64,
}

impl ThrottleState {
    fn advance(&mut self, now_us: u64) {
        let delta = now_us.saturating_sub(self.last_us);
        self.last_us = self.last_us.max(now_us);
        self.total_us += delta;
        if self.in_flight > 0 {
            self.busy_us += delta;
        }
        if self.total_us > ACCOUNT_INTERVAL_US {
            self.total_us /= 2;
            self.busy_us /= 2;
        }
    }

    /// Whether an I/O starting at `now_us` should wait, with the limit `percent`.
    pub(crate) fn should_wait(&mut self, now_us: u64, percent: u32) -> bool {
        self.advance(now_us);
        if percent >= 100 {
            return false;
        }
        self.busy_us * 100 > u64::from(percent) * self.total_us
    }

    pub(crate) fn io_start(&mut self, now_us: u64) {
        self.advance(now_us);
        self.in_flight += 1;
    }

    pub(crate) fn io_end(&mut self, now_us: u64) {
        self.advance(now_us);
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    pub(crate) fn busy_fraction(&self) -> f64 {
        if self.total_us == 0 { 0.0 } else { self.busy_us as f64 / self.total_us as f64 }
    }
}

/// Limits the share of time a client (or several) keeps I/O in flight: the
/// kernel's `struct dm_kcopyd_throttle`.
///
/// The throttle measures the fraction of recent time (about the last second,
/// decaying) during which any I/O of its clients was in flight. Before each read
/// or write, a client asks it; while the fraction is above `percent`, the I/O
/// waits in steps of 10 ms, at most about a second, then goes ahead regardless.
/// 100 % (the default) turns throttling off. Unlike the kernel, which sleeps in
/// the worker, a waiting I/O does not hold up the client's completions and
/// callbacks.
///
/// One throttle may be shared by several clients (pass the same `Arc`), and its
/// limit may be changed at any time.
///
/// ```
/// use kcopyd::{KcopydConfig, Throttle};
/// let throttle = Throttle::new(100).unwrap();
/// let config = KcopydConfig::new().throttle(throttle.clone());
/// throttle.set_percent(25).unwrap(); // takes effect for the next I/O
/// assert_eq!(throttle.percent(), 25);
/// assert!(throttle.set_percent(101).is_err());
/// # drop(config);
/// ```
pub struct Throttle {
    percent: AtomicU32,
    origin: Instant,
    state: Mutex<ThrottleState>,
}

impl Throttle {
    /// A throttle limiting I/O to `percent` of the time (0..=100, 100 = off).
    pub fn new(percent: u32) -> Result<Arc<Throttle>, KcopydError> {
        check_percent(percent)?;
        Ok(Arc::new(Throttle {
            percent: AtomicU32::new(percent),
            origin: Instant::now(),
            state: Mutex::new(ThrottleState::default()),
        }))
    }

    /// Changes the limit (0..=100); it applies to the next I/O that asks.
    pub fn set_percent(&self, percent: u32) -> Result<(), KcopydError> {
        check_percent(percent)?;
        self.percent.store(percent, Ordering::Relaxed);
        Ok(())
    }

    /// The current limit in percent.
    pub fn percent(&self) -> u32 {
        self.percent.load(Ordering::Relaxed)
    }

    /// The recent fraction of time (0.0 ..= 1.0) with I/O of this throttle's
    /// clients in flight, as the throttle measures it.
    pub fn busy_fraction(&self) -> f64 {
        let mut state = self.lock();
        state.advance(self.now_us());
        state.busy_fraction()
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ThrottleState> {
        // The state is plain numbers: a panic elsewhere cannot leave it unusable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn should_wait(&self) -> bool {
        let percent = self.percent();
        if percent >= 100 {
            // Still account, so that the busy fraction stays meaningful.
            self.lock().advance(self.now_us());
            return false;
        }
        self.lock().should_wait(self.now_us(), percent)
    }

    pub(crate) fn io_start(&self) {
        self.lock().io_start(self.now_us());
    }

    pub(crate) fn io_end(&self) {
        self.lock().io_end(self.now_us());
    }
}

fn check_percent(percent: u32) -> Result<(), KcopydError> {
    if percent > 100 {
        return Err(KcopydError::Config(format!(
            "throttle of {percent} % is out of range (0..=100, 100 = off)"
        )));
    }
    Ok(())
}

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle")
            .field("percent", &self.percent())
            .field("busy_fraction", &self.busy_fraction())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serial I/Os of `io_us` each, gated as the worker gates them, on a virtual
    /// clock; returns the busy fraction over the second half of the run.
    fn simulate(percent: u32, io_us: u64, run_us: u64) -> f64 {
        let mut state = ThrottleState::default();
        let step = RETRY_STEP.as_micros() as u64;
        let mut now = 0;
        let mut busy_in_window = 0;
        let window_start = run_us / 2;
        while now < run_us {
            let mut tries = 0;
            while tries < MAX_RETRIES && state.should_wait(now, percent) {
                now += step;
                tries += 1;
            }
            state.io_start(now);
            now += io_us;
            state.io_end(now);
            if now > window_start {
                busy_in_window += io_us;
            }
        }
        busy_in_window as f64 / (now - window_start) as f64
    }

    #[test]
    fn busy_fraction_follows_the_limit() {
        for percent in [10, 25, 50, 75] {
            let got = simulate(percent, 1_000, 60_000_000);
            let want = f64::from(percent) / 100.0;
            assert!((got - want).abs() <= 0.05, "{percent} %: busy fraction {got:.3}");
        }
    }

    #[test]
    fn full_speed_at_100_percent() {
        let got = simulate(100, 1_000, 5_000_000);
        assert!(got > 0.999, "busy fraction {got}");
    }

    #[test]
    fn a_waiting_io_goes_ahead_after_the_retry_limit() {
        // 0 % never lets the gate open; every I/O waits the full retry budget.
        let step = RETRY_STEP.as_micros() as u64;
        let got = simulate(0, 1_000, 10_000_000);
        let per_io = 1_000.0 / (1_000.0 + (MAX_RETRIES as u64 * step) as f64);
        assert!((got - per_io).abs() < 0.01, "busy fraction {got}, expected {per_io}");
    }

    #[test]
    fn out_of_range_percent_is_rejected() {
        assert!(Throttle::new(101).is_err());
        let t = Throttle::new(0).unwrap();
        assert!(t.set_percent(250).is_err());
        assert_eq!(t.percent(), 0);
    }
}
