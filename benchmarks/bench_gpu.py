"""The GPU check (needs CuPy and a CUDA device for its GPU parts): gpu tests, GPU/CPU/faiss parity, device encode
vs PyTorch, training, search, pipeline.   python benchmarks/bench_gpu.py --out RESULTS_DIR [--quick] [--steps ...]
On an air-gapped GPU machine use `bash benchmarks/gpu_check.sh --offline RESULTS_DIR` instead."""

from pqgpu.bench.gpu_check import main

if __name__ == "__main__":
    main()
