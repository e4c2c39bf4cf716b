"""Search results as a table (query, rank, id, distance) and the files `pqgpu search --out` writes.

A result slot that search() padded (fewer than k rows in the store, or in the probed IVF lists) has id -1
(2**64 - 1 for uint64 ids, None for string ids) and distance FLT_MAX (-FLT_MAX where larger is better), as
faiss pads. The table leaves those slots out, so a query has fewer than k rows there and a real id -1 is never
mistaken for padding.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

FLT_MAX = float(np.finfo(np.float32).max)
# --out suffix -> format; "-" is CSV on stdout
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "jsonl", ".jsonl": "jsonl",
           ".ndjson": "jsonl"}


def output_format(out: str) -> str:
    """'parquet', 'csv', 'jsonl' or 'stdout' for a --out value; ConfigError for any other suffix."""
    if out == "-":
        return "stdout"
    fmt = FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise ConfigError(f"--out {out}: cannot tell the format from its suffix. Use .parquet, .csv, .json (JSON "
                          "lines: one object per result) or - (CSV on standard output).")
    return fmt


def padded(distances: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """bool (nq, k): the slots search() padded (distance ±FLT_MAX and id -1, 2**64 - 1 for uint64 ids, or
    None)."""
    ids = np.asarray(ids)
    if ids.dtype == np.uint64:
        missing_id = ids == np.iinfo(np.uint64).max
    else:
        missing_id = (ids == -1) if ids.dtype.kind in "iu" else np.equal(ids, None)
    return missing_id & (np.abs(np.asarray(distances, np.float64)) == FLT_MAX)


def result_columns(distances: Any, ids: Any) -> dict[str, np.ndarray]:
    """Columns query, rank, id, distance of the real results, in query then rank order."""
    distances = np.asarray(distances, np.float32)
    ids = np.asarray(ids)
    nq, k = distances.shape
    keep = ~padded(distances, ids).reshape(-1)
    return {"query": np.repeat(np.arange(nq, dtype=np.int64), k)[keep],
            "rank": np.tile(np.arange(k, dtype=np.int64), nq)[keep],
            "id": ids.reshape(-1)[keep], "distance": distances.reshape(-1)[keep]}


def _table(cols: dict[str, np.ndarray]) -> Any:
    import pyarrow as pa

    ids = cols["id"]
    if ids.dtype.kind in "iu":  # int64, or uint64 kept as it is (ids of 2**63 and above)
        id_array = pa.array(ids if ids.dtype == np.uint64 else ids.astype(np.int64))
    else:
        id_array = pa.array(ids.tolist(), pa.string())
    return pa.table({"query": cols["query"], "rank": cols["rank"], "id": id_array, "distance": cols["distance"]})


def encode_results(cols: dict[str, np.ndarray], fmt: str) -> bytes:
    """The results in one of FORMATS' formats (stdout: CSV)."""
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(_table(cols), sink)
        return sink.getvalue().to_pybytes()
    if fmt in ("csv", "stdout"):
        import pyarrow.csv as csv

        sink = pa.BufferOutputStream()
        csv.write_csv(_table(cols), sink)
        return sink.getvalue().to_pybytes()
    ids = cols["id"].tolist()
    lines = (json.dumps({"query": int(q), "rank": int(r), "id": i, "distance": float(f"{d:.9g}")})
             for q, r, i, d in zip(cols["query"].tolist(), cols["rank"].tolist(), ids, cols["distance"]))
    return "".join(line + "\n" for line in lines).encode()


def write_all(stream: Any, data: bytes) -> None:
    """All of data to a binary stream that may take it in parts: a pipe can accept less than asked (a
    non-blocking one, or one whose reader has gone, where the next write raises BrokenPipeError)."""
    import select

    view = memoryview(data)
    while view:
        try:
            n = stream.write(view)
        except BlockingIOError as exc:
            n = exc.characters_written
            select.select([], [stream], [], 1.0)
        view = view[n or 0:]
    stream.flush()


def write_results(out: str, distances: Any, ids: Any) -> int:
    """Write the real results to `out` (atomically; '-' is stdout) in the format its suffix names. Returns
    the number of rows written."""
    from .codebook import atomic_write_bytes

    fmt = output_format(out)
    cols = result_columns(distances, ids)
    data = encode_results(cols, fmt)
    if fmt == "stdout":
        sys.stdout.flush()  # text printed before stays ahead of these bytes
        write_all(sys.stdout.buffer, data)
    else:
        atomic_write_bytes(Path(out), data)
    return len(cols["query"])
