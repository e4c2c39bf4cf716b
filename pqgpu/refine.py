"""Re-ranking ADC candidates with the original vectors read back from the source (like faiss IndexRefineFlat,
with the vectors on disk instead of in RAM).

A search with refine R takes the top k*R candidates by ADC, reads their vectors from the source the store was
encoded from (pqgpu.sources: only the rows, row groups or chunks that hold them), scores them exactly in the
store's metric and keeps the best k. `exact_rerank` is array-API code (NumPy, CuPy, array_api_strict); the
rest is host bookkeeping. Below pqgpu.search and pqgpu.ivf_search: it imports neither.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from .backend import namespace, resolve_backend, to_device, to_host
from .errors import ConfigError

log = logging.getLogger(__name__)

METRICS = ("l2", "ip", "cosine")
# Score of a missing result (fewer than k candidates): as faiss, FLT_MAX for L2 and -FLT_MAX for similarities.
FLT_MAX = float(np.finfo(np.float32).max)
# Budget for the gathered (queries, k*R, d) float32 candidate vectors of one re-rank batch; the L2 re-rank holds
# about three such blocks at once (the gather, the difference, its square).
RERANK_BYTES = 16 << 20


def check_refine(refine: Any) -> int | None:
    """None (no re-ranking) or a positive integer R."""
    if refine is None:
        return None
    if isinstance(refine, bool) or not isinstance(refine, (int, np.integer)) or refine < 1:
        raise ConfigError(f"--refine: expected a positive integer R (re-rank the top k*R ADC candidates with the "
                          f"original vectors; 1 re-ranks just the top k). Got {refine!r} instead.")
    return int(refine)


def store_metric(store: Any) -> str:
    metric = str(store.attrs.get("metric", "l2"))
    if metric not in METRICS:
        raise ConfigError(f"Store {store.path} records metric {metric!r}; expected one of {', '.join(METRICS)}.")
    return metric


def missing_score(metric: str) -> float:
    return FLT_MAX if metric == "l2" else -FLT_MAX


def exact_rerank(queries: Any, candidates: Any, metric: str, valid: Any = None) -> tuple[Any, Any]:
    """Exact scores of candidates, best first.

    queries (nq, d) and candidates (nq, C, d) float32 on one array namespace; valid (nq, C) bool marks real
    candidates (None: all). l2: squared distance, smallest first; ip: dot product, largest first; cosine: dot
    product of the L2-normalised vectors, largest first. Equal scores keep the candidates' order (pass them
    sorted by row for ties to the lower row); invalid ones go last with score missing_score(metric).
    Returns scores float32 (nq, C) and order int64 (nq, C), indices into the candidate axis.
    """
    xp = array_namespace(queries, candidates)
    q = queries[:, None, :]
    if metric == "l2":
        diff = candidates - q
        key = xp.sum(diff * diff, axis=2)
    elif metric in ("ip", "cosine"):
        if metric == "cosine":
            q = q / _norm(q, xp)
            candidates = candidates / _norm(candidates, xp)
        key = -xp.sum(candidates * q, axis=2)  # ascending key = descending similarity
    else:
        raise ConfigError(f"metric: expected one of {', '.join(METRICS)}. Got {metric!r} instead.")
    if valid is not None:
        key = xp.where(valid, key, xp.asarray(float("inf"), dtype=key.dtype))
    order = xp.argsort(key, axis=1, stable=True)
    key = xp.take_along_axis(key, order, axis=1)
    scores = key if metric == "l2" else -key
    missing = xp.asarray(missing_score(metric), dtype=scores.dtype)
    scores = xp.where(xp.isinf(scores), missing, scores)
    return scores, xp.astype(order, xp.int64)


def _norm(x: Any, xp: Any) -> Any:
    n = xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))
    return xp.where(n > 0, n, xp.ones_like(n))  # a zero vector stays zero (score 0) instead of NaN


def refine_rows(source: Any, queries: np.ndarray, cand_rows: np.ndarray, k: int, metric: str, *,
                backend: str = "cpu") -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Re-rank candidate store rows (nq, C) int64 (-1: none) of queries (nq, d) float32 (not rotated) with
    their vectors from `source` (a pqgpu.sources.Source whose row i is store row i) and keep the best k.

    Returns scores float32 (nq, k) in the metric's sense, rows int64 (nq, k) (-1 where fewer than k
    candidates), and what was read from the source. Ties go to the lower row."""
    nq, C = cand_rows.shape
    # by row within each query (missing last), so the stable re-rank breaks ties to the lower row
    by_row = np.sort(np.where(cand_rows >= 0, cand_rows, np.iinfo(np.int64).max), axis=1)
    valid = by_row != np.iinfo(np.int64).max
    by_row = np.where(valid, by_row, -1)
    uniq, vectors, stats = source.take_rows(by_row[valid])
    pos = np.searchsorted(uniq, np.where(valid, by_row, uniq[0] if uniq.size else 0))
    xp = namespace("gpu") if resolve_backend(backend) == "gpu" else None  # the re-rank on the GPU too
    d = vectors.shape[1]
    batch = max(1, RERANK_BYTES // max(1, C * d * 4))
    out_s = np.full((nq, k), missing_score(metric), np.float32)
    out_r = np.full((nq, k), -1, np.int64)
    q32 = np.ascontiguousarray(queries, dtype=np.float32)
    if uniq.size:
        for b0 in range(0, nq, batch):
            b1 = min(nq, b0 + batch)
            cand = vectors[pos[b0:b1]]  # (b, C, d)
            qb, vb = q32[b0:b1], valid[b0:b1]
            if xp is not None:
                qb, cand, vb = to_device(qb, xp), to_device(cand, xp), to_device(vb, xp)
            scores, order = exact_rerank(qb, cand, metric, vb)
            scores, order = to_host(scores[:, :k]), to_host(order[:, :k])
            kk = order.shape[1]
            out_s[b0:b1, :kk] = scores
            out_r[b0:b1, :kk] = np.where(np.take_along_axis(valid[b0:b1], order, axis=1),
                                         np.take_along_axis(by_row[b0:b1], order, axis=1), -1)
    log.info("refine: %d queries x %d candidates re-ranked (%s): read %d rows from %d file(s)%s, %.1f MiB in %.3f s",
             nq, C, metric, stats["rows"], stats["files"],
             "".join(f", {stats[u]} {u.replace('_', ' ')}" for u in ("row_groups", "chunks") if u in stats),
             stats.get("bytes", 0) / 2**20, stats["seconds"])
    return out_s, out_r, stats


def refine_summary(R: int, read: dict[str, Any]) -> dict[str, Any]:
    """The refine entries of an evaluate() result."""
    out: dict[str, Any] = {"refine": R, "refine_rows_read": read.get("rows", 0)}
    for unit in ("row_groups", "chunks"):
        if unit in read:
            out[f"refine_{unit}_read"] = read[unit]
    out["refine_bytes_read"] = read.get("bytes", 0)
    out["refine_read_seconds"] = round(read.get("seconds", 0.0), 4)
    return out
