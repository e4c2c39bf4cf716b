"""Progress display, the threads-or-processes choice for local runs, and what the CLI imports."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pqgpu import progress
from pqgpu.cluster import IN_PROCESS_MAX_VALUES, choose_in_process
from pqgpu.config import ClusterConfig

ROOT = Path(__file__).resolve().parents[1]


def test_stage_logs_periodic_lines_when_not_on_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="pqgpu.progress")
    seen = []
    st = progress.Stage("encoded", 10, "rows", every=3600, callback=lambda done, total, t: seen.append(done))
    st.add(4)
    assert "encoded" not in caplog.text  # at most every `every` seconds...
    st.add(6)
    assert "encoded 10 / 10 rows (100.0%)" in caplog.text and "rows/s, ETA 0 s" in caplog.text  # ...and at the end
    assert seen == [4, 10]


def test_a_stage_left_open_by_a_failed_run_starts_afresh(caplog, monkeypatch):
    """A run that fails mid-stage leaves the stage open; the next run's first report must not log a line
    for it at once (an old 'last logged' time made it log '0 / 1 ... ETA inf s' ahead of an error)."""
    now = [1000.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    caplog.set_level(logging.INFO, logger="pqgpu")
    progress.report("sample stage", 0, 2, "shards", brief=True)  # this run fails: the stage stays open
    now[0] += 60
    progress.report("sample stage", 0, 2, "shards", brief=True)  # the next run, a minute later
    assert "sample stage" not in caplog.text
    progress.report("sample stage", 2, 2, "shards", brief=True)  # quick and brief: its caller sums it up
    assert "sample stage" not in caplog.text


def test_terminal_bar_shows_rate_and_eta(capsys, caplog):
    caplog.set_level(logging.INFO, logger="pqgpu.progress")
    progress.use_terminal_bars(True)
    try:
        st = progress.Stage("encoded", 1000, "rows")
        st.add(400)
        st.add(600)
        for i in range(1, 4):
            progress.report("k-means", i, 3)
    finally:
        progress.use_terminal_bars(False)
    err = capsys.readouterr().err
    assert "encoded: 100%" in err and "1.00k/1.00k" in err and "rows/s" in err and "<00:00" in err
    assert "k-means: 100%" in err and "3/3" in err
    assert "encoded 1,000 / 1,000" not in caplog.text  # the bar replaces the log lines


@pytest.mark.parametrize("cfg, values, threads", [
    (ClusterConfig(), IN_PROCESS_MAX_VALUES, True),
    (ClusterConfig(), IN_PROCESS_MAX_VALUES + 1, False),
    (ClusterConfig(processes=True), 10, False),
    (ClusterConfig(processes=False), 10**12, True),
    (ClusterConfig(n_workers=2), 10, False),  # asking for workers means processes
    (ClusterConfig(kind="address", address="tcp://x:1"), 10, False),
    (ClusterConfig(kind="local-cuda"), 10, False),
])
def test_threads_or_processes(cfg, values, threads):
    assert choose_in_process(cfg, values) is threads


def test_info_does_not_import_dask(tmp_path):
    code = ("import sys; from pqgpu.cli import main; rc = main(['info', sys.argv[1]]); "
            "print('DASK' if 'distributed' in sys.modules or 'dask' in sys.modules else 'NO-DASK', rc)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing.zarr")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["NO-DASK", "2"], out.stderr


def test_small_local_run_uses_threads_and_needs_no_dask(tmp_path, caplog):
    """A small `kind: local` run encodes on threads of this process, says so, and records the backend."""
    import numpy as np

    from pqgpu.codebook import Codebook
    from pqgpu.config import config_from_dict
    from pqgpu.pipeline import encode, train
    from pqgpu.sample import make_sample
    from pqgpu.store import open_store

    make_sample(tmp_path / "data", 3000, 16, shards=2, fmt="npy")
    cfg = config_from_dict({
        "source": {"format": "npy", "path": str(tmp_path / "data" / "shard-*.npy")},
        "quantizer": {"path": str(tmp_path / "pq.faiss"), "M": 4, "nbits": 5, "niter": 3},
        "encode": {"output": str(tmp_path / "codes.zarr"), "chunk_rows": 500, "backend": "auto"},
    })
    caplog.set_level(logging.INFO)
    train(cfg)
    report = encode(cfg)
    assert "in-process run on" in caplog.text
    assert report.backends == {f"pid {os.getpid()}": "cpu"}
    store = open_store(cfg.encode.output)
    x = np.concatenate([np.load(p) for p in sorted((tmp_path / "data").glob("shard-*.npy"))
                        if not p.name.endswith("ids.npy")])
    assert np.array_equal(store.codes[...], Codebook.load(cfg.quantizer.path).encode(x, "cpu"))
    assert store.attrs["encode_runs"][-1]["workers"] == {f"pid {os.getpid()}": "cpu"}


@pytest.mark.slow
def test_local_cluster_serves_the_dashboard_and_logs_its_link(caplog):
    """A local process cluster serves the dashboard on a free port and logs the link; dashboard: false
    starts none."""
    import re
    import urllib.request

    from pqgpu.cluster import _dashboard_address, dask_client

    pytest.importorskip("bokeh")
    assert _dashboard_address(ClusterConfig(dashboard=False)) is None
    caplog.set_level(logging.INFO, logger="pqgpu.cluster")
    with dask_client(ClusterConfig(n_workers=1, threads_per_worker=1, memory_limit=None)) as client:
        link = re.search(r"Dask dashboard: (http://127\.0\.0\.1:\d+/status)", caplog.text)
        assert link, caplog.text
        assert link.group(1) == client.dashboard_link and not link.group(1).endswith(":8787/status")
        with urllib.request.urlopen(link.group(1), timeout=30) as page:
            assert page.status == 200


@pytest.mark.slow
def test_dashboard_false_serves_no_dashboard_and_leaves_port_8787_alone(caplog, recwarn):
    """cluster.dashboard: false: no link logged, no dashboard page, and the scheduler's HTTP server (health
    and metrics only) on a free port of this machine, not 8787: two runs side by side do not warn."""
    import socket
    import urllib.error
    import urllib.request

    from pqgpu.cluster import dask_client

    caplog.set_level(logging.INFO, logger="pqgpu.cluster")
    with socket.socket() as busy:  # as if another cluster held 8787
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", 8787))
            busy.listen()
        except OSError:
            pass  # something holds it already: the same situation
        with dask_client(ClusterConfig(n_workers=1, threads_per_worker=1, memory_limit=None, dashboard=False)) as c:
            port = c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.http_server.port)
            with pytest.raises(urllib.error.HTTPError, match="404"):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=30)
    assert port != 8787
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("pqgpu")]
    assert ours and not [m for m in ours if "dashboard" in m.lower()], ours
    assert not [w for w in recwarn if "8787" in str(w.message)]


# -- how a local cluster starts its workers (issue 22 item 2) -----------------------------------------------

START_SCRIPT = '''
import numpy as np
from pqgpu.cluster import worker_start_method
from pqgpu.config import ClusterConfig
from pqgpu.errors import PqgpuError

print("fresh", worker_start_method(ClusterConfig()))
import dask
with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
    print("user", worker_start_method(ClusterConfig()))
print("asked", worker_start_method(ClusterConfig(start_method="spawn")))
from pqgpu import _cpu
_cpu.prepare(np.zeros((2, 16, 4), np.float32))  # loading numba alone keeps fork safe
print("imported", worker_start_method(ClusterConfig()))
_cpu.assign(np.zeros((600, 8), np.float32), _cpu.prepare(np.random.rand(2, 16, 4).astype(np.float32)))
import numba.np.ufunc.parallel as par
print("kernel", worker_start_method(ClusterConfig()), par.threading_layer())
try:
    worker_start_method(ClusterConfig(start_method="fork"))
except PqgpuError as exc:
    print("refused", exc)
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is used on Linux only")
def test_workers_are_forked_until_this_process_has_run_a_parallel_kernel():
    """auto forks the workers from a process that has not started numba's threads (a fresh `pqgpu encode`),
    and spawns them once it has (GNU OpenMP aborts a forked child), or when the user configured Dask's method."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", START_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    assert out["fresh"] == "fork" and out["user"] == "forkserver" and out["asked"] == "spawn", res.stdout
    assert out["imported"] == "fork", res.stdout
    layer = out["kernel"].split()[1]
    if layer == "omp":
        assert out["kernel"].startswith("spawn") and "numba's omp threads already run" in out["refused"], res.stdout
    else:  # workqueue and tbb survive a fork
        assert out["kernel"].startswith("fork") and "refused" not in out, res.stdout


def test_a_forked_cluster_encodes_what_faiss_encodes(tmp_path):
    """`pqgpu encode` on a process cluster from a fresh process: the workers are forked (no numba threads here
    yet), and the codes equal faiss's compute_codes."""
    import numpy as np
    import yaml

    from pqgpu.codebook import Codebook
    from pqgpu.pipeline import train
    from pqgpu.config import config_from_dict
    from pqgpu.sample import make_sample
    from pqgpu.store import open_store

    make_sample(tmp_path / "data", 3000, 16, shards=3, fmt="npy", n_queries=1)
    cfg = {"source": {"format": "npy", "path": str(tmp_path / "data" / "shard-*.npy")},
           "quantizer": {"path": str(tmp_path / "pq.faiss"), "M": 4, "nbits": 6, "train_size": 2000, "niter": 4},
           "encode": {"output": str(tmp_path / "codes.zarr"), "chunk_rows": 500, "backend": "cpu"},
           "cluster": {"kind": "local", "processes": True, "dashboard": False}}
    train(config_from_dict(cfg))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "pqgpu.cli", "encode", "-c", str(tmp_path / "c.yaml")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    if sys.platform.startswith("linux"):
        assert "started by fork" in res.stderr, res.stderr
    x = np.concatenate([np.load(f) for f in sorted((tmp_path / "data").glob("shard-*.npy"))])
    pq = Codebook.load(tmp_path / "pq.faiss").to_faiss()
    assert np.array_equal(open_store(tmp_path / "codes.zarr").codes[...], pq.compute_codes(x))


KEEPALIVE_SCRIPT = '''
import json, os, sys
from distributed.nanny import Nanny
from pqgpu.cluster import dask_client
from pqgpu.config import ClusterConfig

def pipe_inode(fd):
    return os.fstat(fd).st_ino

with dask_client(ClusterConfig(n_workers=3, threads_per_worker=1, dashboard=False, memory_limit=None)) as client:
    nannies = [n for n in Nanny._instances if n.process is not None and n.process.process is not None]
    keep = {n.process.process.pid: pipe_inode(n.process.process._keep_child_alive.fileno()) for n in nannies}
    held = {}
    for pid in keep:
        fds = os.listdir(f"/proc/{pid}/fd")
        inodes = set()
        for fd in fds:
            try:
                inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
            except OSError:
                pass
        # a pipe's two ends share an inode: a worker holds its own (the read end it waits on)
        held[pid] = sorted(p for p, ino in keep.items() if ino in inodes and p != pid)
    print(json.dumps({"held": {str(k): v for k, v in held.items()}}))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is used on Linux only")
def test_forked_workers_hold_no_other_workers_keepalive_pipe():
    """A worker exits when its nanny's end of a "parent alive" pipe closes (this process killed). Forked
    workers inherit descriptors, so without closing the others' pipe ends a SIGKILLed `pqgpu` left workers
    running, holding its output pipes (1 in ~12 SIGKILL tests hung). No worker may hold another's, whatever
    order the three concurrent starts took (an at-fork fix missed it in 3 of 25 runs; 0 of 30 now)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", KEEPALIVE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    import json

    held = json.loads(res.stdout.strip().splitlines()[-1])["held"]
    assert len(held) == 3, res.stdout
    assert all(v == [] for v in held.values()), held
