//! End-to-end tests of the `cache-sim` command-line tool: a generated Zipf
//! trace written out and replayed from the file, small text and MSR traces with
//! known answers, and the one-line errors of bad input.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs cache-sim with `args`.
fn cache_sim<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_cache-sim")).args(args).output().expect("running cache-sim")
}

/// Asserts success with nothing on stderr and returns stdout.
fn assert_ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cache-sim failed: {stderr}");
    assert!(stderr.is_empty(), "unexpected stderr: {stderr:?}");
    String::from_utf8(out.stdout.clone()).expect("UTF-8 stdout")
}

/// Asserts failure with status 1 and exactly one line `cache-sim: ...`
/// containing `needle` on stderr, and nothing on stdout.
fn assert_failed(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit status; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {stderr:?}");
    assert!(lines[0].starts_with("cache-sim: "), "stderr line: {}", lines[0]);
    assert!(lines[0].contains(needle), "{:?} does not mention {needle:?}", lines[0]);
    assert!(out.stdout.is_empty(), "unexpected stdout");
}

/// Parses `--json` output: one object on one line.
fn parse_json(stdout: &str) -> serde_json::Value {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line of JSON, got: {stdout:?}");
    serde_json::from_str(lines[0]).expect("valid JSON")
}

fn file_with(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).expect("writing a test file");
    path
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("cache-sim-cli").tempdir().expect("a temporary directory")
}

#[test]
fn zipf_trace_written_and_replayed_gives_the_same_results() {
    let dir = tempdir();
    let trace = dir.path().join("zipf.txt");
    let common = ["--assoc", "full", "--sizes", "1%,10%,500", "--json"];
    let generated = cache_sim(
        ["--zipf", "5000,0.8,20000,7", "--shuffle", "--write-trace", trace.to_str().unwrap()]
            .iter()
            .chain(&common),
    );
    let generated = parse_json(&assert_ok(&generated));
    assert_eq!(fs::read_to_string(&trace).unwrap().lines().count(), 20_000);
    let replayed = cache_sim(["--trace", trace.to_str().unwrap()].iter().chain(&common));
    let replayed = parse_json(&assert_ok(&replayed));
    assert_eq!(generated["results"], replayed["results"]);
    assert_eq!(generated["trace"]["kind"], "zipf");
    assert_eq!(generated["trace"]["shuffled"], true);
    assert_eq!(replayed["trace"]["format"], "text");
    assert!(replayed["assoc"].is_null());

    let results = replayed["results"].as_array().unwrap();
    // Four policies, three sizes each, policies in the outer loop.
    assert_eq!(results.len(), 12);
    let names: Vec<&str> =
        results.iter().step_by(3).map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(names, ["fifo", "lru", "slru", "sieve"]);
    let footprint = replayed["footprint_blocks"].as_u64().unwrap();
    assert_eq!(results[0]["cache_blocks"].as_u64(), Some(footprint / 100));
    assert_eq!(results[2]["cache_blocks"].as_u64(), Some(500));
    for r in results {
        assert_eq!(r["accesses"].as_u64(), Some(20_000));
        let miss = r["miss_ratio"].as_f64().unwrap();
        assert!(miss > 0.0 && miss < 1.0, "{r}");
        assert_eq!(r["hits"].as_u64().unwrap() + r["misses"].as_u64().unwrap(), 20_000);
    }
}

#[test]
fn table_for_a_small_text_trace_and_an_msr_trace() {
    let dir = tempdir();
    // Blocks 1 2 3 1 4 1 2 5 1 3 (4 KiB blocks): with 3 blocks LRU hits 3 times, FIFO twice.
    let text: String = "# hand-made\n".to_owned()
        + &[1u64, 2, 3, 1, 4, 1, 2, 5, 1, 3]
            .iter()
            .map(|b| format!("R {} 8\n", b * 8))
            .collect::<String>();
    let path = file_with(dir.path(), "t.txt", &text);
    let stdout = assert_ok(&cache_sim([
        "--trace",
        path.to_str().unwrap(),
        "--assoc",
        "full",
        "--sizes",
        "3",
    ]));
    assert!(stdout.contains("fully associative"), "{stdout}");
    assert!(stdout.contains("footprint 5 blocks"), "{stdout}");
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{stdout}"))
            .to_owned()
    };
    assert!(row("lru").ends_with("0.7000"), "{stdout}");
    assert!(row("fifo").ends_with("0.8000"), "{stdout}");
    assert!(row("sieve").ends_with("0.7000"), "{stdout}");

    // The same accesses as MSR CSV with a header: Auto detects the format; one
    // 8 KiB write covers blocks 1 and 2.
    let msr = "Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime\n\
               1,hm,0,Write,4096,8192,10\n\
               2,hm,0,Read,4096,4096,10\n\
               3,hm,0,Read,12288,4096,10\n";
    let path = file_with(dir.path(), "t.csv", msr);
    let json = parse_json(&assert_ok(&cache_sim([
        "--trace",
        path.to_str().unwrap(),
        "--policy",
        "lru",
        "--sizes",
        "100%",
        "--assoc",
        "2",
        "--mapping",
        "linear",
        "--json",
    ])));
    assert_eq!(json["trace"]["format"], "msr");
    assert_eq!((json["assoc"].as_u64(), json["mapping"].as_str()), (Some(2), Some("linear")));
    let r = &json["results"][0];
    assert_eq!((r["writes"].as_u64(), r["write_hits"].as_u64()), (Some(2), Some(0)));
    assert_eq!((r["reads"].as_u64(), r["read_hits"].as_u64()), (Some(2), Some(1)));
    assert_eq!((r["cache_blocks"].as_u64(), r["sets"].as_u64()), (Some(4), Some(2)));
}

#[test]
fn bad_input_fails_with_one_line() {
    let dir = tempdir();
    let bad = file_with(dir.path(), "bad.txt", "R 0 8\nW 8 8\nR 16 zero\n");
    assert_failed(&cache_sim(["--trace", bad.to_str().unwrap()]), "bad.txt: line 3: count");
    let msr = file_with(dir.path(), "bad.csv", "1,hm,0,Read,0,4096,1\n1,hm,0,Trim,0,4096,1\n");
    assert_failed(&cache_sim(["--trace", msr.to_str().unwrap()]), "line 2: unknown operation");
    let empty = file_with(dir.path(), "empty.txt", "# nothing\n");
    assert_failed(&cache_sim(["--trace", empty.to_str().unwrap()]), "no records");
    let missing = dir.path().join("missing.txt");
    assert_failed(&cache_sim(["--trace", missing.to_str().unwrap()]), "missing.txt");
    // A fully associative cache past 65535 blocks.
    assert_failed(
        &cache_sim(["--zipf", "1000,1.0,100,1", "--assoc", "full", "--sizes", "70000"]),
        "too large",
    );
    assert_failed(&cache_sim(["--zipf", "1000,1.0,100,1", "--assoc", "24"]), "power of two");
    assert_failed(&cache_sim(["--zipf", "100000000,1.0,100,1"]), "too many");
    // Usage errors are clap's: status 2.
    for args in [
        &["--zipf", "10,1,10,1", "--trace", "x"][..],
        &[][..],
        &["--zipf", "10,1,10"][..],
        &["--zipf", "10,1,10,1", "--policy", "arc"][..],
        &["--zipf", "10,1,10,1", "--sizes", "0%"][..],
        &["--zipf", "10,1,10,1", "--format", "msr"][..],
    ] {
        assert_eq!(cache_sim(args).status.code(), Some(2), "{args:?}");
    }
}
