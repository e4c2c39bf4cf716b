"""Parquet shards: an id column (int64 or string) and a vector column (list / fixed_size_list of float)."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import SourceConfig
from ..errors import InputError
from . import Shard, expand_paths, file_stamp
from ._parquet_pages import Unsupported, leaf_column, page_rows, read_rows

log = logging.getLogger(__name__)

FLOAT_TYPES = (pa.float16(), pa.float32(), pa.float64())
# Read list-of-float columns with the page reader of _parquet_pages where it applies (PQGPU_PARQUET_PAGES=0: off).
FAST_PAGES = os.environ.get("PQGPU_PARQUET_PAGES", "1") != "0"


@functools.lru_cache(maxsize=16)
def _open(path: str, stamp: tuple) -> pq.ParquetFile:
    """Per-process cache: a worker reading many chunks of one file parses its footer once."""
    try:
        if "://" in path:
            import fsspec

            return pq.ParquetFile(fsspec.open(path, "rb").open(), pre_buffer=False)
        return pq.ParquetFile(path, pre_buffer=False)  # pre_buffer caches every row group read: memory grows
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc}). Re-create or remove this shard.") from None


def _vector_type(field: pa.Field, path: str) -> tuple[int | None, pa.DataType]:
    t = field.type
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        if t.value_type not in FLOAT_TYPES:
            raise InputError(f"{path}: column '{field.name}' holds lists of {t.value_type}; expected float16, "
                             "float32 or float64 values.")
        return (t.list_size if pa.types.is_fixed_size_list(t) else None), t.value_type
    raise InputError(f"{path}: column '{field.name}' has type {t}; expected a list or fixed_size_list of floats "
                     "(one embedding per row).")


def vectors_from_arrow(col: pa.ChunkedArray | pa.Array, path: str, first_row: int) -> np.ndarray:
    """A list / fixed_size_list column -> (rows, d) numpy array of its float dtype, checking nulls and raggedness."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(col)
    if col.null_count:
        bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{path}: row {first_row + bad} has a null embedding ({col.null_count} null(s) in "
                         f"rows {first_row}..{first_row + n - 1}). Drop or fill these rows.")
    if pa.types.is_fixed_size_list(col.type):
        d = col.type.list_size
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        d = int(lengths[0]) if n else 0
        if n and (lengths != d).any():
            bad = int(np.flatnonzero(lengths != d)[0])
            raise InputError(f"{path}: row {first_row + bad} has an embedding of length {lengths[bad]}, but row "
                             f"{first_row} has {d}. All embeddings must have the same dimension.")
    values = col.flatten()
    if values.null_count:
        bad = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // max(d, 1)
        raise InputError(f"{path}: row {first_row + bad} has a null value inside its embedding.")
    return values.to_numpy(zero_copy_only=False).reshape(n, d)


class ParquetReader:
    def list_shards(self, cfg: SourceConfig) -> list[Shard]:
        shards = []
        from .postgres.manifest import recorded_shards

        # a Postgres export's directory holds the shards its manifest names (a later one may be half-recorded)
        for path in recorded_shards(expand_paths(cfg.path, (".parquet", ".pq"))):
            stamp = file_stamp(path)
            pf = _open(path, stamp)
            schema = pf.schema_arrow
            names = schema.names
            for col in (cfg.vector_column, cfg.id_column):
                if col is not None and col not in names:
                    raise InputError(f"{path}: no column '{col}'. Columns present: {', '.join(names)}. Set "
                                     f"source.{'vector_column' if col == cfg.vector_column else 'id_column'}.")
            if cfg.id_column is not None:
                t = schema.field(cfg.id_column).type
                if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
                    raise InputError(f"{path}: id column '{cfg.id_column}' has type {t}; expected integers or strings.")
            d, _ = _vector_type(schema.field(cfg.vector_column), path)
            md = pf.metadata
            sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            n = int(sum(sizes))
            if d is None and n:
                first = next(i for i, s in enumerate(sizes) if s)
                head = pf.read_row_group(first, columns=[cfg.vector_column]).column(0).slice(0, 1)
                d = vectors_from_arrow(head, path, 0).shape[1]
            offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum(sizes)]))
            shards.append(Shard(path, n, d if n else None, stamp, offsets))
        return shards

    def id_dtype(self, cfg: SourceConfig, shard: Shard) -> Any:
        if cfg.id_column is None:
            return np.int64
        t = _open(shard.path, shard.stamp).schema_arrow.field(cfg.id_column).type
        if pa.types.is_integer(t):  # uint64 ids stay uint64 (2**63 and above would wrap in int64)
            return np.uint64 if t == pa.uint64() else np.int64
        return str

    def vector_dtype(self, cfg: SourceConfig, shard: Shard) -> Any:
        field = _open(shard.path, shard.stamp).schema_arrow.field(cfg.vector_column)
        return _vector_type(field, shard.path)[1].to_pandas_dtype()

    def read(self, cfg: SourceConfig, shard: Shard, lo: int, hi: int,
             out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        pf = _open(shard.path, shard.stamp)
        offsets = shard.extra
        first = int(np.searchsorted(offsets, lo, side="right")) - 1
        last = int(np.searchsorted(offsets, hi, side="left")) - 1
        groups = list(range(first, max(first, last) + 1))
        x = _read_vectors_fast(shard, cfg.vector_column, lo, hi, out)
        columns = ([cfg.vector_column] if x is None else []) + ([cfg.id_column] if cfg.id_column else [])
        if not columns:
            return x, None
        try:
            table = _read_slice(pf, groups, columns, lo - offsets[first], hi - lo)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{shard.path}: cannot read rows {lo}..{hi - 1} (row groups {groups[0]}..{groups[-1]}): "
                             f"{exc}. The file may be truncated or corrupt.") from None
        if x is None:
            x = vectors_from_arrow(table.column(cfg.vector_column), shard.path, lo)
        ids = None
        if cfg.id_column:
            col = table.column(cfg.id_column)
            if col.null_count:
                bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                raise InputError(f"{shard.path}: row {lo + bad} has a null id in column '{cfg.id_column}'.")
            ids = col.to_numpy()
            ids = ids if ids.dtype.kind in "iu" else ids.astype(str)  # integers exactly as stored (Source.read_piece)
        return x, ids

    def take(self, cfg: SourceConfig, shard: Shard, rows: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        return take_rows(cfg, shard, rows)


    def read_block(self, cfg: SourceConfig, shard: Shard, lo: int, hi: int) -> tuple[np.ndarray, int]:
        """Vectors of rows [lo, hi) for the training sample, and the bytes read: the page reader reads only the
        pages that hold them (found from the page headers); pyarrow, where that does not apply, the row groups."""
        if FAST_PAGES and shard.d:
            leaf = _leaf(shard.path, shard.stamp, cfg.vector_column)
            if leaf is not None:
                stats = {"bytes": 0}
                try:
                    return read_rows(shard.path, _open(shard.path, shard.stamp), leaf, shard.extra, lo, hi, shard.d,
                                     skip_pages=True, stats=stats), stats["bytes"]
                except Unsupported as exc:
                    log.debug("%s rows %d..%d: sample read with pyarrow (%s)", shard.path, lo, hi - 1, exc)
                except Exception as exc:  # noqa: BLE001 - pyarrow reads it instead, and words any error
                    log.warning("%s rows %d..%d: the page reader failed (%r); reading with pyarrow", shard.path, lo,
                                hi - 1, exc)
        pf = _open(shard.path, shard.stamp)
        offsets = shard.extra
        first = int(np.searchsorted(offsets, lo, side="right")) - 1
        last = int(np.searchsorted(offsets, hi, side="left")) - 1
        groups = list(range(first, max(first, last) + 1))
        try:
            table = _read_slice(pf, groups, [cfg.vector_column], lo - offsets[first], hi - lo)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{shard.path}: cannot read rows {lo}..{hi - 1} (row groups {groups[0]}..{groups[-1]}): "
                             f"{exc}. The file may be truncated or corrupt.") from None
        md = pf.metadata
        leaves = [i for i in range(md.num_columns) if pf.schema.column(i).path.split(".")[0] == cfg.vector_column]
        nbytes = sum(md.row_group(g).column(i).total_compressed_size for g in groups for i in leaves)
        return vectors_from_arrow(table.column(0), shard.path, lo), int(nbytes)

    def stored_bytes(self, cfg: SourceConfig, shard: Shard) -> int:
        return int(shard.stamp[0])

    def unit_rows(self, cfg: SourceConfig, shard: Shard) -> int:
        """Rows a sample read costs at least: a data page (writers cut them at about 1 MiB) for the page reader,
        a row group for pyarrow."""
        pf = _open(shard.path, shard.stamp)
        md = pf.metadata
        rg_rows = max(1, int(np.median([md.row_group(g).num_rows for g in range(md.num_row_groups)])))
        leaf = _leaf(shard.path, shard.stamp, cfg.vector_column) if FAST_PAGES else None
        if leaf is None:
            return rg_rows
        rows = _page_rows(shard.path, shard.stamp, leaf, shard.d or 0)
        return int(min(rows, rg_rows)) if rows else rg_rows


@functools.lru_cache(maxsize=64)
def _page_rows(path: str, stamp: tuple, leaf: int, d: int) -> int | None:
    return page_rows(path, _open(path, stamp), leaf, d)


STREAM_BATCH_ROWS = 8192


def _read_slice(pf: pq.ParquetFile, groups: list[int], columns: list[str], skip: int, take: int) -> pa.Table:
    """Rows [skip, skip + take) of the given row groups. Row groups much larger than the slice (pyarrow's
    default is 1Mi rows: 3 GiB of 768-d float32) are streamed in batches, so memory stays near the slice."""
    total = sum(pf.metadata.row_group(g).num_rows for g in groups)
    if total <= 2 * take + STREAM_BATCH_ROWS:
        return pf.read_row_groups(groups, columns=columns, use_threads=False).slice(skip, take)
    batches, pos = [], 0
    for batch in pf.iter_batches(batch_size=STREAM_BATCH_ROWS, row_groups=groups, columns=columns, use_threads=False):
        end = pos + batch.num_rows
        if end > skip:
            a = max(skip - pos, 0)
            batches.append(batch.slice(a, min(end, skip + take) - pos - a))
        pos = end
        if pos >= skip + take:
            break
    return pa.Table.from_batches(batches)


@functools.lru_cache(maxsize=64)
def _leaf(path: str, stamp: tuple, column: str) -> int | None:
    return None if "://" in path else leaf_column(_open(path, stamp), column)


def _read_vectors_fast(shard: Shard, column: str, lo: int, hi: int, out: np.ndarray | None) -> np.ndarray | None:
    """Vectors through the page reader of _parquet_pages, or None where its fast path does not apply (then
    pyarrow reads them, and names any error)."""
    if FAST_PAGES and shard.d:
        leaf = _leaf(shard.path, shard.stamp, column)
        if leaf is not None:
            try:
                return read_rows(shard.path, _open(shard.path, shard.stamp), leaf, shard.extra, lo, hi, shard.d,
                                 out)
            except Unsupported as exc:
                log.debug("%s rows %d..%d: read with pyarrow (%s)", shard.path, lo, hi - 1, exc)
            except Exception as exc:  # noqa: BLE001 - pyarrow reads it instead, and words any error
                log.warning("%s rows %d..%d: the page reader failed (%r); reading with pyarrow", shard.path, lo,
                            hi - 1, exc)
    return None


TAKE_BUFFER_BYTES = 1 << 20


@functools.lru_cache(maxsize=16)
def _open_buffered(path: str, stamp: tuple) -> pq.ParquetFile:
    """A file opened with read buffering: without buffer_size pyarrow reads a whole column chunk before it
    decodes the first batch (3 GiB for a 1Mi-row row group of 768-d float32); with it, TAKE_BUFFER_BYTES at a time."""
    try:
        if "://" in path:
            import fsspec

            return pq.ParquetFile(fsspec.open(path, "rb").open(), pre_buffer=False, buffer_size=TAKE_BUFFER_BYTES)
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=TAKE_BUFFER_BYTES)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc}). Re-create or remove this shard.") from None


def take_rows(cfg: SourceConfig, shard: Shard, rows: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Vectors of the given shard rows (sorted, unique int64) for re-ranking: only the row groups that hold
    them are read, each once, streamed in batches through a read buffer, so memory stays near the rows taken
    and a batch, not the row group.

    Returns (len(rows), d) in the column's float dtype, and what was read: row groups and the compressed
    bytes of their vector column chunks."""
    pf = _open_buffered(shard.path, shard.stamp)
    offsets = np.asarray(shard.extra, np.int64)
    group_of = np.searchsorted(offsets, rows, side="right") - 1
    groups = [int(g) for g in np.unique(group_of)]
    md = pf.metadata
    leaves = [i for i in range(md.num_columns)
              if md.schema.column(i).path.split(".")[0] == cfg.vector_column]
    nbytes = sum(md.row_group(g).column(i).total_compressed_size for g in groups for i in leaves)
    # position of each row within the concatenation of the row groups read
    sizes = np.diff(offsets)[groups]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    pos = rows - offsets[group_of] + starts[np.searchsorted(groups, group_of)]
    parts, at = [], 0
    try:
        for batch in pf.iter_batches(batch_size=STREAM_BATCH_ROWS, row_groups=groups, columns=[cfg.vector_column],
                                     use_threads=False):
            end = at + batch.num_rows
            lo, hi = np.searchsorted(pos, [at, end])
            if hi > lo:
                parts.append(vectors_from_arrow(batch.column(0).take(pa.array(pos[lo:hi] - at)), shard.path,
                                                int(rows[lo])))
            at = end
            if hi == len(pos):
                break
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{shard.path}: cannot read row groups {groups[0]}..{groups[-1]}: {exc}. The file may be "
                         "truncated or corrupt.") from None
    x = np.concatenate(parts) if parts else np.zeros((0, shard.d or 0), np.float32)
    if x.shape[0] != len(rows):
        raise InputError(f"{shard.path}: expected rows up to {int(rows[-1])}, the file holds {at}. It changed "
                         "since it was listed.")
    return x, {"row_groups": len(groups), "bytes": int(nbytes)}
