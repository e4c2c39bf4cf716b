"""End to end on CPU: sample shards -> train -> Dask encode -> Zarr store, checked against faiss."""

from __future__ import annotations

import numpy as np
import pytest

from pqgpu import cli
from pqgpu.codebook import Codebook
from pqgpu.config import config_from_dict
from pqgpu.pipeline import encode, run, train
from pqgpu.sample import make_sample, sample_vectors
from pqgpu.store import open_store

from .helpers import assert_codes_match

faiss = pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as c:
            yield c


def make_config(tmp_path, fmt, *, M=8, nbits=8, chunk_rows=700, string_ids=False, id_column="id", **extra):
    data = tmp_path / "data"
    path = {"parquet": str(data / "*.parquet"), "npy": str(data / "shard-*.npy"), "zarr": str(data / "*.zarr")}[fmt]
    if fmt == "npy" and id_column:
        id_column = str(data / "ids-*.npy")
    return config_from_dict({
        "source": {"format": fmt, "path": path, "id_column": id_column, "vector_column": "embedding"},
        "quantizer": {"path": str(tmp_path / "pq.faiss"), "M": M, "nbits": nbits, "train_size": 2000, "niter": 6},
        "encode": {"output": str(tmp_path / "codes.zarr"), "chunk_rows": chunk_rows, "backend": "cpu"},
        **extra,
    })


def source_rows(fmt, n, d, seed=0):
    """The vectors make_sample wrote, regenerated independently of the pipeline's readers."""
    bounds = np.linspace(0, n, 4 + 1).astype(np.int64)
    return np.concatenate([sample_vectors(int(b - a), d, seed=seed, start=int(a)) for a, b in zip(bounds[:-1], bounds[1:])])


@pytest.mark.parametrize("fmt,nbits,string_ids", [
    ("parquet", 8, False), ("parquet", 4, True), ("npy", 8, False), ("npy", 4, False), ("zarr", 8, True),
    ("zarr", 4, False),
])
def test_end_to_end_matches_faiss(tmp_path, client, fmt, nbits, string_ids):
    n, d = 3001, 32
    make_sample(tmp_path / "data", n, d, shards=4, fmt=fmt, string_ids=string_ids)
    cfg = make_config(tmp_path, fmt, nbits=nbits)
    report = run(cfg, client=client)
    assert report.n == n and report.chunks == 5 and report.chunks_encoded == 5

    store = open_store(cfg.encode.output)
    codes = store.codes[...]
    pq = faiss.read_ProductQuantizer(cfg.quantizer.path)
    assert (pq.d, pq.M, pq.nbits) == (d, 8, nbits)
    x = source_rows(fmt, n, d)
    cb = Codebook.load(cfg.quantizer.path)
    assert_codes_match(codes, pq.compute_codes(x), x, cb.centroids, nbits)
    assert np.array_equal(store.codebook().centroids, cb.centroids)
    assert store.attrs["codebook_sha256"] == cb.fingerprint()
    ids = store.ids[...]
    expected = np.arange(n, dtype=np.int64) * 7 + 1000
    if string_ids:
        assert list(ids[:3]) == ["doc-1000", "doc-1007", "doc-1014"]
        assert list(ids) == [f"doc-{v}" for v in expected]
    else:
        assert ids.dtype == np.int64 and np.array_equal(ids, expected)
    assert store.is_complete()


def test_row_numbers_as_ids_and_resume_is_noop(tmp_path, client):
    make_sample(tmp_path / "data", 1500, 16, shards=3, fmt="npy")
    cfg = make_config(tmp_path, "npy", M=4, id_column=None, chunk_rows=400)
    run(cfg, client=client)
    store = open_store(cfg.encode.output)
    assert np.array_equal(store.ids[...], np.arange(1500))
    before = store.codes[...]
    report = encode(cfg, client=client)
    assert report.chunks_encoded == 0
    assert np.array_equal(open_store(cfg.encode.output).codes[...], before)


def test_resume_encodes_only_pending_chunks(tmp_path, client):
    make_sample(tmp_path / "data", 2000, 16, shards=2, fmt="parquet")
    cfg = make_config(tmp_path, "parquet", M=4, chunk_rows=300)
    run(cfg, client=client)
    full = open_store(cfg.encode.output).codes[...]
    store = open_store(cfg.encode.output, mode="r+")
    store.done[2] = False
    store.done[5] = False
    store.codes[600:900] = 0
    report = encode(cfg, client=client)
    assert report.chunks_encoded == 2
    assert np.array_equal(open_store(cfg.encode.output).codes[...], full)


def test_training_sample_spans_all_shards(tmp_path):
    make_sample(tmp_path / "data", 4000, 8, shards=4, fmt="parquet")
    from pqgpu.sources import open_source

    cfg = make_config(tmp_path, "parquet", M=2)
    source = open_source(cfg.source)
    x, rows = source.sample(400, seed=1)
    assert x.shape == (400, 8)
    # rows from every shard, and the vectors are the right ones
    assert all(((rows >= lo) & (rows < lo + 1000)).any() for lo in range(0, 4000, 1000))
    np.testing.assert_array_equal(x, source_rows("parquet", 4000, 8)[rows])


def test_cli_run_info_and_local_cluster(tmp_path, capsys):
    make_sample(tmp_path / "data", 1200, 16, shards=2, fmt="parquet")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"""
source: {{format: parquet, path: "{tmp_path}/data/*.parquet", id_column: id, vector_column: embedding}}
quantizer: {{path: "{tmp_path}/pq.faiss", M: 4, nbits: 8, train_size: 1000, niter: 3}}
encode: {{output: "{tmp_path}/codes.zarr", chunk_rows: 500, backend: cpu}}
cluster: {{kind: local, n_workers: 1, threads_per_worker: 1}}
""")
    assert cli.main(["-q", "run", "-c", str(cfg_path)]) == 0
    assert cli.main(["info", str(tmp_path / "codes.zarr")]) == 0
    out = capsys.readouterr().out
    assert "3/3 chunks (complete)" in out and "1200" in out
    assert cli.main(["info", "--json", str(tmp_path / "codes.zarr")]) == 0
    # a config typo is a clear error with exit code 2
    assert cli.main(["run", "-c", str(cfg_path), "--set", "quantizer.nbit=4"]) == 2
    err = capsys.readouterr().err
    assert "quantizer.nbit" in err and "Valid keys" in err


def test_changed_codebook_refuses_without_overwrite(tmp_path, client, capsys):
    make_sample(tmp_path / "data", 1000, 16, shards=2, fmt="parquet")
    cfg = make_config(tmp_path, "parquet", M=4, chunk_rows=400)
    run(cfg, client=client)
    before = open_store(cfg.encode.output).codes[...]
    train(config_from_dict({**cfg.to_dict(), "quantizer": {**cfg.to_dict()["quantizer"], "seed": 99}}))
    from pqgpu.errors import StoreError

    with pytest.raises(StoreError, match="another codebook"):
        encode(cfg, client=client)
    assert np.array_equal(open_store(cfg.encode.output).codes[...], before)
    encode(cfg, client=client, overwrite=True)
    assert open_store(cfg.encode.output).attrs["codebook_sha256"] == Codebook.load(cfg.quantizer.path).fingerprint()


def test_cli_search_evaluate_export(tmp_path, capsys):
    import pyarrow.parquet as pq

    make_sample(tmp_path / "data", 2000, 16, shards=2, fmt="parquet", n_queries=20)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"""
source: {{format: parquet, path: "{tmp_path}/data/*.parquet", id_column: id}}
quantizer: {{path: "{tmp_path}/pq.faiss", M: 4, nbits: 8, train_size: 2000, niter: 5}}
encode: {{output: "{tmp_path}/codes.zarr", chunk_rows: 700, backend: cpu}}
cluster: {{n_workers: 1}}
""")
    assert cli.main(["-q", "run", "-c", str(cfg_path)]) == 0
    q = str(tmp_path / "data" / "queries.npy")
    assert cli.main(["search", str(tmp_path / "codes.zarr"), "--queries", q, "-k", "5",
                     "--out", str(tmp_path / "r.parquet")]) == 0
    res = pq.read_table(tmp_path / "r.parquet")
    assert res.column_names == ["query", "rank", "id", "distance"] and res.num_rows == 100
    # the exported faiss index (IndexPQ over the same codes, with the id map) gives the same answers
    assert cli.main(["export-faiss", str(tmp_path / "codes.zarr"), "--out", str(tmp_path / "i.faiss")]) == 0
    index = faiss.read_index(str(tmp_path / "i.faiss"))
    assert index.ntotal == 2000
    fd, fi = index.search(np.load(q), 5)
    ids = res.column("id").to_numpy().reshape(20, 5)
    dist = res.column("distance").to_numpy().reshape(20, 5)
    np.testing.assert_allclose(dist, fd, rtol=1e-4)
    assert (ids == fi).mean() >= 0.95  # equal distances may come in another order
    assert cli.main(["evaluate", "-c", str(cfg_path), "--queries", q, "-k", "1,10"]) == 0
    out = capsys.readouterr().out
    assert "1-recall@10" in out and "mse" in out
    result = __import__("json").loads((tmp_path / "codes.eval.json").read_text())
    assert 0.5 <= result["1-recall@10"] <= 1.0 and result["mse"] > 0


def test_training_sample_is_read_on_all_workers_and_trains_as_in_process(tmp_path, client):
    """On a Dask cluster the sample's parts are tasks on every worker; the quantizer equals the one trained in
    this process from the same seeded sample, and loads in faiss."""
    from distributed import get_task_stream

    make_sample(tmp_path / "data", 12000, 16, shards=4, fmt="parquet")
    cfg = make_config(tmp_path, "parquet", M=4)
    with get_task_stream(client) as ts:
        on_workers = train(cfg, client=client)
    workers = {t["worker"] for t in ts.data if str(t["key"]).startswith("pqgpu-sample")}
    assert len(workers) == 2
    here = train(cfg)
    np.testing.assert_array_equal(on_workers.centroids, here.centroids)
    pq = faiss.read_ProductQuantizer(str(cfg.quantizer.path))
    np.testing.assert_array_equal(faiss.vector_to_array(pq.centroids).reshape(on_workers.centroids.shape),
                                  here.centroids)
