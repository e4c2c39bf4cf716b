"""The GPU check's runner and kit script, on the CPU: a step that hangs or crashes is ended at its timeout
and the next step still runs, results are on disk after every step, and the kit script fails clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pqgpu.bench.gpu import tie_report
from pqgpu.bench.gpu_check import Runner, Step

REPO = Path(__file__).resolve().parents[1]

FAKE_STEPS = r'''
import json, os, subprocess, sys, time
step, result = sys.argv[1], sys.argv[sys.argv.index("--result") + 1]
def save(status, **summary):
    with open(result, "w") as f:
        json.dump({"status": status, "summary": summary, "tables": {}, "notes": []}, f)
if step == "hang":
    save("running", measured_before_hang=1.5)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(os.environ["FAKE_PIDS"], "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    print("hanging now", flush=True)
    time.sleep(120)
elif step == "crash":
    save("running")
    os.abort()
else:
    save("ok", rows=3)
    print("fine", flush=True)
'''


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_runner_survives_hang_and_crash_and_writes_after_every_step(tmp_path, monkeypatch):
    (tmp_path / "fake_steps.py").write_text(FAKE_STEPS)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("FAKE_PIDS", str(tmp_path / "pids"))
    out = tmp_path / "results"
    out.mkdir()
    runner = Runner(out, quick=False, params={}, budget=60, mode="test", step_module="fake_steps")
    t0 = time.monotonic()
    rc = runner.run([Step("hang", "hangs", 3), Step("crash", "crashes", 20), Step("fine", "works", 20)])
    assert time.monotonic() - t0 < 40
    assert rc == 1
    res = json.loads((out / "results.json").read_text())
    hang, crash, fine = res["steps"]
    assert hang["status"].startswith("timeout: ended after 3 s")
    assert hang["summary"] == {"measured_before_hang": 1.5}  # what it measured before the hang came back
    assert "hanging now" in hang["output_tail"]
    assert crash["status"].startswith("failed: exit code -6")
    assert fine["status"] == "ok" and fine["summary"] == {"rows": 3}
    for pid in map(int, (tmp_path / "pids").read_text().split()):
        assert not _alive(pid), f"process {pid} of the timed-out step is still running"
    assert sorted(p.name for p in out.iterdir()) == ["RESULTS-gpu.md", "log.txt", "results.json"]
    md = (out / "RESULTS-gpu.md").read_text()
    assert "| hangs | timeout: ended after 3 s" in md and "| works | ok |" in md
    assert "fine" in (out / "log.txt").read_text()


def test_runner_skips_steps_when_the_budget_is_spent(tmp_path):
    runner = Runner(tmp_path, quick=True, params={}, budget=2, mode="test", step_module="no_such_module")
    assert runner.run([Step("versions", "a", 10)]) == 0
    [step] = json.loads((tmp_path / "results.json").read_text())["steps"]
    assert step["status"].startswith("skipped: the check's time budget was used up")


def test_tie_report_tells_ties_from_real_differences():
    centroids = np.array([[[0.0], [2.0]]], np.float32)  # M=1, ksub=2, dsub=1
    x = np.array([[1.0], [0.2]], np.float32)  # row 0 is equidistant (1 and 1); row 1 is nearer centroid 0
    a = np.array([[0], [1]])
    b = np.array([[1], [0]])
    rows, non_ties, examples = tie_report(a, b, x, centroids)
    assert rows == 2 and non_ties == 1
    assert [e["float32_tie"] for e in examples] == [True, False]
    assert examples[1]["distances"] == pytest.approx([1.8 ** 2, 0.2 ** 2])


def test_offline_without_wheels_says_how_to_get_them(tmp_path):
    env = dict(os.environ, GPU_CHECK_WHEELS=str(tmp_path / "none"))
    p = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), "--offline", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2
    assert "no wheels in" in p.stderr and "--prepare" in p.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PQGPU_PROVE_KIT"),
                    reason="set PQGPU_PROVE_KIT=1 to build a Python 3.12 venv and prove the offline kit (~5-15 min, "
                           "downloads ~100 MB from the registry)")
def test_prove_offline_kit():
    p = subprocess.run(["bash", str(REPO / "scripts/prove_offline_kit.sh")], capture_output=True, text=True,
                       timeout=3000)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "offline kit proven" in p.stdout


@pytest.fixture
def host_as_gpu(monkeypatch):
    """The check's GPU code paths driven with NumPy standing in for CuPy (backend seams patched), so a typo in
    them shows here rather than in the few minutes of a borrowed GPU. Routes: the array-API reference only."""
    import array_api_compat.numpy as np_xp

    from pqgpu import backend
    from pqgpu.bench import gpu

    monkeypatch.setattr(backend, "gpu_status", lambda: (True, "NumPy standing in for a GPU"))
    monkeypatch.setattr(backend, "namespace", lambda name: np_xp)
    import importlib

    search_module = importlib.import_module("pqgpu.search")  # pqgpu.search is also the function
    monkeypatch.setattr(search_module, "namespace", lambda name: np_xp)  # imported by name there
    monkeypatch.setattr(backend, "cupy_device", lambda *a: backend.NumpyDevice())
    monkeypatch.setattr(backend, "sync", lambda name="gpu": None)
    monkeypatch.setattr(backend, "free_device_memory", lambda: 1 << 30)
    monkeypatch.setattr(gpu, "routes", lambda: (["arrayapi"], gpu.arrayapi_route))
    monkeypatch.setitem(sys.modules, "torch", None)  # the PyTorch baseline needs CUDA: reported as skipped
    return gpu


def test_gpu_steps_run_their_gpu_paths(host_as_gpu, tmp_path):
    gpu = host_as_gpu
    rec = gpu.Recorder(tmp_path / "parity.json")
    gpu.step_parity(rec, {"parity_n": 300}, quick=True)
    assert rec.data["status"] == "ok"
    rows = rec.data["tables"]["parity"]
    assert [(r["nbits"], r["opq"]) for r in rows] == [(4, False), (8, False), (10, False), (12, False), (16, False),
                                                      (8, True)]
    for r in rows:  # faiss is the reference; every route must equal it on this non-degenerate data
        n = r["n"]
        assert r["cpu_rows_equal_faiss"] == r["gpu_rows_equal_faiss"] == r["route_arrayapi_rows_equal_faiss"] == f"{n}/{n}"
        assert r["gpu_rows_equal_cpu"] == f"{n}/{n}"

    rec = gpu.Recorder(tmp_path / "encode.json")
    gpu.step_encode_grid(rec, {"encode_n": 300, "encode_runs": 1, "encode_d": "32", "encode_dsub": "4,8"}, quick=True)
    assert rec.data["status"] == "ok"
    assert [(r["nbits"], r["d"], r["dsub"]) for r in rec.data["tables"]["encode"]] == [(8, 32, 4), (8, 32, 8),
                                                                                      (4, 32, 4), (4, 32, 8)]
    assert all(r["arrayapi"] > 0 for r in rec.data["tables"]["encode"])
    assert any("PyTorch baseline skipped" in n for n in rec.data["notes"])

    rec = gpu.Recorder(tmp_path / "search.json")
    gpu.step_search(rec, {"search_n": 3000, "search_nq": 5, "search_runs": 1}, quick=True)
    assert rec.data["status"] == "ok"
    assert rec.data["summary"]["rows_equal_gpu_cpu"] == 1.0
    assert [r["backend"] for r in rec.data["tables"]["search"]] == ["cpu", "gpu"]


def test_a_failing_gpu_part_fails_the_step_but_keeps_the_cpu_figures(host_as_gpu, tmp_path, monkeypatch):
    import importlib

    search_module = importlib.import_module("pqgpu.search")
    real = search_module.search_codes

    def gpu_breaks(*args, backend="auto", **kw):
        if backend == "gpu":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*args, backend=backend, **kw)

    monkeypatch.setattr(search_module, "search_codes", gpu_breaks)
    rec = host_as_gpu.Recorder(tmp_path / "search.json")
    host_as_gpu.step_search(rec, {"search_n": 2000, "search_nq": 3, "search_runs": 1}, quick=True)
    assert rec.data["status"] == "failed: search on gpu: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert [r["backend"] for r in rec.data["tables"]["search"]] == ["cpu"]
    assert json.loads((tmp_path / "search.json").read_text())["status"] == rec.data["status"]
