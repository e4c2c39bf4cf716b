"""quantizer.metric (l2 | ip | cosine) end to end, against faiss's METRIC_INNER_PRODUCT: codes, IVF lists and
coarse training, flat and IVF search (numba and array-API), quantizer and exported files both ways, the store
attribute, and bad input (unknown name, zero rows and queries, disagreeing metric, unsupported faiss files)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pqgpu import cli
from pqgpu.codebook import Codebook
from pqgpu.config import config_from_dict
from pqgpu.errors import ConfigError, InputError, StoreError
from pqgpu.ivf import IvfCodebook, encode_ivf_xp, read_index, train_ivf
from pqgpu.metric import exact_scores, normalize_rows
from pqgpu.sample import make_sample
from pqgpu.training import train

from .helpers import NAMESPACES, assert_codes_match, synthetic
from .test_ivf import few_opq_rounds, one_faiss_thread  # noqa: F401  (autouse: one faiss thread, 3 OPQ rounds)

faiss = pytest.importorskip("faiss")
D = 32


def varied_norms(n: int, seed: int) -> np.ndarray:
    """Synthetic rows scaled by random factors: inner-product and L2 rankings then differ."""
    x = synthetic(n, D, seed=seed)
    return (x * np.random.default_rng(seed + 50).uniform(0.2, 3.0, (n, 1))).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def seen(x: np.ndarray, metric: str) -> np.ndarray:
    """The rows as faiss indexes them for this metric (cosine: normalised by the test, in float64)."""
    return unit(x) if metric == "cosine" else x


def faiss_flat(cb: Codebook, codes: np.ndarray):
    idx = faiss.IndexPQ(cb.d, cb.M, cb.nbits, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(cb.centroids.ravel(), idx.pq.centroids)
    idx.is_trained = True
    idx.add_sa_codes(codes)
    return idx


def assert_same_scores(s, rows, ref_s, ref_rows, tol=1e-4):
    """Similarities (larger first) equal within tol; rows equal except where scores tie."""
    assert s.shape == ref_s.shape
    scale = np.abs(ref_s).max(axis=1, keepdims=True) + 1e-12
    assert (np.abs(s - ref_s) / scale).max() <= tol
    assert (np.diff(s, axis=1) <= 0).all(), "scores must come largest first"
    for q in range(s.shape[0]):
        for j in np.flatnonzero(~np.isin(rows[q], ref_rows[q])):
            assert abs(s[q, j] - ref_s[q, -1]) <= tol * scale[q, 0], f"query {q}: row {rows[q, j]} is not a tie"


# -- names and normalisation ------------------------------------------------------------------------------

def test_metric_names_are_validated():
    assert config_from_dict({"quantizer": {"metric": "cosine"}}).quantizer.metric == "cosine"
    assert config_from_dict({}).quantizer.metric == "l2"
    with pytest.raises(ConfigError, match=r"quantizer.metric: expected one of l2, ip, cosine. Got 'dot'"):
        config_from_dict({}, ["quantizer.metric=dot"])
    with pytest.raises(ConfigError, match="expected one of l2, ip, cosine"):
        Codebook(8, 2, 2, np.zeros((2, 4, 4), np.float32), metric="IP")


def test_cli_unknown_metric_is_one_paragraph_and_writes_nothing(tmp_path, capsys):
    make_sample(tmp_path / "data", 300, 16, shards=1, fmt="npy")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli.main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--M", "4",
                     "--metric", "dot"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quantizer.metric" in err and "l2, ip, cosine" in err and "'dot'" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("xp", NAMESPACES)
def test_normalize_rows_and_zero_rows(xp):
    x = varied_norms(50, 1)
    got = np.asarray(normalize_rows(xp.asarray(x)))
    np.testing.assert_allclose(got, unit(x), rtol=1e-6, atol=1e-7)
    x[17] = 0
    with pytest.raises(InputError, match=r"row 117 is all zeros"):
        normalize_rows(xp.asarray(x), row_offset=100)


def test_exact_scores_definitions():
    q, x = varied_norms(5, 2), varied_norms(40, 3)
    np.testing.assert_allclose(exact_scores(q, x, "l2"), ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(2))
    np.testing.assert_allclose(exact_scores(q, x, "ip"), q.astype(np.float64) @ x.T.astype(np.float64))
    cos = (q @ x.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(x, axis=1)[None, :]
    np.testing.assert_allclose(exact_scores(q, x, "cosine"), cos, rtol=1e-5)


@pytest.mark.parametrize("xp", NAMESPACES)
def test_assign_ip_is_the_exact_argmax_lowest_on_ties(xp):
    from pqgpu.kernels import assign_ip

    x = varied_norms(600, 4)
    c = varied_norms(40, 5)
    top = int(np.bincount(np.argmax(x @ c.T, axis=1)).argmax())
    c[39] = c[top]  # an exact tie for many rows: the lower list wins, as faiss IndexFlatIP
    got = np.asarray(assign_ip(xp.asarray(x), xp.asarray(c), block_bytes=4 * 40 * 128))  # several blocks
    ref = np.argmax(x.astype(np.float64) @ c.T.astype(np.float64), axis=1)
    np.testing.assert_array_equal(got, ref)
    assert top in got and 39 not in got
    index = faiss.IndexFlatIP(D)
    index.add(c)
    assert (index.assign(x, 1)[:, 0] == got).mean() >= 0.999


# -- flat PQ ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric,opq", [("ip", False), ("cosine", False), ("ip", True), ("cosine", True)])
def test_flat_codes_and_search_equal_faiss_inner_product(metric, opq):
    from pqgpu.search import search_codes

    x = varied_norms(3000, 6)
    cb = train(x, 8, 6, niter=6, seed=1, backend="cpu", metric=metric, opq=opq)
    assert cb.metric == metric and (cb.rotation is not None) == opq
    codes = cb.encode(x, "cpu")
    xs = seen(x, metric)
    assert_codes_match(codes, cb.to_faiss().compute_codes(cb.rotate(xs)), xs, cb.centroids, 6, cb.rotation)
    q = varied_norms(40, 7)
    s, rows = search_codes(q, cb, [(0, codes[:1700]), (1700, codes[1700:])], 10, backend="cpu")
    ref_s, ref_rows = faiss_flat(cb, codes).search(cb.rotate(seen(q, metric)), 10)
    assert_same_scores(s, rows, ref_s, ref_rows)
    assert (rows == ref_rows).mean() >= 0.99
    # inner product ranks differently from L2 on these rows: the test would catch an L2 search
    l2 = Codebook(cb.d, cb.M, cb.nbits, cb.centroids, cb.rotation)
    _, l2_rows = search_codes(q, l2, [(0, codes)], 10, backend="cpu")
    assert (l2_rows != rows).any()


@pytest.mark.parametrize("xp", NAMESPACES)
def test_array_api_inner_product_scan_equals_numba(xp):
    from pqgpu.search import ArrayScanner, NumbaScanner, adc_tables

    x = varied_norms(1500, 8)
    cb = train(x, 8, 5, niter=4, seed=2, backend="cpu", metric="ip")
    codes = cb.encode(x, "cpu")
    q = varied_norms(9, 9)
    tables = np.asarray(adc_tables(q.astype(np.float64), cb.centroids.astype(np.float64), "ip"), np.float32)
    ref = NumbaScanner(tables, 12, cb.nbits)
    arr = ArrayScanner(xp.asarray(np.asarray(adc_tables(xp.asarray(q), xp.asarray(cb.centroids), "ip"))), 12,
                       cb.nbits)
    for start in (0, 600):
        ref.add(start, codes[start:start + 600 if start == 0 else None])
        arr.add(start, codes[start:start + 600 if start == 0 else None])
    d1, r1 = ref.result()
    d2, r2 = arr.result()
    exact = -(q.astype(np.float64) @ cb.decode(codes).T.astype(np.float64))
    np.testing.assert_allclose(d1, np.sort(exact, axis=1)[:, :12], rtol=1e-4, atol=1e-4)
    assert_same_scores(-d2, r2, -d1, r1)


def test_k_larger_than_n_pads_like_faiss():
    from pqgpu.search import search_codes

    x = varied_norms(300, 10)
    cb = train(x, 4, 4, niter=3, backend="cpu", metric="ip")
    codes = cb.encode(x[:5], "cpu")
    s, rows = search_codes(x[:3], cb, [(0, codes)], 8, backend="cpu")
    ref_s, ref_rows = faiss_flat(cb, codes).search(x[:3], 8)
    np.testing.assert_array_equal(rows[:, 5:], ref_rows[:, 5:])
    np.testing.assert_array_equal(s[:, 5:], ref_s[:, 5:])  # -FLT_MAX, as faiss


def test_flat_quantizer_file_records_the_metric_beside_it(tmp_path):
    x = varied_norms(400, 11)
    cb = train(x, 4, 4, niter=3, backend="cpu", metric="cosine")
    path = tmp_path / "pq.faiss"
    cb.save(path)
    assert (tmp_path / "pq.faiss.metric").read_text().strip() == "cosine"
    faiss.read_ProductQuantizer(str(path))  # still faiss's own file
    back = Codebook.load(path)
    assert back.metric == "cosine" and back.fingerprint() == cb.fingerprint()
    assert Codebook(cb.d, cb.M, cb.nbits, cb.centroids).fingerprint() != cb.fingerprint()
    Codebook(cb.d, cb.M, cb.nbits, cb.centroids).save(path)  # retrained as l2 at the same path
    assert not (tmp_path / "pq.faiss.metric").exists() and Codebook.load(path).metric == "l2"


# -- IVF ----------------------------------------------------------------------------------------------------

def faiss_ivfpq(metric: str, opq: bool, nlist: int = 16):
    factory = ("L2norm," if metric == "cosine" else "") + ("OPQ8," if opq else "") + f"IVF{nlist},PQ8x6"
    index = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
    if opq:
        vt = faiss.downcast_VectorTransform(index.chain.at(index.chain.size() - 1))
        vt.niter, vt.niter_pq, vt.niter_pq_0 = 2, 2, 2
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.niter = 6
    ivf.pq.cp.niter = 6
    ivf.do_polysemous_training = False
    return index, ivf


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_ivf_training_is_faiss_spherical_inner_product(metric):
    x = varied_norms(4000, 12)
    cb = train_ivf(x, 8, 6, 16, niter=6, seed=3, backend="cpu", metric=metric)
    assert cb.metric == metric
    np.testing.assert_allclose(np.linalg.norm(cb.coarse, axis=1), 1.0, rtol=1e-5)  # spherical, as faiss
    index, ivf = faiss_ivfpq(metric, opq=False)
    index.train(x)
    ref_coarse = ivf.quantizer.reconstruct_n(0, 16)
    np.testing.assert_allclose(np.linalg.norm(ref_coarse, axis=1), 1.0, rtol=1e-5)
    xs = seen(x, metric)
    ours, theirs = (xs @ cb.coarse.T).max(1).mean(), (xs @ ref_coarse.T).max(1).mean()
    assert ours >= theirs * 0.99, (ours, theirs)  # the k-means objective (larger is better) as good as faiss's
    # with faiss's own coarse centroids, our lists are faiss's assignment and our residual PQ is trained alike
    lists, _ = IvfCodebook(D, 8, 6, cb.centroids, metric=metric, coarse=ref_coarse).encode_ivf(x, "cpu")
    np.testing.assert_array_equal(lists, ivf.quantizer.assign(xs, 1)[:, 0])


@pytest.mark.parametrize("xp", NAMESPACES)
def test_spherical_kmeans_runs_alike_on_every_namespace(xp):
    from pqgpu.kmeans import InnerProductEngine, train_subquantizers

    x = unit(varied_norms(1200, 23))
    ref = train_subquantizers(x, 1, 12, niter=4, seed=2, engine=InnerProductEngine(), spherical=True)
    got = train_subquantizers(xp.asarray(x), 1, 12, niter=4, seed=2, engine=InnerProductEngine(), spherical=True)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got[0], axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("xp", NAMESPACES)
@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_ivf_lists_and_codes_equal_faiss(metric, xp):
    x = varied_norms(3000, 13)
    cb = train_ivf(x, 8, 6, 16, niter=4, seed=4, backend="cpu", metric=metric, opq=True)
    lists, codes = cb.encode_ivf(x, "cpu")
    y = cb.rotate(seen(x, metric))
    quantizer = faiss.IndexFlatIP(D)
    quantizer.add(cb.coarse)
    np.testing.assert_array_equal(lists, quantizer.assign(y, 1)[:, 0])
    residual = np.ascontiguousarray(y - cb.coarse[lists])
    assert_codes_match(codes, cb.pq.to_faiss().compute_codes(residual), residual, cb.centroids, 6)
    lists_xp, codes_xp = encode_ivf_xp(x[:700], cb, xp)
    np.testing.assert_array_equal(lists_xp, lists[:700])
    assert (codes_xp == codes[:700]).all(axis=1).mean() >= 0.999


def test_inner_product_probes_are_faiss_flat_ip_search():
    from pqgpu import _ivf_cpu
    from pqgpu.ivf_search import coarse_distances, select_probes

    y, coarse = varied_norms(37, 24), unit(varied_norms(50, 25))
    probe = np.empty((37, 7), np.int64)
    pdist = np.empty((37, 7), np.float32)
    _ivf_cpu.probe_lists(y, np.ascontiguousarray(coarse.T), np.zeros(50, np.float32), probe, pdist, True)
    flat_ip = faiss.IndexFlatIP(D)
    flat_ip.add(coarse)
    ref_d, ref_l = flat_ip.search(y, 7)
    np.testing.assert_array_equal(probe, ref_l)
    np.testing.assert_allclose(-pdist, ref_d, rtol=1e-5, atol=1e-5)
    p2, d2 = select_probes(coarse_distances(y, coarse, None, "ip"), 7, use_numba=False)  # the GPU route's
    np.testing.assert_array_equal(p2, probe)


@pytest.mark.parametrize("metric,opq", [("ip", False), ("cosine", True)])
def test_ivf_quantizer_file_is_faiss_inner_product_index(tmp_path, metric, opq):
    x = varied_norms(2500, 14)
    cb = train_ivf(x, 8, 6, 16, niter=3, seed=5, backend="cpu", metric=metric, opq=opq)
    path = tmp_path / "ivf.faiss"
    cb.save(path)
    assert not (tmp_path / "ivf.faiss.metric").exists()  # the index says it itself
    index = faiss.read_index(str(path))
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert ivf.metric_type == faiss.METRIC_INNER_PRODUCT and isinstance(faiss.downcast_index(ivf.quantizer),
                                                                        faiss.IndexFlatIP)
    if metric == "cosine":  # faiss's L2norm first, then the rotation
        assert isinstance(faiss.downcast_VectorTransform(index.chain.at(0)), faiss.NormalizationTransform)
    faiss.write_index(index, str(tmp_path / "again.faiss"))
    assert (tmp_path / "again.faiss").read_bytes() == path.read_bytes()
    back = IvfCodebook.load(path)
    assert back.metric == metric and back.fingerprint() == cb.fingerprint()


@pytest.mark.parametrize("metric,opq", [("ip", False), ("cosine", False), ("ip", True), ("cosine", True)])
def test_reads_faiss_trained_inner_product_index(tmp_path, metric, opq):
    x = varied_norms(2500, 15)
    index, ivf = faiss_ivfpq(metric, opq)
    index.train(x)
    index.add_with_ids(x, np.arange(2500, dtype=np.int64) * 3 + 1)
    faiss.write_index(index, str(tmp_path / "f.faiss"))
    cb, sizes, lists = read_index(tmp_path / "f.faiss", with_lists=True)
    assert cb.metric == metric and (cb.rotation is not None) == opq and sizes.sum() == 2500
    where = {int(i): lst for lst, (_, ids) in enumerate(lists) for i in ids}
    mine, _ = cb.encode_ivf(x, "cpu")
    assert (mine == np.array([where[int(i) * 3 + 1] for i in range(2500)])).mean() >= 0.999


def test_refuses_inner_product_index_with_unsupported_opq(tmp_path, capsys):
    index = faiss.index_factory(D, "OPQ8_16,IVF8,PQ8x4", faiss.METRIC_INNER_PRODUCT)  # OPQ to 16 dimensions
    vt = faiss.downcast_VectorTransform(index.chain.at(0))
    vt.niter, vt.niter_pq, vt.niter_pq_0 = 1, 1, 1
    faiss.downcast_index(faiss.extract_index_ivf(index)).cp.niter = 2
    index.train(varied_norms(1000, 16))
    faiss.write_index(index, str(tmp_path / "f.faiss"))
    with pytest.raises(InputError, match="expected a square rotation"):
        read_index(tmp_path / "f.faiss")
    make_sample(tmp_path / "data", 200, D, shards=1, fmt="npy")
    assert cli.main(["encode", str(tmp_path / "data"), "--set", f"quantizer.path={tmp_path}/f.faiss",
                     "--set", "quantizer.nlist=8", "--set", f"encode.output={tmp_path}/codes.zarr"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "f.faiss" in err and "square rotation" in err, err
    assert not (tmp_path / "codes.zarr").exists()


# -- the pipeline ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            yield c


def write_source(path: Path, x: np.ndarray, shards: int = 2) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(x, shards)):
        np.save(path / f"part-{i}.npy", part)


def metric_config(root: Path, metric: str, nlist: int, opq: bool = False, **q):
    return config_from_dict({
        "source": {"format": "npy", "path": str(root / "data")},
        "quantizer": {"path": str(root / "pq.faiss"), "M": 8, "nbits": 6, "opq": opq, "metric": metric,
                      "nlist": nlist, "train_size": 3000, "niter": 4, **q},
        "encode": {"output": str(root / "codes.zarr"), "chunk_rows": 800, "backend": "cpu"},
    })


@pytest.fixture(scope="module", params=[("ip", 0, False), ("cosine", 0, True), ("ip", 16, True),
                                        ("cosine", 16, False)],
                ids=["flat-ip", "flat-cosine-opq", "ivf-ip-opq", "ivf-cosine"])
def built(request, tmp_path_factory, client):
    from pqgpu.pipeline import run
    from pqgpu.store import open_store

    metric, nlist, opq = request.param
    root = tmp_path_factory.mktemp("metric")
    x = varied_norms(2600, 17)
    write_source(root / "data", x)
    cfg = metric_config(root, metric, nlist, opq)
    run(cfg, client=client)
    return cfg, open_store(cfg.encode.output), x


def test_store_records_metric_and_codes_equal_faiss(built, capsys):
    cfg, store, x = built
    metric, nlist = cfg.quantizer.metric, cfg.quantizer.nlist
    assert store.attrs["metric"] == metric and store.info()["metric"] == metric
    assert cli.main(["info", store.path]) == 0
    assert f"metric: {metric}" in capsys.readouterr().out
    cb = store.codebook()
    assert cb.metric == metric
    if nlist:  # faiss's own add on the quantizer file (which normalises itself for cosine)
        index = faiss.read_index(cfg.quantizer.path)
        index.add(x)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        y = cb.rotate(seen(x, metric))
        lists = store.group["lists"][...]
        np.testing.assert_array_equal(lists, ivf.quantizer.assign(y, 1)[:, 0])
        residual = np.ascontiguousarray(y - cb.coarse[lists])
        assert_codes_match(store.codes[...], ivf.pq.compute_codes(residual), residual, cb.centroids, cb.nbits)
    else:
        xs = cb.rotate(seen(x, metric))
        assert_codes_match(store.codes[...], cb.to_faiss().compute_codes(xs), xs, cb.centroids, cb.nbits)


def test_search_and_export_equal_faiss(built, tmp_path):
    from pqgpu.export import export_faiss
    from pqgpu.search import search

    cfg, store, x = built
    q = varied_norms(30, 18)
    nprobe = 5 if cfg.quantizer.nlist else None
    s, ids = search(store, q, 10, nprobe=nprobe, backend="cpu")
    out = tmp_path / "exported.faiss"
    export_faiss(store, out)
    index = faiss.read_index(str(out))
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    if nprobe:
        faiss.extract_index_ivf(index).nprobe = nprobe
    ref_s, ref_ids = index.search(q, 10)  # raw queries: the cosine index normalises them itself
    assert_same_scores(s, ids, ref_s, ref_ids)
    assert (ids == ref_ids).mean() >= 0.99


@pytest.mark.parametrize("xp", NAMESPACES)
def test_ivf_array_api_search_equals_numba(built, xp):
    from pqgpu.ivf_search import search_ivf_store

    cfg, store, _ = built
    if not cfg.quantizer.nlist:
        pytest.skip("flat store: covered by test_array_api_inner_product_scan_equals_numba")
    q = varied_norms(12, 19)
    s, rows = search_ivf_store(store, q, 7, nprobe=4, backend="cpu")
    s2, rows2 = search_ivf_store(store, q, 7, nprobe=4, xp=xp)
    assert_same_scores(s2, rows2, s, rows)


def test_evaluate_uses_the_metric(built):
    from pqgpu.search import evaluate

    cfg, store, x = built
    q = varied_norms(20, 20)
    res = evaluate(store, q, base_chunks=[x[:1000], x[1000:]], ks=(1, 10), nprobes=[16] if cfg.quantizer.nlist
                   else None, backend="cpu")
    assert res["metric"] == cfg.quantizer.metric
    exact = exact_scores(q, x, cfg.quantizer.metric)
    gt = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    from pqgpu.search import search

    _, rows = search(store, q, 10, nprobe=16 if cfg.quantizer.nlist else None, backend="cpu")
    key = "10-recall@10" + (" (nprobe=16)" if cfg.quantizer.nlist else "")
    expected = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(rows, gt)])
    assert res[key] == pytest.approx(expected) and expected > 0.3


def test_zero_query_under_cosine_is_refused(built, tmp_path, capsys):
    cfg, store, _ = built
    if cfg.quantizer.metric != "cosine":
        pytest.skip("only cosine normalises queries")
    q = varied_norms(4, 21)
    q[2] = 0
    np.save(tmp_path / "q.npy", q)
    args = ["search", store.path, "--queries", str(tmp_path / "q.npy"), "--out", str(tmp_path / "r.parquet")]
    assert cli.main(args + (["--nprobe", "2"] if cfg.quantizer.nlist else [])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "queries: row 2 is all zeros" in err, err
    assert not (tmp_path / "r.parquet").exists()


def test_metric_disagreeing_with_quantizer_or_store_is_refused(built, tmp_path, capsys):
    import shutil

    cfg, store, _ = built
    other = "l2"
    root = Path(cfg.quantizer.path).parent
    snapshot = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    # the existing quantizer has the built metric: a config asking for another one is refused
    for command in ("run", "encode"):
        assert cli.main([command, str(root / "data"), "--set", f"quantizer.path={cfg.quantizer.path}",
                         "--set", f"quantizer.nlist={cfg.quantizer.nlist}", "--M", "8", "--nbits", "6",
                         "--set", f"quantizer.opq={str(cfg.quantizer.opq).lower()}", "--metric", other,
                         "--set", f"encode.output={tmp_path}/new.zarr"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"metric={cfg.quantizer.metric}" in err and "metric=l2" in err, err
        assert not (tmp_path / "new.zarr").exists()
    # a quantizer of another metric (same M, nbits, OPQ) meeting the existing store: refused, store untouched
    cb = store.codebook()
    swapped = shutil.copy(cfg.quantizer.path, tmp_path / "q.faiss")
    if cb.rotation is not None and not cfg.quantizer.nlist:
        shutil.copy(cfg.quantizer.path + ".opq", tmp_path / "q.faiss.opq")
    if cfg.quantizer.nlist:
        IvfCodebook(cb.d, cb.M, cb.nbits, cb.centroids, cb.rotation, other, coarse=cb.coarse).save(swapped)
    else:
        Codebook(cb.d, cb.M, cb.nbits, cb.centroids, cb.rotation, other).save(swapped)
    from pqgpu.pipeline import encode

    want = metric_config(root, other, cfg.quantizer.nlist, cfg.quantizer.opq, path=str(swapped))
    with pytest.raises(StoreError, match=f"made with metric {cfg.quantizer.metric}, the quantizer now has metric l2"):
        encode(want)
    assert {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} == snapshot


def test_zero_row_under_cosine_names_file_and_row(tmp_path, capsys):
    x = varied_norms(600, 22)
    x[437] = 0  # second shard (rows 300..599), its row 137
    write_source(tmp_path / "data", x)
    args = ["-q", "run", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--M", "8", "--nbits", "4",
            "--metric", "cosine", "--set", "quantizer.train_size=600", "--set", "quantizer.niter=2"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "part-1.npy: row 137" in err and "all zeros" in err, err
    assert not (tmp_path / "out" / "pq.faiss").exists() and not (tmp_path / "out" / "codes.zarr").exists()
    # a zero row the training sample missed is refused by the encode task, naming it the same way
    from pqgpu.config import SourceConfig
    from pqgpu.sources import open_source
    from pqgpu.tasks import check_vectors

    src = open_source(SourceConfig(format="npy", path=str(tmp_path / "data")))
    with pytest.raises(InputError, match=r"part-1.npy: row 137 \(global row 437\) is all zeros"):
        check_vectors(src, x[400:500], 400, D, "cosine")
    check_vectors(src, x[400:500], 400, D, "ip")  # ip keeps zero rows: their score is 0


# -- GPU (CuPy): the same code on the device; skipped without one, run by the GPU check's `pytest -m gpu` -------

def _gpu_reason() -> str | None:
    from pqgpu.backend import gpu_status

    ok, reason = gpu_status()
    return None if ok else reason


gpu = pytest.mark.skipif(_gpu_reason() is not None, reason=f"needs a CUDA GPU: {_gpu_reason()}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_gpu_flat_metric_codes_and_search_equal_faiss(metric):
    from pqgpu.search import search_codes

    x = varied_norms(3000, 30)
    cb = train(x, 8, 8, niter=4, seed=1, backend="gpu", metric=metric)
    codes = cb.encode(x, "gpu")  # cosine: normalised on the device (backend.encode_blocks)
    xs = seen(x, metric)
    assert_codes_match(codes, cb.to_faiss().compute_codes(xs), xs, cb.centroids, 8)
    q = varied_norms(25, 31)
    s, rows = search_codes(q, cb, [(0, codes)], 10, backend="gpu")
    ref_s, ref_rows = faiss_flat(cb, codes).search(seen(q, metric), 10)
    assert_same_scores(s, rows, ref_s, ref_rows)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_gpu_ivf_metric_lists_and_search_equal_faiss(tmp_path, metric):
    from pqgpu.ivf_search import search_ivf_store
    from pqgpu.pipeline import run
    from pqgpu.store import open_store

    x = varied_norms(2600, 32)
    write_source(tmp_path / "data", x)
    cfg = metric_config(tmp_path, metric, 16, True)
    cfg = cfg.replace(encode=dataclasses.replace(cfg.encode, backend="gpu"))
    run(cfg)
    store = open_store(cfg.encode.output)
    cb = store.codebook()
    np.testing.assert_allclose(np.linalg.norm(cb.coarse, axis=1), 1.0, rtol=1e-5)
    quantizer = faiss.IndexFlatIP(D)
    quantizer.add(cb.coarse)
    np.testing.assert_array_equal(store.group["lists"][...], quantizer.assign(cb.rotate(seen(x, metric)), 1)[:, 0])
    q = varied_norms(20, 33)
    s, rows = search_ivf_store(store, q, 10, nprobe=4, backend="gpu")
    index = faiss.read_index(cfg.quantizer.path)
    index.add(x)
    faiss.extract_index_ivf(index).nprobe = 4
    ref_s, ref_rows = index.search(q, 10)
    assert_same_scores(s, rows, ref_s, ref_rows)
