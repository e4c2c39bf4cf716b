"""The CPU encode against its fp32 floor (issue 22.6): numpy's sgemm of 4096 x 4096 by 4096 x 4096 sets the
FLOP rate this machine reaches; an encode of d=768 with 2^nbits centroids per subspace is 2 * d * 2^nbits FLOP
per vector whatever dsub is, so floor = that rate / (2 * d * 2^nbits) vectors/s. Then pqgpu's numba kernel
(`pqgpu._cpu.assign`, all numba threads) at each dsub, as a percentage of the floor, in one process.

    python -m pqgpu.bench.floor [--n 100000] [--d 768] [--nbits 8] [--dsubs 4,8,16,32] [--runs 7]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from . import environment, markdown_table


def sgemm_gflops(size: int = 4096, runs: int = 5) -> float:
    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    a @ b  # warm-up: BLAS threads, pages
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * size**3 / float(np.median(times)) / 1e9


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--nbits", type=int, default=8)
    p.add_argument("--dsubs", default="4,8,16,32")
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args(argv)
    from .. import _cpu
    from .encode import make_problem

    gflops = sgemm_gflops()
    floor = gflops * 1e9 / (2 * args.d * (1 << args.nbits))
    rows = []
    for dsub in (int(v) for v in args.dsubs.split(",")):
        x, c = make_problem(args.n, args.d, dsub, args.nbits)
        prepared = _cpu.prepare(c)
        out = np.empty((args.n, args.d // dsub), np.uint16)
        _cpu.assign(x, prepared, out)  # compile or load, warm up
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            _cpu.assign(x, prepared, out)
            times.append(time.perf_counter() - t)
        rate = args.n / float(np.median(times))
        rows.append({"dsub": dsub, "vectors/s": round(rate), "range": f"{args.n / max(times):,.0f}-"
                     f"{args.n / min(times):,.0f}", "% of floor": round(100 * rate / floor, 1)})
    print(f"environment: {environment()}\n")
    print(f"sgemm {gflops:.0f} GFLOP/s: floor {floor:,.0f} vectors/s at d={args.d}, nbits={args.nbits}\n")
    print(markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
