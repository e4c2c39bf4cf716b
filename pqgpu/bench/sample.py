"""The training sample (issue 22.1): bytes read and time for a block sample of a Parquet source, against the
encode of the whole source; and the training MSE from a block sample of cluster-sorted data against a
uniform row sample of the same data.

    python -m pqgpu.bench.sample --n 10000000 --d 96 --size 65536 --encode     # bytes, sample vs encode time
    python -m pqgpu.bench.sample --n 2000000 --d 96 --size 65536 --sorted      # MSE on cluster-sorted rows

Data is written under --tmp (default /tmp) and removed afterwards. The files were just written, so they are in
the page cache: the times are warm-cache reads; the bytes are those the readers asked for.
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

from . import environment, markdown_table

log = logging.getLogger(__name__)


def _write(out: Path, x: np.ndarray, order: np.ndarray, shards: int, row_group: int) -> None:
    """Rows x[order] in `shards` Parquet files (without a sorted copy of x in memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bounds = np.linspace(0, len(x), shards + 1).astype(np.int64)
    for s in range(shards):
        part = x[order[bounds[s]:bounds[s + 1]]]
        col = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), x.shape[1])
        pq.write_table(pa.table({"id": pa.array(np.arange(bounds[s], bounds[s + 1])), "embedding": col}),
                       out / f"shard-{s:04d}.parquet", row_group_size=row_group)


def _config(out: Path, M: int, size: int) -> Any:
    from ..config import config_from_dict

    return config_from_dict({
        "source": {"format": "parquet", "path": str(out / "*.parquet"), "id_column": "id",
                   "vector_column": "embedding"},
        "quantizer": {"path": str(out / "pq.faiss"), "M": M, "nbits": 8, "train_size": size, "niter": 10},
        "encode": {"output": str(out / "codes.zarr"), "backend": "cpu"}})


def bytes_and_time(n: int, d: int, size: int, shards: int, row_group: int, M: int, encode: bool,
                   tmp: str) -> dict[str, Any]:
    from ..sample import make_sample
    from ..sources import open_source
    from ..sources.sampling import draw_sample

    out = Path(tempfile.mkdtemp(prefix="pqgpu-bench-sample-", dir=tmp))
    try:
        t0 = time.perf_counter()
        make_sample(out, n, d, shards=shards, fmt="parquet", n_queries=1)
        (out / "queries.npy").unlink()
        log.info("wrote %d x %d in %.0f s", n, d, time.perf_counter() - t0)
        cfg = _config(out, M, size)
        source = open_source(cfg.source)
        s = draw_sample(source, size, seed=1234)
        row = {"n": n, "d": d, "shards": shards, "row_group": row_group, "sample": size, "blocks": s.blocks,
               "read_MiB": s.bytes_read / 2**20, "source_MiB": s.source_bytes / 2**20,
               "read_pct": 100 * s.bytes_read / s.source_bytes, "sample_s": s.seconds}
        if encode:
            from ..pipeline import encode as encode_all, train

            train(cfg)
            t0 = time.perf_counter()
            encode_all(cfg)
            row["encode_s"] = time.perf_counter() - t0
            row["sample_over_encode"] = row["sample_s"] / row["encode_s"]
        return row
    finally:
        shutil.rmtree(out, ignore_errors=True)


def sorted_mse(n: int, d: int, size: int, shards: int, row_group: int, M: int, clusters: int,
               tmp: str, strata: list[int] | None = None) -> list[dict[str, Any]]:
    """Rows stored sorted by their nearest of `clusters` centroids; PQ trained on the block sample vs on a
    uniform row sample of the same size (and one of another seed: the noise); MSE on 20k held-out uniform
    rows of the data. `strata`: also the sample with sampling.MIN_STRATA set to each of these."""
    import faiss

    import pqgpu
    from ..sample import sample_vectors
    from ..sources import open_source
    from ..sources.sampling import draw_sample

    x = np.empty((n, d), np.float32)
    for a in range(0, n, 10**6):  # in pieces: the generator's temporaries are several times the piece
        x[a:a + 10**6] = sample_vectors(min(10**6, n - a), d, seed=3, start=a)
    rng = np.random.default_rng(7)
    km = faiss.Kmeans(d, clusters, niter=10, seed=7)
    km.train(x[rng.choice(n, min(n, 64 * clusters), replace=False)])
    order = np.argsort(km.index.search(x, 1)[1][:, 0], kind="stable")  # stored row r is x[order[r]]
    held_out = order[rng.choice(n, 20000, replace=False)]
    train_rows = np.setdiff1d(order, held_out)
    out = Path(tempfile.mkdtemp(prefix="pqgpu-bench-sample-", dir=tmp))
    try:
        _write(out, x, order, shards, row_group)
        from ..sources import sampling

        source = open_source(_config(out, M, size).source)
        q = x[held_out]

        def mse(sample: np.ndarray) -> float:
            cb = pqgpu.train(np.ascontiguousarray(sample), M, 8, niter=10, seed=1234, backend="cpu")
            return float(((cb.decode(cb.encode(q)) - q) ** 2).sum(1).mean())

        m_uniform = mse(x[np.sort(rng.choice(train_rows, size, replace=False))])
        m_uniform2 = mse(x[np.sort(rng.choice(train_rows, size, replace=False))])
        rows = []
        default = sampling.MIN_STRATA
        for k in [None, *(strata or [])]:
            sampling.MIN_STRATA = default if k is None else k
            try:
                block = draw_sample(source, size, seed=1234)
            finally:
                sampling.MIN_STRATA = default
            # block-sample rows that are held out stay in: 20k of n, below the noise
            m_block = mse(block.x)
            rows.append({"n": n, "d": d, "clusters": clusters, "sample": size,
                         "min_strata": "default" if k is None else k, "blocks": block.blocks,
                         "read_pct": 100 * block.bytes_read / block.source_bytes, "mse_block": m_block,
                         "mse_uniform": m_uniform, "ratio": m_block / m_uniform,
                         "uniform_seed2_ratio": m_uniform2 / m_uniform})
        return rows
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2_000_000)
    p.add_argument("--d", type=int, default=96)
    p.add_argument("--size", type=int, default=65536)
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--row-group", type=int, default=16384)
    p.add_argument("--M", type=int, default=12)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--sorted", action="store_true", help="MSE on cluster-sorted data vs a uniform row sample")
    p.add_argument("--encode", action="store_true", help="also train and encode the source, for the time ratio")
    p.add_argument("--strata", default="", help="--sorted: also with MIN_STRATA at these values, e.g. 256,512")
    p.add_argument("--tmp", default="/tmp")
    p.add_argument("--json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if args.sorted:
        strata = [int(v) for v in args.strata.split(",") if v]
        rows = sorted_mse(args.n, args.d, args.size, args.shards, args.row_group, args.M, args.clusters, args.tmp,
                          strata)
    else:
        rows = [bytes_and_time(args.n, args.d, args.size, args.shards, args.row_group, args.M, args.encode,
                               args.tmp)]
    result = {"benchmark": "sample", "rows": rows, "environment": environment()}
    print(f"environment: {result['environment']}\n")
    print(markdown_table(rows, list(rows[0])))
    if args.json:
        from . import write_json

        write_json(args.json, result)


if __name__ == "__main__":
    main()
