"""Crash safety, resume, locking and bad input: nothing lost, nothing silently wrong."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pqgpu import cli
from pqgpu.codebook import Codebook
from pqgpu.config import ClusterConfig, load_config
from pqgpu.errors import InputError, StoreError
from pqgpu.pipeline import encode, train
from pqgpu.sample import make_sample
from pqgpu.sources import open_source, plan_chunks
from pqgpu.store import exclusive_lock, open_store

N, D, CHUNK = 2400, 16, 300  # 8 chunks


def write_config(tmp_path: Path, fmt: str = "parquet", data: str = "data", **over) -> Path:
    path = {"parquet": f"{tmp_path}/{data}/*.parquet", "npy": f"{tmp_path}/{data}/shard-*.npy",
            "zarr": f"{tmp_path}/{data}/*.zarr"}[fmt]
    cfg = {
        "source": {"format": fmt, "path": path, "id_column": "id" if fmt != "npy" else None,
                   "vector_column": "embedding"},
        "quantizer": {"path": f"{tmp_path}/pq.faiss", "M": 4, "nbits": 6, "train_size": 100000, "niter": 3},
        "encode": {"output": f"{tmp_path}/codes.zarr", "chunk_rows": CHUNK, "backend": "cpu"},
        "cluster": {"kind": "local", "n_workers": 2, "threads_per_worker": 1},
    }
    for key, value in over.items():
        section, name = key.split("__")
        cfg[section][name] = value
    p = tmp_path / f"config-{fmt}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture
def prepared(tmp_path):
    """Sample data, a trained quantizer, and the reference codes computed without the pipeline."""
    make_sample(tmp_path / "data", N, D, shards=3, fmt="parquet")
    cfg_path = write_config(tmp_path)
    cfg = load_config(cfg_path)
    train(cfg)
    cb = Codebook.load(cfg.quantizer.path)
    source = open_source(cfg.source)
    [whole] = plan_chunks([s.n_rows for s in source.shards], N)
    x, ids = source.read_chunk(whole)
    return cfg_path, cfg, cb.encode(x), ids


def assert_store_equals(cfg, codes, ids):
    store = open_store(cfg.encode.output)
    assert store.is_complete()
    assert np.array_equal(store.codes[...], codes)
    assert np.array_equal(store.ids[...], ids)


def assert_done_chunks_are_right(cfg, codes):
    store = open_store(cfg.encode.output)
    done = store.done[...]
    for i in np.flatnonzero(done):
        lo, hi = store.chunk_range(int(i))
        assert np.array_equal(store.codes[lo:hi], codes[lo:hi]), f"chunk {i} marked done with wrong data"
    return done


def run_cli_subprocess(args, env_extra):
    env = {**os.environ, **env_extra}
    proc = subprocess.Popen([sys.executable, "-m", "pqgpu.cli", "-q", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        try:  # the killed driver's Dask workers are in its session: clean them up
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
def test_sigkill_whole_process_then_resume_is_byte_identical(prepared):
    cfg_path, cfg, codes, ids = prepared
    rc, _, err = run_cli_subprocess(["encode", "-c", str(cfg_path)], {"PQGPU_FAULT": "driver-after:3:kill",
                                                                       "PQGPU_FAULT_DELAY": "0.5"})
    assert rc == -signal.SIGKILL, err
    done = assert_done_chunks_are_right(cfg, codes)
    assert 3 <= done.sum() < len(done)
    rc, out, err = run_cli_subprocess(["encode", "-c", str(cfg_path)], {})
    assert rc == 0, err
    assert_store_equals(cfg, codes, ids)


@pytest.mark.slow
def test_worker_killed_mid_task_is_retried(prepared, tmp_path, monkeypatch):
    cfg_path, cfg, codes, ids = prepared
    monkeypatch.setenv("PQGPU_FAULT", "after-codes:2:kill")  # dies between writing codes and ids/done
    monkeypatch.setenv("PQGPU_FAULT_ONCE", str(tmp_path / "fired"))
    report = encode(cfg)
    assert (tmp_path / "fired").exists(), "the fault never fired"
    assert report.chunks_encoded == 8
    assert_store_equals(cfg, codes, ids)


@pytest.mark.slow
def test_lone_worker_killed_mid_task_is_retried(prepared, tmp_path, monkeypatch):
    """The one worker dies mid-run and its nanny starts another: the codebook and source it held must come back
    (a scattered copy died with it and every remaining task was cancelled, "already forgotten")."""
    cfg_path, cfg, codes, ids = prepared
    cfg = load_config(write_config(tmp_path, cluster__n_workers=1))
    monkeypatch.setenv("PQGPU_FAULT", "after-codes:2:kill")
    monkeypatch.setenv("PQGPU_FAULT_ONCE", str(tmp_path / "fired"))
    report = encode(cfg)
    assert (tmp_path / "fired").exists(), "the fault never fired"
    assert report.chunks_encoded == 8
    assert_store_equals(cfg, codes, ids)


def test_failed_task_leaves_chunk_not_done_then_resume(prepared, monkeypatch):
    from distributed import Client, LocalCluster

    cfg_path, cfg, codes, ids = prepared
    monkeypatch.setenv("PQGPU_FAULT", "after-codes:5:raise")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with pytest.raises(RuntimeError, match="injected fault"):
            encode(cfg, client=client)
        done = assert_done_chunks_are_right(cfg, codes)
        assert not done[5]
        monkeypatch.delenv("PQGPU_FAULT")
        encode(cfg, client=client)
    assert_store_equals(cfg, codes, ids)


def test_second_encoder_on_same_store_is_refused(prepared):
    _, cfg, _, _ = prepared
    with exclusive_lock(cfg.encode.output):
        with pytest.raises(StoreError, match="being written by pid"):
            encode(cfg)


def test_memory_limit_is_passed_to_workers():
    from pqgpu.cluster import dask_client

    with dask_client(ClusterConfig(n_workers=1, threads_per_worker=1, memory_limit="300MB")) as client:
        workers = client.scheduler_info()["workers"].values()
        assert [w["memory_limit"] for w in workers] == [300_000_000]
        # the nanny's MALLOC_TRIM_THRESHOLD_ alone made every Parquet page buffer a fresh mmap (reads 2.7x slower)
        env = client.run(lambda: os.environ.get("MALLOC_MMAP_THRESHOLD_"))
        assert list(env.values()) == [str(64 << 20)]


def test_changed_source_is_refused(prepared, tmp_path):
    cfg_path, cfg, codes, _ = prepared
    rc, _, err = run_cli_subprocess(["encode", "-c", str(cfg_path)], {})
    assert rc == 0, err
    # append a row group's worth of rows to one shard: the source fingerprint changes
    f = sorted((tmp_path / "data").glob("*.parquet"))[0]
    t = pq.read_table(f)
    pq.write_table(pa.concat_tables([t, t.slice(0, 10)]), f)
    rc, _, err = run_cli_subprocess(["encode", "-c", str(cfg_path)], {})
    assert rc == 2 and f"{f} had 800 rows and now has 810" in err and "--overwrite" in err
    assert np.array_equal(open_store(cfg.encode.output).codes[...], codes)


def test_empty_shards_are_fine(tmp_path):
    make_sample(tmp_path / "data", 900, 8, shards=2, fmt="parquet")
    t = pq.read_table(tmp_path / "data" / "shard-0000.parquet").slice(0, 0)
    pq.write_table(t, tmp_path / "data" / "shard-0000b.parquet")
    cfg = load_config(write_config(tmp_path, quantizer__M=2, encode__chunk_rows=200))
    train(cfg)
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as c, Client(c) as client:
        report = encode(cfg, client=client)
    assert report.n == 900 and open_store(cfg.encode.output).is_complete()


def test_duplicate_ids_warn_or_fail_with_strict(tmp_path, caplog, capsys):
    make_sample(tmp_path / "data", 600, 8, shards=2, fmt="parquet")
    f = tmp_path / "data" / "shard-0001.parquet"
    t = pq.read_table(f)
    ids = t.column("id").to_numpy().copy()
    ids[5] = 1000  # the first id of shard 0
    pq.write_table(t.set_column(0, "id", pa.array(ids)), f)
    cfg_path = write_config(tmp_path, quantizer__M=2, quantizer__nbits=4, cluster__n_workers=1)
    assert cli.main(["run", "-c", str(cfg_path)]) == 0
    assert "1 id(s) occur more than once, e.g. id 1000" in caplog.text
    assert cli.main(["encode", "-c", str(cfg_path), "--strict-ids"]) == 2
    err = capsys.readouterr().err
    assert "shard-0000.parquet row 0" in err and "shard-0001.parquet row 5" in err


# ---- bad input: one table, each case with a clear message, exit code 2 and earlier outputs intact -----------

def _parquet(path: Path, vectors, ids=None, vec_type=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.arange(len(vectors)) if ids is None else ids
    arr = pa.array(vectors, type=vec_type) if vec_type is not None else pa.array(vectors)
    pq.write_table(pa.table({"id": pa.array(ids), "embedding": arr}), path)


def good_rows(n=300, d=D, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def case_nan(tmp):
    x = good_rows(); x[123, 4] = np.nan
    _parquet(tmp / "bad" / "a.parquet", list(x), vec_type=pa.list_(pa.float32(), D))
    return "parquet", r"a\.parquet: row 123 .*NaN or Inf"


def case_inf_npy(tmp):
    (tmp / "bad").mkdir()
    x = good_rows(); x[7, 0] = np.inf
    np.save(tmp / "bad" / "shard-0.npy", good_rows(50))
    np.save(tmp / "bad" / "shard-1.npy", x)
    return "npy", r"shard-1\.npy: row 7 \(global row 57\)"


def case_mixed_dims(tmp):
    _parquet(tmp / "bad" / "a.parquet", list(good_rows()), vec_type=pa.list_(pa.float32(), D))
    _parquet(tmp / "bad" / "b.parquet", list(good_rows(d=D + 2)), vec_type=pa.list_(pa.float32(), D + 2))
    return "parquet", "disagree on the vector dimension.*b.parquet has d=18"


def case_ragged(tmp):
    rows = [list(r) for r in good_rows()]
    rows[42] = rows[42][:-1]
    _parquet(tmp / "bad" / "a.parquet", rows, vec_type=pa.list_(pa.float32()))
    return "parquet", "row 42 has an embedding of length 15"


def case_null_vector(tmp):
    rows = [list(r) for r in good_rows()]
    rows[9] = None
    _parquet(tmp / "bad" / "a.parquet", rows, vec_type=pa.list_(pa.float32()))
    return "parquet", "row 9 has a null embedding"


def case_missing_id_column(tmp):
    (tmp / "bad").mkdir()
    pq.write_table(pa.table({"key": np.arange(300), "embedding": pa.array(list(good_rows()), pa.list_(pa.float32(), D))}),
                   tmp / "bad" / "a.parquet")
    return "parquet", "no column 'id'. Columns present: key, embedding"


def case_missing_vector_column(tmp):
    (tmp / "bad").mkdir()
    pq.write_table(pa.table({"id": np.arange(3), "vec": pa.array([[1.0]] * 3)}), tmp / "bad" / "a.parquet")
    return "parquet", "no column 'embedding'"


def case_int_vectors(tmp):
    _parquet(tmp / "bad" / "a.parquet", [list(range(D))] * 300, vec_type=pa.list_(pa.int32(), D))
    return "parquet", "holds lists of int32; expected float16, float32 or float64"


def case_int_npy(tmp):
    (tmp / "bad").mkdir()
    np.save(tmp / "bad" / "shard-0.npy", np.ones((300, D), np.int64))
    return "npy", "dtype int64 is not supported"


def case_corrupt_parquet(tmp):
    (tmp / "bad").mkdir()
    (tmp / "bad" / "a.parquet").write_bytes(b"PAR1 this is not parquet" * 10)
    return "parquet", "a.parquet: not a readable Parquet file"


def case_truncated_parquet(tmp):
    _parquet(tmp / "bad" / "a.parquet", list(good_rows()), vec_type=pa.list_(pa.float32(), D))
    data = (tmp / "bad" / "a.parquet").read_bytes()
    (tmp / "bad" / "a.parquet").write_bytes(data[: len(data) // 2])
    return "parquet", "a.parquet: not a readable Parquet file"


def case_truncated_npy(tmp):
    (tmp / "bad").mkdir()
    np.save(tmp / "bad" / "shard-0.npy", good_rows())
    data = (tmp / "bad" / "shard-0.npy").read_bytes()
    (tmp / "bad" / "shard-0.npy").write_bytes(data[:1000])
    return "npy", "shard-0.npy: not a readable .npy file"


def case_corrupt_zarr(tmp):
    import zarr

    g = zarr.open_group(tmp / "bad" / "a.zarr", mode="w")
    g.create_array("embedding", data=good_rows(), chunks=(100, D))
    g.create_array("id", data=np.arange(300))
    chunk = next(p for p in (tmp / "bad" / "a.zarr" / "embedding").rglob("*") if p.is_file() and p.name == "0")
    chunk.write_bytes(b"garbage" * 5)
    return "zarr", "a.zarr: cannot read rows"


def case_no_match(tmp):
    (tmp / "bad").mkdir()
    return "parquet", "matches no"


BAD_INPUT = [case_nan, case_inf_npy, case_mixed_dims, case_ragged, case_null_vector, case_missing_id_column,
             case_missing_vector_column, case_int_vectors, case_int_npy, case_corrupt_parquet, case_truncated_parquet,
             case_truncated_npy, case_corrupt_zarr, case_no_match]


@pytest.fixture(scope="module")
def good_outputs(tmp_path_factory):
    """An earlier good quantizer and store, which no failed command may touch."""
    tmp = tmp_path_factory.mktemp("good")
    make_sample(tmp / "data", 600, D, shards=2, fmt="parquet")
    cfg_path = write_config(tmp, cluster__n_workers=1)
    assert cli.main(["-q", "run", "-c", str(cfg_path)]) == 0
    return tmp


def snapshot(tmp: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(tmp.rglob("*")) if p.is_file() and "data" not in p.parts}


@pytest.mark.parametrize("make_case", BAD_INPUT, ids=[f.__name__[5:] for f in BAD_INPUT])
def test_bad_input_is_a_clear_error(make_case, tmp_path, good_outputs, capsys):
    fmt, pattern = make_case(tmp_path)
    before = snapshot(good_outputs)
    path = {"parquet": f"{tmp_path}/bad/*.parquet", "npy": f"{tmp_path}/bad/shard-*.npy", "zarr": f"{tmp_path}/bad/*.zarr"}[fmt]
    common = ["--set", f"source.format={fmt}", "--set", f"source.path={path}",
              "--set", f"source.id_column={'null' if fmt == 'npy' else 'id'}"]
    good_cfg = str(good_outputs / "config-parquet.yaml")
    # training from the bad source must not replace the good quantizer
    assert cli.main(["train", "-c", good_cfg, *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(pattern, err), err
    # encoding it into a new store fails the same way (the good store is another path)
    assert cli.main(["encode", "-c", good_cfg, *common, "--set", f"encode.output={tmp_path}/new.zarr",
                     "--set", "cluster.n_workers=1"]) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(pattern, err) or "dimension" in err, err
    assert snapshot(good_outputs) == before


@pytest.mark.parametrize("args,pattern", [
    (["--set", "quantizer.M=abc"], "quantizer.M: expected int. Got 'abc'"),
    (["--set", "encode.chunk_rows=-5"], "encode.chunk_rows: expected a positive integer"),
    (["--set", "encode.bakend=cpu"], "Unknown key.*encode.bakend.*Valid keys in 'encode': output, chunk_rows, backend"),
    (["--set", "cluster.kind=address"], "cluster.address is empty"),
    (["--set", "quantizer.M=5"], "d=16 is not divisible by M=5"),
    (["--set", "encode.output=/proc/forbidden/codes.zarr"], "Cannot create the code store at /proc/forbidden"),
    (["--set", "encode.backend=gpu"], "backend 'gpu' was requested"),
])
def test_config_and_output_errors(args, pattern, good_outputs, capsys, tmp_path):
    import re

    from pqgpu.backend import gpu_status

    if "gpu" in pattern and gpu_status()[0]:
        pytest.skip("a GPU is visible")
    before = snapshot(good_outputs)
    cmd = "train" if "M=" in " ".join(args) else "encode"
    extra = ["--set", f"quantizer.path={tmp_path}/pq.faiss"] if cmd == "train" else []
    assert cli.main([cmd, "-c", str(good_outputs / "config-parquet.yaml"), *args, *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert snapshot(good_outputs) == before


class _FakeStore:
    """Like a CodeStore: ids read by slicing (a new numpy array each time), in chunks of 3 rows."""

    def __init__(self, ids, path="s.zarr"):
        self._ids, self.path, self.n_chunks = ids, path, -(-len(ids) // 3)

    @property
    def ids(self):
        ids = self._ids

        class ZarrLike:
            def __getitem__(self, key):
                return ids[key].copy()

        return ZarrLike()

    def chunk_range(self, i):
        return 3 * i, min(len(self._ids), 3 * i + 3)


@pytest.mark.parametrize("parts", [None, 3])
@pytest.mark.parametrize("ids", [np.array([5, 3, 5, 3, 3, 9, 7, 7]), np.array(["e", "c", "e", "c", "c", "i", "g", "g"])])
def test_duplicate_id_count_and_first_rows(ids, parts):
    from types import SimpleNamespace

    from pqgpu.ids import check_duplicate_ids

    store = _FakeStore(ids)
    source = SimpleNamespace(locate=lambda row: ("f.parquet", row))
    first = ids[1].item()
    with pytest.raises(InputError, match=f"^3 id\\(s\\) occur more than once, e.g. id {first!r} at f.parquet row 1 "
                                         "and f.parquet row 3"):
        check_duplicate_ids(store, source, strict=True, parts=parts)
    assert check_duplicate_ids(store, source, strict=False, parts=parts) == 3
    assert check_duplicate_ids(_FakeStore(np.unique(ids)), source, strict=True, parts=parts) == 0


def test_duplicate_ids_partitions_agree_with_numpy():
    """Hash partitions change nothing: counts and the smallest duplicate equal numpy's, for ints and strings,
    whatever the number of partitions and groups."""
    from pqgpu.ids import find_duplicates, partition_of

    rng = np.random.default_rng(3)
    big = rng.integers(0, 2**62, 700)
    big[[5, 600]] = big[300]
    for ids in (rng.integers(-50, 400, 700), big, rng.integers(0, 300, 700).astype(str)):
        values, counts = np.unique(ids, return_counts=True)
        dup = values[counts > 1]
        first_rows = list(np.flatnonzero(ids == dup[0])[:2])
        for parts in (1, 2, 7):
            assert set(np.unique(partition_of(ids, parts))) <= set(range(parts))
            for groups in (1, 5, 64):
                n_dup, first, rows = find_duplicates(_FakeStore(ids), parts=parts, groups=groups)
                assert (n_dup, first, rows) == (dup.size, dup[0], first_rows)
        assert find_duplicates(_FakeStore(np.unique(ids)), parts=3) == (0, None, [])


def test_duplicate_ids_on_dask_workers_read_the_store_there(tmp_path):
    """With a client the split/count/scan tasks open the store by path on the workers and agree with numpy."""
    from distributed import Client, LocalCluster

    from pqgpu.ids import find_duplicates
    from pqgpu.store import create_store

    n = 1000
    ids = np.arange(n, dtype=np.int64) * 7
    ids[[400, 905]] = ids[123]  # 861 three times
    ids[[10, 20]] = -5  # -5 twice: the smallest duplicate
    cb = Codebook(8, 2, 4, np.zeros((2, 16, 4), np.float32))
    store = create_store(tmp_path / "s.zarr", codebook=cb, n=n, chunk_rows=64, id_dtype=np.int64, source={})
    store.ids[...] = ids
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as c, \
            Client(c) as client:
        # driver_max_rows=0: on the workers even at this size
        assert find_duplicates(store, client=client, parts=4, groups=5, driver_max_rows=0) == (2, -5, [10, 20])
        store.ids[10] = 3  # now only 861 repeats
        assert find_duplicates(store, client=client, parts=4, groups=5, driver_max_rows=0) == (1, 861, [123, 400])


def test_small_id_scans_stay_in_this_process_even_with_a_client(tmp_path):
    """Up to ids.DRIVER_MAX_ROWS ids the scan runs here: as tasks it cost a 2-worker cluster 0.3 s at 1M ids."""
    from pqgpu.ids import find_duplicates
    from pqgpu.store import create_store

    class NoTasks:
        def submit(self, *a, **k):
            raise AssertionError("a task was submitted")

        gather = submit

    ids = np.arange(300, dtype=np.int64)
    ids[250] = ids[7]
    cb = Codebook(8, 2, 4, np.zeros((2, 16, 4), np.float32))
    store = create_store(tmp_path / "s.zarr", codebook=cb, n=300, chunk_rows=64, id_dtype=np.int64, source={})
    store.ids[...] = ids
    assert find_duplicates(store, client=NoTasks()) == (1, 7, [7, 250])
    with pytest.raises(AssertionError, match="a task was submitted"):
        find_duplicates(store, client=NoTasks(), driver_max_rows=299)
