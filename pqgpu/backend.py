"""Compute backends: "cpu" (NumPy) or "gpu" (CuPy). The only module that imports CuPy.

`resolve_backend("auto")` picks the GPU when CuPy imports and a CUDA device is visible, the CPU otherwise;
`resolve_backend("gpu")` never falls back: it raises BackendUnavailable saying what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
from typing import Any, Iterator

import numpy as np

from .errors import BackendUnavailable, ConfigError

log = logging.getLogger(__name__)

GPU_INSTALL_HINT = (
    "Install the GPU extra with `pip install 'pqgpu[gpu]'` (CuPy for CUDA 12) or create the conda environment "
    "from environment.yml, on a machine with an NVIDIA driver and a visible CUDA device."
)


@functools.lru_cache(maxsize=None)
def cupy_device(device_id: int | None = None) -> "CupyDevice":
    """One CupyDevice per process and device (streams and pinned buffers are reused by later calls)."""
    return CupyDevice(device_id)


@functools.lru_cache(maxsize=1)
def gpu_status() -> tuple[bool, str]:
    """(usable, reason). Cached: probing CUDA is slow and the answer does not change within a process."""
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        return False, f"CuPy cannot be imported ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy imports but the CUDA driver/runtime is unusable ({exc})"
    if n < 1:
        return False, "CuPy imports but no CUDA device is visible (check CUDA_VISIBLE_DEVICES and nvidia-smi)"
    return True, f"{n} CUDA device(s) visible"


def resolve_backend(name: str) -> str:
    """Map "auto" | "cpu" | "gpu" to "cpu" or "gpu"."""
    if name not in ("auto", "cpu", "gpu"):
        raise ConfigError(f"backend: expected one of auto, cpu, gpu. Got {name!r} instead.")
    if name == "cpu":
        return "cpu"
    ok, reason = gpu_status()
    if name == "gpu" and not ok:
        raise BackendUnavailable(f"backend 'gpu' was requested but {reason}. {GPU_INSTALL_HINT} "
                                 "Or use backend 'cpu' (or 'auto').")
    return "gpu" if ok else "cpu"


def namespace(backend: str) -> Any:
    """The array namespace for a resolved backend: array-API-compatible numpy or cupy."""
    if backend == "cpu":
        import array_api_compat.numpy as xp
        return xp
    if backend == "gpu":
        resolve_backend("gpu")
        import array_api_compat.cupy as xp
        return xp
    raise ConfigError(f"Unresolved backend {backend!r}; call resolve_backend first.")


def to_device(x: np.ndarray, xp: Any) -> Any:
    """Copy a host array into namespace `xp` (no copy for numpy)."""
    if xp.__name__.endswith("numpy"):
        return np.asarray(x)
    return xp.asarray(x)


def to_host(a: Any) -> np.ndarray:
    """Bring an array from any namespace back to a NumPy array."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):  # cupy
        return a.get()
    return np.asarray(a)


def free_device_memory() -> int:
    """Free bytes on the current CUDA device (plus what CuPy's pool holds and can reuse)."""
    import cupy

    free, _total = cupy.cuda.runtime.memGetInfo()
    pool = cupy.get_default_memory_pool()
    return int(free + pool.free_bytes())


# --- device enumeration and selection (callers never touch CuPy themselves) --------------------------------

def device_count() -> int:
    """Number of visible CUDA devices; 0 when the GPU backend is unusable (see `gpu_status`)."""
    if not gpu_status()[0]:
        return 0
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


@contextlib.contextmanager
def on_device(device_id: int) -> Iterator[None]:
    """Make CUDA device `device_id` current for this thread inside the block (the previous one after it)."""
    resolve_backend("gpu")
    import cupy

    with cupy.cuda.Device(device_id):
        yield


def device_info(device_id: int = 0) -> dict[str, Any]:
    """Name of CUDA device `device_id`, the driver's CUDA version and the CuPy version (for reports)."""
    resolve_backend("gpu")
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    return {"gpu_name": name.decode() if isinstance(name, bytes) else name,
            "cuda_driver": cupy.cuda.runtime.driverGetVersion(), "cupy": cupy.__version__}


# --- device memory planning and overlapped host->device encoding ------------------------------------------

def bytes_per_row(d: int, M: int, ksub: int, in_itemsize: int, route: str = "arrayapi") -> int:
    """Device bytes one row costs while a block is encoded: the input as sent (e.g. float16), its float32
    copy, then for the array-API route the (M, ksub) float32 distances, the int64 argmin and the packed codes;
    for the fused route a rotated copy, the uint16 argmin scratch and the packed codes."""
    if route == "fused":
        return d * in_itemsize + d * 4 + d * 4 + M * 2 + M * 2
    return d * in_itemsize + d * 4 + M * ksub * 4 + M * 8 + M * 2


def plan_block_rows(free_bytes: int, d: int, M: int, ksub: int, in_itemsize: int = 4, *, buffers: int = 2,
                    fraction: float = 0.6, min_rows: int = 64, max_rows: int = 1 << 20,
                    route: str = "arrayapi") -> int:
    """Rows per device block so `buffers` blocks in flight use at most `fraction` of the free memory.

    Pure arithmetic, tested on the CPU; raises when even min_rows rows cannot fit.
    """
    need = bytes_per_row(d, M, ksub, in_itemsize, route)
    centroids = M * ksub * (d // M) * 4 * 2  # centroids + their prepared copy
    budget = int(free_bytes * fraction) - centroids
    rows = budget // (need * buffers) if budget > 0 else 0
    if rows < min_rows:
        raise BackendUnavailable(
            f"Not enough free GPU memory to encode: a block of {min_rows} rows needs "
            f"{(need * buffers * min_rows + centroids) / 2**20:.1f} MiB with d={d}, M={M}, ksub={ksub}, but only "
            f"{free_bytes / 2**20:.1f} MiB are free. Free GPU memory (other processes?) or lower nbits.")
    return int(min(rows, max_rows))


class NumpyDevice:
    """The host stand-in for a CUDA device, so the block pipeline below is tested on CPU-only machines."""

    xp = None

    def __init__(self) -> None:
        import array_api_compat.numpy as xp

        self.xp = xp

    def stream(self) -> Any:
        import contextlib

        return contextlib.nullcontext()

    def pinned_like(self, shape: tuple, dtype: Any) -> np.ndarray:
        return np.empty(shape, dtype)

    def is_pinned(self, host: np.ndarray) -> bool:
        return False

    def upload(self, host: np.ndarray, stream: Any) -> Any:
        return host.copy()

    def download(self, dev: Any, out: np.ndarray, stream: Any) -> None:
        out[...] = dev

    def synchronize(self, stream: Any) -> None:
        pass

    def free_bytes(self) -> int:
        return 1 << 30


class CupyDevice(NumpyDevice):
    """Pinned host buffers, async copies and one CUDA stream per in-flight block."""

    def __init__(self, device_id: int | None = None) -> None:
        resolve_backend("gpu")
        import array_api_compat.cupy as xp
        import cupy

        self.cupy = cupy
        self.xp = xp
        if device_id is not None:
            cupy.cuda.Device(device_id).use()

    def stream(self) -> Any:
        return self.cupy.cuda.Stream(non_blocking=True)

    def pinned_like(self, shape: tuple, dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        mem = self.cupy.cuda.alloc_pinned_memory(max(n, 1))
        return np.frombuffer(mem, dtype, int(np.prod(shape))).reshape(shape)

    def is_pinned(self, host: np.ndarray) -> bool:
        """Whether host lies in page-locked memory (e.g. from pinned_like), so copies from it are async."""
        try:
            attrs = self.cupy.cuda.runtime.pointerGetAttributes(host.ctypes.data)
        except Exception:  # pageable memory on CUDA versions that report it as an error
            return False
        return int(getattr(attrs, "type", 0)) == 1  # cudaMemoryTypeHost

    def upload(self, host: np.ndarray, stream: Any) -> Any:
        dev = self.cupy.empty(host.shape, host.dtype)
        dev.set(host, stream=stream)  # async when `host` is pinned
        return dev

    def download(self, dev: Any, out: np.ndarray, stream: Any) -> None:
        try:
            self.cupy.asnumpy(dev, stream=stream, out=out, blocking=False)  # CuPy >= 13: queued on stream
        except TypeError:
            self.cupy.asnumpy(dev, stream=stream, out=out)

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def free_bytes(self) -> int:
        return free_device_memory()


def pinned_copy(x: np.ndarray) -> np.ndarray:
    """x copied into page-locked host memory of the current CUDA device (CuPy's pinned pool): encode_blocks
    then uploads from it without a staging copy, so that copy can run outside a worker's turn on the GPU."""
    out = cupy_device().pinned_like(x.shape, x.dtype)
    out[...] = x
    return out


# --- device encode routes: the array-API reference and the fused numba.cuda kernel -----------------------

ROUTES = ("arrayapi", "fused")
ROUTE_ENV = "PQGPU_GPU_ROUTE"
_route_choices: dict[tuple, dict[str, Any]] = {}  # (device, d, M, nbits) -> {"route", "rates", "how"}
_route_lock = threading.Lock()  # one measurement at a time: worker threads would otherwise time each other


@functools.lru_cache(maxsize=1)
def fused_status() -> tuple[bool, str]:
    """(usable, reason) for the fused route: numba.cuda imports and sees a device (or runs its simulator)."""
    try:
        from . import _cuda
    except Exception as exc:  # numba without its CUDA target, or a broken CUDA install
        return False, f"numba.cuda cannot be imported ({type(exc).__name__}: {exc}); install numba-cuda"
    return _cuda.available()


def gpu_encode_routes() -> tuple[str, ...]:
    """Names of the device encode routes usable in this process: "arrayapi" (kernels.assign + pack_codes on
    the array's namespace) and, when numba.cuda is importable and usable, "fused" (pqgpu/_cuda.py)."""
    return ROUTES if fused_status()[0] else ROUTES[:1]


def route_override(environ: Any = None) -> str | None:
    """The route forced by env PQGPU_GPU_ROUTE (fused | arrayapi), None when unset, empty or "auto"."""
    import os

    value = (os.environ if environ is None else environ).get(ROUTE_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ROUTES:
        raise ConfigError(f"env {ROUTE_ENV}: expected one of auto, {', '.join(ROUTES)}. Got {value!r} instead.")
    return value


def pick_route(rates: dict[str, float]) -> str:
    """The fastest measured route (rows/s); on equal rates the array-API reference."""
    if not rates:
        raise ValueError("no route was measured")
    return max(rates, key=lambda r: (rates[r], r == "arrayapi"))


def gpu_route_choices() -> dict[tuple, dict[str, Any]]:
    """What `route="auto"` chose in this process, per (device, d, M, nbits): route, measured rows/s per route,
    how it was chosen ("measured" or "env") and, when measured, routes that failed to run ("failed": reason).
    For the GPU check to record."""
    return {k: dict(v) for k, v in _route_choices.items()}


def _is_cupy(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def device_encode(x: Any, centroids: Any, nbits: int, *, route: str = "auto", prepared: Any = None,
                  block_bytes: int | None = None) -> Any:
    """Packed PQ codes of x on the device holding it: x (n, d) float32 (other floats are converted),
    centroids (M, ksub, dsub) float32, same namespace -> (n, code_size) uint8 in that namespace.

    route: "arrayapi" (kernels.assign, ||c||^2 - 2 x.c over (M, rows, ksub) distance blocks of at most
    block_bytes, then pack_codes), "fused" (the numba.cuda kernel, exact ||x - c||^2), or "auto": the
    array-API route for host arrays (NumPy, array_api_strict); for CuPy arrays the env PQGPU_GPU_ROUTE if set,
    else the route measured fastest for this (device, d, M, nbits) on first use (see choose_gpu_route).
    A route that is asked for and unusable raises BackendUnavailable; there is no fallback.
    prepared: kernels.prepare_centroids(centroids), reused by the array-API route (the fused route ignores it).
    """
    from . import kernels

    M, ksub, dsub = centroids.shape
    if x.ndim != 2 or x.shape[1] != M * dsub or ksub != 1 << nbits:
        raise ValueError(f"device_encode: x {tuple(x.shape)} and centroids {tuple(centroids.shape)} do not fit "
                         f"nbits={nbits}: expected x (n, {M * dsub}) and centroids (M, {1 << nbits}, dsub)")
    if route == "auto":
        route = choose_gpu_route(centroids, nbits, prepared=prepared) if _is_cupy(x) else "arrayapi"
    if route == "arrayapi":
        from array_api_compat import array_namespace

        xp = array_namespace(x)
        if x.dtype != xp.float32:
            x = xp.astype(x, xp.float32)
        if block_bytes is None:
            block_bytes = min(max(x.shape[0], 1) * M * ksub * 4, 256 << 20)
        return kernels.pack_codes(kernels.assign(x, centroids, prepared=prepared, block_bytes=block_bytes), nbits)
    if route != "fused":
        raise ConfigError(f"GPU encode route: expected one of auto, {', '.join(ROUTES)}. Got {route!r} instead.")
    ok, reason = fused_status()
    if not ok:
        raise BackendUnavailable(f"GPU encode route 'fused' was requested but {reason}. Use route 'arrayapi' "
                                 f"(env {ROUTE_ENV}=arrayapi) or install numba-cuda.")
    from . import _cuda

    n = x.shape[0]
    if not _is_cupy(x):  # host arrays: the simulator, or numba's own copies to the device
        xc = np.ascontiguousarray(x, dtype=np.float32)
        cc = np.ascontiguousarray(centroids, dtype=np.float32)
        codes, out = np.empty((M, n), np.uint16), np.empty((n, kernels.code_size(M, nbits)), np.uint8)
        _cuda.encode(xc, cc, nbits, codes, out)
        return out
    import cupy

    xc = cupy.ascontiguousarray(x, dtype=cupy.float32)
    cc = cupy.ascontiguousarray(centroids, dtype=cupy.float32)
    codes = cupy.empty((M, n), cupy.uint16)
    out = cupy.empty((n, kernels.code_size(M, nbits)), cupy.uint8)
    _cuda.encode(xc, cc, nbits, codes, out, stream_ptr=cupy.cuda.get_current_stream().ptr,
                 device_id=xc.device.id)
    return out


def choose_gpu_route(centroids: Any, nbits: int, *, prepared: Any = None, rows: int | None = None) -> str:
    """The route `auto` uses on this device for centroids (M, ksub, dsub): env PQGPU_GPU_ROUTE when set,
    else both routes timed (synchronised, after a warm-up that also compiles the kernel) on one block of
    random rows and the faster kept; logged at INFO and cached per (device, d, M, nbits) for the process."""
    import cupy

    M, ksub, dsub = centroids.shape
    key = (cupy.cuda.Device().id, M * dsub, M, nbits)
    with _route_lock:
        if key not in _route_choices:
            _route_choices[key] = _measure_routes(centroids, nbits, prepared, rows)
        return _route_choices[key]["route"]


def _measure_routes(centroids: Any, nbits: int, prepared: Any, rows: int | None) -> dict[str, Any]:
    import time

    import cupy

    M, ksub, dsub = centroids.shape
    forced = route_override()
    routes = list(gpu_encode_routes())
    if "fused" in routes:
        from . import _cuda

        if not _cuda.supports(dsub):
            routes.remove("fused")
    if forced is not None:
        log.info("GPU encode route for d=%d M=%d nbits=%d: %s (forced by %s)", M * dsub, M, nbits, forced, ROUTE_ENV)
        return {"route": forced, "rates": {}, "how": "env"}
    if rows is None:  # ~2**32 multiply-adds per route: long enough to time, short next to any real encode
        rows = int(min(65536, max(2048, (1 << 32) // (M * dsub * ksub))))
    x = cupy.random.default_rng(0).standard_normal((rows, M * dsub), dtype=cupy.float32)
    rates, failed = {}, {}
    for r in routes:
        try:  # warm-up, and numba's compilation: a CUDA toolchain numba cannot use shows up here
            device_encode(x, centroids, nbits, route=r, prepared=prepared)
            cupy.cuda.get_current_stream().synchronize()
        except Exception as exc:
            if r == "arrayapi":
                raise
            failed[r] = f"{type(exc).__name__}: {exc}"
            log.warning("GPU encode route %s fails on this machine and is not used: %s", r, failed[r])
            continue
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            device_encode(x, centroids, nbits, route=r, prepared=prepared)
            cupy.cuda.get_current_stream().synchronize()
            best = min(best, time.perf_counter() - t0)
        rates[r] = rows / best
    route = pick_route(rates)
    log.info("GPU encode route for d=%d M=%d nbits=%d: %s (measured on %d rows: %s)", M * dsub, M, nbits, route,
             rows, ", ".join(f"{r} {v / 1e6:.2f}M rows/s" for r, v in rates.items()))
    return {"route": route, "rates": rates, "how": "measured", "failed": failed}


def encode_blocks(x: np.ndarray, centroids: np.ndarray, nbits: int, device: NumpyDevice,
                  block_rows: int | None = None, rotation: np.ndarray | None = None,
                  route: str = "auto", normalize: bool = False, row_offset: int = 0) -> np.ndarray:
    """Encode host x (n, d) (float16 stays float16 on the wire, computed in float32; L2-normalised on the
    device when normalize (metric cosine; a zero row is an InputError counted from row_offset); rotated by
    `rotation` first when given) into packed codes on
    `device`, two blocks in flight: while one block computes, the next one's copy is under way.
    route: as for device_encode ("auto" resolves once, before the blocks are planned).

    Returns uint8 (n, code_size) on the host.
    """
    from . import kernels

    xp = device.xp
    n, d = x.shape
    M, ksub, _ = centroids.shape
    cs = kernels.code_size(M, nbits)
    cent = xp.asarray(centroids)
    prepared = kernels.prepare_centroids(cent)
    if route == "auto" and not isinstance(device, CupyDevice):
        route = "arrayapi"
    elif route == "auto" and n > 0:
        route = choose_gpu_route(cent, nbits, prepared=prepared)
    if block_rows is None:
        block_rows = plan_block_rows(device.free_bytes(), d, M, ksub, x.dtype.itemsize,
                                     route="fused" if route == "fused" else "arrayapi")
    out = np.empty((n, cs), np.uint8)
    if n == 0:
        return out
    rot_t = None if rotation is None else xp.asarray(np.ascontiguousarray(rotation.T, dtype=np.float32))
    block_bytes = block_rows * M * ksub * 4
    streams = [device.stream(), device.stream()]
    # x already page-locked (the pipeline pins chunks outside its GPU turn): blocks are uploaded straight from it
    direct = device.is_pinned(x)
    staging = [None if direct else device.pinned_like((block_rows, d), x.dtype) for _ in streams]
    results = [device.pinned_like((block_rows, cs), np.uint8) for _ in streams]
    pending: list[tuple[int, int, int] | None] = [None, None]  # (slot, start, stop) awaiting download

    def finish(slot: int) -> None:
        item = pending[slot]
        if item is not None:
            _, start, stop = item
            device.synchronize(streams[slot])
            out[start:stop] = results[slot][: stop - start]
            pending[slot] = None

    for b, start in enumerate(range(0, n, block_rows)):
        slot = b % 2
        finish(slot)  # the buffers of this slot are free again
        stop = min(n, start + block_rows)
        rows = stop - start
        if direct:
            src = x[start:stop]
        else:
            src = staging[slot][:rows]
            src[...] = x[start:stop]
        stream = streams[slot]
        with stream:
            xd = device.upload(src, stream)
            xf = xp.astype(xd, xp.float32)
            if normalize:
                from .metric import normalize_rows

                xf = normalize_rows(xf, "vectors to encode", row_offset=row_offset + start)
            if rot_t is not None:
                xf = xp.matmul(xf, rot_t)
            codes = device_encode(xf, cent, nbits, route=route, prepared=prepared, block_bytes=block_bytes)
            device.download(codes, results[slot][:rows], stream)
        pending[slot] = (slot, start, stop)
    finish(0)
    finish(1)
    return out


def sync(backend: str = "gpu") -> None:
    """Synchronize the current CUDA device (wait for all its queued work); no-op for "cpu" (and for "auto"
    without a GPU). Benchmarks call it inside the timed region so asynchronous GPU work is counted."""
    if resolve_backend(backend) == "cpu":
        return
    import cupy

    cupy.cuda.Device().synchronize()
