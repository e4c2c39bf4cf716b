"""PostgreSQL <-> pqgpu: export a table (or query) to Parquet shards, and write PQ codes back.

`export_postgres` streams ``SELECT id, vector`` in id order, one binary ``COPY`` per shard (keyset
pagination: ``WHERE id > last ORDER BY id LIMIT rows_per_shard``), decodes the binary wire format with
NumPy (no per-value Python objects) and writes ``part-NNNNNN.parquet`` files that the parquet source
reads directly: the id column (int64 or string) and the vector column as ``fixed_size_list<float32>[d]``,
named as in the database. A JSON manifest (``_manifest.json``) records every finished shard with its
last id, so a re-run resumes after the last complete shard (and picks up rows appended since).
With ``postgres.query`` each shard re-runs the query wrapped as
``SELECT id, vec FROM (query) WHERE id > last ORDER BY id LIMIT n``: keep the query simple enough for
the planner to push the id condition down to an index, or use a larger rows_per_shard.
Supported vector columns: pgvector ``vector`` and ``halfvec``, ``real[]``, ``double precision[]`` and
``bytea`` holding little-endian float32.

`write_codes_postgres` reads the code store (``codes`` uint8 (n, code_size), ``ids`` (n,)) and writes
each row's code into a bytea column of the source table, matched by id, one
``COPY`` into a temporary table + ``UPDATE ... FROM`` per batch. Running it twice gives the same table.

psycopg 3 is imported lazily (``pip install 'pqgpu[postgres]'``). Identifiers are always composed with
``psycopg.sql.Identifier`` and values with ``psycopg.sql.Literal``; the DSN's password never appears in
logs or error messages (see `redact_dsn`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import parse_qsl, unquote, unquote_plus, urlencode, urlsplit, urlunsplit

import numpy as np

from ..config import PostgresConfig
from ..errors import ConfigError, InputError, PqgpuError, StoreError

__all__ = ["ExportResult", "export_postgres", "write_codes_postgres", "redact_dsn", "MANIFEST_NAME"]

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
MANIFEST_FORMAT = "pqgpu-postgres-export"
MANIFEST_VERSION = 1
_SHARD_RE = re.compile(r"^part-(\d{6,})\.parquet$")
_BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_INSTALL_HINT = "PostgreSQL support needs psycopg 3. Install it with: pip install 'pqgpu[postgres]'"


# --------------------------------------------------------------------------------------------------
# DSN redaction
# --------------------------------------------------------------------------------------------------

# key=value conninfo: password value up to the next "key=" (an unquoted value cannot hold a space, but a
# malformed one may, and libpq then echoes the fragments in its error message) or a quoted string.
_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|.*?)(?=\s+[A-Za-z_]+\s*=|\s*$)", re.S)
_URI_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/?#@]*):([^@/?#]*)@")


def redact_dsn(dsn: str | None) -> str:
    """`dsn` with any password replaced by ``***`` (URI userinfo, ``?password=``, or ``password=...``)."""
    if not dsn:
        return ""
    s = str(dsn)
    if re.match(r"^postgres(ql)?://", s, re.I):
        s = _URI_USERINFO.sub(r"\1:***@", s)
        try:
            parts = urlsplit(s)
            if parts.query:
                q = parse_qsl(parts.query, keep_blank_values=True)
                if any(k.lower() == "password" for k, _ in q):
                    q = [(k, "***" if k.lower() == "password" else v) for k, v in q]
                    s = urlunsplit(parts._replace(query=urlencode(q, safe="*/:@")))
        except ValueError:
            s = re.sub(r"([?&]password=)[^&#]*", r"\1***", s, flags=re.I)
        return s
    return _KV_PASSWORD.sub(lambda m: m.group(1) + "***", s)


def _secrets(dsn: str | None) -> list[str]:
    """Password strings (and their fragments) that must never be shown, longest first."""
    if not dsn:
        return []
    out: set[str] = set()
    s = str(dsn)
    m = _URI_USERINFO.match(s)
    if m and m.group(2):
        out.add(m.group(2))
        out.add(unquote(m.group(2)))
    for qm in re.finditer(r"[?&]password=([^&#]*)", s, re.I):
        if qm.group(1):
            out.add(qm.group(1))
            out.add(unquote_plus(qm.group(1)))
    for km in _KV_PASSWORD.finditer(s):
        v = km.group(2).strip()
        if v:
            out.add(v)
            if v.startswith("'") and v.endswith("'") and len(v) >= 2:
                v = v[1:-1].replace("\\'", "'").replace("\\\\", "\\")
                out.add(v)
            out.update(p for p in re.split(r"[\s'\"]+", v) if len(p) >= 2)
    return sorted((x for x in out if x), key=len, reverse=True)


def _scrub(text: str, dsn: str | None) -> str:
    for secret in _secrets(dsn):
        text = text.replace(secret, "***")
    return text


# --------------------------------------------------------------------------------------------------
# psycopg plumbing
# --------------------------------------------------------------------------------------------------


def _psycopg():
    try:
        import psycopg
        from psycopg import sql  # noqa: F401
    except ImportError:
        raise PqgpuError(_INSTALL_HINT) from None
    return psycopg


def _pg_message(exc: BaseException, dsn: str | None) -> str:
    """The server's primary message (and detail) when there is one, else psycopg's text; scrubbed, one line."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    if primary:
        detail = getattr(diag, "message_detail", None)
        msg = f"{primary} ({detail})" if detail else primary
    else:
        msg = str(exc).strip() or type(exc).__name__
    msg = " ".join(msg.split()).rstrip(".")
    return _scrub(msg, dsn)


def _connect(dsn: str, *, autocommit: bool):
    psycopg = _psycopg()
    err: str | None = None
    try:
        return psycopg.connect(dsn, autocommit=autocommit, application_name="pqgpu")
    except psycopg.Error as exc:  # includes malformed DSNs (ProgrammingError)
        err = _pg_message(exc, dsn)
    # Raised outside the except block so no chained exception (which could hold the DSN) is attached.
    raise PqgpuError(
        f"Cannot connect to PostgreSQL at {redact_dsn(dsn)}: {err.rstrip('?')}. Check postgres.dsn (or PQGPU_PG_DSN): "
        "host, port, database, user and password, and that the server accepts connections."
    )


class _Failure(Exception):
    """Carries a scrubbed psycopg error out of an except block (so no context is chained)."""

    def __init__(self, kind: str, message: str, sqlstate: str | None):
        super().__init__(message)
        self.kind, self.message, self.sqlstate = kind, message, sqlstate


def _run_pg(fn: Callable[[], Any], dsn: str, what: str) -> Any:
    """Run `fn`, turning psycopg errors into pqgpu errors whose text cannot hold the password."""
    psycopg = _psycopg()
    failure: _Failure | None = None
    try:
        return fn()
    except psycopg.Error as exc:
        failure = _Failure(type(exc).__name__, _pg_message(exc, dsn), getattr(exc, "sqlstate", None))
    state = failure.sqlstate or ""
    text = f"PostgreSQL error while {what} ({redact_dsn(dsn)}): {failure.message}"
    if state in ("42P01", "42703", "42883", "42804", "22P02", "42601", "3F000"):
        # undefined table / column / function, datatype mismatch, bad literal, syntax, schema
        raise InputError(text + ". Check postgres.table / postgres.query and the column names in the config.")
    if state.startswith("08") or state == "57P01":
        raise PqgpuError(text + ". The connection to the server was lost; re-run to resume.")
    raise PqgpuError(text)


def _split_table(name: str) -> list[str]:
    """'schema.table' -> ['schema', 'table']; double-quoted parts may contain dots ('"a.b".c')."""
    parts, cur, quoted, i = [], [], False, 0
    s = name.strip()
    while i < len(s):
        ch = s[i]
        if quoted:
            if ch == '"':
                if i + 1 < len(s) and s[i + 1] == '"':
                    cur.append('"')
                    i += 1
                else:
                    quoted = False
            else:
                cur.append(ch)
        elif ch == '"':
            quoted = True
        elif ch == ".":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    if quoted or any(p == "" for p in parts) or len(parts) > 3:
        raise ConfigError(
            f"postgres.table: cannot parse {name!r}. Give 'table' or 'schema.table'; double-quote a part "
            "that contains a dot, e.g. 'public.\"my.table\"'."
        )
    return parts


# --------------------------------------------------------------------------------------------------
# Binary wire formats of the supported vector types
# --------------------------------------------------------------------------------------------------


class _Codec:
    """Decoder of one vector type's binary send format (the payload of one COPY field)."""

    name = ""
    header = 0

    def __init__(self, name: str = "", elem: str = "<f4"):
        self.name, self.elem, self.itemsize = name, elem, np.dtype(elem).itemsize

    def dim(self, payload: memoryview) -> int:
        """Dimension of one payload; raises ValueError (with a reason) when the payload is unusable."""
        raise NotImplementedError

    def payload_len(self, d: int) -> int:
        raise NotImplementedError

    def dtype(self, d: int) -> np.dtype:
        raise NotImplementedError

    def check(self, rec: np.ndarray, d: int) -> np.ndarray | None:
        """Bool mask of payloads that are valid (None: all valid)."""
        return None

    def values(self, rec: np.ndarray) -> np.ndarray:
        return rec["v"]


class _PgVector(_Codec):
    def dim(self, payload):
        if len(payload) < 4:
            raise ValueError(f"malformed {self.name} value ({len(payload)} bytes)")
        d = int.from_bytes(payload[0:2], "big", signed=True)
        if d <= 0 or len(payload) != 4 + self.itemsize * d:
            raise ValueError(f"malformed {self.name} value (dimension {d}, {len(payload)} bytes)")
        return d

    def payload_len(self, d):
        return 4 + self.itemsize * d

    def dtype(self, d):
        return np.dtype([("dim", ">i2"), ("unused", ">i2"), ("v", self.elem, (d,))])

    def check(self, rec, d):
        return rec["dim"] == d


class _PgArray(_Codec):
    def dim(self, payload):
        if len(payload) < 12:
            raise ValueError(f"malformed {self.name} value ({len(payload)} bytes)")
        ndim = int.from_bytes(payload[0:4], "big", signed=True)
        if ndim == 0:
            raise ValueError("the array is empty")
        if ndim != 1:
            raise ValueError(f"the array has {ndim} dimensions; a vector needs a one-dimensional array")
        if int.from_bytes(payload[4:8], "big", signed=True) != 0:
            raise ValueError("the array contains NULL elements")
        n = int.from_bytes(payload[12:16], "big", signed=True)
        if n <= 0 or len(payload) != 20 + (4 + self.itemsize) * n:
            raise ValueError(f"malformed {self.name} value ({n} elements, {len(payload)} bytes)")
        return n

    def payload_len(self, d):
        return 20 + (4 + self.itemsize) * d

    def dtype(self, d):
        elem = np.dtype([("len", ">i4"), ("v", self.elem)])
        return np.dtype([("ndim", ">i4"), ("hasnull", ">i4"), ("elemtype", ">u4"), ("n", ">i4"),
                         ("lbound", ">i4"), ("e", elem, (d,))])

    def check(self, rec, d):
        ok = (rec["ndim"] == 1) & (rec["n"] == d) & (rec["hasnull"] == 0)
        return ok & (rec["e"]["len"] == self.itemsize).all(axis=1)

    def values(self, rec):
        return rec["e"]["v"]


class _PgBytea(_Codec):
    name = "bytea"

    def dim(self, payload):
        n = len(payload)
        if n == 0:
            raise ValueError("the bytea value is empty")
        if n % 4:
            raise ValueError(f"the bytea value has {n} bytes, not a multiple of 4 (little-endian float32)")
        return n // 4

    def payload_len(self, d):
        return 4 * d

    def dtype(self, d):
        return np.dtype([("v", "<f4", (d,))])


_CODECS: dict[str, _Codec] = {
    "vector": _PgVector("vector", ">f4"),
    "halfvec": _PgVector("halfvec", ">f2"),
    "_float4": _PgArray("real[]", ">f4"),
    "_float8": _PgArray("double precision[]", ">f8"),
    "bytea": _PgBytea("bytea", "<f4"),
}
_ID_KINDS = {"int2": ">i2", "int4": ">i4", "int8": ">i8", "text": None, "varchar": None, "bpchar": None}


# --------------------------------------------------------------------------------------------------
# Streaming parser of one binary COPY (one shard)
# --------------------------------------------------------------------------------------------------



class _Block:
    """A reusable buffer of up to `rows` vectors (float32) and their ids, written as one row group."""

    __slots__ = ("vecs", "ids", "n")

    def __init__(self, rows: int, d: int, string_ids: bool):
        self.vecs = np.empty((rows, d), dtype=np.float32)
        self.ids: Any = [] if string_ids else np.empty(rows, dtype=np.int64)
        self.n = 0


class _ShardWriter:
    """Background thread writing blocks as Parquet row groups, one shard file at a time.

    Messages are processed in order; block buffers come from a small pool and go back to it once
    written, so memory is bounded by the pool (not by the shard size) and the parser blocks (instead of
    growing memory) when the writer falls behind.
    """

    def __init__(self, *, d: int, block_rows: int, string_ids: bool, id_col: str, vec_col: str, pool: int = 4):
        import pyarrow as pa

        self.d, self.block_rows, self.string_ids, self.pool_size = d, block_rows, string_ids, pool
        self.schema = pa.schema([pa.field(id_col, pa.string() if string_ids else pa.int64(), nullable=False),
                                 pa.field(vec_col, pa.list_(pa.float32(), d), nullable=False)])
        self.id_col = id_col
        self.free: queue.Queue[_Block] = queue.Queue()
        self.made = 0
        self.q: queue.Queue = queue.Queue()
        self.err: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="pqgpu-pg-writer", daemon=True)
        self.thread.start()

    # -- main-thread side --------------------------------------------------------------------------
    def check(self) -> None:
        if self.err is not None:
            raise self.err

    def get_block(self) -> _Block:
        self.check()
        try:
            return self.free.get_nowait()
        except queue.Empty:
            pass
        if self.made < self.pool_size:
            self.made += 1
            return _Block(self.block_rows, self.d, self.string_ids)
        while True:
            try:
                return self.free.get(timeout=0.5)
            except queue.Empty:
                self.check()

    def put_block(self, shard: dict, block: _Block) -> None:
        self.check()
        self.q.put(("block", shard, block))

    def close_shard(self, shard: dict) -> Future:
        fut: Future = Future()
        self.q.put(("close", shard, fut))
        return fut

    def abort_shard(self, shard: dict) -> None:
        self.q.put(("abort", shard, None))

    def stop(self) -> None:
        self.q.put(None)
        self.thread.join()

    # -- writer thread -----------------------------------------------------------------------------
    def recycle(self, block: _Block) -> None:
        block.n = 0
        if self.string_ids:
            block.ids = []
        self.free.put(block)

    def _run(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        while True:
            item = self.q.get()
            if item is None:
                break
            kind, shard, arg = item
            try:
                if self.err is not None:
                    raise self.err
                if kind == "block":
                    block: _Block = arg
                    if writer is None:
                        writer = pq.ParquetWriter(shard["tmp"], self.schema, compression="snappy",
                                                  use_dictionary=[self.id_col], write_statistics=[self.id_col])
                    n = block.n
                    ids = pa.array(block.ids, type=pa.string()) if self.string_ids else pa.array(block.ids[:n])
                    vecs = pa.FixedSizeListArray.from_arrays(pa.array(block.vecs[:n].reshape(-1)), self.d)
                    table = pa.Table.from_arrays([ids, vecs], schema=self.schema)
                    writer.write_table(table, row_group_size=max(n, 1))
                    del table, ids, vecs
                elif kind == "close":
                    if writer is not None:
                        writer.close()
                        writer = None
                    fd = os.open(shard["tmp"], os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.replace(shard["tmp"], shard["final"])
                    arg.set_result(None)
                elif kind == "abort":
                    writer = _discard(writer, shard["tmp"])
            except BaseException as exc:  # keep consuming so the main thread never blocks on the pool
                if self.err is None:
                    self.err = exc
                    if isinstance(exc, (OSError, pa.ArrowException)):
                        self.err = StoreError(f"{shard['final']}: cannot write the Parquet shard ({exc}). Check "
                                              "the free space and permissions of postgres.output, then re-run "
                                              "to resume.")
                writer = _discard(writer, shard["tmp"])
                if kind == "close" and not arg.done():
                    arg.set_exception(exc)
            finally:
                if kind == "block":
                    self.recycle(arg)


def _discard(writer, tmp: str) -> None:
    """Close a half-written shard's writer (errors ignored: the file is being thrown away) and delete it."""
    if writer is not None:
        try:
            writer.close()
        except Exception:
            pass
    _unlink(tmp)
    return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class _Page:
    """Parses one ``COPY (SELECT id, vec ...) TO STDOUT (FORMAT BINARY)`` stream (one shard).

    Rows of fixed size (integer id, non-NULL vector of the expected dimension) are decoded in windows
    with one NumPy structured view; anything else (NULL vector, text id, wrong dimension, trailer) goes
    through the per-row path, which also produces the precise errors. Decoded rows fill `_Block`s that
    are handed to `emit` when full (and by `flush` at the end).
    """

    MAX_WINDOW = 2048

    def __init__(self, *, id_type: str, codec: _Codec, d: int | None, limit: int, strict: bool, where: str,
                 new_block: Callable[[int], _Block], emit: Callable[[_Block], None],
                 release: Callable[[_Block], None]):
        self.id_fmt = _ID_KINDS[id_type]
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
        self.header_seen = False
        self.window = 64
        self.block: _Block | None = None
        if d is not None:
            self._setup(d)

    def _setup(self, d: int) -> None:
        self.d = d
        if self.id_fmt is not None:
            self.row_dtype = np.dtype([("nf", ">i2"), ("l1", ">i4"), ("id", self.id_fmt), ("l2", ">i4"),
                                       ("p", self.codec.dtype(d))])
            self.idw = np.dtype(self.id_fmt).itemsize
            self.plen = self.codec.payload_len(d)

    def _room(self) -> _Block:
        b = self.block
        if b is None:
            b = self.block = self.new_block(self.d)
        elif b.n == len(b.vecs):
            self.emit(b)
            b = self.block = self.new_block(self.d)
        return b

    def flush(self) -> None:
        """Hand the last, partly filled block to `emit` (an empty one goes back to the pool)."""
        b, self.block = self.block, None
        if b is not None:
            (self.emit if b.n else self.release)(b)

    def discard(self) -> None:
        b, self.block = self.block, None
        if b is not None:
            self.release(b)

    # -- feeding ---------------------------------------------------------------------------------
    def feed(self, buf: bytes) -> int:
        """Consume as many complete rows of `buf` as possible; returns the number of bytes consumed."""
        mv = memoryview(buf)
        pos = 0
        if not self.header_seen:
            if len(buf) < 19:
                return 0
            if bytes(mv[:11]) != _BINARY_SIGNATURE:
                raise PqgpuError("unexpected COPY stream from the server (no binary signature)")
            ext = int.from_bytes(mv[15:19], "big")
            if len(buf) < 19 + ext:
                return 0
            pos = 19 + ext
            self.header_seen = True
        n = len(buf)
        while not self.done and pos < n:
            if self.id_fmt is not None and self.d is not None:
                S = self.row_dtype.itemsize
                b = self._room()
                m = min((n - pos) // S, self.window, len(b.vecs) - b.n)
                if m > 0:
                    rec = np.frombuffer(buf, dtype=self.row_dtype, count=m, offset=pos)
                    ok = (rec["nf"] == 2) & (rec["l1"] == self.idw) & (rec["l2"] == self.plen)
                    extra = self.codec.check(rec["p"], self.d)
                    if extra is not None:
                        ok &= extra
                    good = m if bool(ok.all()) else int(np.argmin(ok))
                    if good:
                        self._store(b, rec[:good])
                        pos += good * S
                    if good == m:
                        self.window = min(self.window * 2, self.MAX_WINDOW)
                        continue
                    self.window = 16
            new = self._row(mv, pos)
            if new is None:
                break
            pos = new
        return pos

    def _store(self, b: _Block, rec: np.ndarray) -> None:
        k, m = b.n, len(rec)
        if self.n + m > self.limit:
            raise PqgpuError(f"{self.where}: the server returned more rows than requested")
        ids = rec["id"]
        dst = b.ids[k:k + m]
        dst[...] = ids
        first = int(dst[0])
        if (self.prev_id is not None and first <= self.prev_id) or (m > 1 and not bool((dst[1:] > dst[:-1]).all())):
            self._duplicate()
        b.vecs[k:k + m] = self.codec.values(rec["p"])
        b.n += m
        if self.first_id is None:
            self.first_id = first
        self.last_id = self.prev_id = int(dst[-1])
        self.n += m
        self.scanned += m

    def _duplicate(self) -> None:
        raise InputError(f"{self.where}: the id column has duplicate values (or the server did not return "
                         "rows in id order); ids must be unique.")

    def _row(self, mv: memoryview, pos: int) -> int | None:
        """Parse one row at `pos` the slow way; None when the row is not complete in `mv` yet."""
        n = len(mv)
        if pos + 2 > n:
            return None
        nf = int.from_bytes(mv[pos:pos + 2], "big", signed=True)
        if nf == -1:
            self.done = True
            return pos + 2
        if nf != 2:
            raise PqgpuError(f"{self.where}: unexpected COPY row with {nf} fields")
        p = pos + 2
        if p + 4 > n:
            return None
        l1 = int.from_bytes(mv[p:p + 4], "big", signed=True)
        p += 4
        if l1 < 0:
            raise InputError(f"{self.where}: a row has a NULL id. Every row needs an id.")
        if p + l1 + 4 > n:
            return None
        raw_id = mv[p:p + l1]
        p += l1
        l2 = int.from_bytes(mv[p:p + 4], "big", signed=True)
        p += 4
        if l2 > 0 and p + l2 > n:
            return None
        if self.id_fmt is None:
            row_id: Any = bytes(raw_id).decode("utf-8")
        else:
            row_id = int.from_bytes(raw_id, "big", signed=True)
        if self.scanned >= self.limit:
            raise PqgpuError(f"{self.where}: the server returned more rows than requested")
        if self.first_id is None:
            self.first_id = row_id
        self.last_id = row_id
        self.scanned += 1
        if l2 < 0:
            self.null_vectors += 1
            if self.first_null_id is None:
                self.first_null_id = row_id
            if self.strict:
                raise InputError(
                    f"{self.where}: the vector of id {row_id!r} is NULL. Fill it, filter such rows out with "
                    "postgres.query, or run without strict mode to skip NULL vectors."
                )
            return p
        payload = mv[p:p + l2]
        try:
            d = self.codec.dim(payload)
        except ValueError as exc:
            raise InputError(f"{self.where}: id {row_id!r}: {exc}. Fix or remove that row.") from None
        if self.d is None:
            self._setup(d)
        elif d != self.d:
            raise InputError(
                f"{self.where}: id {row_id!r} has a vector of dimension {d}, but the dimension is {self.d} "
                "(fixed by the first non-NULL row). All vectors must have the same dimension."
            )
        rec = np.frombuffer(payload, dtype=self.codec.dtype(d), count=1)
        ok = self.codec.check(rec, d)
        if ok is not None and not bool(ok[0]):
            raise InputError(f"{self.where}: id {row_id!r}: malformed {self.codec.name} value")
        if self.prev_id is not None and (row_id == self.prev_id if self.id_fmt is None else row_id <= self.prev_id):
            self._duplicate()
        self.prev_id = row_id
        b = self._room()
        b.vecs[b.n] = self.codec.values(rec)[0]
        if self.id_fmt is None:
            b.ids.append(row_id)
        else:
            b.ids[b.n] = row_id
        b.n += 1
        self.n += 1
        return p + l2


def _copy_into(conn, stmt, page: _Page, chunk_bytes: int = 1 << 20) -> None:
    """Run a binary COPY TO STDOUT and feed its bytes into `page` in chunks of about `chunk_bytes`."""
    buf = b""
    parts: list = []
    size = 0
    with conn.cursor() as cur, cur.copy(stmt) as cp:
        read = cp.read
        while True:
            data = read()
            if data:
                parts.append(data)
                size += len(data)
                if size < chunk_bytes:
                    continue
            if parts:
                if buf:
                    parts.insert(0, buf)
                buf = b"".join(parts)
                parts, size = [], 0
            if buf:
                used = page.feed(buf)
                buf = buf[used:] if used < len(buf) else b""
            if not data:
                break
    if buf or not page.done:
        raise PqgpuError(f"{page.where}: the COPY stream from the server ended early or was malformed")


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    """What `export_postgres` did. Counts cover the whole export (all runs), `new_*` only this call."""

    output: str
    manifest: str
    files: tuple[str, ...]
    rows: int
    new_rows: int
    new_files: int
    null_vectors: int
    null_ids: int
    d: int | None
    id_type: str  # "int64" | "string"
    vector_type: str  # vector | halfvec | real[] | double precision[] | bytea
    resumed: bool
    seconds: float


def _source_desc(pg: PostgresConfig) -> dict[str, Any]:
    query = pg.query.strip().rstrip(";").strip() if pg.query else None
    return {"table": None if query else pg.table, "query": query,
            "id_column": pg.id_column, "vector_column": pg.vector_column}


def _src_sql(pg: PostgresConfig):
    from psycopg import sql

    if pg.query:
        q = pg.query.strip().rstrip(";").strip()
        if not q:
            raise ConfigError("postgres.query is empty. Give a SELECT statement or use postgres.table.")
        return sql.SQL("({}) AS _pqgpu_src").format(sql.SQL(q))
    if not pg.table:
        raise ConfigError("postgres: set either postgres.table or postgres.query.")
    return sql.Identifier(*_split_table(pg.table))


def _what(pg: PostgresConfig) -> str:
    return "postgres.query" if pg.query else f"table {pg.table!r}"


def _write_json_atomic(path: str, data: dict) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _read_manifest(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: cannot read the export manifest ({exc}). Delete the output directory "
                         "to start the export again.") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("shards"), list):
        raise StoreError(f"{path} is not a pqgpu PostgreSQL export manifest. Choose another postgres.output.")
    if m.get("version") != MANIFEST_VERSION:
        raise StoreError(f"{path}: manifest version {m.get('version')} is not supported (expected "
                         f"{MANIFEST_VERSION}). Delete the output directory to export again.")
    return m


def _block_rows(d: int, limit: int) -> int:
    """Rows per row group / block: about 16 MiB of float32, at least 256 rows, at most the shard."""
    return max(1, min(limit, max(256, (16 << 20) // (4 * max(d, 1)))))


def export_postgres(pg: PostgresConfig, *, strict: bool = False,
                    progress: Callable[[int], None] | None = None) -> ExportResult:
    """Export `pg.table` (or the rows of `pg.query`) to Parquet shards in `pg.output`.

    Rows are read in id order, `pg.rows_per_shard` rows per shard (one binary COPY each), decoded with
    NumPy and written by a background thread, one Parquet row group per ~16 MiB block; memory stays
    bounded by a few blocks. A re-run resumes after the last shard recorded in
    ``<output>/_manifest.json`` (and exports rows with larger ids added since). NULL vectors and NULL
    ids are skipped with a warning (``strict=True``: InputError naming the id). `progress(n)` is called
    with the number of vectors of each shard once that shard is safely on disk.
    """
    if pg.rows_per_shard <= 0:
        raise ConfigError(f"postgres.rows_per_shard: expected a positive integer. Got {pg.rows_per_shard}.")
    if not pg.output:
        raise ConfigError("postgres.output is empty. Give the directory that receives the Parquet shards.")
    _psycopg()
    from psycopg import sql

    t0 = time.perf_counter()
    dsn = pg.resolved_dsn()
    src = _src_sql(pg)
    what = _what(pg)
    out_dir = os.path.abspath(pg.output)
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    desc = _source_desc(pg)
    idc, vecc = sql.Identifier(pg.id_column), sql.Identifier(pg.vector_column)

    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"postgres.output: cannot create {out_dir} ({exc.strerror}).") from None
    manifest = _read_manifest(manifest_path)
    if manifest is None:
        strays = sorted(f for f in os.listdir(out_dir) if _SHARD_RE.match(f))
        if strays:
            raise StoreError(
                f"{out_dir} already holds Parquet shards ({', '.join(strays[:3])}, ...) but no {MANIFEST_NAME}, "
                "so they cannot be resumed safely. Delete them or choose another postgres.output."
            )
    elif manifest.get("source") != desc:
        raise StoreError(
            f"{manifest_path} records an export of {manifest.get('source')}, not of {desc}. Choose another "
            "postgres.output, or delete that directory to export again."
        )

    log.info("Exporting %s from %s to %s", what, redact_dsn(dsn), out_dir)
    conn = _connect(dsn, autocommit=True)
    writer: _ShardWriter | None = None
    try:
        # -- column types ------------------------------------------------------------------------
        def probe():
            with conn.cursor() as cur:
                cur.execute(sql.SQL("SELECT {}, {} FROM {} LIMIT 0").format(idc, vecc, src))
                oids = [c.type_code for c in cur.description]
                cur.execute("SELECT oid::int8, typname FROM pg_type WHERE oid = ANY(%s)", (oids,))
                names = dict(cur.fetchall())
            return [names.get(o, str(o)) for o in oids]

        id_pg, vec_pg = _run_pg(probe, dsn, f"reading the columns of {what}")
        if id_pg not in _ID_KINDS:
            raise InputError(
                f"{what}: id column {pg.id_column!r} has type {id_pg}; supported: smallint, integer, bigint, "
                "text, varchar. Cast it in postgres.query, e.g. SELECT id::bigint AS id, ..."
            )
        if vec_pg not in _CODECS:
            raise InputError(
                f"{what}: vector column {pg.vector_column!r} has type {vec_pg}; supported: vector, halfvec "
                "(pgvector), real[], double precision[], bytea (little-endian float32)."
            )
        codec = _CODECS[vec_pg]
        string_ids = _ID_KINDS[id_pg] is None
        id_type = "string" if string_ids else "int64"

        # -- resume state ------------------------------------------------------------------------
        resumed = manifest is not None
        if manifest is None:
            manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "source": desc,
                        "id_type": id_type, "vector_type": codec.name, "d": None, "rows": 0,
                        "null_vectors": 0, "null_ids": 0, "resume_after": None, "complete": False,
                        "shards": []}
        elif manifest.get("id_type") != id_type or manifest.get("vector_type") != codec.name:
            raise StoreError(
                f"{manifest_path}: the export was started with id type {manifest.get('id_type')} and vector "
                f"type {manifest.get('vector_type')}; the source now has {id_type} and {codec.name}. Delete "
                "the output directory to export again."
            )
        shards: list[dict] = manifest["shards"]
        _cleanup_strays(out_dir, len(shards))
        manifest["complete"] = False
        _write_json_atomic(manifest_path, manifest)
        last_id = manifest.get("resume_after")
        d: int | None = manifest.get("d")
        if resumed:
            log.info("Resuming the export into %s after id %r (%d shards, %d rows done)", out_dir, last_id,
                     len(shards), manifest.get("rows", 0))

        # -- NULL ids ------------------------------------------------------------------------------
        def count_null_ids():
            with conn.cursor() as cur:
                if not pg.query:
                    cur.execute("SELECT a.attnotnull FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) "
                                "AND a.attname = %s AND NOT a.attisdropped", (src.as_string(conn), pg.id_column))
                    row = cur.fetchone()
                    if row and row[0]:
                        return 0
                cur.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(src, idc))
                return int(cur.fetchone()[0])

        null_ids = _run_pg(count_null_ids, dsn, f"counting NULL ids in {what}")
        if null_ids:
            if strict:
                raise InputError(f"{what}: {null_ids} row(s) have a NULL id in column {pg.id_column!r}. Give "
                                 "every row an id, or filter them out with postgres.query.")
            log.warning("%s: skipping %d row(s) whose id (%s) is NULL", what, null_ids, pg.id_column)
        manifest["null_ids"] = null_ids

        # -- shards --------------------------------------------------------------------------------
        limit = pg.rows_per_shard
        new_rows = new_files = new_nulls = 0
        first_null_id: Any = None
        pending: tuple[Future, dict, _Page] | None = None

        def record(entry: dict | None, page: _Page) -> None:
            if entry is not None:
                shards.append(entry)
                manifest["rows"] = int(manifest.get("rows", 0)) + entry["rows"]
            manifest["null_vectors"] = int(manifest.get("null_vectors", 0)) + page.null_vectors
            manifest["resume_after"] = page.last_id
            manifest["d"] = page.d
            _write_json_atomic(manifest_path, manifest)

        def finish(job: tuple[Future, dict, _Page]) -> None:
            nonlocal new_rows, new_files
            fut, entry, page = job
            fut.result()
            record(entry, page)
            new_rows += entry["rows"]
            new_files += 1
            log.debug("Wrote %s: %d rows, ids %r..%r", entry["file"], entry["rows"], entry["first_id"],
                      entry["last_id"])
            if progress is not None:
                progress(entry["rows"])

        def new_block(dim: int) -> _Block:
            nonlocal writer
            if writer is None:
                writer = _ShardWriter(d=dim, block_rows=_block_rows(dim, limit), string_ids=string_ids,
                                      id_col=pg.id_column, vec_col=pg.vector_column)
            return writer.get_block()

        page: _Page | None = None
        shard: dict | None = None
        try:
            while True:
                idx = len(shards) + (1 if pending is not None else 0)
                name = f"part-{idx:06d}.parquet"
                shard = {"final": os.path.join(out_dir, name),
                         "tmp": os.path.join(out_dir, f".{name}.tmp-{os.getpid()}")}
                cond = (sql.SQL("{} IS NOT NULL").format(idc) if last_id is None
                        else sql.SQL("{} > {}").format(idc, sql.Literal(last_id)))
                stmt = sql.SQL("COPY (SELECT {id}, {vec} FROM {src} WHERE {cond} ORDER BY {id} LIMIT {n}) "
                               "TO STDOUT (FORMAT BINARY)").format(id=idc, vec=vecc, src=src, cond=cond,
                                                                   n=sql.Literal(limit))
                page = _Page(id_type=id_pg, codec=codec, d=d, limit=limit, strict=strict,
                             where=f"{what}, column {pg.vector_column!r}", new_block=new_block,
                             emit=lambda b, s=shard: writer.put_block(s, b),
                             release=lambda b: writer.recycle(b))
                if last_id is not None:
                    page.prev_id = last_id if not string_ids else None
                _run_pg(lambda: _copy_into(conn, stmt, page), dsn, f"exporting {what}")
                page.flush()
                if pending is not None:
                    job, pending = pending, None
                    finish(job)
                if page.null_vectors:
                    new_nulls += page.null_vectors
                    if first_null_id is None:
                        first_null_id = page.first_null_id
                if page.scanned == 0:
                    break
                d = page.d if page.d is not None else d
                if page.n:
                    entry = {"file": name, "rows": page.n, "null_vectors": page.null_vectors,
                             "first_id": page.first_id, "last_id": page.last_id}
                    pending = (writer.close_shard(shard), entry, page)
                else:  # every row of this page had a NULL vector: no file, but move on
                    record(None, page)
                shard = None
                last_id = page.last_id
                if page.scanned < limit:
                    break
            if pending is not None:
                job, pending = pending, None
                finish(job)
        finally:
            if writer is not None:
                if shard is not None:  # interrupted inside a page: drop its partial file
                    if page is not None:
                        page.discard()
                    writer.abort_shard(shard)
                writer.stop()
        if writer is not None:
            writer.check()
        manifest["complete"] = True
        _write_json_atomic(manifest_path, manifest)
    finally:
        conn.close()

    total_nulls = int(manifest.get("null_vectors", 0))
    if new_nulls:
        log.warning("%s: skipped %d row(s) whose %s is NULL (first: id %r); %d skipped in all", what, new_nulls,
                    pg.vector_column, first_null_id, total_nulls)
    files = tuple(os.path.join(out_dir, s["file"]) for s in shards)
    res = ExportResult(output=out_dir, manifest=manifest_path, files=files, rows=int(manifest["rows"]),
                       new_rows=new_rows, new_files=new_files, null_vectors=total_nulls, null_ids=null_ids,
                       d=manifest.get("d"), id_type=id_type, vector_type=codec.name, resumed=resumed,
                       seconds=time.perf_counter() - t0)
    log.info("Exported %d new rows in %d new shard(s) to %s (%d rows in %d shards, d=%s) in %.1f s",
             new_rows, new_files, out_dir, res.rows, len(files), res.d, res.seconds)
    return res


def _cleanup_strays(out_dir: str, n_shards: int) -> None:
    """Remove temp files and shards beyond the manifest (left by an interrupted run)."""
    for f in os.listdir(out_dir):
        m = _SHARD_RE.match(f)
        stray_tmp = f.startswith(".part-") and ".parquet.tmp-" in f
        if stray_tmp or (m and int(m.group(1)) >= n_shards):
            try:
                os.unlink(os.path.join(out_dir, f))
                log.debug("Removed %s left by an interrupted export", f)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------------
# Write codes back
# --------------------------------------------------------------------------------------------------


def _iter_store(store_path: str, batch_rows: int) -> Iterator[tuple[np.ndarray, Any]]:
    import zarr

    try:
        g = zarr.open_group(store_path, mode="r")
        codes, ids = g["codes"], g["ids"]
    except Exception as exc:  # zarr raises various errors for missing/invalid stores
        raise StoreError(f"{store_path}: cannot open the code store ({type(exc).__name__}: {exc}). Give the "
                         "encode.output of a finished `pqgpu encode`.") from None
    if len(codes.shape) != 2 or codes.dtype != np.uint8 or len(ids.shape) != 1 or ids.shape[0] != codes.shape[0]:
        raise StoreError(f"{store_path}: expected codes uint8 (n, code_size) and ids (n,); found codes "
                         f"{codes.dtype} {codes.shape} and ids {ids.dtype} {ids.shape}.")
    if "done" in g:
        done = np.asarray(g["done"][...], dtype=bool)
        if not done.all():
            raise StoreError(f"{store_path}: {int((~done).sum())} of {done.size} chunks are not encoded yet. "
                             "Finish `pqgpu encode` first, then write the codes.")
    n = codes.shape[0]
    for s in range(0, n, batch_rows):
        e = min(n, s + batch_rows)
        yield np.ascontiguousarray(codes[s:e]), np.asarray(ids[s:e])


def write_codes_postgres(pg: PostgresConfig, store_path: str, *, batch_rows: int | None = None,
                         progress: Callable[[int], None] | None = None) -> int:
    """Write each store row's code into ``pg.codes_column`` (bytea) of ``pg.table``, matched by id.

    The column is added when missing. Each batch of `batch_rows` (default ``pg.batch_rows``) is one
    transaction: COPY into a temporary table, then one ``UPDATE ... FROM`` that touches only rows whose
    code differs, so a re-run (or a resume after an interruption) is idempotent and cheap. Returns the
    number of table rows that hold the store's codes (ids found in the table); store ids missing from the
    table are counted and reported with a warning. `progress(n)` is called after each batch with its size.
    """
    if pg.query:
        raise ConfigError("write-codes-postgres needs postgres.table (the table that receives the codes); "
                          "it cannot write into the result of postgres.query. Set postgres.table and remove "
                          "postgres.query.")
    if not pg.table:
        raise ConfigError("postgres.table is not set. Name the table that receives the codes.")
    batch = int(batch_rows if batch_rows is not None else pg.batch_rows)
    if batch <= 0:
        raise ConfigError(f"postgres.batch_rows: expected a positive integer. Got {batch}.")
    psycopg = _psycopg()
    from psycopg import sql

    dsn = pg.resolved_dsn()
    table = sql.Identifier(*_split_table(pg.table))
    idc, codec_ = sql.Identifier(pg.id_column), sql.Identifier(pg.codes_column)
    what = f"table {pg.table!r}"
    batches = _iter_store(store_path, batch)  # opens and checks the store before connecting
    first = next(batches, None)
    conn = _connect(dsn, autocommit=False)
    updated = missing = 0
    t0 = time.perf_counter()
    try:
        def prepare():
            with conn.cursor() as cur:
                cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} bytea").format(table, codec_))
                cur.execute(sql.SQL("SELECT {}, {} FROM {} LIMIT 0").format(idc, codec_, table))
                oids = [c.type_code for c in cur.description]
                cur.execute("SELECT oid::int8, typname FROM pg_type WHERE oid = ANY(%s)", (oids,))
                names = dict(cur.fetchall())
            conn.commit()
            return [names.get(o, str(o)) for o in oids]

        id_pg, code_pg = _run_pg(prepare, dsn, f"preparing {what}")
        if code_pg != "bytea":
            raise InputError(f"{what}: column {pg.codes_column!r} exists with type {code_pg}; the codes need a "
                             "bytea column. Choose another postgres.codes_column or drop that column.")
        if id_pg not in _ID_KINDS:
            raise InputError(f"{what}: id column {pg.id_column!r} has unsupported type {id_pg}.")
        text_ids = _ID_KINDS[id_pg] is None
        tmp = sql.Identifier("_pqgpu_codes")

        def setup_tmp():
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (id {}, code bytea)").format(
                    tmp, sql.SQL("text" if text_ids else "int8")))
            conn.commit()

        _run_pg(setup_tmp, dsn, "creating a temporary table")
        # Rows that already hold the same code are left alone: a re-run rewrites nothing (no table bloat).
        update = sql.SQL("UPDATE {t} AS t SET {c} = s.code FROM {tmp} AS s "
                         "WHERE t.{id} = s.id AND t.{c} IS DISTINCT FROM s.code").format(
            t=table, c=codec_, tmp=tmp, id=idc)
        matched = sql.SQL("SELECT count(*) FROM {tmp} AS s WHERE EXISTS (SELECT 1 FROM {t} AS t WHERE t.{id} = s.id)"
                          ).format(t=table, tmp=tmp, id=idc)

        def do_batch(codes: np.ndarray, ids: np.ndarray) -> int:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("TRUNCATE {}").format(tmp))
                with cur.copy(sql.SQL("COPY {} (id, code) FROM STDIN (FORMAT BINARY)").format(tmp)) as cp:
                    if text_ids:
                        cp.set_types(["text", "bytea"])
                        for i, c in zip(ids.tolist(), codes):
                            cp.write_row((str(i), c.tobytes()))
                    else:
                        cp.write(_binary_copy_int_bytea(ids, codes))
                cur.execute(sql.SQL("ANALYZE {}").format(tmp))
                cur.execute(update)
                changed = cur.rowcount
                cur.execute(matched)
                n = int(cur.fetchone()[0])
            conn.commit()
            log.debug("batch of %d codes: %d rows matched, %d changed", len(ids), n, changed)
            return n

        batch_iter = batches if first is None else _chain(first, batches)
        for codes, ids in batch_iter:
            if ids.dtype.kind not in "iu" and not text_ids:
                raise InputError(f"{store_path}: the store has {ids.dtype} ids but {what}.{pg.id_column} is "
                                 f"{id_pg}; they cannot be matched.")
            if ids.dtype.kind in "iu" and text_ids:
                ids = ids.astype(str)
            n = _run_pg(lambda: do_batch(codes, ids), dsn, f"writing codes into {what}")
            updated += n
            missing += len(ids) - n
            if progress is not None:
                progress(len(ids))
    finally:
        try:
            conn.rollback()
        except psycopg.Error:
            pass
        conn.close()
    if missing:
        log.warning("%s: %d id(s) of the store were not found in the table; their codes were not written",
                    what, missing)
    log.info("Wrote %d codes into %s.%s in %.1f s", updated, pg.table, pg.codes_column, time.perf_counter() - t0)
    return updated


def _chain(first, rest):
    yield first
    yield from rest


def _binary_copy_int_bytea(ids: np.ndarray, codes: np.ndarray) -> bytes:
    """Binary COPY stream of rows (int8 id, bytea code), built with one structured array."""
    n, cs = codes.shape
    dt = np.dtype([("nf", ">i2"), ("l1", ">i4"), ("id", ">i8"), ("l2", ">i4"), ("code", "u1", (cs,))])
    rec = np.empty(n, dtype=dt)
    rec["nf"] = 2
    rec["l1"] = 8
    rec["id"] = ids
    rec["l2"] = cs
    rec["code"] = codes
    return _BINARY_SIGNATURE + b"\x00" * 8 + rec.tobytes() + b"\xff\xff"
