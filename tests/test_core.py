"""Core quantizer: kernels on several array namespaces, faiss parity, files, training quality, errors."""

from __future__ import annotations

import numpy as np
import pytest

import pqgpu
from pqgpu import kernels
from pqgpu.codebook import Codebook
from pqgpu.kmeans import ArrayEngine, train_subquantizers

from .helpers import NAMESPACES, assert_codes_match, synthetic

faiss = pytest.importorskip("faiss")


def reference_assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Definition of the nearest centroid, in float64 with full ||x - c||^2."""
    M, ksub, dsub = centroids.shape
    out = np.empty((x.shape[0], M), np.int64)
    for m in range(M):
        xm = x[:, m * dsub:(m + 1) * dsub].astype(np.float64)
        c = centroids[m].astype(np.float64)
        out[:, m] = ((xm[:, None, :] - c[None, :, :]) ** 2).sum(-1).argmin(1)
    return out


@pytest.mark.parametrize("xp", NAMESPACES)
@pytest.mark.parametrize("d,M,nbits", [(16, 4, 8), (24, 8, 4), (12, 12, 3), (8, 2, 10)])
def test_assign_matches_definition(xp, d, M, nbits):
    rng = np.random.default_rng(d * M + nbits)
    x = rng.standard_normal((301, d)).astype(np.float32)
    c = rng.standard_normal((M, 1 << nbits, d // M)).astype(np.float32)
    ours = np.asarray(kernels.assign(xp.asarray(x), xp.asarray(c), block_bytes=1 << 16))
    ref = reference_assign(x, c)
    assert_codes_match(np.asarray(kernels.pack_codes(ours, nbits)), np.asarray(kernels.pack_codes(ref, nbits)),
                       x, c, nbits, min_rows=0.99)


@pytest.mark.parametrize("xp", NAMESPACES)
@pytest.mark.parametrize("nbits", list(range(1, 17)))
def test_pack_unpack_round_trip(xp, nbits):
    rng = np.random.default_rng(nbits)
    M = 7
    codes = rng.integers(0, 1 << nbits, size=(33, M))
    packed = kernels.pack_codes(xp.asarray(codes), nbits)
    assert packed.shape == (33, kernels.code_size(M, nbits))
    assert np.array_equal(np.asarray(kernels.unpack_codes(packed, M, nbits)), codes)


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 5, 7, 8, 10, 12, 16])
def test_pack_layout_is_faiss(nbits):
    """Pack arbitrary sub-codes and let faiss's own decoder read them back."""
    rng = np.random.default_rng(nbits)
    M, dsub = 5, 2
    pq = faiss.ProductQuantizer(M * dsub, M, nbits)
    c = np.broadcast_to(np.arange(1 << nbits, dtype=np.float32)[None, :, None], (M, 1 << nbits, dsub))
    faiss.copy_array_to_vector(np.ascontiguousarray(c).ravel(), pq.centroids)
    codes = rng.integers(0, 1 << nbits, size=(50, M))
    packed = np.asarray(kernels.pack_codes(codes, nbits))
    decoded = pq.decode(packed).reshape(50, M, dsub)[:, :, 0]
    assert np.array_equal(decoded.astype(np.int64), codes)


@pytest.mark.parametrize("xp", NAMESPACES)
def test_decode_and_tables(xp):
    rng = np.random.default_rng(3)
    M, nbits, dsub = 4, 5, 3
    c = rng.standard_normal((M, 1 << nbits, dsub)).astype(np.float32)
    codes = rng.integers(0, 1 << nbits, size=(20, M))
    y = np.asarray(kernels.decode(xp.asarray(codes), xp.asarray(c)))
    expect = np.concatenate([c[m, codes[:, m]] for m in range(M)], axis=1)
    assert np.array_equal(y, expect)
    q = rng.standard_normal((3, M * dsub)).astype(np.float32)
    tab = np.asarray(kernels.distance_tables(xp.asarray(q), xp.asarray(c)))
    ref = ((q.reshape(3, M, 1, dsub) - c[None]) ** 2).sum(-1)
    np.testing.assert_allclose(tab, ref, rtol=1e-4, atol=1e-4)


PARITY_CASES = [(nbits, d, M) for nbits in (1, 2, 4, 5, 8, 10, 12, 16) for d, M in ((32, 8), (48, 4))]


@pytest.mark.parametrize("backend_path", ["default", "array_api"])
@pytest.mark.parametrize("nbits,d,M", PARITY_CASES)
def test_encode_equals_faiss_compute_codes(nbits, d, M, backend_path, monkeypatch):
    n = 4000 if nbits < 12 else 10000  # >= 10k rows so one legitimate tie stays within 99.99 %
    x = synthetic(n, d, seed=nbits)
    ksub = 1 << nbits
    pool = synthetic(max(ksub, 256) + 100, d, seed=100 + nbits)
    rng = np.random.default_rng(nbits)
    # centroids: real data points (as k-means init would give), different per sub-quantizer
    c = np.stack([pool[rng.permutation(pool.shape[0])[:ksub], m * (d // M):(m + 1) * (d // M)] for m in range(M)])
    cb = Codebook(d, M, nbits, c)
    if backend_path == "array_api":
        monkeypatch.setitem(__import__("sys").modules, "pqgpu._cpu", None)  # force the array-API kernel
    ours = cb.encode(x, backend="cpu")
    ref = cb.to_faiss().compute_codes(x)
    assert_codes_match(ours, ref, x, c, nbits)


def test_files_round_trip_with_faiss(tmp_path):
    x = synthetic(3000, 32)
    cb = pqgpu.train(x, 8, 6, niter=4, backend="cpu")
    path = tmp_path / "pq.faiss"
    cb.save(path)
    pq = faiss.read_ProductQuantizer(str(path))
    assert (pq.d, pq.M, pq.nbits) == (32, 8, 6)
    assert np.array_equal(faiss.vector_to_array(pq.centroids), cb.centroids.ravel())
    # and the other way: a faiss-trained quantizer file loads in pqgpu with identical codes
    pq2 = faiss.ProductQuantizer(32, 4, 8)
    pq2.train(x)
    faiss.write_ProductQuantizer(pq2, str(tmp_path / "f.faiss"))
    cb2 = Codebook.load(tmp_path / "f.faiss")
    assert np.array_equal(cb2.centroids.ravel(), faiss.vector_to_array(pq2.centroids))
    assert_codes_match(cb2.encode(x), pq2.compute_codes(x), x, cb2.centroids, 8)
    assert Codebook.from_faiss(pq2).fingerprint() == cb2.fingerprint()
    assert cb.fingerprint() != cb2.fingerprint()


@pytest.mark.parametrize("d,M,nbits", [(32, 8, 8), (64, 16, 6), (48, 6, 8)])
def test_training_mse_close_to_faiss(d, M, nbits):
    x = synthetic(20000, d, seed=1)
    held_out = synthetic(5000, d, seed=2)
    cb = pqgpu.train(x, M, nbits, niter=15, seed=7, backend="cpu")
    pq = faiss.ProductQuantizer(d, M, nbits)
    pq.cp.niter = 15
    pq.train(x)
    ours = ((cb.decode(cb.encode(held_out)) - held_out) ** 2).sum(1).mean()
    theirs = ((pq.decode(pq.compute_codes(held_out)) - held_out) ** 2).sum(1).mean()
    assert ours <= theirs * 1.01, (ours, theirs)


@pytest.mark.parametrize("xp", NAMESPACES)
def test_kmeans_runs_on_namespace_and_is_deterministic(xp):
    x = synthetic(600, 12, seed=5)
    a = train_subquantizers(xp.asarray(x), 3, 16, niter=4, seed=3, engine=ArrayEngine(block_bytes=1 << 14))
    b = train_subquantizers(xp.asarray(x), 3, 16, niter=4, seed=3, engine=ArrayEngine())
    assert a.shape == (3, 16, 4) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the result is a k-means fixed point: better than the random init by a wide margin
    cb = Codebook(12, 3, 4, a)
    mse = ((cb.decode(cb.encode(x, backend="cpu")) - x) ** 2).sum(1).mean()
    assert mse < 0.5 * ((x - x.mean(0)) ** 2).sum(1).mean()


def test_empty_clusters_are_split():
    # 40 distinct points, ksub 32, many duplicates: k-means init picks duplicates -> empty clusters
    base = synthetic(40, 8, seed=9)
    x = np.repeat(base, 10, axis=0)
    c = train_subquantizers(x, 2, 32, niter=5, seed=1)
    assert len(np.unique(c[0].round(5), axis=0)) == 32


def test_float16_and_float64_inputs():
    x = synthetic(2000, 16, seed=4)
    cb = pqgpu.train(x.astype(np.float16), 4, 4, niter=3)
    assert cb.encode(x.astype(np.float64)).shape == (2000, 2)
    assert np.array_equal(cb.encode(x.astype(np.float16)), cb.encode(x.astype(np.float16).astype(np.float32)))


@pytest.mark.parametrize("call,match", [
    (lambda: pqgpu.train(np.zeros((300, 10), np.float32), 3), "not divisible by M=3"),
    (lambda: pqgpu.train(np.zeros((300, 8), np.float32), 4, nbits=17), "nbits"),
    (lambda: pqgpu.train(np.zeros((300, 8), np.float32), 4, nbits=0), "nbits"),
    (lambda: pqgpu.train(np.zeros((100, 8), np.float32), 4, nbits=8), "at least 2\\*\\*nbits = 256 rows"),
    (lambda: pqgpu.train(np.zeros(100, np.float32), 4), "2-D"),
    (lambda: pqgpu.train(np.ones((300, 8), np.int32), 4), "float16, float32 or float64"),
])
def test_training_errors(call, match):
    with pytest.raises(pqgpu.PqgpuError, match=match):
        call()


def test_nan_row_is_named_and_wrong_dimension():
    x = synthetic(500, 8)
    cb = pqgpu.train(x, 4, 4, niter=2)
    bad = x.copy()
    bad[137, 3] = np.nan
    with pytest.raises(pqgpu.InputError, match="row 137 has a non-finite value"):
        cb.encode(bad)
    bad[137, 3] = np.inf
    with pytest.raises(pqgpu.InputError, match="row 1137 "):
        cb.encode(bad, row_offset=1000)
    with pytest.raises(pqgpu.InputError, match="row 137"):
        pqgpu.train(bad, 4, 4)
    with pytest.raises(pqgpu.InputError, match="dimension 16.*d=8"):
        cb.encode(np.zeros((3, 16), np.float32))


def test_corrupt_quantizer_file(tmp_path):
    p = tmp_path / "bad.faiss"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(pqgpu.InputError, match="truncated"):
        Codebook.load(p)
    with pytest.raises(pqgpu.InputError, match="Cannot read"):
        Codebook.load(tmp_path / "missing.faiss")


def test_gpu_backend_fails_clearly_without_gpu():
    from pqgpu.backend import gpu_status

    if gpu_status()[0]:
        pytest.skip("a GPU is visible")
    x = synthetic(300, 8)
    with pytest.raises(pqgpu.BackendUnavailable, match="pqgpu\\[gpu\\]"):
        pqgpu.train(x, 4, 4, backend="gpu")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("col", [0, 5, 63])
def test_non_finite_values_are_found_anywhere_and_huge_finite_rows_pass(value, col):
    from pqgpu.codebook import as_float32_matrix

    x = np.full((40, 64), 3e38, np.float32)  # each row's sum overflows, yet every value is finite
    x[::2] *= -1
    assert as_float32_matrix(x) is not None
    x[::3] = 1.0
    x[29, col] = value
    with pytest.raises(pqgpu.InputError, match=f"row 29 has a non-finite value .* at column {col}"):
        as_float32_matrix(x)
