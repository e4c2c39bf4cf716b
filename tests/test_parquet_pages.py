"""The fast Parquet page reader against pyarrow: equal bytes on every layout it accepts, refusal on the rest,
and no change to what ParquetReader returns or which errors it raises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pqgpu.config import SourceConfig
from pqgpu.errors import InputError
from pqgpu.sources import open_source, plan_chunks
from pqgpu.sources import parquet as P
from pqgpu.sources._parquet_pages import Unsupported, leaf_column, read_rows


def _vectors(n: int, d: int, dtype=np.float32, *, levels: int | None = None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    if levels:  # few distinct values, so the writer keeps dictionary encoding for whole pages
        x = np.round(x * levels) / levels
    return x.astype(dtype)


def _write(path: Path, x: np.ndarray, *, list_type: str = "fixed", nullable: bool = True, **kw) -> Path:
    n, d = x.shape
    values = pa.array(x.reshape(-1))
    if list_type == "fixed":
        col = pa.FixedSizeListArray.from_arrays(values, d)
    else:
        offsets = pa.array(np.arange(n + 1, dtype=np.int64 if list_type == "large" else np.int32) * d)
        col = (pa.LargeListArray if list_type == "large" else pa.ListArray).from_arrays(offsets, values)
    field = pa.field("embedding", col.type, nullable=nullable)
    table = pa.table({"id": pa.array(np.arange(n) * 3 + 7), "embedding": col},
                     schema=pa.schema([pa.field("id", pa.int64()), field]))
    pq.write_table(table, path, **kw)
    return path


def _arrow(path: Path, lo: int, hi: int) -> np.ndarray:
    col = pq.read_table(path, columns=["embedding"]).column(0).slice(lo, hi - lo).combine_chunks()
    return col.flatten().to_numpy().reshape(hi - lo, -1)


def _fast(path: Path, lo: int, hi: int, d: int) -> np.ndarray:
    pf = pq.ParquetFile(path)
    leaf = leaf_column(pf, "embedding")
    assert leaf is not None
    md = pf.metadata
    offsets = np.concatenate([[0], np.cumsum([md.row_group(i).num_rows for i in range(md.num_row_groups)])])
    return read_rows(str(path), pf, leaf, offsets, lo, hi, d)


LAYOUTS = {
    "snappy": dict(),
    "uncompressed-plain": dict(compression="none", use_dictionary=False),
    "zstd": dict(compression="zstd"),
    "gzip": dict(compression="gzip"),
    "brotli": dict(compression="brotli"),
    "lz4": dict(compression="lz4"),  # LZ4_RAW; hadoop-framed LZ4 fails raw decompression and goes to pyarrow
    "dictionary": dict(levels=4),
    "dictionary-zstd-v2": dict(levels=4, compression="zstd", data_page_version="2.0"),
    "v2-pages": dict(data_page_version="2.0"),
    "v2-uncompressed": dict(data_page_version="2.0", compression="none"),
    "byte-stream-split": dict(use_dictionary=False, column_encoding={"embedding.list.element": "BYTE_STREAM_SPLIT"}),
    "tiny-pages": dict(data_page_size=700, write_batch_size=7),  # lists split across pages
    "tiny-pages-v2": dict(data_page_size=700, write_batch_size=7, data_page_version="2.0"),
    "float64": dict(dtype=np.float64),
    "float16": dict(dtype=np.float16),
    "float16-dictionary-v2": dict(dtype=np.float16, levels=4, data_page_version="2.0"),
    "float16-byte-stream-split": dict(dtype=np.float16, use_dictionary=False,
                                      column_encoding={"embedding.list.element": "BYTE_STREAM_SPLIT"}),
    "list": dict(list_type="list"),
    "large-list": dict(list_type="large"),
    "not-nullable": dict(nullable=False),
    "d=1": dict(d=1),
    "d=1-dictionary": dict(d=1, levels=2),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_fast_reader_equals_pyarrow(tmp_path, name):
    kw = dict(LAYOUTS[name])
    d = kw.pop("d", 13)
    x = _vectors(1000, d, kw.pop("dtype", np.float32), levels=kw.pop("levels", None))
    path = _write(tmp_path / "a.parquet", x, list_type=kw.pop("list_type", "fixed"),
                  nullable=kw.pop("nullable", True), row_group_size=300, **kw)
    for lo, hi in [(0, 1000), (0, 300), (299, 301), (17, 18), (450, 999), (999, 1000), (5, 905)]:
        ours = _fast(path, lo, hi, d)
        ref = _arrow(path, lo, hi)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        assert np.array_equal(ours.view(np.uint8), ref.view(np.uint8)), (lo, hi)
    assert np.array_equal(_fast(path, 0, 1000, d), x)


def _null_list(path):
    x = _vectors(50, 4)
    rows = [list(r) for r in x]
    rows[31] = None
    pq.write_table(pa.table({"embedding": pa.array(rows, pa.list_(pa.float32(), 4))}), path)


def _null_value(path):
    rows = [list(r) for r in _vectors(50, 4)]
    rows[12][2] = None
    pq.write_table(pa.table({"embedding": pa.array(rows, pa.list_(pa.float32()))}), path)


def _ragged_same_total(path):
    rows = [list(r) for r in _vectors(50, 4)]
    rows[10] = rows[10] + [1.0]  # one row longer, a later one shorter: the value count still equals rows x d
    rows[40] = rows[40][:3]
    pq.write_table(pa.table({"embedding": pa.array(rows, pa.list_(pa.float32()))}), path)


def _long_row_same_total(path, **kw):
    rows = [list(r) for r in _vectors(50, 8)]
    rows[10] = rows[10] * 8  # 56 values too many (a run of repetition level 1 over several list starts) ...
    for i in range(20, 28):
        rows[i] = rows[i][:1]  # ... and 56 too few later
    pq.write_table(pa.table({"embedding": pa.array(rows, pa.list_(pa.float32()))}), path, **kw)


def _empty_list(path):
    rows = [list(r) for r in _vectors(50, 4)]
    rows[7] = []
    pq.write_table(pa.table({"embedding": pa.array(rows, pa.list_(pa.float32()))}), path)


@pytest.mark.parametrize("make", [_null_list, _null_value, _ragged_same_total, _long_row_same_total, _empty_list])
def test_fast_reader_refuses_what_it_cannot_read_exactly(tmp_path, make):
    path = tmp_path / "a.parquet"
    make(path)
    pf = pq.ParquetFile(path)
    d = len(pq.read_table(path).column(0)[0])
    with pytest.raises(Unsupported):
        read_rows(str(path), pf, leaf_column(pf, "embedding"), np.array([0, pf.metadata.num_rows]), 0,
                  pf.metadata.num_rows, d)


def test_a_long_list_is_found_even_when_the_rows_that_make_up_the_count_are_not_read(tmp_path):
    _long_row_same_total(tmp_path / "a.parquet", data_page_size=64, write_batch_size=2)  # pages of ~2 rows
    pf = pq.ParquetFile(tmp_path / "a.parquet")
    with pytest.raises(Unsupported):
        read_rows(str(tmp_path / "a.parquet"), pf, leaf_column(pf, "embedding"), np.array([0, 50]), 0, 15, 8)


@pytest.mark.parametrize("make, message", [
    (_null_list, "row 31 has a null embedding"),
    (_null_value, "row 12 has a null value"),
    (_ragged_same_total, "row 10 has an embedding of length 5"),
    (_long_row_same_total, "row 10 has an embedding of length 64"),
    (_empty_list, "row 7 has an embedding of length 0"),
])
def test_refused_files_still_get_pyarrow_errors(tmp_path, make, message):
    (tmp_path / "d").mkdir()
    make(tmp_path / "d" / "a.parquet")
    cfg = SourceConfig(format="parquet", path=str(tmp_path / "d"), id_column=None)
    with pytest.raises(InputError, match=message):
        source = open_source(cfg)
        source.read_chunk(_chunks(source, 10**6)[0])


def _chunks(source, rows):
    return plan_chunks([s.n_rows for s in source.shards], rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_reader_output_is_the_same_with_and_without_the_fast_path(tmp_path, monkeypatch, dtype):
    (tmp_path / "d").mkdir()
    for s in range(2):
        _write(tmp_path / "d" / f"s{s}.parquet", _vectors(700, 24, dtype, seed=s), row_group_size=256)
    source = open_source(SourceConfig(format="parquet", path=str(tmp_path / "d"), id_column="id"))
    chunks = _chunks(source, 333)
    used = []
    real = P.read_rows
    monkeypatch.setattr(P, "read_rows", lambda *a: used.append(real(*a)) or used[-1])
    first = [source.read_chunk(c) for c in chunks]
    assert len(used) == sum(len(c.pieces) for c in chunks)  # every piece went through the page reader
    monkeypatch.setattr(P, "FAST_PAGES", False)
    slow = [source.read_chunk(c) for c in chunks]
    for (xf, idf), (xs, ids) in zip(first, slow):
        assert xf.dtype == xs.dtype and np.array_equal(xf, xs) and np.array_equal(idf, ids)


def test_truncated_file_falls_back_to_the_pyarrow_error(tmp_path):
    (tmp_path / "d").mkdir()
    path = _write(tmp_path / "d" / "a.parquet", _vectors(2000, 16), row_group_size=500)
    source = open_source(SourceConfig(format="parquet", path=str(tmp_path / "d"), id_column="id"))
    data = path.read_bytes()
    # cut the middle out, keep the footer: the metadata still promises row groups the bytes no longer hold
    path.write_bytes(data[:len(data) // 3] + data[-(len(data) // 4):])
    with pytest.raises(InputError, match="a.parquet"):
        source.read_chunk(_chunks(source, 10**6)[-1])


def test_corrupted_bytes_give_the_same_result_or_error_as_pyarrow(tmp_path, monkeypatch):
    """Flip one byte at 80 seeded places (headers, levels, values, footer): with and without the page reader,
    either both read the same arrays or both raise InputError; no other exception escapes."""
    (tmp_path / "d").mkdir()
    path = _write(tmp_path / "d" / "a.parquet", _vectors(600, 16), row_group_size=200, data_page_size=2000)
    good = path.read_bytes()
    rng = np.random.default_rng(1)
    errors = 0

    def read_all(fast: bool):
        monkeypatch.setattr(P, "FAST_PAGES", fast)
        P._open.cache_clear()
        P._leaf.cache_clear()
        try:
            source = open_source(SourceConfig(format="parquet", path=str(tmp_path / "d"), id_column="id"))
            parts = [source.read_chunk(c) for c in _chunks(source, 250)]
        except InputError:
            return None
        return np.concatenate([x for x, _ in parts]), np.concatenate([i for _, i in parts])

    for _ in range(80):
        data = bytearray(good)
        data[int(rng.integers(4, len(data) - 8))] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        fast, slow = read_all(True), read_all(False)
        assert (fast is None) == (slow is None)
        if fast is None:
            errors += 1
        else:
            assert np.array_equal(fast[0].view(np.uint32), slow[0].view(np.uint32)) and np.array_equal(fast[1], slow[1])
    assert errors  # some flips must hit structure, or the test exercised nothing but values


@pytest.mark.parametrize("levels", [None, 4])  # plain pages, and dictionary pages (the dictionary is re-read)
def test_later_reads_of_a_large_row_group_start_at_the_page_they_need(tmp_path, monkeypatch, levels):
    import pqgpu.sources._parquet_pages as pages

    x = _vectors(2000, 8, levels=levels)
    path = _write(tmp_path / "a.parquet", x, row_group_size=2000, data_page_size=1024)
    checks = []
    real = pages._levels_ok
    monkeypatch.setattr(pages, "_levels_ok", lambda *a: checks.append(1) or real(*a))
    first = _fast(path, 0, 1900, 8)
    pages_to_1900 = len(checks)
    checks.clear()
    again = _fast(path, 1800, 1900, 8)
    assert 0 < len(checks) < pages_to_1900 / 4  # resumed near row 1800, not from the row group's start
    assert np.array_equal(first, x[:1900]) and np.array_equal(again, x[1800:1900])
    assert np.array_equal(_fast(path, 5, 7, 8), x[5:7])


def test_pyarrow_path_streams_slices_of_large_row_groups(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    x = _vectors(2000, 8)
    _write(tmp_path / "d" / "a.parquet", x, row_group_size=2000)
    monkeypatch.setattr(P, "FAST_PAGES", False)
    monkeypatch.setattr(P, "STREAM_BATCH_ROWS", 64)
    whole = []
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", lambda *a, **k: whole.append(1))  # must not be used
    source = open_source(SourceConfig(format="parquet", path=str(tmp_path / "d"), id_column="id"))
    for c in _chunks(source, 300):
        got, ids = source.read_chunk(c)
        assert np.array_equal(got, x[c.start:c.stop]) and np.array_equal(ids, np.arange(c.start, c.stop) * 3 + 7)
    assert not whole


def test_threads_reading_one_row_group_get_the_right_rows(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    x = _vectors(3000, 8, levels=4)
    path = _write(tmp_path / "a.parquet", x, row_group_size=3000, data_page_size=512)
    ranges = [(lo, min(3000, lo + 137)) for lo in range(0, 3000, 137)] * 3
    np.random.default_rng(0).shuffle(ranges)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda r: _fast(path, r[0], r[1], 8), ranges))
    for (lo, hi), g in zip(ranges, got):
        assert np.array_equal(g, x[lo:hi])


@pytest.mark.parametrize("writer", ["polars", "duckdb"])
def test_files_from_other_writers(tmp_path, writer):
    """Other writers lay pages out differently (polars: no dictionary, its own page sizes; duckdb: its own
    statistics, PLAIN_DICTIONARY, byte-stream-split in V2). Runs where those packages are installed."""
    x = _vectors(5000, 24, levels=4 if writer == "duckdb" else None)
    paths = []
    if writer == "polars":
        pl = pytest.importorskip("polars")
        for compression in ("zstd", "lz4", "uncompressed"):
            paths.append(tmp_path / f"{compression}.parquet")
            pl.DataFrame({"id": np.arange(5000), "embedding": x}).write_parquet(
                paths[-1], compression=compression, row_group_size=1500)
    else:
        duckdb = pytest.importorskip("duckdb")
        con = duckdb.connect()
        table = pa.table({"id": pa.array(np.arange(5000)),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 24)})
        con.register("t", table)
        for version in ("V1", "V2"):
            paths.append(tmp_path / f"{version}.parquet")
            con.execute(f"COPY t TO '{paths[-1]}' (FORMAT parquet, PARQUET_VERSION {version}, ROW_GROUP_SIZE 2048)")
    for path in paths:
        for lo, hi in [(0, 5000), (1499, 1502), (3000, 4999)]:
            assert np.array_equal(_fast(path, lo, hi, 24), x[lo:hi]), (path.name, lo, hi)


def test_chunks_over_several_shards_are_read_into_one_array(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    xs = [_vectors(300, 8, seed=s) for s in range(3)]
    for s, x in enumerate(xs):
        _write(tmp_path / "d" / f"s{s}.parquet", x, row_group_size=128)
    source = open_source(SourceConfig(format="parquet", path=str(tmp_path / "d"), id_column="id"))
    outs = []
    real = P.read_rows
    monkeypatch.setattr(P, "read_rows", lambda *a: outs.append(a[-1]) or real(*a))
    x, ids = source.read_chunk(_chunks(source, 900)[0])
    assert np.array_equal(x, np.concatenate(xs)) and len(ids) == 900
    assert len(outs) == 3 and all(o is not None and np.shares_memory(o, x) for o in outs)


def test_chunk_over_shards_of_different_dtypes(tmp_path):
    (tmp_path / "d").mkdir()
    a, b = _vectors(50, 4), _vectors(70, 4, np.float64, seed=1)
    np.save(tmp_path / "d" / "shard-0.npy", a)
    np.save(tmp_path / "d" / "shard-1.npy", b)
    source = open_source(SourceConfig(format="npy", path=str(tmp_path / "d" / "shard-*.npy"), id_column=None))
    x, ids = source.read_chunk(_chunks(source, 1000)[0])
    assert x.dtype == np.float64 and np.array_equal(x, np.concatenate([a, b])) and np.array_equal(ids, np.arange(120))
