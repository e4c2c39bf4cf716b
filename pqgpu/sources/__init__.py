"""Embedding sources: shard discovery, a pure chunk planner, and one shared read loop over all formats.

Each format module only knows how to list its shards and decode a row range of one shard
(`ShardReader.read(shard, lo, hi) -> (vectors, ids)`); everything else is shared here.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from ..config import SourceConfig
from ..errors import ConfigError, InputError
from ..formats import COMPANIONS, infer_format, subdirectory_hint  # noqa: F401 (infer_format: re-exported)

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

    def take(self, cfg: SourceConfig, shard: Shard, rows: np.ndarray) -> tuple[np.ndarray, dict[str, int]]: ...

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
        """What the store records to detect a changed source on resume (pqgpu.sources.fingerprint)."""
        from .fingerprint import fingerprint

        return fingerprint(self)

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
        else:
            ids = self._exact_ids(ids, shard, piece.lo, global_start)
        return x, ids

    def _exact_ids(self, ids: np.ndarray, shard: Shard, lo: int, global_start: int) -> np.ndarray:
        """Integer ids in the source's id dtype, exactly: an InputError naming the file and row of the first
        id that dtype cannot hold (never a silent wrap, nor a float from mixing int64 and uint64)."""
        ids = np.asarray(ids)
        if self.id_dtype is str or ids.dtype.kind not in "iu":
            return ids
        want = np.dtype(self.id_dtype)
        if ids.dtype == want:
            return ids
        if want.kind == "i" and ids.dtype.kind == "u":
            bad = np.flatnonzero(ids > np.iinfo(want).max)
        elif want.kind == "u" and ids.dtype.kind == "i":
            bad = np.flatnonzero(ids < 0)
        else:
            bad = np.zeros(0, np.intp)
        if bad.size:
            row = lo + int(bad[0])
            raise InputError(f"{shard.path}: row {row} (global row {global_start + int(bad[0])}) has id {ids[bad[0]]}, "
                             f"which the store's {want} ids cannot hold exactly: the shards mix signed and unsigned "
                             "64-bit ids. Give every shard the same id type (uint64 for ids of 2**63 and above).")
        return ids.astype(want)

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

    def take_rows(self, rows: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """The vectors of the given global rows (any order, repeats allowed), read shard by shard, each shard
        once with all its rows (so each Parquet row group is read once), memory bounded by the rows taken.

        Returns the distinct rows (sorted int64 (u,)), their float32 vectors (u, d), and what was read: rows,
        files, row groups (Parquet) or chunks (Zarr), bytes, seconds."""
        t0 = time.perf_counter()
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise InputError(f"rows outside 0..{self.n - 1} asked of the source {self.cfg.path!r}.")
        uniq = np.unique(rows)
        out = np.empty((uniq.size, self.d), np.float32)
        reader = _reader(self.cfg.format)
        stats: dict[str, Any] = {"rows": int(uniq.size), "files": 0}
        shard_of = np.searchsorted(self.offsets, uniq, side="right") - 1
        bounds = np.searchsorted(shard_of, np.arange(len(self.shards) + 1))
        for s, shard in enumerate(self.shards):
            lo, hi = int(bounds[s]), int(bounds[s + 1])
            if hi == lo:
                continue
            x, read = reader.take(self.cfg, shard, uniq[lo:hi] - self.offsets[s])
            if x.shape != (hi - lo, self.d):
                raise InputError(f"{shard.path}: expected {hi - lo} vectors of dimension {self.d}, got an array of "
                                 f"shape {x.shape}. The file changed since it was listed.")
            out[lo:hi] = x
            stats["files"] += 1
            for key, value in read.items():
                stats[key] = stats.get(key, 0) + value
        stats["seconds"] = time.perf_counter() - t0
        return uniq, out, stats

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
    if "str" in id_types and len(id_types) > 1:
        raise InputError(f"Shards disagree on the id type ({', '.join(sorted(id_types))}); ids must be all "
                         "integers or all strings.")
    offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum([s.n_rows for s in shards])]))
    empty = sum(1 for s in shards if s.n_rows == 0)
    if empty:
        log.info("%d empty shard(s) skipped", empty)
    return Source(cfg, tuple(shards), dims.pop(), store_id_dtype(id_types), offsets)


def store_id_dtype(id_types: set[str]) -> Any:
    """The store's id type for the shards' id types: str; uint64 when every shard has uint64 ids (kept exactly,
    2**63 and above included); int64 otherwise (narrower integers widen exactly; a uint64 id of 2**63 or more
    among int64 shards is an error where it is read, Source._exact_ids)."""
    if "str" in id_types:
        return str
    return np.uint64 if id_types == {"uint64"} else np.int64


def expand_paths(path: str | list[str], suffixes: tuple[str, ...], *, dirs: bool = False,
                 key: str = "source.path") -> list[str]:
    """A glob, a directory (its files with one of `suffixes`, but not make-sample's queries.npy) or a single
    path, local or fsspec URL; or a list of those (expanded in the order given, each file once). Returns full
    paths (with the protocol for remote URLs), sorted within each item. `key` names the setting in errors."""
    if isinstance(path, (list, tuple)):
        out: dict[str, None] = {}
        for p in path:
            out.update(dict.fromkeys(expand_paths(p, suffixes, dirs=dirs, key=key)))
        return list(out)
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

    def full(p: str) -> str:
        return p if protocol in ("file", "local") else f"{protocol}://{p}"

    listed = False
    if any(ch in root for ch in "*?["):
        found = sorted(fs.glob(root))
    elif fs.isdir(root) and not (dirs and any(root.rstrip("/").endswith(s) for s in suffixes)):
        listed = True
        found = sorted(p for p in fs.ls(root, detail=False) if p.rstrip("/").endswith(suffixes))
        skipped = [p for p in found if os.path.basename(p.rstrip("/")) in COMPANIONS]
        if skipped:
            log.info("%s: %s left out (what make-sample writes beside the shards; a glob takes it if it is one)",
                     path, ", ".join(os.path.basename(p) for p in skipped))
            found = [p for p in found if p not in skipped]
    elif fs.exists(root):
        found = [root]
    else:
        raise InputError(f"{key} {path!r} does not exist. Give a file, a directory or a glob such as "
                         f"data/shards/*{suffixes[0]}.")
    if dirs:
        found = [p for p in found if fs.isdir(p)]
    else:
        found = [p for p in found if fs.isfile(p)]
    if not found:
        hint = subdirectory_hint(path) if listed and protocol in ("file", "local") else ""
        raise InputError(f"{key} {path!r} matches no {'/'.join(suffixes)} files.{hint}")
    return [full(p.rstrip("/")) for p in found]


def file_stamp(path: str) -> tuple:
    """(size, mtime) of a local or fsspec path, for the source fingerprint."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(path)
    info = fs.info(p)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    return (int(info.get("size") or 0), str(mtime))


def read_vectors(path: str | list[str], *, fmt: str | None = None, vector_column: str = "embedding",
                 key: str = "--queries") -> np.ndarray:
    """Every row of a small vector collection (queries) in any source format, by the same rules as a source
    (format from the extension, Parquet list / fixed_size_list columns, Zarr arrays, 2-D .npy files; a
    directory or glob of shards is concatenated in order): (n, d) in the stored float dtype. `key` names the
    argument in errors."""
    fmt = fmt or infer_format(path, key=key)
    try:
        src = open_source(SourceConfig(format=fmt, path=path, vector_column=vector_column))
        return np.concatenate([x for _, x, _ in src.iter_chunks(max(src.n, 1))])
    except InputError as exc:
        raise InputError(str(exc).replace("source.path", key).replace("Set source.vector_column",
                                                                      "Give its column with --vector-column")) from None
