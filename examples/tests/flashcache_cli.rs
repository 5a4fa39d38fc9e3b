//! End-to-end tests of the `flashcache` tool on regular files: the life cycle
//! (create -> write -> read back -> status -> stats -> run -> sync -> destroy),
//! simulate with a chart, every bad input of the issue with its one-line error
//! and no write to the devices, and the demo in its quick mode.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;

fn image_dir() -> tempfile::TempDir {
    let base =
        std::env::var_os("DMIO_TEST_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new().prefix("flashcache-cli").tempdir_in(base).unwrap()
}

fn sized_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    fs::File::create(&path).and_then(|f| f.set_len(size)).unwrap();
    path
}

fn flashcache<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_flashcache")).args(args).output().expect("running flashcache")
}

fn stdout(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "flashcache failed: {}\nstdout: {text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Asserts one line `flashcache: ...` containing `needle` on stderr and exit 1.
fn assert_failed(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit status; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {stderr:?}");
    assert!(lines[0].starts_with("flashcache: "), "{}", lines[0]);
    assert!(lines[0].contains(needle), "{:?} does not mention {needle:?}", lines[0]);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn life_cycle_create_write_read_status_stats_run_sync_destroy() {
    let dir = image_dir();
    let ssd = sized_file(dir.path(), "ssd.img", 4 * MIB);
    let disk = sized_file(dir.path(), "disk.img", 16 * MIB);
    let out = stdout(&flashcache(["create", "--mode", "back", "--assoc", "64", p(&ssd), p(&disk)]));
    assert!(out.contains("write-back cache of"), "{out}");
    assert!(out.contains("bytes per block"), "the RAM warning: {out}");

    // A write of 10000 bytes (not a whole number of sectors) at 1 MiB.
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let input = dir.path().join("in.bin");
    fs::write(&input, &data).unwrap();
    stdout(&flashcache(["write", p(&ssd), p(&disk), "--offset", "1m", "--input", p(&input)]));
    let output = dir.path().join("out.bin");
    stdout(&flashcache([
        "read",
        p(&ssd),
        p(&disk),
        "--offset",
        "1m",
        "--length",
        "10000",
        "--output",
        p(&output),
    ]));
    assert_eq!(fs::read(&output).unwrap(), data);
    // Write-back: the disk itself does not have it yet.
    let on_disk = fs::read(&disk).unwrap();
    assert_ne!(&on_disk[MIB as usize..MIB as usize + 8192], &data[..8192]);

    let status = stdout(&flashcache(["status", p(&ssd)]));
    assert!(status.contains("write-back"), "{status}");
    assert!(status.contains("dirty (orderly shutdown keeping dirty blocks)"), "{status}");
    // Two whole blocks are cached; the last 1808 bytes (part of a block that was
    // not cached) went to the disk uncached.
    assert!(status.contains("2 cached, 2 dirty"), "{status}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&flashcache(["status", "--json", p(&ssd)]))).unwrap();
    assert_eq!(json["dirty_blocks"], 2);
    assert_eq!(json["assoc"], 64);

    let stats = stdout(&flashcache(["stats", p(&ssd), p(&disk)]));
    assert!(stats.lines().any(|l| l == "writes=1"), "the counters persist: {stats}");
    assert!(stats.lines().any(|l| l == "dirty_blocks=2"), "{stats}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&flashcache(["stats", "--json", p(&ssd), p(&disk)]))).unwrap();
    // The write read its partial last sector range first; then the read command.
    assert_eq!(json["reads"], 2);

    let run = stdout(&flashcache([
        "run",
        p(&ssd),
        p(&disk),
        "--workload",
        "zipf",
        "--iodepth",
        "4",
        "--runtime",
        "1",
        "--verify",
        "--working-set",
        "512k", // below the data written at 1 MiB
    ]));
    assert!(run.contains("reads verified"), "{run}");

    // Refused while dirty blocks exist.
    let out = flashcache(["destroy", p(&ssd)]);
    assert_failed(&out, "may hold dirty blocks");
    let out = stdout(&flashcache(["sync", p(&ssd), p(&disk)]));
    assert!(out.contains("the cache is clean"), "{out}");
    let on_disk = fs::read(&disk).unwrap();
    assert_eq!(&on_disk[MIB as usize..MIB as usize + data.len()], &data[..], "sync cleaned it");
    let status = stdout(&flashcache(["status", p(&ssd)]));
    assert!(status.contains("clean (orderly shutdown, no dirty blocks)"), "{status}");
    stdout(&flashcache(["destroy", p(&ssd)]));
    assert_failed(&flashcache(["status", p(&ssd)]), "holds no cache");
}

#[test]
fn bad_input_gets_one_line_and_writes_nothing() {
    let dir = image_dir();
    let ssd = sized_file(dir.path(), "ssd.img", 4 * MIB);
    let disk = sized_file(dir.path(), "disk.img", 16 * MIB);
    let missing = dir.path().join("nope.img");
    let untouched = |path: &Path| fs::read(path).unwrap().iter().all(|&b| b == 0);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["create", "--mode", "back", "--block-size", "3k", p(&ssd), p(&disk)], "power of two"),
        (vec!["create", "--mode", "back", "--assoc", "100", p(&ssd), p(&disk)], "power of two"),
        (vec!["create", "--mode", "back", "--size", "1g", p(&ssd), p(&disk)], "the SSD has"),
        (vec!["create", "--mode", "back", p(&ssd), p(&ssd)], "both the SSD and the disk"),
        (vec!["create", "--mode", "back", p(&missing), p(&disk)], "no such file"),
        (vec!["status", p(&ssd)], "holds no cache"),
        (vec!["stats", p(&ssd), p(&disk)], "holds no cache"),
    ];
    for (args, needle) in cases {
        assert_failed(&flashcache(&args), needle);
        assert!(untouched(&ssd) && untouched(&disk), "{args:?} wrote to a device");
    }
    // Bad usage (clap) exits 2.
    assert_eq!(
        flashcache(["create", "--mode", "sideways", p(&ssd), p(&disk)]).status.code(),
        Some(2)
    );

    stdout(&flashcache(["create", "--mode", "thru", "--assoc", "64", p(&ssd), p(&disk)]));
    let input = dir.path().join("in.bin");
    fs::write(&input, [1u8; 4096]).unwrap();
    assert_failed(
        &flashcache(["write", p(&ssd), p(&disk), "--offset", "100", "--input", p(&input)]),
        "not a multiple of 512",
    );
    assert_failed(
        &flashcache(["write", p(&ssd), p(&disk), "--offset", "16m", "--input", p(&input)]),
        "past its end",
    );
    // A disk smaller than the cache's record of it.
    fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(8 * MIB).unwrap();
    assert_failed(&flashcache(["stats", p(&ssd), p(&disk)]), "sectors");
    // The same device twice, on a command that loads.
    assert_failed(&flashcache(["stats", p(&ssd), p(&ssd)]), "both the SSD and the disk");
}

#[test]
fn simulate_prints_a_table_and_draws_a_chart() {
    let dir = image_dir();
    let trace = dir.path().join("t.txt");
    let mut text = String::new();
    let mut x = 7u64;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // A skewed footprint: small blocks numbers more often.
        let block = (x % 1000) * (x % 7) / 6;
        text.push_str(&format!("R {} 8\n", block * 8));
    }
    fs::write(&trace, text).unwrap();
    let svg = dir.path().join("miss.svg");
    let out = stdout(&flashcache([
        "simulate",
        "--trace",
        p(&trace),
        "--assoc",
        "16",
        "--sizes",
        "5%,20%",
        "--plot",
        p(&svg),
    ]));
    for policy in ["fifo", "lru", "slru", "sieve"] {
        assert!(out.lines().any(|l| l.starts_with(policy)), "{policy}: {out}");
    }
    let chart = fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.matches("<polyline").count() == 4, "{chart}");
    assert_failed(&flashcache(["simulate", "--trace", p(&dir.path().join("none"))]), "none");
}

#[test]
fn the_demo_runs_verifies_and_tidies_up() {
    let dir = image_dir();
    let child = Command::new(env!("CARGO_BIN_EXE_flashcache"))
        .args(["demo", "--quick", "--dir", p(dir.path())])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running flashcache demo");
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    for needle in
        ["the raw disk", "read hit ratio", "reloaded", "verified all", "cleaned", "tidied up"]
    {
        assert!(text.contains(needle), "{needle:?} missing: {text}");
    }
    // Nothing left behind: no files in the directory, no loop device on them.
    let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    for entry in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let backing = entry.path().join("loop/backing_file");
        if let Ok(file) = fs::read_to_string(&backing) {
            assert!(!file.starts_with(p(dir.path())), "{} still attached", entry.path().display());
        }
    }
    let group = PathBuf::from(format!("/sys/fs/cgroup/blkio/flashcache-demo-{pid}"));
    assert!(!group.exists(), "{} left behind", group.display());
}
