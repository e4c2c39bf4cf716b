"""The fused GPU encoder and the choice between device encode routes.

The kernel itself is exercised by numba's CUDA simulator in a fresh interpreter (tests/cudasim_fused.py);
route selection is plain Python tested here; `gpu` tests need CuPy and a CUDA device."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pqgpu import backend, kernels
from pqgpu.backend import (BackendUnavailable, NumpyDevice, device_encode, encode_blocks, gpu_encode_routes,
                           gpu_status, pick_route, route_override)
from pqgpu.errors import ConfigError

from .helpers import assert_codes_match, synthetic

HAS_GPU, GPU_REASON = gpu_status()
gpu = pytest.mark.skipif(not HAS_GPU, reason=f"needs a CUDA GPU: {GPU_REASON}")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fused_kernel_under_the_cuda_simulator():
    """Runs tests/cudasim_fused.py with NUMBA_ENABLE_CUDASIM=1, which must be set before numba.cuda is
    imported and so cannot be switched on inside this test process."""
    pytest.importorskip("faiss")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop(backend.ROUTE_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "tests/cudasim_fused.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_pick_route_takes_the_faster_and_prefers_the_reference_on_equal_rates():
    assert pick_route({"arrayapi": 4.0e6, "fused": 3.1e7}) == "fused"
    assert pick_route({"arrayapi": 5.0e7, "fused": 3.1e7}) == "arrayapi"
    assert pick_route({"fused": 2.0e7, "arrayapi": 2.0e7}) == "arrayapi"
    assert pick_route({"arrayapi": 1.0}) == "arrayapi"
    with pytest.raises(ValueError):
        pick_route({})


def test_route_override_from_the_environment():
    assert route_override({}) is None
    assert route_override({"PQGPU_GPU_ROUTE": ""}) is None
    assert route_override({"PQGPU_GPU_ROUTE": "auto"}) is None
    assert route_override({"PQGPU_GPU_ROUTE": " Fused "}) == "fused"
    assert route_override({"PQGPU_GPU_ROUTE": "arrayapi"}) == "arrayapi"
    with pytest.raises(ConfigError, match="PQGPU_GPU_ROUTE: expected one of auto, arrayapi, fused. Got 'cuda'"):
        route_override({"PQGPU_GPU_ROUTE": "cuda"})


def test_routes_listed_and_fused_never_falls_back(monkeypatch):
    routes = gpu_encode_routes()
    assert routes[0] == "arrayapi" and set(routes) <= {"arrayapi", "fused"}
    assert ("fused" in routes) == backend.fused_status()[0]
    monkeypatch.setattr(backend, "fused_status", lambda: (False, "numba.cuda sees no usable CUDA device"))
    assert gpu_encode_routes() == ("arrayapi",)
    x = synthetic(10, 8)
    c = np.ascontiguousarray(np.stack([x[:4, :4], x[4:8, 4:]]))
    with pytest.raises(BackendUnavailable, match="route 'fused' was requested but numba.cuda sees no usable"):
        device_encode(x, c, 2, route="fused")
    with pytest.raises(ConfigError, match="expected one of auto, arrayapi, fused. Got 'triton'"):
        device_encode(x, c, 2, route="triton")
    with pytest.raises(ValueError, match=r"x \(10, 6\) and centroids \(2, 4, 4\) do not fit nbits=2"):
        device_encode(x[:, :6], c, 2, route="fused")
    with pytest.raises(ValueError, match="do not fit nbits=3"):
        device_encode(x, c, 3)


def test_device_encode_on_numpy_uses_the_array_api_route_and_matches_faiss():
    faiss = pytest.importorskip("faiss")
    x = synthetic(500, 24, seed=4)
    c = np.ascontiguousarray(np.stack([synthetic(64, 24, seed=5)[:, m * 4:(m + 1) * 4] for m in range(6)]))
    pq = faiss.ProductQuantizer(24, 6, 6)
    faiss.copy_array_to_vector(c.ravel(), pq.centroids)
    ref = pq.compute_codes(x)
    assert_codes_match(np.asarray(device_encode(x, c, 6)), ref, x, c, 6)
    assert_codes_match(np.asarray(device_encode(x.astype(np.float16).astype(np.float64), c, 6)),
                       pq.compute_codes(x.astype(np.float16).astype(np.float32)), x.astype(np.float16), c, 6)
    out = encode_blocks(x, c, 6, NumpyDevice(), block_rows=77, route="arrayapi")
    assert np.array_equal(out, np.asarray(device_encode(x, c, 6, route="arrayapi")))
    strict = pytest.importorskip("array_api_strict")
    packed = device_encode(strict.asarray(x), strict.asarray(c), 6)  # auto: no GPU route for host arrays
    assert np.array_equal(np.asarray(kernels.unpack_codes(packed, 6, 6)),
                          np.asarray(kernels.unpack_codes(np.asarray(device_encode(x, c, 6)), 6, 6)))


def test_fused_planner_fits_more_rows_than_the_distance_tensor_route():
    d, M, ksub = 768, 96, 256
    free = 24 * 2**30
    fused = backend.plan_block_rows(free, d, M, ksub, route="fused", max_rows=1 << 30)
    assert fused > 10 * backend.plan_block_rows(free, d, M, ksub)
    assert 2 * fused * backend.bytes_per_row(d, M, ksub, 4, "fused") <= 0.6 * free
    # nbits=16: the array-API route cannot hold 64 rows in 1 GiB; the fused route needs no distance tensor
    with pytest.raises(BackendUnavailable):
        backend.plan_block_rows(2**30, d, M, 1 << 16)
    assert backend.plan_block_rows(2**30, d, M, 1 << 16, route="fused") >= 64


def nvvm_or_skip():
    """The kernels compile to PTX wherever numba.cuda finds NVVM (a CUDA toolkit), GPU or not."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("compiling PTX needs numba's real CUDA target, not the simulator")
    try:
        from numba.cuda.cudadrv import nvvm

        ok = nvvm.is_available()
    except Exception as exc:  # numba without a CUDA target
        pytest.skip(f"numba.cuda unusable: {exc}")
    if not ok:
        pytest.skip("no NVVM (CUDA toolkit) found by numba.cuda: cannot compile PTX here")
    from pqgpu import _cuda

    return _cuda


@pytest.mark.parametrize("dsub, nbits", [(8, 8), (4, 8), (16, 8), (2, 4), (1, 4), (8, 16), (3, 10), (32, 8)])
def test_kernels_compile_for_the_h200_with_everything_in_registers(dsub, nbits, tmp_path):
    """What the simulator cannot show: numba's CUDA target accepts the kernels (e.g. no min() of two ints, no
    computed local-array shapes), and the per-thread arrays are promoted to registers (no .local memory). With
    ptxas at hand also: no spills."""
    import shutil

    _cuda = nvvm_or_skip()
    assign, pack = _cuda.compile_ptx(dsub, 1 << nbits, cc=(9, 0))
    assert ".entry" in assign and ".entry" in pack
    assert ".local" not in assign and ".local" not in pack
    assert "fma.rn.f32" in assign and "ld.shared.f32" in assign
    try:
        from numba.cuda.cuda_paths import get_cuda_home

        home = get_cuda_home()
    except Exception:  # numba-cuda keeps its toolkit lookup elsewhere
        home = os.environ.get("CUDA_HOME")
    ptxas = shutil.which("ptxas") or (home and shutil.which("ptxas", path=os.path.join(home, "bin")))
    if ptxas:
        for name, text in (("assign", assign), ("pack", pack)):
            src = tmp_path / f"{name}.ptx"
            src.write_text(text)
            info = subprocess.run([ptxas, "-v", "-arch=sm_90", str(src), "-o", os.devnull],
                                  capture_output=True, text=True, timeout=120)
            assert info.returncode == 0, info.stderr
            assert "0 bytes spill stores" in info.stderr, info.stderr


class FakeCupy:
    """Just what choose_gpu_route touches, so its measuring, caching and logging run without a GPU."""

    def __init__(self):
        class Device:
            id = 0

        class Stream:
            def synchronize(self):
                pass

        class Rng:
            def standard_normal(self, shape, dtype):
                return np.zeros(shape, dtype)

        self.float32 = np.float32
        self.cuda = type("cuda", (), {"Device": Device, "get_current_stream": staticmethod(Stream)})
        self.random = type("random", (), {"default_rng": staticmethod(lambda seed: Rng())})


@pytest.mark.parametrize("env, fused_fails, expected", [(None, False, "fused"), ("arrayapi", False, "arrayapi"),
                                                        (None, True, "arrayapi")])
def test_choose_gpu_route_measures_once_logs_and_records(monkeypatch, caplog, env, fused_fails, expected):
    calls = []

    def fake_encode(x, centroids, nbits, *, route, prepared=None):
        calls.append((route, x.shape))
        if route == "fused" and fused_fails:
            raise RuntimeError("NVVM not found")
        time.sleep(0.004 if route == "arrayapi" else 0.001)

    monkeypatch.setitem(sys.modules, "cupy", FakeCupy())
    monkeypatch.setattr(backend, "fused_status", lambda: (True, "test"))
    monkeypatch.setattr(backend, "device_encode", fake_encode)
    monkeypatch.setattr(backend, "_route_choices", {})
    if env:
        monkeypatch.setenv(backend.ROUTE_ENV, env)
    else:
        monkeypatch.delenv(backend.ROUTE_ENV, raising=False)
    c = np.zeros((96, 256, 8), np.float32)
    with caplog.at_level(logging.INFO, logger="pqgpu.backend"):
        assert backend.choose_gpu_route(c, 8) == expected
        assert backend.choose_gpu_route(c, 8) == expected  # cached: measured once per process and shape
    [(key, choice)] = backend.gpu_route_choices().items()
    assert key == (0, 768, 96, 8) and choice["route"] == expected
    if env:
        assert choice["how"] == "env" and not calls and "forced by PQGPU_GPU_ROUTE" in caplog.text
        return
    assert choice["how"] == "measured"
    rows = (1 << 32) // (768 * 256)
    assert {shape for _, shape in calls} == {(rows, 768)}
    if fused_fails:
        assert set(choice["rates"]) == {"arrayapi"} and "NVVM not found" in choice["failed"]["fused"]
        assert "route fused fails on this machine" in caplog.text
    else:
        assert [r for r, _ in calls] == ["arrayapi"] * 4 + ["fused"] * 4  # warm-up + 3 timed runs each
        assert choice["rates"]["fused"] > choice["rates"]["arrayapi"] > 0
        assert f"measured on {rows} rows: arrayapi" in caplog.text


# ---------------------------------------------------------------------------------------------- on a GPU

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("nbits", [8, 4, 12])
def test_gpu_fused_equals_arrayapi_and_faiss_on_100k_rows(nbits, caplog, monkeypatch):
    import cupy

    faiss = pytest.importorskip("faiss")
    if "fused" not in gpu_encode_routes():
        pytest.fail(f"the fused route is not usable on this GPU machine: {backend.fused_status()[1]}")
    d, M = 768, 96
    dsub = d // M
    x = synthetic(100_000, d, seed=nbits)
    pool = synthetic(max(1 << nbits, 512), d, seed=99)
    rng = np.random.default_rng(nbits)
    c = np.ascontiguousarray(np.stack([pool[rng.permutation(len(pool))[: 1 << nbits], m * dsub:(m + 1) * dsub]
                                       for m in range(M)]))
    xg, cg = cupy.asarray(x), cupy.asarray(c)
    fused = cupy.asnumpy(device_encode(xg, cg, nbits, route="fused"))
    arrayapi = cupy.asnumpy(device_encode(xg, cg, nbits, route="arrayapi"))
    pq = faiss.ProductQuantizer(d, M, nbits)
    faiss.copy_array_to_vector(c.ravel(), pq.centroids)
    assert_codes_match(fused, pq.compute_codes(x), x, c, nbits)  # both direct distances: the 99.99 % contract
    # the array-API route re-ranks its near-ties by the exact distance (issue 16.5): the same contract
    assert_codes_match(fused, arrayapi, x, c, nbits)
    # auto measures both routes once for this shape, logs the rates and records the choice
    monkeypatch.delenv(backend.ROUTE_ENV, raising=False)
    monkeypatch.setattr(backend, "_route_choices", {})
    with caplog.at_level(logging.INFO, logger="pqgpu.backend"):
        auto = cupy.asnumpy(device_encode(xg, cg, nbits))
    [choice] = backend.gpu_route_choices().values()
    assert choice["how"] == "measured" and set(choice["rates"]) == {"arrayapi", "fused"}, choice
    assert choice["route"] == pick_route(choice["rates"])
    assert "GPU encode route for d=768 M=96" in caplog.text
    assert np.array_equal(auto, fused if choice["route"] == "fused" else arrayapi)


@gpu
@pytest.mark.gpu
def test_gpu_block_pipeline_on_each_route():
    from pqgpu.backend import cupy_device

    x = synthetic(5000, 64, seed=2)
    c = np.ascontiguousarray(np.stack([synthetic(256, 64, seed=3)[:, m * 4:(m + 1) * 4] for m in range(16)]))
    x16 = x.astype(np.float16)
    ref = encode_blocks(x16.astype(np.float32), c, 8, NumpyDevice(), route="arrayapi")
    for route in gpu_encode_routes():
        out = encode_blocks(x16, c, 8, cupy_device(), block_rows=1000, route=route)
        assert_codes_match(out, ref, x16.astype(np.float32), c, 8)
