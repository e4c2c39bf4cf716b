"""Seeded sample embeddings for the demo, benchmarks and tests: low intrinsic dimension, like real ones."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)


def sample_vectors(n: int, d: int, *, seed: int = 0, intrinsic: int = 24, start: int = 0) -> np.ndarray:
    """Rows start..start+n of an endless seeded dataset: a curved low-dimensional manifold plus noise,
    float32 (n, d). Uniform noise would make every quantizer look equally bad."""
    basis = (np.random.default_rng(seed).standard_normal((intrinsic, d)) / np.sqrt(intrinsic)).astype(np.float32)
    rng = np.random.default_rng([seed, start])
    z = rng.standard_normal((n, intrinsic), dtype=np.float32)
    x = np.tanh(z) @ basis
    x += 0.3 * np.sin(z @ basis)
    x += 0.05 * rng.standard_normal((n, d), dtype=np.float32)
    return x


def make_sample(out: str | os.PathLike, n: int, d: int, *, shards: int = 4, fmt: str = "parquet", seed: int = 0,
                n_queries: int = 100, string_ids: bool = False, dtype: str = "float32") -> list[Path]:
    """Write n vectors in `shards` files of `fmt` under out/ (plus out/queries.npy); returns the shard paths.

    Parquet: columns id (int64, or string with string_ids) and embedding (fixed_size_list<float>[d]).
    npy: shard-XXXX.npy and ids-XXXX.npy. zarr: shard-XXXX.zarr groups with arrays embedding and id.
    """
    if fmt not in ("parquet", "npy", "zarr"):
        raise ConfigError(f"--format: expected parquet, zarr or npy. Got {fmt!r} instead.")
    if n <= 0 or d <= 0 or shards <= 0:
        raise ConfigError(f"--n, --d and --shards must be positive. Got n={n}, d={d}, shards={shards}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    paths = []
    for s in range(shards):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        x = sample_vectors(hi - lo, d, seed=seed, start=lo).astype(dtype)
        ids = np.arange(lo, hi, dtype=np.int64) * 7 + 1000  # not row numbers, so id mix-ups show
        id_values = np.char.add("doc-", ids.astype(str)) if string_ids else ids
        paths.append(_write_shard(out, s, fmt, x, id_values))
    np.save(out / "queries.npy", sample_vectors(n_queries, d, seed=seed, start=10**12))
    log.info("wrote %d rows x %d in %d %s shard(s) to %s", n, d, shards, fmt, out)
    return paths


def _write_shard(out: Path, s: int, fmt: str, x: np.ndarray, ids: np.ndarray) -> Path:
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        values = pa.array(x.reshape(-1))
        table = pa.table({"id": pa.array(ids), "embedding": pa.FixedSizeListArray.from_arrays(values, x.shape[1])})
        path = out / f"shard-{s:04d}.parquet"
        pq.write_table(table, path, row_group_size=16384)
        return path
    if fmt == "npy":
        path = out / f"shard-{s:04d}.npy"
        np.save(path, x)
        np.save(out / f"ids-{s:04d}.npy", ids)
        return path
    import zarr

    path = out / f"shard-{s:04d}.zarr"
    g = zarr.open_group(path, mode="w")
    g.create_array("embedding", data=x, chunks=(min(16384, max(1, x.shape[0])), x.shape[1]))
    if ids.dtype.kind == "U":  # variable-length strings: fixed-width UTF-32 has no stable Zarr v3 spec
        g.create_array("id", shape=ids.shape, dtype=str)[...] = ids
    else:
        g.create_array("id", data=ids)
    return path
