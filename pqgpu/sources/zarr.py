"""Zarr sources: each group (a directory or a glob of them) holds a 2-D float array and, optionally, ids."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import zarr

from ..config import SourceConfig
from ..errors import InputError
from . import Shard, expand_paths


@functools.lru_cache(maxsize=16)
def _open(path: str) -> Any:
    try:
        return zarr.open_group(path, mode="r")
    except Exception as exc:
        raise InputError(f"{path}: not a readable Zarr group ({exc}).") from None


def _array(path: str, name: str, key: str) -> Any:
    g = _open(path)
    if name not in g:
        raise InputError(f"{path}: no array '{name}' in this Zarr group. Arrays present: "
                         f"{', '.join(sorted(g.array_keys()))}. Set source.{key}.")
    return g[name]


class ZarrReader:
    def list_shards(self, cfg: SourceConfig) -> list[Shard]:
        shards = []
        for path in expand_paths(cfg.path, (".zarr",), dirs=True):
            x = _array(path, cfg.vector_column, "vector_column")
            if x.ndim != 2 or x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4, 8):
                raise InputError(f"{path}/{cfg.vector_column}: expected a 2-D float16/32/64 array, got "
                                 f"{x.dtype} with shape {x.shape}.")
            if cfg.id_column:
                ids = _array(path, cfg.id_column, "id_column")
                if ids.shape != (x.shape[0],):
                    raise InputError(f"{path}/{cfg.id_column}: shape {ids.shape} does not match "
                                     f"{x.shape[0]} vectors.")
            # Zarr arrays carry no cheap mtime; the shape and chunking stand in for the file stamp.
            stamp = (list(x.shape), list(x.chunks), str(x.dtype))
            shards.append(Shard(path, int(x.shape[0]), int(x.shape[1]) if x.shape[0] else None, tuple(map(str, stamp))))
        return shards

    def id_dtype(self, cfg: SourceConfig, shard: Shard) -> Any:
        if not cfg.id_column:
            return np.int64
        dtype = _array(shard.path, cfg.id_column, "id_column").dtype
        if dtype.kind in "iu":
            return np.uint64 if dtype == np.uint64 else np.int64
        return str

    def vector_dtype(self, cfg: SourceConfig, shard: Shard) -> Any:
        return _array(shard.path, cfg.vector_column, "vector_column").dtype

    def read(self, cfg: SourceConfig, shard: Shard, lo: int, hi: int,
             out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """`out` is not used: Zarr decodes into arrays of its own."""
        try:
            x = np.asarray(_array(shard.path, cfg.vector_column, "vector_column")[lo:hi])
            ids = None
            if cfg.id_column:
                raw = np.asarray(_array(shard.path, cfg.id_column, "id_column")[lo:hi])
                ids = raw  # integers as stored (Source.read_piece converts exactly), strings as read
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{shard.path}: cannot read rows {lo}..{hi - 1}: {exc}. A chunk may be corrupt.") from None
        return x, ids

    def take(self, cfg: SourceConfig, shard: Shard, rows: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        """Vectors of the given shard rows (sorted, unique int64) by coordinate selection: Zarr reads only
        the chunks that hold them. Reports those chunks and their decoded size."""
        arr = _array(shard.path, cfg.vector_column, "vector_column")
        try:
            x = np.asarray(arr.get_orthogonal_selection((rows, slice(None))))
        except Exception as exc:
            raise InputError(f"{shard.path}: cannot read rows {int(rows[0])}..{int(rows[-1])}: {exc}. A chunk may "
                             "be corrupt.") from None
        crow, ccol = arr.chunks
        touched = len(np.unique(rows // crow)) * -(-arr.shape[1] // ccol)
        return x, {"chunks": touched, "bytes": touched * crow * ccol * arr.dtype.itemsize}

    def read_block(self, cfg: SourceConfig, shard: Shard, lo: int, hi: int) -> tuple[np.ndarray, int]:
        """Vectors of rows [lo, hi) for the training sample: Zarr reads only the chunks that hold them. The
        bytes are those chunks at the array's mean stored chunk size."""
        arr = _array(shard.path, cfg.vector_column, "vector_column")
        try:
            x = np.asarray(arr[lo:hi])
        except Exception as exc:
            raise InputError(f"{shard.path}: cannot read rows {lo}..{hi - 1}: {exc}. A chunk may be corrupt.") from None
        c = arr.chunks[0]
        touched = (hi - 1) // c - lo // c + 1 if hi > lo else 0
        return x, int(touched * self.stored_bytes(cfg, shard) / max(1, -(-arr.shape[0] // c)))

    def stored_bytes(self, cfg: SourceConfig, shard: Shard) -> int:
        return _stored(shard.path, cfg.vector_column)

    def unit_rows(self, cfg: SourceConfig, shard: Shard) -> int:
        return int(_array(shard.path, cfg.vector_column, "vector_column").chunks[0])


@functools.lru_cache(maxsize=64)
def _stored(path: str, name: str) -> int:
    """Stored (compressed) bytes of one array of a group: a listing of its chunks, once per process."""
    return int(_array(path, name, "vector_column").nbytes_stored())
