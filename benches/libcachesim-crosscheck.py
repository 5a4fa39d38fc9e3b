#!/usr/bin/env python3
"""Cross-check flashcache-core's trace simulator against libCacheSim.

From the repository root:

    python3 benches/libcachesim-crosscheck.py [--keep] [--cache-sim PATH] [--seed 42] ...

1. Builds `cache-sim` (`cargo build --release -p examples --bin cache-sim`)
   unless `--cache-sim` names one.
2. Creates a virtual environment in a temporary directory and installs the
   PyPI package `libcachesim` into it (a network fetch from PyPI; when that is
   not possible the script says so and exits with status 2).
3. Generates the seeded Zipf traces of the reference (100k objects, 1M
   requests, alpha 0.8 and 1.0, shuffled ids) once, with
   `cache-sim --zipf ... --shuffle --write-trace FILE`, so both simulators
   see the identical request sequence.
4. Runs libCacheSim's FIFO and LRU (and, for information, SIEVE) at 1/5/10/20 %
   of the unique objects, and `cache-sim --trace FILE --assoc full` on the
   same file with the same cache sizes in blocks, and prints both with the
   differences. Pass: every FIFO and LRU |difference| <= 0.005.
5. Prints, for the set-associative shape (512-way, flashcache's hashed
   mapping by default), every policy's miss ratio and best/LRU at each size:
   the project's target is best <= 0.9 x LRU on both traces at 1-20 %.

Exit status: 0 when the cross-check passes (and, with --require-target, the
target is met); 1 when it does not; 2 when the setup fails (no cargo, no
PyPI, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs inside the virtual environment: replays a text trace (R|W sector count)
# through libCacheSim caches of the given sizes (in blocks, object size 1) and
# prints {policy: [miss ratio per size]} as JSON.
CHILD = r"""
import json, sys
import libcachesim as lcs

path, block_sectors, sizes, policies = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sizes = [int(s) for s in sizes.split(",")]
ids = []
with open(path) as f:
    for line in f:
        line = line.split("#", 1)[0].split()
        if not line:
            continue
        sector, count = int(line[1]), int(line[2])
        first, last = sector // block_sectors, (sector + count - 1) // block_sectors
        ids.extend(range(first, last + 1))
classes = {"fifo": lcs.FIFO, "lru": lcs.LRU, "sieve": lcs.Sieve}
out = {"version": getattr(lcs, "__version__", "?"), "accesses": len(ids), "results": {}}
for name in policies.split(","):
    ratios = []
    for size in sizes:
        cache = classes[name](cache_size=size)
        req = lcs.Request()
        req.obj_size = 1
        hits = 0
        for obj in ids:
            req.obj_id = obj
            if cache.get(req):
                hits += 1
        ratios.append(1.0 - hits / len(ids))
    out["results"][name] = ratios
print(json.dumps(out))
"""


class SetupError(Exception):
    """The environment cannot run the check."""


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, text=True, capture_output=True, **kw)


def build_cache_sim() -> str:
    if shutil.which("cargo") is None:
        raise SetupError("cargo not found (or pass --cache-sim PATH)")
    print("building cache-sim (cargo build --release -p examples --bin cache-sim) ...", flush=True)
    build = run(["cargo", "build", "--release", "-p", "examples", "--bin", "cache-sim"], cwd=ROOT)
    if build.returncode != 0:
        raise SetupError("cargo build failed:\n" + build.stderr[-3000:])
    meta = run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=ROOT)
    if meta.returncode != 0:
        raise SetupError("cargo metadata failed:\n" + meta.stderr[-2000:])
    target = json.loads(meta.stdout)["target_directory"]
    path = os.path.join(target, "release", "cache-sim")
    if not os.access(path, os.X_OK):
        raise SetupError(f"{path} is not there after the build")
    return path


def make_venv(tmp: str, spec: str) -> str:
    env_dir = os.path.join(tmp, "venv")
    print(f"creating a virtual environment in {env_dir} and installing {spec!r} ...", flush=True)
    try:
        venv.EnvBuilder(with_pip=True).create(env_dir)
    except Exception as e:  # noqa: BLE001 - any failure is a setup failure
        raise SetupError(f"cannot create a virtual environment: {e}") from e
    python = os.path.join(env_dir, "bin", "python")
    pip = run([python, "-m", "pip", "install", "--disable-pip-version-check", "-q",
               "--timeout", "30", spec])
    if pip.returncode != 0:
        tail = "\n".join((pip.stderr or pip.stdout).strip().splitlines()[-5:])
        raise SetupError(
            f"cannot install {spec!r} from PyPI; this check needs network access to PyPI "
            f"(or a pip mirror: PIP_INDEX_URL). pip said:\n{tail}")
    check = run([python, "-c", "import libcachesim"])
    if check.returncode != 0:
        raise SetupError("libcachesim installed but does not import:\n" + check.stderr[-2000:])
    return python


def cache_sim_json(binary: str, args: list[str]) -> dict:
    res = run([binary, *args, "--json"])
    if res.returncode != 0:
        raise SetupError(f"cache-sim {' '.join(args)} failed: {res.stderr.strip()}")
    return json.loads(res.stdout)


def by_policy(doc: dict, sizes: list[str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in doc["results"]:
        out.setdefault(r["policy"], []).append(r)
    for rows in out.values():
        assert [r["size"] for r in rows] == sizes, rows
    return out


def row(label: str, values: list[str], width: int = 10) -> str:
    return f"{label:<24}" + "".join(f"{v:>{width}}" for v in values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-sim", help="a cache-sim binary (default: build one with cargo)")
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--alphas", default="0.8,1.0")
    ap.add_argument("--sizes", default="1%,5%,10%,20%")
    ap.add_argument("--tolerance", type=float, default=0.005)
    ap.add_argument("--assoc", default="512", help="set-associative shape's ways (default 512)")
    ap.add_argument("--mapping", help="its mapping (default: cache-sim's, hashed 256 KiB clusters)")
    ap.add_argument("--target", type=float, default=0.9, help="best/LRU target (default 0.9)")
    ap.add_argument("--require-target", action="store_true",
                    help="also fail (status 1) when the best/LRU target is missed")
    ap.add_argument("--pip-spec", default="libcachesim>=0.3,<0.4")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()

    sizes = args.sizes.split(",")
    tmp = tempfile.mkdtemp(prefix="libcachesim-crosscheck-")
    try:
        binary = args.cache_sim or build_cache_sim()
        python = make_venv(tmp, args.pip_spec)
        version = run([python, "-m", "pip", "show", "libcachesim"]).stdout
        version = next((l.split(":", 1)[1].strip() for l in version.splitlines()
                        if l.startswith("Version:")), "?")
        print(f"libcachesim {version}; cache-sim {binary}\n")

        failures: list[str] = []
        target_misses: list[str] = []
        for alpha in args.alphas.split(","):
            trace = os.path.join(tmp, f"zipf-{alpha}.txt")
            zipf = f"{args.objects},{alpha},{args.requests},{args.seed}"
            full = ["--assoc", "full", "--policy", "fifo,lru,sieve", "--sizes", args.sizes]
            # Generate once, and write the trace that both simulators replay.
            generated = cache_sim_json(
                binary, ["--zipf", zipf, "--shuffle", "--write-trace", trace, *full])
            ours = cache_sim_json(binary, ["--trace", trace, *full])
            if generated["results"] != ours["results"]:
                failures.append(f"alpha {alpha}: the written trace replays differently")
            footprint = ours["footprint_blocks"]
            block_sectors = ours["block_bytes"] // 512
            mine = by_policy(ours, sizes)
            blocks = [r["cache_blocks"] for r in mine["lru"]]
            child = run([python, "-c", CHILD, trace, str(block_sectors),
                         ",".join(map(str, blocks)), "fifo,lru,sieve"])
            if child.returncode != 0:
                raise SetupError("libCacheSim run failed:\n" + child.stderr[-3000:])
            theirs = json.loads(child.stdout.strip().splitlines()[-1])
            if theirs["accesses"] != ours["results"][0]["accesses"]:
                failures.append(f"alpha {alpha}: access counts differ")

            print(f"== Zipf alpha={alpha}: {args.objects} objects, {args.requests} requests, "
                  f"seed {args.seed}, shuffled ids; footprint {footprint} blocks ==")
            print("fully associative, miss ratio")
            print(row("cache size", sizes))
            print(row("cache blocks", [str(b) for b in blocks]))
            for policy in ("fifo", "lru", "sieve"):
                gate = policy in ("fifo", "lru")
                lib = theirs["results"][policy]
                sim = [r["miss_ratio"] for r in mine[policy]]
                diffs = [s - l for s, l in zip(sim, lib)]
                note = "" if gate else " (info)"
                print(row(f"{policy} libCacheSim{note}", [f"{v:.4f}" for v in lib]))
                print(row(f"{policy} cache-sim", [f"{v:.4f}" for v in sim]))
                print(row(f"{policy} diff", [f"{d if abs(d) >= 5e-5 else 0.0:+.4f}" for d in diffs]))
                if gate:
                    for size, d in zip(sizes, diffs):
                        if abs(d) > args.tolerance:
                            failures.append(f"alpha {alpha} {policy} {size}: diff {d:+.4f}")

            sa_args = ["--trace", trace, "--assoc", args.assoc, "--policy", "all",
                       "--sizes", args.sizes]
            if args.mapping:
                sa_args += ["--mapping", args.mapping]
            sa = cache_sim_json(binary, sa_args)
            rows = by_policy(sa, sizes)
            print(f"\nset-associative {sa['assoc']}-way, {sa['mapping']} mapping, miss ratio")
            print(row("cache size", sizes))
            print(row("cache blocks", [str(r["cache_blocks"]) for r in rows["lru"]]))
            for policy, results in rows.items():
                print(row(policy, [f"{r['miss_ratio']:.4f}" for r in results]))
            for policy, results in rows.items():
                if policy == "lru":
                    continue
                print(row(f"{policy}/lru", [f"{r['miss_ratio'] / l['miss_ratio']:.3f}"
                                            for r, l in zip(results, rows["lru"])]))
            best = []
            for i, size in enumerate(sizes):
                lru = rows["lru"][i]["miss_ratio"]
                name, ratio = min(((p, rs[i]["miss_ratio"] / lru) for p, rs in rows.items()),
                                  key=lambda t: t[1])
                best.append(f"{ratio:.3f} {name}")
                if ratio > args.target:
                    target_misses.append(f"alpha {alpha} {size}: best/LRU {ratio:.3f} ({name})")
            print(row("best/lru", best, width=14))
            print()

        ok = not failures
        print("cross-check (FIFO and LRU, fully associative, |diff| <= "
              f"{args.tolerance}): {'PASS' if ok else 'FAIL'}")
        for f in failures:
            print(f"  {f}")
        met = not target_misses
        print(f"target (best <= {args.target} x LRU, set-associative): "
              f"{'met' if met else 'NOT met'}")
        for t in target_misses:
            print(f"  {t}")
        if args.keep:
            print(f"traces kept in {tmp}")
        return 0 if ok and (met or not args.require_target) else 1
    except SetupError as e:
        print(f"libcachesim-crosscheck: {e}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
