"""The few file-system operations the store needs, for local paths and fsspec URLs (s3://, gs://, ...)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def is_remote(path: str | os.PathLike) -> bool:
    """True for an fsspec URL other than a local file (file:// and plain paths are local)."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def exists(path: str | os.PathLike) -> bool:
    if not is_remote(path):
        return Path(path).exists()
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    fs.invalidate_cache()  # object-store listings are cached per instance; zarr writes through another one
    return fs.exists(root)


def remove_tree(path: str | os.PathLike) -> None:
    if not is_remote(path):
        shutil.rmtree(path)
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    fs.rm(root, recursive=True)


def make_parent(path: str | os.PathLike) -> None:
    """Create the parent directory of a local path (object stores have no directories to create)."""
    if not is_remote(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def tree_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under path."""
    if not is_remote(path):
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    return int(fs.du(root, total=True))


def lock_file(path: str | os.PathLike) -> Path:
    """Where the encode lock of the store at `path` lives: beside a local store; for an object-store URL, in
    this machine's temp directory (object stores have no file locks, so it excludes encoders on this
    machine only)."""
    if not is_remote(path):
        return Path(str(path) + ".lock")
    digest = hashlib.sha256(str(path).rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"pqgpu-store-{digest}.lock"
