"""GPU targets: device-resident encode (vs faiss-gpu), training 1M x 768 on the GPU, and the Parquet -> Zarr
pipeline against the rate at which the same shards can merely be read and copied to the device."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import environment, markdown_table, timeit

log = logging.getLogger(__name__)


def device_encode(n: int, d: int, M: int, runs: int) -> dict[str, Any]:
    import cupy

    from .. import kernels
    from .encode import make_problem

    x, c = make_problem(n, d, d // M, 8)
    xg, cg = cupy.asarray(x), cupy.asarray(c)
    prepared = kernels.prepare_centroids(cg)
    sync = cupy.cuda.Stream.null.synchronize
    t = timeit(lambda: kernels.pack_codes(kernels.assign(xg, cg, prepared=prepared, block_bytes=2 << 30), 8),
               runs=runs, sync=sync)
    row = {"n": n, "d": d, "M": M, "pqgpu_gpu_resident": t.rate(n)}
    try:
        import faiss

        if faiss.get_num_gpus() > 0:
            res = faiss.StandardGpuResources()
            dsub = d // M
            indexes = []
            for m in range(M):
                idx = faiss.GpuIndexFlatL2(res, dsub)
                idx.add(c[m])
                indexes.append(idx)
            xs = [np.ascontiguousarray(x[:, m * dsub:(m + 1) * dsub]) for m in range(M)]
            tf = timeit(lambda: [indexes[m].search(xs[m], 1) for m in range(M)], runs=runs)
            row["faiss_gpu_flat_per_subspace"] = tf.rate(n)
            row["vs_faiss_gpu"] = row["pqgpu_gpu_resident"] / row["faiss_gpu_flat_per_subspace"]
    except (ImportError, AttributeError):
        pass
    return row


def gpu_training(n: int, d: int, M: int, niter: int, runs: int) -> dict[str, Any]:
    import cupy

    import pqgpu
    from ..sample import sample_vectors

    x = sample_vectors(n, d, seed=1)
    t = timeit(lambda: pqgpu.train(x, M, 8, niter=niter, backend="gpu"), runs=runs,
               sync=cupy.cuda.Stream.null.synchronize)
    return {"n_train": n, "d": d, "M": M, "niter": niter, "gpu_train_s": t.median,
            "note": "faiss-style sampling: at most 256 rows per centroid (65,536) enter k-means"}


def gpu_pipeline(n: int, d: int, M: int, runs: int) -> dict[str, Any]:
    import cupy

    from ..config import config_from_dict
    from ..pipeline import encode, train
    from ..sample import make_sample
    from ..sources import open_source, plan_chunks

    root = Path(tempfile.mkdtemp(prefix="pqgpu-gpu-"))
    try:
        make_sample(root / "data", n, d, shards=8, fmt="parquet")
        try:
            import dask_cuda  # noqa: F401
            kind = "local-cuda"
        except ImportError:
            kind = "local"
        cfg = config_from_dict({
            "source": {"format": "parquet", "path": str(root / "data/*.parquet"), "id_column": "id"},
            "quantizer": {"path": str(root / "pq.faiss"), "M": M, "nbits": 8, "train_size": 65536, "niter": 5},
            "encode": {"output": str(root / "codes.zarr"), "chunk_rows": 131072, "backend": "gpu"},
            "cluster": {"kind": kind, "n_workers": 1 if kind == "local" else None},
        })
        train(cfg)
        source = open_source(cfg.source)
        chunks = plan_chunks([s.n_rows for s in source.shards], cfg.encode.chunk_rows)

        def read_and_copy() -> None:
            for c in chunks:
                x, _ = source.read_chunk(c)
                cupy.asarray(x)
            cupy.cuda.Stream.null.synchronize()

        t_copy = timeit(read_and_copy, runs=runs)
        t_pipe = timeit(lambda: encode(cfg, overwrite=True), runs=runs)
        return {"n": n, "d": d, "M": M, "cluster": kind, "read_and_copy_rows_per_s": t_copy.rate(n),
                "pipeline_rows_per_s": t_pipe.rate(n), "pipeline_vs_read_copy": t_copy.median / t_pipe.median}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    from ..backend import resolve_backend

    resolve_backend("gpu")  # fails clearly without a GPU
    result = {"environment": environment(), "encode": device_encode(4_000_000, 768, 96, args.runs),
              "train": gpu_training(1_000_000, 768, 96, 25, args.runs),
              "pipeline": gpu_pipeline(2_000_000, 768, 96, 3)}
    print(f"environment: {result['environment']}\n")
    for key in ("encode", "train", "pipeline"):
        print(f"### {key}\n\n" + markdown_table([result[key]]))
    if args.json:
        from . import write_json

        write_json(args.json, result)
