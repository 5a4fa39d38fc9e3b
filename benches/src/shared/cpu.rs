//! CPU accounting and device checks shared by the benchmark binaries
//! (included with `#[path]`, since the `benches` package has binaries only).

use std::path::Path;

/// CPU time of this process (all threads), in seconds: (user, system).
pub fn process_cpu() -> (f64, f64) {
    // SAFETY: `rusage` is plain old data; all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one `rusage` through a valid, exclusive pointer.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return (0.0, 0.0);
    }
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime), secs(usage.ru_stime))
}

/// Aggregate CPU times of the machine from the first line of `/proc/stat`, in
/// clock ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemCpu {
    /// user + nice + system + irq + softirq (guest time is included in user).
    pub busy: u64,
    /// Time stolen by the hypervisor.
    pub steal: u64,
    /// idle + iowait.
    pub idle: u64,
}

impl SystemCpu {
    /// Reads `/proc/stat` (zeros when it cannot be read).
    pub fn read() -> SystemCpu {
        let Ok(text) = std::fs::read_to_string("/proc/stat") else {
            return SystemCpu::default();
        };
        let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
            return SystemCpu::default();
        };
        let f: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        SystemCpu { busy: at(0) + at(1) + at(2) + at(5) + at(6), steal: at(7), idle: at(3) + at(4) }
    }
}

/// Clock ticks per second of `/proc/stat`.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// Whether a loop device has direct I/O on (`/sys/block/loopN/loop/dio`), if
/// `path` is a loop device.
pub fn loop_dio(path: &Path) -> Option<bool> {
    let real = std::fs::canonicalize(path).ok()?;
    let name = real.file_name()?.to_str()?;
    if !name.starts_with("loop") {
        return None;
    }
    let text = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).ok()?;
    Some(text.trim() == "1")
}

/// The latency line of a text report, from a histogram of nanoseconds.
pub fn latency_line(h: &hdrhistogram::Histogram<u64>) -> String {
    let us = |ns: u64| ns as f64 / 1000.0;
    format!(
        "  latency (us): min {:.1}  mean {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}\n",
        us(h.min()),
        h.mean() / 1000.0,
        us(h.value_at_quantile(0.50)),
        us(h.value_at_quantile(0.90)),
        us(h.value_at_quantile(0.99)),
        us(h.value_at_quantile(0.999)),
        us(h.max())
    )
}

/// The CPU line of a text report: the process's (user, system) seconds and the
/// machine's (busy, idle, steal) seconds, with `per_io` turning seconds into
/// microseconds per I/O.
pub fn cpu_line(
    (user, sys): (f64, f64),
    (busy, idle, steal): (f64, f64, f64),
    per_io: impl Fn(f64) -> f64,
) -> String {
    format!(
        "  CPU: process user {user:.2}s sys {sys:.2}s ({:.2} us/IO); all CPUs busy {busy:.2}s ({:.2} us/IO), idle {idle:.2}s, steal {steal:.2}s\n",
        per_io(user + sys),
        per_io(busy),
    )
}
