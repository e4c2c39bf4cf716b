"""ADC search, evaluation and faiss export: kernels on several namespaces, parity with faiss IndexPQ."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

import pqgpu
from pqgpu import kernels
from pqgpu.codebook import Codebook
from pqgpu.evaluation import format_table, recall_metrics
from pqgpu.export import export_faiss
from pqgpu.store import create_store, open_store, write_chunk

from .helpers import NAMESPACES, synthetic

faiss = pytest.importorskip("faiss")
# The module object, whatever `pqgpu.search` (the package attribute) is bound to.
S = importlib.import_module("pqgpu.search")


def make_store(path, cb: Codebook, codes: np.ndarray, ids: np.ndarray | None = None, chunk_rows: int = 1000):
    n = codes.shape[0]
    if ids is None:
        ids = np.arange(n, dtype=np.int64) * 7 + 3  # ids differ from rows, so a row/id mix-up shows
    id_dtype = str if ids.dtype.kind in "UOT" else ids.dtype
    create_store(path, codebook=cb, n=n, chunk_rows=chunk_rows, id_dtype=id_dtype, source={"test": str(path)})
    for i, start in enumerate(range(0, n, chunk_rows)):
        write_chunk(str(path), i, start, codes[start:start + chunk_rows], ids[start:start + chunk_rows])
    return str(path)


def random_codebook(d: int, M: int, nbits: int, seed: int = 0, rotation: bool = False) -> Codebook:
    """Centroids drawn from data points, different per sub-quantizer (like a k-means init)."""
    rng = np.random.default_rng(seed)
    pool = synthetic((1 << nbits) + 50, d, seed=seed + 100)
    dsub = d // M
    c = np.stack([pool[rng.permutation(pool.shape[0])[:1 << nbits], m * dsub:(m + 1) * dsub] for m in range(M)])
    rot = None
    if rotation:
        rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return Codebook(d, M, nbits, c, None if rot is None else rot.astype(np.float32))


def faiss_index(cb: Codebook, codes: np.ndarray):
    idx = faiss.IndexPQ(cb.d, cb.M, cb.nbits)
    faiss.copy_array_to_vector(cb.centroids.ravel(), idx.pq.centroids)
    idx.is_trained = True
    idx.add_sa_codes(codes)
    if cb.rotation is None:
        return idx
    opq = faiss.OPQMatrix(cb.d, cb.M)
    faiss.copy_array_to_vector(cb.rotation.ravel(), opq.A)
    opq.is_trained = True
    pre = faiss.IndexPreTransform(opq, idx)
    pre.ntotal = idx.ntotal
    pre.referenced_objects = [idx, opq]  # keep the wrapped objects alive
    return pre


def assert_same_results(d1, i1, d2, i2, rtol=1e-4):
    """Same ids except where distances tie; distances within rtol (relative to the query's largest)."""
    assert d1.shape == d2.shape == i1.shape == i2.shape
    finite = np.isfinite(d1) & (d2 < 1e38)
    scale = np.where(finite, np.abs(d2), 0).max(axis=1, keepdims=True) + 1e-12
    err = np.abs(np.where(finite, d1 - d2, 0)) / scale
    assert err.max() <= rtol, f"distances differ by {err.max():.3g} (relative)"
    # Rank-wise distances agree, so an id at another rank is a tie; an id only one side has must tie
    # with the last (k-th) distance: it displaced an equally distant row at the boundary.
    for q in range(i1.shape[0]):
        for j in np.nonzero(~np.isin(i1[q], i2[q]))[0]:
            assert abs(d1[q, j] - d2[q, -1]) <= rtol * scale[q, 0], f"query {q}: id {i1[q, j]} is not a tie"


# -- array-API core ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("xp", NAMESPACES)
def test_adc_scan_matches_definition(xp):
    rng = np.random.default_rng(0)
    nq, M, ksub, rows = 3, 5, 16, 40
    tables = rng.random((nq, M, ksub)).astype(np.float32)
    codes = rng.integers(0, ksub, size=(rows, M)).astype(np.int32)
    got = np.asarray(S.adc_scan(xp.asarray(tables), xp.asarray(codes)))
    ref = tables[:, np.arange(M)[None, :], codes].sum(-1)
    assert got.shape == (nq, rows) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-6)


@pytest.mark.parametrize("xp", NAMESPACES)
def test_topk_merge_is_a_running_sort_with_low_rows_first(xp):
    rng = np.random.default_rng(1)
    nq, n, k = 4, 50, 7
    dist = rng.integers(0, 12, size=(nq, n)).astype(np.float32)  # many ties
    best_d = xp.full((nq, k), np.inf, dtype=xp.float32)
    best_i = xp.full((nq, k), -1, dtype=xp.int64)
    for start in range(0, n, 9):
        best_d, best_i = S.topk_merge(best_d, best_i, xp.asarray(dist[:, start:start + 9]), start, k)
    order = np.lexsort((np.broadcast_to(np.arange(n), dist.shape), dist), axis=-1)[:, :k]
    assert np.array_equal(np.asarray(best_i), order)
    assert np.array_equal(np.asarray(best_d), np.take_along_axis(dist, order, axis=1))


@pytest.mark.parametrize("xp", NAMESPACES)
def test_array_scanner_equals_numba_scanner(xp):
    cb = random_codebook(24, 6, 5, seed=3)
    x = synthetic(900, 24, seed=4)
    codes = cb.encode(x, backend="cpu")
    q = synthetic(5, 24, seed=5)
    tables = np.asarray(kernels.distance_tables(q, cb.centroids))
    a = S.ArrayScanner(xp.asarray(tables), 10, cb.nbits, scan_bytes=1 << 12)
    b = S.NumbaScanner(tables, 10, cb.nbits)
    for start in range(0, 900, 256):
        a.add(start, codes[start:start + 256])
        b.add(start, codes[start:start + 256])
    (da, ia), (db, ib) = a.result(), b.result()
    assert_same_results(da, ia, db, ib, rtol=1e-5)


# -- parity with faiss IndexPQ ------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["numba", "array_api"])
@pytest.mark.parametrize("nbits,d,M", [(4, 32, 8), (8, 32, 8), (12, 16, 4), (5, 24, 6), (16, 8, 2)])
def test_search_matches_faiss_indexpq(tmp_path, nbits, d, M, engine, monkeypatch):
    if engine == "array_api":
        monkeypatch.setitem(sys.modules, "pqgpu._cpu_adc", None)  # force the array-API engine
    n = 2500
    cb = random_codebook(d, M, nbits, seed=nbits)
    x = synthetic(n, d, seed=nbits + 1)
    codes = cb.encode(x, backend="cpu")
    path = make_store(tmp_path / "s.zarr", cb, codes, chunk_rows=700)  # 4 chunks, the last one partial
    q = synthetic(17, d, seed=nbits + 2)
    dist, ids = S.search(path, q, 20, backend="cpu")
    fd, fi = faiss_index(cb, codes).search(q, 20)
    assert dist.dtype == np.float32 and ids.dtype == np.int64
    assert_same_results(dist, ids, fd, fi * 7 + 3)


def test_search_opq_store_matches_faiss_pretransform(tmp_path):
    cb = random_codebook(32, 8, 8, seed=11, rotation=True)
    x = synthetic(2000, 32, seed=12)
    codes = cb.encode(x, backend="cpu")
    path = make_store(tmp_path / "s.zarr", cb, codes, chunk_rows=512)
    q = synthetic(9, 32, seed=13)
    dist, ids = S.search(path, q, 15, backend="cpu")
    fd, fi = faiss_index(cb, codes).search(q, 15)
    assert_same_results(dist, ids, fd, fi * 7 + 3)


def test_k_larger_than_n_pads_like_faiss(tmp_path):
    cb = random_codebook(16, 4, 4, seed=2)
    x = synthetic(6, 16, seed=3)
    codes = cb.encode(x, backend="cpu")
    path = make_store(tmp_path / "s.zarr", cb, codes, chunk_rows=4)
    q = synthetic(3, 16, seed=4)
    dist, ids = S.search(path, q, 9, backend="cpu")
    fd, fi = faiss_index(cb, codes).search(q, 9)
    assert (ids[:, 6:] == -1).all() and (dist[:, 6:] == np.finfo(np.float32).max).all()
    assert (fi[:, 6:] == -1).all()  # faiss pads with -1 too (and FLT_MAX distances)
    assert_same_results(dist[:, :6], ids[:, :6], fd[:, :6], fi[:, :6] * 7 + 3)


def test_chunk_rows_and_single_query_give_same_results(tmp_path):
    cb = random_codebook(32, 8, 8, seed=5)
    codes = cb.encode(synthetic(3000, 32, seed=6), backend="cpu")
    path = make_store(tmp_path / "s.zarr", cb, codes, chunk_rows=1000)
    q = synthetic(4, 32, seed=7)
    ref = S.search(path, q, 10, backend="cpu")
    for chunk_rows in (333, 5000):
        got = S.search(open_store(path), q, 10, backend="cpu", chunk_rows=chunk_rows)
        assert np.array_equal(got[1], ref[1]) and np.array_equal(got[0], ref[0])
    one = S.search(path, q[:1], 10, backend="cpu")  # 1 query: several partial heaps per query
    assert np.array_equal(one[1], ref[1][:1])


def test_query_batches_for_large_tables(tmp_path, monkeypatch):
    cb = random_codebook(16, 4, 8, seed=8)
    codes = cb.encode(synthetic(1200, 16, seed=9), backend="cpu")
    path = make_store(tmp_path / "s.zarr", cb, codes, chunk_rows=500)
    q = synthetic(11, 16, seed=10)
    ref = S.search(path, q, 5, backend="cpu")
    monkeypatch.setattr(S, "TABLE_BYTES", 3 * 4 * cb.M * cb.ksub)  # 3 queries per pass
    got = S.search(path, q, 5, backend="cpu")
    assert np.array_equal(got[1], ref[1]) and np.array_equal(got[0], ref[0])


def test_string_ids(tmp_path):
    cb = random_codebook(16, 4, 6, seed=1)
    codes = cb.encode(synthetic(300, 16, seed=2), backend="cpu")
    ids = np.array([f"doc-{i}" for i in range(300)])
    path = make_store(tmp_path / "s.zarr", cb, codes, ids=ids, chunk_rows=128)
    q = synthetic(2, 16, seed=3)
    _, got = S.search(path, q, 4, backend="cpu")
    _, fi = faiss_index(cb, codes).search(q, 4)
    assert got.dtype == object and got.tolist() == [[f"doc-{i}" for i in row] for row in fi]
    _, padded = S.search(path, q, 301, backend="cpu")
    assert padded[0, -1] is None


def test_search_errors(tmp_path):
    cb = random_codebook(16, 4, 4, seed=1)
    codes = cb.encode(synthetic(100, 16), backend="cpu")
    path = make_store(tmp_path / "s.zarr", cb, codes, chunk_rows=50)
    with pytest.raises(pqgpu.InputError, match="dimension 8.*d=16"):
        S.search(path, np.zeros((2, 8), np.float32), 3)
    with pytest.raises(pqgpu.ConfigError, match="k: expected a positive integer"):
        S.search(path, np.zeros((2, 16), np.float32), 0)
    with pytest.raises(pqgpu.StoreError, match="No code store"):
        S.search(tmp_path / "missing.zarr", np.zeros((2, 16), np.float32), 3)
    create_store(tmp_path / "part.zarr", codebook=cb, n=100, chunk_rows=50, id_dtype="int64", source={})
    write_chunk(str(tmp_path / "part.zarr"), 0, 0, codes[:50], np.arange(50))
    with pytest.raises(pqgpu.StoreError, match="incomplete.*pqgpu encode"):
        S.search(tmp_path / "part.zarr", np.zeros((2, 16), np.float32), 3)


# -- evaluation -------------------------------------------------------------------------------------------

def test_recall_metrics_definitions():
    found = np.array([[5, 1, 2], [9, 8, 7], [3, -1, -1]])
    gt = np.array([[1, 2, 3], [9, 7, 0], [4, 3, -1]])
    m = recall_metrics(found, gt, (1, 2, 3))
    assert m["1-recall@1"] == pytest.approx(1 / 3)   # only query 1 has its nearest neighbour first
    assert m["1-recall@2"] == pytest.approx(2 / 3)   # query 0 finds row 1 at rank 2
    assert m["2-recall@2"] == pytest.approx((1 + 1 + 1) / 3 / 2)   # -1 never matches
    assert m["3-recall@3"] == pytest.approx((2 + 2 + 1) / 3 / 3)


def exactly_representable(n: int, d: int, M: int, nbits: int, seed: int = 0):
    """A codebook and n distinct vectors that it reconstructs exactly (every sub-vector is a centroid)."""
    rng = np.random.default_rng(seed)
    c = (rng.standard_normal((M, 1 << nbits, d // M)) * 3).astype(np.float32)
    cb = Codebook(d, M, nbits, c)
    sub = np.unique(rng.integers(0, 1 << nbits, size=(n * 2, M)), axis=0)[:n]
    rng.shuffle(sub)
    return cb, np.asarray(kernels.decode(sub, c)), np.asarray(kernels.pack_codes(sub, nbits))


def test_evaluate_on_exactly_representable_data(tmp_path):
    cb, x, codes = exactly_representable(3000, 32, 8, 4)
    assert np.array_equal(cb.encode(x, backend="cpu"), codes)
    path = make_store(tmp_path / "s.zarr", cb, codes, chunk_rows=1024)
    q = x[::150] + 0.01 * np.random.default_rng(1).standard_normal((20, 32)).astype(np.float32)
    res = S.evaluate(path, q, base_chunks=(x[i:i + 700] for i in range(0, 3000, 700)), ks=(1, 10))
    assert res["1-recall@1"] == 1.0 and res["1-recall@10"] == 1.0 and res["10-recall@10"] == 1.0
    assert res["mse"] < 1e-9 and res["relative_mse"] < 1e-10
    assert (res["n"], res["d"], res["M"], res["nbits"], res["code_size"]) == (3000, 32, 8, 4, 4)
    assert res["compression_ratio"] == 32.0 and res["opq"] is False
    # the same numbers from a given ground truth (row indices)
    gt = faiss.knn(q, x, 10)[1]
    res2 = S.evaluate(path, q, ground_truth=gt, ks=(1, 10))
    assert res2["10-recall@10"] == 1.0 and res2["mse"] is None
    table = format_table(res)
    assert "10-recall@10" in table and "1.0000" in table and "compression_ratio" in table


def test_evaluate_mse_and_recall_match_faiss(tmp_path):
    x = synthetic(6000, 32, seed=21)
    cb = pqgpu.train(x[:4000], 8, 6, niter=8, backend="cpu")
    codes = cb.encode(x, backend="cpu")
    path = make_store(tmp_path / "s.zarr", cb, codes, chunk_rows=2500)
    q = synthetic(100, 32, seed=22)
    res = S.evaluate(path, q, base_chunks=[x[:3000], x[3000:]], ks=(1, 10, 100))
    idx = faiss_index(cb, codes)
    _, fi = idx.search(q, 100)
    gt = faiss.knn(q, x, 100)[1]
    assert res["1-recall@10"] == pytest.approx(np.mean([gt[i, 0] in fi[i, :10] for i in range(100)]), abs=0.011)
    assert res["100-recall@100"] == pytest.approx(
        np.mean([len(np.intersect1d(fi[i], gt[i])) / 100 for i in range(100)]), abs=0.002)
    mse = ((idx.reconstruct_n(0, 6000) - x) ** 2).sum(1).mean()
    assert res["mse"] == pytest.approx(mse, rel=1e-4)
    assert res["relative_mse"] == pytest.approx(mse / (x.astype(np.float64) ** 2).sum(1).mean(), rel=1e-4)


def test_evaluate_errors(tmp_path):
    cb, x, codes = exactly_representable(200, 16, 4, 4)
    path = make_store(tmp_path / "s.zarr", cb, codes, chunk_rows=100)
    q = x[:3]
    with pytest.raises(pqgpu.InputError, match="ground_truth .* or the base vectors"):
        S.evaluate(path, q)
    with pytest.raises(pqgpu.InputError, match="recall@100 needs 100"):
        S.evaluate(path, q, ground_truth=np.zeros((3, 10), np.int64))
    with pytest.raises(pqgpu.InputError, match="outside 0..199"):
        S.evaluate(path, q, ground_truth=np.full((3, 100), 500), ks=(1,))
    with pytest.raises(pqgpu.InputError, match="hold 150 rows but the store has 200"):
        S.evaluate(path, q, base_chunks=[x[:150]], ks=(1,))


def test_pq_recall_close_to_faiss_trained_on_the_same_sample():
    d, M, nbits = 32, 8, 6
    xt = synthetic(6000, d, seed=31)
    xb = synthetic(10000, d, seed=32)
    q = synthetic(500, d, seed=33)
    gt = faiss.knn(q, xb, 10)[1]

    def recall(index):
        _, found = index.search(q, 10)
        return recall_metrics(found, gt, (10,))["10-recall@10"]

    # One training run varies by about +-0.005 with the seed (for faiss too): compare means over seeds.
    ours, theirs = [], []
    for seed in (1234, 1, 2, 3):
        cb = pqgpu.train(xt, M, nbits, niter=10, seed=seed, backend="cpu")
        ours.append(recall(faiss_index(cb, cb.encode(xb, backend="cpu"))))
        ref = faiss.IndexPQ(d, M, nbits)
        ref.pq.cp.niter = 10
        ref.pq.cp.seed = seed
        ref.train(xt)
        ref.add(xb)
        theirs.append(recall(ref))
    assert abs(np.mean(ours) - np.mean(theirs)) <= 0.005, (ours, theirs)


# -- export ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["int_ids", "opq", "string_ids"])
def test_exported_index_searches_like_pqgpu(tmp_path, kind):
    cb = random_codebook(32, 8, 8 if kind != "string_ids" else 4, seed=41, rotation=kind == "opq")
    x = synthetic(2200, 32, seed=42)
    codes = cb.encode(x, backend="cpu")
    ids = np.array([f"item/{i}" for i in range(2200)]) if kind == "string_ids" else None
    path = make_store(tmp_path / "s.zarr", cb, codes, ids=ids, chunk_rows=1000)
    out = export_faiss(path, tmp_path / "sub" / "index.faiss")
    assert out.exists() and not list(out.parent.glob(".*tmp*"))
    index = faiss.read_index(str(out))
    q = synthetic(8, 32, seed=43)
    fd, fi = index.search(q, 12)
    dist, got = S.search(path, q, 12, backend="cpu")
    if kind == "string_ids":
        import pyarrow.parquet as pq

        side = pq.read_table(str(out) + ".ids.parquet").to_pydict()
        assert side["row"][:3] == [0, 1, 2] and side["id"][:3] == ["item/0", "item/1", "item/2"]
        fi = np.array([[side["id"][j] for j in row] for row in fi], dtype=object)
        assert np.array_equal(got, fi)
    else:
        assert_same_results(dist, got, fd, fi)
        assert isinstance(index, faiss.IndexIDMap2)
        assert index.reconstruct(3 * 7 + 3).shape == (32,)  # IDMap2: reconstruct by id
    inner = faiss.downcast_index(index.index)
    assert isinstance(inner, faiss.IndexPreTransform if kind == "opq" else faiss.IndexPQ)
    assert index.ntotal == 2200


def test_export_without_faiss_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(pqgpu.PqgpuError, match="pip install faiss-cpu"):
        export_faiss(tmp_path / "s.zarr", tmp_path / "i.faiss")
