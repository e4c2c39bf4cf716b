"""IVF-PQ: faiss IndexIVFPQ files both ways, lists and residual codes vs faiss, the inverted layout vs faiss's
own `add`, nprobe search and export vs faiss search, resume after a kill, and bad input."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pqgpu
from pqgpu import cli
from pqgpu.config import config_from_dict
from pqgpu.errors import ConfigError, InputError, PqgpuError
from pqgpu.ivf import IvfCodebook, encode_ivf_xp, read_index, train_ivf
from pqgpu.sample import make_sample

from .helpers import NAMESPACES, assert_codes_match, synthetic

faiss = pytest.importorskip("faiss")


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """OpenMP threads spin badly on a busy 2-core machine; these tests are small."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(autouse=True)
def few_opq_rounds(monkeypatch):
    """3 OPQ rounds instead of faiss's 50: the tests check where the rotation goes, not how good it is."""
    monkeypatch.setattr("pqgpu.opq.OPQ_ITER", 3)


def faiss_ivf(index):
    return faiss.downcast_index(faiss.extract_index_ivf(index))


def faiss_invlists(ivf):
    """[(ids, codes)] per list of a faiss IndexIVF."""
    inv = ivf.invlists
    out = []
    for lst in range(ivf.nlist):
        size = inv.list_size(lst)
        ids = faiss.rev_swig_ptr(inv.get_ids(lst), size).copy() if size else np.zeros(0, np.int64)
        codes = (faiss.rev_swig_ptr(inv.get_codes(lst), size * ivf.code_size).copy().reshape(size, ivf.code_size)
                 if size else np.zeros((0, ivf.code_size), np.uint8))
        out.append((ids, codes))
    return out


def assert_lists_match(ours, x_rot, coarse, min_rows=0.9999):
    """Our lists equal faiss quantizer.assign on >= min_rows rows; every difference is a float32 tie."""
    q = faiss.IndexFlatL2(coarse.shape[1])
    q.add(coarse)
    ref = q.assign(np.ascontiguousarray(x_rot, dtype=np.float32), 1)[:, 0]
    assert (ours == ref).mean() >= min_rows
    for i in np.flatnonzero(ours != ref):
        a = ((x_rot[i].astype(np.float64) - coarse[ours[i]]) ** 2).sum()
        b = ((x_rot[i].astype(np.float64) - coarse[ref[i]]) ** 2).sum()
        assert abs(a - b) <= 1e-5 * ((x_rot[i].astype(np.float64) ** 2).sum() + 1e-30), f"row {i} is not a tie"


def assert_same_topk(d, rows, ref_d, ref_rows, tol=1e-4):
    """Same distances, and the same results except where distances tie: codes of nbits=4 repeat, and
    faiss and we order equal distances differently. Every result strictly better than the k-th must match."""
    np.testing.assert_allclose(d, ref_d, rtol=tol, atol=tol)
    for q in range(d.shape[0]):
        kth = ref_d[q, -1]
        strict = ref_d[q] < kth - tol * (1 + abs(kth))
        assert set(ref_rows[q][strict].tolist()) <= set(rows[q].tolist()), f"query {q}: {rows[q]} vs {ref_rows[q]}"
    same = np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(rows, ref_rows)])
    assert same >= 0.99, same


# -- the faiss file format --------------------------------------------------------------------------------

@pytest.mark.parametrize("opq", [False, True])
def test_trained_index_file_is_what_faiss_writes(tmp_path, opq):
    x = synthetic(3000, 32, seed=1)
    cb = train_ivf(x, 8, 6, 16, niter=4, seed=0, backend="cpu", opq=opq)
    path = tmp_path / "ivf.faiss"
    cb.save(path)
    index = faiss.read_index(str(path))
    assert isinstance(index, faiss.IndexPreTransform if opq else faiss.IndexIVFPQ)
    ivf = faiss_ivf(index)
    assert (ivf.nlist, ivf.pq.M, ivf.pq.nbits, ivf.by_residual, index.ntotal, index.is_trained) == (16, 8, 6, True, 0,
                                                                                                      True)
    np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, 16), cb.coarse)
    np.testing.assert_array_equal(faiss.vector_to_array(ivf.pq.centroids).reshape(cb.centroids.shape), cb.centroids)
    # faiss writes back the very same bytes
    faiss.write_index(index, str(tmp_path / "again.faiss"))
    assert (tmp_path / "again.faiss").read_bytes() == path.read_bytes()
    back = IvfCodebook.load(path)
    assert back.fingerprint() == cb.fingerprint()


@pytest.mark.parametrize("factory", ["IVF16,PQ8x4", "OPQ8,IVF16,PQ8"])
def test_reads_index_faiss_trained_and_filled(tmp_path, factory):
    x = synthetic(2000, 32, seed=2)
    index = faiss.index_factory(32, factory)
    if "OPQ" in factory:  # faiss's default OPQ rounds take minutes on a busy machine
        opq = faiss.downcast_VectorTransform(index.chain.at(0))
        opq.niter, opq.niter_pq, opq.niter_pq_0 = 2, 2, 2
    ivf = faiss_ivf(index)
    ivf.cp.niter = 3
    ivf.pq.cp.niter = 3
    ivf.do_polysemous_training = False  # index_factory turns it on; it takes a minute and changes nothing here
    index.train(x)
    ids = np.arange(x.shape[0], dtype=np.int64) * 7 + 3
    index.add_with_ids(x, ids)
    faiss.write_index(index, str(tmp_path / "f.faiss"))
    cb, sizes, lists = read_index(tmp_path / "f.faiss", with_lists=True)
    np.testing.assert_array_equal(cb.coarse, ivf.quantizer.reconstruct_n(0, 16))
    np.testing.assert_array_equal(cb.centroids.ravel(), faiss.vector_to_array(ivf.pq.centroids))
    if "OPQ" in factory:
        a = faiss.vector_to_array(faiss.downcast_VectorTransform(index.chain.at(0)).A).reshape(32, 32)
        np.testing.assert_array_equal(cb.rotation, a)
    for (ours_codes, ours_ids), (ref_ids, ref_codes) in zip(lists, faiss_invlists(ivf)):
        np.testing.assert_array_equal(ours_ids, ref_ids)
        np.testing.assert_array_equal(ours_codes, ref_codes)
    assert sizes.sum() == x.shape[0]
    # and our encoder puts every row where faiss's add did, with the same code
    lists_ours, codes_ours = cb.encode_ivf(x, "cpu")
    where = {int(i): lst for lst, (_, ids_l) in enumerate(lists) for i in ids_l}
    ref_list = np.array([where[int(i)] for i in ids])
    assert (lists_ours == ref_list).mean() >= 0.999


# -- lists and residual codes vs faiss --------------------------------------------------------------------

@pytest.mark.parametrize("nbits", [4, 8, 12])
def test_lists_and_codes_match_faiss(nbits):
    # centroids drawn from the data (training quality is beside the point here): faiss encodes with them
    rng = np.random.default_rng(nbits)
    x = synthetic(6000, 32, seed=3)
    coarse = x[rng.choice(6000, 24, replace=False)]
    resid = x - coarse[rng.integers(0, 24, 6000)]
    centroids = resid[rng.choice(6000, 1 << nbits, replace=False)].reshape(1 << nbits, 4, 8).transpose(1, 0, 2)
    cb = IvfCodebook(32, 4, nbits, centroids, coarse=coarse)
    xq = synthetic(2000, 32, seed=4)
    lists, codes = cb.encode_ivf(xq, "cpu")
    assert lists.dtype == np.int32 and codes.shape == (2000, cb.code_size)
    assert_lists_match(lists, xq, cb.coarse)
    quantizer = faiss.IndexFlatL2(32)
    quantizer.add(cb.coarse)
    residual = np.empty_like(xq)
    keys = lists.astype(np.int64)
    quantizer.compute_residual_n(xq.shape[0], faiss.swig_ptr(xq), faiss.swig_ptr(residual), faiss.swig_ptr(keys))
    assert_codes_match(codes, cb.pq.to_faiss().compute_codes(residual), residual, cb.centroids, nbits)


@pytest.mark.parametrize("xp", NAMESPACES)
def test_array_api_encode_equals_cpu(xp):
    x = synthetic(3000, 32, seed=5)
    cb = train_ivf(x, 8, 8, 16, niter=3, seed=1, backend="cpu", opq=True)
    lists, codes = cb.encode_ivf(x[:800], "cpu")
    lists_xp, codes_xp = encode_ivf_xp(x[:800], cb, xp)
    assert (lists == lists_xp).mean() >= 0.999
    same = lists == lists_xp
    assert (codes[same] == codes_xp[same]).all(axis=1).mean() >= 0.999


# -- the pipeline: store, inverted layout, search, export --------------------------------------------------

@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            yield c


def ivf_config(tmp_path, *, nbits=8, opq=False, nlist=24, string_ids=False, chunk_rows=700, train_size=2500):
    data = tmp_path / "data"
    return config_from_dict({
        "source": {"format": "parquet", "path": str(data / "*.parquet"), "id_column": "id"},
        "quantizer": {"path": str(tmp_path / "ivf.faiss"), "M": 8, "nbits": nbits, "opq": opq, "nlist": nlist,
                      "train_size": train_size, "niter": 5},
        "encode": {"output": str(tmp_path / "codes.zarr"), "chunk_rows": chunk_rows, "backend": "cpu"},
    })


def source_vectors(cfg):
    from pqgpu.sources import open_source

    src = open_source(cfg.source)
    parts = [(x, ids) for _, x, ids in src.iter_chunks(100_000)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@pytest.fixture(scope="module", params=[(8, False, False), (4, True, True)], ids=["nbits8", "nbits4-opq-strids"])
def built(request, tmp_path_factory, client):
    from pqgpu.pipeline import run
    from pqgpu.store import open_store

    nbits, opq, string_ids = request.param
    tmp = tmp_path_factory.mktemp("ivf")
    make_sample(tmp / "data", 3001, 32, shards=3, fmt="parquet", string_ids=string_ids)
    cfg = ivf_config(tmp, nbits=nbits, opq=opq, string_ids=string_ids)
    run(cfg, client=client)
    x, ids = source_vectors(cfg)
    index = faiss.read_index(cfg.quantizer.path)
    index.add_with_ids(x, np.arange(x.shape[0], dtype=np.int64))  # faiss's own add, labelled by row
    return cfg, open_store(cfg.encode.output), x, ids, index


def test_store_lists_codes_and_layout_equal_faiss_add(built):
    cfg, store, x, ids, index = built
    cb = store.codebook()
    ivf = faiss_ivf(index)
    lists = store.group["lists"][...]
    codes = store.codes[...]
    y = cb.rotate(x)
    assert_lists_match(lists, y, cb.coarse)
    residual = y - cb.coarse[lists]
    assert_codes_match(codes, ivf.pq.compute_codes(np.ascontiguousarray(residual)), residual, cb.centroids, cb.nbits)
    offsets = store.group["ivf/offsets"][...]
    inv_codes, inv_rows = store.group["ivf/codes"][...], store.group["ivf/rows"][...]
    same = 0
    for lst, (ref_rows, ref_codes) in enumerate(faiss_invlists(ivf)):
        a, b = offsets[lst], offsets[lst + 1]
        if np.array_equal(inv_rows[a:b], ref_rows):
            np.testing.assert_array_equal(inv_codes[a:b], ref_codes)
            same += 1
    assert same == cb.nlist  # non-degenerate data: no coarse ties, so every list is faiss's, row for row
    assert np.array_equal(np.sort(inv_rows), np.arange(store.n))
    if "ids" in store.group["ivf"]:
        np.testing.assert_array_equal(store.group["ivf/ids"][...], ids[inv_rows])


@pytest.mark.parametrize("nprobe", [1, 5, 24])
def test_search_equals_faiss(built, nprobe):
    from pqgpu.ivf_search import search_ivf_store
    from pqgpu.search import search

    cfg, store, x, ids, index = built
    q = synthetic(60, 32, seed=9)
    faiss_ivf(index).nprobe = nprobe
    ref_d, ref_rows = index.search(q, 10)
    d, rows = search_ivf_store(store, q, 10, nprobe=nprobe, backend="cpu")
    assert_same_topk(d, rows, ref_d, ref_rows)
    if store.codebook().nbits == 8:  # no repeated codes to tie: the very same ids in the same order
        assert (rows == ref_rows).mean() >= 0.999
    _, found_ids = search(store, q, 10, nprobe=nprobe, backend="cpu")
    assert (found_ids == ids[rows]).all()


@pytest.mark.parametrize("xp", NAMESPACES)
def test_array_api_search_equals_numba(built, xp):
    from pqgpu.ivf_search import search_ivf_store

    _, store, *_ = built
    q = synthetic(20, 32, seed=10)
    d, rows = search_ivf_store(store, q, 7, nprobe=3, backend="cpu")
    d2, rows2 = search_ivf_store(store, q, 7, nprobe=3, xp=xp)
    assert_same_topk(d2, rows2, d, rows)


def test_export_equals_faiss_add(built, tmp_path):
    from pqgpu.export import export_faiss

    cfg, store, x, ids, index = built
    out = tmp_path / "exported.faiss"
    if ids.dtype.kind not in "iu":
        with pytest.raises(InputError, match="string ids"):
            export_faiss(store, out)
        assert not out.exists()
        return
    export_faiss(store, out)
    exported = faiss.read_index(str(out))
    assert exported.ntotal == store.n
    ref = faiss.read_index(cfg.quantizer.path)
    ref.add_with_ids(x, ids)
    for (a_ids, a_codes), (b_ids, b_codes) in zip(faiss_invlists(faiss_ivf(exported)), faiss_invlists(faiss_ivf(ref))):
        np.testing.assert_array_equal(a_ids, b_ids)
        np.testing.assert_array_equal(a_codes, b_codes)
    # faiss's search on our file returns what our search returns
    from pqgpu.search import search

    q = synthetic(50, 32, seed=11)
    faiss_ivf(exported).nprobe = 4
    f_d, f_ids = exported.search(q, 10)
    our_d, our_ids = search(store, q, 10, nprobe=4, backend="cpu")
    assert (f_ids == our_ids).mean() >= 0.999
    np.testing.assert_allclose(our_d, f_d, rtol=1e-4, atol=1e-4)


def _unbuilt_copy(store, path, **attrs):
    """A copy of the store at path with its inverted layout marked unbuilt (attrs added); returns the
    original layout's arrays to compare the rebuilt one with."""
    from pqgpu.store import open_store

    shutil.copytree(store.path, path)
    ref = {name: store.group[f"ivf/{name}"][...] for name in ("codes", "rows", "offsets")}
    g = open_store(path, mode="r+").group
    g["ivf"].attrs.update({"complete": False, "starts_done": False, **attrs})
    return ref, g


def _build_killed(path, fault):
    """build_inverted(path) in a child process with PQGPU_FAULT=fault, which must SIGKILL it."""
    code = "import sys; from pqgpu.invert import build_inverted; build_inverted(sys.argv[1])"
    env = dict(os.environ, PQGPU_FAULT=fault, PYTHONPATH=str(Path(pqgpu.__file__).resolve().parents[1]),
               PQGPU_INVERT_IN_MEMORY_BYTES=os.environ.get("PQGPU_INVERT_IN_MEMORY_BYTES", "0"))  # the task route
    r = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr


def test_inverted_layout_resumes_byte_identically_after_kill(built, tmp_path):
    from pqgpu.invert import build_inverted
    from pqgpu.store import open_store

    _, store, *_ = built
    path = tmp_path / "copy.zarr"
    ref, g = _unbuilt_copy(store, path)
    g["ivf/codes"][...] = 0
    _build_killed(path, "ivf-scatter:2:kill")
    g = open_store(path).group
    # killed in piece 2's task before its flag (the others run two at a time: any of them may be done)
    assert not g["ivf/scatter_done"][2] and not g["ivf"].attrs["complete"]
    _build_killed(path, "ivf-copy:1:kill")
    assert open_store(path).group["ivf/scatter_done"][...].all()
    build_inverted(path)
    g = open_store(path).group
    assert g["ivf"].attrs["complete"] and not (tmp_path / "copy.zarr.ivf-staging").exists()
    for name, want in ref.items():
        np.testing.assert_array_equal(g[f"ivf/{name}"][...], want)


def test_in_memory_inversion_writes_the_task_routes_bytes(built, tmp_path, monkeypatch):
    """A layout small enough is inverted in this process in memory (no staging files, no tasks): every file of
    `ivf/` equals the one the Dask tasks wrote, and a kill between its chunk runs resumes to the same bytes."""
    from pqgpu import invert
    from pqgpu.store import open_store

    _, store, *_ = built
    files = lambda root: {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
                          if p.is_file()}
    want = files(Path(store.path) / "ivf")
    path = tmp_path / "memory.zarr"
    _, g = _unbuilt_copy(store, path)
    g["ivf/codes"][...] = 0
    scatter = []
    monkeypatch.setattr(invert, "scatter_chunk", lambda *a: scatter.append(a))
    monkeypatch.setenv("PQGPU_FAULT", "ivf-copy:1:raise")
    with pytest.raises(RuntimeError, match="injected fault"):
        invert.build_inverted(path)
    assert not open_store(path).group["ivf"].attrs["complete"]
    monkeypatch.delenv("PQGPU_FAULT")
    invert.build_inverted(path)
    assert not scatter and not (tmp_path / "memory.zarr.ivf-staging").exists()
    assert files(path / "ivf") == want


def test_grouped_copy_tasks_resume_byte_identically(built, tmp_path):
    """Copy tasks covering several output chunks (here 3 of 200 rows per 700-row encode chunk), killed inside the
    second task after its write: the rerun copies only what is not done, and the layout is the same bytes."""
    from pqgpu.invert import _copy_items, build_inverted
    from pqgpu.store import open_store

    _, store, *_ = built
    path = tmp_path / "grouped.zarr"
    ref, _ = _unbuilt_copy(store, path, chunk_rows=200)
    _build_killed(path, "ivf-copy:4:kill")
    ivf = open_store(path).group["ivf"]
    done = ivf["copy_done"][...]
    assert done.shape == (16,) and not done[3:6].any()  # the killed task's chunks (tasks run two at a time)
    # what is left goes in runs of not-done chunks, never across a multiple of 3
    runs = [(j, c) for j, (c,) in _copy_items(ivf, 3)]
    assert [k for j, c in runs for k in range(j, j + c)] == np.flatnonzero(~done).tolist()
    assert all(j // 3 == (j + c - 1) // 3 for j, c in runs) and (3, 3) in runs
    build_inverted(path)
    g = open_store(path).group
    assert g["ivf"].attrs["complete"] and g["ivf/codes"].chunks[0] == 200
    for name, want in ref.items():
        np.testing.assert_array_equal(g[f"ivf/{name}"][...], want)


def test_streamed_counts_and_windowed_tasks_give_the_same_layout(built, tmp_path, client, monkeypatch):
    """Counts read two chunks at a time and scatter tasks submitted a few at a time (5 chunks, a window of 4 on
    the 2 one-thread workers): the same bytes as the layout built before."""
    from pqgpu.invert import build_inverted
    from pqgpu.store import open_store

    _, store, *_ = built
    path = tmp_path / "streamed.zarr"
    ref, g = _unbuilt_copy(store, path)
    g["ivf/codes"][...] = 0
    monkeypatch.setattr("pqgpu.invert.COUNTS_BLOCK_BYTES", 2 * 4 * 24)
    assert store.n_chunks == 5
    build_inverted(path, client=client)
    g = open_store(path).group
    for name, want in ref.items():
        np.testing.assert_array_equal(g[f"ivf/{name}"][...], want)


def test_inverted_build_keeps_no_chunk_by_list_starts_and_checks_counts(built, tmp_path):
    """The build stores per-chunk counts (int32) only, and a chunk whose lists disagree with its counts (here
    two swapped counts: the grand total still adds up) is refused, not scattered to wrong places."""
    from pqgpu.errors import StoreError
    from pqgpu.invert import build_inverted
    from pqgpu.store import open_store

    _, store, *_ = built
    ivf = store.group["ivf"]
    assert "starts" not in ivf and ivf["counts"].dtype == np.int32
    assert ivf["counts"].shape == (store.n_chunks, 24) and int(ivf["counts"][...].sum()) == store.n
    path = tmp_path / "damaged.zarr"
    shutil.copytree(store.path, path)
    g = open_store(path, mode="r+").group
    g["ivf"].attrs.update({"complete": False, "starts_done": False})
    row = g["ivf/counts"][2]
    a, b = np.flatnonzero(row != row[np.argmax(row)])[0], np.argmax(row)
    row[[a, b]] = row[[b, a]]
    g["ivf/counts"][2] = row
    with pytest.raises(StoreError, match="chunk 2's lists disagree with its counts"):
        build_inverted(path)
    assert not open_store(path).group["ivf"].attrs["complete"]


def test_reencoded_chunk_rebuilds_the_layout(built, tmp_path, client):
    """A chunk encoded again (its done flag cleared) makes the old inverted layout stale: encode rebuilds it."""
    from pqgpu.pipeline import encode
    from pqgpu.store import open_store

    cfg, store, *_ = built
    path = tmp_path / "again.zarr"
    shutil.copytree(store.path, path)
    ref = {name: store.group[f"ivf/{name}"][...] for name in ("codes", "rows", "offsets")}
    g = open_store(path, mode="r+").group
    g["done"][1] = False
    g["lists"][700:1400] = 0  # as if the chunk had been damaged
    g["ivf/counts"][1] = 0
    g["ivf/codes"][...] = 0  # the layout built from the damaged chunk no longer matches
    report = encode(cfg.replace(encode=dataclasses.replace(cfg.encode, output=str(path))), client=client)
    assert report.chunks_encoded == 1
    g = open_store(path).group
    np.testing.assert_array_equal(g["lists"][...], store.group["lists"][...])
    for name, want in ref.items():
        np.testing.assert_array_equal(g[f"ivf/{name}"][...], want)


def test_evaluate_reports_recall_per_nprobe(built):
    from pqgpu.pipeline import evaluate_config

    cfg, store, *_ = built
    q = synthetic(30, 32, seed=12)
    result = evaluate_config(cfg, q, ks=(1, 10), nprobes=(1, 24))
    assert result["nlist"] == 24
    assert 0 <= result["1-recall@10 (nprobe=1)"] <= result["1-recall@10 (nprobe=24)"] <= 1
    assert result["queries_per_second (nprobe=1)"] > 0 and result["relative_mse"] < 0.5


# -- bad input ----------------------------------------------------------------------------------------------

def test_nlist_errors(tmp_path):
    with pytest.raises(ConfigError, match="quantizer.nlist"):
        config_from_dict({"quantizer": {"nlist": -3}})
    x = synthetic(300, 16, seed=0)
    with pytest.raises(InputError, match="quantizer.nlist=400 is larger than the 300 rows"):
        train_ivf(x, 4, 4, 400, backend="cpu")


def test_nprobe_errors_and_default(built, caplog):
    from pqgpu.search import search

    _, store, *_ = built
    q = synthetic(3, 32, seed=13)
    for bad in (0, -1, 25):
        with pytest.raises(ConfigError, match="--nprobe: expected an integer from 1 to nlist=24"):
            search(store, q, 5, nprobe=bad, backend="cpu")
    with caplog.at_level(logging.WARNING):
        _, ids = search(store, q, 5, backend="cpu")
    assert "without --nprobe: probing 16 lists" in caplog.text
    assert ids.shape == (3, 5)


def test_cli_search_nprobe_out_of_range_exits_cleanly(built, tmp_path, capsys):
    _, store, *_ = built
    np.save(tmp_path / "q.npy", synthetic(2, 32, seed=14))
    rc = cli.main(["search", store.path, "--queries", str(tmp_path / "q.npy"), "--nprobe", "99"])
    assert rc == cli.EXIT_ERROR
    assert "--nprobe: expected an integer from 1 to nlist=24" in capsys.readouterr().err


def test_write_codes_postgres_refuses_an_ivf_store(built, capsys, monkeypatch):
    """Residual codes without their lists cannot be decoded: refused before any connection (the DSN points at a
    closed port, so an attempt would fail with a connection error instead), the store unchanged."""
    _, store, *_ = built
    monkeypatch.delenv("PQGPU_PG_DSN", raising=False)
    before = {p: p.stat().st_mtime_ns for p in Path(store.path).rglob("*") if p.is_file()}
    rc = cli.main(["write-codes-postgres", "--store", store.path, "--set", "postgres.table=items",
                   "--set", "postgres.dsn=postgresql://nobody@127.0.0.1:9/none"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_ERROR
    assert "is an IVF-PQ store (nlist=24)" in err and "Nothing was written" in err
    assert "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in Path(store.path).rglob("*") if p.is_file()} == before


def test_quantizer_file_contradicting_nlist(tmp_path):
    from pqgpu.codebook import Codebook
    from pqgpu.ivf import load_quantizer

    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((4, 16, 4)).astype(np.float32)
    Codebook(16, 4, 4, centroids).save(tmp_path / "pq.faiss")
    with pytest.raises(ConfigError, match="plain ProductQuantizer file"):
        load_quantizer(tmp_path / "pq.faiss", 8)
    coarse = rng.standard_normal((8, 16)).astype(np.float32)
    IvfCodebook(16, 4, 4, centroids, coarse=coarse).save(tmp_path / "ivf.faiss")
    with pytest.raises(ConfigError, match="IVF index with 8 lists"):
        load_quantizer(tmp_path / "ivf.faiss", 16)
    with pytest.raises(ConfigError, match="IVF index with 8 lists"):
        load_quantizer(tmp_path / "ivf.faiss", 0)
    (tmp_path / "bad.faiss").write_bytes(b"IwPQ" + b"\0" * 10)
    with pytest.raises(PqgpuError, match="not a faiss IndexIVFPQ file"):
        load_quantizer(tmp_path / "bad.faiss", 8)


def test_direct_tables_equal_precomputed(built, monkeypatch):
    """Without room for faiss's precomputed tables the scan computes each residual table directly."""
    from pqgpu.ivf_search import search_ivf_store

    _, store, *_ = built
    q = synthetic(25, 32, seed=15)
    d, rows = search_ivf_store(store, q, 8, nprobe=4, backend="cpu")
    monkeypatch.setattr("pqgpu.ivf_search.PRECOMPUTED_BYTES", 0)
    d2, rows2 = search_ivf_store(store, q, 8, nprobe=4, backend="cpu")
    assert_same_topk(d2, rows2, d, rows)


def test_opened_index_searches_from_memory_like_faiss(built, tmp_path):
    """IvfIndex loads the inverted layout once (like faiss.read_index): with the store gone it still serves
    searches at several nprobe, each equal to faiss's and to a search that reads the probed lists from Zarr."""
    from pqgpu.ivf_search import IvfIndex, search_ivf_store
    from pqgpu.store import open_store

    _, store, *_, index = built
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store.path, copy)
    opened = IvfIndex(open_store(copy))
    shutil.rmtree(copy)
    q = synthetic(40, 32, seed=16)
    for nprobe in (1, 5, 24):
        faiss_ivf(index).nprobe = nprobe
        ref_d, ref_rows = index.search(q, 10)
        d, rows = opened.search(q, 10, nprobe=nprobe, backend="cpu")
        assert_same_topk(d, rows, ref_d, ref_rows)
        d2, rows2 = search_ivf_store(store, q, 10, nprobe=nprobe, backend="cpu", load=False)
        np.testing.assert_array_equal(d2, d)
        np.testing.assert_array_equal(rows2, rows)


@pytest.mark.parametrize("use_numba", [True, False])
def test_probe_selection_keeps_the_lower_list_on_ties(use_numba):
    from pqgpu.ivf_search import select_probes

    dist = np.random.default_rng(17).integers(0, 4, (30, 20)).astype(np.float32)  # many equal distances
    for nprobe in (1, 6, 20):
        probe, pdist = select_probes(dist, nprobe, use_numba=use_numba)
        ref = np.array([sorted(range(20), key=lambda lst: (row[lst], lst))[:nprobe] for row in dist])
        np.testing.assert_array_equal(probe, ref)
        np.testing.assert_array_equal(pdist, np.take_along_axis(dist, ref, axis=1))


def test_coarse_probe_kernel_equals_exact_distances_and_ties():
    """The fused numba coarse pass: lists and distances equal the exact ones, ties to the lower list (small
    integer vectors: every distance is exact in float32, and many are equal)."""
    pytest.importorskip("numba")
    from pqgpu import _ivf_cpu

    rng = np.random.default_rng(18)
    y = rng.integers(0, 3, (30, 8)).astype(np.float32)  # 30 queries: not a multiple of the query block
    coarse = rng.integers(0, 3, (20, 8)).astype(np.float32)
    exact = ((y[:, None, :].astype(np.float64) - coarse[None]) ** 2).sum(-1)
    for nprobe in (1, 7, 20):
        probe = np.empty((30, nprobe), np.int64)
        pdist = np.empty((30, nprobe), np.float32)
        _ivf_cpu.probe_lists(y, np.ascontiguousarray(coarse.T), (coarse * coarse).sum(1), probe, pdist)
        ref = np.array([sorted(range(20), key=lambda lst: (row[lst], lst))[:nprobe] for row in exact])
        np.testing.assert_array_equal(probe, ref)
        np.testing.assert_array_equal(pdist, np.take_along_axis(exact, ref, axis=1).astype(np.float32))
