"""A fast reader for the one Parquet layout embeddings nearly always have: a list column of floats with no
nulls and every list of length d.

pyarrow rebuilds list offsets and validity bitmaps from the repetition and definition levels of every value;
profiled on 768-d float32 that is about 40 % of a read, and fresh-page zeroing for its temporary buffers
another 15 % (benchmarks/RESULTS.md). Here the pages of the leaf column are read one by one, decompressed
with pyarrow's codecs, their levels only *checked* (numba, no arrays built) and the values copied straight
into the (rows, d) output.

Anything this reader does not know — another encoding, LZ4 (hadoop) framing, nested lists, a null,
a list of another length, a truncated page — raises `Unsupported`, and the caller reads the row groups with
pyarrow instead, which gives the exact error. Levels are checked from the first page of each row group, so a
row's position never depends on pages that were skipped; the pages found good are remembered per process, so
the next chunk of a large row group starts at its own page. Memory is one page at a time plus the output
(pyarrow's read_row_groups holds a whole row group: 3 GiB for a default 1Mi-row group of 768-d float32).
tests/test_parquet_pages.py compares this reader with pyarrow on every layout it accepts and on those it must
refuse.
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
from collections import OrderedDict
from typing import Any

import numba
import numpy as np
import pyarrow as pa

__all__ = ["Unsupported", "leaf_column", "page_rows", "read_rows"]


class Unsupported(Exception):
    """This file or page is outside the fast path: read it with pyarrow."""


# parquet.thrift enums
_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
_PLAIN, _PLAIN_DICTIONARY, _RLE, _RLE_DICTIONARY, _BYTE_STREAM_SPLIT = 0, 2, 3, 8, 9
_CODECS = {"UNCOMPRESSED": None, "SNAPPY": "snappy", "GZIP": "gzip", "BROTLI": "brotli", "ZSTD": "zstd",
           "LZ4_RAW": "lz4_raw", "LZ4": "lz4_raw"}
_VALUE_DTYPES = {"FLOAT": np.dtype("<f4"), "DOUBLE": np.dtype("<f8")}


def _value_dtype(column: Any) -> np.dtype | None:
    """numpy dtype of a leaf's values: float32, float64, or float16 (FIXED_LEN_BYTE_ARRAY(2), logical Float16)."""
    if column.physical_type == "FIXED_LEN_BYTE_ARRAY":
        is_half = column.length == 2 and str(getattr(column.logical_type, "type", "")).upper() == "FLOAT16"
        return np.dtype("<f2") if is_half else None
    return _VALUE_DTYPES.get(column.physical_type)


# -- Thrift compact protocol: just enough to read a PageHeader --------------------------------------------

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise Unsupported("page header runs past the bytes read")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _zigzag(buf: bytes, pos: int) -> tuple[int, int]:
    v, pos = _varint(buf, pos)
    return (v >> 1) ^ -(v & 1), pos


def _skip(buf: bytes, pos: int, ctype: int) -> int:
    if ctype in (1, 2):  # bool inside a struct field header: no payload
        return pos
    if ctype == 3:
        return pos + 1
    if ctype in (4, 5, 6):
        return _varint(buf, pos)[1]
    if ctype == 7:
        return pos + 8
    if ctype == 8:
        n, pos = _varint(buf, pos)
        return pos + n
    if ctype in (9, 10):
        head = buf[pos]
        pos += 1
        n, etype = head >> 4, head & 0x0F
        if n == 15:
            n, pos = _varint(buf, pos)
        for _ in range(n):
            pos = pos + 1 if etype in (1, 2) else _skip(buf, pos, etype)
        return pos
    if ctype == 11:
        n, pos = _varint(buf, pos)
        if n:
            kv = buf[pos]
            pos += 1
            for _ in range(n):
                pos = _skip(buf, pos, kv >> 4)
                pos = _skip(buf, pos, kv & 0x0F)
        return pos
    if ctype == 12:
        return _struct(buf, pos, None)[1]
    raise Unsupported(f"thrift type {ctype}")


def _struct(buf: bytes, pos: int, wanted: dict | None) -> tuple[dict, int]:
    """Read a struct; `wanted` maps field id -> sub-struct spec (dict) or None for an integer/bool field."""
    out: dict = {}
    fid = 0
    while True:
        if pos >= len(buf):
            raise Unsupported("page header runs past the bytes read")
        head = buf[pos]
        pos += 1
        if head == 0:
            return out, pos
        ctype, delta = head & 0x0F, head >> 4
        if delta:
            fid += delta
        else:
            fid, pos = _zigzag(buf, pos)
        if wanted is not None and fid in wanted:
            spec = wanted[fid]
            if ctype == 12:
                out[fid], pos = _struct(buf, pos, spec)
            elif ctype in (1, 2):
                out[fid] = ctype == 1
            elif ctype in (3, 4, 5, 6):
                out[fid], pos = (buf[pos], pos + 1) if ctype == 3 else _zigzag(buf, pos)
            else:
                raise Unsupported(f"unexpected thrift type {ctype} for page header field {fid}")
        else:
            pos = _skip(buf, pos, ctype)


_DATA_V1 = {1: None, 2: None, 3: None, 4: None}  # num_values, encoding, def / rep level encodings
_DICT = {1: None, 2: None}  # num_values, encoding
_DATA_V2 = {1: None, 2: None, 3: None, 4: None, 5: None, 6: None, 7: None}
_PAGE_HEADER = {1: None, 2: None, 3: None, 5: _DATA_V1, 7: _DICT, 8: _DATA_V2}


# -- levels and dictionary indices (RLE / bit-packed hybrid) ----------------------------------------------

@numba.njit(cache=True, nogil=True)
def _run_header(data, pos):  # pragma: no cover - compiled
    """The ULEB128 header of the next run at pos: (header, position after it), or (-1, pos) past the end."""
    header = 0
    shift = 0
    while True:
        if pos >= data.size:
            return -1, pos
        b = data[pos]
        pos += 1
        header |= np.int64(b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return header, pos


@numba.njit(cache=True, nogil=True)
def _bits(data, bitpos, mask):  # pragma: no cover - compiled
    """The value at bit position bitpos (LSB first), up to 32 bits wide."""
    byte = bitpos >> 3
    word = np.int64(0)
    for k in range(min(5, data.size - byte)):
        word |= np.int64(data[byte + k]) << (8 * k)
    return (word >> (bitpos & 7)) & mask


@numba.njit(cache=True, nogil=True)
def _run_value(data, pos, byte_width):  # pragma: no cover - compiled
    v = np.int64(0)
    for k in range(byte_width):
        v |= np.int64(data[pos + k]) << (8 * k)
    return v


@numba.njit(cache=True, nogil=True)
def _levels_ok(data, bit_width, n, max_def, d, first):  # pragma: no cover - compiled
    """Check n levels of the hybrid encoding in data. max_def >= 0: every level must equal it (no nulls).
    max_def < 0: repetition levels, 0 exactly where a list starts, i.e. at values first + k*d."""
    pos = 0
    i = 0
    byte_width = (bit_width + 7) // 8
    mask = (np.int64(1) << bit_width) - 1
    while i < n:
        header, pos = _run_header(data, pos)
        if header < 0:
            return False
        if header & 1:  # bit-packed: groups of 8 values
            count = (header >> 1) * 8
            if pos + (header >> 1) * bit_width > data.size:
                return False
            for j in range(min(count, n - i)):
                v = _bits(data, pos * 8 + j * bit_width, mask)
                if max_def >= 0:
                    if v != max_def:
                        return False
                elif (v == 0) != ((first + i + j) % d == 0):
                    return False
            pos += (header >> 1) * bit_width
        else:  # one value repeated
            count = header >> 1
            if count == 0 or pos + byte_width > data.size:
                return False
            v = _run_value(data, pos, byte_width)
            pos += byte_width
            run = min(count, n - i)
            if max_def >= 0:
                if v != max_def:
                    return False
            elif v == 0:  # a run of list starts: only possible when every list has one value
                for j in range(run):
                    if (first + i + j) % d != 0:
                        return False
            else:  # no list may start inside the run
                start = first + i
                if ((start + d - 1) // d) * d < start + run:
                    return False
        i += count
    return True


@numba.njit(cache=True, nogil=True)
def _gather_dict(data, bit_width, n, dictionary, out):  # pragma: no cover - compiled
    """out[:n] = dictionary[indices], indices in the hybrid encoding. False on a bad index or short data."""
    pos = 0
    i = 0
    byte_width = (bit_width + 7) // 8
    mask = (np.int64(1) << bit_width) - 1
    size = dictionary.size
    while i < n:
        header, pos = _run_header(data, pos)
        if header < 0:
            return False
        if header & 1:
            count = (header >> 1) * 8
            if pos + (header >> 1) * bit_width > data.size:
                return False
            for j in range(min(count, n - i)):
                v = _bits(data, pos * 8 + j * bit_width, mask)
                if v >= size:
                    return False
                out[i + j] = dictionary[v]
            pos += (header >> 1) * bit_width
        else:
            count = header >> 1
            if count == 0 or pos + byte_width > data.size:
                return False
            v = _run_value(data, pos, byte_width)
            pos += byte_width
            if v >= size:
                return False
            for j in range(min(count, n - i)):
                out[i + j] = dictionary[v]
        i += count
    return True


# -- reading ----------------------------------------------------------------------------------------------

def leaf_column(pf: Any, column: str) -> int | None:
    """Index of the single float leaf under a one-level list column, or None when the layout is not that."""
    schema = pf.schema
    leaves = [i for i in range(len(schema)) if schema.column(i).path.split(".")[0] == column]
    if len(leaves) != 1:
        return None
    c = schema.column(leaves[0])
    if _value_dtype(c) is None or c.max_repetition_level != 1 or c.max_definition_level < 1:
        return None
    return leaves[0]


class _File:
    def __init__(self, path: str):
        self.f = open(path, "rb", buffering=0)
        st = os.fstat(self.f.fileno())
        self.size = st.st_size
        self.key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        self.bytes_read = 0

    def read(self, offset: int, n: int) -> bytes:
        self.f.seek(offset)
        data = self.f.read(max(0, min(n, self.size - offset)))
        self.bytes_read += len(data)
        return data

    def close(self) -> None:
        self.f.close()


def _decompress(codec: str | None, data: Any, size: int) -> np.ndarray:
    if codec is None:
        if len(data) != size:
            raise Unsupported("page size mismatch")
        return np.frombuffer(data, np.uint8)
    try:
        buf = pa.decompress(data, decompressed_size=size, codec=codec, asbytes=False)
    except (pa.ArrowException, OSError) as exc:
        raise Unsupported(f"decompression failed: {exc}") from None
    if buf.size != size:
        raise Unsupported("decompressed page size mismatch")
    return np.frombuffer(buf, np.uint8)


def _bit_width(max_level: int) -> int:
    return int(max_level).bit_length()


def read_rows(path: str, pf: Any, leaf: int, row_group_offsets: Any, lo: int, hi: int, d: int,
              out: np.ndarray | None = None, *, skip_pages: bool = False, stats: dict | None = None) -> np.ndarray:
    """Vectors of rows [lo, hi) of the file (counted from its first row), (hi - lo, d) in the column's dtype;
    written into `out` when it is a C-contiguous array of that shape and dtype.

    skip_pages: reach the first wanted page by the value counts in the page headers before it, reading only
    those headers (the training sample: a few rows deep inside a row group cost about one page, not the row
    group up to them). The pages skipped are not checked, so on a malformed file (a null or ragged list
    before the rows) the rows returned are real rows of the file but maybe not rows lo..hi; encode reads
    every page and names such a row. stats: its "bytes" grows by the bytes read from the file."""
    md = pf.metadata
    col = pf.schema.column(leaf)
    dtype = _value_dtype(col)
    max_def, max_rep = col.max_definition_level, col.max_repetition_level
    if out is None or out.shape != (hi - lo, d) or out.dtype != dtype or not out.flags.c_contiguous:
        out = np.empty((hi - lo, d), dtype)
    flat = out.reshape(-1)
    first = int(np.searchsorted(row_group_offsets, lo, side="right")) - 1
    f = _File(path)
    try:
        g = first
        while g < md.num_row_groups and row_group_offsets[g] < hi:
            rg_lo = int(row_group_offsets[g])
            a, b = max(lo, rg_lo) - rg_lo, min(hi, int(row_group_offsets[g + 1])) - rg_lo
            rg = md.row_group(g)
            _read_row_group(f, rg.column(leaf), dtype, max_def, max_rep, d, rg.num_rows, a, b,
                            flat[(rg_lo + a - lo) * d:(rg_lo + b - lo) * d], skip_pages)
            g += 1
    finally:
        f.close()
        if stats is not None:
            stats["bytes"] = stats.get("bytes", 0) + f.bytes_read
    if g == first or int(row_group_offsets[g]) < hi:
        raise Unsupported("rows past the last row group")
    return out


# Data pages known good: their levels, and those of every page before them in the row group, were checked.
# (file, size, mtime, column chunk offset) -> sorted [(values before the page, page position)], so the next
# chunks of a large row group start at the page they need instead of re-checking the row group from its start.
# A Dask worker may run several reading threads: one lock keeps each list sorted and the LRU order whole.
_CHECKED: OrderedDict = OrderedDict()
_CHECKED_ROW_GROUPS = 256
_CHECKED_LOCK = threading.Lock()


def _read_row_group(f: _File, meta: Any, dtype: np.dtype, max_def: int, max_rep: int, d: int, rows: int, a: int,
                    b: int, out: np.ndarray, skip_pages: bool = False) -> None:
    """Values of rows [a, b) of one row group of `rows` rows into out (flat, (b - a) * d)."""
    codec_name = meta.compression
    if codec_name not in _CODECS:
        raise Unsupported(f"codec {codec_name}")
    codec = _CODECS[codec_name]
    has_dict = meta.has_dictionary_page and meta.dictionary_page_offset
    pos = meta.dictionary_page_offset if has_dict else meta.data_page_offset
    end = pos + meta.total_compressed_size
    if end > f.size:
        raise Unsupported("column chunk runs past the end of the file")
    total = meta.num_values  # levels in the row group: rows x d exactly when no list is null, empty or ragged
    if total != rows * d:
        raise Unsupported("value count is not rows x d")
    want_lo, want_hi = a * d, b * d  # value range wanted, counted from the row group's first value
    seen = 0  # values (= levels, no nulls) before the current page
    dictionary = None
    key = (f.key, pos)
    with _CHECKED_LOCK:
        checked = _CHECKED.setdefault(key, [])
        _CHECKED.move_to_end(key)
        if len(_CHECKED) > _CHECKED_ROW_GROUPS:
            _CHECKED.popitem(last=False)
        i = bisect.bisect_right(checked, (want_lo, end)) - 1
        resume = checked[i] if i >= 0 else None
    if skip_pages:
        skipped = _skip_to(f, pos, end, want_lo)
        if skipped[0] > (resume[0] if resume else 0):
            resume = skipped
        # pages reached by skipping were not checked from the row group's start: record none of this read
        checked = []
    dict_at = pos if has_dict else None  # read when a page needs it: writers that fall back to PLAIN leave a
    if resume:                           # dictionary page of ~1 MiB that no page of the rows wanted uses
        seen, pos = resume
    rep_bw, def_bw = _bit_width(max_rep), _bit_width(max_def)
    # read past want_hi until a page shows the next list starting exactly there (or the row group ends),
    # so the last wanted row is known to have exactly d values
    while seen < want_hi or (seen == want_hi and seen < total):
        if pos >= end:
            raise Unsupported("row group has fewer values than rows x d")
        page_at = pos
        header, hlen = _page_header(f, pos)
        ptype, usize, csize = header.get(1), header.get(2), header.get(3)
        if usize is None or csize is None or csize < 0 or usize < 0:
            raise Unsupported("page header without sizes")
        body_at = pos + hlen
        pos = body_at + csize
        if ptype == _DICTIONARY_PAGE:
            dict_at, dictionary = page_at, None
            continue
        if ptype == _DATA_PAGE:
            h = header.get(5) or {}
            n = h.get(1, 0)
            raw = _decompress(codec, f.read(body_at, csize), usize)
            off = 0
            levels = []
            for enc in (h.get(4), h.get(3)):  # repetition, then definition levels, each with its byte length
                if enc != _RLE or off + 4 > raw.size:
                    raise Unsupported("level encoding")
                (length,) = struct.unpack_from("<i", raw, off)
                levels.append(raw[off + 4:off + 4 + length])
                off += 4 + length
            rep, dfn = levels
            values = raw[off:]
            encoding = h.get(2)
        elif ptype == _DATA_PAGE_V2:
            h = header.get(8) or {}
            n = h.get(1, 0)
            if h.get(2, 0):
                raise Unsupported("nulls")
            rl, dl = h.get(6, 0), h.get(5, 0)
            body = np.frombuffer(f.read(body_at, csize), np.uint8)
            if body.size != csize:
                raise Unsupported("truncated page")
            rep, dfn = body[:rl], body[rl:rl + dl]
            compressed = h.get(7, True)
            values = (_decompress(codec, body[rl + dl:].tobytes(), usize - rl - dl) if compressed and codec
                      else body[rl + dl:])
            encoding = h.get(4)
        else:
            continue  # index pages: nothing for us
        if not _levels_ok(rep, rep_bw, n, -1, d, seen):
            raise Unsupported("repetition levels: not every list has d values")
        if not _levels_ok(dfn, def_bw, n, max_def, d, 0):
            raise Unsupported("definition levels: nulls")
        with _CHECKED_LOCK:  # usually an append; in order also when another thread got further first
            j = bisect.bisect_left(checked, (seen, page_at))
            if j == len(checked) or checked[j] != (seen, page_at):
                checked.insert(j, (seen, page_at))
        lo_in, hi_in = max(want_lo - seen, 0), min(want_hi - seen, n)
        if lo_in < hi_in:
            dst = out[seen + lo_in - want_lo:seen + hi_in - want_lo]
            if dictionary is None and dict_at is not None and encoding in (_PLAIN_DICTIONARY, _RLE_DICTIONARY):
                dictionary = _dictionary_page(f, dict_at, codec, dtype)
            _decode_values(values, encoding, n, dtype, dictionary, lo_in, hi_in, dst)
        seen += n


# Data page positions found from headers alone (not checked): (file key, column chunk offset) -> sorted
# [(values before the page, page position)], so the blocks of a sample that share a row group walk its
# headers once.
_HEADERS: OrderedDict = OrderedDict()
_HEADERS_LOCK = threading.Lock()


def _skip_to(f: _File, pos: int, end: int, want: int) -> tuple[int, int]:
    """(values before it, position) of the data page that holds value `want` of the column chunk starting
    at pos, found from the page headers alone (about 256 bytes each)."""
    key = (f.key, pos)
    with _HEADERS_LOCK:
        known = _HEADERS.setdefault(key, [])
        _HEADERS.move_to_end(key)
        if len(_HEADERS) > _CHECKED_ROW_GROUPS:
            _HEADERS.popitem(last=False)
        i = bisect.bisect_right(known, (want, end)) - 1
        seen, at = known[i] if i >= 0 else (0, pos)
        if i >= 0 and i + 1 < len(known):  # the page after it is known too: no header to read
            return seen, at
    pos = at
    while pos < end:
        header, hlen = _page_header(f, pos)
        ptype, csize = header.get(1), header.get(3)
        if csize is None or csize < 0:
            raise Unsupported("page header without sizes")
        if ptype in (_DATA_PAGE, _DATA_PAGE_V2):
            n = (header.get(5 if ptype == _DATA_PAGE else 8) or {}).get(1, 0)
            with _HEADERS_LOCK:
                j = bisect.bisect_left(known, (seen, pos))
                if j == len(known) or known[j] != (seen, pos):
                    known.insert(j, (seen, pos))
            if seen + n > want:
                return seen, pos
            seen += n
        pos += hlen + csize
    raise Unsupported("row group has fewer values than rows x d")


def page_rows(path: str, pf: Any, leaf: int, d: int) -> int | None:
    """Rows in the first data page of the file's first row group (one header read), or None."""
    md = pf.metadata
    if not md.num_row_groups or d <= 0:
        return None
    f = _File(path)
    try:
        header, _ = _page_header(f, md.row_group(0).column(leaf).data_page_offset)
    except (Unsupported, OSError):
        return None
    finally:
        f.close()
    if header.get(1) not in (_DATA_PAGE, _DATA_PAGE_V2):
        return None
    n = (header.get(5 if header.get(1) == _DATA_PAGE else 8) or {}).get(1, 0)
    return max(1, n // d) if n else None


def _dictionary_page(f: _File, pos: int, codec: str | None, dtype: np.dtype, parsed: Any = None) -> np.ndarray:
    header, hlen = parsed or _page_header(f, pos)
    dh = header.get(7)
    if header.get(1) != _DICTIONARY_PAGE or not dh or dh.get(2) not in (_PLAIN, _PLAIN_DICTIONARY):
        raise Unsupported("dictionary page")
    usize, csize = header.get(2), header.get(3)
    if usize is None or csize is None or csize < 0 or usize < 0:
        raise Unsupported("page header without sizes")
    raw = _decompress(codec, f.read(pos + hlen, csize), usize)
    nd = dh.get(1, 0)
    if raw.size < nd * dtype.itemsize:
        raise Unsupported("short dictionary page")
    return raw[:nd * dtype.itemsize].view(dtype)


def _page_header(f: _File, pos: int) -> tuple[dict, int]:
    """The page header at pos and its length; headers are short unless they carry large statistics."""
    for size in (256, 1 << 16):
        try:
            return _struct(f.read(pos, size), 0, _PAGE_HEADER)
        except (Unsupported, IndexError):  # ran past the bytes read
            continue
    raise Unsupported("no readable page header")


def _decode_values(values: np.ndarray, encoding: int, n: int, dtype: np.dtype, dictionary: Any, lo: int, hi: int,
                   dst: np.ndarray) -> None:
    size = dtype.itemsize
    if encoding == _PLAIN:
        if values.size < n * size:
            raise Unsupported("short data page")
        dst[:] = values[lo * size:hi * size].view(dtype)
    elif encoding in (_PLAIN_DICTIONARY, _RLE_DICTIONARY):
        if dictionary is None or values.size < 1:
            raise Unsupported("dictionary page missing")
        bits = np.dtype(f"<u{size}")  # gather the values' bits: numba has no float16
        tmp = np.empty(n, bits)
        if not _gather_dict(values[1:], int(values[0]), n, dictionary.view(bits), tmp):
            raise Unsupported("bad dictionary indices")
        dst.view(bits)[:] = tmp[lo:hi]
    elif encoding == _BYTE_STREAM_SPLIT:
        if values.size < n * size:
            raise Unsupported("short data page")
        streams = values[:n * size].reshape(size, n)[:, lo:hi]
        dst.view(np.uint8).reshape(hi - lo, size)[:] = streams.T
    else:
        raise Unsupported(f"value encoding {encoding}")
