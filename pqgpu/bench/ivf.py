"""IVF-PQ benchmark: build time (train + encode + invert, through the store) vs faiss IndexIVFPQ train + add on
the same data in the same run, then recall@10 and queries/s per nprobe for both.

Search speed is compared on the same index, counted the same way: pqgpu's `IvfIndex` loads the store's inverted
layout from Zarr once, faiss `read_index` loads the store exported as an IndexIVFPQ file once (both load times
reported apart), and queries/s is over search calls (best of 5 after a warm-up, taking turns) with the same
number of CPU threads (--threads). faiss's own index (its train + add) gives the recall columns and its q/s too.
The one-call figure (`search_ivf_store`: open the store, load, search) is reported as well.

    python -m pqgpu.bench.ivf [--quick] [--n N --d D --nlist L --M M --nbits B] [--backend cpu|gpu] [--out DIR]

pqgpu builds as `pqgpu run` does. With --runner auto (the default) that is whatever `pqgpu run` picks for the
size with the default cluster settings: threads of this process below cluster.IN_PROCESS_MAX_VALUES (train,
encode and invert here), Dask worker processes above. --runner processes always starts a LocalCluster of
--workers processes: training is a task on a worker (which reads the sample there), then the encode tasks
and the inverted layout run on the same workers.

Writes DIR/ivf.json, DIR/ivf.md and DIR/ivf.png (recall vs queries/s). Per-row costs (train per sample row,
encode and invert per row) are reported so that larger builds can be projected on paper.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import environment, markdown_table

log = logging.getLogger(__name__)


def exact_knn(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    from ..evaluation import ExactKnn

    knn = ExactKnn(q, k)
    for s in range(0, x.shape[0], 65536):
        knn.add(s, x[s:s + 65536])
    return knn.rows


def recall(found: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    from ..evaluation import recall_metrics

    r = recall_metrics(found, gt, (10,))
    return r["1-recall@10"], r["10-recall@10"]


def _process_cpu_seconds() -> float:
    """user + system CPU seconds of this process so far (every thread)."""
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


def _cluster_cpu_seconds(client: Any) -> float:
    """CPU seconds of this process (the client and LocalCluster's scheduler) plus every Dask worker process."""
    return _process_cpu_seconds() + sum(client.run(_process_cpu_seconds).values())


def numba_threads() -> int | None:
    try:
        import numba
    except ImportError:
        return None
    return numba.get_num_threads()


def set_numba_threads(threads: int) -> None:
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def _time_invert_again(store_path: str, client: Any) -> float:
    """Seconds to build the inverted layout alone: reset it and build it again (same bytes, see tests)."""
    from ..invert import build_inverted
    from ..store import open_store

    store = open_store(store_path, mode="r+")
    store.group["ivf"].attrs.update({"complete": False, "starts_done": False})
    t0 = time.perf_counter()
    build_inverted(store, client=client)
    return time.perf_counter() - t0


def run_ivf_bench(n: int, d: int, nlist: int, M: int, nbits: int, niter: int, nprobes: list[int], nq: int,
                  train_size: int, workers: int, threads: int, runner: str = "auto",
                  backend: str = "cpu") -> dict[str, Any]:
    import faiss

    from ..cluster import choose_in_process
    from ..config import config_from_dict
    from ..export import export_faiss
    from ..ivf_search import IvfIndex, search_ivf_store
    from ..pipeline import encode, train
    from ..sample import make_sample
    from ..store import open_store

    tmp = Path(tempfile.mkdtemp(prefix="pqgpu-ivf-bench-"))
    try:
        make_sample(tmp / "data", n, d, shards=4, fmt="npy", n_queries=nq, seed=3)
        x = np.concatenate([np.load(p) for p in sorted((tmp / "data").glob("shard-*.npy"))])
        q = np.load(tmp / "data" / "queries.npy")
        gt = exact_knn(x, q, 10)
        cfg = config_from_dict({
            "source": {"format": "npy", "path": str(tmp / "data" / "shard-*.npy"), "id_column": None},
            "quantizer": {"path": str(tmp / "ivf.faiss"), "M": M, "nbits": nbits, "nlist": nlist,
                          "train_size": train_size, "niter": niter},
            "encode": {"output": str(tmp / "codes.zarr"), "chunk_rows": 65536, "backend": backend},
        })
        def timed_build(client: Any, cpu_seconds: Any) -> tuple[float, float, float, float]:
            """(train s, encode + invert s, CPU s of both, invert alone s) on the client, or without one as
            `pqgpu run` does a small local run: training here, the encode on this process's threads."""
            c0 = cpu_seconds()
            t0 = time.perf_counter()
            train(cfg, client=client)  # with a client: a task on the worker, as `pqgpu run` trains there
            t1 = time.perf_counter()
            encode(cfg, client=client)
            t2 = time.perf_counter()
            c_build = cpu_seconds() - c0
            return t1 - t0, t2 - t1, c_build, _time_invert_again(cfg.encode.output, client)

        in_process = runner == "auto" and choose_in_process(cfg.cluster, n * d)
        if in_process:
            t_train, t_encode_invert, c_build, t_invert = timed_build(None, _process_cpu_seconds)
        else:
            from distributed import Client, LocalCluster

            with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                              dashboard_address=None) as cluster, Client(cluster) as client:
                t_train, t_encode_invert, c_build, t_invert = timed_build(
                    client, lambda: _cluster_cpu_seconds(client))

        sample = x[np.random.default_rng(1234).choice(n, min(train_size, n), replace=False)]
        index = faiss.index_factory(d, f"IVF{nlist},PQ{M}x{nbits}")
        ivf = faiss.downcast_index(index)
        ivf.cp.niter = niter
        ivf.pq.cp.niter = niter
        ivf.do_polysemous_training = False
        c0 = _process_cpu_seconds()
        t0 = time.perf_counter()
        index.train(sample)
        f_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        index.add(x)
        f_add = time.perf_counter() - t0
        c_faiss = _process_cpu_seconds() - c0

        # Every index is loaded from disk once. "Same index": faiss reads our store exported as an IndexIVFPQ
        # (the same lists, codes and tables as ours: the speed target). "Own index": faiss's own train + add,
        # written and read back (its k-means gives other list sizes; for recall).
        faiss.write_index(index, str(tmp / "faiss-own.index"))
        del index, ivf
        own = faiss.read_index(str(tmp / "faiss-own.index"))
        export_faiss(cfg.encode.output, tmp / "pqgpu-exported.index")
        t0 = time.perf_counter()
        same = faiss.read_index(str(tmp / "pqgpu-exported.index"))
        f_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = IvfIndex(open_store(cfg.encode.output))
        t_load = time.perf_counter() - t0

        def best_in_turns(fns: list[Any], runs: int = 5) -> list[tuple[float, Any]]:
            """(best time, result) of each function over `runs` calls, taken in turns so that all see the same
            machine load, after one warm-up call each (numba compile, faiss's first-call allocations)."""
            for fn in fns:
                fn()
            times: list[list[float]] = [[] for _ in fns]
            outs: list[Any] = [None] * len(fns)
            for _ in range(runs):
                for i, fn in enumerate(fns):
                    t0 = time.perf_counter()
                    outs[i] = fn()
                    times[i].append(time.perf_counter() - t0)
            return [(min(t), o) for t, o in zip(times, outs)]

        faiss.omp_set_num_threads(threads)  # the same threads for every search
        set_numba_threads(threads)
        rows = []
        for p in nprobes:
            faiss.extract_index_ivf(same).nprobe = p
            faiss.extract_index_ivf(own).nprobe = p
            (t_ours, (_, found)), (t_same, (_, s_found)), (t_own, (_, f_found)) = best_in_turns(
                [lambda: ours.search(q, 10, nprobe=p, backend=backend), lambda: same.search(q, 10),
                 lambda: own.search(q, 10)])
            t0 = time.perf_counter()
            search_ivf_store(open_store(cfg.encode.output), q, 10, nprobe=p, backend=backend)
            t_once = time.perf_counter() - t0
            r1, r10 = recall(found, gt)
            f1, f10 = recall(f_found, gt)
            rows.append({"nprobe": p, "pqgpu 1-R@10": round(r1, 4), "faiss 1-R@10": round(f1, 4),
                         "pqgpu 10-R@10": round(r10, 4), "faiss 10-R@10": round(f10, 4),
                         "pqgpu q/s": round(nq / t_ours, 1), "faiss q/s (same index)": round(nq / t_same, 1),
                         "ratio": round(t_same / t_ours, 2), "same ids": round(float((found == s_found).mean()), 4),
                         "faiss q/s (own index)": round(nq / t_own, 1),
                         "pqgpu q/s (one call, with load)": round(nq / t_once, 1)})
        build = t_train + t_encode_invert
        return {
            "params": {"n": n, "d": d, "nlist": nlist, "M": M, "nbits": nbits, "niter": niter, "nq": nq,
                       "train_size": train_size, "backend": backend,
                       "runner": "in-process threads" if in_process else f"{workers} Dask worker process(es)",
                       "workers": None if in_process else workers, "threads_per_worker": threads,
                       "search_threads": threads},
            "build": {"pqgpu_train_s": round(t_train, 3), "pqgpu_encode_invert_s": round(t_encode_invert, 3),
                      "pqgpu_invert_alone_s": round(t_invert, 3), "pqgpu_build_s": round(build, 3),
                      "faiss_train_s": round(f_train, 3), "faiss_add_s": round(f_add, 3),
                      "faiss_build_s": round(f_train + f_add, 3),
                      "ratio_pqgpu_over_faiss": round(build / (f_train + f_add), 3),
                      # CPU seconds (all threads and processes): steadier than wall time on a shared machine,
                      # though idle OpenMP threads that spin (faiss's, numba's) count too
                      "pqgpu_build_cpu_s": round(c_build, 3), "faiss_build_cpu_s": round(c_faiss, 3),
                      "cpu_ratio_pqgpu_over_faiss": round(c_build / max(c_faiss, 1e-9), 3)},
            "per_row": {"train_us_per_sample_row": round(1e6 * t_train / min(train_size, n), 2),
                        "encode_us_per_row": round(1e6 * (t_encode_invert - t_invert) / n, 3),
                        "invert_us_per_row": round(1e6 * t_invert / n, 3),
                        "faiss_add_us_per_row": round(1e6 * f_add / n, 3)},
            "load": {"pqgpu_ivf_index_s": round(t_load, 4), "faiss_read_index_s": round(f_load, 4),
                     "numba_threads": numba_threads()},
            "search": rows,
            "environment": environment(),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report_markdown(r: dict[str, Any]) -> str:
    p, b, pr = r["params"], r["build"], r["per_row"]
    lines = [f"## IVF-PQ: n={p['n']:,}, d={p['d']}, nlist={p['nlist']}, M={p['M']}, nbits={p['nbits']}, "
             f"niter={p['niter']}, {p['nq']} queries; pqgpu built on {p.get('runner', 'Dask workers')}, backend "
             f"{p.get('backend', 'cpu')}", "",
             "| build | pqgpu (train + encode + invert) | faiss (train + add) | ratio |", "|---|---|---|---|",
             f"| seconds | {b['pqgpu_build_s']} ({b['pqgpu_train_s']} + {b['pqgpu_encode_invert_s']}, invert alone "
             f"{b['pqgpu_invert_alone_s']}) | {b['faiss_build_s']} ({b['faiss_train_s']} + {b['faiss_add_s']}) | "
             f"{b['ratio_pqgpu_over_faiss']} |",
             f"| CPU seconds (all threads, all processes) | {b['pqgpu_build_cpu_s']} | {b['faiss_build_cpu_s']} | "
             f"{b['cpu_ratio_pqgpu_over_faiss']} |", "",
             f"Per row: encode {pr['encode_us_per_row']} µs, invert {pr['invert_us_per_row']} µs, train "
             f"{pr['train_us_per_sample_row']} µs per sample row; faiss add {pr['faiss_add_us_per_row']} µs.", "",
             f"Index load from disk, apart from search: pqgpu IvfIndex {r['load']['pqgpu_ivf_index_s']} s (from the "
             f"store), faiss read_index {r['load']['faiss_read_index_s']} s (the store exported to a file). "
             f"Queries/s: best of 5 calls of {p['nq']} queries on loaded indexes, taking turns (numba threads "
             f"{r['load']['numba_threads']}, faiss threads {p['search_threads']}); same index = faiss searching our "
             "store exported (the same lists and codes), ratio = pqgpu q/s / that; own index = faiss's own train + "
             "add (its recall columns).", "",
             markdown_table(r["search"])]
    return "\n".join(lines) + "\n"


def plot_recall_qps(r: dict[str, Any], path: Path) -> bool:
    """10-recall@10 against queries/s per nprobe, pqgpu and faiss; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for who, marker in (("pqgpu", "o"), ("faiss", "s")):
        xs = [row[f"{who} 10-R@10"] for row in r["search"]]
        ys = [row["pqgpu q/s" if who == "pqgpu" else "faiss q/s (own index)"] for row in r["search"]]
        ax.plot(xs, ys, marker=marker, label=who)
        for row, x, y in zip(r["search"], xs, ys):
            ax.annotate(str(row["nprobe"]), (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    p = r["params"]
    ax.set(xlabel="10-recall@10", ylabel="queries/s", yscale="log",
           title=f"IVF{p['nlist']},PQ{p['M']}x{p['nbits']}, n={p['n']:,} (labels: nprobe)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(quick: bool = False, **overrides: Any) -> dict[str, Any]:
    """The IVF benchmark at the quick or full size (keyword overrides: n, d, nlist, M, nbits, niter, nq,
    workers, threads, runner, backend)."""
    p = {"n": 30_000, "d": 64, "nlist": 128, "M": 8} if quick else {"n": 300_000, "d": 128, "nlist": 1024, "M": 16}
    p.update({"nbits": 8, "niter": 10, "nq": 500, "workers": 1, "threads": 2})
    p.update({k: v for k, v in overrides.items() if v is not None})
    nprobes = [x for x in (1, 4, 16, 64) if x <= p["nlist"]]
    return run_ivf_bench(p["n"], p["d"], p["nlist"], p["M"], p["nbits"], p["niter"], nprobes, p["nq"],
                         min(p["n"], 64 * p["nlist"]), p["workers"], p["threads"], p.get("runner") or "auto",
                         p.get("backend") or "cpu")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int)
    ap.add_argument("--d", type=int)
    ap.add_argument("--nlist", type=int)
    ap.add_argument("--M", type=int)
    ap.add_argument("--nbits", type=int)
    ap.add_argument("--niter", type=int)
    ap.add_argument("--nq", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--backend", choices=("cpu", "gpu"), default="cpu",
                    help="pqgpu's training, encode and search backend (gpu: CuPy, an error without a GPU); faiss "
                         "stays faiss-cpu, the target's reference")
    ap.add_argument("--runner", choices=("auto", "processes"), default="auto",
                    help="auto: as `pqgpu run` picks for the size (in-process threads for small runs); processes: "
                         "always a LocalCluster of --workers processes")
    ap.add_argument("--out", default="bench-report")
    args = ap.parse_args(argv)
    from ..logs import configure

    configure(quiet=True)  # Dask's own INFO lines (scheduler, nanny, workers) stay out of the report
    from ..errors import PqgpuError

    try:
        r = run(args.quick, n=args.n, d=args.d, nlist=args.nlist, M=args.M, nbits=args.nbits, niter=args.niter,
                nq=args.nq, workers=args.workers, threads=args.threads, runner=args.runner, backend=args.backend)
    except PqgpuError as exc:  # e.g. --backend gpu without a GPU: the one paragraph, no traceback
        print(f"pqgpu.bench.ivf: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ivf.json").write_text(json.dumps(r, indent=2, default=str))
    md = report_markdown(r)
    (out / "ivf.md").write_text(md)
    plot_recall_qps(r, out / "ivf.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
