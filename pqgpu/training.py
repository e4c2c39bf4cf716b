"""Training a Codebook: PQ sub-quantizers by batched k-means (CPU, or split over the GPUs), or OPQ + PQ.

`train` is the public entry (``pqgpu.train``); the k-means is kmeans.py, the OPQ rotation opq.py, and
the result is a `Codebook` (codebook.py). Devices are chosen through the backend, which alone talks to CUDA.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import device_count, free_device_memory, namespace, on_device, resolve_backend, to_device
from .codebook import Codebook, as_float32_matrix, check_params, normalize_training
from .errors import ConfigError, InputError
from .kmeans import ArrayEngine, train_split, train_subquantizers
from .metric import check_metric
from .opq import train_opq


def train(x: Any, M: int, nbits: int = 8, *, niter: int = 25, seed: int = 1234,
          backend: str = "auto", opq: bool = False, devices: list[int] | None = None,
          metric: str = "l2") -> Codebook:
    """Train a PQ codebook on x (n, d) float16/32/64 (computed in float32). Needs n >= 2**nbits rows.

    metric (l2 | ip | cosine, pqgpu.metric) is recorded in the codebook; cosine L2-normalises x first (on the
    backend's device). PQ training itself is L2 k-means for every metric, as in faiss.

    opq=True also learns an OPQ rotation (faiss OPQMatrix defaults); see pqgpu.opq.train_opq.
    On the GPU, the sub-quantizers are split over `devices` (default: every visible GPU; restrict with
    CUDA_VISIBLE_DEVICES or this list).
    """
    check_metric(metric)
    if opq:
        return train_opq(x, M, nbits, niter=niter, seed=seed, backend=backend, metric=metric)
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"training vectors: expected a 2-D array (rows, d). Got shape {x.shape} instead.")
    n, d = x.shape
    check_params(d, M, nbits)
    if niter < 1:
        raise ConfigError(f"niter: expected a positive integer. Got {niter} instead.")
    if n < (1 << nbits):
        raise InputError(f"training needs at least 2**nbits = {1 << nbits} rows for nbits={nbits}; got {n}. "
                         f"Provide more rows (faiss recommends >= {39 * (1 << nbits)}) or lower nbits.")
    x = as_float32_matrix(x, "training vectors")
    if metric == "cosine":
        x = normalize_training(x, resolve_backend(backend))
    if resolve_backend(backend) == "cpu":
        centroids = train_subquantizers(x, M, 1 << nbits, niter=niter, seed=seed)
    else:
        centroids = _train_gpu(x, M, 1 << nbits, niter, seed, devices)
    return Codebook(d, M, nbits, centroids, metric=metric)


def _train_gpu(x: np.ndarray, M: int, ksub: int, niter: int, seed: int, devices: list[int] | None) -> np.ndarray:
    """Sub-quantizers spread over the GPUs, one thread per device."""
    xp = namespace("gpu")
    devices = list(range(device_count())) if devices is None else list(devices)

    def train_group(i: int, cols: np.ndarray, m: int) -> np.ndarray:
        with on_device(devices[i]):
            # distance and one-hot blocks sized from this device's free memory (a quarter per block)
            block = max(64 << 20, free_device_memory() // 4)
            return train_subquantizers(to_device(cols, xp), m, ksub, niter=niter, seed=seed,
                                       engine=ArrayEngine(block_bytes=block))

    return train_split(x, M, ksub, len(devices), train_group)
