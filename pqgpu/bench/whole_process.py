"""Whole-process timings, as a user sees them: `pqgpu encode` (a fresh process: imports, cluster or threads,
encode, duplicate-id check) against a fresh process running the seed-style single-process faiss script on
the same Parquet files. Also `pqgpu encode` forced onto in-process threads and onto a process cluster, to
place the size where pqgpu stops using threads (pqgpu.cluster.IN_PROCESS_MAX_VALUES), and `pqgpu info`'s
start-up time. Target (issue 16): pqgpu >= 2x the script at 200k and 1M rows of d=768, M=96.

    python -m pqgpu.bench.whole_process [--sizes 200000,1000000] [--runs 3] [--workdir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from . import environment, markdown_table

log = logging.getLogger(__name__)

SEED_SCRIPT = """
import sys, time
from pathlib import Path
t0 = time.perf_counter()
from pqgpu.bench.pipeline import seed_style
files = sorted(Path(sys.argv[1]).glob("*.parquet"))
n = seed_style(files, Path(sys.argv[2]), Path(sys.argv[3]))
print(n)
"""


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.decode()[-2000:]}")
    return seconds


def _config(data: Path, work: Path, M: int, processes: bool | None) -> Path:
    cfg = {
        "source": {"format": "parquet", "path": str(data / "*.parquet"), "id_column": "id"},
        "quantizer": {"path": str(work / "pq.faiss"), "M": M, "nbits": 8, "train_size": 20000, "niter": 4},
        "encode": {"output": str(work / "codes.zarr"), "chunk_rows": 32768, "backend": "cpu"},
        "cluster": {"kind": "local", "processes": processes, "dashboard": False},
    }
    p = work / f"config-{processes}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def measure(data: Path, work: Path, n: int, M: int, runs: int) -> dict[str, Any]:
    """Median whole-process seconds of each route on the Parquet shards in `data` (n rows)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    py = sys.executable
    work.mkdir(parents=True, exist_ok=True)
    auto = _config(data, work, M, None)
    if not (work / "pq.faiss").exists():
        _timed([py, "-m", "pqgpu.cli", "-q", "train", "-c", str(auto)], env)
    routes = {
        "pqgpu encode (auto)": [py, "-m", "pqgpu.cli", "-q", "encode", "--overwrite", "-c", str(auto)],
        "pqgpu encode (threads)": [py, "-m", "pqgpu.cli", "-q", "encode", "--overwrite", "-c",
                                   str(_config(data, work, M, False))],
        "pqgpu encode (processes)": [py, "-m", "pqgpu.cli", "-q", "encode", "--overwrite", "-c",
                                     str(_config(data, work, M, True))],
        "seed-style script (1 process, faiss)": [py, "-c", SEED_SCRIPT, str(data), str(work / "pq.faiss"),
                                                 str(work / "seed.zarr")],
    }
    times: dict[str, list[float]] = {k: [] for k in routes}
    for _ in range(runs):  # interleaved, so a busy spell of a shared machine hits every route alike
        for name, cmd in routes.items():
            times[name].append(_timed(cmd, env))
    info = [_timed([py, "-m", "pqgpu.cli", "info", str(work / "codes.zarr")], env) for _ in range(runs)]
    med = {k: statistics.median(v) for k, v in times.items()}
    seed = med["seed-style script (1 process, faiss)"]
    rows = [{"route": k, "seconds": med[k], "range": f"{min(v):.2f}-{max(v):.2f}", "rows/s": n / med[k],
             "vs seed-style": seed / med[k]} for k, v in times.items()]
    return {"n": n, "M": M, "runs": runs, "rows": rows, "info_seconds": statistics.median(info),
            "auto_vs_seed": seed / med["pqgpu encode (auto)"]}


def run(sizes: list[int], d: int = 768, M: int = 96, runs: int = 3, workdir: str | None = None) -> dict[str, Any]:
    from ..sample import make_sample

    root = Path(workdir or tempfile.mkdtemp(prefix="pqgpu-whole-"))
    out: dict[str, Any] = {"benchmark": "whole_process", "d": d, "M": M, "results": []}
    try:
        for n in sizes:
            data = root / f"data-{n}"
            if not data.exists():
                make_sample(data, n, d, shards=8, fmt="parquet")
            out["results"].append(measure(data, root / f"work-{n}", n, M, runs))
            log.info("%d rows: %s", n, out["results"][-1])
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)
    return out


def render(r: dict[str, Any]) -> str:
    text = ""
    for res in r["results"]:
        text += (f"Whole process, n={res['n']:,} x d={r['d']}, M={res['M']}, 8 Parquet shards, median of "
                 f"{res['runs']} runs\n\n" + markdown_table(res["rows"], ["route", "seconds", "range", "rows/s",
                                                                        "vs seed-style"])
                 + f"\npqgpu encode (auto) / seed-style: {res['auto_vs_seed']:.2f}x (target >= 2x); "
                   f"`pqgpu info` whole process: {res['info_seconds']:.2f} s\n\n")
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="200000,1000000", help="comma-separated row counts")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--M", type=int, default=96)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", help="keep (and reuse) data here instead of a temp dir")
    p.add_argument("--json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    result = run([int(s) for s in args.sizes.split(",")], args.d, args.M, args.runs, args.workdir)
    result["environment"] = environment()
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
