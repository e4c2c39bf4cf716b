"""Near-tie codes (issue 16 item 5): where ||c||^2 - 2 x.c cannot tell two centroids apart in float32, the
code must still be the exact nearest centroid (lowest index on exact ties), on the numba kernel and on the
array-API route alike, and equal to faiss compute_codes wherever faiss computes ||x - c||^2 directly
(dsub < 16). Expected codes come from an independent float64 ||x - c||^2 and from faiss, never from pqgpu."""

from __future__ import annotations

import numpy as np
import pytest

from pqgpu import kernels

from .helpers import NAMESPACES

faiss = pytest.importorskip("faiss")
cpu = pytest.importorskip("pqgpu._cpu")


def exact_nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """float64 argmin_k ||x_m - c_mk||^2 per subspace (first index on exact ties), (n, M) int64."""
    M, _, dsub = centroids.shape
    xs = x.reshape(x.shape[0], M, dsub).astype(np.float64)
    c = centroids.astype(np.float64)
    return ((xs[:, :, None, :] - c[None]) ** 2).sum(-1).argmin(-1)


def all_routes(x: np.ndarray, centroids: np.ndarray) -> dict[str, np.ndarray]:
    # both SIMD widths whatever this CPU has (LLVM splits 16-lane vectors on AVX2): tile shapes differ
    out = {f"numba-{lanes}-lanes": cpu.assign(x, cpu.prepare(centroids, lanes=lanes)).astype(np.int64)
           for lanes in (8, 16)}
    for param in NAMESPACES:
        xp = param.values[0]
        # small blocks: several blocks per call, so the re-rank's block bookkeeping is exercised too
        codes = kernels.assign(xp.asarray(x), xp.asarray(centroids), block_bytes=1 << 18)
        out[f"array-api-{param.id}"] = np.asarray(codes).astype(np.int64)
    return out


def faiss_codes(x: np.ndarray, centroids: np.ndarray, nbits: int) -> np.ndarray:
    M, _, dsub = centroids.shape
    pq = faiss.ProductQuantizer(M * dsub, M, nbits)
    faiss.copy_array_to_vector(np.ascontiguousarray(centroids).ravel(), pq.centroids)
    return np.asarray(kernels.unpack_codes(pq.compute_codes(x), M, nbits)).astype(np.int64)


def offset_problem(n: int, M: int, dsub: int, nbits: int, offset: float, seed: int):
    """Vectors and centroids around a common point far from the origin (un-centred embeddings): ||x||^2 is
    ~10^3x the distances, so the decomposition's cancellation error exceeds many nearest/runner-up gaps,
    while the direct ||x - c||^2 (faiss for dsub < 16) resolves them. Non-degenerate: no exact ties."""
    rng = np.random.default_rng(seed)
    o = (rng.standard_normal(M * dsub) * offset).astype(np.float32)
    x = (o + rng.standard_normal((n, M * dsub))).astype(np.float32)
    c = (o.reshape(M, 1, dsub) + rng.standard_normal((M, 1 << nbits, dsub))).astype(np.float32)
    return x, c


# nbits 4 and 5: codebooks of one register block (the kernel's single-block path)
@pytest.mark.parametrize("dsub,nbits", [(2, 8), (4, 8), (8, 8), (4, 12), (12, 8), (8, 4), (4, 5)])
def test_offset_data_identical_to_faiss_and_exact(dsub, nbits):
    M = 4
    n = 1500 if nbits == 8 else 400
    x, c = offset_problem(n, M, dsub, nbits, offset=30.0, seed=dsub * 100 + nbits)
    ref = exact_nearest(x, c)
    theirs = faiss_codes(x, c, nbits)
    # faiss's direct path is exact here (this is what makes the data non-degenerate for the comparison)
    np.testing.assert_array_equal(theirs, ref)
    for route, ours in all_routes(x, c).items():
        assert (ours == theirs).all(), f"{route}: {(ours != theirs).any(1).sum()} rows differ from faiss"


@pytest.mark.parametrize("dsub", [16, 32])
def test_offset_data_exact_nearest_at_large_dsub(dsub):
    # faiss itself uses the decomposition (BLAS) here, so compare with the float64 definition only.
    x, c = offset_problem(600, 2, dsub, 8, offset=30.0, seed=dsub)
    ref = exact_nearest(x, c)
    for route, ours in all_routes(x, c).items():
        np.testing.assert_array_equal(ours, ref, err_msg=route)


def test_exact_ties_and_one_ulp_apart():
    """x exactly equidistant from two centroids (dyadic values, exact in float32 and float64), and the same
    with one of them moved by 1 ulp: exact tie -> the lower index; 1 ulp -> the nearer one, whichever index
    it has. Far from the origin, so ||c||^2 - 2 x.c alone cannot see the difference."""
    o = np.float32(1024.0)
    ulp = np.float32(np.spacing(np.float32(o + 1)))
    base = np.array([o, o], np.float32)
    far = base + np.float32(64.0) * np.random.default_rng(0).standard_normal((256, 2)).astype(np.float32)
    far[np.linalg.norm(far - base, axis=1) < 4] += 16  # keep the decoys clearly farther than distance 1
    cases = []  # (c_first, c_second, expected slot: 0 = first, 1 = second)
    a = base + np.array([1, 0], np.float32)
    b = base + np.array([0, 1], np.float32)
    cases.append((a, b, 0))  # exact tie: lower index
    cases.append((b, a, 0))
    b_far = base + np.array([0, 1 + ulp], np.float32)  # 1 ulp farther
    cases.append((b_far, a, 1))  # the nearer one sits at the higher index
    a_near = base + np.array([1 - ulp, 0], np.float32)  # 1025 - 1 ulp: nearer by 2 ulp - ulp^2
    cases.append((b, a_near, 1))
    cases.append((a_near, b, 0))
    x = np.tile(base, (5, 1))  # several rows: full row tiles and the tail path of the numba kernel
    M = len(cases)
    c = np.empty((M, 256, 2), np.float32)
    slots = [(17, 200), (5, 6), (3, 130), (100, 101), (0, 255)]
    for m, ((first, second, want), (i, j)) in enumerate(zip(cases, slots)):
        c[m] = far
        c[m, i], c[m, j] = first, second
    xm = np.tile(x, (1, M))
    ref = exact_nearest(xm, c)
    expected = np.array([[slots[m][want] for m, (_, _, want) in enumerate(cases)]] * x.shape[0])
    np.testing.assert_array_equal(ref, expected)  # the construction does what it says
    for route, ours in all_routes(xm, c).items():
        np.testing.assert_array_equal(ours, expected, err_msg=route)


@pytest.mark.parametrize("dsub,nbits", [(4, 8), (8, 10), (8, 4), (4, 5)])
def test_random_reflected_near_ties(dsub, nbits):
    """Each x gets two centroids at the same exact distance up to float32 rounding of the construction
    (c_b = x + P (c_a - x), P a coordinate permutation with sign flips), nearer than all others; the
    code must be the float64 nearest of the two (the lower index on an exact tie)."""
    rng = np.random.default_rng(dsub + nbits)
    M, ksub = 3, 1 << nbits
    n = min(64, ksub // 2)
    o = (rng.standard_normal(M * dsub) * 50).astype(np.float32)
    x = (o + rng.standard_normal((n, M * dsub))).astype(np.float32)
    c = (o.reshape(M, 1, dsub) + 8 * rng.standard_normal((M, ksub, dsub))).astype(np.float32)
    xs = x.reshape(n, M, dsub)
    # one row per centroid pair: rows i use slots (2i, 2i+1) (or the reverse) of every subspace
    for i in range(n):
        for m in range(M):
            u = (0.1 * rng.standard_normal(dsub)).astype(np.float32)
            perm = rng.permutation(dsub)
            signs = rng.choice(np.array([-1, 1], np.float32), dsub)
            ca = xs[i, m] + u
            cb = xs[i, m] + signs * u[perm]
            ia, ib = (2 * i, 2 * i + 1) if i % 2 else (2 * i + 1, 2 * i)
            c[m, ia], c[m, ib] = ca, cb
    ref = exact_nearest(x, c)
    for route, ours in all_routes(x, c).items():
        np.testing.assert_array_equal(ours, ref, err_msg=route)


def test_tie_bound_covers_the_decomposition_error():
    """The bound (kernels.tie_bound_coef) against the measured error of the float32 decomposition, with
    float64 as the truth, on data where the cancellation is large: it must never be exceeded."""
    for dsub in (1, 2, 4, 8, 16, 32):
        x, c = offset_problem(300, 2, dsub, 8, offset=100.0, seed=dsub)
        xs = x.reshape(300, 2, dsub).transpose(1, 0, 2)
        ct, cnorm = kernels.prepare_centroids(c)
        d32 = (xs @ ct + cnorm).astype(np.float64)
        x64, c64 = xs.astype(np.float64), c.astype(np.float64)
        d64 = (c64 ** 2).sum(-1)[:, None, :] - 2 * x64 @ c64.transpose(0, 2, 1)
        half = kernels.tie_bound_coef(dsub) / 2  # the bound covers two centroids' errors
        scale = (x64 ** 2).sum(-1)[:, :, None] + 2 * (c64 ** 2).sum(-1).max(-1)[:, None, None]
        assert (np.abs(d32 - d64) <= half * scale).all(), dsub
