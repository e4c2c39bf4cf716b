"""GPU targets (needs CuPy and a CUDA device): device-resident encode vs faiss-gpu, training 1M x 768,
pipeline vs read+copy-to-device.   python benchmarks/bench_gpu.py [--runs 5] [--json out.json]"""

from pqgpu.bench.gpu import main

if __name__ == "__main__":
    main()
