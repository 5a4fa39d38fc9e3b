#!/usr/bin/env bash
# run-fio-compare.sh: dmio-bench against fio's io_uring engine, side by side, on
# one RAM-backed loop device (a file in /dev/shm attached with direct I/O on).
#
# For each case it alternates fio and dmio-bench PAIRS times (the order flips
# every pair), with the same device, block size, queue depth, offset range,
# runtime and ramp, then prints the median dmio/fio IOPS ratio, its min-max
# spread, p50/p99 latencies and CPU per I/O (all CPUs, from /proc/stat over the
# measured window, so the loop kworkers count too), and writes every raw result
# to a results directory. Method: shared/reference/performance.md sections 7.2
# and 7.3; targets: issue 2, section 5.
#
# Usage (as root, from the repository root):
#   bash benches/run-fio-compare.sh [--pairs N] [--runtime S] [--ramp S]
#        [--cases "rr32-tuned rr1"] [--results DIR] [--device DEV] [--pin "taskset -c 0"]
#
# The same settings as environment variables: PAIRS (default 5), RUNTIME (10),
# RAMP (2), CASES (all of: rr32-tuned rr32-default rr1 seq1m-qd8 rw32-tuned;
# rr1-default and sync1 (the blocking API vs fio psync) are also known), DEV_SIZE (size of the /dev/shm image, 2G), SIZE
# (offset range used by both tools, default the whole device), RESULTS
# (default benches/results/<date>), DEVICE (an existing device to use instead
# of creating one; its data is overwritten by the write case), PIN (a command
# prefix applied to both tools, e.g. "taskset -c 0"), CARGO_TARGET_DIR.
set -euo pipefail

PAIRS=${PAIRS:-5}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
CASES=${CASES:-"rr32-tuned rr32-default rr1 seq1m-qd8 rw32-tuned"}
DEV_SIZE=${DEV_SIZE:-2G}
SIZE=${SIZE:-}
RESULTS=${RESULTS:-}
DEVICE=${DEVICE:-}
PIN=${PIN:-}

die() {
    echo "run-fio-compare: error: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
    --pairs) PAIRS=${2:?--pairs needs a value}; shift 2 ;;
    --runtime) RUNTIME=${2:?--runtime needs a value}; shift 2 ;;
    --ramp) RAMP=${2:?--ramp needs a value}; shift 2 ;;
    --cases) CASES=${2:?--cases needs a value}; shift 2 ;;
    --results) RESULTS=${2:?--results needs a value}; shift 2 ;;
    --device) DEVICE=${2:?--device needs a value}; shift 2 ;;
    --size) SIZE=${2:?--size needs a value}; shift 2 ;;
    --dev-size) DEV_SIZE=${2:?--dev-size needs a value}; shift 2 ;;
    --pin) PIN=${2:?--pin needs a value}; shift 2 ;;
    -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
done

case "$PAIRS" in '' | *[!0-9]*) die "PAIRS must be a positive integer, not '$PAIRS'" ;; esac
[ "$PAIRS" -ge 1 ] || die "PAIRS must be at least 1"

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
[ -z "$RESULTS" ] && RESULTS="$REPO/benches/results/$(date +%Y%m%d-%H%M%S)"

[ "$(id -u)" -eq 0 ] || die "must run as root (it attaches a loop device)"
command -v python3 >/dev/null || die "python3 is required"
command -v losetup >/dev/null || die "losetup (util-linux) is required"
command -v cargo >/dev/null || die "cargo is required"

if ! command -v fio >/dev/null; then
    echo "== installing fio"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y fio >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y fio; } ||
        die "could not install fio with apt-get"
fi

echo "== building dmio-bench (release)"
cargo build --release --quiet -p benches --bin dmio-bench || die "cargo build failed"
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$REPO/$TARGET_DIR" ;; esac
BENCH="$TARGET_DIR/release/dmio-bench"
[ -x "$BENCH" ] || die "built binary not found at $BENCH"

IMG=""
LOOP=""
cleanup() {
    if [ -n "$LOOP" ]; then losetup -d "$LOOP" 2>/dev/null || true; fi
    if [ -n "$IMG" ]; then rm -f "$IMG"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "$DEVICE" ]; then
    IMG=$(mktemp /dev/shm/dmio-fio-compare.XXXXXX.img)
    # Allocate every page up front, so reads hit real tmpfs pages, not holes.
    fallocate -l "$DEV_SIZE" "$IMG" 2>/dev/null || truncate -s "$DEV_SIZE" "$IMG"
    LOOP=$(losetup -f --show --direct-io=on "$IMG") || die "losetup failed"
    DEVICE=$LOOP
    DIO=$(losetup -n -O DIO "$LOOP" | tr -d ' ')
    [ "$DIO" = "1" ] || die "direct I/O did not take effect on $LOOP (losetup -l -O NAME,DIO says '$DIO')"
    echo "== device $DEVICE: $DEV_SIZE file $IMG in /dev/shm, direct I/O on"
else
    [ -b "$DEVICE" ] || [ -f "$DEVICE" ] || die "$DEVICE is not a block device or file"
    echo "== device $DEVICE (given)"
fi

mkdir -p "$RESULTS"
{
    echo "date: $(date -Is)"
    echo "kernel: $(uname -r)"
    echo "cpus: $(nproc) x $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    echo "fio: $(fio --version)"
    echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "device: $DEVICE"
    losetup -l -O NAME,DIO,BACK-FILE 2>/dev/null | sed 's/^/losetup: /'
    echo "pairs: $PAIRS runtime: $RUNTIME ramp: $RAMP size: ${SIZE:-whole device} pin: ${PIN:-none}"
} >"$RESULTS/environment.txt"

export PAIRS RUNTIME RAMP CASES SIZE RESULTS DEVICE PIN BENCH
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
SIZE = os.environ.get("SIZE") or ""
RESULTS = os.environ["RESULTS"]
DEVICE = os.environ["DEVICE"]
PIN = shlex.split(os.environ.get("PIN") or "")
BENCH = os.environ["BENCH"]

# name: (rw, bs, iodepth, fio flavour, target ratio, description)
KNOWN = {
    "rr32-tuned": ("randread", "4k", 32, "tuned", 0.97, "4k randread QD32 vs fio-tuned"),
    "rr32-default": ("randread", "4k", 32, "default", 1.00, "4k randread QD32 vs fio-default"),
    "rr1": ("randread", "4k", 1, "tuned", 0.95, "4k randread QD1 vs fio QD1 (fixedbufs, registerfiles)"),
    "rr1-default": ("randread", "4k", 1, "default", 0.95, "4k randread QD1 vs fio-default QD1"),
    "seq1m-qd8": ("read", "1M", 8, "tuned", 0.98, "1 MiB seq read QD8 vs fio-tuned"),
    "rw32-tuned": ("randwrite", "4k", 32, "tuned", 0.97, "4k randwrite QD32 vs fio-tuned"),
    "sync1": ("randread", "4k", 1, "psync", 0.95, "4k randread, blocking API vs fio psync, one thread"),
}
for c in CASES:
    if c not in KNOWN:
        sys.exit(f"run-fio-compare: error: unknown case {c!r}; known: {' '.join(KNOWN)}")


def fmt_secs(x):
    return f"{x:g}"


def fio_cmd(rw, bs, qd, flavour):
    engine = "psync" if flavour == "psync" else "io_uring"
    cmd = [
        "fio", "--name=r", f"--filename={DEVICE}", "--direct=1", f"--ioengine={engine}",
        f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--numjobs=1", "--time_based",
        f"--runtime={fmt_secs(RUNTIME)}", f"--ramp_time={fmt_secs(RAMP)}", "--norandommap",
        "--randrepeat=0", "--lat_percentiles=1", "--output-format=json", "--offset=0",
    ]
    if SIZE:
        cmd.append(f"--size={SIZE}")
    if flavour == "tuned":
        cmd += [f"--iodepth_batch_submit={min(8, qd)}", "--iodepth_batch_complete_min=1",
                "--fixedbufs", "--registerfiles"]
    return PIN + cmd


def dmio_cmd(rw, bs, qd, flavour):
    cmd = [BENCH, "--device", DEVICE, "--rw", rw, "--bs", bs, "--iodepth", str(qd),
           "--runtime", fmt_secs(RUNTIME), "--ramp", fmt_secs(RAMP), "--offset", "0", "--json"]
    if flavour == "psync":
        # One contiguous buffer per request, as a blocking caller has: dmio then
        # runs the request inline on the calling thread.
        cmd += ["--api", "blocking", "--mem", "buf"]
    if SIZE:
        cmd += ["--size", SIZE]
    return PIN + cmd


def proc_stat():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    v += [0] * (8 - len(v))
    return {"busy": v[0] + v[1] + v[2] + v[5] + v[6], "idle": v[3] + v[4], "steal": v[7]}


HZ = os.sysconf("SC_CLK_TCK")


def run(cmd, out_path):
    """Runs cmd; samples /proc/stat at the start and end of the measured window
    (after the ramp), the same way for both tools."""
    samples = {}

    def sampler():
        time.sleep(RAMP + 0.05)
        samples["a"] = proc_stat()
        time.sleep(RUNTIME)
        samples["b"] = proc_stat()

    t = threading.Thread(target=sampler, daemon=True)
    start = time.monotonic()
    t.start()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=RAMP + RUNTIME + 120)
    t.join(timeout=RAMP + RUNTIME + 5)
    wall = time.monotonic() - start
    with open(out_path, "w") as f:
        f.write(p.stdout)
    if p.returncode != 0:
        sys.stderr.write(p.stderr)
        sys.exit(f"run-fio-compare: error: `{shlex.join(cmd)}` exited with {p.returncode}")
    ext = {}
    if "a" in samples and "b" in samples:
        a, b = samples["a"], samples["b"]
        ext = {k: (b[k] - a[k]) / HZ for k in a}
    return p.stdout, ext, wall


def parse_fio(text, rw):
    j = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
    job = j["jobs"][0]
    d = job["write" if "write" in rw else "read"]
    pct = d["lat_ns"]["percentile"]
    runtime_s = job["job_runtime"] / 1000.0
    return {
        "iops": d["iops"], "bw_bytes": d["bw_bytes"],
        "p50": pct["50.000000"], "p99": pct["99.000000"], "p999": pct.get("99.900000", 0),
        "proc_cpu_s": (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * runtime_s,
        "ios": d["total_ios"], "errors": job["error"],
    }


def parse_dmio(text):
    j = json.loads(text)
    return {
        "iops": j["iops"], "bw_bytes": j["bw_bytes"], "p50": j["lat_p50_ns"],
        "p99": j["lat_p99_ns"], "p999": j["lat_p999_ns"],
        "proc_cpu_s": j["cpu_user_s"] + j["cpu_sys_s"], "ios": j["ios"], "engine": j["engine"],
        "submit_calls_per_op": j["submit_calls_per_op"], "fixed_share": j["fixed_buffer_share"],
    }


def us_per_io(ext, iops):
    if not ext or iops <= 0:
        return float("nan")
    return ext["busy"] * 1e6 / (iops * RUNTIME)


summary = []
commands = {}
for case in CASES:
    rw, bs, qd, flavour, target, desc = KNOWN[case]
    fcmd, dcmd = fio_cmd(rw, bs, qd, flavour), dmio_cmd(rw, bs, qd, flavour)
    commands[case] = {"fio": shlex.join(fcmd), "dmio": shlex.join(dcmd)}
    print(f"== {case}: {desc}", flush=True)
    print(f"   fio:  {shlex.join(fcmd)}")
    print(f"   dmio: {shlex.join(dcmd)}", flush=True)
    pairs = []
    for i in range(PAIRS):
        order = ["fio", "dmio"] if i % 2 == 0 else ["dmio", "fio"]
        got = {}
        for tool in order:
            path = os.path.join(RESULTS, f"{case}-{i + 1}-{tool}.json")
            out, ext, wall = run(fcmd if tool == "fio" else dcmd, path)
            r = parse_fio(out, rw) if tool == "fio" else parse_dmio(out)
            r["ext"] = ext
            r["sys_us_per_io"] = us_per_io(ext, r["iops"])
            got[tool] = r
        ratio = got["dmio"]["iops"] / got["fio"]["iops"] if got["fio"]["iops"] else float("nan")
        pairs.append({"fio": got["fio"], "dmio": got["dmio"], "ratio": ratio})
        print(f"   pair {i + 1}/{PAIRS}: fio {got['fio']['iops']:.0f} IOPS, "
              f"dmio {got['dmio']['iops']:.0f} IOPS, ratio {ratio:.3f}, steal "
              f"{got['fio']['ext'].get('steal', 0):.2f}/{got['dmio']['ext'].get('steal', 0):.2f} s",
              flush=True)
    med = lambda xs: statistics.median(xs)
    ratios = [p["ratio"] for p in pairs]
    row = {
        "case": case, "desc": desc, "target": target, "bs": bs, "iodepth": qd, "rw": rw,
        "ratio_median": med(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "fio_iops": med([p["fio"]["iops"] for p in pairs]),
        "dmio_iops": med([p["dmio"]["iops"] for p in pairs]),
        "fio_mbps": med([p["fio"]["bw_bytes"] for p in pairs]) / 1e6,
        "dmio_mbps": med([p["dmio"]["bw_bytes"] for p in pairs]) / 1e6,
        "fio_p50_us": med([p["fio"]["p50"] for p in pairs]) / 1e3,
        "fio_p99_us": med([p["fio"]["p99"] for p in pairs]) / 1e3,
        "dmio_p50_us": med([p["dmio"]["p50"] for p in pairs]) / 1e3,
        "dmio_p99_us": med([p["dmio"]["p99"] for p in pairs]) / 1e3,
        "fio_sys_us_per_io": med([p["fio"]["sys_us_per_io"] for p in pairs]),
        "dmio_sys_us_per_io": med([p["dmio"]["sys_us_per_io"] for p in pairs]),
        "pairs": pairs,
    }
    summary.append(row)

with open(os.path.join(RESULTS, "summary.json"), "w") as f:
    json.dump({"runtime": RUNTIME, "ramp": RAMP, "pairs": PAIRS, "device": DEVICE,
               "size": SIZE or "whole device", "commands": commands, "cases": summary}, f, indent=1)

head = ("| case | dmio/fio IOPS median | min-max | target | dmio IOPS | fio IOPS | dmio MB/s | "
        "fio MB/s | dmio p50/p99 us | fio p50/p99 us | CPU us/IO dmio/fio |")
lines = [head, "|" + "---|" * 11]
for r in summary:
    ok = "ok" if r["ratio_median"] >= r["target"] else "BELOW"
    lines.append(
        f"| {r['case']} | {r['ratio_median']:.3f} | {r['ratio_min']:.3f}-{r['ratio_max']:.3f} | "
        f">= {r['target']:.2f} ({ok}) | {r['dmio_iops']:.0f} | {r['fio_iops']:.0f} | "
        f"{r['dmio_mbps']:.0f} | {r['fio_mbps']:.0f} | "
        f"{r['dmio_p50_us']:.1f}/{r['dmio_p99_us']:.1f} | {r['fio_p50_us']:.1f}/{r['fio_p99_us']:.1f} | "
        f"{r['dmio_sys_us_per_io']:.2f}/{r['fio_sys_us_per_io']:.2f} |")
table = "\n".join(lines)
notes = (f"\n{PAIRS} pairs per case, {RUNTIME:g} s runtime + {RAMP:g} s ramp each, alternating "
         f"(order flipped every pair), device {DEVICE}, range {SIZE or 'whole device'}.\n"
         "Ratio: dmio-bench IOPS / fio IOPS within a pair; medians over pairs. "
         "CPU us/IO: busy time of all CPUs (/proc/stat, includes loop kworkers) over the "
         "measured window / I/Os.\n")
with open(os.path.join(RESULTS, "summary.md"), "w") as f:
    f.write(table + "\n" + notes)
print()
print(table)
print(notes)
print(f"raw results: {RESULTS}")
PY
