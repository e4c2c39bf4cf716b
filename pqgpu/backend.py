"""Compute backends: "cpu" (NumPy) or "gpu" (CuPy). The only module that imports CuPy.

`resolve_backend("auto")` picks the GPU when CuPy imports and a CUDA device is visible, the CPU otherwise;
`resolve_backend("gpu")` never falls back: it raises BackendUnavailable saying what is missing.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from .errors import BackendUnavailable, ConfigError

log = logging.getLogger(__name__)

GPU_INSTALL_HINT = (
    "Install the GPU extra with `pip install 'pqgpu[gpu]'` (CuPy for CUDA 12) or create the conda environment "
    "from environment.yml, on a machine with an NVIDIA driver and a visible CUDA device."
)


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
