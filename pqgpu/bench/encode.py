"""Encode throughput: pqgpu (CPU, and GPU when present) vs faiss compute_codes and per-subspace faiss.knn.

    python -m pqgpu.bench.encode [--quick] [--n 100000] [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import numpy as np

from . import environment, geomean, markdown_table, timeit

log = logging.getLogger(__name__)

FULL_GRID = [(d, dsub) for d in (128, 384, 768, 1024) for dsub in (4, 8, 16, 32)]
QUICK_GRID = [(128, 8), (768, 8), (768, 32)]


def make_problem(n: int, d: int, dsub: int, nbits: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded low-intrinsic-dimension vectors and centroids drawn from them (as k-means would place them)."""
    from ..sample import sample_vectors

    x = sample_vectors(n, d, seed=seed)
    pool = sample_vectors(max(4 * (1 << nbits), 1024), d, seed=seed, start=10**9)
    M = d // dsub
    rng = np.random.default_rng(seed)
    c = np.stack([pool[rng.permutation(pool.shape[0])[: 1 << nbits], m * dsub:(m + 1) * dsub] for m in range(M)])
    return x, np.ascontiguousarray(c, dtype=np.float32)


def faiss_knn_route(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """What a user could write with faiss alone: one exact 1-NN search per subspace."""
    import faiss

    M, ksub, dsub = c.shape
    out = np.empty((x.shape[0], M), np.int64)
    for m in range(M):
        _, idx = faiss.knn(np.ascontiguousarray(x[:, m * dsub:(m + 1) * dsub]), c[m], 1)
        out[:, m] = idx[:, 0]
    return out


def bench_point(n: int, d: int, dsub: int, nbits: int, runs: int) -> dict[str, Any]:
    from ..backend import gpu_status
    from ..codebook import Codebook

    x, c = make_problem(n, d, dsub, nbits)
    M = d // dsub
    cb = Codebook(d, M, nbits, c)
    pq = cb.to_faiss()
    row: dict[str, Any] = {"d": d, "dsub": dsub, "M": M, "nbits": nbits, "n": n}
    t_ours = timeit(lambda: cb.encode(x, backend="cpu"), runs=runs)
    t_cc = timeit(lambda: pq.compute_codes(x), runs=runs)
    t_knn = timeit(lambda: faiss_knn_route(x, c), runs=runs)
    row.update({"pqgpu_cpu": t_ours.rate(n), "faiss_compute_codes": t_cc.rate(n), "faiss_knn": t_knn.rate(n)})
    row["pqgpu_cpu_range"] = f"{n / t_ours.max:,.0f}-{n / t_ours.min:,.0f}"
    row["vs_compute_codes"] = row["pqgpu_cpu"] / row["faiss_compute_codes"]
    row["vs_best_faiss"] = row["pqgpu_cpu"] / max(row["faiss_compute_codes"], row["faiss_knn"])
    row["rows_equal_faiss"] = float((cb.encode(x, backend="cpu") == pq.compute_codes(x)).all(axis=1).mean())
    if gpu_status()[0]:
        from .. import kernels
        from ..backend import namespace, sync, to_device

        xp = namespace("gpu")
        xg = to_device(x, xp)
        cg = to_device(c, xp)
        prepared = kernels.prepare_centroids(cg)
        t_gpu = timeit(lambda: kernels.pack_codes(kernels.assign(xg, cg, prepared=prepared, block_bytes=1 << 30), nbits),
                       runs=runs, sync=sync)
        row["pqgpu_gpu_resident"] = t_gpu.rate(n)
        t_gpu_host = timeit(lambda: cb.encode(x, backend="gpu"), runs=runs, sync=sync)
        row["pqgpu_gpu_from_host"] = t_gpu_host.rate(n)
    return row


def run(quick: bool = False, n: int | None = None, runs: int | None = None, nbits: int = 8) -> dict[str, Any]:
    grid = QUICK_GRID if quick else FULL_GRID
    n = n or (20_000 if quick else 100_000)
    runs = runs or (3 if quick else 5)
    rows = []
    for d, dsub in grid:
        log.info("encode benchmark d=%d dsub=%d", d, dsub)
        rows.append(bench_point(n, d, dsub, nbits, runs))
    summary = {
        "geomean_vs_compute_codes": geomean([r["vs_compute_codes"] for r in rows]),
        "min_vs_best_faiss": min(r["vs_best_faiss"] for r in rows),
        "points_at_or_above_best_faiss": sum(r["vs_best_faiss"] >= 1 for r in rows),
        "points": len(rows),
    }
    return {"benchmark": "encode", "n": n, "runs": runs, "rows": rows, "summary": summary}


COLUMNS = ["d", "dsub", "M", "pqgpu_cpu", "pqgpu_cpu_range", "faiss_compute_codes", "faiss_knn", "vs_compute_codes",
           "vs_best_faiss", "rows_equal_faiss"]


def render(result: dict[str, Any]) -> str:
    cols = COLUMNS + [c for c in ("pqgpu_gpu_resident", "pqgpu_gpu_from_host") if c in result["rows"][0]]
    s = result["summary"]
    return (f"Encode throughput, vectors/s (n={result['n']}, nbits 8, median of {result['runs']} runs after a warm-up)\n\n"
            + markdown_table(result["rows"], cols)
            + f"\ngeometric mean vs compute_codes: {s['geomean_vs_compute_codes']:.2f}x; "
            f"points >= the faster faiss route: {s['points_at_or_above_best_faiss']}/{s['points']} "
            f"(worst ratio {s['min_vs_best_faiss']:.2f})\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int)
    p.add_argument("--runs", type=int)
    p.add_argument("--json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    env = environment()
    result = run(args.quick, args.n, args.runs)
    result["environment"] = env
    print(f"environment: {env}\n")
    print(render(result))
    if args.json:
        from . import write_json

        write_json(args.json, result)


if __name__ == "__main__":
    main()
