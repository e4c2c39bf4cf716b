"""pqgpu: faiss-compatible Product Quantization of large embedding collections, on GPU or CPU, with Dask."""

from __future__ import annotations

from .codebook import Codebook
from .config import Config, load_config
from .training import train
from .errors import BackendUnavailable, ConfigError, InputError, PqgpuError, StoreError
from .search import evaluate, search

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable", "Codebook", "Config", "ConfigError", "InputError", "PqgpuError", "StoreError", "__version__",
    "encode", "load_config", "open_store", "run", "search", "evaluate", "train",
]


def __getattr__(name: str):
    # The pipeline pulls in Dask and Zarr; import it only when used.
    if name in ("encode", "run", "open_store"):
        from . import pipeline, store

        return {"encode": pipeline.encode, "run": pipeline.run, "open_store": store.open_store}[name]
    raise AttributeError(f"module 'pqgpu' has no attribute {name!r}")
