"""Peak RSS of the client process alone (not its Dask workers) for a whole `pqgpu run` at two dataset sizes:
what the client holds must not grow with the number of rows (issue 14: ratio large/small <= 1.2).

Small d and M (default d=8, M=4) keep encoding cheap, so the figure is about what the client gathers
(before: every id for the duplicate check, 8 bytes a row). The run uses a local process cluster
(cluster.processes: true), so the client only plans, submits and merges.

    python -m pqgpu.bench.client_rss [--sizes 1000000,20000000] [--workdir DIR] [--code /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from . import environment, markdown_table

WRAPPER = """
import resource, sys
from pqgpu.cli import main
rc = main(sys.argv[1:])
print("PEAK_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


def measure(n: int, d: int, M: int, root: Path, chunk_rows: int, code_path: str | None = None) -> dict[str, Any]:
    from ..sample import make_sample

    data = root / f"data-{n}"
    if not data.exists():
        make_sample(data, n, d, shards=8, fmt="npy")
    work = root / f"work-{n}"
    work.mkdir(parents=True, exist_ok=True)
    cfg = {
        "source": {"format": "npy", "path": str(data / "shard-*.npy"), "id_column": None},
        "quantizer": {"path": str(work / "pq.faiss"), "M": M, "nbits": 8, "train_size": 20000, "niter": 4},
        "encode": {"output": str(work / "codes.zarr"), "chunk_rows": chunk_rows, "backend": "cpu"},
        "cluster": {"kind": "local", "n_workers": 2, "threads_per_worker": 1},
    }
    if code_path is None:
        cfg["cluster"].update(processes=True, dashboard=False)
    (work / "pq.faiss").unlink(missing_ok=True)  # the whole run: training (on a worker) and encoding
    p = work / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": code_path or str(Path(__file__).resolve().parents[2])}
    t0 = time.perf_counter()
    # cwd: the work dir, so `python -c` (which puts the cwd first on sys.path) imports pqgpu from code_path
    proc = subprocess.run([sys.executable, "-c", WRAPPER, "-q", "run", "--overwrite", "-c", str(p)], env=env,
                          cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"pqgpu run failed:\n{proc.stderr[-3000:]}")
    peak = int(next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_KIB")))
    return {"n": n, "client_peak_rss_mib": peak / 1024, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="1000000,20000000")
    p.add_argument("--d", type=int, default=8)
    p.add_argument("--M", type=int, default=4)
    p.add_argument("--chunk-rows", type=int, default=65536)
    p.add_argument("--workdir")
    p.add_argument("--code", help="PYTHONPATH of another checkout to measure instead (e.g. main, for 'before')")
    p.add_argument("--json")
    args = p.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="pqgpu-rss-"))
    rows = [measure(int(n), args.d, args.M, root, args.chunk_rows, args.code) for n in args.sizes.split(",")]
    result = {"benchmark": "client_rss", "d": args.d, "M": args.M, "rows": rows,
              "ratio": rows[-1]["client_peak_rss_mib"] / rows[0]["client_peak_rss_mib"], "environment": environment()}
    print(markdown_table(rows) + f"\nclient peak RSS ratio {rows[-1]['n']:,} / {rows[0]['n']:,} rows: "
          f"{result['ratio']:.2f} (target <= 1.2)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
