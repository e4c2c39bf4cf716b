"""Batched k-means: all M sub-quantizers trained at once, faiss-like (random init, empty-cluster splits).

One seam decides where the heavy work runs (as faiss's DatasetAssign / DatasetAssignGPU): the array-API
engine runs on any namespace (NumPy, CuPy, array_api_strict); the NumPy engine swaps in fused numba
kernels for assignment and accumulation when they are available. Centroid bookkeeping is tiny
(M x ksub x dsub) and happens on the host.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from . import kernels, progress
from .backend import to_device, to_host

log = logging.getLogger(__name__)

# faiss ClusteringParameters.max_points_per_centroid: larger samples are subsampled, as faiss does.
MAX_POINTS_PER_CENTROID = 256
SPLIT_EPS = 1.0 / 1024.0


class ArrayEngine:
    """Assignment and accumulation with array-API kernels, on whatever namespace x lives in."""

    def __init__(self, block_bytes: int = kernels.DEFAULT_BLOCK_BYTES):
        self.block_bytes = block_bytes

    def assign(self, x: Any, centroids: np.ndarray) -> Any:
        xp = array_namespace(x)
        return kernels.assign(x, to_device(centroids, xp), block_bytes=self.block_bytes)

    def accumulate(self, x: Any, codes: Any, ksub: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-cluster sums (M, ksub, dsub) float64 and counts (M, ksub) int64, via one-hot matmuls."""
        xp = array_namespace(x, codes)
        n, d = x.shape
        M = codes.shape[1]
        dsub = d // M
        step = kernels.rows_per_block(M, ksub, self.block_bytes)
        sums = np.zeros((M, ksub, dsub), np.float64)
        counts = np.zeros((M, ksub), np.int64)
        ks = xp.arange(ksub, dtype=codes.dtype)
        for start in range(0, n, step):
            stop = min(start + step, n)
            cb = codes[start:stop, :]
            xb = x[start:stop, :]
            b = xb.shape[0]
            onehot = xp.astype(xp.permute_dims(cb, (1, 0))[:, :, None] == ks, xp.float32)  # (M, b, ksub)
            xs = xp.permute_dims(xp.reshape(xb, (b, M, dsub)), (1, 0, 2))  # (M, b, dsub)
            sums += to_host(xp.matmul(xp.permute_dims(onehot, (0, 2, 1)), xs))
            counts += to_host(xp.sum(onehot, axis=1)).astype(np.int64)
        return sums, counts


class NumpyEngine(ArrayEngine):
    """NumPy inputs; uses the fused numba kernels (pqgpu._cpu) when numba is installed."""

    def __init__(self, block_bytes: int = kernels.DEFAULT_BLOCK_BYTES):
        super().__init__(block_bytes)
        from . import _cpu

        self._cpu = _cpu

    def assign(self, x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        return self._cpu.assign(x, self._cpu.prepare(centroids))

    def accumulate(self, x: np.ndarray, codes: np.ndarray, ksub: int) -> tuple[np.ndarray, np.ndarray]:
        sums, counts = self._cpu.accumulate(x, codes, ksub)
        return np.asarray(sums, np.float64), np.asarray(counts, np.int64)


class InnerProductEngine(ArrayEngine):
    """Assignment to the largest inner product (faiss IndexFlatIP, for spherical k-means), any namespace;
    centroids (1, k, d): one "sub-quantizer" spanning all of d, as the coarse k-means of IVF trains it."""

    def assign(self, x: Any, centroids: np.ndarray) -> Any:
        xp = array_namespace(x)
        idx = kernels.assign_ip(x, to_device(np.ascontiguousarray(centroids[0]), xp), block_bytes=self.block_bytes)
        return xp.reshape(idx, (idx.shape[0], 1))


def renormalize(centroids: np.ndarray) -> np.ndarray:
    """Every centroid (M, ksub, dsub) scaled to unit L2 norm in place (zero ones left alone), as faiss's
    fvec_renorm_L2 in Clustering::post_process_centroids for spherical k-means."""
    norm2 = np.einsum("mkt,mkt->mk", centroids, centroids, dtype=np.float32)
    scale = np.where(norm2 > 0, 1.0 / np.sqrt(np.maximum(norm2, np.finfo(np.float32).tiny)), 1.0)
    centroids *= scale.astype(np.float32)[:, :, None]
    return centroids


def default_engine(x: Any) -> ArrayEngine:
    if isinstance(x, np.ndarray):
        try:
            return NumpyEngine()
        except ImportError:
            log.info("numba kernels unavailable (pqgpu._cpu did not import): k-means runs on the array-API kernels (slower)")
    return ArrayEngine()


def split_empty_clusters(centroids: np.ndarray, counts: np.ndarray, n: int, rng: np.random.Generator) -> int:
    """faiss's remedy for empty clusters, in place: copy a large cluster's centroid (picked with probability
    proportional to its size - 1) and push the two copies apart by a relative 1/1024. Returns #splits."""
    M, ksub, _ = centroids.shape
    nsplit = 0
    for m in range(M):
        empty = np.flatnonzero(counts[m] == 0)
        for ci in empty:
            weight = np.maximum(counts[m] - 1, 0).astype(np.float64)
            if weight.sum() <= 0:
                break
            cj = int(rng.choice(ksub, p=weight / weight.sum()))
            c = centroids[m, cj].copy()
            sign = np.where(np.arange(c.shape[0]) % 2 == 0, 1.0, -1.0).astype(np.float32)
            centroids[m, ci] = c * (1 + sign * SPLIT_EPS)
            centroids[m, cj] = c * (1 - sign * SPLIT_EPS)
            counts[m, ci] = counts[m, cj] // 2
            counts[m, cj] -= counts[m, ci]
            nsplit += 1
    return nsplit


def _take_rows(x: Any, rows: np.ndarray) -> Any:
    if isinstance(x, np.ndarray):
        return x[rows]
    xp = array_namespace(x)
    return xp.take(x, to_device(rows.astype(np.int64), xp), axis=0)


def train_subquantizers(x: Any, M: int, ksub: int, *, niter: int = 25, seed: int = 1234,
                        engine: ArrayEngine | None = None, spherical: bool = False) -> np.ndarray:
    """Train M k-means of ksub centroids on the dsub-wide column groups of x.

    spherical: centroids renormalised to unit norm after the initial draw and after every iteration
    (faiss ClusteringParameters.spherical; pair it with InnerProductEngine, as faiss's IndexIVF does).

    x: (n, d) float32 in any array namespace, n >= ksub. Returns centroids float32 (M, ksub, dsub) on the host.
    Deterministic for a given seed and input.
    """
    n, d = x.shape
    dsub = d // M
    rng = np.random.default_rng(seed)
    max_points = MAX_POINTS_PER_CENTROID * ksub
    if n > max_points:
        log.info("k-means: sampling %d of %d training rows (%d per centroid, as faiss)", max_points, n,
                 MAX_POINTS_PER_CENTROID)
        x = _take_rows(x, np.sort(rng.choice(n, max_points, replace=False)))
        n = max_points
    engine = engine or default_engine(x)
    host_init = to_host(_take_rows(x, rng.permutation(n)[:ksub]))  # faiss: k distinct random rows
    centroids = np.ascontiguousarray(
        host_init.reshape(ksub, M, dsub).transpose(1, 0, 2), dtype=np.float32)
    if spherical:
        renormalize(centroids)
    t0 = time.perf_counter()
    for it in range(niter):
        codes = engine.assign(x, centroids)
        sums, counts = engine.accumulate(x, codes, ksub)
        filled = counts > 0
        centroids = np.where(filled[:, :, None], sums / np.maximum(counts, 1)[:, :, None],
                             centroids).astype(np.float32)
        nsplit = split_empty_clusters(centroids, counts, n, rng)
        if nsplit:
            log.debug("k-means iteration %d: split %d empty clusters", it, nsplit)
        if spherical:
            renormalize(centroids)
        progress.report("k-means", it + 1, niter)
    log.info("k-means: M=%d ksub=%d dsub=%d n=%d niter=%d in %.2f s", M, ksub, dsub, n, niter,
             time.perf_counter() - t0)
    return centroids


def train_split(x: np.ndarray, M: int, ksub: int, groups: int, train_group: Any) -> np.ndarray:
    """Train the M sub-quantizers as `groups` independent contiguous groups of subspaces (one per GPU):
    `train_group(i, x_cols, M_i) -> (M_i, ksub, dsub)` runs group i, possibly in parallel; results are
    stacked in subspace order. Every group sees the same seed, so with the same rows the result equals
    training all M at once (empty-cluster splits aside)."""
    from concurrent.futures import ThreadPoolExecutor

    dsub = x.shape[1] // M
    bounds = np.linspace(0, M, min(groups, M) + 1).astype(int)
    parts = [(i, int(a), int(b)) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    with ThreadPoolExecutor(max_workers=len(parts)) as pool:
        futures = [pool.submit(train_group, i, np.ascontiguousarray(x[:, a * dsub:b * dsub]), b - a)
                   for i, a, b in parts]
        return np.concatenate([f.result() for f in futures], axis=0)
