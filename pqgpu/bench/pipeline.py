"""End-to-end Parquet -> Zarr codes: pqgpu (Dask) vs a seed-style single-process script, with the
read-only and encode-only limits measured beside it, and peak RSS (all processes) at two dataset sizes.

    python -m pqgpu.bench.pipeline [--quick] [--n 200000] [--big-n 2000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import PeakRSS, environment, markdown_table, timeit

log = logging.getLogger(__name__)


def seed_style(files: list[Path], pq_path: Path, out: Path, batch: int = 65536) -> int:
    """The script this project replaces: pyarrow batches -> faiss compute_codes -> append to one Zarr array."""
    import faiss
    import pyarrow.parquet as pq
    import zarr

    quantizer = faiss.read_ProductQuantizer(str(pq_path))
    codes = zarr.open_array(str(out), mode="w", shape=(0, quantizer.code_size), chunks=(batch, quantizer.code_size),
                            dtype="uint8")
    n = 0
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=batch, columns=["embedding"]):
            col = rb.column(0)
            x = col.flatten().to_numpy().reshape(len(col), -1)
            c = quantizer.compute_codes(np.ascontiguousarray(x, dtype=np.float32))
            codes.resize((n + len(c), quantizer.code_size))
            codes[n:n + len(c)] = c
            n += len(c)
    return n


def _read_chunk_task(source: Any, chunk: Any) -> int:
    x, _ = source.read_chunk(chunk)
    return int(x.shape[0])


def make_config(data: Path, work: Path, M: int, chunk_rows: int) -> Any:
    from ..config import config_from_dict

    return config_from_dict({
        "source": {"format": "parquet", "path": str(data / "*.parquet"), "id_column": "id"},
        "quantizer": {"path": str(work / "pq.faiss"), "M": M, "nbits": 8, "train_size": 20000, "niter": 4},
        "encode": {"output": str(work / "codes.zarr"), "chunk_rows": chunk_rows, "backend": "cpu"},
        "cluster": {"processes": True, "dashboard": False},  # the peak-RSS runs compare process clusters
    })


def run(quick: bool = False, n: int | None = None, d: int = 768, M: int = 96, runs: int | None = None,
        big_n: int | None = None, workdir: str | None = None, chunk_rows: int = 32768) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    from ..codebook import Codebook
    from ..pipeline import encode, train
    from ..sample import make_sample
    from ..sources import open_source, plan_chunks

    n = n or (20_000 if quick else 200_000)
    d, M = (128, 16) if quick else (d, M)
    runs = runs or (3 if quick else 5)
    big_n = big_n if big_n is not None else (0 if quick else 2_000_000)
    root = Path(workdir or tempfile.mkdtemp(prefix="pqgpu-bench-"))
    result: dict[str, Any] = {"benchmark": "pipeline", "n": n, "d": d, "M": M, "runs": runs, "chunk_rows": chunk_rows}
    try:
        data = root / "data"
        t0 = time.perf_counter()
        files = make_sample(data, n, d, shards=8, fmt="parquet")
        log.info("wrote %d x %d Parquet in %.1f s", n, d, time.perf_counter() - t0)
        cfg = make_config(data, root, M, chunk_rows)
        train(cfg)
        cb = Codebook.load(cfg.quantizer.path)
        source = open_source(cfg.source)
        chunks = plan_chunks([s.n_rows for s in source.shards], chunk_rows)

        t_seed = timeit(lambda: seed_style(files, Path(cfg.quantizer.path), root / "seed.zarr"), runs=runs)
        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=None or _cpus(), threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        result["cluster_start_s"] = time.perf_counter() - t0
        try:
            [src] = client.scatter([source], broadcast=True)
            t_read = timeit(lambda: sum(client.gather([client.submit(_read_chunk_task, src, c, pure=False) for c in chunks])),
                            runs=runs)
            x_mem = source.read_chunk(chunks[0])[0]
            t_enc = timeit(lambda: cb.encode(x_mem, backend="cpu"), runs=runs)
            t_ours = timeit(lambda: encode(cfg, overwrite=True, client=client), runs=runs)
        finally:
            client.close()
            cluster.close()
        read_rate, enc_rate = t_read.rate(n), t_enc.rate(x_mem.shape[0])
        harmonic = 1 / (1 / read_rate + 1 / enc_rate)
        ours = t_ours.rate(n)
        result.update({
            "pqgpu_rows_per_s": ours, "seed_style_rows_per_s": t_seed.rate(n), "read_only_rows_per_s": read_rate,
            "encode_only_rows_per_s": enc_rate, "harmonic_limit_rows_per_s": harmonic,
            "vs_seed_style": ours / t_seed.rate(n), "vs_harmonic_limit": ours / harmonic,
            "pqgpu_range_rows_per_s": f"{n / t_ours.max:,.0f}-{n / t_ours.min:,.0f}",
        })
        result["peak_rss"] = [_peak_rss(cfg, n, "small")]
        if big_n:
            big = root / "big"
            make_sample(big, big_n, d, shards=16, fmt="parquet")
            big_cfg = make_config(big, root / "bigwork", M, chunk_rows)
            shutil.copy(cfg.quantizer.path, root / "bigwork" / "pq.faiss") if (root / "bigwork").mkdir() is None else None
            result["peak_rss"].append(_peak_rss(big_cfg, big_n, "large"))
            result["rss_ratio_large_vs_small"] = result["peak_rss"][1]["peak_rss_mib"] / result["peak_rss"][0]["peak_rss_mib"]
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)
    return result


def _cpus() -> int:
    from ..cluster import default_workers

    return default_workers()[0]


def _peak_rss(cfg: Any, n: int, label: str) -> dict[str, Any]:
    """Peak RSS of this process plus its Dask workers for one full encode (fresh cluster, fresh store)."""
    from ..pipeline import encode

    with PeakRSS() as meter:
        t0 = time.perf_counter()
        encode(cfg, overwrite=True)
        seconds = time.perf_counter() - t0
    return {"label": label, "n": n, "peak_rss_mib": meter.peak / 2**20, "seconds": seconds, "rows_per_s": n / seconds}


def render(r: dict[str, Any]) -> str:
    rows = [
        {"route": "pqgpu encode (Dask, local processes)", "rows/s": r["pqgpu_rows_per_s"], "range": r["pqgpu_range_rows_per_s"]},
        {"route": "seed-style script (1 process, faiss compute_codes)", "rows/s": r["seed_style_rows_per_s"]},
        {"route": "read only (same shards, same workers)", "rows/s": r["read_only_rows_per_s"]},
        {"route": "encode only (in memory, pqgpu CPU)", "rows/s": r["encode_only_rows_per_s"]},
        {"route": "harmonic limit 1/(1/read + 1/encode)", "rows/s": r["harmonic_limit_rows_per_s"]},
    ]
    text = (f"Pipeline Parquet -> Zarr, n={r['n']:,} x d={r['d']}, M={r['M']}, nbits 8, chunk_rows {r['chunk_rows']}, "
            f"median of {r['runs']} runs\n\n" + markdown_table(rows, ["route", "rows/s", "range"])
            + f"\npqgpu / seed-style: {r['vs_seed_style']:.2f}x; pqgpu / harmonic limit: {r['vs_harmonic_limit']:.2f}; "
            f"Dask cluster start-up (not in the timings): {r['cluster_start_s']:.1f} s\n\n")
    text += "Peak RSS, this process + all Dask workers:\n\n" + markdown_table(r["peak_rss"])
    if "rss_ratio_large_vs_small" in r:
        text += f"\nratio large/small: {r['rss_ratio_large_vs_small']:.2f}\n"
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int)
    p.add_argument("--big-n", type=int, help="rows for the second peak-RSS run (default 2,000,000; 0 skips)")
    p.add_argument("--runs", type=int)
    p.add_argument("--workdir", help="keep data here instead of a temp dir")
    p.add_argument("--chunk-rows", type=int, default=32768)
    p.add_argument("--json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    for noisy in ("distributed", "pqgpu.pipeline"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = run(args.quick, args.n, runs=args.runs, big_n=args.big_n, workdir=args.workdir, chunk_rows=args.chunk_rows)
    result["environment"] = environment()
    print(f"environment: {result['environment']}\n")
    print(render(result))
    if args.json:
        from . import write_json

        write_json(args.json, result)


if __name__ == "__main__":
    main()
