"""Compute backends: "cpu" (NumPy) or "gpu" (CuPy). The only module that imports CuPy.

`resolve_backend("auto")` picks the GPU when CuPy imports and a CUDA device is visible, the CPU otherwise;
`resolve_backend("gpu")` never falls back: it raises BackendUnavailable saying what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
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

def bytes_per_row(d: int, M: int, ksub: int, in_itemsize: int) -> int:
    """Device bytes one row costs while a block is encoded: the input as sent (e.g. float16), its float32
    copy, the (M, ksub) float32 distances, the int64 argmin and the packed codes."""
    return d * in_itemsize + d * 4 + M * ksub * 4 + M * 8 + M * 2


def plan_block_rows(free_bytes: int, d: int, M: int, ksub: int, in_itemsize: int = 4, *, buffers: int = 2,
                    fraction: float = 0.6, min_rows: int = 64, max_rows: int = 1 << 20) -> int:
    """Rows per device block so `buffers` blocks in flight use at most `fraction` of the free memory.

    Pure arithmetic, tested on the CPU; raises when even min_rows rows cannot fit.
    """
    need = bytes_per_row(d, M, ksub, in_itemsize)
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


def encode_blocks(x: np.ndarray, centroids: np.ndarray, nbits: int, device: NumpyDevice,
                  block_rows: int | None = None, rotation: np.ndarray | None = None) -> np.ndarray:
    """Encode host x (n, d) (float16 stays float16 on the wire, computed in float32; rotated by `rotation`
    first when given) into packed codes on
    `device`, two blocks in flight: while one block computes, the next one's copy is under way.

    Returns uint8 (n, code_size) on the host.
    """
    from . import kernels

    xp = device.xp
    n, d = x.shape
    M, ksub, _ = centroids.shape
    cs = kernels.code_size(M, nbits)
    if block_rows is None:
        block_rows = plan_block_rows(device.free_bytes(), d, M, ksub, x.dtype.itemsize)
    out = np.empty((n, cs), np.uint8)
    if n == 0:
        return out
    cent = xp.asarray(centroids)
    rot_t = None if rotation is None else xp.asarray(np.ascontiguousarray(rotation.T, dtype=np.float32))
    prepared = kernels.prepare_centroids(cent)
    block_bytes = block_rows * M * ksub * 4
    streams = [device.stream(), device.stream()]
    staging = [device.pinned_like((block_rows, d), x.dtype) for _ in streams]
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
        staging[slot][:rows] = x[start:stop]
        stream = streams[slot]
        with stream:
            xd = device.upload(staging[slot][:rows], stream)
            xf = xp.astype(xd, xp.float32)
            if rot_t is not None:
                xf = xp.matmul(xf, rot_t)
            codes = kernels.pack_codes(kernels.assign(xf, cent, prepared=prepared, block_bytes=block_bytes), nbits)
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
