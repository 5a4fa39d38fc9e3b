#!/usr/bin/env bash
# run-kcopy-compare.sh: the kcopy tool (kcopyd) against dd and an fio overlap
# ceiling, side by side, copying one loop device to another of the same kind.
#
# Kinds: "ram" (backing files in /dev/shm) and "ext4" (backing files on an ext4
# file system on the real disk: a directory when the disk's file system is
# ext4, else an ext4 image made with mkfs.ext4 and loop-mounted); every loop
# device is attached with --direct-io=on (checked with losetup -O DIO). Per
# kind: SRC, DST1, DST2 of SIZE_MIB each; SRC is filled once from /dev/urandom
# and the destinations once with written zeros, so nothing is sparse. A check
# run (kcopy SRC DST1 DST2, then cmp) comes first. Then, PAIRS times, in an
# order that rotates every pair (reversed on odd pairs), it runs:
#   kcopy        kcopy --json SRC DST1                 (default sub-job size)
#   kcopy-sjN    kcopy --json --sub-job-kb N SRC DST1  (N from SUB_JOB_KB)
#   dd           dd if=SRC of=DST1 bs=1M count=SIZE_MIB iflag=direct oflag=direct
#   fio          one fio run, a read job on SRC and a write job on DST1 at once
#                (1 MiB, QD8, io_uring, direct, SIZE_MIB each): the ceiling is
#                min(read, write) bandwidth
#   kcopy-1to2   kcopy --json SRC DST1 DST2
#   fio-1to2     fio reading SRC while writing DST1 and DST2 (context only)
# and reports per kind the median, min and max of each throughput and of the
# per-pair ratios kcopy/dd (target >= 1.3), kcopy/fio (>= 0.9) and
# kcopy-1to2/kcopy (>= 0.85, source MiB/s), with CPU use (/proc/stat, all CPUs,
# so loop kworkers count) and steal for every run. Method:
# shared/reference/performance.md sections 4 and 7.4.
#
# Usage (as root, from anywhere in the repository):
#   bash benches/run-kcopy-compare.sh [--pairs N] [--size-mib N] [--kinds "ram ext4"]
#        [--kcopy PATH] [--sub-job-kb "1024"] [--refs-only] [--results DIR]
#
# Environment variables (same settings): PAIRS (5), SIZE_MIB (1024), KINDS
# ("ram ext4"), KCOPY (the kcopy binary; default: built with cargo, then
# $CARGO_TARGET_DIR/release/kcopy, or target/release/kcopy of the workspace),
# BUILD (1: cargo build kcopy unless KCOPY is given; 0: do not build),
# SUB_JOB_KB (extra kcopy 1->1 variants, "1024"; e.g. "64 1024" for a sweep, ""
# for none), REFS_ONLY (1: only dd and fio, no kcopy), CHECK (1: the cmp check
# run), EXT4_DIR (parent directory for the ext4 kind, default /var/tmp; must
# not be tmpfs), EXT4_IMAGE (1: always use a mkfs.ext4 image, even on ext4),
# FIO_EXTRA (extra options for both fio runs, default "--fixedbufs"), PIN (a
# command prefix for every tool, e.g. "taskset -c 0"), SETTLE (seconds of
# sleep between runs, 1), TIMEOUT (seconds per run, 600), RESULTS (default
# benches/results/<date>), CARGO_TARGET_DIR.
set -euo pipefail

PAIRS=${PAIRS:-5}
SIZE_MIB=${SIZE_MIB:-1024}
KINDS=${KINDS:-"ram ext4"}
KCOPY=${KCOPY:-}
BUILD=${BUILD:-1}
SUB_JOB_KB=${SUB_JOB_KB-1024}
REFS_ONLY=${REFS_ONLY:-0}
CHECK=${CHECK:-1}
EXT4_DIR=${EXT4_DIR:-/var/tmp}
EXT4_IMAGE=${EXT4_IMAGE:-0}
FIO_EXTRA=${FIO_EXTRA---fixedbufs}
PIN=${PIN:-}
SETTLE=${SETTLE:-1}
TIMEOUT=${TIMEOUT:-600}
RESULTS=${RESULTS:-}

die() {
    echo "run-kcopy-compare: error: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
    --pairs) PAIRS=${2:?--pairs needs a value}; shift 2 ;;
    --size-mib) SIZE_MIB=${2:?--size-mib needs a value}; shift 2 ;;
    --kinds) KINDS=${2:?--kinds needs a value}; shift 2 ;;
    --kcopy) KCOPY=${2:?--kcopy needs a value}; shift 2 ;;
    --sub-job-kb) SUB_JOB_KB=${2?--sub-job-kb needs a value}; shift 2 ;;
    --refs-only) REFS_ONLY=1; shift ;;
    --results) RESULTS=${2:?--results needs a value}; shift 2 ;;
    -h | --help) sed -n '2,42p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
done

posint() {
    case "$2" in '' | *[!0-9]*) die "$1 must be a positive integer, not '$2'" ;; esac
    [ "$2" -ge 1 ] || die "$1 must be at least 1"
}
posint PAIRS "$PAIRS"
posint SIZE_MIB "$SIZE_MIB"
posint TIMEOUT "$TIMEOUT"
for k in $KINDS; do
    case "$k" in ram | ext4) ;; *) die "unknown kind '$k' (known: ram ext4)" ;; esac
done
[ -n "${KINDS// /}" ] || die "KINDS is empty"
for kb in $SUB_JOB_KB; do posint SUB_JOB_KB "$kb"; done

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
[ -z "$RESULTS" ] && RESULTS="$REPO/benches/results/$(date +%Y%m%d-%H%M%S)"

[ "$(id -u)" -eq 0 ] || die "must run as root (it attaches loop devices)"
command -v python3 >/dev/null || die "python3 is required"
command -v losetup >/dev/null || die "losetup (util-linux) is required"
command -v dd >/dev/null || die "dd (coreutils) is required"
command -v cmp >/dev/null || die "cmp (diffutils) is required"

if ! command -v fio >/dev/null; then
    echo "== installing fio"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y fio >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y fio; } ||
        die "could not install fio with apt-get"
fi

if [ "$REFS_ONLY" = "1" ]; then
    KCOPY=""
elif [ -z "$KCOPY" ]; then
    TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
    case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$REPO/$TARGET_DIR" ;; esac
    if [ "$BUILD" = "1" ]; then
        command -v cargo >/dev/null || die "cargo is required (or set KCOPY, or BUILD=0)"
        echo "== building kcopy (release)"
        cargo build --release --quiet -p examples --bin kcopy || die "cargo build of kcopy failed"
    fi
    KCOPY="$TARGET_DIR/release/kcopy"
fi
if [ -n "$KCOPY" ]; then
    [ -x "$KCOPY" ] || die "kcopy binary not found or not executable at $KCOPY (set KCOPY=...)"
    KCOPY=$(cd "$(dirname "$KCOPY")" && pwd)/$(basename "$KCOPY")
fi

# Everything made below is recorded here and undone in reverse order on exit.
LOOPS=()   # loop devices of the benchmark files
FILES=()   # backing files
MOUNTS=()  # ext4 image mount points
OUTER=()   # loop devices holding ext4 images
DIRS=()    # directories to remove (after files and mounts)
PY_PID=""
cleanup() {
    set +e
    trap - INT TERM
    if [ -n "$PY_PID" ]; then kill -TERM "$PY_PID" 2>/dev/null; wait "$PY_PID" 2>/dev/null; fi
    local i
    for ((i = ${#LOOPS[@]} - 1; i >= 0; i--)); do losetup -d "${LOOPS[i]}" 2>/dev/null; done
    for ((i = ${#FILES[@]} - 1; i >= 0; i--)); do rm -f "${FILES[i]}"; done
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[i]}" 2>/dev/null || { sleep 1; umount "${MOUNTS[i]}" 2>/dev/null; } ||
            umount -l "${MOUNTS[i]}" 2>/dev/null
    done
    for ((i = ${#OUTER[@]} - 1; i >= 0; i--)); do losetup -d "${OUTER[i]}" 2>/dev/null; done
    for ((i = ${#DIRS[@]} - 1; i >= 0; i--)); do rm -rf -- "${DIRS[i]}"; done
    # A detach of a busy device only sets autoclear: say so instead of leaving it silently.
    local left
    left=$(losetup -l -n -O NAME,BACK-FILE 2>/dev/null | grep -F 'kcopy-compare' || true)
    [ -z "$left" ] || echo "run-kcopy-compare: warning: loop devices still attached: $left" >&2
}
on_signal() {
    echo "run-kcopy-compare: interrupted, cleaning up" >&2
    exit 130
}
trap cleanup EXIT
trap on_signal INT TERM

attach() { # attach FILE -> prints the loop device, checks direct I/O
    local dev dio
    dev=$(losetup -f --show --direct-io=on "$1") || die "losetup failed on $1"
    LOOPS+=("$dev")
    dio=$(losetup -n -O DIO "$dev" | tr -d ' ')
    [ "$dio" = "1" ] || die "direct I/O did not take effect on $dev ($1): losetup -O DIO says '$dio'"
    echo "$dev"
}

make_file() { # make_file PATH: allocated, not sparse (written below)
    FILES+=("$1")
    fallocate -l "${SIZE_MIB}M" "$1" 2>/dev/null || truncate -s "${SIZE_MIB}M" "$1" ||
        die "could not create $1"
}

# The ext4 kind's directory: on the disk's ext4 directly, or in a loop-mounted ext4 image.
ext4_dir() {
    local fstype parent need avail img outer mnt dir
    parent=$EXT4_DIR
    [ -d "$parent" ] || die "EXT4_DIR=$parent is not a directory"
    fstype=$(df --output=fstype "$parent" | tail -1 | tr -d ' ')
    case "$fstype" in tmpfs | ramfs) die "EXT4_DIR=$parent is on $fstype, not on a disk" ;; esac
    need=$((3 * SIZE_MIB + 256))
    avail=$(($(df -k --output=avail "$parent" | tail -1 | tr -d ' ') / 1024))
    [ "$avail" -gt $((need + 1024)) ] || die "$parent has $avail MiB free, $need MiB needed"
    if [ "$fstype" = "ext4" ] && [ "$EXT4_IMAGE" != "1" ]; then
        dir=$(mktemp -d "$parent/kcopy-compare.XXXXXX")
        DIRS+=("$dir")
        EXT4_HOW="directory on the disk's ext4 ($parent, $(df --output=source "$parent" | tail -1))"
    else
        command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 (e2fsprogs) is required: $parent is $fstype"
        dir=$(mktemp -d "$parent/kcopy-compare.XXXXXX")
        DIRS+=("$dir")
        img="$dir/ext4.img"
        FILES+=("$img")
        fallocate -l "${need}M" "$img" || die "could not allocate $img"
        mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$img" || die "mkfs.ext4 failed"
        outer=$(losetup -f --show --direct-io=on "$img") || die "losetup failed on $img"
        OUTER+=("$outer")
        mnt="$dir/mnt"
        mkdir "$mnt"
        mount -t ext4 "$outer" "$mnt" || die "mount of $outer failed"
        MOUNTS+=("$mnt")
        dir="$mnt"
        EXT4_HOW="ext4 image $img ($need MiB, on $fstype) on $outer (DIO $(losetup -n -O DIO "$outer" | tr -d ' ')), mounted at $mnt"
    fi
    echo "$dir"
}

fill() { # fill SRC-DEV DST-DEV...: random data in the source, written zeros in the destinations
    local src=$1
    shift
    LC_ALL=C dd if=/dev/urandom of="$src" bs=1M count="$SIZE_MIB" oflag=direct status=none ||
        die "filling $src failed"
    local d
    for d in "$@"; do
        LC_ALL=C dd if=/dev/zero of="$d" bs=1M count="$SIZE_MIB" oflag=direct status=none ||
            die "filling $d failed"
    done
}

mkdir -p "$RESULTS"
EXT4_HOW=""
DEVICES=""
for kind in $KINDS; do
    case "$kind" in
    ram)
        dir=$(mktemp -d /dev/shm/kcopy-compare.XXXXXX)
        DIRS+=("$dir")
        ;;
    ext4)
        # Not in a $(...) subshell: ext4_dir records what it creates for cleanup.
        ext4_dir >"$RESULTS/.ext4dir"
        dir=$(cat "$RESULTS/.ext4dir")
        rm -f "$RESULTS/.ext4dir"
        ;;
    esac
    devs=()
    for name in src dst1 dst2; do
        make_file "$dir/$name.img"
        attach "$dir/$name.img" >"$RESULTS/.dev"
        devs+=("$(cat "$RESULTS/.dev")")
        rm -f "$RESULTS/.dev"
    done
    echo "== $kind: SRC ${devs[0]}, DST1 ${devs[1]}, DST2 ${devs[2]} ($SIZE_MIB MiB each, in $dir, direct I/O on); filling"
    fill "${devs[0]}" "${devs[1]}" "${devs[2]}"
    DEVICES="$DEVICES $kind:${devs[0]},${devs[1]},${devs[2]}"
done

{
    echo "date: $(date -Is)"
    echo "kernel: $(uname -r)"
    echo "cpus: $(nproc) x $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    echo "cpu MHz: $(sed -n 's/^cpu MHz[[:space:]]*: //p' /proc/cpuinfo | tr '\n' ' ')"
    echo "memory: $(sed -n 's/^MemTotal:[[:space:]]*//p' /proc/meminfo)"
    echo "fio: $(fio --version)"
    echo "dd: $(dd --version | head -1)"
    echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
        "($(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) files changed in the tree)"
    if [ -n "$KCOPY" ]; then
        echo "kcopy: $KCOPY ($(stat -c '%y' "$KCOPY"), sha256 $(sha256sum "$KCOPY" | cut -c1-16))"
    else
        echo "kcopy: none (refs only)"
    fi
    echo "pairs: $PAIRS size: $SIZE_MIB MiB kinds: $KINDS sub-job variants: ${SUB_JOB_KB:-none}" \
        "fio extra: ${FIO_EXTRA:-none} pin: ${PIN:-none} settle: $SETTLE s"
    echo "devices:$DEVICES"
    [ -n "$EXT4_HOW" ] && echo "ext4 kind: $EXT4_HOW"
    for d in /sys/block/vd* /sys/block/sd* /sys/block/nvme*; do
        [ -e "$d/queue" ] || continue
        echo "disk $(basename "$d"): rotational $(cat "$d/queue/rotational")" \
            "scheduler $(cat "$d/queue/scheduler") logical block $(cat "$d/queue/logical_block_size")"
    done
    losetup -l -O NAME,DIO,LOG-SEC,SIZELIMIT,BACK-FILE 2>/dev/null | sed 's/^/losetup: /'
    echo "loadavg at start: $(cat /proc/loadavg)"
    echo "busiest processes at start:"
    top -bn1 -o %CPU 2>/dev/null | sed -n '7,14p' | sed 's/^/  /'
    echo "steal so far (/proc/stat cpu line): $(head -1 /proc/stat)"
} >"$RESULTS/environment.txt"

export PAIRS SIZE_MIB KCOPY SUB_JOB_KB REFS_ONLY CHECK FIO_EXTRA PIN SETTLE TIMEOUT RESULTS DEVICES
python3 - <<'PY' &
import json
import os
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time


class Interrupted(Exception):
    pass


def on_signal(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def excepthook(kind, value, tb):
    if kind is Interrupted:
        sys.stderr.write(f"run-kcopy-compare: stopped by {value}\n")
        os._exit(130)
    sys.__excepthook__(kind, value, tb)


sys.excepthook = excepthook


# Started in the background by bash, which would leave SIGINT ignored: take INT and
# TERM here, kill the running tool and stop.
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)

PAIRS = int(os.environ["PAIRS"])
SIZE_MIB = int(os.environ["SIZE_MIB"])
SIZE = SIZE_MIB << 20
KCOPY = os.environ.get("KCOPY") or ""
SUB_JOB_KB = [int(x) for x in os.environ.get("SUB_JOB_KB", "").split()]
REFS_ONLY = os.environ.get("REFS_ONLY") == "1" or not KCOPY
CHECK = os.environ.get("CHECK", "1") == "1"
FIO_EXTRA = shlex.split(os.environ.get("FIO_EXTRA") or "")
PIN = shlex.split(os.environ.get("PIN") or "")
SETTLE = float(os.environ.get("SETTLE") or 0)
TIMEOUT = float(os.environ["TIMEOUT"])
RESULTS = os.environ["RESULTS"]
DEVICES = {}
for item in os.environ["DEVICES"].split():
    kind, devs = item.split(":")
    DEVICES[kind] = devs.split(",")
HZ = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
MIB = 1 << 20


def die(msg):
    sys.exit(f"run-kcopy-compare: error: {msg}")


def fio_cmd(src, dsts):
    cmd = ["fio", "--direct=1", "--ioengine=io_uring", "--bs=1M", "--iodepth=8",
           f"--size={SIZE_MIB}M", "--offset=0", "--output-format=json"] + FIO_EXTRA
    cmd += ["--name=rd", f"--filename={src}", "--rw=read"]
    for i, d in enumerate(dsts):
        cmd += [f"--name=wr{i + 1}", f"--filename={d}", "--rw=write"]
    return PIN + cmd


def run_specs(src, d1, d2):
    """name -> (command, parser, source bytes, description)"""
    specs = {}
    if not REFS_ONLY:
        specs["kcopy"] = (PIN + [KCOPY, "--json", src, d1], "kcopy", "kcopy 1->1, default sub-job")
        for kb in SUB_JOB_KB:
            specs[f"kcopy-sj{kb}"] = (PIN + [KCOPY, "--json", "--sub-job-kb", str(kb), src, d1],
                                      "kcopy", f"kcopy 1->1, --sub-job-kb {kb}")
    specs["dd"] = (PIN + ["dd", f"if={src}", f"of={d1}", "bs=1M", f"count={SIZE_MIB}",
                          "iflag=direct", "oflag=direct"], "dd", "dd bs=1M direct (floor)")
    specs["fio"] = (fio_cmd(src, [d1]), "fio", "fio read SRC + write DST1 at once (ceiling)")
    if not REFS_ONLY:
        specs["kcopy-1to2"] = (PIN + [KCOPY, "--json", src, d1, d2], "kcopy",
                               "kcopy 1->2, default sub-job")
    specs["fio-1to2"] = (fio_cmd(src, [d1, d2]), "fio", "fio read SRC + write DST1, DST2 at once")
    return specs


def proc_stat():
    """Per line of /proc/stat (cpu, cpu0, ...): busy, idle and steal jiffies."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            parts = line.split()
            v = [int(x) for x in parts[1:]] + [0] * 8
            out[parts[0]] = {"busy": v[0] + v[1] + v[2] + v[5] + v[6], "idle": v[3] + v[4],
                             "steal": v[7]}
    return out


def cpu_delta(a, b, wall):
    d = {k: {f: (b[k][f] - a[k][f]) / HZ for f in a[k]} for k in a if k in b}
    tot = d["cpu"]
    per = {k: v for k, v in d.items() if k != "cpu"}

    def util(x):
        s = x["busy"] + x["idle"]
        return x["busy"] / s if s > 0 else float("nan")

    return {"busy_s": tot["busy"], "idle_s": tot["idle"], "steal_s": tot["steal"],
            "util": util(tot), "percpu_util": {k: round(util(v), 3) for k, v in per.items()},
            "max_cpu_util": max((util(v) for v in per.values()), default=float("nan"))}


PF_KTHREAD = 0x00200000
OUR_PIDS = {os.getpid(), os.getppid()}


def user_procs_cpu():
    """pid -> CPU jiffies (utime + stime) of every user-space process but this
    script: to see how much CPU other work on the machine took during a run."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in OUR_PIDS:
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(rest[6]) & PF_KTHREAD:
            continue
        out[int(d)] = int(rest[11]) + int(rest[12])
    return out


def foreign_cpu(before, after, tool_pid):
    """CPU seconds other processes used between two snapshots (processes that
    started and ended in between are missed)."""
    tot = 0
    for pid, t in after.items():
        if pid == tool_pid:
            continue
        tot += t - before.get(pid, 0) if pid in before else t
    return max(tot, 0) / HZ


def execute(cmd, label):
    """Runs cmd; returns (rc, stdout, stderr, wall, cpu, rusage)."""
    with open("/proc/loadavg") as f:
        load1 = float(f.read().split()[0])
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    u0 = user_procs_cpu()
    s0 = proc_stat()
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, LC_ALL="C"))
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        err += f"\nrun-kcopy-compare: killed after the {TIMEOUT:g} s timeout"
    except BaseException:
        p.kill()
        p.wait()
        raise
    wall = time.monotonic() - t0
    s1 = proc_stat()
    u1 = user_procs_cpu()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rus = {"user_s": ru1.ru_utime - ru0.ru_utime, "sys_s": ru1.ru_stime - ru0.ru_stime,
           "loadavg1_before": load1, "other_procs_cpu_s": foreign_cpu(u0, u1, p.pid)}
    return p.returncode, out, err, wall, cpu_delta(s0, s1, wall), rus


def json_in(text):
    i, j = text.find("{"), text.rfind("}")
    if i < 0 or j < i:
        raise ValueError("no JSON object in the output")
    return json.loads(text[i:j + 1])


def truthy_err(v):
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v != 0
    if isinstance(v, str):
        return v.strip().lower() not in ("", "0", "false", "none", "0x0")
    if isinstance(v, (list, dict)):
        return len(v) > 0
    return v is not None


def parse_kcopy(out, ndest):
    j = json_in(out)
    missing = [k for k in ("bytes", "seconds", "read_err", "write_err", "mib_per_s") if k not in j]
    if missing:
        raise ValueError(f"kcopy JSON lacks {missing}")
    problems = []
    if truthy_err(j["read_err"]) or truthy_err(j["write_err"]):
        problems.append(f"read_err={j['read_err']!r} write_err={j['write_err']!r}")
    # Optional fields of the tool's JSON, checked when present.
    if j.get("ok") is False or j.get("error") or j.get("cancelled"):
        problems.append(f"ok={j.get('ok')!r} error={j.get('error')!r} cancelled={j.get('cancelled')!r}")
    # `bytes` may count the source or every destination: accept both, note which.
    if j["bytes"] not in (SIZE, SIZE * ndest):
        problems.append(f"bytes={j['bytes']} (expected {SIZE} or {SIZE * ndest})")
    secs = float(j["seconds"])
    if not secs > 0:
        problems.append(f"seconds={j['seconds']!r}")
        secs = float("nan")
    r = {"mib_s": SIZE / MIB / secs, "seconds": secs, "reported_bytes": j["bytes"],
         "reported_mib_per_s": j["mib_per_s"], "read_err": j["read_err"],
         "write_err": j["write_err"], "json": j}
    return r, problems


DD_RE = re.compile(r"^(\d+) bytes .* copied, ([0-9.e+-]+) s", re.M)


def parse_dd(err):
    m = DD_RE.search(err)
    if not m:
        raise ValueError("no 'bytes ... copied, N s' line in dd's stderr")
    b, secs = int(m.group(1)), float(m.group(2))
    problems = [] if b == SIZE else [f"dd copied {b} bytes, expected {SIZE}"]
    return {"mib_s": b / MIB / secs, "seconds": secs, "reported_bytes": b}, problems


def parse_fio(out):
    j = json_in(out)
    jobs = {job["jobname"]: job for job in j["jobs"]}
    problems = []
    rd = jobs["rd"]
    wrs = [jobs[n] for n in sorted(jobs) if n.startswith("wr")]
    for job in [rd] + wrs:
        if job.get("error"):
            problems.append(f"fio job {job['jobname']} error {job['error']}")
    read_bw = rd["read"]["bw_bytes"] / MIB
    write_bws = [w["write"]["bw_bytes"] / MIB for w in wrs]
    io = [rd["read"]["io_bytes"]] + [w["write"]["io_bytes"] for w in wrs]
    if any(x != SIZE for x in io):
        problems.append(f"fio moved {io} bytes per job, expected {SIZE}")
    runtimes = [rd["job_runtime"] / 1000.0] + [w["job_runtime"] / 1000.0 for w in wrs]
    return {"mib_s": min([read_bw] + write_bws), "read_mib_s": read_bw, "write_mib_s": write_bws,
            "seconds": max(runtimes), "job_runtimes_s": runtimes,
            "proc_cpu_s": sum((x["usr_cpu"] + x["sys_cpu"]) / 100.0 * x["job_runtime"] / 1000.0
                              for x in [rd] + wrs)}, problems


def run_one(kind, name, spec, tag):
    cmd, parser, _desc = spec
    rc, out, err, wall, cpu, rus = execute(cmd, name)
    base = os.path.join(RESULTS, f"{kind}-{tag}-{name}")
    r = {"tool": name, "rc": rc, "wall_s": wall, "cpu": cpu, "rusage": rus, "ok": False}
    if parser == "dd":
        with open(base + ".json", "w") as f:
            json.dump({"cmd": shlex.join(cmd), "rc": rc, "stderr": err}, f, indent=1)
    else:
        with open(base + ".json", "w") as f:
            f.write(out)
        if err.strip():
            with open(base + ".stderr", "w") as f:
                f.write(err)
    problems = []
    if rc != 0:
        problems.append(f"exit status {rc}")
    try:
        if parser == "kcopy":
            ndest = len([a for a in cmd if a.startswith("/dev/")]) - 1
            parsed, more = parse_kcopy(out, ndest)
        elif parser == "dd":
            parsed, more = parse_dd(err)
        else:
            parsed, more = parse_fio(out)
        r.update(parsed)
        problems += more
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        problems.append(f"cannot parse the output: {e}")
    if problems:
        tail = " | ".join(err.strip().splitlines()[-3:])
        r["error"] = "; ".join(problems) + (f" (stderr: {tail})" if tail else "")
    else:
        r["ok"] = True
    # CPU per GiB of source copied, all CPUs (loop kworkers included).
    r["cpu_s_per_gib"] = cpu["busy_s"] / (SIZE / (1 << 30))
    return r


def check_copy(kind, src, d1, d2):
    """kcopy SRC DST1 DST2 onto zero-filled destinations, then cmp both with SRC."""
    spec = (PIN + [KCOPY, "--json", src, d1, d2], "kcopy", "check")
    r = run_one(kind, "kcopy-1to2", spec, "check")
    msgs = []
    if not r["ok"]:
        msgs.append(f"check run failed: {r.get('error')}")
    for d in (d1, d2):
        p = subprocess.run(["cmp", "-n", str(SIZE), src, d], capture_output=True, text=True)
        if p.returncode != 0:
            msgs.append(f"cmp {src} {d}: {(p.stdout + p.stderr).strip() or 'rc ' + str(p.returncode)}")
        subprocess.run(["blockdev", "--flushbufs", d], capture_output=True)
    subprocess.run(["blockdev", "--flushbufs", src], capture_output=True)
    return r, msgs


def fmt(x, nd=0):
    return "nan" if x != x else f"{x:,.{nd}f}"


med = statistics.median
summary = {"pairs": PAIRS, "size_mib": SIZE_MIB, "kinds": {}, "ncpu": NCPU}
failures = []
RATIO_DEFS = []  # (name, numerator, denominator, target or None)

for kind, (src, d1, d2) in DEVICES.items():
    specs = run_specs(src, d1, d2)
    names = list(specs)
    print(f"== {kind}: {src} -> {d1} (+ {d2}), {SIZE_MIB} MiB, {PAIRS} pairs", flush=True)
    for n in names:
        print(f"   {n:11s} {shlex.join(specs[n][0])}", flush=True)
    krec = {"devices": [src, d1, d2], "commands": {n: shlex.join(specs[n][0]) for n in names},
            "check": None, "runs": {n: [] for n in names}}
    if CHECK and not REFS_ONLY:
        r, msgs = check_copy(kind, src, d1, d2)
        krec["check"] = {"run": r, "problems": msgs}
        if msgs:
            failures += [f"{kind} check: {m}" for m in msgs]
            print(f"   check: FAILED: {'; '.join(msgs)}", flush=True)
        else:
            print(f"   check: kcopy 1->2 ok, both destinations equal the source "
                  f"({fmt(r['mib_s'])} MiB/s)", flush=True)
    for i in range(PAIRS):
        rot = i % len(names)
        order = names[rot:] + names[:rot]
        if i % 2 == 1:
            order.reverse()
        got = {}
        for n in order:
            if SETTLE > 0:
                time.sleep(SETTLE)
            r = run_one(kind, n, specs[n], str(i + 1))
            r["position"] = order.index(n)
            krec["runs"][n].append(r)
            got[n] = r
            if not r["ok"]:
                failures.append(f"{kind} pair {i + 1} {n}: {r['error']}")
        parts = []
        for n in names:
            r = got[n]
            if not r["ok"]:
                parts.append(f"{n} FAILED")
                continue
            s = f"{n} {fmt(r['mib_s'])}"
            if n.startswith("fio"):
                s += f" (r {fmt(r['read_mib_s'])}/w {'/'.join(fmt(w) for w in r['write_mib_s'])})"
            parts.append(s)
        steal = sum(got[n]["cpu"]["steal_s"] for n in names)
        other = sum(got[n]["rusage"]["other_procs_cpu_s"] for n in names)
        print(f"   pair {i + 1}/{PAIRS} MiB/s: {', '.join(parts)}; steal {steal:.2f} s, "
              f"other processes' CPU {other:.2f} s", flush=True)

    # Per-tool statistics.
    tools = {}
    for n in names:
        ok = [r for r in krec["runs"][n] if r["ok"]]
        if not ok:
            tools[n] = {"n": 0}
            continue
        mib = [r["mib_s"] for r in ok]
        t = {"n": len(ok), "median": med(mib), "min": min(mib), "max": max(mib),
             "cpu_s_per_gib": med([r["cpu_s_per_gib"] for r in ok]),
             "util": med([r["cpu"]["util"] for r in ok]),
             "max_cpu_util": med([r["cpu"]["max_cpu_util"] for r in ok]),
             "steal_s": med([r["cpu"]["steal_s"] for r in ok]),
             "other_cpu_s": med([r["rusage"]["other_procs_cpu_s"] for r in ok]),
             "proc_cpu_s": med([r["rusage"]["user_s"] + r["rusage"]["sys_s"] for r in ok]),
             "wall_s": med([r["wall_s"] for r in ok]), "seconds": med([r["seconds"] for r in ok])}
        if n.startswith("fio"):
            t["read_median"] = med([r["read_mib_s"] for r in ok])
            t["write_median"] = [med([r["write_mib_s"][k] for r in ok])
                                 for k in range(len(ok[0]["write_mib_s"]))]
        if n.startswith("kcopy"):
            t["reported_bytes"] = ok[0]["reported_bytes"]
            t["sub_job_bytes"] = ok[0]["json"].get("sub_job_bytes")
            # KC-17: calls into the engine (io_uring_enter) per dm-io operation.
            epo = [r["json"]["enters_per_op"] for r in ok
                   if r["json"].get("enters_per_op") is not None]
            t["enters_per_op"] = med(epo) if epo else None
            extra = sorted(set(ok[0]["json"]) - {"bytes", "seconds", "read_err", "write_err",
                                                 "mib_per_s"})
            t["json_fields"] = extra
        tools[n] = t
    krec["tools"] = tools

    # Ratios within each pair.
    defs = []
    for n in names:
        if n == "kcopy" or n.startswith("kcopy-sj"):
            defs.append((f"{n}/dd", n, "dd", 1.3))
            defs.append((f"{n}/fio", n, "fio", 0.9))
    if "kcopy-1to2" in names:
        defs.append(("kcopy-1to2/kcopy", "kcopy-1to2", "kcopy", 0.85))
        defs.append(("kcopy-1to2/fio-1to2", "kcopy-1to2", "fio-1to2", None))
    defs.append(("fio/dd", "fio", "dd", None))
    defs.append(("fio-1to2/fio", "fio-1to2", "fio", None))
    ratios = {}
    for rname, a, b, target in defs:
        vals = []
        for ra, rb in zip(krec["runs"][a], krec["runs"][b]):
            if ra["ok"] and rb["ok"] and rb["mib_s"] > 0:
                vals.append(ra["mib_s"] / rb["mib_s"])
        ratios[rname] = {"target": target, "values": vals,
                         "median": med(vals) if vals else float("nan"),
                         "min": min(vals) if vals else float("nan"),
                         "max": max(vals) if vals else float("nan")}
    krec["ratios"] = ratios
    summary["kinds"][kind] = krec

with open(os.path.join(RESULTS, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)

lines = ["| kind | run | MiB/s median | min-max | CPU-s/GiB (all CPUs) | CPU util all / busiest | "
         "tool CPU s | steal s | other procs CPU s | detail |", "|" + "---|" * 10]
for kind, krec in summary["kinds"].items():
    for n, t in krec["tools"].items():
        if t["n"] == 0:
            lines.append(f"| {kind} | {n} | FAILED | | | | | | | |")
            continue
        detail = ""
        if n.startswith("fio"):
            detail = (f"read {fmt(t['read_median'])}, write "
                      f"{'/'.join(fmt(w) for w in t['write_median'])} (ceiling = min)")
        elif n.startswith("kcopy"):
            detail = f"wall {t['wall_s']:.2f} s vs reported {t['seconds']:.2f} s"
            if t.get("sub_job_bytes"):
                detail += f"; sub-job {t['sub_job_bytes'] >> 10} KiB"
        if t["n"] < PAIRS:
            detail += f"; {t['n']}/{PAIRS} ok"
        lines.append(
            f"| {kind} | {n} | {fmt(t['median'])} | {fmt(t['min'])}-{fmt(t['max'])} | "
            f"{t['cpu_s_per_gib']:.2f} | {t['util'] * 100:.0f}% / {t['max_cpu_util'] * 100:.0f}% | "
            f"{t['proc_cpu_s']:.2f} | {t['steal_s']:.2f} | {t['other_cpu_s']:.2f} | {detail} |")
tools_table = "\n".join(lines)

lines = ["| kind | ratio | median | min-max | target | pairs |", "|" + "---|" * 6]
for kind, krec in summary["kinds"].items():
    for rname, r in krec["ratios"].items():
        if r["target"] is None:
            tgt = "(context)"
        elif r["median"] != r["median"]:
            tgt = f">= {r['target']:.2f} (no data)"
        else:
            tgt = f">= {r['target']:.2f} ({'ok' if r['median'] >= r['target'] else 'BELOW'})"
        lines.append(f"| {kind} | {rname} | {r['median']:.3f} | {r['min']:.3f}-{r['max']:.3f} | "
                     f"{tgt} | {len(r['values'])} |")
ratio_table = "\n".join(lines)

notes = (f"\n{PAIRS} pairs per kind, {SIZE_MIB} MiB per copy; within a pair the runs go in an order "
         "that rotates every pair (reversed on odd pairs). Ratios are taken within a pair, then the "
         "median over pairs. MiB/s counts source bytes (for 1->2, each destination got that much). "
         "kcopy and dd MiB/s use the time each tool reports; fio uses its per-job bandwidth, the "
         "ceiling being min(read, write) of the concurrent run. CPU-s/GiB and util: busy time of "
         "all CPUs from /proc/stat over the whole run (loop kworkers included) per GiB of source; "
         f"'busiest' is the most loaded of the {NCPU} CPUs. Tool CPU s: user+sys of the process "
         "(rusage). Other procs CPU s: CPU time of other user-space processes during the run "
         "(noise from other work on the machine; kernel threads not included).\n")
check_lines = []
for kind, krec in summary["kinds"].items():
    c = krec["check"]
    if c is not None:
        check_lines.append(f"- {kind}: check (kcopy SRC DST1 DST2 onto zeroed destinations, cmp): "
                           + ("ok" if not c["problems"] else "FAILED: " + "; ".join(c["problems"])))
md = ["## Throughput", "", tools_table, "", "## Ratios", "", ratio_table, notes]
if check_lines:
    md += ["## Correctness check", ""] + check_lines + [""]
if failures:
    md += ["## Failures", ""] + [f"- {x}" for x in failures] + [""]
md += ["## Commands", ""]
for kind, krec in summary["kinds"].items():
    for n, c in krec["commands"].items():
        md.append(f"- {kind} {n}: `{c}`")
with open(os.path.join(RESULTS, "summary.md"), "w") as f:
    f.write("\n".join(md) + "\n")
print()
print(tools_table)
print()
print(ratio_table)
print(notes)
for x in check_lines:
    print(x)
if failures:
    print("failures:")
    for x in failures:
        print(f"  {x}")
print(f"raw results: {RESULTS}")
sys.exit(2 if failures else 0)
PY
PY_PID=$!
set +e
wait "$PY_PID"
rc=$?
set -e
PY_PID=""
exit "$rc"
