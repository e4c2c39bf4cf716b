"""OPQ: a learned orthogonal rotation applied before PQ (Ge et al. 2013), trained like faiss.

Training follows faiss's `OPQMatrix::train`: centre the sample, start from a random orthogonal matrix, then alternate
(a) a few PQ k-means iterations on the rotated sample (warm-started from the previous round's centroids)
and (b) the orthogonal Procrustes update A = U V^T from the SVD of recons^T x. The final PQ is trained
from scratch on the rotated training set with the full `niter`, as faiss's IndexPreTransform does.
The result is a `Codebook` with a rotation; its file format (``<quantizer>.opq``) lives in codebook.py.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from . import kernels
from .backend import namespace, resolve_backend, to_device, to_host
from .codebook import Codebook, as_float32_matrix, check_params, normalize_training
from .errors import ConfigError, InputError
from .kmeans import default_engine, split_empty_clusters, train_subquantizers
from .metric import check_metric

log = logging.getLogger(__name__)

# faiss OPQMatrix defaults (VectorTransform.h): niter, niter_pq, niter_pq_0, max_train_points.
OPQ_ITER = 50
NITER_PQ = 4
NITER_PQ_0 = 40
MAX_TRAIN_POINTS = 256 * 256
# faiss trains the inner PQ of OPQMatrix with 8 bits whatever the final nbits (pq_default(d, M, 8)).
# We use min(nbits, 8): the same as faiss for nbits >= 8, and the real objective for smaller codes.
MAX_INNER_NBITS = 8

# -- training -------------------------------------------------------------------------------------------

def random_rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal (d, d) float32 matrix (QR of a Gaussian matrix, as faiss's OPQ init)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    # Fix the signs so the result is Haar-distributed and deterministic across LAPACKs.
    return (q * np.sign(np.diag(r))).astype(np.float32)


def procrustes(recons: Any, x: Any) -> Any:
    """Orthogonal A minimising ||x A^T - recons||_F: A = U V^T with U S V^T = svd(recons^T x). (d, d)."""
    xp = array_namespace(recons, x)
    u, _s, vt = xp.linalg.svd(xp.matmul(xp.permute_dims(recons, (1, 0)), x))
    return xp.matmul(u, vt)


def kmeans_warm(x: Any, centroids: np.ndarray, niter: int, engine: Any, rng: np.random.Generator) -> np.ndarray:
    """`niter` Lloyd iterations of all M sub-quantizers starting from `centroids` (faiss Train_hot_start)."""
    ksub = centroids.shape[1]
    n = x.shape[0]
    for _ in range(niter):
        codes = engine.assign(x, centroids)
        sums, counts = engine.accumulate(x, codes, ksub)
        centroids = np.where((counts > 0)[:, :, None], sums / np.maximum(counts, 1)[:, :, None],
                             centroids).astype(np.float32)
        split_empty_clusters(centroids, counts, n, rng)
    return centroids


def opq_rotation(x: Any, M: int, nbits: int, *, opq_iter: int = OPQ_ITER, niter_pq: int = NITER_PQ,
                 niter_pq_0: int = NITER_PQ_0, seed: int = 1234, engine: Any = None) -> np.ndarray:
    """Learn the OPQ rotation on x (n, d) float32 in any array namespace (NumPy, CuPy, array_api_strict).

    The caller has already subsampled x. Returns the host float32 (d, d) matrix A (apply as x @ A.T).
    """
    xp = array_namespace(x)
    n, d = x.shape
    ksub = 1 << nbits
    rng = np.random.default_rng(seed)
    # faiss centres the sample first: a rotation cannot absorb the mean, and an off-centre cloud would
    # skew the Procrustes fit towards the mean direction.
    x = x - xp.mean(x, axis=0)
    engine = engine or default_engine(x)
    a = to_device(random_rotation(d, rng), xp)
    centroids = None
    t0 = time.perf_counter()
    for it in range(opq_iter):
        xproj = xp.matmul(x, xp.permute_dims(a, (1, 0)))
        if centroids is None:
            centroids = train_subquantizers(xproj, M, ksub, niter=niter_pq_0, seed=seed + 1, engine=engine)
        else:
            centroids = kmeans_warm(xproj, centroids, niter_pq, engine, rng)
        codes = engine.assign(xproj, centroids)
        recons = kernels.decode(codes, to_device(centroids, xp))
        if log.isEnabledFor(logging.DEBUG):
            err = float(to_host(xp.sum((recons - xproj) ** 2))) / n
            log.debug("OPQ iteration %d: PQ reconstruction error %.6g", it, err)
        a = procrustes(recons, x)
    log.info("OPQ: d=%d M=%d nbits=%d n=%d, %d rounds in %.2f s", d, M, nbits, n, opq_iter,
             time.perf_counter() - t0)
    return np.ascontiguousarray(to_host(a), dtype=np.float32)


def train_opq(x: Any, M: int, nbits: int = 8, *, niter: int = 25, opq_iter: int = OPQ_ITER,
              niter_pq: int = NITER_PQ, niter_pq_0: int = NITER_PQ_0, max_train_points: int = MAX_TRAIN_POINTS,
              seed: int = 1234, backend: str = "auto", metric: str = "l2") -> Codebook:
    """Train OPQ + PQ on host x (n, d) float16/32/64. Returns a Codebook with `rotation` (d, d).
    metric (pqgpu.metric) is recorded; cosine normalises x first (OPQ and PQ stay L2, as in faiss).

    The rotation is learned on at most `max_train_points` rows (a seeded random subset, as faiss);
    the final PQ (`niter` iterations) on all of x rotated, subsampled by k-means as faiss does.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"training vectors: expected a 2-D array (rows, d). Got shape {x.shape} instead.")
    n, d = x.shape
    check_params(d, M, nbits)
    for name, value in (("niter", niter), ("opq_iter", opq_iter), ("niter_pq", niter_pq),
                        ("niter_pq_0", niter_pq_0), ("max_train_points", max_train_points)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name}: expected a positive integer. Got {value!r} instead.")
    inner_nbits = min(nbits, MAX_INNER_NBITS)
    need = 1 << nbits
    if n < need:
        raise InputError(f"OPQ training needs at least 2**nbits = {need} rows for nbits={nbits}; got {n}. "
                         f"Provide more rows (faiss recommends >= {39 * need}) or lower nbits.")
    check_metric(metric)
    x = as_float32_matrix(x, "training vectors")
    if metric == "cosine":
        x = normalize_training(x, resolve_backend(backend))
    rng = np.random.default_rng(seed)
    sample = x
    if n > max_train_points:
        log.info("OPQ: learning the rotation on %d of %d training rows (faiss max_train_points)",
                 max_train_points, n)
        sample = x[np.sort(rng.choice(n, max_train_points, replace=False))]
    if resolve_backend(backend) == "cpu":
        rotation = opq_rotation(sample, M, inner_nbits, opq_iter=opq_iter, niter_pq=niter_pq,
                                niter_pq_0=niter_pq_0, seed=seed)
        centroids = train_subquantizers(np.ascontiguousarray(x @ rotation.T), M, 1 << nbits, niter=niter,
                                        seed=seed)
    else:
        xp = namespace("gpu")
        rotation = opq_rotation(to_device(sample, xp), M, inner_nbits, opq_iter=opq_iter, niter_pq=niter_pq,
                                niter_pq_0=niter_pq_0, seed=seed)
        xr = xp.matmul(to_device(x, xp), xp.permute_dims(to_device(rotation, xp), (1, 0)))
        centroids = train_subquantizers(xr, M, 1 << nbits, niter=niter, seed=seed)
    return Codebook(d, M, nbits, centroids, rotation, metric)
