"""The training sample: many small blocks of consecutive rows, one per equal stratum of the whole source.

A uniform row sample touches nearly every page of a large source (65,536 rows of 10M hit 101 % of the bytes),
so it is a full read. Blocks cost about one page or chunk each, so the bytes read grow with the number of
blocks, not with the source. Hundreds of strata keep the sample spread over the whole source, so it stays
representative when rows are stored sorted (by source, date or cluster): no few-big-blocks shortcut.

`plan_sample` is pure (seeded, tested for its invariants); `read_blocks` reads one part of the plan and is
the unit of parallel work (threads here, or a task per part on the Dask workers).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from . import Source

log = logging.getLogger(__name__)

MIN_BLOCKS = 256  # a sample of at least this many rows is drawn as at least this many blocks
BLOCK_ROWS = 64  # the most rows in one block (more blocks: more even, more pages read)
MIN_STRATA = 256  # the fewest strata a sample of that many blocks is spread over, whatever it reads
WINDOW_SHARE = 4  # blocks sharing units lie in a window of a quarter of a unit
MAX_FRACTION = 0.15  # the share of the source the blocks may read, one unit each, before they share units
FULL_READ_ROWS = 32768  # a sample of the whole source is read in pieces of this many rows


@dataclass(frozen=True)
class Block:
    """Rows [lo, hi) of shard `shard`; global rows [start, start + hi - lo)."""

    shard: int
    lo: int
    hi: int
    start: int


@dataclass
class Sample:
    """A drawn training sample: vectors (rows, d) in source order, their global row numbers, and its cost."""

    x: np.ndarray
    rows: np.ndarray
    blocks: int
    bytes_read: int
    source_bytes: int
    seconds: float

    def describe(self, n: int) -> str:
        share = f" ({100 * self.bytes_read / self.source_bytes:.1f} % of the source)" if self.source_bytes else ""
        return (f"training sample: {len(self.rows)} of {n} rows in {self.blocks} blocks, read "
                f"{self.bytes_read / 2**20:.1f} MiB{share} in {self.seconds:.2f} s")


def block_rows_for(size: int) -> int:
    """Rows per block for a sample of `size` rows: BLOCK_ROWS, fewer when that would give under MIN_BLOCKS."""
    return int(np.clip(size // MIN_BLOCKS, 1, BLOCK_ROWS))


def plan_sample(shard_rows: Sequence[int], size: int, seed: int, *, block_rows: int | None = None,
                unit_rows: int = 1, max_fraction: float = MAX_FRACTION) -> list[Block]:
    """Blocks holding min(size, n) rows of the concatenated shards, in source order, disjoint, seeded.

    The source is cut into W equal strata, each holding about size / W rows of the sample at a random place
    in it. W is the number of blocks, ceil(size / block_rows), unless reading one unit (`unit_rows` rows:
    a Parquet page, a Zarr chunk) per block would pass `max_fraction` of the source: then W is what that
    budget allows (at least MIN_STRATA), and each stratum's rows are several blocks spread over a window of
    unit_rows / WINDOW_SHARE rows in it, which costs one or two units. A block crossing a shard boundary is
    cut in two."""
    offsets = np.concatenate([[0], np.cumsum(np.asarray(shard_rows, dtype=np.int64))])
    n = int(offsets[-1])
    size = min(int(size), n)
    if size <= 0:
        return []
    if size == n:  # the whole source
        spans = [(a, min(a + FULL_READ_ROWS, n)) for a in range(0, n, FULL_READ_ROWS)]
    else:
        rng = np.random.default_rng(seed)
        b = block_rows or block_rows_for(size)
        count = -(-size // b)
        unit = max(1, int(unit_rows))
        window = max(1, unit // WINDOW_SHARE)
        # a window costs 1 + 1 / WINDOW_SHARE units on average: its units, plus the one it crosses into
        budget = int(max_fraction * n / (unit * (1 + 1 / WINDOW_SHARE)))
        strata = count if unit == 1 else min(count, max(MIN_STRATA, budget))
        spans = []
        for lo, hi, k in _place(0, n, size, strata, 1 if strata == count else window, rng):
            if strata == count or k <= b:
                spans.append((lo, lo + k))
            else:  # several blocks in one window
                spans.extend((a, a + m) for a, _, m in _place(lo, hi, k, -(-k // b), 1, rng))
    blocks = []
    for a, z in spans:
        s = int(np.searchsorted(offsets, a, side="right")) - 1
        while a < z:
            hi = min(z, int(offsets[s + 1]))
            if hi > a:
                blocks.append(Block(s, a - int(offsets[s]), hi - int(offsets[s]), a))
            a = hi
            s += 1
    return blocks


def _place(lo: int, hi: int, size: int, count: int, window: int,
           rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(start, end, rows) of a window of max(window, rows) rows at a random place in each of `count` equal
    strata of [lo, hi), the strata holding `size` rows in all. Rows are floor(edge * size / n) differences:
    they sum to size and none exceeds its stratum."""
    n = hi - lo
    edges = np.linspace(0, n, count + 1).round().astype(np.int64)
    rows = np.diff(edges * size // n)
    out = []
    for e0, e1, k in zip(edges[:-1], edges[1:], rows):
        if k:
            width = min(int(e1 - e0), max(window, int(k)))
            a = lo + int(rng.integers(int(e0), int(e1) - width + 1))
            out.append((a, a + width, int(k)))
    return out


def split_parts(blocks: list[Block], parts: int) -> list[list[Block]]:
    """Consecutive runs of blocks with about equal rows, at most `parts` of them (the parallel read tasks)."""
    if not blocks:
        return []
    rows = np.cumsum([b.hi - b.lo for b in blocks])
    cuts = np.searchsorted(rows, np.linspace(0, rows[-1], max(1, parts) + 1)[1:-1], side="right")
    bounds = [0, *sorted(set(int(c) for c in cuts) - {0, len(blocks)}), len(blocks)]
    return [blocks[i:j] for i, j in zip(bounds[:-1], bounds[1:])]


def read_blocks(source: Source, blocks: Sequence[Block], unit_rows: int = 1) -> tuple[np.ndarray, int]:
    """Vectors of the blocks, concatenated (rows, d) in their stored dtype, and the bytes read for them.
    Blocks of one shard less than `unit_rows` apart are read in one read (they share a page or chunk)."""
    from . import _reader
    from ..errors import InputError

    reader = _reader(source.cfg.format)
    xs, total = [], 0
    i = 0
    while i < len(blocks):
        j = i + 1
        while (j < len(blocks) and blocks[j].shard == blocks[i].shard
               and blocks[j].lo - blocks[j - 1].hi < max(1, unit_rows)
               and blocks[j].hi - blocks[i].lo <= max(FULL_READ_ROWS, unit_rows)):  # memory stays bounded
            j += 1
        shard, lo, hi = source.shards[blocks[i].shard], blocks[i].lo, blocks[j - 1].hi
        x, nbytes = reader.read_block(source.cfg, shard, lo, hi)
        if x.ndim != 2 or x.shape != (hi - lo, source.d):
            raise InputError(f"{shard.path}: expected {hi - lo} rows of dimension {source.d} at rows {lo}..{hi - 1}, "
                             f"got an array of shape {x.shape}.")
        xs.extend(x[b.lo - lo:b.hi - lo] for b in blocks[i:j])
        total += nbytes
        i = j
    if not xs:
        return np.zeros((0, source.d), np.float32), 0
    dtype = np.result_type(*[x.dtype for x in xs])
    return np.concatenate(xs).astype(dtype, copy=False), total


def unit_rows_of(source: Source) -> int:
    """Rows of the source's typical read unit (median over shards; 1 when unknown)."""
    from . import _reader

    reader = _reader(source.cfg.format)
    units = [reader.unit_rows(source.cfg, s) for s in source.shards if s.n_rows]
    return max(1, int(np.median(units))) if units else 1


def block_rows_of(blocks: Sequence[Block]) -> np.ndarray:
    """The global row numbers the blocks hold, in order (int64)."""
    if not blocks:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(b.start, b.start + b.hi - b.lo, dtype=np.int64) for b in blocks])


def source_bytes(source: Source) -> int:
    """Bytes of the source as stored (file sizes; Zarr: the vector arrays' stored chunks), 0 when unknown."""
    from . import _reader

    reader = _reader(source.cfg.format)
    try:
        return int(sum(reader.stored_bytes(source.cfg, s) for s in source.shards))
    except Exception as exc:  # noqa: BLE001 - only the log line's percentage depends on it
        log.debug("source size unknown: %r", exc)
        return 0


def threads_for_sample() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class Plan:
    """The blocks of a sample, cut into parts (one parallel read each), and the unit its reads merge at."""

    blocks: tuple[Block, ...]
    parts: tuple[tuple[Block, ...], ...]
    unit_rows: int


def plan_for(source: Source, size: int, seed: int, *, block_rows: int | None = None,
             parts: int | None = None) -> Plan:
    """plan_sample over the source's shards at its read unit, cut into `parts` parts (default: 4 per thread)."""
    unit = unit_rows_of(source)
    blocks = plan_sample([s.n_rows for s in source.shards], size, seed, block_rows=block_rows, unit_rows=unit)
    groups = split_parts(blocks, parts or 4 * threads_for_sample())
    return Plan(tuple(blocks), tuple(tuple(g) for g in groups), unit)


def assemble(source: Source, plan: Plan, results: Sequence[tuple[np.ndarray, int]], seconds: float) -> Sample:
    """The Sample from read_blocks of each part of the plan, in order."""
    xs = [x for x, _ in results if len(x)]
    if xs:
        dtype = np.result_type(*[x.dtype for x in xs])
        x = np.concatenate(xs).astype(dtype, copy=False)
    else:
        x = np.zeros((0, source.d), np.float32)
    return Sample(x, block_rows_of(plan.blocks), len(plan.blocks), int(sum(b for _, b in results)),
                  source_bytes(source), seconds)


def draw_sample(source: Source, size: int, seed: int, *, block_rows: int | None = None,
                parts: int | None = None) -> Sample:
    """Plan the sample of `size` rows and read its parts on a thread pool of this process. (On a Dask
    cluster pqgpu.pipeline reads the parts on the workers: tasks.read_sample_part.)"""
    from .. import progress

    t0 = time.perf_counter()
    plan = plan_for(source, size, seed, block_rows=block_rows, parts=parts)
    progress.report("training sample", 0, len(plan.parts), "parts", brief=True)
    results = read_with_threads(source, [list(p) for p in plan.parts], plan.unit_rows)
    progress.report("training sample", len(plan.parts), len(plan.parts), "parts", brief=True)
    return assemble(source, plan, results, time.perf_counter() - t0)


def read_with_threads(source: Source, groups: list[list[Block]], unit_rows: int) -> list[tuple[np.ndarray, int]]:
    """read_blocks of each part on a thread pool here (numpy, pyarrow and the page reader release the GIL)."""
    if len(groups) <= 1:
        return [read_blocks(source, g, unit_rows) for g in groups]
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(threads_for_sample(), thread_name_prefix="pqgpu-sample") as pool:
        return list(pool.map(lambda g: read_blocks(source, g, unit_rows), groups))
