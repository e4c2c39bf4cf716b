"""Inner-product and cosine benchmark: recall@10 and queries/s of pqgpu against faiss IndexPQ / IndexIVFPQ with
METRIC_INNER_PRODUCT, same M, nbits, nlist and nprobe, on the same vectors in the same run.

pqgpu builds through the store as `pqgpu run` does (quantizer.metric ip / cosine) and searches it (flat:
`search_store`; IVF: an `IvfIndex` opened once); faiss trains on a sample of the same size (cosine: the rows
normalised, as faiss users do with "L2norm"), adds every row and searches. Recall is against the exact
top-10 in the metric (float64). The vectors are scaled by random factors (log-uniform over x1/4..x4) so that
inner-product, cosine and L2 rankings differ. Timings: best of --runs search calls after a warm-up, taking
turns, with the same number of CPU threads for both.

    python -m pqgpu.bench.metric [--quick] [--data X.npy] [--n N --d D --M M --nbits B --nlist L --nprobe P]
                                 [--metrics ip,cosine,l2]   (l2: the same rows with METRIC_L2, for reference)

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

    best_s = np.full((q.shape[0], 0), np.inf)
    best_r = np.zeros((q.shape[0], 0), np.int64)
    for s in range(0, x.shape[0], 32768):
        sc = exact_scores(q, x[s:s + 32768], metric)
        sc = sc if metric == "l2" else -sc  # smaller first
        cand_s = np.concatenate([best_s, sc], axis=1)
        cand_r = np.concatenate([best_r, np.broadcast_to(np.arange(s, s + sc.shape[1]), sc.shape)], axis=1)
        order = np.lexsort((cand_r, cand_s), axis=-1)[:, :k]
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
                niter: int, seed: int = 1234) -> Any:
    import faiss

    mt = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    if nlist:
        flat = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(flat, d, nlist, M, nbits, mt)
        index.referenced_objects = [flat]
        index.cp.niter = niter
        index.cp.seed = seed
    else:
        index = faiss.IndexPQ(d, M, nbits, mt)
    index.pq.cp.niter = niter
    index.pq.cp.seed = seed
    index.train(train)
    index.add(x)
    return index


def measure(out: Path, src: Path, metric: str, M: int, nbits: int, lists: int, nprobe: int, train_size: int,
            niter: int, seed: int, x: np.ndarray, seen: np.ndarray, q: np.ndarray, qs: np.ndarray, gt: np.ndarray,
            runs: int) -> dict[str, float]:
    """Build pqgpu's store (as `pqgpu run`) and faiss's index with training seed `seed`; recall@10 of both and,
    when runs > 0, queries/s (best of runs)."""
    from ..config import config_from_dict
    from ..ivf_search import IvfIndex
    from ..pipeline import run as pqgpu_run
    from ..search import search_store
    from ..store import open_store

    cfg = config_from_dict({
        "source": {"format": "npy", "path": str(src)},
        "quantizer": {"path": str(out / "pq.faiss"), "M": M, "nbits": nbits, "metric": metric, "nlist": lists,
                      "train_size": train_size, "niter": niter, "seed": seed},
        "encode": {"output": str(out / "codes.zarr"), "backend": "cpu"}})
    t0 = time.perf_counter()
    pqgpu_run(cfg)
    build = time.perf_counter() - t0
    store = open_store(cfg.encode.output)
    train_rows = np.sort(np.random.default_rng(seed + 7).choice(x.shape[0], train_size, replace=False))
    t0 = time.perf_counter()
    index = faiss_index(metric, x.shape[1], M, nbits, lists, np.ascontiguousarray(seen[train_rows]),
                        np.ascontiguousarray(seen), niter, seed)
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

    nq = q.shape[0]
    return {"recall_pqgpu": recall10(ours()[1], gt)["10-recall@10"],
            "recall_faiss": recall10(theirs()[1], gt)["10-recall@10"],
            "qps_pqgpu": best_rate(ours, nq, runs) if runs else float("nan"),
            "qps_faiss": best_rate(theirs, nq, runs) if runs else float("nan"),
            "build_pqgpu": build, "build_faiss": faiss_build}


def run(quick: bool = False, *, data: str | None = None, n: int | None = None, d: int | None = None,
        M: int | None = None, nbits: int = 8, nlist: int | None = None, nprobe: int = 16, nq: int | None = None,
        train_size: int | None = None, niter: int = 10, runs: int = 3, threads: int | None = None,
        seed: int = 0, seeds: int = 1, metrics: tuple[str, ...] = ("ip", "cosine")) -> dict[str, Any]:
    """seeds: train both sides with seeds seed..seed+seeds-1 (each with its own training sample) and report the
    mean recall and its range: one training's recall moves by ~0.02 with the seed at these sizes. queries/s
    and build times come from the first seed."""
    import faiss

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
                runs_of = [measure(Path(tmp) / f"{metric}-{lists}-{s}", src, metric, M, nbits, lists, nprobe,
                                   train_size, niter, seed + s, x, seen, q, qs, gt, runs if s == 0 else 0)
                           for s in range(seeds)]
                first = runs_of[0]
                ours = [r["recall_pqgpu"] for r in runs_of]
                theirs = [r["recall_faiss"] for r in runs_of]
                rows.append({
                    "metric": metric, "index": kind, "nprobe": nprobe if lists else None, "n": n, "d": d, "nq": nq,
                    "seeds": seeds, "recall10_pqgpu": round(float(np.mean(ours)), 4),
                    "recall10_faiss": round(float(np.mean(theirs)), 4),
                    "recall10_pqgpu_range": f"{min(ours):.4f}-{max(ours):.4f}",
                    "recall10_faiss_range": f"{min(theirs):.4f}-{max(theirs):.4f}",
                    "qps_pqgpu": round(first["qps_pqgpu"], 1), "qps_faiss": round(first["qps_faiss"], 1),
                    "qps_ratio": round(first["qps_pqgpu"] / first["qps_faiss"], 3),
                    "build_s_pqgpu": round(first["build_pqgpu"], 2), "build_s_faiss": round(first["build_faiss"], 2),
                })
                log.info("metric bench: %s", rows[-1])
    return {"benchmark": "metric", "threads": threads, "train_size": train_size, "niter": niter,
            "data": data or "synthetic (low intrinsic dimension, norms x1/4..x4)", "rows": rows}


def report_markdown(result: dict[str, Any]) -> str:
    head = (f"## Inner product and cosine vs faiss METRIC_INNER_PRODUCT\n\nData: {result['data']}; "
            f"{result['threads']} thread(s) each; train_size {result['train_size']}, niter {result['niter']}. "
            "recall10 = 10-recall@10 against the exact top 10 in the metric; qps = queries/s (best of the "
            "timed calls, first seed); recall is the mean over the training seeds (range beside it).\n")
    keep = ("metric", "index", "nprobe", "n", "d", "seeds", "recall10_pqgpu", "recall10_faiss",
            "recall10_pqgpu_range", "recall10_faiss_range", "qps_pqgpu", "qps_faiss", "qps_ratio", "build_s_pqgpu",
            "build_s_faiss")
    return head + "\n" + markdown_table([{k: r[k] for k in keep} for r in result["rows"]]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data", help="(n, d) float .npy of real embeddings (norms are then varied)")
    for name in ("n", "d", "M", "nbits", "nlist", "nprobe", "nq", "train-size", "niter", "runs", "threads", "seeds"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--metrics", default="ip,cosine", help="comma-separated; add l2 for a reference row")
    p.add_argument("--out", default="bench-report")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    opts = {k: v for k, v in {"n": a.n, "d": a.d, "M": a.M, "nbits": a.nbits, "nlist": a.nlist, "nprobe": a.nprobe,
                              "nq": a.nq, "train_size": a.train_size, "niter": a.niter, "runs": a.runs,
                              "threads": a.threads, "seeds": a.seeds}.items() if v is not None}
    result = run(a.quick, data=a.data, metrics=tuple(a.metrics.split(",")), **opts)
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
