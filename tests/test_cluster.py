"""Against real separate processes: a `dask scheduler` and `dask worker` processes started here (not
LocalCluster), and a local S3-compatible server (moto) holding the shards and the store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from pqgpu.codebook import Codebook
from pqgpu.sample import make_sample

ROOT = Path(__file__).resolve().parents[1]
N, D, CHUNK = 2400, 16, 300  # 8 chunks


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PQGPU_FAULT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _start_cluster(tmp: Path, n_workers: int, worker_env: dict[str, str]) -> tuple[str, list[subprocess.Popen]]:
    """`dask scheduler` and n `dask worker --no-nanny` processes (one thread each); returns (address, procs
    with the scheduler first). The caller stops them with _stop()."""
    sched_file = tmp / "scheduler.json"
    procs: list[subprocess.Popen] = []
    try:
        with open(tmp / "cluster.log", "ab") as log:  # the children keep their own copies of the handle
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host",
                                           "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file",
                                           str(sched_file)], env=_env(), stdout=log, stderr=log))
            address = None
            for _ in range(600):
                try:
                    address = json.loads(sched_file.read_text())["address"]
                    break
                except (OSError, ValueError, KeyError):  # not there yet, or half written
                    time.sleep(0.1)
            assert address, f"the scheduler did not start; see {tmp / 'cluster.log'}"
            for _ in range(n_workers):
                procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                               "--nthreads", "1", "--no-nanny", "--no-dashboard", "--memory-limit",
                                               "0", "--host", "127.0.0.1"], env=_env(**worker_env), stdout=log,
                                              stderr=log))
        from distributed import Client

        with Client(address, timeout="30s") as c:
            c.wait_for_workers(n_workers, timeout=60)
        return address, procs
    except BaseException:
        _stop(procs)
        raise


def _config(tmp: Path, source: str, output: str, address: str | None = None, **encode) -> Path:
    cfg = {
        "source": {"format": "parquet", "path": source, "id_column": "id", "vector_column": "embedding"},
        "quantizer": {"path": str(tmp / "pq.faiss"), "M": 4, "nbits": 6, "train_size": 100000, "niter": 3},
        "encode": {"output": output, "chunk_rows": CHUNK, "backend": "auto", **encode},
        "cluster": {"kind": "address", "address": address} if address else {"kind": "local"},
    }
    p = tmp / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _pqgpu(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str]:
    """Run the CLI as its own process (a new session, so a killed driver's children can be cleaned up)."""
    proc = subprocess.Popen([sys.executable, "-m", "pqgpu.cli", *args], env=env or _env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, out.decode()


def _reference(files: list[Path], quantizer: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes of the whole dataset computed in this process, without the pipeline, and the ids."""
    import pyarrow.parquet as pq

    t = [pq.read_table(f) for f in sorted(files)]
    x = np.concatenate([np.stack(tt.column("embedding").to_numpy(zero_copy_only=False)) for tt in t])
    ids = np.concatenate([tt.column("id").to_numpy() for tt in t])
    return Codebook.load(quantizer).encode(x.astype(np.float32), "cpu"), ids


@pytest.mark.slow
def test_real_scheduler_and_workers_one_killed_mid_encode(tmp_path):
    """`pqgpu run` against a separately started scheduler with two worker processes: training is a worker
    task, one worker is SIGKILLed inside its third chunk, the other finishes, and the codes equal codes
    computed here without the pipeline. Workers report the backend they resolved (cpu), and backend gpu on
    these CPU-only workers fails naming them."""
    from pqgpu.backend import gpu_status
    from pqgpu.store import open_store

    files = make_sample(tmp_path / "data", N, D, shards=3, fmt="parquet")
    fired = tmp_path / "fired"
    address, procs = _start_cluster(tmp_path, 2, {"PQGPU_FAULT": "before-write:2:kill", "PQGPU_FAULT_ONCE": str(fired),
                                                  "PQGPU_FAULT_DELAY": "0.3"})
    try:
        cfg = _config(tmp_path, f"{tmp_path}/data/*.parquet", str(tmp_path / "codes.zarr"), address)
        # pqgpu on the client must not even try CuPy: a stand-in `cupy` on its path leaves a mark when pqgpu
        # code imports it (zarr probes for CuPy on import too; that is not pqgpu needing it)
        fake = tmp_path / "client-path" / "cupy"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text(
            "import traceback\n"
            "importer = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith('<frozen')][-1]\n"
            f"if '{os.sep}pqgpu{os.sep}' in importer.filename:\n"
            f"    open({str(tmp_path / 'client-imported-cupy')!r}, 'w').write(importer.filename)\n"
            "raise ImportError('no CuPy on the client')\n")
        client_env = _env()
        client_env["PYTHONPATH"] = os.pathsep.join([str(fake.parent), client_env["PYTHONPATH"]])
        rc, out = _pqgpu(["run", "-c", str(cfg)], env=client_env)
        assert rc == 0, out
        assert not (tmp_path / "client-imported-cupy").exists(), "the client imported CuPy"
        assert fired.exists(), "the fault never fired: no worker was killed"
        dead = [p for p in procs[1:] if p.poll() is not None]
        assert len(dead) == 1 and dead[0].returncode == -signal.SIGKILL, out
        assert "trained M=4 nbits=6 on cpu (tcp://127.0.0.1:" in out, out  # a worker trained, not the client
        assert "k-means 3 / 3 iterations (100.0%)" in out, out  # its progress reached the client
        codes, ids = _reference(files, str(tmp_path / "pq.faiss"))
        store = open_store(tmp_path / "codes.zarr")
        assert store.is_complete()
        assert np.array_equal(store.codes[...], codes) and np.array_equal(store.ids[...], ids)
        [run] = store.attrs["encode_runs"]
        assert set(run["workers"].values()) == {"cpu"} and all(w.startswith("tcp://127.0.0.1:") for w in run["workers"])

        if gpu_status()[0]:
            pytest.skip("a GPU is visible here, so the workers could use it")
        alive = next(p for p in procs[1:] if p.poll() is None)
        rc, out = _pqgpu(["encode", "-c", str(cfg), "--set", "encode.backend=gpu"])
        assert rc == 2, out
        assert "backend 'gpu' was requested but 1 Dask worker(s) have no usable GPU: tcp://127.0.0.1:" in out, out
        assert f"(host {socket.gethostname()})" in out and "Traceback" not in out
        assert alive.poll() is None
    finally:
        _stop(procs)


# ---- object storage: a local S3-compatible server -------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_server():
    """moto's standalone S3 server on a free port; yields the endpoint URL. fsspec (s3fs) reaches it through
    its config: FSSPEC_S3_ENDPOINT_URL in subprocesses, fsspec.config.conf here."""
    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    import fsspec

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "FSSPEC_S3_ENDPOINT_URL")}
    old_conf = fsspec.config.conf.get("s3")
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail("moto server exited at start")
                time.sleep(0.1)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", FSSPEC_S3_ENDPOINT_URL=endpoint)
        fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
        s3fs.S3FileSystem.clear_instance_cache()
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if old_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = old_conf
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_s3_shards_and_store_with_an_interrupted_run_resumed(s3_server, tmp_path):
    """Shards read from and the store written to S3 (moto + s3fs): a run killed after 3 chunks leaves those
    chunks done on S3, and the resumed run finishes with codes equal to codes computed here."""
    import fsspec

    from pqgpu import cli
    from pqgpu.store import open_store

    files = make_sample(tmp_path / "data", N, D, shards=3, fmt="parquet")
    fs = fsspec.filesystem("s3")
    fs.mkdir("pqgpu-test")
    for f in files:
        fs.put(str(f), f"pqgpu-test/shards/{Path(f).name}")
    out = "s3://pqgpu-test/out/codes.zarr"
    cfg = _config(tmp_path, "s3://pqgpu-test/shards/*.parquet", out)
    assert cli.main(["train", "-c", str(cfg)]) == 0  # quantizer.path stays local
    rc, log = _pqgpu(["encode", "-c", str(cfg)], env=_env(PQGPU_FAULT="driver-after:3:kill", PQGPU_FAULT_DELAY="0.2"))
    assert rc == -signal.SIGKILL, log
    done = open_store(out).done[...]
    assert 3 <= done.sum() < len(done), done
    assert cli.main(["encode", "-c", str(cfg)]) == 0
    codes, ids = _reference(files, str(tmp_path / "pq.faiss"))
    store = open_store(out)
    assert store.is_complete()
    assert np.array_equal(store.codes[...], codes) and np.array_equal(store.ids[...], ids)
    assert store.attrs["source"]["path"] == "s3://pqgpu-test/shards/*.parquet"
    assert not any(p.startswith("s3:") for p in os.listdir(".")), "an s3:// path was used as a local path"
