"""search / evaluate with --refine R: the top k*R ADC candidates re-ranked with the original vectors read back
from the source. Every expectation is a brute-force NumPy re-rank written here, over vectors this file wrote."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import pqgpu
from pqgpu import cli
from pqgpu.config import config_from_dict
from pqgpu.errors import ConfigError, InputError
from pqgpu.pipeline import evaluate_config, run
from pqgpu.refine import exact_rerank
from pqgpu.store import open_store

from .helpers import NAMESPACES, synthetic

N, D, SHARDS, ROW_GROUP = 1500, 16, 3, 32
K, R = 10, 4
ID_BASE, ID_STEP = 5000, 3  # ids differ from rows, so a row/id mix-up shows


# -- the exact re-rank ----------------------------------------------------------------------------------

def brute_rerank(q: np.ndarray, cand: np.ndarray, rows: np.ndarray, metric: str, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Reference: for each query, candidate rows (-1: none) sorted by exact score in float64, ties to the
    lower row; (scores, rows) of the best k."""
    q = q.astype(np.float64)
    cand = cand.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        cand = cand / np.maximum(np.linalg.norm(cand, axis=2, keepdims=True), 1e-300)
    if metric == "l2":
        key = ((cand - q[:, None, :]) ** 2).sum(2)
    else:
        key = -(cand * q[:, None, :]).sum(2)
    key = np.where(rows >= 0, key, np.inf)
    out_s, out_r = [], []
    for i in range(q.shape[0]):
        order = np.lexsort((rows[i], key[i]))[:k]
        s = key[i, order]
        out_s.append(s if metric == "l2" else -s)
        out_r.append(np.where(np.isinf(s), -1, rows[i, order]))
    return np.array(out_s), np.array(out_r)


@pytest.mark.parametrize("xp", NAMESPACES)
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_exact_rerank_matches_brute_force(xp, metric):
    rng = np.random.default_rng(3)
    nq, C, d = 5, 12, 8
    q = rng.standard_normal((nq, d)).astype(np.float32)
    cand = rng.standard_normal((nq, C, d)).astype(np.float32)
    cand[:, 7] = cand[:, 2]  # exact ties: the earlier candidate must stay first
    cand[:, 9] *= 3.0  # ip and cosine rank this one differently
    valid = np.ones((nq, C), bool)
    valid[1, 5:] = False
    rows = np.where(valid, np.arange(C)[None, :], -1)
    scores, order = exact_rerank(xp.asarray(q), xp.asarray(cand), metric, xp.asarray(valid))
    scores, order = np.asarray(scores), np.asarray(order)
    ref_s, ref_r = brute_rerank(q, cand, rows, metric, C)
    got_r = np.where(np.take_along_axis(valid, order, axis=1), order, -1)
    np.testing.assert_array_equal(got_r, ref_r)
    finite = ref_r >= 0
    np.testing.assert_allclose(scores[finite], ref_s[finite], rtol=1e-5, atol=1e-5)
    missing = np.finfo(np.float32).max * (1 if metric == "l2" else -1)
    assert (scores[~finite] == np.float32(missing)).all()


def test_check_refine():
    from pqgpu.refine import check_refine

    assert check_refine(None) is None and check_refine(3) == 3
    for bad in (0, -1, 2.5, True, "2"):
        with pytest.raises(ConfigError, match="--refine"):
            check_refine(bad)


# -- sources written here, stores encoded from them ----------------------------------------------------

def write_source(root: Path, fmt: str, x: np.ndarray, ids: np.ndarray, fs=None) -> str:
    """SHARDS shards of x in `fmt` under root (a local directory); returns the source.path glob."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(x), SHARDS + 1).astype(int)
    for s in range(SHARDS):
        xs, ids_s = x[bounds[s]:bounds[s + 1]], ids[bounds[s]:bounds[s + 1]]
        if fmt == "parquet":
            table = pa.table({"id": ids_s, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xs.ravel()), D)})
            pq.write_table(table, root / f"s{s}.parquet", row_group_size=ROW_GROUP)  # several row groups a shard
        elif fmt == "npy":
            np.save(root / f"s{s}.npy", xs)
            np.save(root / f"ids{s}.npy", ids_s)
        else:
            g = zarr.open_group(root / f"s{s}.zarr", mode="w")
            g.create_array("embedding", data=xs, chunks=(100, D))
            g.create_array("id", data=ids_s)
    return {"parquet": "*.parquet", "npy": "s*.npy", "zarr": "s*.zarr"}[fmt]


def make_cfg(tmp: Path, fmt: str, src_root: str, nlist: int = 0, out: str | None = None):
    id_column = {"parquet": "id", "npy": f"{src_root}/ids*.npy", "zarr": "id"}[fmt]
    return config_from_dict({
        "source": {"format": fmt, "path": f"{src_root}/{write_glob(fmt)}", "id_column": id_column},
        "quantizer": {"path": str(tmp / f"pq{nlist}.faiss"), "M": 4, "nbits": 5, "nlist": nlist, "train_size": N,
                      "niter": 5},
        "encode": {"output": out or str(tmp / f"codes{nlist}.zarr"), "chunk_rows": 400, "backend": "cpu"},
        "cluster": {"processes": False},
    })


def write_glob(fmt: str) -> str:
    return {"parquet": "*.parquet", "npy": "s*.npy", "zarr": "s*.zarr"}[fmt]


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = synthetic(N, D, seed=5)
    ids = np.arange(N, dtype=np.int64) * ID_STEP + ID_BASE
    q = synthetic(30, D, seed=77)
    return x, ids, q


def rows_of(ids: np.ndarray) -> np.ndarray:
    return np.where(ids >= 0, (ids - ID_BASE) // ID_STEP, -1)


_BUILT: dict[str, tuple] = {}


def build(fmt: str, tmp_path_factory) -> tuple[str, Path, dict]:
    """(fmt, tmp dir, {nlist: config}) of a flat and an IVF store encoded from one local source (once per module)."""
    if fmt not in _BUILT:
        tmp = tmp_path_factory.mktemp(f"refine-{fmt}")
        x, ids, _ = data()
        write_source(tmp / "src", fmt, x, ids)
        cfgs = {}
        for nlist in (0, 8):
            cfgs[nlist] = make_cfg(tmp, fmt, str(tmp / "src"), nlist)
            run(cfgs[nlist])
        _BUILT[fmt] = (fmt, tmp, cfgs)
    return _BUILT[fmt]


@pytest.fixture(scope="module", params=["parquet", "npy", "zarr"])
def encoded(request, tmp_path_factory):
    return build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def parquet_encoded(tmp_path_factory):
    return build("parquet", tmp_path_factory)


def adc_candidates(store_path: str, q: np.ndarray, k: int, nprobe: int | None) -> np.ndarray:
    """Store rows of the top k ADC results (no refine): the candidates a refined search re-ranks."""
    _d, ids = pqgpu.search(store_path, q, k, nprobe=nprobe, backend="cpu")
    return rows_of(ids)


@pytest.mark.parametrize("nlist", [0, 8])
def test_refine_is_the_exact_rerank_of_the_adc_candidates(encoded, nlist, caplog):
    fmt, _tmp, cfgs = encoded
    x, ids, q = data()
    out = cfgs[nlist].encode.output
    nprobe = 3 if nlist else None
    cand = adc_candidates(out, q, K * R, nprobe)
    ref_s, ref_rows = brute_rerank(q, x[np.maximum(cand, 0)], cand, "l2", K)
    dist, got_ids = pqgpu.search(out, q, K, nprobe=nprobe, backend="cpu", refine=R)
    got_rows = rows_of(got_ids)
    np.testing.assert_allclose(dist, ref_s, rtol=1e-5, atol=1e-6)
    differ = got_rows != ref_rows
    # rows may differ only where two exact distances are equal within float32 rounding
    assert differ.mean() <= 0.01, differ.mean()
    np.testing.assert_allclose(dist[differ], ref_s[differ], rtol=1e-6)
    # what was read: exactly the distinct candidates, and for Parquet only the row groups that hold them
    cand = cand[:2]
    with caplog.at_level(logging.INFO, logger="pqgpu"):
        pqgpu.search(out, q[:2], K, nprobe=nprobe, backend="cpu", refine=R)
    msg = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("refine:"))
    distinct = np.unique(cand[cand >= 0])
    assert f"read {distinct.size} rows from" in msg, msg
    if fmt == "parquet":
        bounds = np.linspace(0, N, SHARDS + 1).astype(int)
        shard = np.searchsorted(bounds, distinct, side="right") - 1
        groups = {(s, (r - bounds[s]) // ROW_GROUP) for s, r in zip(shard, distinct)}
        assert f"{len(groups)} row groups" in msg, msg
        assert len(groups) < sum(-(-(bounds[s + 1] - bounds[s]) // ROW_GROUP) for s in range(SHARDS)), \
            "the test should leave some row groups unread"


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    dist = ((q[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(2)
    return np.argsort(dist, axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, g)) / gt.shape[1] for f, g in zip(found, gt)]))


@pytest.mark.parametrize("nlist", [0, 8])
def test_refine_improves_recall_against_exact_neighbours(parquet_encoded, nlist):
    _fmt, _tmp, cfgs = parquet_encoded
    x, _ids, q = data()
    gt = exact_top(x, q, K)
    out = cfgs[nlist].encode.output
    nprobe = 8 if nlist else None  # all lists: the candidates are not limited by probing
    base = recall(rows_of(pqgpu.search(out, q, K, nprobe=nprobe, backend="cpu")[1]), gt)
    refined = [recall(rows_of(pqgpu.search(out, q, K, nprobe=nprobe, backend="cpu", refine=r)[1]), gt)
               for r in (1, 2, 10)]
    assert refined[0] == pytest.approx(base, abs=1e-9)  # R = 1 reorders the ADC top k: the same set
    assert refined[1] > base and refined[2] > refined[1]
    assert refined[2] >= 0.9, (base, refined)


@pytest.mark.parametrize("nlist", [0, 8])
def test_refine_over_every_row_is_exact_search(parquet_encoded, nlist):
    """k*R >= n (IVF: every list probed): every row is a candidate, so the refined top k is the exact top k."""
    _fmt, _tmp, cfgs = parquet_encoded
    x, _ids, q = data()
    dist, got = pqgpu.search(cfgs[nlist].encode.output, q, K, nprobe=8 if nlist else None, backend="cpu",
                             refine=-(-N // K))
    exact = ((q[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(2)
    gt = exact_top(x, q, K)
    np.testing.assert_allclose(dist, np.take_along_axis(exact, gt, axis=1), rtol=1e-5)
    assert (rows_of(got) == gt).mean() >= 0.99


def test_evaluate_with_refine(parquet_encoded, tmp_path):
    _fmt, _tmp, cfgs = parquet_encoded
    x, _ids, q = data()
    gt = exact_top(x, q, K)
    flat = evaluate_config(cfgs[0], q, ks=(1, K), refine=R)
    cand = adc_candidates(cfgs[0].encode.output, q, K * R, None)
    _s, ref_rows = brute_rerank(q, x[np.maximum(cand, 0)], cand, "l2", K)
    assert flat["refine"] == R and flat["refine_rows_read"] == np.unique(cand).size
    assert flat[f"{K}-recall@{K}"] == pytest.approx(recall(ref_rows, gt), abs=0.01)
    plain = evaluate_config(cfgs[0], q, ks=(1, K))
    assert flat[f"{K}-recall@{K}"] > plain[f"{K}-recall@{K}"]
    ivf = evaluate_config(cfgs[8], q, ks=(1, K), nprobes=(8,), refine=R)
    assert ivf["refine"] == R and ivf[f"{K}-recall@{K} (nprobe=8)"] > plain[f"{K}-recall@{K}"]
    out = tmp_path / "e.json"
    assert cli.main(["-q", "evaluate", "--set", f"encode.output={cfgs[0].encode.output}", "--set",
                     f"source.path={cfgs[0].source.path}", "--set", "source.format=parquet", "--set",
                     f"quantizer.path={cfgs[0].quantizer.path}", "--set", "quantizer.M=4", "--set", "quantizer.nbits=5",
                     "--queries", str(_save(tmp_path, q)), "-k", "1,10", "--refine", str(R),
                     "--results", str(out)]) == 0
    import json

    assert json.loads(out.read_text())[f"{K}-recall@{K}"] == flat[f"{K}-recall@{K}"]


def _save(tmp: Path, q: np.ndarray) -> Path:
    path = tmp / "q.npy"
    np.save(path, q)
    return path


def test_refine_uses_the_metric_the_store_records(parquet_encoded, tmp_path):
    """ip / cosine stores (quantizer.metric) are re-ranked by dot product, larger first."""
    _fmt, _tmp, cfgs = parquet_encoded
    x, _ids, q = data()
    out = tmp_path / "codes.zarr"
    shutil.copytree(cfgs[0].encode.output, out)
    for metric in ("ip", "cosine"):
        group = zarr.open_group(str(out), mode="r+")
        group.attrs["metric"] = metric  # the metric is part of the codebook's sha256 (pqgpu.metric): record it
        group.attrs["codebook_sha256"] = open_store(str(out)).codebook(check=False).fingerprint()
        cand = adc_candidates(str(out), q, K * R, None)
        ref_s, ref_rows = brute_rerank(q, x[np.maximum(cand, 0)], cand, metric, K)
        sim, got = pqgpu.search(str(out), q, K, backend="cpu", refine=R)
        assert (rows_of(got) == ref_rows).mean() >= 0.99
        np.testing.assert_allclose(sim, ref_s, rtol=1e-5, atol=1e-5)
        assert (np.diff(sim, axis=1) <= 0).all()  # similarities, largest first


# -- bad input: one paragraph, exit 2, nothing written ----------------------------------------------------

def test_cli_refine_bad_values_and_changed_or_gone_sources(tmp_path, capsys):
    x, ids, q = data()
    src = tmp_path / "src"
    write_source(src, "parquet", x, ids)
    cfg = make_cfg(tmp_path, "parquet", str(src))
    run(cfg)
    store, qpath, res = cfg.encode.output, str(_save(tmp_path, q)), tmp_path / "r.parquet"
    res.write_bytes(b"earlier results")

    def refuse(*extra: str) -> str:
        capsys.readouterr()
        rc = cli.main(["search", store, "--queries", qpath, "-k", "5", "--out", str(res), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        assert res.read_bytes() == b"earlier results"
        return err

    assert "--refine" in refuse("--refine", "0") and "--refine" in refuse("--refine", "-2")
    assert cli.main(["-q", "search", store, "--queries", qpath, "-k", "5", "--refine", "2"]) == 0
    # a shard added after encoding is not read: the store's rows are those of the files it records
    before = pqgpu.search(store, q, 5, backend="cpu", refine=2)
    write_source(tmp_path / "more", "parquet", x[:300], ids[:300])
    shutil.copy(tmp_path / "more" / "s0.parquet", src / "s9.parquet")
    after = pqgpu.search(store, q, 5, backend="cpu", refine=2)
    np.testing.assert_array_equal(after[1], before[1])
    (src / "s9.parquet").unlink()
    # a shard rewritten after encoding (same rows, other values, later mtime)
    victim = src / "s1.parquet"
    saved = victim.read_bytes()
    write_source(tmp_path / "other", "parquet", x[::-1].copy(), ids)
    shutil.copy(tmp_path / "other" / "s1.parquet", victim)
    os.utime(victim, (1e9, 1e9))
    err = refuse("--refine", "2")
    assert "s1.parquet" in err and "changed" in err, err
    victim.write_bytes(saved)
    os.utime(victim, (2e9, 2e9))
    assert "s1.parquet" in refuse("--refine", "2")  # the mtime alone differs: still refused
    victim.unlink()
    err = refuse("--refine", "2")
    assert "s1.parquet" in err and "gone" in err, err
    shutil.rmtree(src)
    err = refuse("--refine", "2")
    assert "s0.parquet" in err and "gone" in err, err
    # without --refine the codes alone still answer
    assert cli.main(["-q", "search", store, "--queries", qpath, "-k", "5"]) == 0
    # evaluate --refine: refused the same way, no result file written
    ev = tmp_path / "ev.json"
    rc = cli.main(["evaluate", "--set", f"encode.output={store}", "--set", f"source.path={tmp_path}/other/*.parquet",
                   "--set", "source.format=parquet", "--set", f"quantizer.path={cfg.quantizer.path}", "--set",
                   "quantizer.M=4", "--set", "quantizer.nbits=5", "--queries", qpath, "-k", "1,10", "--refine", "0",
                   "--results", str(ev)])
    assert rc == 2 and not ev.exists()


def test_refine_on_a_store_without_a_recorded_source(tmp_path):
    from .test_search import make_store, random_codebook

    cb = random_codebook(8, 2, 4)
    path = make_store(tmp_path / "s.zarr", cb, np.zeros((50, cb.code_size), np.uint8))
    with pytest.raises(InputError, match="records no source"):
        pqgpu.search(path, np.zeros((2, 8), np.float32), 3, refine=2)


# -- the same on an S3 server ------------------------------------------------------------------------------

from .test_cluster import s3_server  # noqa: E402,F401  (the module's moto fixture)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "npy", "zarr"])
def test_refine_reads_an_s3_source(s3_server, tmp_path, fmt, caplog):  # noqa: F811
    import fsspec

    x, ids, q = data()
    write_source(tmp_path / "src", fmt, x, ids)
    fs = fsspec.filesystem("s3")
    bucket = f"pqgpu-refine-{fmt}"
    fs.mkdir(bucket)
    fs.put(str(tmp_path / "src") + "/", f"{bucket}/src/", recursive=True)
    cfg = make_cfg(tmp_path, fmt, f"s3://{bucket}/src", nlist=8 if fmt == "parquet" else 0)
    run(cfg)
    out = cfg.encode.output
    nprobe = 4 if fmt == "parquet" else None
    cand = adc_candidates(out, q, K * R, nprobe)
    ref_s, ref_rows = brute_rerank(q, x[np.maximum(cand, 0)], cand, "l2", K)
    with caplog.at_level(logging.INFO, logger="pqgpu"):
        dist, got = pqgpu.search(out, q, K, nprobe=nprobe, backend="cpu", refine=R)
    assert (rows_of(got) == ref_rows).mean() >= 0.99
    np.testing.assert_allclose(dist, ref_s, rtol=1e-5, atol=1e-6)
    assert any(f"read {np.unique(cand).size} rows" in r.getMessage() for r in caplog.records)
    # a shard replaced on the server is refused, naming it
    fs.rm(f"{bucket}/src/{'s0.parquet' if fmt == 'parquet' else 's0.npy' if fmt == 'npy' else 's0.zarr'}",
          recursive=True)
    with pytest.raises(InputError, match="s0"):
        pqgpu.search(out, q, K, nprobe=nprobe, backend="cpu", refine=R)


def _no_gpu_reason():
    try:
        import cupy

        return None if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA device"
    except Exception as exc:  # noqa: BLE001 - any import or driver failure means: no GPU here
        return f"CuPy cannot be used ({type(exc).__name__}: {exc})"


@pytest.mark.gpu
@pytest.mark.skipif(_no_gpu_reason() is not None, reason=f"needs a CUDA GPU: {_no_gpu_reason()}")
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_gpu_exact_rerank_equals_numpy(metric):
    """The refine re-rank on CuPy (the GPU check's refine case) orders and scores as a NumPy re-rank."""
    import cupy

    from pqgpu.refine import exact_rerank

    rng = np.random.default_rng(4)
    q = rng.standard_normal((7, 24)).astype(np.float32)
    cand = (rng.standard_normal((7, 40, 24)) * rng.uniform(0.2, 3, (7, 40, 1))).astype(np.float32)
    valid = np.ones((7, 40), bool)
    valid[2, 30:] = False
    want_s, want_o = exact_rerank(q, cand, metric, valid)
    got_s, got_o = exact_rerank(cupy.asarray(q), cupy.asarray(cand), metric, cupy.asarray(valid))
    np.testing.assert_array_equal(cupy.asnumpy(got_o)[:, :10], want_o[:, :10])
    np.testing.assert_allclose(cupy.asnumpy(got_s), want_s, rtol=1e-5, atol=1e-5)
