"""Embedding sources: shard discovery, a pure chunk planner, and one shared read loop over all formats.

Each format module only knows how to list its shards and decode a row range of one shard
(`ShardReader.read(shard, lo, hi) -> (vectors, ids)`); everything else is shared here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from ..config import SourceConfig
from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Shard:
    """One file (or Zarr group) of the source: `n_rows` rows of dimension `d`."""

    path: str
    n_rows: int
    d: int | None  # None for an empty shard whose dimension is unknown
    stamp: tuple = ()  # (size, mtime) or similar, for the source fingerprint
    extra: Any = None  # format-specific (e.g. parquet row-group offsets, the ids file of a .npy shard)


@dataclass(frozen=True)
class Piece:
    """Rows [lo, hi) of shard `shard` (an index into Source.shards)."""

    shard: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Chunk:
    """Output chunk `index`: global rows [start, stop), read from `pieces` in order."""

    index: int
    start: int
    stop: int
    pieces: tuple[Piece, ...]

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_chunks(shard_rows: Sequence[int], chunk_rows: int) -> list[Chunk]:
    """Cut the concatenation of shards into chunks of exactly chunk_rows rows (the last may be shorter).

    Pure function: every row appears in exactly one piece, pieces are in source order, and a chunk may
    span several shards (and a shard several chunks). Empty shards contribute no pieces.
    """
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    chunks: list[Chunk] = []
    pieces: list[Piece] = []
    start = 0  # global row where the current chunk starts
    filled = 0
    for s, rows in enumerate(shard_rows):
        lo = 0
        while lo < rows:
            take = min(rows - lo, chunk_rows - filled)
            pieces.append(Piece(s, lo, lo + take))
            lo += take
            filled += take
            if filled == chunk_rows:
                chunks.append(Chunk(len(chunks), start, start + filled, tuple(pieces)))
                start += filled
                pieces, filled = [], 0
    if filled:
        chunks.append(Chunk(len(chunks), start, start + filled, tuple(pieces)))
    return chunks


class ShardReader(Protocol):
    def list_shards(self, cfg: SourceConfig) -> list[Shard]: ...

    def read(self, cfg: SourceConfig, shard: Shard, lo: int, hi: int,
             out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]: ...

    def id_dtype(self, cfg: SourceConfig, shard: Shard) -> Any: ...

    def vector_dtype(self, cfg: SourceConfig, shard: Shard) -> Any: ...

    # the training sample (pqgpu.sources.sampling): vectors of rows [lo, hi) and the bytes read for them
    def read_block(self, cfg: SourceConfig, shard: Shard, lo: int, hi: int) -> tuple[np.ndarray, int]: ...

    def stored_bytes(self, cfg: SourceConfig, shard: Shard) -> int: ...

    def unit_rows(self, cfg: SourceConfig, shard: Shard) -> int: ...  # rows one read costs at least


def _reader(fmt: str) -> ShardReader:
    if fmt == "parquet":
        from .parquet import ParquetReader

        return ParquetReader()
    if fmt == "npy":
        from .npy import NpyReader

        return NpyReader()
    if fmt == "zarr":
        from .zarr import ZarrReader

        return ZarrReader()
    raise ConfigError(f"source.format: expected one of parquet, zarr, npy. Got {fmt!r} instead.")


@dataclass(frozen=True)
class Source:
    """A discovered source: config, shards and their row offsets. Cheap to pickle and send to workers."""

    cfg: SourceConfig
    shards: tuple[Shard, ...]
    d: int
    id_dtype: Any
    offsets: tuple[int, ...] = field(repr=False)  # global row of each shard's first row

    @property
    def n(self) -> int:
        return self.offsets[-1] if self.offsets else 0

    def fingerprint(self) -> dict[str, Any]:
        """What the store records to detect a changed source on resume."""
        return {"format": self.cfg.format, "path": self.cfg.path, "id_column": self.cfg.id_column,
                "vector_column": self.cfg.vector_column, "n": self.n, "d": self.d,
                "files": [[os.path.basename(s.path), s.n_rows, *s.stamp] for s in self.shards]}

    def read_piece(self, piece: Piece, global_start: int,
                   out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Vectors and ids of one piece. With `out` ((rows, d), the shard's vector dtype) the reader may fill
        it and return it instead of a new array."""
        shard = self.shards[piece.shard]
        reader = _reader(self.cfg.format)
        x, ids = reader.read(self.cfg, shard, piece.lo, piece.hi, out=out)
        if x.ndim != 2 or x.shape[0] != piece.hi - piece.lo:
            raise InputError(f"{shard.path}: expected {piece.hi - piece.lo} rows at rows {piece.lo}..{piece.hi}, "
                             f"got array of shape {x.shape}.")
        if x.shape[1] != self.d:
            raise InputError(f"{shard.path}: vectors have dimension {x.shape[1]}, other shards have {self.d}.")
        if ids is None:  # no id column: global row numbers
            ids = np.arange(global_start, global_start + x.shape[0], dtype=np.int64)
        return x, ids

    def read_chunk(self, chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
        """Vectors (rows, d) in their stored float dtype and ids (rows,) of one chunk. A chunk over several
        shards of one dtype is read straight into one array (no concatenation copy)."""
        if len(chunk.pieces) == 1:
            return self.read_piece(chunk.pieces[0], chunk.start)
        reader = _reader(self.cfg.format)
        dtypes = {np.dtype(reader.vector_dtype(self.cfg, self.shards[p.shard])) for p in chunk.pieces}
        out = np.empty((chunk.rows, self.d), dtypes.pop()) if len(dtypes) == 1 else None
        xs, ids = [], []
        start = chunk.start
        for p in chunk.pieces:
            part = None if out is None else out[start - chunk.start:start - chunk.start + p.hi - p.lo]
            x, i = self.read_piece(p, start, part)
            if part is None:
                xs.append(x)
            elif x is not part:
                part[...] = x
            ids.append(i)
            start += p.hi - p.lo
        if out is not None:
            return out, np.concatenate(ids)
        return np.concatenate(xs).astype(np.result_type(*[x.dtype for x in xs]), copy=False), np.concatenate(ids)

    def locate(self, row: int) -> tuple[str, int]:
        """(file path, row within file) of a global row: for error messages."""
        s = int(np.searchsorted(self.offsets, row, side="right")) - 1
        s = min(max(s, 0), len(self.shards) - 1)
        return self.shards[s].path, row - self.offsets[s]

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[Chunk, np.ndarray, np.ndarray]]:
        for chunk in plan_chunks([s.n_rows for s in self.shards], chunk_rows):
            x, ids = self.read_chunk(chunk)
            yield chunk, x, ids

    def sample(self, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """`size` rows from across the whole source, seeded, in source order, as many small blocks read in
        parallel (pqgpu.sources.sampling). Returns (vectors, global row numbers)."""
        from .sampling import draw_sample

        s = draw_sample(self, size, seed)
        return s.x, s.rows


def open_source(cfg: SourceConfig) -> Source:
    """List the shards of a source and check they agree on dimension and id type."""
    reader = _reader(cfg.format)
    shards = reader.list_shards(cfg)
    dims = {s.d for s in shards if s.d is not None}
    if not dims:
        if not shards:
            raise InputError(f"source.path {cfg.path!r} matches no {cfg.format} files.")
        raise InputError(f"source.path {cfg.path!r}: all {len(shards)} shard(s) are empty; nothing to encode.")
    if len(dims) > 1:
        first = next(s for s in shards if s.d is not None)
        other = next(s for s in shards if s.d is not None and s.d != first.d)
        raise InputError(f"Shards disagree on the vector dimension: {first.path} has d={first.d} but "
                         f"{other.path} has d={other.d}. All shards of one source must have the same d.")
    id_types = {"str" if t is str else str(np.dtype(t))
                for t in (reader.id_dtype(cfg, s) for s in shards if s.n_rows)}
    if len(id_types) > 1:
        raise InputError(f"Shards disagree on the id type ({', '.join(sorted(id_types))}); ids must be all "
                         "integers or all strings.")
    nonempty = next(s for s in shards if s.n_rows)
    offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum([s.n_rows for s in shards])]))
    empty = sum(1 for s in shards if s.n_rows == 0)
    if empty:
        log.info("%d empty shard(s) skipped", empty)
    return Source(cfg, tuple(shards), dims.pop(), reader.id_dtype(cfg, nonempty), offsets)


def expand_paths(path: str | list[str], suffixes: tuple[str, ...], *, dirs: bool = False) -> list[str]:
    """A glob, a directory (its files with one of `suffixes`) or a single path, local or fsspec URL; or a
    list of those (expanded in the order given, each file once). Returns full paths (with the protocol for
    remote URLs), sorted within each item."""
    if isinstance(path, (list, tuple)):
        out: dict[str, None] = {}
        for p in path:
            out.update(dict.fromkeys(expand_paths(p, suffixes, dirs=dirs)))
        return list(out)
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

    def full(p: str) -> str:
        return p if protocol in ("file", "local") else f"{protocol}://{p}"

    if any(ch in root for ch in "*?["):
        found = sorted(fs.glob(root))
    elif fs.isdir(root) and not (dirs and any(root.rstrip("/").endswith(s) for s in suffixes)):
        found = sorted(p for p in fs.ls(root, detail=False) if p.rstrip("/").endswith(suffixes))
    elif fs.exists(root):
        found = [root]
    else:
        raise InputError(f"source.path {path!r} does not exist. Give a file, a directory or a glob such as "
                         f"data/shards/*{suffixes[0]}.")
    if dirs:
        found = [p for p in found if fs.isdir(p)]
    else:
        found = [p for p in found if fs.isfile(p)]
    if not found:
        raise InputError(f"source.path {path!r} matches no {'/'.join(suffixes)} files.")
    return [full(p.rstrip("/")) for p in found]


def file_stamp(path: str) -> tuple:
    """(size, mtime) of a local or fsspec path, for the source fingerprint."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    info = fs.info(p)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    return (int(info.get("size") or 0), str(mtime))


_FORMAT_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".npy": "npy", ".zarr": "zarr"}


def infer_format(paths: list[str]) -> str | None:
    """The source format the paths' extensions name (a directory: the extension its entries share), or
    None when that is missing or ambiguous."""
    found = set()
    for path in paths:
        p = path.rstrip("/")
        kind = next((f for s, f in _FORMAT_SUFFIXES.items() if p.lower().endswith(s)), None)
        if kind is None and "://" not in p and not any(ch in p for ch in "*?[") and os.path.isdir(p):
            kinds = {f for name in os.listdir(p) for s, f in _FORMAT_SUFFIXES.items()
                     if name.lower().endswith(s) and not name.startswith(".")}
            kind = kinds.pop() if len(kinds) == 1 else None
        if kind is None:
            return None
        found.add(kind)
    return found.pop() if len(found) == 1 else None
