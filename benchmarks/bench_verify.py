"""Time `pqgpu verify` (and the presence check search/export run) on a synthetic store written directly
with zarr, not by encoding: random codes, int64 ids, every chunk done with its checksum.

    python benchmarks/bench_verify.py [--n 10000000] [--M 16] [--chunk-rows 65536] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr


def build(path: str, n: int, M: int, chunk_rows: int) -> None:
    from pqgpu.codebook import Codebook
    from pqgpu.store import chunk_checksum, create_store

    rng = np.random.default_rng(0)
    cb = Codebook(M * 4, M, 8, rng.standard_normal((M, 256, 4)).astype(np.float32))
    store = create_store(path, codebook=cb, n=n, chunk_rows=chunk_rows, id_dtype=np.int64, source={})
    g = zarr.open_group(path, mode="r+")
    sums = np.empty(store.n_chunks, np.uint32)
    for i in range(store.n_chunks):
        lo, hi = store.chunk_range(i)
        codes = rng.integers(0, 256, (hi - lo, cb.code_size), dtype=np.uint8)
        ids = np.arange(lo, hi, dtype=np.int64)
        g["codes"][lo:hi] = codes
        g["ids"][lo:hi] = ids
        sums[i] = chunk_checksum(codes, ids)
    g["checksums"][:] = sums
    g["done"][:] = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--M", type=int, default=16)
    p.add_argument("--chunk-rows", type=int, default=65536)
    p.add_argument("--dir", default=None)
    args = p.parse_args()
    from pqgpu.store import open_store

    tmp = tempfile.mkdtemp(dir=args.dir)
    path = str(Path(tmp) / "codes.zarr")
    try:
        t = time.perf_counter()
        build(path, args.n, args.M, args.chunk_rows)
        t_build = time.perf_counter() - t
        store = open_store(path)
        t = time.perf_counter()
        missing = store.missing_chunks()
        t_presence = time.perf_counter() - t
        t = time.perf_counter()
        report = store.verify()
        t_verify = time.perf_counter() - t
        assert not missing and not report.bad and report.checked == store.n_chunks
        mb = args.n * (args.M + 8) / 1e6
        print(f"n={args.n:,} M={args.M} chunk_rows={args.chunk_rows} ({store.n_chunks} chunks, {mb:.0f} MB of "
              f"codes+ids values; built in {t_build:.1f} s)")
        print(f"presence check (search/export): {t_presence:.3f} s")
        print(f"verify (presence + read + CRC-32 of every chunk): {t_verify:.2f} s ({mb / t_verify:.0f} MB/s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
