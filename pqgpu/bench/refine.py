"""Refine benchmark: `pqgpu.search(..., refine=R)` (the top 10*R ADC candidates re-ranked with vectors read back
from a local Parquet source) against faiss IndexRefineFlat (k_factor R, every vector in RAM) on the same data.

faiss's base index is an IndexPQ with pqgpu's trained centroids, so both re-rank candidates from the same
quantizer: recall differences come from the re-rank, not the training. For each R: 10-recall@10 and
1-recall@10 against exact neighbours, queries/s (best of --runs calls of --nq queries after a warm-up, taking
turns, the same thread count), rows and bytes read from the source per call. Peak memory is the peak RSS of a
fresh process that opens the store and searches once (VmHWM), without refine and with the largest R, next
to the sizes it is bounded by (codes, distinct candidates, source).

    python -m pqgpu.bench.refine [--quick] [--n N --d D --M M --nbits B --nq Q --refine 1,2,5,10] [--out DIR]

Writes DIR/refine.json, DIR/refine.md and DIR/refine.png (recall against queries/s, pqgpu and faiss per R).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import environment, markdown_table

log = logging.getLogger(__name__)
K = 10


def _best(fn: Any, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# The peak RSS of a child process: VmHWM of its own address space. Not ru_maxrss, which Linux carries over
# execve from the forking parent (a bench process holding the vectors would inflate every child's figure).
PEAK_SNIPPET = ("def peak_mib():\n"
                "    for line in open('/proc/self/status'):\n"
                "        if line.startswith('VmHWM:'):\n"
                "            return int(line.split()[1]) / 1024\n")


def _child_peak(store: str, queries: str, refine: int | None) -> dict[str, Any]:
    """Peak RSS (MiB) of a fresh process that searches the store once (refine None: ADC only)."""
    code = (PEAK_SNIPPET + "import json, sys, numpy as np, pqgpu\n"
            "q = np.load(sys.argv[2]); R = int(sys.argv[3]) or None\n"
            f"pqgpu.search(sys.argv[1], q, {K}, backend='cpu', refine=R)\n"
            "print(json.dumps({'peak_rss_mib': peak_mib()}))\n")
    out = subprocess.run([sys.executable, "-c", code, store, queries, str(refine or 0)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def row_group_memory(tmp: Path, n: int, d: int, take: int = 1000) -> dict[str, Any]:
    """Peak RSS growth of a fresh process that reads `take` random rows back from a Parquet file holding one
    row group of n x d float32 (what a refine call costs when candidates fall in a large row group)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..sample import sample_vectors

    path = tmp / "one-row-group.parquet"
    x = sample_vectors(n, d, seed=3)
    pq.write_table(pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)}), path,
                   row_group_size=n)
    del x
    code = (PEAK_SNIPPET + "import json, sys, numpy as np\n"
            "from pqgpu.config import SourceConfig\nfrom pqgpu.sources import open_source\n"
            "src = open_source(SourceConfig(format='parquet', path=sys.argv[1]))\n"
            "rows = np.sort(np.random.default_rng(1).choice(src.n, int(sys.argv[2]), replace=False))\n"
            "import psutil\nbefore = psutil.Process().memory_info().rss / 2**20\n"
            "_u, _v, st = src.take_rows(rows)\n"
            "after = peak_mib()\n"
            "print(json.dumps({'before': before, 'after': after, 'bytes': st['bytes'], 'seconds': st['seconds']}))\n")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(take)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    path.unlink()
    return {"rows_in_row_group": n, "d": d, "rows_taken": take,
            "column_chunk_mib": round(r["bytes"] / 2**20, 1), "peak_rss_growth_mib": round(r["after"] - r["before"], 1),
            "read_s": round(r["seconds"], 3)}


def run_refine_bench(n: int, d: int, M: int, nbits: int, nq: int, refines: list[int], runs: int = 3,
                     threads: int = 2, workdir: str | None = None,
                     big_row_group: tuple[int, int] | None = None) -> dict[str, Any]:
    import faiss

    from .. import refine as refine_mod
    from ..config import config_from_dict
    from ..pipeline import run
    from ..sample import make_sample
    from ..store import open_store
    from .ivf import exact_knn, recall, set_numba_threads

    faiss.omp_set_num_threads(threads)
    set_numba_threads(threads)
    tmp = Path(workdir or tempfile.mkdtemp(prefix="pqgpu-refine-bench-"))
    files = make_sample(tmp / "data", n, d, shards=4, fmt="parquet", n_queries=nq)
    q = np.load(tmp / "data" / "queries.npy")
    cfg = config_from_dict({
        "source": {"format": "parquet", "path": str(tmp / "data" / "*.parquet"), "id_column": None},
        "quantizer": {"path": str(tmp / "pq.faiss"), "M": M, "nbits": nbits, "train_size": min(n, 65536),
                      "niter": 10},
        "encode": {"output": str(tmp / "codes.zarr"), "chunk_rows": 65536, "backend": "cpu"},
    })
    t0 = time.perf_counter()
    run(cfg)
    build_s = time.perf_counter() - t0
    store = open_store(cfg.encode.output)
    cb = store.codebook()
    import pyarrow.parquet as pq

    x = np.concatenate([np.asarray(pq.read_table(f).column("embedding").combine_chunks().flatten()).reshape(-1, d)
                        for f in files])
    gt = exact_knn(x, q, K)
    base = faiss.IndexPQ(d, M, nbits)
    faiss.copy_array_to_vector(cb.centroids.ravel(), base.pq.centroids)
    base.is_trained = True
    rf = faiss.IndexRefineFlat(base)
    rf.add(x)  # faiss's codes of x with pqgpu's centroids (== the store's, but for float32 ties) and x in RAM

    from ..search import search, search_store
    from ..sources.recorded import check_source_unchanged

    source = check_source_unchanged(store)
    rows = []
    for R in [None, *refines]:
        def ours() -> Any:
            return search(store, q, K, backend="cpu", refine=R)

        if R is None:
            def theirs() -> Any:
                return base.search(q, K)
        else:
            def theirs() -> Any:
                rf.k_factor = float(R)
                return rf.search(q, K)
        _d, ids = ours()  # warm-up (kernel compile, file caches)
        _fd, fids = theirs()
        t_ours = t_theirs = float("inf")
        for _ in range(runs):  # taking turns, so a noisy neighbour hits both
            t_ours = min(t_ours, _best(ours, 1))
            t_theirs = min(t_theirs, _best(theirs, 1))
        read: dict[str, Any] = {}
        if R:  # what one call reads: the same candidates re-ranked once more, apart from the timing
            _s, cand = search_store(store, q, K * R, backend="cpu")
            read = refine_mod.refine_rows(source, q, cand, K, "l2")[2]
        ours_r, theirs_r = recall(np.asarray(ids, np.int64), gt), recall(fids, gt)
        rows.append({"R": R or "none (ADC)", "pqgpu 10-R@10": round(ours_r[1], 4),
                     "faiss 10-R@10": round(theirs_r[1], 4), "pqgpu 1-R@10": round(ours_r[0], 4),
                     "faiss 1-R@10": round(theirs_r[0], 4), "pqgpu q/s": round(nq / t_ours, 1),
                     "faiss q/s": round(nq / t_theirs, 1), "q/s ratio": round(t_theirs / t_ours, 3),
                     "rows read": read.get("rows", 0), "row groups read": read.get("row_groups", 0),
                     "MiB read": round(read.get("bytes", 0) / 2**20, 2), "read s": round(read.get("seconds", 0.0), 4)})
    qpath = str(tmp / "data" / "queries.npy")
    rmax = max(refines)
    mem = {"adc_only": _child_peak(cfg.encode.output, qpath, None)["peak_rss_mib"],
           f"refine_{rmax}": _child_peak(cfg.encode.output, qpath, rmax)["peak_rss_mib"]}
    last = rows[-1]
    sizes = {"codes_mib": round(n * cb.code_size / 2**20, 2),
             "candidates_mib": round(last["rows read"] * d * 4 / 2**20, 2),
             "source_mib": round(sum(os.path.getsize(f) for f in files) / 2**20, 2),
             "vectors_in_ram_mib (faiss)": round(x.nbytes / 2**20, 2)}
    big = row_group_memory(tmp, *big_row_group) if big_row_group else None
    if workdir is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"benchmark": "refine", "params": {"n": n, "d": d, "M": M, "nbits": nbits, "nq": nq, "k": K,
                                              "threads": threads, "runs": runs, "build_s": round(build_s, 2)},
            "environment": environment(), "rows": rows, "peak_rss_mib": mem, "sizes": sizes, "row_group": big}


def report_markdown(r: dict[str, Any]) -> str:
    p, m, s = r["params"], r["peak_rss_mib"], r["sizes"]
    lines = [f"## Refine: n={p['n']:,}, d={p['d']}, PQ{p['M']}x{p['nbits']}, {p['nq']} queries, k={p['k']}, local "
             "Parquet source", "",
             f"pqgpu: `search(..., refine=R)` (ADC top k*R, vectors read back from the source per call); faiss: "
             f"IndexRefineFlat(IndexPQ with pqgpu's centroids), k_factor R, vectors in RAM. q/s: best of "
             f"{p['runs']} calls of {p['nq']} queries, taking turns, {p['threads']} threads each; ratio = pqgpu / "
             "faiss.", "", markdown_table(r["rows"]),
             f"Peak RSS of a fresh process searching once: ADC only {m['adc_only']:.0f} MiB, "
             + ", ".join(f"{k.replace('_', ' ')} {v:.0f} MiB" for k, v in m.items() if k != "adc_only")
             + f"; codes {s['codes_mib']} MiB, distinct candidates {s['candidates_mib']} MiB (float32), source "
             f"{s['source_mib']} MiB on disk, faiss's vectors in RAM {s['vectors_in_ram_mib (faiss)']} MiB.", ""]
    b = r.get("row_group")
    if b:
        lines += [f"One large row group ({b['rows_in_row_group']:,} x {b['d']} float32, vector column chunk "
                  f"{b['column_chunk_mib']} MiB): taking {b['rows_taken']} random rows raises a fresh process's peak "
                  f"RSS above its RSS before the read by {b['peak_rss_growth_mib']} MiB, in {b['read_s']} s.", ""]
    return "\n".join(lines) + "\n"


def plot_recall_qps(r: dict[str, Any], path: Path) -> bool:
    """10-recall@10 against queries/s per R, pqgpu and faiss; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for who, marker in (("pqgpu", "o"), ("faiss", "s")):
        xs = [row[f"{who} 10-R@10"] for row in r["rows"]]
        ys = [row[f"{who} q/s"] for row in r["rows"]]
        ax.plot(xs, ys, marker=marker, label=who + (" (Parquet on disk)" if who == "pqgpu" else " RefineFlat (RAM)"))
        for row, x, y in zip(r["rows"], xs, ys):
            label = "ADC" if isinstance(row["R"], str) else f"R={row['R']}"
            ax.annotate(label, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    p = r["params"]
    ax.set(xlabel="10-recall@10", ylabel="queries/s", yscale="log",
           title=f"PQ{p['M']}x{p['nbits']} + refine, n={p['n']:,}, d={p['d']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(quick: bool = False, **overrides: Any) -> dict[str, Any]:
    p = {"n": 20_000, "d": 64, "M": 8, "nq": 200} if quick else {"n": 100_000, "d": 128, "M": 16, "nq": 1000}
    p.update({"nbits": 8, "refines": [1, 2, 5, 10], "runs": 3, "threads": 2,
              "big_row_group": (50_000, 256) if quick else (400_000, 256)})
    p.update({k: v for k, v in overrides.items() if v is not None})
    return run_refine_bench(p["n"], p["d"], p["M"], p["nbits"], p["nq"], p["refines"], p["runs"], p["threads"],
                            big_row_group=p["big_row_group"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int)
    ap.add_argument("--d", type=int)
    ap.add_argument("--M", type=int)
    ap.add_argument("--nbits", type=int)
    ap.add_argument("--nq", type=int)
    ap.add_argument("--refine", help="comma-separated R values (default 1,2,5,10)")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", default="bench-report")
    args = ap.parse_args(argv)
    from ..logs import configure

    configure(quiet=True)
    refines = [int(v) for v in args.refine.split(",")] if args.refine else None
    r = run(args.quick, n=args.n, d=args.d, M=args.M, nbits=args.nbits, nq=args.nq, refines=refines,
            runs=args.runs, threads=args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "refine.json").write_text(json.dumps(r, indent=2, default=str))
    md = report_markdown(r)
    (out / "refine.md").write_text(md)
    plot_recall_qps(r, out / "refine.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
