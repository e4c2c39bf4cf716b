"""A/B of two versions of the numba encode kernel (pqgpu/_cpu.py) in one process, calls interleaved.

Timing the versions in separate processes on a shared 2-core VM moved the same kernel by up to 50 % between
processes; interleaving calls in one process and taking the per-round ratio cancels most of that drift.

    git archive c8a7568 pqgpu/_cpu.py | tar -x -C /tmp/old       # the kernel before the near-tie re-rank
    python -m pqgpu.bench.kernel_ab /tmp/old/pqgpu/_cpu.py pqgpu/_cpu.py --scale 0.5   # 7 rounds x 12 processes

Within one process the same kernel compiled twice (an A/A run) still differed by up to 13 % at some grid
points, consistently over rounds: where each compiled kernel and its codebook copy land in memory matters,
and per-process medians fall in two groups about 0.9 and 1.1 (benchmarks/RESULTS.md, session 5). So the
measurement is repeated in --procs fresh processes (12 or more for a ±5 % question; alternating which version
loads first), and the table gives, per grid point, each version's median vectors/s, the median over
processes of each process's median B/A with its range, and all rounds pooled with their interquartile
range, as Markdown.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time

import numpy as np

from .encode import make_problem

GRID = [(768, 4, 8, 100_000), (768, 8, 8, 100_000), (768, 16, 8, 100_000), (96, 8, 12, 20_000),
        (768, 8, 4, 100_000)]


def _grid(text: str) -> list[tuple[int, int, int, int]]:
    return [tuple(int(v) for v in point.split(",")) for point in text.split(";") if point.strip()]


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # numba's on-disk cache re-imports the module by name
    spec.loader.exec_module(mod)
    return mod


def _measure(args) -> dict:
    """One process: per grid point, each version's median vectors/s and the per-round B/A ratios."""
    # Alternate which version is loaded (and so compiled and placed in memory) first, per process.
    order = ("b", "a") if args.child % 2 else ("a", "b")
    loaded = {k: _load(getattr(args, k), f"kernel_{k}") for k in order}
    mods = [loaded["a"], loaded["b"]]
    res = {}
    for d, dsub, nbits, n in args.grid:
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
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                t = clock()
                mods[i].assign(x, preps[i], outs[i])
                times[i].append(clock() - t)
        ta, tb = np.array(times[0]), np.array(times[1])
        res[f"{d}, {dsub}, {nbits} ({n:,})"] = {
            "va": n / float(np.median(ta)), "vb": n / float(np.median(tb)),
            "ratios": (ta / tb).tolist(), "differ": differ}  # B's speed relative to A's, per round
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="path of version A's _cpu.py (the baseline)")
    ap.add_argument("b", help="path of version B's _cpu.py")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--procs", type=int, default=12,
                    help="repeat the whole measurement in this many fresh processes and report the median over "
                         "processes of each process's median ratio (with its range): where a compiled kernel and "
                         "its data land in memory moved an A/A comparison by up to 13 %% within one process")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every n by this")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time each call by this thread's CPU time (run with NUMBA_NUM_THREADS=1): what the call "
                         "costs a core, less sensitive than wall time to other processes on a shared machine")
    ap.add_argument("--grid", type=_grid, default=GRID,
                    help="points 'd,dsub,nbits,n' separated by ';' (default: the issue 16 grid)")
    ap.add_argument("--child", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child >= 0:
        print(json.dumps(_measure(args)))
        return
    import numba

    print(f"A = {args.a}\nB = {args.b}\nnumba threads: {numba.get_num_threads()}, clock: "
          f"{'thread CPU time' if args.cpu_time else 'wall'}, {args.procs} process(es) x {args.rounds} rounds\n")
    runs = []
    for i in range(args.procs):
        cmd = [sys.executable, "-m", "pqgpu.bench.kernel_ab", args.a, args.b, "--rounds", str(args.rounds),
               "--scale", str(args.scale), "--grid", ";".join(",".join(map(str, g)) for g in args.grid),
               "--child", str(i)]
        cmd += ["--cpu-time"] if args.cpu_time else []
        runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        print(f"process {i + 1}/{args.procs}: " + ", ".join(
            f"{float(np.median(v['ratios'])):.3f}" for v in runs[-1].values()), flush=True)
    print("\n| d, dsub, nbits (n) | A vectors/s | B vectors/s | B / A, median over processes (min-max) | "
          "B / A, all rounds pooled (IQR) |")
    print("|---|---|---|---|---|")
    for key in runs[0]:
        per = [float(np.median(r[key]["ratios"])) for r in runs]
        pooled = np.concatenate([r[key]["ratios"] for r in runs])
        q1, med, q3 = np.percentile(pooled, [25, 50, 75])
        differ = max(r[key]["differ"] for r in runs)
        print(f"| {key} | {np.median([r[key]['va'] for r in runs]):,.0f} | "
              f"{np.median([r[key]['vb'] for r in runs]):,.0f} | "
              f"{np.median(per):.3f} ({min(per):.3f}-{max(per):.3f}) | "
              f"{med:.3f} ({q1:.3f}-{q3:.3f}) |" + (f" rows with other codes: {differ}" if differ else ""), flush=True)


if __name__ == "__main__":
    main()
