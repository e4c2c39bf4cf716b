"""Whole-process `pqgpu encode` vs a single-process faiss script on the same Parquet files (issue 16: >= 2x
at 200k and 1M rows of d=768, M=96), with pqgpu forced onto threads and onto processes beside it.

    python benchmarks/bench_whole_process.py [--sizes 200000,1000000] [--runs 3] [--workdir DIR] [--json out.json]
"""

from pqgpu.bench.whole_process import main

if __name__ == "__main__":
    main()
