"""The command line as a new user meets it (issue 16): a quantizer that disagrees with the config is refused,
an error found inside an encode task is one paragraph, only pqgpu logs at INFO, and a run needs no YAML."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pqgpu import cli
from pqgpu.codebook import Codebook
from pqgpu.config import config_from_dict
from pqgpu.errors import ConfigError
from pqgpu.sample import make_sample, sample_vectors
from pqgpu.store import open_store

from .helpers import assert_codes_match

faiss = pytest.importorskip("faiss")

REPO = Path(__file__).resolve().parents[1]
N, D, SHARDS = 3000, 32, 3


def cli_subprocess(args: list[str], cwd: Path | None = None, timeout: float = 180) -> tuple[int, str, str]:
    """`python -m pqgpu.cli ARGS` in a fresh process (its own logging, its own Dask workers)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "pqgpu.cli", *args], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:  # its Dask workers share its session
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, out.decode(), err.decode()


def source_rows() -> np.ndarray:
    """The vectors make_sample wrote, regenerated without the pipeline's readers."""
    bounds = np.linspace(0, N, SHARDS + 1).astype(np.int64)
    return np.concatenate([sample_vectors(int(b - a), D, start=int(a)) for a, b in zip(bounds[:-1], bounds[1:])])


def codebook_from_rows(x: np.ndarray, M: int, nbits: int, seed: int = 0, rotation=None) -> Codebook:
    """A valid quantizer without training: distinct data rows as centroids (these tests need files, not quality)."""
    rows = np.random.default_rng(seed).choice(len(x), 1 << nbits, replace=False)
    c = x[rows].reshape(1 << nbits, M, D // M).transpose(1, 0, 2)
    return Codebook(D, M, nbits, c, rotation)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Parquet shards, an M=8 quantizer and a complete store made with it (in-process Dask, no YAML)."""
    from distributed import Client, LocalCluster

    from pqgpu.pipeline import encode

    root = tmp_path_factory.mktemp("ux")
    make_sample(root / "data", N, D, shards=SHARDS, fmt="parquet", n_queries=10)
    codebook_from_rows(source_rows(), 8, 8).save(root / "pq.faiss")
    cfg_path = root / "c.yaml"
    cfg_path.write_text(f"""
source: {{format: parquet, path: "{root}/data/*.parquet", id_column: id}}
quantizer: {{path: "{root}/pq.faiss", M: 8, nbits: 8, train_size: 1500, niter: 2}}
encode: {{output: "{root}/codes.zarr", chunk_rows: 1000, backend: cpu}}
cluster: {{n_workers: 1, threads_per_worker: 1}}
""")
    cfg = config_from_dict({"source": {"format": "parquet", "path": f"{root}/data/*.parquet", "id_column": "id"},
                            "quantizer": {"path": str(root / "pq.faiss"), "M": 8},
                            "encode": {"output": str(root / "codes.zarr"), "chunk_rows": 1000, "backend": "cpu"}})
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as c, \
            Client(c) as client:
        encode(cfg, client=client)
    return root, cfg_path


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (quantizer, store, eval results) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- 1. a changed config is never silently ignored --------------------------------------------------------

@pytest.mark.parametrize("change,theirs", [("quantizer.M=16", "M=16, nbits=8, opq=false"),
                                           ("quantizer.nbits=4", "M=8, nbits=4, opq=false"),
                                           ("quantizer.opq=true", "M=8, nbits=8, opq=true")])
@pytest.mark.parametrize("command", ["run", "encode", "evaluate"])
def test_quantizer_disagreeing_with_config_is_refused(world, command, change, theirs, capsys):
    root, cfg_path = world
    before = snapshot(root)
    args = [command, "-c", str(cfg_path), "--set", change]
    if command == "evaluate":
        args += ["--queries", str(root / "data" / "queries.npy")]
    else:  # a new store: before the fix, run and encode wrote it with the M=8 quantizer and exited 0
        args += ["--set", f"encode.output={root}/new.zarr"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err  # one paragraph
    named = str(root / "codes.zarr") if command == "evaluate" else str(root / "pq.faiss")
    assert named in err and "M=8, nbits=8, opq=false" in err and theirs in err, err
    assert "--retrain" in err and ("quantizer.path" in err or "encode.output" in err), err
    assert snapshot(root) == before  # nothing written, nothing replaced


def test_opq_file_disagreeing_with_config_is_refused(world, tmp_path, capsys):
    root, cfg_path = world
    x = source_rows()
    rotation = np.linalg.qr(np.random.default_rng(3).standard_normal((D, D)))[0].astype(np.float32)
    codebook_from_rows(x, 8, 8, rotation=rotation).save(tmp_path / "opq.faiss")
    assert (tmp_path / "opq.faiss.opq").exists()
    assert cli.main(["encode", "-c", str(cfg_path), "--set", f"quantizer.path={tmp_path}/opq.faiss",
                     "--set", f"encode.output={tmp_path}/codes.zarr"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/opq.faiss.opq" in err and "opq=true" in err and "opq=false" in err, err
    assert not (tmp_path / "codes.zarr").exists()


def test_saving_without_rotation_removes_a_stale_opq_file(tmp_path):
    x = source_rows()
    rotation = np.linalg.qr(np.random.default_rng(3).standard_normal((D, D)))[0].astype(np.float32)
    codebook_from_rows(x, 8, 8, rotation=rotation).save(tmp_path / "pq.faiss")
    plain = codebook_from_rows(x, 4, 8, seed=1)
    plain.save(tmp_path / "pq.faiss")  # retrained without OPQ at the same path
    loaded = Codebook.load(tmp_path / "pq.faiss")
    assert loaded.rotation is None and not (tmp_path / "pq.faiss.opq").exists()
    np.testing.assert_array_equal(loaded.centroids, plain.centroids)


def test_run_retrain_replaces_quantizer_and_store(world, tmp_path, capsys):
    root, cfg_path = world
    pq_path, out = tmp_path / "pq.faiss", tmp_path / "codes.zarr"
    common = ["-c", str(cfg_path), "--set", f"quantizer.path={pq_path}", "--set", f"encode.output={out}"]
    codebook_from_rows(source_rows(), 8, 8).save(pq_path)
    assert cli.main(["-q", "run", *common]) == 0
    before = snapshot(tmp_path)
    # --retrain would leave the M=8 store unusable: refused unless --overwrite, nothing touched
    assert cli.main(["-q", "run", *common, "--set", "quantizer.M=16", "--retrain"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert cli.main(["-q", "run", *common, "--set", "quantizer.M=16", "--retrain", "--overwrite"]) == 0
    pq = faiss.read_ProductQuantizer(str(pq_path))
    store = open_store(out)
    assert (pq.M, store.attrs["M"]) == (16, 16)
    x = source_rows()
    cb = Codebook.load(pq_path)
    assert_codes_match(store.codes[...], pq.compute_codes(x), x, cb.centroids, 8)


# -- 2. an error inside an encode task is one paragraph ---------------------------------------------------

def write_bad_shard(root: Path, out: Path, kind: str) -> Path:
    """A copy of the world's shards where shard 2, row 500 is bad (NaN, or a null embedding)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = out / f"bad-{kind}"
    bad.mkdir(exist_ok=True)
    for i in range(SHARDS):
        t = pq.read_table(root / "data" / f"shard-{i:04d}.parquet")
        if i == 2:
            x = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
            if kind == "nan":
                x[500, 7] = np.nan
                emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D)
            else:
                rows = [list(map(float, r)) for r in x]
                rows[500] = None
                emb = pa.array(rows, pa.list_(pa.float32()))
            t = pa.table({"id": t.column("id"), "embedding": emb})
        pq.write_table(t, bad / f"shard-{i:04d}.parquet")
    return bad


def encode_bad(world, tmp_path, kind: str, *flags: str) -> tuple[int, str, Path]:
    root, cfg_path = world
    bad = write_bad_shard(root, tmp_path, kind)
    rc, _, err = cli_subprocess([*flags, "encode", "-c", str(cfg_path), "--set", f"source.path={bad}/*.parquet",
                                 "--set", f"encode.output={tmp_path}/codes.zarr", "--set", "encode.chunk_rows=250",
                                 "--set", "cluster.n_workers=2"])
    return rc, err, bad


@pytest.mark.parametrize("kind,what", [("nan", "NaN"), pytest.param("null", "null", marks=pytest.mark.slow)])
def test_bad_row_in_an_encode_task_is_one_paragraph(world, tmp_path, kind, what):
    rc, err, bad = encode_bad(world, tmp_path, kind)
    assert rc == 2, err
    for noise in ("Traceback", "Compute Failed", "CancelledError", "distributed.worker"):
        assert noise not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    message = [line for line in lines if line.startswith("error: ")]
    assert len(message) == 1 and message[0] == lines[-1], err  # our paragraph, once, last
    assert f"{bad}/shard-0002.parquet" in message[0] and "row 500" in message[0] and what in message[0], err
    # the only other lines are pqgpu's own progress (and Dask's notes on a loaded machine, at WARNING)
    load_notes = r".*WARNING.*(Event loop was unresponsive|full garbage collections)"
    assert all(re.match(r"\S+ \S+ INFO pqgpu\.", line) or re.match(load_notes, line) for line in lines[:-1]), err


def test_debug_shows_the_traceback(world, tmp_path):
    rc, err, bad = encode_bad(world, tmp_path, "nan", "--debug")
    assert rc != 0
    assert "Traceback" in err and "InputError" in err and f"{bad}/shard-0002.parquet" in err, err


# -- 3. only pqgpu speaks at INFO ------------------------------------------------------------------------

def third_party_info(err: str) -> list[str]:
    """INFO lines from any logger but pqgpu's (our format and distributed's own)."""
    ours = [m.group(1) for m in re.finditer(r"^\S+ \S+ INFO (\S+?):", err, re.M)]
    return [name for name in ours if not name.startswith("pqgpu")] + re.findall(r"^.* - INFO - .*$", err, re.M)


def test_commands_print_no_third_party_info(world):
    """doctor imports faiss on purpose, info must not need it; a whole run is checked in the test below."""
    root, _ = world
    for args in (["doctor"], ["info", str(root / "codes.zarr")]):
        rc, out, err = cli_subprocess(args)
        assert rc == 0, err
        assert "faiss.loader" not in err and not third_party_info(err), err


def test_recording_versions_does_not_import_faiss():
    code = ("import sys; from pqgpu.store import versions; v = versions(); "
            "assert 'faiss' not in sys.modules, 'faiss imported'; print(v.get('faiss'))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == faiss.__version__


# -- 6. a one-off run without a YAML file ---------------------------------------------------------------

def test_run_from_arguments_without_a_config_file(world, tmp_path):
    root, _ = world
    shards = [str(root / "data" / f"shard-{i:04d}.parquet") for i in range(SHARDS)]  # as a shell expands a glob
    rc, out, err = cli_subprocess(["run", *shards, "--out", "out", "--M", "8", "--id-column", "id",
                                   "--set", "quantizer.train_size=1500", "--set", "quantizer.niter=3",
                                   "--set", "encode.chunk_rows=1000", "--set", "cluster.n_workers=1"], cwd=tmp_path)
    assert rc == 0, err
    assert "faiss.loader" not in err and not third_party_info(err), err  # issue 16 item 3, on a whole run
    assert re.search(r"INFO pqgpu\.pipeline: store .* complete", err), err  # pqgpu itself still speaks
    store = open_store(tmp_path / "out" / "codes.zarr")
    assert store.is_complete() and store.attrs["M"] == 8 and store.attrs["source"]["format"] == "parquet"
    pq = faiss.read_ProductQuantizer(str(tmp_path / "out" / "pq.faiss"))
    assert (pq.d, pq.M, pq.nbits) == (D, 8, 8)
    x = source_rows()
    cb = Codebook.load(tmp_path / "out" / "pq.faiss")
    assert_codes_match(store.codes[...], pq.compute_codes(x), x, cb.centroids, 8)
    np.testing.assert_array_equal(store.ids[...], np.arange(N) * 7 + 1000)  # make_sample's ids


def test_arguments_map_to_config_keys_and_set_wins(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("a.parquet", "b.parquet"):
        (tmp_path / "d" / name).write_bytes(b"")

    def config(*argv):
        return cli._config(cli.build_parser().parse_args(["run", *argv]))

    cfg = config(str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--M", "32", "--nbits", "6")
    assert (cfg.source.format, cfg.source.path) == ("parquet", str(tmp_path / "d"))
    assert cfg.quantizer.path == str(tmp_path / "o" / "pq.faiss") and cfg.encode.output == str(tmp_path / "o" / "codes.zarr")
    assert (cfg.quantizer.M, cfg.quantizer.nbits) == (32, 6)
    cfg = config("x.npy", "y.npy", "--M", "32", "--set", "quantizer.M=16")
    assert (cfg.source.format, cfg.source.path, cfg.quantizer.M) == ("npy", ["x.npy", "y.npy"], 16)
    assert config("s.zarr/", "--id-column", "id").source.format == "zarr"
    assert config("data/*.pq").source.format == "parquet"
    (tmp_path / "d" / "q.npy").write_bytes(b"")  # a directory with two kinds: the format must be given
    with pytest.raises(ConfigError, match="--format"):
        config(str(tmp_path / "d"))
    assert config(str(tmp_path / "d"), "--format", "parquet").source.format == "parquet"
    with pytest.raises(ConfigError, match="--format"):
        config("vectors.bin")
