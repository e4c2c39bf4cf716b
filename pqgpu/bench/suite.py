"""`pqgpu bench`: the encode, training, scaling and pipeline benchmarks in one run, written as JSON,
Markdown and PNG plots into one report folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from . import environment, markdown_table, timeit, write_json

log = logging.getLogger(__name__)


def scaling(ns: list[int], d: int, dsub: int, runs: int) -> dict[str, Any]:
    """Encode throughput vs n for one (d, dsub), pqgpu CPU vs faiss compute_codes."""
    from ..codebook import Codebook
    from .encode import make_problem

    x_all, c = make_problem(max(ns), d, dsub, 8)
    cb = Codebook(d, d // dsub, 8, c)
    pq = cb.to_faiss()
    rows = []
    for n in ns:
        x = x_all[:n]
        rows.append({"n": n, "d": d, "dsub": dsub,
                     "pqgpu_cpu": timeit(lambda: cb.encode(x, backend="cpu"), runs=runs).rate(n),
                     "faiss_compute_codes": timeit(lambda: pq.compute_codes(x), runs=runs).rate(n)})
    return {"benchmark": "scaling", "rows": rows}


def plots(out: Path, enc: dict[str, Any], scale: dict[str, Any]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'pqgpu[bench]')")
        return []
    written = []
    rows = enc["rows"]
    dsubs = sorted({r["dsub"] for r in rows})
    fig, axes = plt.subplots(1, len(dsubs), figsize=(4 * len(dsubs), 3.4), sharey=True, squeeze=False)
    for ax, dsub in zip(axes[0], dsubs):
        sel = sorted((r for r in rows if r["dsub"] == dsub), key=lambda r: r["d"])
        ds = [r["d"] for r in sel]
        for key, label in (("pqgpu_cpu", "pqgpu CPU"), ("faiss_compute_codes", "faiss compute_codes"),
                           ("faiss_knn", "faiss knn per subspace"), ("pqgpu_gpu_resident", "pqgpu GPU (resident)")):
            if key in sel[0]:
                ax.plot(ds, [r[key] for r in sel], marker="o", label=label)
        ax.set_title(f"dsub = {dsub}")
        ax.set_xlabel("d")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("vectors / s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Encode throughput, nbits 8")
    fig.tight_layout()
    fig.savefig(out / "encode_throughput.png", dpi=110)
    plt.close(fig)
    written.append("encode_throughput.png")

    fig, ax = plt.subplots(figsize=(7, 3.4))
    labels = [f"{r['d']}/{r['dsub']}" for r in rows]
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [r["vs_compute_codes"] for r in rows], width=0.4, label="vs compute_codes")
    ax.bar([i + 0.2 for i in xs], [r["vs_best_faiss"] for r in rows], width=0.4, label="vs faster faiss route")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), labels, rotation=60, fontsize=7)
    ax.set_xlabel("d / dsub")
    ax.set_ylabel("speed-up (x)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "encode_speedup.png", dpi=110)
    plt.close(fig)
    written.append("encode_speedup.png")

    fig, ax = plt.subplots(figsize=(5, 3.4))
    srows = scale["rows"]
    for key, label in (("pqgpu_cpu", "pqgpu CPU"), ("faiss_compute_codes", "faiss compute_codes")):
        ax.plot([r["n"] for r in srows], [r[key] for r in srows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("n (vectors per call)")
    ax.set_ylabel("vectors / s")
    ax.set_title(f"Scaling with n (d={srows[0]['d']}, dsub={srows[0]['dsub']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "encode_scaling.png", dpi=110)
    plt.close(fig)
    written.append("encode_scaling.png")
    return written


def run_bench(quick: bool = False, out: str = "bench-report", tiny: bool = False) -> int:
    """Run the suite and write report.json, report.md and PNG plots under `out`. Returns 0."""
    from . import encode, ivf, metric, pipeline, refine, train

    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = environment()
    if tiny:  # for the test suite: every stage runs, at toy sizes
        enc = encode.run(quick=True, n=2000, runs=1)
        tr = {"benchmark": "train", "runs": 1, "rows": [train.bench_point(2048, 32, 4, 8, 2, 1)]}
        scale = scaling([500, 2000], 64, 8, runs=1)
        pipe = pipeline.run(quick=True, n=3000, runs=1, big_n=0)
    else:
        enc = encode.run(quick=quick)
        tr = train.run(quick=quick)
        scale = scaling([1000, 10000, 100000] if not quick else [1000, 20000], 768, 8, runs=3)
        pipe = pipeline.run(quick=quick)
    ivf_r = None if tiny else ivf.run(quick=quick)  # IVF-PQ build and nprobe search vs faiss (pqgpu.bench.ivf)
    metric_r = None if tiny else metric.run(quick=quick)  # ip / cosine vs faiss METRIC_INNER_PRODUCT
    refine_r = None if tiny else refine.run(quick=quick)  # --refine R vs faiss IndexRefineFlat (pqgpu.bench.refine)
    report = {"environment": env, "encode": enc, "train": tr, "scaling": scale, "pipeline": pipe, "ivf": ivf_r,
              "metric": metric_r, "refine": refine_r, "seconds": time.perf_counter() - t0}
    write_json(outp / "report.json", report)
    images = plots(outp, enc, scale)
    if ivf_r and ivf.plot_recall_qps(ivf_r, outp / "ivf_recall_qps.png"):
        images.append("ivf_recall_qps.png")
    if refine_r and refine.plot_recall_qps(refine_r, outp / "refine_recall_qps.png"):
        images.append("refine_recall_qps.png")
    md = [f"# pqgpu benchmark report{' (quick)' if quick else ''}\n",
          "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()) + "\n",
          "## Encode\n", encode.render(enc), "## Training\n", train.render(tr),
          "## Scaling with n\n", markdown_table(scale["rows"]), "## Pipeline\n", pipeline.render(pipe)]
    if ivf_r:
        md.append(ivf.report_markdown(ivf_r))
    if metric_r:
        md.append(metric.report_markdown(metric_r))
    if refine_r:
        md.append(refine.report_markdown(refine_r))
    md += [f"![{name}]({name})\n" for name in images]
    md.append(f"\nTotal benchmark time: {report['seconds']:.0f} s\n")
    (outp / "report.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"report written to {outp}/report.md (+ report.json, {len(images)} plot(s))")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pqgpu.bench.suite [--quick] [--out DIR]`: the same run as `pqgpu bench`."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench-report")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return run_bench(quick=args.quick, out=args.out)


if __name__ == "__main__":
    raise SystemExit(main())
