#!/usr/bin/env bash
# run-cache-compare.sh: cache-bench (flashcache-core's Cache) against fio on the
# raw devices, side by side.
#
# Devices (shared/reference/performance.md section 7.1):
#   SSD   a loop device on a file in /dev/shm (SSD_SIZE, fully allocated),
#         --direct-io=on
#   DISK  a loop device on a file on ext4 (EXT4_DIR, DISK_SIZE, fallocated),
#         --direct-io=on, throttled with a cgroup-v1 blkio group to 200 read
#         IOPS, 200 write IOPS and 150 MB/s each way (READ_IOPS, WRITE_IOPS,
#         BPS). The limits apply to tasks in the group, so every fio run and
#         every cache-bench measurement runs inside it. For the all-hit read
#         cases cache-bench starts outside and joins the group (--cgroup) after
#         its warm-up, so filling the cache is not held to 200 IOPS; the
#         measured phase then runs under the same limits as fio.
# Direct I/O is checked on both loops (losetup -O DIO).
#
# Cases (each: fio io_uring --numjobs=1 --iodepth=N, the reference the targets
# name; fio psync --numjobs=N --thread, a thread-per-I/O reference; cache-bench
# with the engine the case names: async, N requests in flight through the
# cache's submit_read/submit_write, each resubmitted from its completion
# callback (io_uring's model: the targets compare it with fio io_uring), or
# sync, N threads of blocking I/O through the cache (psync's model: compare it
# with fio psync); cases with the async engine also run fio io_uring with
# --fixedbufs ("fio-fixed"), since that engine's buffers are the cache's
# registered pool pages (Cache::io_buffer), and report cache/fio-fixed too):
#   hit-rr32          4k randread QD32, all hits (cache-bench --warm),
#                     engine async                                  vs raw SSD   target >= 0.90
#   hit-rr32-threads  the same, engine sync (32 threads)            vs raw SSD   (recorded)
#   hit-rr1           4k randread QD1, all hits, engine async       vs raw SSD   target >= 0.90
#   hit-rr1-threads   the same, engine sync (1 thread)              vs raw SSD   (recorded)
#   miss-rr32         4k randread QD32, cold cache, working set = the
#                     whole disk (> the cache), read-allocate,
#                     engine sync (32 threads)                      vs raw disk  target >= 0.95
#   wb-rw32           4k randwrite QD32, write-back hits (warmed by
#                     writing the working set), commit on-flush,
#                     engine async                                  vs raw SSD   target >= 0.85
#   wb-rw32-threads   the same, engine sync (32 threads)            vs raw SSD   (recorded)
#   wb-rw32-sync      wb-rw32 with --commit sync, engine async      vs raw SSD   (recorded)
# Optional (CASES): wb-rw32-clean and wb-rw32-sync-clean, the write cases with
# the working set warmed by reading (cached clean), so first writes dirty
# blocks during the run (sync mode then commits metadata on the write path);
# engine async.
# Same offset range for all tools of a case (WS from offset 0 for hit and
# write cases, the whole disk for the miss case). PAIRS rounds; the order of
# the tools rotates every round. Before every run it waits until no
# other benchmark runs (pgrep: fio, kcopy, run-kcopy-compare, kcopy-*; every
# 20 s, at most WAIT_MAX s, then runs anyway and records it).
#
# Reports per case the median of each tool's IOPS, the median and min-max of
# the per-round ratios cache/fio-io_uring (the target) and cache/fio-psync,
# the cache's hit ratio, p50/p99 latencies, CPU per I/O (busy time of all CPUs
# from /proc/stat over the measured window, so loop kworkers count; and the
# cache-bench process's own CPU) and the cache's index bytes per block.
# Every raw JSON, environment.txt, summary.json and summary.md go to
# benches/results/<date>-cache/.
#
# Usage (as root, from anywhere in the repository):
#   bash benches/run-cache-compare.sh [--pairs N] [--runtime S] [--ramp S]
#        [--cases "hit-rr32 miss-rr32"] [--results DIR]
#
# Environment variables: PAIRS (5), RUNTIME (8), RAMP (2), CASES (all eight above),
# WS (working set of the hit and write cases, 1G), SSD_SIZE (4G), DISK_SIZE
# (8G; must exceed SSD_SIZE so the miss case misses), EXT4_DIR (/var/tmp; must
# be ext4), READ_IOPS (200), WRITE_IOPS (200), BPS (150000000), WAIT_IDLE (1:
# wait for other benchmarks before each run; 0: do not), WAIT_MAX (2400),
# STEAL_MAX (0.05: the largest share of the CPUs' time lost to steal for a
# round to count as a low-steal round in the report), SETTLE (5: seconds every
# tool's run starts idle: the script sleeps that long before each fio run, and
# cache-bench sleeps that long after its warm-up (--settle), so that neither
# starts measuring right after a burst of load; on a host that caps the VM's
# CPU time a burst shows up as steal in the window after it),
# CACHE_BENCH (a cache-bench binary to use instead of building one), RESULTS
# (default benches/results/<date>-cache), PIN (a command prefix for every
# tool, e.g. "taskset -c 0"), CARGO_TARGET_DIR.
set -euo pipefail

PAIRS=${PAIRS:-5}
RUNTIME=${RUNTIME:-8}
RAMP=${RAMP:-2}
CASES=${CASES:-"hit-rr32 hit-rr32-threads hit-rr1 hit-rr1-threads miss-rr32 wb-rw32 wb-rw32-threads wb-rw32-sync"}
WS=${WS:-1G}
SSD_SIZE=${SSD_SIZE:-4G}
DISK_SIZE=${DISK_SIZE:-8G}
EXT4_DIR=${EXT4_DIR:-/var/tmp}
READ_IOPS=${READ_IOPS:-200}
WRITE_IOPS=${WRITE_IOPS:-200}
BPS=${BPS:-150000000}
WAIT_IDLE=${WAIT_IDLE:-1}
WAIT_MAX=${WAIT_MAX:-2400}
STEAL_MAX=${STEAL_MAX:-0.05}
SETTLE=${SETTLE:-5}
CACHE_BENCH=${CACHE_BENCH:-}
RESULTS=${RESULTS:-}
PIN=${PIN:-}

die() {
    echo "run-cache-compare: error: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
    --pairs) PAIRS=${2:?--pairs needs a value}; shift 2 ;;
    --runtime) RUNTIME=${2:?--runtime needs a value}; shift 2 ;;
    --ramp) RAMP=${2:?--ramp needs a value}; shift 2 ;;
    --cases) CASES=${2:?--cases needs a value}; shift 2 ;;
    --results) RESULTS=${2:?--results needs a value}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
done

case "$PAIRS" in '' | *[!0-9]*) die "PAIRS must be a positive integer, not '$PAIRS'" ;; esac
[ "$PAIRS" -ge 1 ] || die "PAIRS must be at least 1"

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
[ -z "$RESULTS" ] && RESULTS="$REPO/benches/results/$(date +%Y%m%d-%H%M%S)-cache"

[ "$(id -u)" -eq 0 ] || die "must run as root (loop devices, cgroups)"
command -v python3 >/dev/null || die "python3 is required"
command -v losetup >/dev/null || die "losetup (util-linux) is required"
[ -d /sys/fs/cgroup/blkio ] || die "no cgroup-v1 blkio hierarchy at /sys/fs/cgroup/blkio"
[ -d "$EXT4_DIR" ] || die "EXT4_DIR $EXT4_DIR is not a directory"
case "$(stat -f -c %T "$EXT4_DIR")" in
ext2/ext3 | ext4) ;;
*) die "EXT4_DIR $EXT4_DIR is on $(stat -f -c %T "$EXT4_DIR"), not ext4" ;;
esac

if ! command -v fio >/dev/null; then
    echo "== installing fio"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y fio >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y fio; } ||
        die "could not install fio with apt-get"
fi

mkdir -p "$RESULTS"
if [ -z "$CACHE_BENCH" ]; then
    command -v cargo >/dev/null || die "cargo is required (or set CACHE_BENCH)"
    echo "== building cache-bench (release)"
    cargo build --release --quiet -p benches --bin cache-bench || die "cargo build failed"
    TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
    case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$REPO/$TARGET_DIR" ;; esac
    CACHE_BENCH="$TARGET_DIR/release/cache-bench"
fi
[ -x "$CACHE_BENCH" ] || die "cache-bench binary not found at $CACHE_BENCH"
# A private copy: the binary under test cannot change during the run.
cp "$CACHE_BENCH" "$RESULTS/cache-bench"
BENCH="$RESULTS/cache-bench"

SSD_IMG=""
DISK_IMG=""
SSD=""
DISK=""
CG=""
cleanup() {
    set +e
    if [ -n "$CG" ] && [ -d "$CG" ]; then
        # Anything left in the group (a killed run) goes back to the root group.
        for pid in $(cat "$CG/cgroup.procs" 2>/dev/null); do
            echo "$pid" >/sys/fs/cgroup/blkio/cgroup.procs 2>/dev/null
        done
        rmdir "$CG" 2>/dev/null || echo "run-cache-compare: warning: could not remove $CG" >&2
    fi
    [ -n "$SSD" ] && losetup -d "$SSD" 2>/dev/null
    [ -n "$DISK" ] && losetup -d "$DISK" 2>/dev/null
    [ -n "$SSD_IMG" ] && rm -f "$SSD_IMG"
    [ -n "$DISK_IMG" ] && rm -f "$DISK_IMG"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SSD_IMG=$(mktemp /dev/shm/cache-compare-ssd.XXXXXX.img)
# Every page allocated up front, so reads hit real tmpfs pages, not holes.
fallocate -l "$SSD_SIZE" "$SSD_IMG" || die "cannot allocate $SSD_SIZE in /dev/shm"
SSD=$(losetup -f --show --direct-io=on "$SSD_IMG") || die "losetup failed for the SSD"
DISK_IMG=$(mktemp "$EXT4_DIR/cache-compare-disk.XXXXXX.img")
fallocate -l "$DISK_SIZE" "$DISK_IMG" || die "cannot allocate $DISK_SIZE in $EXT4_DIR"
DISK=$(losetup -f --show --direct-io=on "$DISK_IMG") || die "losetup failed for the disk"
for dev in "$SSD" "$DISK"; do
    DIO=$(losetup -n -O DIO "$dev" | tr -d ' ')
    [ "$DIO" = "1" ] || die "direct I/O did not take effect on $dev (losetup -O DIO says '$DIO')"
done
MM=$(lsblk -dno MAJ:MIN "$DISK" | tr -d ' ')
CG=/sys/fs/cgroup/blkio/cache-compare-$$
mkdir "$CG" || die "cannot create the cgroup $CG"
echo "$MM $READ_IOPS" >"$CG/blkio.throttle.read_iops_device"
echo "$MM $WRITE_IOPS" >"$CG/blkio.throttle.write_iops_device"
echo "$MM $BPS" >"$CG/blkio.throttle.read_bps_device"
echo "$MM $BPS" >"$CG/blkio.throttle.write_bps_device"
echo "== SSD $SSD ($SSD_SIZE, $SSD_IMG); DISK $DISK ($DISK_SIZE, $DISK_IMG, $MM) throttled by $CG"

{
    echo "date: $(date -Is)"
    echo "kernel: $(uname -r)"
    echo "cpus: $(nproc) x $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    echo "fio: $(fio --version)"
    echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "work tree changes (git status --short):"
    git -C "$REPO" status --short 2>/dev/null | sed 's/^/  /'
    echo "cache-bench: $CACHE_BENCH (copied to $BENCH)"
    echo "ssd: $SSD $SSD_SIZE $SSD_IMG"
    echo "disk: $DISK $DISK_SIZE $DISK_IMG ($MM)"
    losetup -l -O NAME,DIO,BACK-FILE 2>/dev/null | sed 's/^/losetup: /'
    for f in read_iops_device write_iops_device read_bps_device write_bps_device; do
        echo "blkio.throttle.$f: $(cat "$CG/blkio.throttle.$f")"
    done
    echo "pairs: $PAIRS runtime: $RUNTIME ramp: $RAMP ws: $WS pin: ${PIN:-none}"
} >"$RESULTS/environment.txt"

export PAIRS RUNTIME RAMP CASES WS RESULTS PIN BENCH SSD DISK CG WAIT_IDLE WAIT_MAX STEAL_MAX SETTLE
python3 - <<'PY'
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time

PAIRS = int(os.environ["PAIRS"])
RUNTIME = float(os.environ["RUNTIME"])
RAMP = float(os.environ["RAMP"])
CASES = os.environ["CASES"].split()
WS = os.environ["WS"]
RESULTS = os.environ["RESULTS"]
PIN = shlex.split(os.environ.get("PIN") or "")
BENCH = os.environ["BENCH"]
SSD = os.environ["SSD"]
DISK = os.environ["DISK"]
CG = os.environ["CG"]
WAIT_IDLE = os.environ.get("WAIT_IDLE", "1") == "1"
WAIT_MAX = float(os.environ.get("WAIT_MAX", "2400"))
STEAL_MAX = float(os.environ.get("STEAL_MAX", "0.05"))
SETTLE = float(os.environ.get("SETTLE", "5"))
HZ = os.sysconf("SC_CLK_TCK")

# name: (rw, qd, reference device, cache-bench engine, cache-bench options, target,
# description). The targets compare cache-bench's async engine (N requests in flight, no
# thread per request) with fio io_uring; each "-threads" case runs the same load with the
# sync engine (N threads of blocking calls), whose like is fio psync.
KNOWN = {
    "hit-rr32": ("randread", 32, "ssd", "async", ["--warm", "--cgroup", CG], 0.90,
                 "4k randread QD32, all hits, cache-bench async engine, vs raw SSD"),
    "hit-rr32-threads": ("randread", 32, "ssd", "sync", ["--warm", "--cgroup", CG], None,
                         "4k randread QD32, all hits, cache-bench sync engine (32 threads; "
                         "compare with fio-psync), vs raw SSD"),
    "hit-rr1": ("randread", 1, "ssd", "async", ["--warm", "--cgroup", CG], 0.90,
                "4k randread QD1, all hits, cache-bench async engine, vs raw SSD"),
    "hit-rr1-threads": ("randread", 1, "ssd", "sync", ["--warm", "--cgroup", CG], None,
                        "4k randread QD1, all hits, cache-bench sync engine (1 thread; "
                        "compare with fio-psync), vs raw SSD"),
    "miss-rr32": ("randread", 32, "disk", "sync", [], 0.95,
                  "4k randread QD32, all misses (cold, working set = disk > cache), "
                  "cache-bench sync engine (32 threads), vs raw disk"),
    "wb-rw32": ("randwrite", 32, "ssd", "async", ["--warm", "--commit", "on-flush"], 0.85,
                "4k randwrite QD32, write-back hits, commit on-flush, cache-bench async engine, "
                "vs raw SSD"),
    "wb-rw32-threads": ("randwrite", 32, "ssd", "sync", ["--warm", "--commit", "on-flush"], None,
                        "4k randwrite QD32, write-back hits, commit on-flush, cache-bench sync "
                        "engine (32 threads; compare with fio-psync), vs raw SSD"),
    "wb-rw32-sync": ("randwrite", 32, "ssd", "async", ["--warm", "--commit", "sync"], None,
                     "4k randwrite QD32, write-back hits, commit sync, cache-bench async engine, "
                     "vs raw SSD"),
    # Optional: warmed by reading, so a block's first write in the run dirties it (in sync
    # mode that write commits the block's slot before it returns).
    "wb-rw32-clean": ("randwrite", 32, "ssd", "async",
                      ["--warm", "--warm-op", "read", "--cgroup", CG, "--commit", "on-flush"],
                      None, "4k randwrite QD32, write-back hits on clean blocks, commit on-flush, "
                      "cache-bench async engine"),
    "wb-rw32-sync-clean": ("randwrite", 32, "ssd", "async",
                           ["--warm", "--warm-op", "read", "--cgroup", CG, "--commit", "sync"],
                           None, "4k randwrite QD32, write-back hits on clean blocks, commit "
                           "sync, cache-bench async engine"),
}
for c in CASES:
    if c not in KNOWN:
        sys.exit(f"run-cache-compare: error: unknown case {c!r}; known: {' '.join(KNOWN)}")

IN_CG = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', CG]


def fmt(x):
    return f"{x:g}"


def dev_size(dev):
    with open(f"/sys/class/block/{os.path.basename(dev)}/size") as f:
        return int(f.read()) * 512


def fio_cmd(rw, qd, device, engine, fixed=False):
    size = WS if device == SSD else str(dev_size(device))
    cmd = [
        "fio", "--name=ref", f"--filename={device}", "--direct=1", f"--ioengine={engine}",
        f"--rw={rw}", "--bs=4k", "--time_based", f"--runtime={fmt(RUNTIME)}",
        f"--ramp_time={fmt(RAMP)}", "--norandommap", "--randrepeat=0", "--lat_percentiles=1",
        "--output-format=json", "--offset=0", f"--size={size}", "--group_reporting",
    ]
    if engine == "io_uring":
        cmd += ["--numjobs=1", f"--iodepth={qd}"] + (["--fixedbufs"] if fixed else [])
    else:
        cmd += [f"--numjobs={qd}", "--iodepth=1", "--thread"]
    return IN_CG + PIN + cmd


def cache_cmd(rw, qd, engine, opts):
    cmd = [BENCH, "--ssd", SSD, "--disk", DISK, "--mode", "back", "--rw", rw, "--bs", "4k",
           "--engine", engine, "--iodepth", str(qd), "--runtime", fmt(RUNTIME),
           "--ramp", fmt(RAMP), "--json"]
    if "--warm" in opts:
        cmd += ["--working-set", WS, "--settle", fmt(SETTLE)]
    cmd += opts
    # With --cgroup the tool joins the group itself after warming.
    return (PIN + cmd) if "--cgroup" in opts else (IN_CG + PIN + cmd)


def others_running():
    """Other benchmarks now (pgrep never reports itself)."""
    found = []
    for args in (["-x", "fio"], ["-f", "run-kcopy-compare"], ["-x", "kcopy"], ["-f", "kcopy-"]):
        p = subprocess.run(["pgrep"] + args, capture_output=True, text=True)
        pids = [x for x in p.stdout.split() if int(x) != os.getpid()]
        if pids:
            found.append(f"pgrep {' '.join(args)}: {' '.join(pids)}")
    return found


def wait_idle(label):
    """Waits (every 20 s, at most WAIT_MAX s) until no other benchmark runs.
    Returns (seconds waited, whether it gave up)."""
    if not WAIT_IDLE:
        return 0.0, False
    start = time.monotonic()
    while True:
        busy = others_running()
        waited = time.monotonic() - start
        if not busy:
            return waited, False
        if waited >= WAIT_MAX:
            print(f"   WARNING: other benchmarks still running after {waited:.0f} s; "
                  f"measuring {label} anyway ({'; '.join(busy)})", flush=True)
            return waited, True
        print(f"   waiting for other benchmarks before {label} ({'; '.join(busy)})", flush=True)
        time.sleep(20)


def proc_stat():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    v += [0] * (8 - len(v))
    return {"busy": v[0] + v[1] + v[2] + v[5] + v[6], "idle": v[3] + v[4], "steal": v[7]}


def run(cmd, out_path, sample):
    """Runs cmd. With sample, reads /proc/stat over the measured window (ramp
    to ramp + runtime after the start), as for fio, which does not report it."""
    samples = {}

    def sampler():
        time.sleep(RAMP + 0.05)
        samples["a"] = proc_stat()
        time.sleep(RUNTIME)
        samples["b"] = proc_stat()

    t = threading.Thread(target=sampler, daemon=True)
    if sample:
        t.start()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=RAMP + RUNTIME + 900)
    if sample:
        t.join(timeout=RAMP + RUNTIME + 5)
    with open(out_path, "w") as f:
        f.write(p.stdout)
    if p.returncode != 0:
        sys.stderr.write(p.stderr)
        sys.exit(f"run-cache-compare: error: `{shlex.join(cmd)}` exited with {p.returncode}")
    ext = {}
    if "a" in samples and "b" in samples:
        a, b = samples["a"], samples["b"]
        ext = {k: (b[k] - a[k]) / HZ for k in a}
    return p.stdout, ext


def parse_fio(text, rw):
    j = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
    job = j["jobs"][0]
    d = job["write" if "write" in rw else "read"]
    pct = d["lat_ns"]["percentile"]
    if job["error"]:
        sys.exit(f"run-cache-compare: error: fio reported error {job['error']}")
    # With --group_reporting, job_runtime is summed over the jobs and usr/sys_cpu are
    # percentages of that sum.
    cpu_s = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * job["job_runtime"] / 1000.0
    ios = d["total_ios"]
    return {"iops": d["iops"], "p50": pct["50.000000"], "p99": pct["99.000000"], "ios": ios,
            "proc_cpu_us_per_io": cpu_s * 1e6 / ios if ios else float("nan")}


def parse_cache(text):
    j = json.loads(text)
    return {"iops": j["iops"], "p50": j["lat_p50_ns"], "p99": j["lat_p99_ns"], "ios": j["ios"],
            "hit_ratio": j["hit_ratio"], "index_bytes_per_block": j["index_bytes_per_block"],
            "proc_cpu_us_per_io": j["cpu_us_per_io"], "warm_s": j["warm_s"],
            "ext": {"busy": j["system_busy_s"], "steal": j["steal_s"]},
            "runtime_s": j["runtime_s"]}


def sys_us_per_io(r, runtime):
    if not r["ext"] or r["iops"] <= 0:
        return float("nan")
    return r["ext"]["busy"] * 1e6 / (r["iops"] * runtime)


ALL_TOOLS = ["fio-uring", "fio-psync", "cache", "fio-fixed"]
summary = []
commands = {}
for case in CASES:
    rw, qd, ref, engine, opts, target, desc = KNOWN[case]
    device = SSD if ref == "ssd" else DISK
    cmds = {"fio-uring": fio_cmd(rw, qd, device, "io_uring"),
            "fio-psync": fio_cmd(rw, qd, device, "psync"),
            "cache": cache_cmd(rw, qd, engine, opts)}
    # The async engine's buffers are the cache's registered pool pages
    # (fixed-buffer I/O on hits), so those cases also run fio with its
    # registered buffers: the like-for-like reference, reported beside the
    # target's.
    if engine == "async" and ref == "ssd":
        cmds["fio-fixed"] = fio_cmd(rw, qd, device, "io_uring", fixed=True)
    TOOLS = [t for t in ALL_TOOLS if t in cmds]
    commands[case] = {k: shlex.join(v) for k, v in cmds.items()}
    print(f"== {case}: {desc}", flush=True)
    for k in TOOLS:
        print(f"   {k}: {commands[case][k]}", flush=True)
    rounds = []
    for i in range(PAIRS):
        k = i % len(TOOLS)
        order = TOOLS[k:] + TOOLS[:k]
        got = {}
        for tool in order:
            waited, gave_up = wait_idle(f"{case} {i + 1} {tool}")
            with open("/proc/loadavg") as f:
                load_before = float(f.read().split()[0])
            path = os.path.join(RESULTS, f"{case}-{i + 1}-{tool}.json")
            if tool != "cache" or "--settle" not in cmds[tool]:
                # The idle start cache-bench takes after its warm-up (--settle).
                time.sleep(SETTLE)
            out, ext = run(cmds[tool], path, sample=tool != "cache")
            if tool == "cache":
                r = parse_cache(out)
                r["sys_us_per_io"] = sys_us_per_io(r, r["runtime_s"])
            else:
                r = parse_fio(out, rw)
                r["ext"] = ext
                r["sys_us_per_io"] = sys_us_per_io(r, RUNTIME)
            r["waited_s"], r["gave_up_waiting"] = waited, gave_up
            r["loadavg_before"] = load_before
            got[tool] = r
        c = got["cache"]
        rnd = {"order": order, **got,
               "ratio_uring": c["iops"] / got["fio-uring"]["iops"] if got["fio-uring"]["iops"] else float("nan"),
               "ratio_psync": c["iops"] / got["fio-psync"]["iops"] if got["fio-psync"]["iops"] else float("nan"),
               "ratio_fixed": (c["iops"] / got["fio-fixed"]["iops"]
                               if got.get("fio-fixed", {}).get("iops") else float("nan"))}
        rounds.append(rnd)
        print(f"   round {i + 1}/{PAIRS}: fio-uring {got['fio-uring']['iops']:.0f}, "
              f"fio-psync {got['fio-psync']['iops']:.0f}, cache {c['iops']:.0f} IOPS "
              f"(hit ratio {c['hit_ratio']:.4f}, warm {c['warm_s'] or 0:.1f} s); "
              f"cache/uring {rnd['ratio_uring']:.3f}, cache/psync {rnd['ratio_psync']:.3f}"
              + (f", fio-fixed {got['fio-fixed']['iops']:.0f}, cache/fixed {rnd['ratio_fixed']:.3f}"
                 if "fio-fixed" in got else ""),
              flush=True)
    med = statistics.median
    ru = [r["ratio_uring"] for r in rounds]
    rp = [r["ratio_psync"] for r in rounds]
    rf = [r["ratio_fixed"] for r in rounds]

    def steal_share(r, tool):
        """Steal time over the run's measured window, as a share of both CPUs' time."""
        ext = r[tool].get("ext") or {}
        return ext.get("steal", float("nan")) / (2 * RUNTIME)

    # The hypervisor's steal time swings from round to round and hits one tool and
    # not the other; rounds where neither the cache nor fio io_uring lost more than
    # STEAL_MAX of the CPUs' time are the cleanest comparison.
    clean = [r["ratio_uring"] for r in rounds
             if steal_share(r, "cache") < STEAL_MAX and steal_share(r, "fio-uring") < STEAL_MAX]
    row = {
        "case": case, "desc": desc, "target": target, "rw": rw, "iodepth": qd, "reference": ref,
        "cache_engine": engine,
        "ratio_uring_median": med(ru), "ratio_uring_min": min(ru), "ratio_uring_max": max(ru),
        "ratio_psync_median": med(rp), "ratio_psync_min": min(rp), "ratio_psync_max": max(rp),
        "ratio_fixed_median": med(rf), "ratio_fixed_min": min(rf), "ratio_fixed_max": max(rf),
        "tools": TOOLS,
        "ratio_uring_low_steal_median": med(clean) if clean else float("nan"),
        "low_steal_rounds": len(clean),
        "steal_share": [{t: steal_share(r, t) for t in TOOLS} for r in rounds],
        "gave_up_waiting": any(r[t]["gave_up_waiting"] for r in rounds for t in TOOLS),
        "rounds": rounds,
    }
    for t in ALL_TOOLS:
        if t not in TOOLS:
            for k in ("iops", "p50_us", "p99_us", "sys_us_per_io", "proc_cpu_us_per_io"):
                row[f"{t}_{k}"] = float("nan")
            continue
        row[f"{t}_iops"] = med([r[t]["iops"] for r in rounds])
        row[f"{t}_p50_us"] = med([r[t]["p50"] for r in rounds]) / 1e3
        row[f"{t}_p99_us"] = med([r[t]["p99"] for r in rounds]) / 1e3
        row[f"{t}_sys_us_per_io"] = med([r[t]["sys_us_per_io"] for r in rounds])
    row["cache_hit_ratio"] = med([r["cache"]["hit_ratio"] for r in rounds])
    for t in TOOLS:
        row[f"{t}_proc_cpu_us_per_io"] = med([r[t]["proc_cpu_us_per_io"] for r in rounds])
    row["index_bytes_per_block"] = rounds[0]["cache"]["index_bytes_per_block"]
    row["loadavg_max"] = max(r[t]["loadavg_before"] for r in rounds for t in TOOLS)
    summary.append(row)

with open(os.path.join(RESULTS, "summary.json"), "w") as f:
    json.dump({"runtime": RUNTIME, "ramp": RAMP, "pairs": PAIRS, "ssd": SSD, "disk": DISK,
               "ws": WS, "cgroup": CG, "commands": commands, "cases": summary}, f, indent=1)

lines = [
    "| case | cache/fio-uring median | min-max | target | cache/fio-psync median | min-max | "
    "cache IOPS | fio-uring IOPS | fio-psync IOPS | hit ratio | p50/p99 us cache | "
    "p50/p99 us fio-uring | p50/p99 us fio-psync | CPU us/IO cache/uring/psync | "
    "process CPU us/IO cache/uring/psync | index B/block | cache/fio-fixed median | min-max | "
    "cache/fio-uring, low-steal rounds |",
    "|" + "---|" * 19,
]
for r in summary:
    t = r["target"]
    tgt = "recorded" if t is None else (
        f">= {t:.2f} ({'ok' if r['ratio_uring_median'] >= t else 'BELOW'})")
    lines.append(
        f"| {r['case']} | {r['ratio_uring_median']:.3f} | "
        f"{r['ratio_uring_min']:.3f}-{r['ratio_uring_max']:.3f} | {tgt} | "
        f"{r['ratio_psync_median']:.3f} | {r['ratio_psync_min']:.3f}-{r['ratio_psync_max']:.3f} | "
        f"{r['cache_iops']:.0f} | {r['fio-uring_iops']:.0f} | {r['fio-psync_iops']:.0f} | "
        f"{r['cache_hit_ratio']:.4f} | {r['cache_p50_us']:.1f}/{r['cache_p99_us']:.1f} | "
        f"{r['fio-uring_p50_us']:.1f}/{r['fio-uring_p99_us']:.1f} | "
        f"{r['fio-psync_p50_us']:.1f}/{r['fio-psync_p99_us']:.1f} | "
        f"{r['cache_sys_us_per_io']:.2f}/{r['fio-uring_sys_us_per_io']:.2f}/"
        f"{r['fio-psync_sys_us_per_io']:.2f} | {r['cache_proc_cpu_us_per_io']:.2f}/"
        f"{r['fio-uring_proc_cpu_us_per_io']:.2f}/{r['fio-psync_proc_cpu_us_per_io']:.2f} | "
        f"{r['index_bytes_per_block']:.2f} | {r['ratio_fixed_median']:.3f} | "
        f"{r['ratio_fixed_min']:.3f}-{r['ratio_fixed_max']:.3f} | "
        f"{r['ratio_uring_low_steal_median']:.3f} ({r['low_steal_rounds']} of {PAIRS}) |")
table = "\n".join(lines)
gave_up = [r["case"] for r in summary if r["gave_up_waiting"]]
notes = (
    f"\n{PAIRS} rounds per case, {RUNTIME:g} s runtime + {RAMP:g} s ramp each, tool order rotated "
    f"every round; SSD {SSD} (tmpfs loop), disk {DISK} (ext4 loop, blkio-throttled in {CG}); "
    f"working set {WS} for hit/write cases, the whole disk for the miss case.\n"
    "Ratios: cache-bench IOPS / fio IOPS within a round, median and min-max over rounds. "
    "fio-uring: --ioengine=io_uring --numjobs=1 --iodepth=N (the targets' reference); "
    "fio-psync: --ioengine=psync --numjobs=N --thread; fio-fixed (async-engine cases on the SSD): "
    "fio-uring with --fixedbufs, since cache-bench's async engine uses the cache's registered "
    "pool buffers (Cache::io_buffer). cache-bench: --engine async (N "
    "requests in flight through the cache's asynchronous API, each resubmitted from its "
    "completion callback: io_uring's model, the targets' comparison) or --engine sync (N "
    "threads of blocking I/O through the cache: psync's model, read its cache/fio-psync "
    "ratio); engine per case: "
    + ", ".join(f"{r['case']} {r['cache_engine']}" for r in summary) + ". CPU us/IO: busy time of all CPUs (/proc/stat, includes loop "
    "kworkers, and anything else running) over the measured window / I/Os; process CPU: each "
    "tool's own user+system time / I/Os (getrusage for cache-bench, fio's usr/sys_cpu).\n"
    "Highest 1-minute load average seen before a run, per case: "
    + ", ".join(f"{r['case']} {r['loadavg_max']:.1f}" for r in summary) + " (2 CPUs).\n"
    f"Low-steal rounds: the cache's and fio io_uring's runs each lost less than "
    f"{STEAL_MAX:.0%} of the two CPUs' time to the hypervisor (steal, /proc/stat) in the "
    "measured window; on a shared host steal decides most of the spread.\n"
    f"Every run started after {fmt(SETTLE)} s idle (SETTLE: the script's sleep before fio, "
    "cache-bench's --settle after its warm-up).\n"
    "The throttle models a rate (200 IOPS), not seek latency: a deeper queue does not raise "
    "the disk's IOPS.\n"
    + (f"WARNING: measured while other benchmarks ran (gave up waiting) in: {' '.join(gave_up)}\n"
       if gave_up else ""))
with open(os.path.join(RESULTS, "summary.md"), "w") as f:
    f.write(table + "\n" + notes)
print()
print(table)
print(notes)
print(f"raw results: {RESULTS}")
PY
