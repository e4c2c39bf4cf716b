"""Shared test helpers: seeded low-intrinsic-dimension data and the faiss parity check."""

from __future__ import annotations

import numpy as np
import pytest



def synthetic(n: int, d: int, *, seed: int = 0, intrinsic: int = 12, dtype=np.float32) -> np.ndarray:
    """Vectors on a curved low-dimensional manifold plus a little noise (like faiss SyntheticDataset):
    uniform noise would hide quantizer bugs because every codebook looks equally bad on it."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(12345).standard_normal((intrinsic, d))  # same manifold for every seed
    z = rng.standard_normal((n, intrinsic))
    x = np.tanh(z) @ basis + 0.3 * np.sin(z @ basis) + 0.05 * rng.standard_normal((n, d))
    return x.astype(dtype)


def assert_codes_match(ours: np.ndarray, ref: np.ndarray, x: np.ndarray, centroids: np.ndarray, nbits: int,
                       rotation: np.ndarray | None = None, min_rows: float = 0.9999) -> None:
    """ours == ref on >= min_rows of rows, and every differing sub-code is a float32 distance tie."""
    from pqgpu.kernels import unpack_codes

    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.uint8
    same_rows = (ours == ref).all(axis=1).mean()
    assert same_rows >= min_rows, f"only {same_rows:.6f} of rows equal"
    M, _, dsub = centroids.shape
    a = np.asarray(unpack_codes(ours, M, nbits))
    b = np.asarray(unpack_codes(ref, M, nbits))
    xr = x if rotation is None else x @ rotation.T
    for i, m in zip(*np.nonzero(a != b)):
        xm = xr[i, m * dsub:(m + 1) * dsub].astype(np.float64)
        da = ((xm - centroids[m, a[i, m]]) ** 2).sum()
        db = ((xm - centroids[m, b[i, m]]) ** 2).sum()
        scale = (xm ** 2).sum() + (centroids[m, a[i, m]].astype(np.float64) ** 2).sum() + 1e-30
        assert abs(da - db) <= 1e-5 * scale, f"row {i} sub-quantizer {m}: {da} vs {db} is not a tie"







def namespaces():
    """Array namespaces the array-API kernels are tested on: numpy, and array_api_strict when installed
    (it rejects non-portable calls, so they fail here rather than on a GPU)."""
    import array_api_compat.numpy as np_xp

    yield pytest.param(np_xp, id="numpy")
    try:
        import array_api_strict
    except ImportError:
        return
    yield pytest.param(array_api_strict, id="array_api_strict")


NAMESPACES = list(namespaces())
