"""A/B of two versions of the numba encode kernel (pqgpu/_cpu.py) in one process, calls interleaved.

Timing the versions in separate processes on a shared 2-core VM moved the same kernel by up to 50 % between
processes; interleaving calls in one process and taking the per-round ratio cancels most of that drift.

    git archive c8a7568 pqgpu/_cpu.py | tar -x -C /tmp/old       # the kernel before the near-tie re-rank
    python benchmarks/bench_kernel_ab.py /tmp/old/pqgpu/_cpu.py pqgpu/_cpu.py --rounds 15

Prints, per grid point, each version's median vectors/s and the median over rounds of B/A (with the
interquartile range of that ratio), as a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pqgpu.bench.encode import make_problem  # noqa: E402

GRID = [(768, 4, 8, 100_000), (768, 8, 8, 100_000), (768, 16, 8, 100_000), (96, 8, 12, 20_000),
        (768, 8, 4, 100_000)]


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # numba's on-disk cache re-imports the module by name
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="path of version A's _cpu.py (the baseline)")
    ap.add_argument("b", help="path of version B's _cpu.py")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every n by this")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time each call by this thread's CPU time (run with NUMBA_NUM_THREADS=1): what the call "
                         "costs a core, less sensitive than wall time to other processes on a shared machine")
    args = ap.parse_args()
    mods = [_load(args.a, "kernel_a"), _load(args.b, "kernel_b")]
    import numba

    print(f"A = {args.a}\nB = {args.b}\nnumba threads: {numba.get_num_threads()}, clock: "
          f"{'thread CPU time' if args.cpu_time else 'wall'}\n")
    print("| d, dsub, nbits (n) | A vectors/s | B vectors/s | B / A (median, IQR) |")
    print("|---|---|---|---|")
    for d, dsub, nbits, n in GRID:
        n = max(1000, int(n * args.scale))
        x, c = make_problem(n, d, dsub, nbits)
        preps = [m.prepare(c) for m in mods]
        outs = [np.empty((n, d // dsub), np.uint16) for _ in mods]
        for m, p, o in zip(mods, preps, outs):
            m.assign(x, p, o)  # compile and warm up
        differ = int(np.count_nonzero((outs[0] != outs[1]).any(axis=1)))
        clock = time.thread_time if args.cpu_time else time.perf_counter
        times = [[], []]
        for r in range(args.rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for i in order:
                t = clock()
                mods[i].assign(x, preps[i], outs[i])
                times[i].append(clock() - t)
        ta, tb = np.array(times[0]), np.array(times[1])
        ratio = ta / tb  # B's speed relative to A's, per round
        q1, med, q3 = np.percentile(ratio, [25, 50, 75])
        print(f"| {d}, {dsub}, {nbits} ({n:,}) | {n / np.median(ta):,.0f} | {n / np.median(tb):,.0f} | "
              f"{med:.3f} ({q1:.3f}-{q3:.3f}) |" + ("" if not differ else f" rows with other codes: {differ}"),
              flush=True)


if __name__ == "__main__":
    main()
