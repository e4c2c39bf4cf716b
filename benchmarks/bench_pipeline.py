"""Parquet -> Zarr pipeline vs the seed-style single-process script, with read-only / encode-only limits
and peak RSS at 200k and 2M rows.

    python benchmarks/bench_pipeline.py [--quick] [--n 200000] [--big-n 2000000] [--json out.json]
"""

from pqgpu.bench.pipeline import main

if __name__ == "__main__":
    main()
