"""The training sample: stratified blocks that read a bounded share of the source, spread over all of it,
seeded, equal to the source's own rows in every format (checked against vectors regenerated here)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pqgpu.config import config_from_dict
from pqgpu.sample import make_sample, sample_vectors
from pqgpu.sources import open_source
from pqgpu.sources import _parquet_pages as pages
from pqgpu.sources.sampling import draw_sample, plan_sample


def _source(path, fmt, *, ids=None):
    return open_source(config_from_dict({"source": {"format": fmt, "path": path, "id_column": ids,
                                                    "vector_column": "embedding"}}).source)


def _rows(n, d, shards):
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    return np.concatenate([sample_vectors(int(b - a), d, start=int(a)) for a, b in zip(bounds[:-1], bounds[1:])])


@pytest.mark.parametrize("shard_rows,size,unit", [
    ([10_000_000], 65536, 1), ([10_000_000], 65536, 2730), ([250_000] * 40, 262144, 341), ([7, 0, 13000, 5], 2000, 1),
    ([1000, 1000], 1999, 64), ([500], 500, 1)])
def test_plan_is_exact_disjoint_spread_and_seeded(shard_rows, size, unit):
    n = sum(shard_rows)
    blocks = plan_sample(shard_rows, size, seed=5, unit_rows=unit)
    assert blocks == plan_sample(shard_rows, size, seed=5, unit_rows=unit)
    assert sum(b.hi - b.lo for b in blocks) == min(size, n)
    offsets = np.concatenate([[0], np.cumsum(shard_rows)])
    for b in blocks:
        assert 0 <= b.lo < b.hi <= shard_rows[b.shard] and b.start == offsets[b.shard] + b.lo
    starts = [b.start for b in blocks]
    assert all(a.start + a.hi - a.lo <= b.start for a, b in zip(blocks, blocks[1:]))  # in order, disjoint
    if size >= 65536:  # hundreds of blocks, and every 1/100 of the source holds sample rows
        assert len(blocks) >= 256
        assert len(set(np.searchsorted(np.linspace(0, n, 101), starts, side="right"))) == 100
        assert plan_sample(shard_rows, size, seed=6, unit_rows=unit) != blocks


def _write_parquet(path, x, **kw):
    values = pa.array(x.reshape(-1))
    pq.write_table(pa.table({"id": pa.array(np.arange(len(x))),
                             "embedding": pa.FixedSizeListArray.from_arrays(values, x.shape[1])}), path, **kw)


def test_parquet_sample_reads_a_bounded_share_of_the_bytes(tmp_path, monkeypatch):
    """Counted at the file: a uniform row sample (the sampler before this one) reads every page."""
    n, d, shards = 240_000, 16, 4
    x = _rows(n, d, shards)
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    for s in range(shards):  # 64-row pages, 16384-row groups
        _write_parquet(tmp_path / f"s{s}.parquet", x[bounds[s]:bounds[s + 1]], row_group_size=16384,
                       data_page_size=4096, use_dictionary=False, compression="NONE")
    source = _source(str(tmp_path / "*.parquet"), "parquet")
    read = []
    real = pages._File.read
    monkeypatch.setattr(pages._File, "read", lambda self, off, k: read.append(len(b := real(self, off, k))) or b)
    sample_x, rows = source.sample(2000, seed=3)
    np.testing.assert_array_equal(sample_x, x[rows])
    vector_bytes = n * d * 4
    assert 0 < sum(read) < 0.25 * vector_bytes, (sum(read), vector_bytes)
    read.clear()
    sample = draw_sample(source, 2000, seed=3)  # the bytes it reports are those read
    assert sample.blocks >= 256 and 0 < sample.bytes_read <= sum(read)


def test_npy_sample_reads_only_its_blocks(tmp_path, monkeypatch):
    from pqgpu.sources import npy

    make_sample(tmp_path, 50_000, 8, shards=4, fmt="npy")
    source = _source(str(tmp_path / "shard-*.npy"), "npy")
    sliced = []
    real = npy._load

    class Counted:  # the memory map, counting the rows each slice touches
        def __init__(self, a):
            self.a = a

        def __getattr__(self, name):
            return getattr(self.a, name)

        def __getitem__(self, key):
            part = self.a[key]
            sliced.append(len(part))
            return part

    monkeypatch.setattr(npy, "_load", lambda *args: Counted(real(*args)))
    x, rows = source.sample(1000, seed=2)
    np.testing.assert_array_equal(x, _rows(50_000, 8, 4)[rows])
    assert sum(sliced) == 1000  # slices of the sampled rows only


def test_zarr_sample_reads_a_bounded_share_of_the_chunks(tmp_path, monkeypatch):
    import zarr

    n, d = 400_000, 4
    x = _rows(n, d, 1)
    g = zarr.open_group(tmp_path / "a.zarr", mode="w")
    g.create_array("embedding", data=x, chunks=(256, d))
    source = _source(str(tmp_path / "a.zarr"), "zarr")
    keys = []
    real = zarr.storage.LocalStore.get

    async def get(self, key, *a, **kw):
        if key.startswith("embedding/c"):
            keys.append(key)
        return await real(self, key, *a, **kw)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", get)
    sample_x, rows = source.sample(2000, seed=4)
    np.testing.assert_array_equal(sample_x, x[rows])
    assert 0 < len(keys) < 0.25 * (n // 256), len(keys)


@pytest.mark.parametrize("fmt", ["parquet", "npy", "zarr"])
def test_sample_is_seeded_spread_over_every_shard_and_the_source_rows(tmp_path, fmt):
    n, d = 20_000, 8
    make_sample(tmp_path, n, d, shards=4, fmt=fmt)
    path = {"parquet": "*.parquet", "npy": "shard-*.npy", "zarr": "*.zarr"}[fmt]
    source = _source(str(tmp_path / path), fmt)
    x, rows = source.sample(1200, seed=1)
    x2, rows2 = source.sample(1200, seed=1)
    np.testing.assert_array_equal(rows, rows2)
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(source.sample(1200, seed=2)[1], rows)
    assert len(np.unique(rows)) == 1200 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(x, _rows(n, d, 4)[rows])
    tenths = np.unique(rows * 10 // n)
    assert len(tenths) == 10  # every tenth of the source (so every shard) holds sample rows


def test_sample_through_fsspec(tmp_path):
    """Parquet shards at an fsspec URL (memory://): read by row group with pyarrow, the same rows."""
    import fsspec

    make_sample(tmp_path, 6000, 8, shards=2, fmt="parquet")
    fs = fsspec.filesystem("memory")
    for p in sorted(tmp_path.glob("*.parquet")):
        fs.pipe(f"/sampletest/{p.name}", p.read_bytes())
    try:
        source = _source("memory:///sampletest/*.parquet", "parquet")
        local = _source(str(tmp_path / "*.parquet"), "parquet")
        x, rows = source.sample(700, seed=9)
        np.testing.assert_array_equal(rows, local.sample(700, seed=9)[1])
        np.testing.assert_array_equal(x, _rows(6000, 8, 2)[rows])
    finally:
        fs.rm("/sampletest", recursive=True)
