"""Training time and held-out MSE, pqgpu vs faiss-cpu ProductQuantizer.train (same sample, same niter).

    python benchmarks/bench_train.py [--quick] [--runs 5] [--json out.json]
"""

from pqgpu.bench.train import main

if __name__ == "__main__":
    main()
