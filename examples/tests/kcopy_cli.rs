//! End-to-end tests of the `kcopy` command-line tool on regular temporary files:
//! copies with verification and JSON output, range copies, zeroing, and the
//! one-line errors of bad input.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The size of the test files.
const SIZE: usize = 4 << 20;

/// A directory for the test files on a filesystem that supports O_DIRECT: the
/// same choice as the integration tests' fixtures (`DMIO_TEST_DIR`, else the
/// system temporary directory).
fn image_dir() -> tempfile::TempDir {
    let base =
        std::env::var_os("DMIO_TEST_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new().prefix("kcopy-cli").tempdir_in(base).expect("creating a temporary dir")
}

/// `len` deterministic pseudo-random bytes (xorshift64*, seeded by `seed`).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `bytes` to a new file `name` in `dir` and returns its path.
fn file_with(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, bytes).expect("writing a test file");
    path
}

/// Runs kcopy with `args`.
fn kcopy<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_kcopy")).args(args).output().expect("running kcopy")
}

/// Asserts that kcopy failed with exactly one line `kcopy: ...` on stderr that
/// contains `needle`, and returns that line.
fn assert_failed(out: &Output, needle: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "kcopy succeeded; stderr: {stderr}");
    assert_eq!(out.status.code(), Some(1), "exit status; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {stderr:?}");
    let line = lines[0];
    assert!(line.starts_with("kcopy: "), "stderr line: {line}");
    assert!(line.contains(needle), "stderr line {line:?} does not mention {needle:?}");
    line.to_string()
}

/// Asserts that kcopy succeeded with nothing on stderr (no progress bar without
/// a terminal) and returns its stdout.
fn assert_ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kcopy failed: {stderr}");
    assert!(stderr.is_empty(), "unexpected stderr: {stderr:?}");
    String::from_utf8(out.stdout.clone()).expect("UTF-8 stdout")
}

/// Parses kcopy's `--json` output: exactly one JSON object on one line.
fn parse_json(stdout: &str) -> serde_json::Value {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line of JSON, got: {stdout:?}");
    let value: serde_json::Value = serde_json::from_str(lines[0]).expect("valid JSON");
    assert!(value.is_object(), "not an object: {value}");
    value
}

#[test]
fn copy_one_to_two_with_verify_and_json() {
    let dir = image_dir();
    let data = pattern(SIZE, 1);
    let src = file_with(dir.path(), "src.img", &data);
    let a = file_with(dir.path(), "a.img", &vec![0; SIZE]);
    let b = file_with(dir.path(), "b.img", &vec![0xee; SIZE]);
    let out = kcopy([
        OsStr::new("--verify"),
        OsStr::new("--json"),
        src.as_os_str(),
        a.as_os_str(),
        b.as_os_str(),
    ]);
    let json = parse_json(&assert_ok(&out));
    assert_eq!(json["ok"], true, "{json}");
    assert_eq!(json["bytes"].as_u64(), Some(SIZE as u64), "{json}");
    assert!(json["seconds"].as_f64().is_some_and(|s| s >= 0.0), "{json}");
    assert!(json["mib_per_s"].as_f64().is_some_and(|r| r >= 0.0), "{json}");
    assert_eq!(json["read_err"], false, "{json}");
    assert_eq!(json["write_err"].as_u64(), Some(0), "{json}");
    assert_eq!(json["verified"], true, "{json}");
    assert_eq!(json["mode"], "copy", "{json}");
    // KC-17's measure: each chunk is one read and one fan-out write to both
    // destinations (three operations), issued with fewer engine calls.
    let sub_job = json["sub_job_bytes"].as_u64().expect("sub_job_bytes");
    let sub_jobs = json["sub_jobs"].as_u64().expect("sub_jobs");
    assert_eq!(sub_jobs, (SIZE as u64).div_ceil(sub_job), "{json}");
    assert!(json["io_ops"].as_u64().is_some_and(|ops| ops >= 3 * sub_jobs), "{json}");
    assert!(json["io_enters"].as_u64().is_some_and(|n| n >= 1), "{json}");
    assert!(json["enters_per_op"].as_f64().is_some_and(|r| r > 0.0), "{json}");
    let dests = json["destinations"].as_array().expect("destinations array");
    assert_eq!(dests.len(), 2, "{json}");
    assert_eq!(dests[0].as_str(), a.to_str(), "{json}");
    assert_eq!(json["source"].as_str(), src.to_str(), "{json}");
    assert!(fs::read(&a).unwrap() == data, "a.img differs from the source");
    assert!(fs::read(&b).unwrap() == data, "b.img differs from the source");
    assert!(fs::read(&src).unwrap() == data, "the source changed");
}

#[test]
fn human_summary_without_json() {
    let dir = image_dir();
    let data = pattern(SIZE, 2);
    let src = file_with(dir.path(), "src.img", &data);
    let dst = file_with(dir.path(), "dst.img", &vec![0; SIZE]);
    let stdout = assert_ok(&kcopy([&src, &dst]));
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    assert!(stdout.contains(&format!("{SIZE} bytes")) && stdout.contains("MiB/s"), "{stdout:?}");
    assert!(fs::read(&dst).unwrap() == data);
}

#[test]
fn range_copy_leaves_the_rest_untouched() {
    let dir = image_dir();
    let data = pattern(SIZE, 3);
    let src = file_with(dir.path(), "src.img", &data);
    let dst = file_with(dir.path(), "dst.img", &vec![0xee; SIZE]);
    // Sector 2048 = byte 1 MiB, 1 MiB + 64 KiB long, in 64 KiB sub-jobs, throttled.
    let out = kcopy([
        "--offset",
        "2048",
        "--length",
        "1088k",
        "--sub-job-kb",
        "64",
        "--throttle",
        "90",
        "--verify",
        "--json",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    let json = parse_json(&assert_ok(&out));
    assert_eq!(json["bytes"].as_u64(), Some(1088 << 10), "{json}");
    assert_eq!(json["offset_sectors"].as_u64(), Some(2048), "{json}");
    assert_eq!(json["verified"], true, "{json}");
    let got = fs::read(&dst).unwrap();
    let (start, end) = (1 << 20, (1 << 20) + (1088 << 10));
    assert!(got[..start].iter().all(|&b| b == 0xee), "bytes before the range changed");
    assert!(got[start..end] == data[start..end], "the range was not copied");
    assert!(got[end..].iter().all(|&b| b == 0xee), "bytes after the range changed");
}

#[test]
fn zero_a_range_and_whole_destinations() {
    let dir = image_dir();
    let data = pattern(SIZE, 4);
    let a = file_with(dir.path(), "a.img", &data);
    let b = file_with(dir.path(), "b.img", &data[..SIZE / 2]);

    // A range: sector 8, 64 KiB, on both.
    let out = kcopy([
        "--zero",
        "--offset",
        "8",
        "--length",
        "64KiB",
        "--verify",
        "--json",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    let json = parse_json(&assert_ok(&out));
    assert_eq!(json["mode"], "zero", "{json}");
    assert_eq!(json["bytes"].as_u64(), Some(64 << 10), "{json}");
    assert_eq!(json["verified"], true, "{json}");
    assert!(json["source"].is_null(), "{json}");
    for (path, len) in [(&a, SIZE), (&b, SIZE / 2)] {
        let got = fs::read(path).unwrap();
        assert_eq!(got.len(), len);
        assert!(got[..4096] == data[..4096], "{}: bytes before the range changed", path.display());
        assert!(got[4096..4096 + (64 << 10)].iter().all(|&x| x == 0), "{}", path.display());
        assert!(got[4096 + (64 << 10)..] == data[4096 + (64 << 10)..len], "{}", path.display());
    }

    // Without --length: the size of the smallest destination.
    let stdout = assert_ok(&kcopy([OsStr::new("--zero"), a.as_os_str(), b.as_os_str()]));
    assert!(stdout.contains(&format!("{} bytes", SIZE / 2)), "{stdout:?}");
    let got = fs::read(&a).unwrap();
    assert!(got[..SIZE / 2].iter().all(|&x| x == 0), "a.img: the first half is not zero");
    assert!(got[SIZE / 2..] == data[SIZE / 2..], "a.img: the second half changed");
    assert!(fs::read(&b).unwrap().iter().all(|&x| x == 0), "b.img is not zero");
}

#[test]
fn missing_source_is_one_line_naming_it() {
    let dir = image_dir();
    let dst = file_with(dir.path(), "dst.img", &vec![0; SIZE]);
    let missing = dir.path().join("no-such-source.img");
    let out = kcopy([&missing, &dst]);
    assert_failed(&out, missing.to_str().unwrap());
    assert!(out.stdout.is_empty(), "stdout: {:?}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn nine_destinations_are_refused() {
    let dir = image_dir();
    let src = file_with(dir.path(), "src.img", &pattern(SIZE, 5));
    let dsts: Vec<PathBuf> =
        (0..9).map(|i| file_with(dir.path(), &format!("d{i}.img"), &vec![0; SIZE])).collect();
    let mut args = vec![src.clone()];
    args.extend(dsts.iter().cloned());
    let line = assert_failed(&kcopy(&args), "kcopy: ");
    assert!(line.contains('8'), "the limit is not named: {line}");
    for dst in &dsts {
        assert!(fs::read(dst).unwrap().iter().all(|&x| x == 0), "{} was written", dst.display());
    }
    // --zero has the same limit.
    let mut args = vec![PathBuf::from("--zero")];
    args.extend(dsts.iter().cloned());
    assert_failed(&kcopy(&args), "kcopy: ");
}

#[test]
fn destination_smaller_than_the_range() {
    let dir = image_dir();
    let src = file_with(dir.path(), "src.img", &pattern(SIZE, 6));
    let big = file_with(dir.path(), "big.img", &vec![0; SIZE]);
    let small = file_with(dir.path(), "small.img", &vec![0; SIZE / 4]);
    let out = kcopy([OsStr::new("--json"), src.as_os_str(), big.as_os_str(), small.as_os_str()]);
    assert_failed(&out, small.to_str().unwrap());
    // --json still reports, with the reason.
    let json = parse_json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(json["ok"], false, "{json}");
    assert!(json["error"].as_str().is_some_and(|e| e.contains("small.img")), "{json}");
    assert!(fs::read(&big).unwrap().iter().all(|&x| x == 0), "big.img was written");

    // An explicit range past the end of a destination.
    let out = kcopy([
        OsStr::new("--offset"),
        OsStr::new("2048"),
        OsStr::new("--length"),
        OsStr::new("1M"),
        src.as_os_str(),
        small.as_os_str(),
    ]);
    assert_failed(&out, small.to_str().unwrap());
}

#[test]
fn misaligned_length_is_a_clear_error() {
    let dir = image_dir();
    let src = file_with(dir.path(), "src.img", &pattern(SIZE, 7));
    let dst = file_with(dir.path(), "dst.img", &vec![0; SIZE]);
    let line = assert_failed(
        &kcopy(["--length", "1000", src.to_str().unwrap(), dst.to_str().unwrap()]),
        "1000",
    );
    assert!(line.contains("--length"), "{line}");
    assert!(fs::read(&dst).unwrap().iter().all(|&x| x == 0), "dst.img was written");
}

#[test]
fn throttle_above_100_is_refused() {
    let dir = image_dir();
    let src = file_with(dir.path(), "src.img", &pattern(SIZE, 8));
    let dst = file_with(dir.path(), "dst.img", &vec![0; SIZE]);
    let out = kcopy(["--throttle", "101", src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert_failed(&out, "101");
    assert!(out.stdout.is_empty());
    assert!(fs::read(&dst).unwrap().iter().all(|&x| x == 0), "dst.img was written");
}

#[test]
fn usage_errors_exit_with_status_2() {
    let dir = image_dir();
    let src = file_with(dir.path(), "src.img", &pattern(SIZE, 9));
    // A copy needs a destination.
    assert_eq!(kcopy([&src]).status.code(), Some(2));
    // A bad size suffix.
    assert_eq!(kcopy(["--length", "3x", "a", "b"]).status.code(), Some(2));
    // --help works and shows the examples.
    let help = kcopy(["--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("Examples:"));
}

/// A loop device with 4096-byte sectors over a zero-filled image in `dir`, or
/// None (with the reason printed) when loop devices are unavailable and not
/// required (`DMIO_REQUIRE_LOOP=1` makes that a failure).
fn loop4096(dir: &Path) -> Option<dmio::loopdev::LoopDevice> {
    if let Some(reason) = dmio::loopdev::unavailable_reason() {
        let required = std::env::var("DMIO_REQUIRE_LOOP").is_ok_and(|v| v.trim() == "1");
        assert!(!required, "DMIO_REQUIRE_LOOP=1 but loop devices are unavailable: {reason}");
        eprintln!("skipping the loop-device test: {reason}");
        return None;
    }
    let image = file_with(dir, "loop.img", &vec![0; SIZE]);
    let options = dmio::loopdev::LoopOptions::new().sector_size(4096);
    Some(dmio::loopdev::LoopDevice::attach(&image, options).expect("attaching a loop device"))
}

#[test]
fn range_misaligned_for_a_4k_device() {
    let dir = image_dir();
    let Some(lo) = loop4096(dir.path()) else { return };
    let data = pattern(SIZE, 10);
    let src = file_with(dir.path(), "src.img", &data);
    let dst = lo.path().to_str().unwrap().to_string();
    // Sector 1 is not at a 4096-byte boundary; 2560 bytes are not whole blocks.
    // (The source file may be refused first: on some filesystems, tmpfs for one,
    // files need 4096-byte alignment too.)
    let src_path = src.to_str().unwrap();
    for args in [&["--offset", "1", "--length", "4k"][..], &["--length", "2560"]] {
        let mut args = args.to_vec();
        args.extend([src_path, &dst]);
        let line = assert_failed(&kcopy(&args), "4096");
        assert!(line.contains(&dst) || line.contains(src_path), "{line}");
    }
    let line = assert_failed(&kcopy(["--zero", "--offset", "1", "--length", "4k", &dst]), "4096");
    assert!(line.contains(&dst), "{line}");
    // Aligned, the same device works, and verifies.
    let out = kcopy(["--offset", "8", "--length", "1M", "--verify", src.to_str().unwrap(), &dst]);
    assert_ok(&out);
    let out = kcopy(["--zero", "--offset", "16", "--length", "8k", "--verify", &dst]);
    assert_ok(&out);
    drop(lo);
    let got = fs::read(dir.path().join("loop.img")).unwrap();
    assert!(got[..4096].iter().all(|&x| x == 0), "bytes before the range changed");
    assert!(got[4096..8192] == data[4096..8192]);
    assert!(got[8192..16384].iter().all(|&x| x == 0), "the zeroed range");
    assert!(got[16384..4096 + (1 << 20)] == data[16384..4096 + (1 << 20)]);
    assert!(got[4096 + (1 << 20)..].iter().all(|&x| x == 0), "bytes after the range changed");
}
