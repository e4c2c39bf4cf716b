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


# -- issue 22 item 4: what a newcomer trips over ----------------------------------------------------------

def make_ids(n: int = N) -> np.ndarray:
    return np.arange(n) * 7 + 1000  # make_sample's ids


def quick(*extra: str) -> list[str]:
    """Settings that keep a training run short."""
    return ["--set", "quantizer.train_size=1500", "--set", "quantizer.niter=2", "--set", "encode.chunk_rows=1000",
            *extra]


def test_format_comes_from_set_source_path(world, tmp_path, capsys):
    root, _ = world
    # before: without -c the format was npy, and the id column was taken for an npy ids file ('source.path
    # 'id' does not exist')
    assert cli.main(["-q", "run", "--set", f"source.path={root}/data/*.parquet", "--set", "source.id_column=id",
                     "--out", str(tmp_path / "o"), "--M", "8", *quick()]) == 0, capsys.readouterr().err
    store = open_store(tmp_path / "o" / "codes.zarr")
    assert store.attrs["source"]["format"] == "parquet" and store.is_complete()
    np.testing.assert_array_equal(store.ids[...], make_ids())
    assert config_from_dict({"source": {"path": "d/x.zarr"}}).source.format == "zarr"
    assert config_from_dict({}).source.format == "npy"  # neither path nor format: the default stays
    with pytest.raises(ConfigError, match=r"source\.path.*'d/vectors\.bin'.*--format"):
        config_from_dict({"source": {"path": "d/vectors.bin"}})


def test_npy_ids_error_names_source_id_column(tmp_path, capsys):
    np.save(tmp_path / "x.npy", sample_vectors(100, D))
    assert cli.main(["run", str(tmp_path / "x.npy"), "--id-column", "id", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "source.id_column 'id' does not exist" in err and "source.path" not in err, err


def test_run_on_a_make_sample_directory(tmp_path, capsys):
    make_sample(tmp_path / "d", N, D, shards=SHARDS, fmt="parquet", n_queries=10)
    assert (tmp_path / "d" / "queries.npy").exists()  # beside the shards: before, "several kinds"
    assert cli.main(["-q", "run", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--M", "8",
                     "--id-column", "id", *quick()]) == 0, capsys.readouterr().err
    store = open_store(tmp_path / "o" / "codes.zarr")
    assert store.n == N and store.attrs["source"]["format"] == "parquet"
    np.testing.assert_array_equal(store.ids[...], make_ids())


def test_npy_make_sample_directory_says_how_to_pair_ids(tmp_path, capsys):
    make_sample(tmp_path / "d", 300, D, shards=2, fmt="npy", n_queries=5)
    assert cli.main(["run", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--M", "8"]) == 2
    err = capsys.readouterr().err
    assert "ids-0000.npy" in err and "source.id_column" in err and "shard-*.npy" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("how", [["SOURCE"], ["--set"], ["--set", "--format"]])
def test_nested_split_layout_is_named_plainly(world, tmp_path, capsys, how):
    import shutil

    root, _ = world
    for split, shards in (("train", [0, 1]), ("test", [2])):
        (tmp_path / "hf" / split).mkdir(parents=True)
        for i in shards:
            shutil.copy(root / "data" / f"shard-{i:04d}.parquet", tmp_path / "hf" / split)
    hf = str(tmp_path / "hf")
    args = [hf] if how == ["SOURCE"] else ["--set", f"source.path={hf}"] + (["--format", "parquet"] if len(how) > 1
                                                                             else [])
    assert cli.main(["run", *args, "--out", str(tmp_path / "o"), "--M", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "does not search subdirectories" in err and f"{hf}/train (2 parquet)" in err, err
    assert f"{hf}/test (1 parquet)" in err and f"{hf}/*/*.parquet" in err, err


@pytest.mark.parametrize("argv", [["--debug", "-q", "info", "S"], ["info", "S", "--debug", "-q"],
                                  ["info", "--quiet", "S", "--debug"], ["--debug", "info", "S", "--quiet"]])
def test_debug_and_quiet_anywhere(argv):
    args = cli.build_parser().parse_args(argv)
    assert (args.debug, args.quiet, args.store) == (True, True, "S")
    plain = cli.build_parser().parse_args(["info", "S"])
    assert (plain.debug, plain.quiet) == (False, False)


def test_quiet_after_the_subcommand_silences_info(world, tmp_path):
    root, _ = world
    rc, out, err = cli_subprocess(["run", f"{root}/data", "--id-column", "id", "--M", "8", "--out",
                                   str(tmp_path / "o"), *quick(), "--quiet"])
    assert rc == 0, err
    assert "INFO" not in err, err


def api_results(store: Path, queries: np.ndarray, k: int) -> list[tuple[int, int, int, float]]:
    from pqgpu.search import search

    d, ids = search(store, queries, k)
    return [(q, r, int(ids[q, r]), float(d[q, r])) for q in range(len(queries)) for r in range(k)]


def read_results(path: Path | str, kind: str, text: str = "") -> list[tuple[int, int, int, float]]:
    import json

    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if kind == "jsonl":
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        return [(r["query"], r["rank"], r["id"], r["distance"]) for r in rows]
    if kind == "stdout":
        import io

        t = pcsv.read_csv(io.BytesIO(text.encode()))
    else:
        t = pq.read_table(path) if kind == "parquet" else pcsv.read_csv(path)
    assert t.column_names == ["query", "rank", "id", "distance"]
    return list(zip(*(t.column(c).to_pylist() for c in t.column_names)))


@pytest.mark.parametrize("name,kind", [("r.parquet", "parquet"), ("r.csv", "csv"), ("r.json", "jsonl"),
                                       ("-", "stdout")])
def test_search_out_writes_what_its_suffix_says(world, tmp_path, capsys, name, kind):
    root, _ = world
    queries = np.load(root / "data" / "queries.npy")
    out = "-" if name == "-" else str(tmp_path / name)
    assert cli.main(["-q", "search", str(root / "codes.zarr"), "--queries", str(root / "data" / "queries.npy"),
                     "-k", "5", "--out", out]) == 0
    stdout = capsys.readouterr().out
    got = read_results(out, kind, stdout)
    want = api_results(root / "codes.zarr", queries, 5)
    assert [g[:3] for g in got] == [w[:3] for w in want]
    np.testing.assert_allclose([g[3] for g in got], [w[3] for w in want], rtol=1e-6)
    if name == "-":
        assert not (Path.cwd() / "-").exists() and stdout.startswith('"query","rank","id","distance"')


def test_search_out_with_another_suffix_is_refused(world, tmp_path, capsys):
    root, _ = world
    assert cli.main(["search", str(root / "codes.zarr"), "--queries", str(root / "data" / "queries.npy"),
                     "--out", str(tmp_path / "r.txt")]) == 2
    err = capsys.readouterr().err
    assert ".parquet" in err and ".csv" in err and ".json" in err and not (tmp_path / "r.txt").exists(), err


def test_search_into_a_closed_pipe_exits_quietly(world, tmp_path):
    root, _ = world
    np.save(tmp_path / "q.npy", np.tile(np.load(root / "data" / "queries.npy"), (200, 1)))  # ~500 kB of CSV
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "pqgpu.cli", "-q", "search", str(root / "codes.zarr"),
                             "--queries", str(tmp_path / "q.npy"), "-k", "10", "--out", "-"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()  # as `| head -1` does, then leave
    proc.stdout.close()
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=120)
    assert first.startswith(b'"query"')
    assert rc == cli.EXIT_BROKEN_PIPE and err == "", (rc, err)


def write_queries(path: Path, q: np.ndarray, kind: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zarr

    if kind == "parquet":
        pq.write_table(pa.table({"vec": pa.FixedSizeListArray.from_arrays(pa.array(q.ravel()), q.shape[1])}), path)
    else:
        zarr.open_group(path, mode="w").create_array("vec", data=q)


@pytest.mark.parametrize("kind", ["parquet", "zarr"])
def test_queries_in_parquet_and_zarr(world, tmp_path, capsys, kind):
    root, _ = world
    queries = np.load(root / "data" / "queries.npy")
    qpath = tmp_path / f"q.{kind}"
    write_queries(qpath, queries, kind)
    # the column is named as for sources; without it, the error says which columns there are
    assert cli.main(["-q", "search", str(root / "codes.zarr"), "--queries", str(qpath), "-k", "4"]) == 2
    err = capsys.readouterr().err
    assert "vec" in err and "--vector-column" in err, err
    assert cli.main(["-q", "search", str(root / "codes.zarr"), "--queries", str(qpath), "--vector-column", "vec",
                     "-k", "4", "--out", str(tmp_path / "r.csv")]) == 0
    got, want = read_results(tmp_path / "r.csv", "csv"), api_results(root / "codes.zarr", queries, 4)
    assert [g[:3] for g in got] == [w[:3] for w in want]
    np.testing.assert_allclose([g[3] for g in got], [w[3] for w in want], rtol=1e-6)


def test_queries_of_an_unknown_kind_name_the_formats(world, tmp_path, capsys):
    root, _ = world
    (tmp_path / "q.bin").write_bytes(b"\0" * 64)
    assert cli.main(["search", str(root / "codes.zarr"), "--queries", str(tmp_path / "q.bin")]) == 2
    err = capsys.readouterr().err
    assert "--queries" in err and ".parquet" in err and ".npy" in err and ".zarr" in err, err


def test_k_larger_than_n_lists_only_real_results(tmp_path, capsys):
    """A 6-row store whose ids include a real -1: the output has 6 rows per query, none of them padding."""
    from pqgpu.kernels import unpack_codes
    from pqgpu.search import search

    n, k = 6, 10
    x = sample_vectors(n, D, seed=5)
    ids = np.array([-1, 3, 5, 8, 13, 21], np.int64)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ids.npy", ids)
    cb = Codebook(D, 8, 2, x[:4].reshape(4, 8, D // 8).transpose(1, 0, 2).copy())
    (tmp_path / "o").mkdir()
    cb.save(tmp_path / "o" / "pq.faiss")
    assert cli.main(["-q", "encode", str(tmp_path / "x.npy"), "--id-column", str(tmp_path / "ids.npy"),
                     "--M", "8", "--nbits", "2", "--out", str(tmp_path / "o")]) == 0, capsys.readouterr().err
    q = sample_vectors(3, D, seed=9)
    np.save(tmp_path / "q.npy", q)
    store = tmp_path / "o" / "codes.zarr"
    assert cli.main(["-q", "search", str(store), "--queries", str(tmp_path / "q.npy"), "-k", str(k),
                     "--out", str(tmp_path / "r.csv")]) == 0
    got = read_results(tmp_path / "r.csv", "csv")
    # brute force: the distance to each row's reconstruction is its ADC distance
    codes = np.asarray(unpack_codes(open_store(store).codes[...], 8, 2))
    recon = np.concatenate([cb.centroids[m, codes[:, m]] for m in range(8)], axis=1).astype(np.float64)
    dist = ((q[:, None, :].astype(np.float64) - recon[None]) ** 2).sum(-1)
    for qi in range(3):
        mine = [g for g in got if g[0] == qi]
        assert [g[1] for g in mine] == list(range(n))  # 6 results, not 10: no padding rows
        assert sorted(g[2] for g in mine) == sorted(ids.tolist())  # the real id -1 among them
        np.testing.assert_allclose(sorted(g[3] for g in mine), np.sort(dist[qi]), rtol=1e-5)
    # the Python API keeps faiss's shape and padding: id -1 and distance FLT_MAX beyond the n real results
    d, found = search(store, q, k)
    assert d.shape == (3, k) and (found[:, n:] == -1).all() and (d[:, n:] == np.finfo(np.float32).max).all()
    assert (d[:, :n] < np.finfo(np.float32).max).all() and (found[:, :n] == -1).sum() == 3


def test_doctor_prints_pgvector_version(capsys):
    import importlib.metadata as md

    try:
        version = md.version("pgvector")
    except md.PackageNotFoundError:
        pytest.skip("pgvector is not installed")
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"pgvector: {version}\n" in out, out


def test_python_run_takes_a_dict_or_a_yaml_path(world, tmp_path):
    import pqgpu
    import yaml

    root, _ = world
    cfg = {"source": {"path": f"{root}/data/*.parquet", "id_column": "id"},  # format from the path, as on the CLI
           "quantizer": {"path": str(tmp_path / "a" / "pq.faiss"), "M": 8, "train_size": 1500, "niter": 2},
           "encode": {"output": str(tmp_path / "a" / "codes.zarr"), "chunk_rows": 1000}}
    (tmp_path / "a").mkdir()
    report = pqgpu.run(cfg)
    assert report.n == N and open_store(tmp_path / "a" / "codes.zarr").is_complete()
    cfg["encode"]["output"] = str(tmp_path / "b.zarr")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert pqgpu.run(str(tmp_path / "c.yaml")).n == N and pqgpu.run(tmp_path / "c.yaml").chunks_encoded == 0
    np.testing.assert_array_equal(open_store(tmp_path / "b.zarr").codes[...],
                                  open_store(tmp_path / "a" / "codes.zarr").codes[...])
    assert pqgpu.load_config(cfg).source.format == "parquet"
    for bad in (42, ["source"]):
        with pytest.raises(pqgpu.ConfigError, match="Expected a path to a YAML config file, a dict"):
            pqgpu.run(bad)


def test_evaluate_takes_the_run_shortcuts(world, tmp_path, capsys):
    import json

    root, _ = world
    common = [f"{root}/data", "--id-column", "id", "--M", "8", "--out", str(tmp_path / "o")]
    assert cli.main(["-q", "run", *common, *quick()]) == 0
    assert cli.main(["-q", "evaluate", *common, "--queries", str(root / "data" / "queries.npy"), "-k", "1,10",
                     "--results", str(tmp_path / "e.json")]) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["n"] == N and result["M"] == 8 and 0 < result["1-recall@10"] <= 1
    capsys.readouterr()
    # the old meaning of --out (the results file) is refused, pointing to --results
    assert cli.main(["evaluate", *common[:-2], "--out", str(tmp_path / "e2.json"),
                     "--queries", str(root / "data" / "queries.npy")]) == 2
    assert "--results" in capsys.readouterr().err and not (tmp_path / "e2.json").exists()


def test_training_error_on_a_process_cluster_is_one_line(world, tmp_path):
    root, _ = world
    rc, _, err = cli_subprocess(["run", f"{root}/data", "--M", "7", "--out", str(tmp_path / "o"),
                                 "--set", "cluster.n_workers=2", "--set", "cluster.dashboard=false"])
    assert rc == 2, err
    for noise in ("Traceback", "Compute Failed", "distributed.worker", "ERROR"):
        assert noise not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: d=32 is not divisible by M=7"), err
    assert all(" INFO pqgpu." in line for line in lines[:-1]), err


# -- issue 22 item 3: quiet to the end -------------------------------------------------------------------

TEARDOWN_SCRIPT = '''
import logging, sys
from distributed.diagnostics.plugin import WorkerPlugin
from pqgpu.cluster import dask_client
from pqgpu.config import ClusterConfig
from pqgpu.logs import configure

class HeartbeatAfterTheEnd(WorkerPlugin):
    """While its worker closes, logs what a worker logs when its heartbeat finds the scheduler gone."""
    name = "heartbeat-after-the-end"

    def teardown(self, worker):
        try:
            raise OSError("Timed out trying to connect to tcp://127.0.0.1:1 after 30 s")
        except OSError:
            logging.getLogger("distributed.worker").exception("Failed to communicate with scheduler during heartbeat.")

configure(debug=sys.argv[1] == "debug")
with dask_client(ClusterConfig(n_workers=2, threads_per_worker=1, dashboard=False)) as client:
    client.register_plugin(HeartbeatAfterTheEnd())
    assert client.submit(sum, [1, 2]).result() == 3
print("complete", file=sys.stderr, flush=True)
'''


@pytest.mark.parametrize("mode", ["plain", pytest.param("debug", marks=pytest.mark.slow)])
def test_cluster_shutdown_is_quiet(mode):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", TEARDOWN_SCRIPT, mode], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    noise = "Failed to communicate with scheduler during heartbeat"
    if mode == "debug":  # shown there: the test's worker really logged it
        assert noise in res.stderr and "Traceback" in res.stderr, res.stderr
    else:
        assert noise not in res.stderr and "Traceback" not in res.stderr and "ERROR" not in res.stderr, res.stderr


def test_records_after_teardown_begins_are_dropped(monkeypatch):
    import logging

    from pqgpu import logs

    monkeypatch.setattr(logs, "_closing", False)
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    handler.addFilter(logs.DropExpected())
    logger = logging.getLogger("distributed.worker.test-teardown")
    logger.addHandler(handler)
    try:
        logger.error("before")
        logs.begin_teardown()  # what quiet_workers runs in each worker before the cluster closes
        logger.error("after")
        logging.getLogger("pqgpu.test-teardown").addHandler(handler)
        logging.getLogger("pqgpu.test-teardown").error("ours")  # pqgpu's own records are never dropped
    finally:
        logger.removeHandler(handler)
        logging.getLogger("pqgpu.test-teardown").removeHandler(handler)
    assert seen == ["before", "ours"]


def test_padded_slots_of_string_ids_are_left_out():
    from pqgpu.results import encode_results, result_columns

    big = np.finfo(np.float32).max
    ids = np.array([["doc-1", None], ["doc-2", "doc-3"]], dtype=object)
    cols = result_columns(np.array([[0.5, big], [1.5, 2.5]], np.float32), ids)
    assert cols["id"].tolist() == ["doc-1", "doc-2", "doc-3"] and cols["query"].tolist() == [0, 1, 1]
    assert encode_results(cols, "csv").decode().splitlines() == [
        '"query","rank","id","distance"', '0,0,"doc-1",0.5', '1,0,"doc-2",1.5', '1,1,"doc-3",2.5']
