"""Encode throughput, pqgpu CPU (and GPU) vs faiss-cpu compute_codes and per-subspace faiss.knn.

    python benchmarks/bench_encode.py [--quick] [--n 100000] [--runs 5] [--json out.json]
"""

from pqgpu.bench.encode import main

if __name__ == "__main__":
    main()
