"""What exhaustive and IVF search both use to check arguments and to evaluate results: k checks, queries as
the metric sees them and scores back in its sense, the exact
k-NN of a few queries over streamed base vectors, recall@k, the reconstruction pass and the result table.

Below pqgpu.search and pqgpu.ivf_search (both import it; it imports neither), so data flows one way:
store -> ivf_search -> search -> cli. Compute functions take arrays and iterators, never paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Callable

import numpy as np

from .codebook import as_float32_matrix
from .errors import ConfigError, InputError
from .metric import normalize_rows


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k: expected a positive integer. Got {k!r} instead.")
    return int(k)


def prepare_queries(queries: Any, codebook: Any) -> np.ndarray:
    """Validated float32 queries (nq, d) as the codes see them: normalised under cosine (an all-zero query is an
    InputError naming it), then rotated."""
    q = as_float32_matrix(queries, "queries", d=codebook.d)
    if codebook.metric == "cosine":
        q = normalize_rows(q, "queries")
    return codebook.rotate(q)


def to_metric(d: np.ndarray, metric: str) -> np.ndarray:
    """Scan distances back in the metric's sense: as they are for l2, negated (similarities) for ip / cosine;
    a missing result (row -1) then scores -FLT_MAX, as in faiss."""
    return d if metric == "l2" else -d


class ExactKnn:
    """Exact k-NN of a few queries over base vectors streamed in blocks (host, float32 BLAS): squared L2, or
    for metric ip / cosine the largest inner products (cosine: queries normalised here; the base blocks must
    arrive normalised, as reconstruction_pass gives them)."""

    def __init__(self, queries: np.ndarray, k: int, block_rows: int = 16384, metric: str = "l2"):
        if metric == "cosine":
            queries = normalize_rows(queries, "queries")
        self.metric = metric
        self.q = queries
        self.qnorm = (queries.astype(np.float64) ** 2).sum(1).astype(np.float32)
        self.k = k
        self.block_rows = block_rows
        self.d = np.full((queries.shape[0], k), np.inf, np.float32)
        self.rows = np.full((queries.shape[0], k), -1, np.int64)

    def add(self, start: int, x: np.ndarray) -> None:
        for b0 in range(0, x.shape[0], self.block_rows):
            xb = x[b0:b0 + self.block_rows]
            if self.metric == "l2":
                dist = self.qnorm[:, None] - 2 * (self.q @ xb.T) + (xb * xb).sum(1)[None, :]
            else:  # largest inner product first: the smallest negated one
                dist = -(self.q @ xb.T)
            kk = min(self.k, xb.shape[0])
            part = np.argpartition(dist, kk - 1, axis=1)[:, :kk]
            cand_d = np.concatenate([self.d, np.take_along_axis(dist, part, axis=1)], axis=1)
            cand_r = np.concatenate([self.rows, part + (start + b0)], axis=1)
            order = np.lexsort((cand_r, cand_d), axis=-1)[:, :self.k]
            self.d = np.take_along_axis(cand_d, order, axis=1)
            self.rows = np.take_along_axis(cand_r, order, axis=1)


def recall_metrics(found: np.ndarray, ground_truth: np.ndarray, ks: Iterable[int]) -> dict[str, float]:
    """Recall of found rows (nq, >= max k) against exact neighbour rows (nq, >= max k), both best first.

    "1-recall@k": fraction of queries whose exact nearest neighbour is among the first k results (faiss R@k).
    "k-recall@k": mean |first k results ∩ exact top k| / k (for k=1 both are the same number).
    Rows equal to -1 (fewer than k rows in the store) never count as found.
    """
    out: dict[str, float] = {}
    nn = ground_truth[:, :1]
    for k in ks:
        top = found[:, :k]
        out[f"1-recall@{k}"] = float(((top == nn) & (nn >= 0)).any(axis=1).mean())
        if k > 1:
            gt = ground_truth[:, :k]
            hits = np.array([len(np.intersect1d(t[t >= 0], g[g >= 0])) for t, g in zip(top, gt)])
            out[f"{k}-recall@{k}"] = float(hits.mean() / k)
    return out


def check_ks(ks: Any) -> tuple[int, ...]:
    try:
        out = tuple(sorted({check_k(k) for k in ks}))
    except TypeError:
        raise ConfigError(f"ks: expected positive integers such as (1, 10, 100). Got {ks!r} instead.") from None
    if not out:
        raise ConfigError("ks: expected at least one k, such as (1, 10, 100).")
    return out


def check_ground_truth(gt: Any, nq: int, kmax: int, n: int) -> np.ndarray:
    gt = np.asarray(gt)
    if gt.ndim == 1:
        gt = gt[:, None]
    if gt.ndim != 2 or gt.shape[0] != nq or gt.dtype.kind not in "iu":
        raise InputError(f"ground_truth: expected integer row indices of shape ({nq}, >= {kmax}). "
                         f"Got {gt.dtype} {gt.shape} instead.")
    if gt.shape[1] < min(kmax, n):
        raise InputError(f"ground_truth has {gt.shape[1]} neighbours per query but recall@{kmax} needs {kmax}. "
                         f"Pass ks up to {gt.shape[1]} (for example ks=(1, {gt.shape[1]})) or a deeper ground truth.")
    gt = gt.astype(np.int64)
    if gt.size and (gt.max() >= n or gt.min() < -1):
        raise InputError(f"ground_truth holds row indices outside 0..{n - 1} (min {gt.min()}, max {gt.max()}). "
                         "It must index store rows (source row order), not ids.")
    return gt


def evaluation_inputs(store: Any, queries: Any, ks: Iterable[int], ground_truth: Any,
                      base_chunks: Any) -> tuple[Any, int, np.ndarray, tuple[int, ...], np.ndarray | None]:
    """(codebook, n, float32 queries, sorted ks, checked ground truth or None) for evaluating `store`;
    InputError when there is neither ground truth nor base vectors to find the exact neighbours."""
    cb = store.codebook()
    n = store.n
    q = as_float32_matrix(queries, "queries", d=cb.d)
    ks = check_ks(ks)
    if ground_truth is None and base_chunks is None:
        raise InputError("evaluate needs the exact neighbours: pass ground_truth (row indices, e.g. "
                         "--ground-truth GT.npy) or the base vectors (base_chunks, the source) to compute them.")
    gt = check_ground_truth(ground_truth, q.shape[0], ks[-1], n) if ground_truth is not None else None
    return cb, n, q, ks, gt


def reconstruction_pass(base_chunks: Any, n: int, d: int, decode_rows: Callable[[int, int], np.ndarray],
                        knn: "ExactKnn | None", metric: str = "l2") -> tuple[float, float, np.ndarray | None]:
    """One pass over the base vectors (the encoded source rows, in store order): (MSE, relative MSE) of
    decode_rows(lo, hi) (float32 reconstructions of store rows lo..hi) against them, and, when knn is given,
    the exact neighbours it gathers on the way (else None). metric cosine: the base rows are normalised
    first, as they were encoded."""
    err = sq_norm = 0.0
    pos = 0
    for block in base_chunks:
        x = as_float32_matrix(block, "base vectors", d=d, row_offset=pos)
        if metric == "cosine":
            x = normalize_rows(x, "base vectors", row_offset=pos)
        rows = x.shape[0]
        if pos + rows > n:
            raise InputError(f"base_chunks hold more than the store's {n} rows (at least {pos + rows}); "
                             "they must be exactly the encoded source rows, in store order.")
        recon = decode_rows(pos, pos + rows)
        err += float(((recon.astype(np.float64) - x) ** 2).sum())
        sq_norm += float((x.astype(np.float64) ** 2).sum())
        if knn is not None:
            knn.add(pos, x)
        pos += rows
    if pos != n:
        raise InputError(f"base_chunks hold {pos} rows but the store has {n}; they must be exactly the "
                         "encoded source rows, in store order.")
    return (err / n if n else 0.0), (err / sq_norm if sq_norm > 0 else 0.0), (knn.rows if knn else None)


_DESCRIPTIONS = {
    "compression_ratio": "float32 bytes / code bytes",
    "mse": "mean ||x - decode(code)||^2 per vector",
    "relative_mse": "sum ||x - decode||^2 / sum ||x||^2",
}


def format_table(result: dict[str, Any]) -> str:
    """A small aligned text table of an evaluate() result (metric, value, meaning)."""
    lines = []
    for key, value in result.items():
        if value is None:
            text = "n/a"
        elif isinstance(value, float):
            text = f"{value:.4f}" if "recall" in key else f"{value:.6g}"
        else:
            text = str(value)
        if key.startswith("1-recall@"):
            note = "exact nearest neighbour found in the top " + key.split("@")[1]
        elif "-recall@" in key:
            note = "overlap of the top " + key.split("@")[1] + " with the exact top " + key.split("@")[1]
        else:
            note = _DESCRIPTIONS.get(key, "")
        lines.append((key, text, note))
    w0 = max(len(a) for a, _, _ in lines)
    w1 = max(len(b) for _, b, _ in lines)
    return os.linesep.join(f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in lines)
