"""pqgpu's exception types. Every message says what went wrong, where (file, row, key) and how to fix it."""

from __future__ import annotations


class PqgpuError(Exception):
    """Base class for every error pqgpu raises on purpose (the CLI prints these without a traceback)."""


class ConfigError(PqgpuError, ValueError):
    """A configuration key or value is wrong."""


class InputError(PqgpuError, ValueError):
    """Input data is unusable: bad shape, dtype, NaN/Inf, missing column, corrupt file."""


class StoreError(PqgpuError):
    """The code store cannot be created, opened or resumed safely."""


class BackendUnavailable(PqgpuError, RuntimeError):
    """The requested compute backend (e.g. gpu) cannot be used on this machine."""
