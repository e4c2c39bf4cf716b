"""`--append`: new shards encoded into new rows with the store's codebook (flat and IVF), compared with a
one-shot encode of all shards with the same quantizer; IVF segments searched as one layout, `compact` equal to
a one-shot build; the refusals; SIGKILL at each step of an append, then the same command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pqgpu
from pqgpu.config import config_from_dict
from pqgpu.errors import PqgpuError, StoreError
from pqgpu.pipeline import encode, run
from pqgpu.store import exclusive_lock, open_store

from .helpers import synthetic

SIZES = (700, 450, 380, 520)  # rows per shard: the store's last chunk is partial after every step
D = 16
CHUNK_ROWS = 300


def write_shard(folder: Path, s: int, d: int = D) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lo = sum(SIZES[:s])
    x = synthetic(SIZES[s], d, seed=s)
    ids = np.arange(lo, lo + SIZES[s], dtype=np.int64) * 7 + 3
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"shard-{s:04d}.parquet"
    pq.write_table(pa.table({"id": pa.array(ids), "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(x.reshape(-1)), d)}), path)
    return path


def config(tmp_path: Path, data: Path, out: str, nlist: int = 0):
    return config_from_dict({
        "source": {"format": "parquet", "path": str(data / "*.parquet"), "id_column": "id"},
        "quantizer": {"path": str(tmp_path / "q.faiss"), "M": 4, "nbits": 6, "nlist": nlist, "train_size": 700,
                      "niter": 4},
        "encode": {"output": str(tmp_path / out), "chunk_rows": CHUNK_ROWS, "backend": "cpu"},
        "cluster": {"kind": "local", "processes": False},
    })


def write_config(tmp_path: Path, cfg_dict: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(json.dumps(cfg_dict))
    return p


@pytest.fixture(params=[0, 8], ids=["flat", "ivf"])
def grown(request, tmp_path):
    """1 run (shard 0) + 3 appends (shards 1, 2, 3) into `grow.zarr`, and a one-shot encode of all four shards
    with the same quantizer into `once.zarr`."""
    nlist = request.param
    data = tmp_path / "data"
    write_shard(data, 0)
    cfg = config(tmp_path, data, "grow.zarr", nlist)
    run(cfg)
    for s in (1, 2, 3):
        write_shard(data, s)
        report = run(cfg, append=True)
        assert report.chunks_encoded >= 1
    once = config(tmp_path, data, "once.zarr", nlist)
    encode(once)
    return cfg, once, nlist


def test_appends_equal_one_shot_encode(grown):
    cfg, once, nlist = grown
    g, o = open_store(cfg.encode.output), open_store(once.encode.output)
    assert g.n == o.n == sum(SIZES)
    np.testing.assert_array_equal(g.codes[...], o.codes[...])
    np.testing.assert_array_equal(g.ids[...], o.ids[...])
    if nlist:
        np.testing.assert_array_equal(g.group["lists"][...], o.group["lists"][...])
    gens = g.attrs["generations"]
    assert [gen["rows"] for gen in gens] == [[0, 700], [700, 1150], [1150, 1530], [1530, 2050]]
    assert [len(gen["files"]) for gen in gens] == [1, 1, 1, 1]
    assert g.verify().ok
    info = g.info()
    assert info["complete"] and len(info["generations"]) == 4
    if nlist:
        assert len(info["segments"]) == 4


def test_ivf_segments_search_like_one_layout_and_compact_equals_one_shot(grown, tmp_path, monkeypatch):
    from pqgpu.append import compact
    from pqgpu.invert import iter_lists
    from pqgpu.ivf_search import IvfIndex

    cfg, once, nlist = grown
    if not nlist:
        pytest.skip("IVF only")
    g, o = open_store(cfg.encode.output), open_store(once.encode.output)
    q = synthetic(40, D, seed=99)
    for load, held in ((True, 64 << 20), (False, 64 << 20), (False, 0)):  # held 0: every segment read per batch
        monkeypatch.setattr("pqgpu.ivf_search.SEGMENT_LOAD_BYTES", held)
        dg, rg = IvfIndex(g, load=load).search(q, 10, nprobe=3, backend="cpu")
        do, ro = IvfIndex(o, load=load).search(q, 10, nprobe=3, backend="cpu")
        np.testing.assert_array_equal(rg, ro)
        np.testing.assert_array_equal(dg, do)
    import array_api_compat.numpy as np_xp  # the array-API scan (the GPU's) over merged segments

    np.testing.assert_array_equal(IvfIndex(g, load=False).search(q, 10, nprobe=3, xp=np_xp)[1],
                                  IvfIndex(o, load=False).search(q, 10, nprobe=3, xp=np_xp)[1])
    for (lg, cg, ig), (lo, co, io) in zip(iter_lists(g, labels="ids"), iter_lists(o, labels="ids"), strict=True):
        assert lg == lo
        np.testing.assert_array_equal(cg, co)
        np.testing.assert_array_equal(ig, io)
    from pqgpu.invert import export_ivf

    export_ivf(g, tmp_path / "grow.faiss")
    export_ivf(o, tmp_path / "once.faiss")
    assert (tmp_path / "grow.faiss").read_bytes() == (tmp_path / "once.faiss").read_bytes()
    assert compact(cfg.encode.output) == 4
    g = open_store(cfg.encode.output)
    [(node, lo, hi)] = g.attrs["ivf_layouts"]
    assert (lo, hi) == (0, g.n) and "segments" not in g.group["ivf"] or list(g.group["ivf/segments"].group_keys()) \
        == [node.rsplit("/", 1)[-1]]
    for name in ("codes", "rows", "ids", "offsets"):
        np.testing.assert_array_equal(g.group[f"{node}/{name}"][...], o.group[f"ivf/{name}"][...])
    assert g.verify().ok and compact(cfg.encode.output) == 0
    dg, rg = IvfIndex(g).search(q, 10, nprobe=3, backend="cpu")
    np.testing.assert_array_equal(rg, IvfIndex(o).search(q, 10, nprobe=3, backend="cpu")[1])


# -- bad input ----------------------------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path):
    data = tmp_path / "data"
    write_shard(data, 0)
    cfg = config(tmp_path, data, "codes.zarr")
    run(cfg)
    return cfg, data


def _snapshot(path: str) -> dict:
    s = open_store(path)
    return {"n": s.n, "codes": s.codes[...].copy(), "attrs": json.dumps(s.attrs, sort_keys=True, default=str)}


def _assert_same(path: str, before: dict) -> None:
    after = _snapshot(path)
    assert after["n"] == before["n"] and after["attrs"] == before["attrs"]
    np.testing.assert_array_equal(after["codes"], before["codes"])


def test_new_files_without_append_name_append_and_overwrite(small):
    cfg, data = small
    before = _snapshot(cfg.encode.output)
    write_shard(data, 1)
    with pytest.raises(StoreError, match=r"--append.*--overwrite"):
        run(cfg)
    _assert_same(cfg.encode.output, before)


def test_append_refusals_leave_the_store_as_it_was(small, tmp_path):
    import dataclasses

    cfg, data = small
    before = _snapshot(cfg.encode.output)
    assert run(cfg, append=True).chunks_encoded == 0  # no new files: nothing to do
    _assert_same(cfg.encode.output, before)
    missing = dataclasses.replace(cfg, encode=dataclasses.replace(cfg.encode, output=str(tmp_path / "none.zarr")))
    with pytest.raises(StoreError, match="no code store at .* to append to"):
        run(missing, append=True)
    assert not (tmp_path / "none.zarr").exists()
    write_shard(data, 1)
    with exclusive_lock(cfg.encode.output):  # another writer
        with pytest.raises(StoreError, match="being written by"):
            run(cfg, append=True)
    # a recorded file rewritten in place
    shard0 = data / "shard-0000.parquet"
    saved = shard0.read_bytes()
    os.utime(shard0, ns=(1, 1))
    with pytest.raises(StoreError, match="shard-0000.parquet"):
        run(cfg, append=True)
    shard0.write_bytes(saved)
    # another quantizer file
    qpath = Path(cfg.quantizer.path)
    keep = qpath.read_bytes()
    from pqgpu.codebook import Codebook

    cb = Codebook.load(qpath) if hasattr(Codebook, "load") else None
    if cb is not None:
        changed = Codebook(cb.d, cb.M, cb.nbits, cb.centroids + np.float32(0.5), cb.rotation)
        changed.save(qpath)
        with pytest.raises(PqgpuError, match="another codebook"):
            run(cfg, append=True)
        qpath.write_bytes(keep)
    # new files of another dimension
    (data / "shard-0001.parquet").unlink()
    write_shard(data, 1, d=2 * D)
    with pytest.raises(PqgpuError):
        run(cfg, append=True)
    _assert_same(cfg.encode.output, before)
    with pytest.raises(PqgpuError, match="--append .* cannot be combined with --overwrite"):
        run(cfg, append=True, overwrite=True)


def test_append_to_incomplete_store_is_refused(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_shard(data, 0)
    cfg = config(tmp_path, data, "codes.zarr")
    monkeypatch.setenv("PQGPU_FAULT", "after-codes:1:raise")
    with pytest.raises(Exception):
        run(cfg)
    monkeypatch.delenv("PQGPU_FAULT")
    write_shard(data, 1)
    with pytest.raises(StoreError, match="not complete.*Finish it first"):
        run(cfg, append=True)


def test_duplicate_new_ids_are_named(small):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg, data = small
    x = synthetic(5, D, seed=7)
    pq.write_table(pa.table({"id": pa.array(np.array([3, 90001, 90002, 90003, 90004], np.int64)),
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), D)}),
                   data / "shard-0001.parquet")
    with pytest.raises(PqgpuError, match=r"id 3 at .*shard-0000.parquet row 0 and .*shard-0001.parquet row 0"):
        run(cfg, append=True, strict_ids=True)
    assert open_store(cfg.encode.output).n == SIZES[0]  # not committed: readers see the store as it was


def test_growing_ids_are_checked_without_reading_the_stored_ones(small, monkeypatch):
    """Ids above every stored one (a table's serial key, an export --since-last) are checked against each
    other only: the rows already stored are not read back, so the check's cost follows the new rows."""
    import pqgpu.ids as ids_mod

    cfg, data = small
    read: list[tuple[int, int]] = []
    split = ids_mod.split_ids
    monkeypatch.setattr(ids_mod, "split_ids", lambda store, ranges, parts: (read.extend(ranges),
                                                                            split(store, ranges, parts))[1])
    write_shard(data, 1)
    run(cfg, append=True)
    n0, n1 = SIZES[0], SIZES[0] + SIZES[1]
    assert read and min(lo for lo, _ in read) == n0 and max(hi for _, hi in read) == n1
    assert sum(hi - lo for lo, hi in read) == n1 - n0
    gens = open_store(cfg.encode.output).attrs["generations"]
    assert gens[0]["id_range"] == [3, (SIZES[0] - 1) * 7 + 3]
    assert gens[1]["id_range"] == [SIZES[0] * 7 + 3, (n1 - 1) * 7 + 3]


def test_id_overlapping_one_generation_is_checked_against_that_one(small):
    """New ids inside an earlier generation's range are checked against its stored rows: a repeat is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg, data = small
    write_shard(data, 1)
    run(cfg, append=True)
    repeat = (SIZES[0] + 10) * 7 + 3  # row 10 of shard 1, generation 1
    x = synthetic(3, D, seed=9)
    pq.write_table(pa.table({"id": pa.array(np.array([10**9, repeat, 10**9 + 1], np.int64)),
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), D)}),
                   data / "shard-0002.parquet")
    with pytest.raises(PqgpuError, match=rf"id {repeat} at .*shard-0001.parquet row 10 and .*shard-0002.parquet row 1"):
        run(cfg, append=True, strict_ids=True)


def _no_gpu_reason():
    from pqgpu.backend import gpu_status

    ok, why = gpu_status()
    return None if ok else why


@pytest.mark.gpu
@pytest.mark.skipif(_no_gpu_reason() is not None, reason=f"needs a CUDA GPU: {_no_gpu_reason()}")
@pytest.mark.parametrize("nlist", [0, 8], ids=["flat", "ivf"])
def test_append_on_the_gpu_equals_one_shot_gpu_encode(tmp_path, nlist):
    """The GPU check's append: a run and one append with encode.backend gpu end in the codes, ids and lists of
    a one-shot GPU encode of the same shards with the same quantizer."""
    data = tmp_path / "data"
    write_shard(data, 0)
    cfg = config(tmp_path, data, "grow.zarr", nlist)
    cfg.encode.backend = "gpu"
    run(cfg)
    write_shard(data, 1)
    report = run(cfg, append=True)
    assert set(report.backends.values()) == {"gpu"}, report.backends
    once = config(tmp_path, data, "once.zarr", nlist)
    once.encode.backend = "gpu"
    encode(once)
    g, o = open_store(cfg.encode.output), open_store(once.encode.output)
    assert g.n == o.n == SIZES[0] + SIZES[1]
    assert np.array_equal(g.codes[...], o.codes[...]) and np.array_equal(g.ids[...], o.ids[...])
    if nlist:
        assert np.array_equal(g.group["lists"][...], o.group["lists"][...])


# -- crash safety ---------------------------------------------------------------------------------------------

def _cli(cfg_path: Path, args: list[str], env: dict) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(Path(pqgpu.__file__).resolve().parents[1]), **env)
    return subprocess.run([sys.executable, "-m", "pqgpu.cli", *args, "-c", str(cfg_path)], env=full,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("fault,nlist", [
    ("append-grown:1:kill", 8), ("before-write:2:kill", 8), ("after-codes:3:kill", 8), ("ivf-scatter:1:kill", 8),
    ("ivf-copy:0:kill", 8), ("append-commit:1:kill", 8),
    ("after-codes:2:kill", 0), ("driver-after:2:kill", 0), ("append-commit:1:kill", 0)])
def test_append_killed_then_same_command_equals_uninterrupted(tmp_path, fault, nlist):
    """Chunk 2 is the partial last chunk the append completes (700 rows, chunk_rows 300), 3 a new one."""
    from pqgpu.search import store_chunks

    data = tmp_path / "data"
    write_shard(data, 0)
    cfg_dict = {"source": {"format": "parquet", "path": str(data / "*.parquet"), "id_column": "id"},
                "quantizer": {"path": str(tmp_path / "q.faiss"), "M": 4, "nbits": 6, "nlist": nlist, "train_size": 700,
                              "niter": 4},
                "encode": {"output": str(tmp_path / "codes.zarr"), "chunk_rows": CHUNK_ROWS, "backend": "cpu"}}
    cfg_path = write_config(tmp_path, cfg_dict)
    r = _cli(cfg_path, ["run"], {})
    assert r.returncode == 0, r.stderr
    from pqgpu.ivf_search import IvfIndex

    def search(store):
        if nlist:
            return IvfIndex(store).search(q, 5, nprobe=2, backend="cpu")[1]
        return np.concatenate([c for _, c in store_chunks(store)])  # every chunk read and checked

    q = synthetic(20, D, seed=5)
    before = search(open_store(cfg_dict["encode"]["output"]))
    write_shard(data, 1)
    r = _cli(cfg_path, ["run", "--append"], {"PQGPU_FAULT": fault, "PQGPU_FAULT_DELAY": "0.05"})
    assert r.returncode == -9, r.stderr
    killed = open_store(cfg_dict["encode"]["output"])  # a reader sees the previous complete state
    assert killed.n == SIZES[0] and killed.verify().ok and killed.info()["complete"]
    np.testing.assert_array_equal(search(killed), before)
    r = _cli(cfg_path, ["run", "--append"], {})
    assert r.returncode == 0, r.stderr
    once = config(tmp_path, data, "once.zarr", nlist)
    encode(once)
    g, o = open_store(cfg_dict["encode"]["output"]), open_store(once.encode.output)
    for name in ("codes", "ids") + (("lists",) if nlist else ()):
        np.testing.assert_array_equal(g.group[name][...], o.group[name][...])
    assert g.verify().ok and len(g.attrs["generations"]) == 2
    np.testing.assert_array_equal(search(g), search(o))


def test_cli_append_info_and_compact(tmp_path, capsys):
    from pqgpu import cli

    data = tmp_path / "data"
    write_shard(data, 0)
    base = [str(data), "--id-column", "id", "--out", str(tmp_path / "out"), "--M", "4", "--nbits", "6",
            "--set", "quantizer.nlist=8", "--set", f"encode.chunk_rows={CHUNK_ROWS}", "--set", "quantizer.niter=4",
            "--set", "quantizer.train_size=700"]
    store = str(tmp_path / "out" / "codes.zarr")
    assert cli.main(["compact", store]) == 2  # no store yet
    assert cli.main(["run", *base, "--append"]) == 2
    assert "no code store" in capsys.readouterr().err
    assert cli.main(["run", *base]) == 0
    assert cli.main(["run", *base, "--append"]) == 0  # nothing new
    write_shard(data, 1)
    capsys.readouterr()
    assert cli.main(["run", *base]) == 2
    assert "--append" in capsys.readouterr().err
    assert cli.main(["run", *base, "--append"]) == 0
    assert cli.main(["info", store]) == 0
    out = capsys.readouterr().out
    assert "generation 0" in out and "generation 1" in out and "rows 700-1149" in out
    assert "inverted segments: 2 (`pqgpu compact" in out
    assert cli.main(["compact", store]) == 0
    assert "2 inverted segments merged" in capsys.readouterr().out
    assert cli.main(["verify", store]) == 0


def test_append_on_dask_workers(tmp_path):
    """The tasks (encode with kept rows, segment scatter and copy) through a Dask client."""
    from distributed import Client, LocalCluster

    data = tmp_path / "data"
    write_shard(data, 0)
    cfg = config(tmp_path, data, "grow.zarr", 8)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        run(cfg, client=client)
        write_shard(data, 1)
        write_shard(data, 2)
        run(cfg, client=client, append=True)
    once = config(tmp_path, data, "once.zarr", 8)
    encode(once)
    g, o = open_store(cfg.encode.output), open_store(once.encode.output)
    for name in ("codes", "ids", "lists"):
        np.testing.assert_array_equal(g.group[name][...], o.group[name][...])
    assert g.attrs["generations"][1]["files"][-1].endswith("shard-0002.parquet") and g.verify().ok


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_ivf_segments_of_another_metric_search_like_one_layout(tmp_path, monkeypatch, metric):
    import dataclasses

    from pqgpu.ivf_search import IvfIndex

    data = tmp_path / "data"
    write_shard(data, 0)
    cfg = config(tmp_path, data, "grow.zarr", 8)
    cfg = dataclasses.replace(cfg, quantizer=dataclasses.replace(cfg.quantizer, metric=metric))
    run(cfg)
    write_shard(data, 1)
    write_shard(data, 2)
    run(cfg, append=True)
    once = dataclasses.replace(cfg, encode=dataclasses.replace(cfg.encode, output=str(tmp_path / "once.zarr")))
    encode(once)
    g, o = open_store(cfg.encode.output), open_store(once.encode.output)
    q = synthetic(30, D, seed=3)
    monkeypatch.setattr("pqgpu.ivf_search.SEGMENT_LOAD_BYTES", 0)
    for load in (True, False):
        dg, rg = IvfIndex(g, load=load).search(q, 10, nprobe=3, backend="cpu")
        do, ro = IvfIndex(o, load=load).search(q, 10, nprobe=3, backend="cpu")
        np.testing.assert_array_equal(rg, ro)
        np.testing.assert_array_equal(dg, do)
        assert (np.diff(dg, axis=1) <= 0).all()  # similarities, largest first


def test_append_to_a_store_smaller_than_one_chunk(tmp_path):
    """Its Zarr chunks hold its n rows, not chunk_rows: the append gives them the encode grid first."""
    import dataclasses

    data = tmp_path / "data"
    write_shard(data, 0)
    cfg = config(tmp_path, data, "grow.zarr", 8)
    cfg = dataclasses.replace(cfg, encode=dataclasses.replace(cfg.encode, chunk_rows=1000))
    run(cfg)
    assert open_store(cfg.encode.output).codes.chunks[0] == SIZES[0]
    write_shard(data, 1)
    run(cfg, append=True)
    once = dataclasses.replace(cfg, encode=dataclasses.replace(cfg.encode, output=str(tmp_path / "once.zarr")))
    encode(once)
    g, o = open_store(cfg.encode.output), open_store(once.encode.output)
    assert g.codes.chunks[0] == 1000 and g.verify().ok
    for name in ("codes", "ids", "lists"):
        np.testing.assert_array_equal(g.group[name][...], o.group[name][...])
