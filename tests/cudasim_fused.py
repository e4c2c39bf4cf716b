"""The fused numba.cuda encoder run by numba's CUDA simulator on the CPU.

Not collected by default (the file name does not start with test_): NUMBA_ENABLE_CUDASIM must be set before
numba.cuda is first imported, so tests/test_cuda_kernel.py runs this module in a fresh interpreter. By hand:
    NUMBA_ENABLE_CUDASIM=1 python -m pytest -q -p no:cacheprovider tests/cudasim_fused.py
The simulator runs every CUDA thread as a Python thread, so inputs and launch shapes are tiny; small
LaunchPlans make sure several row blocks, several centroid tiles and a partial last tile are all exercised.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    raise RuntimeError("run this module with NUMBA_ENABLE_CUDASIM=1 (see tests/test_cuda_kernel.py)")

from pqgpu import _cuda, kernels  # noqa: E402
from pqgpu.backend import NumpyDevice, device_encode, encode_blocks, gpu_encode_routes  # noqa: E402

from .helpers import assert_codes_match, synthetic  # noqa: E402

faiss = pytest.importorskip("faiss")


def problem(n, M, dsub, nbits, seed):
    """Rows on a low-dimensional manifold; centroids drawn from other rows of it (as k-means would place them)."""
    d, ksub = M * dsub, 1 << nbits
    x = synthetic(n, d, seed=seed)
    pool = synthetic(max(ksub, 64), d, seed=seed + 100)
    rng = np.random.default_rng(seed)
    c = np.stack([pool[rng.permutation(len(pool))[:ksub], m * dsub:(m + 1) * dsub] for m in range(M)])
    return x, np.ascontiguousarray(c, dtype=np.float32)


def sequential_reference(x, c):
    """Independent of the kernel: float32 (x - c)^2 summed over dsub in order, first index of the minimum."""
    M, ksub, dsub = c.shape
    out = np.empty((x.shape[0], M), np.int64)
    for m in range(M):
        xm = x[:, m * dsub:(m + 1) * dsub]
        acc = np.zeros((x.shape[0], ksub), np.float32)
        for j in range(dsub):
            diff = xm[:, j:j + 1] - c[m, :, j][None, :]
            acc = acc + diff * diff
        out[:, m] = np.argmin(acc, axis=1)
    return out


def faiss_codes(x, c, nbits):
    M, _, dsub = c.shape
    pq = faiss.ProductQuantizer(M * dsub, M, nbits)
    faiss.copy_array_to_vector(c.ravel(), pq.centroids)
    return pq.compute_codes(x)


def fused(x, c, nbits, plan):
    M = c.shape[0]
    codes = np.full((M, x.shape[0]), 0xFFFF, np.uint16)
    out = np.full((x.shape[0], kernels.code_size(M, nbits)), 0xAB, np.uint8)
    _cuda.encode(x, c, nbits, codes, out, plan=plan)
    return codes, out


P = _cuda.LaunchPlan


@pytest.mark.parametrize("nbits, dsub, M, n, plan", [
    (1, 16, 3, 11, P(4, 2, 1)),      # 3 bits in one byte; one centroid per tile
    (4, 1, 5, 21, P(4, 3, 5)),       # tiles 5+5+5+1; 21 rows over two row blocks
    (4, 8, 2, 9, P(2, 2, 16)),
    (8, 2, 2, 9, P(4, 2, 100)),      # tiles 100+100+56
    (8, 4, 3, 10, P(4, 1, 256)),
    (10, 4, 3, 5, P(4, 2, 300)),     # 30 bits: sub-codes straddle bytes, 2 pad bits
    (12, 2, 1, 4, P(2, 2, 4096)),    # 12 bits: one and a half bytes
    (16, 1, 1, 2, P(2, 1, 8192)),    # 65536 centroids, 8 tiles
])
def test_fused_equals_reference_faiss_and_arrayapi(nbits, dsub, M, n, plan):
    x, c = problem(n, M, dsub, nbits, seed=nbits * 31 + dsub)
    codes, out = fused(x, c, nbits, plan)
    ref = sequential_reference(x, c)
    assert np.array_equal(codes.T.astype(np.int64), ref)
    assert np.array_equal(np.asarray(kernels.unpack_codes(out, M, nbits)), ref)
    assert_codes_match(out, faiss_codes(x, c, nbits), x, c, nbits, min_rows=1.0)
    # the array-API route computes ||c||^2 - 2 x.c: it may differ from the exact distance only at float32 ties
    assert_codes_match(out, np.asarray(device_encode(x, c, nbits, route="arrayapi")), x, c, nbits, min_rows=0.0)


@pytest.mark.parametrize("dsub", [1, 2, 4, 8, 16])
def test_exact_ties_take_the_lowest_index(dsub):
    M, nbits, ksub = 2, 4, 16
    c = np.random.default_rng(dsub).standard_normal((M, ksub, dsub)).astype(np.float32) + 10
    c[:, 5] = c[:, 3]  # duplicates of centroid 3 at 5 and 9
    c[:, 9] = c[:, 3]
    c[:, 0] = 0        # centroids 0 and 1 are mirror images: any point of the mirror plane ties
    c[:, 1] = 0
    c[:, 0, 0] = -1
    c[:, 1, 0] = 1
    x = np.zeros((4, M * dsub), np.float32)
    x[0] = c[:, 3].ravel()
    x[1] = c[:, 3].ravel() + 0.01
    x[3, 1::dsub] = 0.25 if dsub > 1 else 0  # still on the mirror plane x_0 = 0
    expected = np.array([[3, 3], [3, 3], [0, 0], [0, 0]])
    codes, out = fused(x, c, nbits, P(2, 2, 3))
    assert np.array_equal(codes.T, expected)
    assert np.array_equal(np.asarray(device_encode(x, c, nbits, route="arrayapi")),
                          np.asarray(kernels.pack_codes(expected, nbits)))
    # faiss 1.15's SIMD path keeps the highest of exactly equal centroids for dsub 2, 4, 8: only ties may differ
    assert_codes_match(out, faiss_codes(x, c, nbits), x, c, nbits, min_rows=0.0)


def test_routes_and_device_encode_with_the_default_launch_plan():
    assert gpu_encode_routes() == ("arrayapi", "fused")
    x, c = problem(7, 2, 4, 4, seed=5)
    out = device_encode(x, c, 4, route="fused")
    assert np.array_equal(np.asarray(kernels.unpack_codes(out, 2, 4)), sequential_reference(x, c))


def test_block_pipeline_on_the_fused_route_with_rotation():
    x, c = problem(19, 2, 4, 5, seed=9)
    rot, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((8, 8)))
    rot = rot.astype(np.float32)
    out = encode_blocks(x.astype(np.float16), c, 5, NumpyDevice(), block_rows=10, rotation=rot, route="fused")
    xr = x.astype(np.float16).astype(np.float32) @ rot.T
    assert np.array_equal(np.asarray(kernels.unpack_codes(out, 2, 5)), sequential_reference(xr, c))
