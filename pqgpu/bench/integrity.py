"""What the store's integrity checks cost (issue 21's targets), whole process, in one run:

- `pqgpu search` on a flat and an IVF store, with the checks on (as shipped) and off
  (PQGPU_BENCH_SKIP_CHECKS=1: no codebook sha256, no CRC of what search reads): target <= 3 %;
- a resume with nothing to do (`pqgpu encode` on a complete store), the same two ways: target <= 5 %
  (off also skips re-verifying the done chunks and the inverted layout, which resume did in part before);
- `pqgpu verify`'s read rate against reading the store's files (bytes / second, both from the page cache, in
  this process): target >= 80 %.

Runs alternate on and off, so drift in the machine's speed falls on both; medians over --runs.

    python -m pqgpu.bench.integrity [--n 10000000] [--d 32] [--M 16] [--nlist 1024] [--runs 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _pqgpu(args: list[str], *, checks: bool = True) -> float:
    env = dict(os.environ)
    env.pop("PQGPU_BENCH_SKIP_CHECKS", None)
    if not checks:
        env["PQGPU_BENCH_SKIP_CHECKS"] = "1"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pqgpu.cli", "-q", *args], env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"pqgpu {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return dt


def on_off(args: list[str], runs: int) -> dict[str, float]:
    """Median seconds with the checks on and off, alternating (one untimed warm-up of each)."""
    _pqgpu(args), _pqgpu(args, checks=False)
    on, off = [], []
    for _ in range(runs):
        on.append(_pqgpu(args))
        off.append(_pqgpu(args, checks=False))
    m_on, m_off = statistics.median(on), statistics.median(off)
    return {"on_s": round(m_on, 3), "off_s": round(m_off, 3), "overhead": round(m_on / m_off - 1, 4),
            "on_all": [round(v, 3) for v in on], "off_all": [round(v, 3) for v in off]}


def read_files(path: str) -> tuple[int, float]:
    """Bytes of every file under path and the seconds to read them all (1 MiB reads)."""
    t = time.perf_counter()
    total = 0
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    total += len(b)
    return total, time.perf_counter() - t


def verify_rate(path: str, runs: int) -> dict[str, float]:
    from pqgpu.store import open_store

    read_files(path)  # warm the page cache
    raw, ver = [], []
    nbytes = 0
    for _ in range(runs):
        nbytes, dt = read_files(path)
        raw.append(dt)
        t = time.perf_counter()
        report = open_store(path).verify()
        ver.append(time.perf_counter() - t)
        assert report.ok, report
    r, v = statistics.median(raw), statistics.median(ver)
    return {"store_bytes": nbytes, "read_files_s": round(r, 3), "verify_s": round(v, 3),
            "read_files_MBps": round(nbytes / r / 1e6), "verify_MBps": round(nbytes / v / 1e6),
            "verify_over_read": round(r / v, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--M", type=int, default=16)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nq", type=int, default=100)
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dir", default=None, help="where the data and stores go (deleted at the end)")
    p.add_argument("--keep", action="store_true", help="keep the data and stores")
    args = p.parse_args(argv)
    import numpy as np

    from pqgpu.sample import make_sample

    tmp = Path(tempfile.mkdtemp(prefix="pqgpu-bench-integrity-", dir=args.dir))
    out: dict = {"n": args.n, "d": args.d, "M": args.M, "nlist": args.nlist, "nq": args.nq, "runs": args.runs,
                 "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                 "python": platform.python_version()}
    try:
        t = time.perf_counter()
        make_sample(tmp / "data", args.n, args.d, shards=args.shards, fmt="parquet", n_queries=args.nq)
        out["make_sample_s"] = round(time.perf_counter() - t, 1)
        q = str(tmp / "data" / "queries.npy")
        np.save(q, np.load(q)[:args.nq])
        src = str(tmp / "data" / "*.parquet")
        for kind, extra in (("flat", []), ("ivf", ["--set", f"quantizer.nlist={args.nlist}"])):
            run = ["run", src, "--out", str(tmp / kind), "--M", str(args.M), "--id-column", "id", *extra]
            t = time.perf_counter()
            _pqgpu(run)
            out[f"{kind}_build_s"] = round(time.perf_counter() - t, 1)
            store = str(tmp / kind / "codes.zarr")
            search = ["search", store, "--queries", q, "-k", "10", "--out", str(tmp / "res.parquet")]
            if kind == "ivf":
                search += ["--nprobe", "16"]
            out[f"{kind}_search"] = on_off(search, args.runs)
            out[f"{kind}_resume"] = on_off(["encode", *run[1:]], args.runs)
            out[f"{kind}_verify"] = verify_rate(store, args.runs)
            print(json.dumps({k: v for k, v in out.items() if k.startswith(kind)}, indent=1), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
