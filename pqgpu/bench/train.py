"""Training time and held-out MSE: pqgpu vs faiss ProductQuantizer.train on the same sample and niter.

    python -m pqgpu.bench.train [--quick] [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import numpy as np

from . import environment, markdown_table, timeit

log = logging.getLogger(__name__)

FULL_GRID = [(65536, 128, 16), (65536, 768, 96), (65536, 768, 48)]
QUICK_GRID = [(8192, 64, 8)]


def bench_point(n_train: int, d: int, M: int, nbits: int, niter: int, runs: int) -> dict[str, Any]:
    import faiss

    import pqgpu
    from ..backend import gpu_status
    from ..sample import sample_vectors

    x = sample_vectors(n_train, d, seed=1)
    held_out = sample_vectors(20000, d, seed=1, start=10**9)

    def mse(decoded: np.ndarray) -> float:
        return float(((decoded - held_out) ** 2).sum(1).mean())

    state: dict[str, Any] = {}

    def ours() -> None:
        state["cb"] = pqgpu.train(x, M, nbits, niter=niter, backend="cpu")

    def theirs() -> None:
        pq = faiss.ProductQuantizer(d, M, nbits)
        pq.cp.niter = niter
        pq.train(x)
        state["pq"] = pq

    t_ours = timeit(ours, runs=runs)
    t_faiss = timeit(theirs, runs=runs)
    cb, pq = state["cb"], state["pq"]
    row = {"n_train": n_train, "d": d, "M": M, "nbits": nbits, "niter": niter,
           "pqgpu_cpu_s": t_ours.median, "faiss_cpu_s": t_faiss.median, "speedup": t_faiss.median / t_ours.median,
           "pqgpu_mse": mse(cb.decode(cb.encode(held_out))), "faiss_mse": mse(pq.decode(pq.compute_codes(held_out)))}
    row["mse_ratio"] = row["pqgpu_mse"] / row["faiss_mse"]
    if gpu_status()[0]:
        from ..backend import sync

        t_gpu = timeit(lambda: state.__setitem__("g", pqgpu.train(x, M, nbits, niter=niter, backend="gpu")),
                       runs=runs, sync=sync)
        row["pqgpu_gpu_s"] = t_gpu.median
        g = state["g"]
        row["pqgpu_gpu_mse"] = mse(g.decode(g.encode(held_out)))
    return row


def run(quick: bool = False, runs: int | None = None, niter: int = 25) -> dict[str, Any]:
    runs = runs or (3 if quick else 5)
    rows = [bench_point(n, d, M, 8, niter if not quick else 10, runs) for n, d, M in (QUICK_GRID if quick else FULL_GRID)]
    return {"benchmark": "train", "runs": runs, "rows": rows}


def render(result: dict[str, Any]) -> str:
    cols = list(result["rows"][0])
    return (f"Training (median of {result['runs']} runs after a warm-up; MSE on 20k held-out rows)\n\n"
            + markdown_table(result["rows"], cols))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--runs", type=int)
    p.add_argument("--json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    result = run(args.quick, args.runs)
    result["environment"] = environment()
    print(f"environment: {result['environment']}\n")
    print(render(result))
    if args.json:
        from . import write_json

        write_json(args.json, result)


if __name__ == "__main__":
    main()
