"""pqgpu._cpu: numba assign / accumulate against plain numpy references and faiss."""

from __future__ import annotations

import numpy as np
import pytest

cpu = pytest.importorskip("pqgpu._cpu")


def _reference(x: np.ndarray, centroids: np.ndarray):
    """float64 ||x_m - c||^2 from the definition, (n, M, ksub), and the scale ||x_m||^2 + ||c||^2."""
    M, _, dsub = centroids.shape
    xs = x.reshape(x.shape[0], M, dsub).astype(np.float64)
    c = centroids.astype(np.float64)
    dist = ((xs[:, :, None, :] - c[None]) ** 2).sum(-1)  # (n, M, ksub)
    scale = (xs**2).sum(-1)[:, :, None] + (c**2).sum(-1)[None]
    return dist, scale


def _check_against_reference(x, centroids, codes, dists=None):
    dist, scale = _reference(x, centroids)
    ref = dist.argmin(-1)
    chosen = np.take_along_axis(dist, codes.astype(np.int64)[:, :, None], -1)[:, :, 0]
    best = np.take_along_axis(dist, ref[:, :, None], -1)[:, :, 0]
    best_scale = np.take_along_axis(scale, ref[:, :, None], -1)[:, :, 0]
    differ = codes != ref
    # A different code is only allowed where the float64 distances are a float32 near-tie.
    gap = chosen[differ] - best[differ]
    assert np.all(gap <= 1e-5 * best_scale[differ]), (differ.sum(), gap.max())
    # ...and those must stay rare, else the test would accept anything.
    assert differ.mean() <= 1e-3
    if dists is not None:
        np.testing.assert_allclose(dists, np.maximum(best, 0), rtol=1e-4, atol=1e-4 * best_scale.max())
    return differ.sum()


CASES = [
    # n, d, M, ksub
    (1, 8, 8, 2),  # dsub 1, smallest codebook
    (7, 24, 8, 16),  # dsub 3
    (1001, 32, 8, 256),  # dsub 4, n not a multiple of the row tile
    (1001, 64, 8, 256),  # dsub 8
    (300, 64, 2, 256),  # dsub 32
    (257, 96, 3, 1024),  # dsub 32, several blocks per slab
    (130, 12, 4, 300),  # ksub not a power of two: padded lanes must never win
]


@pytest.mark.parametrize("lanes", [None, 8])
@pytest.mark.parametrize("n,d,M,ksub", CASES)
def test_assign_matches_float64_reference(n, d, M, ksub, lanes):
    rng = np.random.default_rng(n * 7919 + d * 31 + ksub)
    x = rng.standard_normal((n, d), dtype=np.float32)
    centroids = rng.standard_normal((M, ksub, d // M), dtype=np.float32)
    prepared = cpu.prepare(centroids, lanes=lanes)
    codes = cpu.assign(x, prepared)
    assert codes.dtype == np.uint16 and codes.shape == (n, M)
    _check_against_reference(x, centroids, codes)
    codes2, dists = cpu.assign_with_distances(x, prepared)
    np.testing.assert_array_equal(codes2, codes)
    _check_against_reference(x, centroids, codes2, dists)


def test_assign_large_ksub_and_ties_go_to_lowest_index():
    rng = np.random.default_rng(3)
    ksub, dsub = 65536, 2
    centroids = rng.standard_normal((1, ksub, dsub), dtype=np.float32)
    # Exact duplicates of the nearest centroids at higher indices, in another slab and in the same block:
    # the lowest index must win, as with argmin.
    x = centroids[0, [5, 40000, 123]].reshape(3, dsub).copy()
    centroids[0, 60000] = centroids[0, 5]
    centroids[0, 40001] = centroids[0, 40000]
    centroids[0, 124] = centroids[0, 123]  # same vector
    centroids[0, 300] = centroids[0, 123]  # later block, same slab
    codes = cpu.assign(x, cpu.prepare(centroids))
    np.testing.assert_array_equal(codes[:, 0], [5, 40000, 123])
    # All-equal distances: index 0.
    same = np.ones((1, 256, 4), np.float32)
    np.testing.assert_array_equal(cpu.assign(np.zeros((5, 4), np.float32), cpu.prepare(same)), 0)


def test_assign_is_independent_of_threads_and_row_offset():
    numba = pytest.importorskip("numba")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2000, 64), dtype=np.float32)
    centroids = rng.standard_normal((8, 256, 8), dtype=np.float32)
    prepared = cpu.prepare(centroids)
    full = cpu.assign(x, prepared)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        np.testing.assert_array_equal(cpu.assign(x, prepared), full)
    finally:
        numba.set_num_threads(old)
    # Another SIMD width: same arithmetic per distance, same codes.
    np.testing.assert_array_equal(cpu.assign(x, cpu.prepare(centroids, lanes=8)), full)
    np.testing.assert_array_equal(cpu.assign(x, cpu.prepare(centroids, lanes=16)), full)
    # Rows land in other tiles and chunks: same codes.
    np.testing.assert_array_equal(cpu.assign(x[3:], prepared), full[3:])
    # Non-contiguous and float64 input are converted; out= is filled in place.
    out = np.empty_like(full)
    assert cpu.assign(np.asfortranarray(x.astype(np.float64)), prepared, out=out) is out
    np.testing.assert_array_equal(out, full)


def test_assign_input_validation():
    prepared = cpu.prepare(np.zeros((4, 16, 2), np.float32))
    with pytest.raises(ValueError):
        cpu.assign(np.zeros((3, 7), np.float32), prepared)
    with pytest.raises(ValueError):
        cpu.assign(np.zeros((3, 8), np.float32), prepared, out=np.empty((3, 4), np.int64))
    assert cpu.assign(np.zeros((0, 8), np.float32), prepared).shape == (0, 4)


def test_assign_matches_faiss_compute_codes():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(11)
    n, d, M = 20000, 64, 8
    x = rng.standard_normal((n, d), dtype=np.float32)
    for dsub_m in (M, 16):  # dsub 8 (faiss direct path) and dsub 4
        centroids = np.ascontiguousarray(
            x[rng.choice(n, 256, replace=False)].reshape(256, dsub_m, d // dsub_m).transpose(1, 0, 2))
        pq = faiss.ProductQuantizer(d, dsub_m, 8)
        faiss.copy_array_to_vector(centroids.ravel(), pq.centroids)
        expected = pq.compute_codes(x)  # nbits=8: one byte per sub-code
        codes = cpu.assign(x, cpu.prepare(centroids))
        same_rows = np.all(codes == expected, axis=1).mean()
        assert same_rows >= 0.9999, same_rows


@pytest.mark.parametrize("codes_dtype", [np.uint16, np.int64, np.uint8])
def test_accumulate_matches_add_at(codes_dtype):
    rng = np.random.default_rng(2)
    n, M, ksub, dsub = 3001, 6, 200 if codes_dtype is not np.uint8 else 100, 5
    x = rng.standard_normal((n, M * dsub), dtype=np.float32)
    codes = rng.integers(0, ksub - 20, (n, M)).astype(codes_dtype)  # some clusters stay empty
    sums, counts = cpu.accumulate(x, codes, ksub)
    assert sums.dtype == np.float64 and sums.shape == (M, ksub, dsub)
    assert counts.dtype == np.int64 and counts.shape == (M, ksub)
    ref_sums = np.zeros((M, ksub, dsub))
    ref_counts = np.zeros((M, ksub), np.int64)
    xs = x.reshape(n, M, dsub).astype(np.float64)
    for m in range(M):
        np.add.at(ref_sums[m], codes[:, m].astype(np.int64), xs[:, m])
        np.add.at(ref_counts[m], codes[:, m].astype(np.int64), 1)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-12, atol=1e-12)
    assert counts[:, -20:].sum() == 0 and counts.sum() == n * M


def test_accumulate_single_subspace_and_bad_codes():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 40), dtype=np.float32)
    codes = rng.integers(0, 16, (500, 1))
    sums, counts = cpu.accumulate(x, codes, 16)
    for k in range(16):
        np.testing.assert_allclose(sums[0, k], x[codes[:, 0] == k].astype(np.float64).sum(0), rtol=1e-12)
    np.testing.assert_array_equal(counts[0], np.bincount(codes[:, 0], minlength=16))
    with pytest.raises(ValueError):
        cpu.accumulate(x, np.full((500, 1), 16), 16)
    with pytest.raises(ValueError):
        cpu.accumulate(x, np.full((500, 1), -1), 16)


def test_kernel_calls_leave_no_reference_to_their_arrays():
    """A call must not keep its inputs alive until the garbage collector runs (it did when tile shapes
    were numba.literally() arguments: each call's typing left reference cycles holding the arrays, and a
    Dask worker grew by hundreds of MiB between collections)."""
    import gc
    import weakref

    c = np.random.default_rng(0).standard_normal((8, 16, 4)).astype(np.float32)
    prepared = cpu.prepare(c)
    # compile (or load) both kernels outside the measured calls: a first compile may leave cycles behind
    cpu.accumulate(np.zeros((300, 32), np.float32), cpu.assign(np.zeros((300, 32), np.float32), prepared), 16)
    gc.disable()
    try:
        x = np.random.default_rng(1).standard_normal((300, 32)).astype(np.float32)
        codes = cpu.assign(x, prepared)
        refs = [weakref.ref(x), weakref.ref(codes)]
        cpu.accumulate(x, codes, 16)
        del x, codes
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()
