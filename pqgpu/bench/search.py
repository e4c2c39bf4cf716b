"""ADC search throughput: `pqgpu.search` over a Zarr code store vs faiss `IndexPQ.search`, same codes.

    python -m pqgpu.bench.search [--n 1000000] [--d 768] [--M 96] [--nbits 8] [--nq 100] [-k 10]
                                 [--repeat 5] [--chunk-rows 65536] [--backend cpu]

Random codes and centroids are fine for throughput (exhaustive ADC costs the same on any codes). Each
contender gets one warm-up run (numba compilation, page cache), then `repeat` timed runs; the median is
reported as queries/s. Rows:
  - pqgpu.search (store): the user-facing call, reading codes from the Zarr store chunk by chunk;
  - pqgpu search_codes (in memory): the same engine over codes already in RAM (the scan alone);
  - faiss IndexPQ.search: codes in RAM, faiss's OpenMP threads.
Also checks that pqgpu and faiss return the same neighbours. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np


def timed(fn, repeat: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def build_store(path: str, cb, codes: np.ndarray, chunk_rows: int) -> None:
    from ..store import create_store, write_chunk

    n = codes.shape[0]
    create_store(path, codebook=cb, n=n, chunk_rows=chunk_rows, id_dtype="int64", source={"bench": "random"})
    for i, start in enumerate(range(0, n, chunk_rows)):
        write_chunk(path, i, start, codes[start:start + chunk_rows], np.arange(start, min(n, start + chunk_rows)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--M", type=int, default=96)
    ap.add_argument("--nbits", type=int, default=8)
    ap.add_argument("--nq", type=int, default=100)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chunk-rows", type=int, default=65536)
    ap.add_argument("--backend", default="cpu", choices=["auto", "cpu", "gpu"])
    args = ap.parse_args(argv)

    import faiss
    import numba

    from ..codebook import Codebook
    from ..kernels import code_size

    search_mod = importlib.import_module("pqgpu.search")
    rng = np.random.default_rng(0)
    d, M, nbits = args.d, args.M, args.nbits
    cb = Codebook(d, M, nbits, rng.standard_normal((M, 1 << nbits, d // M)).astype(np.float32))
    codes = rng.integers(0, 256, size=(args.n, code_size(M, nbits)), dtype=np.uint8)
    if nbits % 8:
        # random bytes may hold sub-codes >= ksub in the padding bits; a real encoder never writes those
        from ..kernels import pack_codes

        codes = np.asarray(pack_codes(rng.integers(0, 1 << nbits, size=(args.n, M)), nbits))
    q = rng.standard_normal((args.nq, d)).astype(np.float32)

    tmp = tempfile.mkdtemp(prefix="pqgpu-bench-search-")
    try:
        path = os.path.join(tmp, "codes.zarr")
        build_store(path, cb, codes, args.chunk_rows)

        index = faiss.IndexPQ(d, M, nbits)
        faiss.copy_array_to_vector(cb.centroids.ravel(), index.pq.centroids)
        index.is_trained = True
        index.add_sa_codes(codes)

        chunks = [(s, codes[s:s + args.chunk_rows]) for s in range(0, args.n, args.chunk_rows)]
        t_store, (ds, ids) = timed(lambda: search_mod.search(path, q, args.k, backend=args.backend), args.repeat)
        t_mem, (_dm, rows) = timed(lambda: search_mod.search_codes(q, cb, chunks, args.k, backend=args.backend),
                                  args.repeat)
        t_faiss, (df, fi) = timed(lambda: index.search(q, args.k), args.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    same_ids = float((ids == fi).mean())
    max_rel = float((np.abs(ds - df) / np.abs(df).max(axis=1, keepdims=True)).max())
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; numba threads "
           f"{numba.get_num_threads()}, faiss OpenMP threads {faiss.omp_get_max_threads()}; faiss "
           f"{faiss.__version__}, numba {numba.__version__}, numpy {np.__version__}; backend {args.backend}")
    print(f"ADC search, n={args.n:,} codes, d={d}, M={M}, nbits={nbits}, nq={args.nq}, k={args.k}, "
          f"chunk_rows={args.chunk_rows}; median of {args.repeat} after a warm-up")
    print(f"Environment: {env}")
    print()
    print("| method | median s | queries/s | codes scanned/s | vs faiss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, t in (("pqgpu.search (Zarr store)", t_store), ("pqgpu search_codes (in memory)", t_mem),
                    ("faiss IndexPQ.search", t_faiss)):
        print(f"| {name} | {t:.3f} | {args.nq / t:,.1f} | {args.nq * args.n / t / 1e6:,.0f} M | "
              f"{t_faiss / t:.2f}x |")
    print()
    print(f"Same ids as faiss: {same_ids:.4%} of results; max relative distance difference {max_rel:.2e}")
    assert np.array_equal(ids, rows), "store search and in-memory search disagree"


if __name__ == "__main__":
    main()
