"""Where a local process cluster's time goes (issue 22.2): one `pqgpu encode` of the same Parquet shards on
threads of this process and on a local process cluster, split into cluster start, the workers' first
kernel call (numba loading its cached kernels in each new process), the encode itself and, within it, the
read and encode seconds the tasks report (summed over workers). This process trains and runs the threads route
first, so numba's threads run here and its clusters are spawned, not forked (cluster.worker_start_method): it
measures the spawned route; a fresh `pqgpu encode`, which forks, is what pqgpu.bench.whole_process times.

    python -m pqgpu.bench.cluster_cost --n 1000000 --d 768 --M 96 --runs 2
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import environment, markdown_table

log = logging.getLogger(__name__)


class _Grab(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(record.getMessage())


def _warm(path: str) -> float:
    """On a worker: the first encode of a few rows (imports, numba cache load), in seconds."""
    t0 = time.perf_counter()
    from pqgpu.codebook import Codebook

    cb = Codebook.load(path)
    cb.encode(np.zeros((64, cb.d), np.float32), "cpu")
    return time.perf_counter() - t0


def one(cfg: Any, processes: bool) -> dict[str, Any]:
    """The routes' seconds for one `encode` under cfg.cluster (processes or threads of this process)."""
    from ..cluster import InProcess, dask_client, default_workers
    from ..pipeline import encode

    grab = _Grab()
    logger = logging.getLogger("pqgpu")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(grab)
    try:
        t0 = time.perf_counter()
        if processes:
            cm = dask_client(cfg.cluster)
            runner = cm.__enter__()
            t_start = time.perf_counter() - t0
            warm = runner.run(_warm, cfg.quantizer.path)
            t_warm = time.perf_counter() - t0 - t_start
        else:
            cm, runner = None, InProcess(default_workers()[0])
            t_start = 0.0
            t1 = time.perf_counter()
            _warm(cfg.quantizer.path)
            t_warm, warm = time.perf_counter() - t1, {}
        t2 = time.perf_counter()
        encode(cfg, overwrite=True, client=runner)
        t_encode = time.perf_counter() - t2
        t3 = time.perf_counter()
        if cm is not None:
            cm.__exit__(None, None, None)
        else:
            runner.close()
        t_stop = time.perf_counter() - t3
    finally:
        logger.removeHandler(grab)
        logger.setLevel(level)
        logger.propagate = propagate
    m = next((re.search(r"read ([\d.]+) s, encode ([\d.]+) s", t) for t in grab.text if "task time" in t), None)
    c = cfg.cluster
    shape = f" {c.n_workers or 'default'} x {c.threads_per_worker or 'default'}" if processes else ""
    return {"route": ("processes" + shape) if processes else "threads", "start_s": t_start, "first_kernel_s": t_warm,
            "per_worker_first_kernel_s": ", ".join(f"{v:.2f}" for v in warm.values()) if warm else "",
            "encode_s": t_encode, "tasks_read_s": float(m.group(1)) if m else None,
            "tasks_encode_s": float(m.group(2)) if m else None, "stop_s": t_stop,
            "total_s": t_start + t_warm + t_encode + t_stop}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--M", type=int, default=96)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--shapes", default="", help="also processes with these workers x threads, e.g. 1x2,2x2")
    p.add_argument("--tmp", default="/tmp")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(message)s")
    from ..config import config_from_dict
    from ..pipeline import train
    from ..sample import make_sample

    root = Path(tempfile.mkdtemp(prefix="pqgpu-bench-cluster-", dir=args.tmp))
    try:
        make_sample(root / "data", args.n, args.d, shards=8, fmt="parquet", n_queries=1)
        base = {"source": {"format": "parquet", "path": str(root / "data" / "*.parquet"), "id_column": "id"},
                "quantizer": {"path": str(root / "pq.faiss"), "M": args.M, "nbits": 8, "train_size": 20000,
                              "niter": 4},
                "encode": {"output": str(root / "codes.zarr"), "chunk_rows": 32768, "backend": "cpu"}}
        train(config_from_dict(base))
        rows = []
        for _ in range(args.runs):  # interleaved: a busy spell of the shared machine hits both alike
            shapes = [None, *(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s)]
            for processes, shape in [(False, None), *((True, s) for s in shapes)]:
                cluster = {"kind": "local", "processes": processes, "dashboard": False}
                if shape:
                    cluster.update(n_workers=shape[0], threads_per_worker=shape[1])
                cfg = config_from_dict({**base, "cluster": cluster})
                rows.append(one(cfg, processes))
                log.warning("%s", rows[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"environment: {environment()}\n")
    print(markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
