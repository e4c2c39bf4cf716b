"""`.npy` shards: one 2-D float array per file; ids from a parallel set of .npy files or row numbers."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..config import SourceConfig
from ..errors import InputError
from . import Shard, expand_paths, file_stamp


@functools.lru_cache(maxsize=32)
def _load(path: str, stamp: tuple) -> np.ndarray:
    """Memory-mapped for local files, so reading a slice touches only those rows."""
    try:
        if "://" in path:
            import fsspec

            with fsspec.open(path, "rb") as f:
                return np.load(f, allow_pickle=False)
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy file ({exc}). Re-create or remove this shard.") from None


class NpyReader:
    def list_shards(self, cfg: SourceConfig) -> list[Shard]:
        paths = expand_paths(cfg.path, (".npy",))
        id_paths: list[str | None] = [None] * len(paths)
        if cfg.id_column:
            id_paths = expand_paths(cfg.id_column, (".npy",), key="source.id_column")
            if len(id_paths) != len(paths):
                raise InputError(f"source.id_column {cfg.id_column!r} matches {len(id_paths)} id file(s) but "
                                 f"source.path matches {len(paths)} vector file(s); they must pair up in sorted order.")
        shards = []
        for path, id_path in zip(paths, id_paths):
            stamp = file_stamp(path)
            a = _load(path, stamp)
            if a.ndim != 2:
                hint = (" Are these ids? A directory or glob of .npy vectors takes every file it matches: give the "
                        "vectors alone (e.g. DIR/shard-*.npy) and their ids with source.id_column (e.g. "
                        "'DIR/ids-*.npy')." if a.ndim == 1 else "")
                raise InputError(f"{path}: expected a 2-D array (rows, d), got shape {a.shape}.{hint}")
            if a.dtype.kind != "f" or a.dtype.itemsize not in (2, 4, 8):
                raise InputError(f"{path}: dtype {a.dtype} is not supported; expected float16, float32 or float64.")
            extra = None
            if id_path is not None:
                id_stamp = file_stamp(id_path)
                ids = _load(id_path, id_stamp)
                if ids.shape != (a.shape[0],):
                    raise InputError(f"{id_path}: ids have shape {ids.shape} but {path} has {a.shape[0]} rows.")
                if ids.dtype.kind not in "iuUS":
                    raise InputError(f"{id_path}: ids dtype {ids.dtype} is not supported; use integers or strings.")
                extra = (id_path, id_stamp)
                stamp = stamp + id_stamp
            shards.append(Shard(path, int(a.shape[0]), int(a.shape[1]) if a.shape[0] else None, stamp, extra))
        return shards

    def id_dtype(self, cfg: SourceConfig, shard: Shard) -> Any:
        if shard.extra is None:
            return np.int64
        dtype = _load(*shard.extra).dtype
        if dtype.kind in "iu":
            return np.uint64 if dtype == np.uint64 else np.int64
        return str

    def vector_dtype(self, cfg: SourceConfig, shard: Shard) -> Any:
        return _load(shard.path, shard.stamp[:2]).dtype

    def read(self, cfg: SourceConfig, shard: Shard, lo: int, hi: int,
             out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        a = _load(shard.path, shard.stamp[:2])
        try:
            if out is not None and out.dtype == a.dtype and out.shape == (hi - lo, a.shape[1]):
                out[...] = a[lo:hi]
                x = out
            else:
                x = np.array(a[lo:hi])
        except (ValueError, OSError) as exc:
            raise InputError(f"{shard.path}: cannot read rows {lo}..{hi - 1}: {exc}. The file may be truncated.") from None
        ids = None
        if shard.extra is not None:
            raw = np.array(_load(*shard.extra)[lo:hi])
            ids = raw if raw.dtype.kind in "iu" else raw.astype(str)  # integers exactly as stored (Source.read_piece)
        return x, ids

    def read_block(self, cfg: SourceConfig, shard: Shard, lo: int, hi: int) -> tuple[np.ndarray, int]:
        """Vectors of rows [lo, hi) for the training sample (a slice of the memory map) and the bytes they
        span. (A remote .npy is loaded whole by list_shards already; only local files are read by slice.)"""
        a = _load(shard.path, shard.stamp[:2])
        try:
            x = np.array(a[lo:hi])
        except (ValueError, OSError) as exc:
            raise InputError(f"{shard.path}: cannot read rows {lo}..{hi - 1}: {exc}. The file may be "
                             "truncated.") from None
        return x, int(x.nbytes)

    def stored_bytes(self, cfg: SourceConfig, shard: Shard) -> int:
        return int(shard.stamp[0])

    def unit_rows(self, cfg: SourceConfig, shard: Shard) -> int:
        return 1

    def take(self, cfg: SourceConfig, shard: Shard, rows: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        """Vectors of the given shard rows (sorted, unique int64): a local file through its memory map (only
        the pages holding them are touched), a remote one by byte ranges (one per run of consecutive rows)."""
        if "://" not in shard.path:
            a = _load(shard.path, shard.stamp[:2])
            try:
                x = np.asarray(a[rows])
            except (ValueError, OSError, IndexError) as exc:
                raise InputError(f"{shard.path}: cannot read rows {int(rows[0])}..{int(rows[-1])}: {exc}. The file "
                                 "may be truncated.") from None
            return x, {"bytes": int(x.nbytes)}
        return _take_remote(shard.path, rows)


def _take_remote(path: str, rows: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    try:
        with fs.open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy file ({exc}).") from None
    if fortran and shape[0] > 1:
        raise InputError(f"{path}: the array is stored in Fortran order, so a row is not contiguous and cannot be "
                         "read alone from object storage. Save it in C order (np.save of np.ascontiguousarray).")
    row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)  # consecutive rows: one range
    starts = [offset + int(r[0]) * row_bytes for r in runs]
    ends = [offset + (int(r[-1]) + 1) * row_bytes for r in runs]
    try:
        blobs = fs.cat_ranges([p] * len(runs), starts, ends)
    except OSError as exc:
        raise InputError(f"{path}: cannot read rows {int(rows[0])}..{int(rows[-1])}: {exc}.") from None
    data = b"".join(blobs)
    if len(data) != len(rows) * row_bytes:
        raise InputError(f"{path}: expected {len(rows) * row_bytes} bytes for {len(rows)} rows, got {len(data)}. "
                         "The file may be truncated.")
    return np.frombuffer(data, dtype).reshape(len(rows), *shape[1:]), {"bytes": len(data)}
