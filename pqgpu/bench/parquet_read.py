"""Reading Parquet chunks: the page reader (pqgpu/sources/_parquet_pages.py) vs the pyarrow path, on shards
with small row groups and on one file with pyarrow's default (1Mi-row) row groups.

    python -m pqgpu.bench.parquet_read [--n 200000] [--d 768] [--chunk-rows 32768] [--passes 3]

Each (layout, reader) runs in its own process; rows/s is the median of the passes after one warm-up pass, and
peak RSS the largest RSS seen right after a chunk was read (the sampling adds a little time to every chunk).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = """
import json, sys, time
import numpy as np, psutil
from pqgpu.config import config_from_dict
from pqgpu.sources import open_source, plan_chunks
path, chunk_rows, passes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
src = open_source(config_from_dict({"source": {"format": "parquet", "path": path, "id_column": "id"}}).source)
chunks = plan_chunks([s.n_rows for s in src.shards], chunk_rows)
rates, peak, me = [], 0, psutil.Process()
for p in range(passes + 1):
    t = time.perf_counter()
    for c in chunks:
        x, ids = src.read_chunk(c)
        peak = max(peak, me.memory_info().rss)  # with the chunk still alive
        del x, ids
    if p:
        rates.append(src.n / (time.perf_counter() - t))
print(json.dumps({"rows_per_s": float(np.median(rates)), "peak_rss_mib": peak / 2**20}))
"""


def write_layouts(root: Path, n: int, d: int) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..sample import make_sample, sample_vectors

    make_sample(root / "small-groups", n, d, shards=8, fmt="parquet")  # row groups of 16,384 rows
    (root / "default-groups").mkdir()
    x = sample_vectors(n, d, seed=0)
    table = pa.table({"id": pa.array(np.arange(n)),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)})
    pq.write_table(table, root / "default-groups" / "a.parquet")
    return {"8 shards, row groups of 16,384": str(root / "small-groups" / "*.parquet"),
            "1 file, pyarrow default row groups": str(root / "default-groups" / "*.parquet")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--chunk-rows", type=int, default=32768)
    p.add_argument("--passes", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pqgpu-read-") as tmp:
        layouts = write_layouts(Path(tmp), args.n, args.d)
        print(f"n={args.n:,} x d={args.d} float32, chunk_rows {args.chunk_rows}, median of {args.passes} passes\n")
        print("| layout | reader | rows/s | peak RSS MiB |\n|---|---|---:|---:|")
        for name, path in layouts.items():
            for reader, flag in (("page reader", "1"), ("pyarrow", "0")):
                env = dict(os.environ, PQGPU_PARQUET_PAGES=flag)
                out = subprocess.run([sys.executable, "-c", CHILD, path, str(args.chunk_rows), str(args.passes)],
                                     env=env, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"| {name} | {reader} | {r['rows_per_s']:,.0f} | {r['peak_rss_mib']:,.0f} |")


if __name__ == "__main__":
    main()
