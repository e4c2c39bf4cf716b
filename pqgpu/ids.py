"""Duplicate-id check whose memory in the driver does not grow with the number of rows.

The ids are hash-partitioned where the work runs: one split task per group of store chunks reads that
group's ids from the store and cuts them into `parts` partitions by a hash that is the same in every
process; one count task per partition gathers its pieces from all groups, sorts them and reports how many
ids occur more than once and the smallest such id. The driver only ever holds `parts` small summaries.
When there is a duplicate, one scan task per group finds the rows of the smallest duplicated id, for the
message. Without a Dask client the same functions run one after another in this process.
"""

from __future__ import annotations

import logging
import operator
import zlib
from typing import Any, NamedTuple, Sequence

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

PARTITION_ROWS = 1 << 22  # ids per count task (32 MiB of int64): memory of one task, not of the driver
MAX_GROUPS = 64  # split tasks; split x count pick-tasks stay in the thousands even at a billion rows
# Up to this many ids (one partition, 32 MiB of int64) a scan runs in this process even with a client: at 1M
# ids it took 0.08 s here against 0.3-0.4 s as split and count tasks on a 2-worker local cluster, most of the
# rest of a process cluster's cost after the encode (RESULTS.md, session 8).
DRIVER_MAX_ROWS = PARTITION_ROWS


def _as_comparable(ids: np.ndarray) -> np.ndarray:
    if ids.dtype.kind in "iu":
        return ids
    return np.asarray(ids, dtype=object).astype(str)


def partition_of(ids: np.ndarray, parts: int) -> np.ndarray:
    """Partition (0..parts-1) of each id: a multiplicative hash of integers, CRC-32 of strings (Python's
    hash() is salted per process, so it cannot be used across workers)."""
    if parts == 1:
        return np.zeros(len(ids), np.intp)
    if ids.dtype.kind in "iu":
        h = ids.astype(np.uint64, copy=False) * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2**64
        h ^= h >> np.uint64(31)
    else:
        h = np.fromiter((zlib.crc32(s.encode()) for s in ids), np.uint64, len(ids))
    return (h % np.uint64(parts)).astype(np.intp)


def split_ids(store: Any, ranges: Sequence[tuple[int, int]], parts: int) -> list[np.ndarray]:
    """Task: the ids of rows [lo, hi) for each range, as `parts` arrays by partition. `store` is a path
    (opened here, on the worker) or an opened store."""
    if isinstance(store, str):
        from .store import open_store

        store = open_store(store)
    ids = [_as_comparable(store.ids[lo:hi]) for lo, hi in ranges]
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    part = partition_of(ids, parts)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    ids = ids[order]
    return [ids[bounds[p]:bounds[p + 1]] for p in range(parts)]


def count_partition(*pieces: np.ndarray) -> tuple[int, Any, Any, Any]:
    """Task: (ids occurring more than once, the smallest of them or None, the smallest and the largest id or
    None, None) over one partition's pieces (bounds of integer ids only)."""
    ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    ids.sort()
    lo = hi = None
    if ids.size and ids.dtype.kind in "iu":
        lo, hi = ids[0].item(), ids[-1].item()
    repeated = ids[1:][ids[1:] == ids[:-1]]  # sorted: one entry per extra occurrence
    if not repeated.size:
        return 0, None, lo, hi
    n_dup = 1 + int(np.count_nonzero(repeated[1:] != repeated[:-1]))
    first = repeated[0]
    return n_dup, first.item() if hasattr(first, "item") else first, lo, hi


def rows_with_id(store: Any, ranges: Sequence[tuple[int, int]], value: Any, limit: int) -> list[int]:
    """Task: the first `limit` rows within `ranges` (in order) whose id equals value."""
    if isinstance(store, str):
        from .store import open_store

        store = open_store(store)
    rows: list[int] = []
    for lo, hi in ranges:
        ids = _as_comparable(store.ids[lo:hi])
        rows += [lo + int(r) for r in np.flatnonzero(ids == value)[:limit - len(rows)]]
        if len(rows) >= limit:
            break
    return rows


def plan_groups(chunk_ranges: Sequence[tuple[int, int]], groups: int) -> list[list[tuple[int, int]]]:
    """Consecutive store chunks cut into at most `groups` groups of about equal numbers of chunks."""
    k = max(1, min(groups, len(chunk_ranges)))
    bounds = np.linspace(0, len(chunk_ranges), k + 1).astype(int)
    return [list(chunk_ranges[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def default_parts(n: int) -> int:
    return int(min(1024, max(1, -(-n // PARTITION_ROWS))))


class IdScan(NamedTuple):
    n_dup: int  # ids occurring more than once
    first: Any  # the smallest of them, or None
    rows: list[int]  # its first two rows
    lo: Any  # the smallest and the largest id scanned (integer ids; None for strings or no rows)
    hi: Any


def chunked(store: Any, lo: int, hi: int) -> list[tuple[int, int]]:
    """Rows [lo, hi) cut at the store's chunk boundaries."""
    cr = store.chunk_rows
    return [(max(lo, c * cr), min(hi, (c + 1) * cr)) for c in range(lo // cr, -(-hi // cr))] if hi > lo else []


def scan_ids(store: Any, *, ranges: Sequence[tuple[int, int]] | None = None, client: Any = None,
             parts: int | None = None, groups: int = MAX_GROUPS, driver_max_rows: int = DRIVER_MAX_ROWS) -> IdScan:
    """Duplicates and bounds of the ids of `ranges` (rows [lo, hi) pieces in row order, each within one store
    chunk; all rows by default). With a Dask client and more than driver_max_rows ids the work runs on the
    workers, which open the store by its path."""
    if ranges is None:
        ranges = [store.chunk_range(i) for i in range(store.n_chunks)]
    ranges = [r for r in ranges if r[1] > r[0]]
    n = sum(hi - lo for lo, hi in ranges)
    if n <= driver_max_rows:
        client = None
    parts = parts or default_parts(n)
    plan = plan_groups(ranges, groups)
    if client is None:
        split = [split_ids(store, g, parts) for g in plan]
        counts = [count_partition(*[s[p] for s in split]) for p in range(parts)]
        del split
    else:
        target = store.path
        split = [client.submit(split_ids, target, g, parts, pure=False) for g in plan]
        picks = [[client.submit(operator.getitem, f, p) for f in split] for p in range(parts)]
        counts = client.gather([client.submit(count_partition, *picks[p], pure=False) for p in range(parts)])
        del split, picks
    los = [c[2] for c in counts if c[2] is not None]
    his = [c[3] for c in counts if c[3] is not None]
    lo, hi = (min(los), max(his)) if los else (None, None)
    found = [(first, k) for k, first, _, _ in counts if k]
    if not found:
        return IdScan(0, None, [], lo, hi)
    n_dup = sum(k for _, k in found)
    first = min(f for f, _ in found)
    if client is None:
        rows = rows_with_id(store, ranges, first, 2)
    else:
        rows = []
        for part in client.gather([client.submit(rows_with_id, store.path, g, first, 2, pure=False) for g in plan]):
            rows += part[:2 - len(rows)]
    return IdScan(n_dup, first, rows, lo, hi)


def find_duplicates(store: Any, *, client: Any = None, parts: int | None = None, groups: int = MAX_GROUPS,
                    driver_max_rows: int = DRIVER_MAX_ROWS) -> tuple[int, Any, list[int]]:
    """(number of ids occurring more than once, the smallest such id, its first two rows) over the store's
    ids; (0, None, []) when all are distinct."""
    return tuple(scan_ids(store, client=client, parts=parts, groups=groups,  # type: ignore[return-value]
                          driver_max_rows=driver_max_rows)[:3])


def check_duplicate_ids(store: Any, source: Any, *, strict: bool, client: Any = None,
                        parts: int | None = None) -> int:
    """Count ids that occur more than once; warn, or raise InputError naming the smallest such id and the
    file and row of its first two occurrences when strict. Returns the count."""
    return report(scan_ids(store, client=client, parts=parts), store, source, strict=strict).n_dup


def report(scan: IdScan, store: Any, source: Any, *, strict: bool) -> IdScan:
    """Warn about the duplicates a scan found, or raise InputError for them when strict; the scan."""
    if not scan.n_dup:
        return scan
    (p0, r0), (p1, r1) = source.locate(int(scan.rows[0])), source.locate(int(scan.rows[1]))
    msg = (f"{scan.n_dup} id(s) occur more than once, e.g. id {scan.first!r} at {p0} row {r0} and {p1} row {r1}. "
           "Search results will not tell these rows apart.")
    if strict:
        raise InputError(msg + " (--strict-ids makes this an error; the codes are stored in "
                         f"{store.path} all the same.)")
    log.warning(msg + " Pass --strict-ids to make this an error.")
    return scan
