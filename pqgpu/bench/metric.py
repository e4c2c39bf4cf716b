"""Inner-product and cosine benchmark: recall@10 and queries/s of pqgpu against faiss IndexPQ / IndexIVFPQ with
METRIC_INNER_PRODUCT, same M, nbits, nlist and nprobe, on the same vectors in the same run.

pqgpu builds through the store as `pqgpu run` does (quantizer.metric ip / cosine) and searches it (flat:
`search_store`; IVF: an `IvfIndex` opened once); faiss trains on a sample of the same size (cosine: the rows
normalised, as faiss users do with "L2norm"), adds every row and searches. Recall is against the exact
top-10 in the metric (float64). The vectors are scaled by random factors (log-uniform over x1/4..x4) so that
inner-product, cosine and L2 rankings differ. Timings: best of --runs search calls after a warm-up, taking
turns, with the same number of CPU threads for both.

    python -m pqgpu.bench.metric [--quick] [--data X.npy] [--n N --d D --M M --nbits B --nlist L --nprobe P]

Writes DIR/metric.json and DIR/metric.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import environment, markdown_table

log = logging.getLogger(__name__)


def make_vectors(n: int, d: int, seed: int, intrinsic: int = 16) -> np.ndarray:
    """Low-intrinsic-dimension rows (tanh of a Gaussian through a fixed basis, plus noise), norms varied."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(12345).standard_normal((intrinsic, d))
    z = rng.standard_normal((n, intrinsic))
    x = np.tanh(z) @ basis + 0.3 * np.sin(z @ basis) + 0.05 * rng.standard_normal((n, d))
    return vary_norms(x.astype(np.float32), seed)


def vary_norms(x: np.ndarray, seed: int) -> np.ndarray:
    scale = np.exp(np.random.default_rng(seed + 1).uniform(np.log(0.25), np.log(4.0), (x.shape[0], 1)))
    return (x * scale).astype(np.float32)


def exact_top(x: np.ndarray, q: np.ndarray, metric: str, k: int = 10) -> np.ndarray:
    """Rows of the exact top-k by the metric (float64, ties to the lower row), in blocks of x."""
    from ..metric import exact_scores

    best_s = np.full((q.shape[0], 0), -np.inf)
    best_r = np.zeros((q.shape[0], 0), np.int64)
    for s in range(0, x.shape[0], 32768):
        sc = exact_scores(q, x[s:s + 32768], metric)
        cand_s = np.concatenate([best_s, sc], axis=1)
        cand_r = np.concatenate([best_r, np.broadcast_to(np.arange(s, s + sc.shape[1]), sc.shape)], axis=1)
        order = np.lexsort((cand_r, -cand_s), axis=-1)[:, :k]
        best_s, best_r = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_r, order, 1)
    return best_r


def recall10(found: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    from ..evaluation import recall_metrics

    return recall_metrics(found, gt, (10,))


def best_rate(fn: Any, nq: int, runs: int) -> float:
    fn()  # warm-up (kernel compile, first touch)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nq / best


def faiss_index(metric: str, d: int, M: int, nbits: int, nlist: int, train: np.ndarray, x: np.ndarray,
                niter: int) -> Any:
    import faiss

    if nlist:
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, M, nbits, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = niter
    else:
        index = faiss.IndexPQ(d, M, nbits, faiss.METRIC_INNER_PRODUCT)
    index.pq.cp.niter = niter
    index.train(train)
    index.add(x)
    return index


def run(quick: bool = False, *, data: str | None = None, n: int | None = None, d: int | None = None,
        M: int | None = None, nbits: int = 8, nlist: int | None = None, nprobe: int = 16, nq: int | None = None,
        train_size: int | None = None, niter: int = 10, runs: int = 3, threads: int | None = None,
        seed: int = 0, metrics: tuple[str, ...] = ("ip", "cosine")) -> dict[str, Any]:
    import faiss

    from ..config import config_from_dict
    from ..ivf_search import IvfIndex
    from ..pipeline import run as pqgpu_run
    from ..search import search_store
    from ..store import open_store
    from .ivf import numba_threads, set_numba_threads

    if data:
        x_all = vary_norms(np.load(data).astype(np.float32), seed)
        d = x_all.shape[1]
    n = n or (20_000 if quick else 100_000)
    d = d or (64 if quick else 128)
    M = M or (16 if quick else 32)
    nlist = nlist if nlist is not None else (64 if quick else 256)
    nq = nq or (200 if quick else 1000)
    train_size = train_size or min(n, 40_000 if quick else 100_000)
    if not data:
        x_all = make_vectors(n + nq, d, seed)
    x, q = np.ascontiguousarray(x_all[:n]), np.ascontiguousarray(x_all[n:n + nq])
    threads = threads or numba_threads() or 1
    set_numba_threads(threads)
    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(seed + 7)
    train_rows = np.sort(rng.choice(n, train_size, replace=False))
    rows = []
    with tempfile.TemporaryDirectory(prefix="pqgpu-bench-metric-") as tmp:
        src = Path(tmp) / "data"
        src.mkdir()
        for i, part in enumerate(np.array_split(x, 4)):
            np.save(src / f"part-{i}.npy", part)
        for metric in metrics:
            gt = exact_top(x, q, metric)
            seen = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x
            qs = q / np.linalg.norm(q, axis=1, keepdims=True) if metric == "cosine" else q
            for lists in (0, nlist):
                kind = f"IVF{lists},PQ{M}x{nbits}" if lists else f"PQ{M}x{nbits}"
                out = Path(tmp) / f"{metric}-{lists}"
                cfg = config_from_dict({
                    "source": {"format": "npy", "path": str(src)},
                    "quantizer": {"path": str(out / "pq.faiss"), "M": M, "nbits": nbits, "metric": metric,
                                  "nlist": lists, "train_size": train_size, "niter": niter, "seed": seed},
                    "encode": {"output": str(out / "codes.zarr"), "backend": "cpu"}})
                t0 = time.perf_counter()
                pqgpu_run(cfg)
                build = time.perf_counter() - t0
                store = open_store(cfg.encode.output)
                t0 = time.perf_counter()
                index = faiss_index(metric, d, M, nbits, lists, np.ascontiguousarray(seen[train_rows]),
                                    np.ascontiguousarray(seen), niter)
                faiss_build = time.perf_counter() - t0
                if lists:
                    ivf = IvfIndex(store)
                    index.nprobe = nprobe

                    def ours() -> Any:
                        return ivf.search(q, 10, nprobe=nprobe, backend="cpu")
                else:
                    def ours() -> Any:
                        return search_store(store, q, 10, backend="cpu")

                def theirs() -> Any:
                    return index.search(qs, 10)

                found = ours()[1]
                ref = theirs()[1]
                ours_qps = best_rate(ours, nq, runs)
                theirs_qps = best_rate(theirs, nq, runs)
                r_ours, r_faiss = recall10(found, gt), recall10(ref, gt)
                rows.append({
                    "metric": metric, "index": kind, "nprobe": nprobe if lists else None, "n": n, "d": d, "nq": nq,
                    "recall10_pqgpu": round(r_ours["10-recall@10"], 4),
                    "recall10_faiss": round(r_faiss["10-recall@10"], 4),
                    "1-recall10_pqgpu": round(r_ours["1-recall@10"], 4),
                    "1-recall10_faiss": round(r_faiss["1-recall@10"], 4),
                    "qps_pqgpu": round(ours_qps, 1), "qps_faiss": round(theirs_qps, 1),
                    "qps_ratio": round(ours_qps / theirs_qps, 3),
                    "build_s_pqgpu": round(build, 2), "build_s_faiss": round(faiss_build, 2),
                })
                log.info("metric bench: %s", rows[-1])
    return {"benchmark": "metric", "threads": threads, "train_size": train_size, "niter": niter,
            "data": data or "synthetic (low intrinsic dimension, norms x1/4..x4)", "rows": rows}


def report_markdown(result: dict[str, Any]) -> str:
    head = (f"## Inner product and cosine vs faiss METRIC_INNER_PRODUCT\n\nData: {result['data']}; "
            f"{result['threads']} thread(s) each; train_size {result['train_size']}, niter {result['niter']}. "
            "recall10 = 10-recall@10 against the exact top 10 in the metric; qps = queries/s (best of the "
            "timed calls).\n")
    keep = ("metric", "index", "nprobe", "n", "d", "recall10_pqgpu", "recall10_faiss", "qps_pqgpu", "qps_faiss",
            "qps_ratio", "build_s_pqgpu", "build_s_faiss")
    return head + "\n" + markdown_table([{k: r[k] for k in keep} for r in result["rows"]]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data", help="(n, d) float .npy of real embeddings (norms are then varied)")
    for name in ("n", "d", "M", "nbits", "nlist", "nprobe", "nq", "train-size", "niter", "runs", "threads"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--out", default="bench-report")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    opts = {k: v for k, v in {"n": a.n, "d": a.d, "M": a.M, "nbits": a.nbits, "nlist": a.nlist, "nprobe": a.nprobe,
                              "nq": a.nq, "train_size": a.train_size, "niter": a.niter, "runs": a.runs,
                              "threads": a.threads}.items() if v is not None}
    result = run(a.quick, data=a.data, **opts)
    result["environment"] = environment()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metric.json").write_text(json.dumps(result, indent=2, default=str))
    md = report_markdown(result)
    (out / "metric.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
