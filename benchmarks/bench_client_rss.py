"""Peak RSS of the pqgpu client process alone for `pqgpu run` at 1M and 20M rows (d=8, M=4, npy shards):
the client's memory must not grow with n (issue 14: ratio <= 1.2).

    python benchmarks/bench_client_rss.py [--sizes 1000000,20000000] [--workdir DIR] [--code /path/to/other/checkout]
"""

from pqgpu.bench.client_rss import main

if __name__ == "__main__":
    main()
