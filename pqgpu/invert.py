"""The inverted layout of an IVF store: rows grouped by list, built with memory bounded by the chunk size.

Store nodes (beside codes/ids/done): `lists` int32 (n,), `codebook/coarse` float32 (nlist, d),
`ivf/counts` int32 (n_chunks, nlist) (rows of chunk c in each list, written by the encode task; compressed),
`ivf/offsets` int64 (nlist + 1), `ivf/codes` uint8 (n, code_size), `ivf/rows` int64 (n,) (store row of each
inverted row), `ivf/ids` (n,) (integer ids only), and done flags `ivf/scatter_done` (n_chunks,),
`ivf/copy_done` (output chunks,).

Build (count, then scatter, then copy), every phase resumable:
 1. counts: each encode task writes its chunk's per-list counts (with its lists, before its done flag);
 2. offsets: one streaming pass over the counts in the driver;
 3. scatter: one Dask task per encoded chunk writes its rows, in row order within each list, straight to
    their final positions in flat staging files beside the store (`<store>.ivf-staging/`, memory-mapped:
    tasks write disjoint bytes, so they never race, unlike read-modify-write of shared Zarr chunks). Where
    chunk c's rows of list l start (offsets[l] + the rows of l in chunks before c) is computed by a second
    streaming pass over the counts while the tasks are submitted, and handed to each task for the lists its
    chunk holds only: nothing of size n_chunks x nlist is ever stored or held (a resume recomputes it);
 4. copy: one task per encode chunk's worth of output Zarr chunks copies the staging bytes into `ivf/codes`,
    `ivf/rows`, `ivf/ids` (each output chunk has its done flag).
Positions depend only on the lists, so a killed build resumes to byte-identical arrays. Within a list rows
keep increasing row order: the order faiss's `add` gives them.

Memory and disk at 1B rows, nlist 65,536, chunk_rows 65,536 (15,259 chunks): the driver holds offsets and the
running starts (2 x 0.5 MiB), one block of counts rows (COUNTS_BLOCK_BYTES = 16 MiB) and the arguments of the
tasks in flight: at most 2 per worker thread, 16 B per list present in the chunk (about 41,000 of the 65,536
lists at these sizes: 0.66 MiB). That is ~18 MiB + 1.3 MiB per worker thread, whatever n is (the scheduler
holds the same arguments). A task holds one chunk (its lists, codes and ids) and its arguments. On disk, `ivf/counts` is 15,259 x 65,536 x 4 B = 4 GB before compression and about 0.5 GB after
(mostly 0, 1 and 2 at this ratio of rows to lists: 35 KB per chunk with Zarr's default zstd, measured on
uniformly random lists), instead of the 2 x 8 GB of int64 counts and starts an earlier layout kept; the
staging files hold n x (code_size + 16) bytes while the build runs, as before.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import zarr

from . import integrity
from .errors import StoreError
from .store import Layout, as_store, check_inverted, is_ivf_store, layouts

log = logging.getLogger(__name__)

# Counts rows read per block by the driver's streaming passes.
COUNTS_BLOCK_BYTES = 16 << 20


def write_chunk_lists(path: str, i: int, start: int, lists: np.ndarray) -> None:
    """Encode-task hook: one chunk's lists and per-list counts, written before the chunk is marked done."""
    group = zarr.open_group(path, mode="r+")
    group["lists"][start:start + lists.shape[0]] = lists
    counts = group["ivf/counts"]
    counts[i] = np.bincount(lists, minlength=counts.shape[1]).astype(counts.dtype)


# -- phases ---------------------------------------------------------------------------------------------

def _staging(path: str, node: str = "ivf") -> Path:
    suffix = "" if node == "ivf" else "-" + node.rsplit("/", 1)[-1]
    return Path(str(path).rstrip("/") + ".ivf-staging" + suffix)


def pieces(layout: Layout, chunk_rows: int) -> list[tuple[int, int, int]]:
    """(chunk, lo, hi): the rows [lo, hi) of each encode chunk that lie in the layout, in row order (piece k
    of the layout is chunk c0 + k; only the first and last can be part of a chunk)."""
    if layout.n <= 0:
        return []
    return [(c, max(layout.lo, c * chunk_rows), min(layout.hi, (c + 1) * chunk_rows))
            for c in range(layout.lo // chunk_rows, -(-layout.hi // chunk_rows))]


def _iter_counts(g: Any, layout: Layout, *, from_lists: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """(piece, its per-list counts int64 (nlist,)) in row order: the chunk's row of ivf/counts,
    COUNTS_BLOCK_BYTES at a time, or for a piece that is part of its chunk (or from_lists) a count of its
    lists."""
    counts = g["ivf/counts"]
    cr = int(g.attrs["chunk_rows"])
    todo = pieces(layout, cr)
    step = max(1, COUNTS_BLOCK_BYTES // (counts.dtype.itemsize * counts.shape[1]))
    for b0 in range(0, len(todo), step):
        part = todo[b0:b0 + step]
        block = None if from_lists else np.asarray(counts[part[0][0]:part[-1][0] + 1])
        for j, (c, lo, hi) in enumerate(part):
            row = None if block is None else block[j].astype(np.int64)
            if row is None or lo != c * cr or int(row.sum()) != hi - lo:
                row = np.bincount(np.asarray(g["lists"][lo:hi]), minlength=counts.shape[1]).astype(np.int64)
            yield b0 + j, row


def _prepare(store: Any, layout: Layout, *, with_staging: bool = True) -> tuple[Any, Path]:
    """Phase 2: offsets (once; `starts_done` says where the lists start is known), output arrays, staging
    files (unless the layout is inverted in memory) and done flags (when missing)."""
    g = store.group
    ivf = g[layout.node]
    nlist = int(ivf.attrs["nlist"])
    n, n_chunks = layout.n, len(pieces(layout, int(g.attrs["chunk_rows"])))
    if not ivf.attrs.get("starts_done"):
        total = np.zeros(nlist, np.int64)
        for _, row in _iter_counts(g, layout):
            total += row
        if int(total.sum()) != n:  # damaged counts: they follow from the (checksummed) lists
            log.warning("%s: the per-chunk list counts add up to %d rows, not %d (ivf/counts is damaged); "
                        "counting them again from the lists", store.path, int(total.sum()), n)
            total = _recount(store, g["ivf"], layout)
        offsets = np.zeros(nlist + 1, np.int64)
        np.cumsum(total, out=offsets[1:])
        if "starts" in ivf:  # the (n_chunks, nlist) array of an earlier layout: no longer needed
            del ivf["starts"]
        ivf.require_array("offsets", shape=(nlist + 1,), chunks=(nlist + 1,), dtype="int64")[...] = offsets
        ivf.attrs["offsets_crc32c"] = integrity.offsets_crc(offsets)
        icr = int(ivf.attrs["chunk_rows"])
        n_out = max(1, -(-n // icr))
        cs = int(g.attrs["code_size"])
        ivf.create_array("codes", shape=(n, cs), chunks=(max(1, min(icr, n)), cs), dtype="uint8", fill_value=0,
                         compressors=None, overwrite=True)
        ivf.create_array("rows", shape=(n,), chunks=(max(1, min(icr, n)),), dtype="int64", fill_value=-1,
                         overwrite=True)
        if store.ids.dtype.kind in "iu":
            ivf.create_array("ids", shape=(n,), chunks=(max(1, min(icr, n)),), dtype=store.ids.dtype,
                             overwrite=True)
        ivf.create_array("scatter_done", shape=(n_chunks,), chunks=(1,), dtype=bool, fill_value=False,
                         overwrite=True)
        ivf.create_array("copy_done", shape=(n_out,), chunks=(1,), dtype=bool, fill_value=False, overwrite=True)
        # one Zarr chunk of checksums per copy task (copy_items keeps the tasks on this grid)
        integrity.create_table(ivf, "checksums", n_out, ["codes", "rows"] + (["ids"] if "ids" in ivf else []),
                               rows_per_zarr_chunk=copy_group(g))
        ivf.attrs.update({"starts_done": True, "lo": layout.lo, "n": n})
        sizes = np.diff(offsets)
        log.info("IVF layout: %d lists, sizes min %d / median %d / max %d rows; %.1f MiB of codes to invert",
                 nlist, sizes.min(), int(np.median(sizes)), sizes.max(), n * cs / 2**20)
    staging = _staging(store.path, layout.node)
    if not with_staging:
        return ivf, staging
    scatter_done = ivf["scatter_done"]
    if not ivf["copy_done"][...].all():
        files = _staging_files(staging, n, int(g.attrs["code_size"]), "ids" in ivf)
        if not all(p.exists() and p.stat().st_size == size for p, size in files.values()):
            # staging lost or never made: every scatter must run (again)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for p, size in files.values():
                with open(p, "wb") as f:
                    f.truncate(size)
            scatter_done[...] = False
            ivf["copy_done"][...] = False
    return ivf, staging


def _recount(store: Any, ivf: Any, layout: Layout) -> np.ndarray:
    """Rewrite ivf/counts of the layout's chunks from the lists (each chunk's lists checked against their
    CRC where recorded); returns the layout's total rows per list."""
    family = integrity.chunk_family(store.group, store.n)
    checker = integrity.Checker(store.path, store.group, family) if family and "lists" in family.arrays else None
    counts = ivf["counts"]
    total = np.zeros(counts.shape[1], np.int64)
    for c, plo, phi in pieces(layout, store.chunk_rows):
        lo, hi = store.chunk_range(c)
        lists = np.asarray(store.group["lists"][lo:hi])
        if checker is not None:
            checker.check("lists", lo, lists)
        counts[c] = np.bincount(lists, minlength=counts.shape[1]).astype(counts.dtype)
        total += np.bincount(lists[plo - lo:phi - lo], minlength=counts.shape[1])
    return total


def copy_group(group: Any) -> int:
    """Inverted chunks per copy task: as many rows per task as per encode chunk."""
    return max(1, int(group.attrs["chunk_rows"]) // int(group["ivf"].attrs["chunk_rows"]))


def _staging_files(staging: Path, n: int, code_size: int, with_ids: bool) -> dict[str, tuple[Path, int]]:
    out = {"codes": (staging / "codes.bin", n * code_size), "rows": (staging / "rows.bin", n * 8)}
    if with_ids:
        out["ids"] = (staging / "ids.bin", n * 8)
    return out


def _memmap(staging: Path, name: str, n: int, code_size: int) -> np.memmap:
    if name == "codes":
        return np.memmap(staging / "codes.bin", dtype=np.uint8, mode="r+", shape=(n, code_size))
    return np.memmap(staging / f"{name}.bin", dtype=np.int64, mode="r+", shape=(n,))


def _scatter_items(store: Any, layout: Layout) -> Iterator[tuple[int, tuple]]:
    """(piece, (node, its rows lo, hi, lists present, their row counts, where its rows of each start)) for
    every piece not yet scattered: the starts of piece k are offsets + the counts of pieces before k, summed
    while streaming."""
    ivf = store.group[layout.node]
    running = np.asarray(ivf["offsets"][...])[:-1].copy()
    done = integrity.whole(ivf["scatter_done"])
    spans = pieces(layout, store.chunk_rows)
    for k, row in _iter_counts(store.group, layout):
        if not done[k]:
            present = np.flatnonzero(row)
            # int32 lists and sizes (< 2**31 rows per chunk), int64 starts: 16 B per list present
            yield k, (layout.node, spans[k][1], spans[k][2], present.astype(np.int32), row[present].astype(np.int32),
                      running[present])
        running += row


def scatter_chunk(path: str, i: int, node: str, lo: int, hi: int, present: np.ndarray, sizes: np.ndarray,
                  starts: np.ndarray) -> int:
    """Dask task (phase 3): piece i (store rows [lo, hi)) of the layout `node` to their final inverted
    positions in the staging files; its rows of list present[j] (sizes[j] of them) go to starts[j] onwards,
    in row order."""
    from ._faults import fault_point
    from .store import open_store

    store = open_store(path, mode="r+")
    g = store.group
    n, cs = int(g[node].attrs["n"]), int(g.attrs["code_size"])
    lists = np.asarray(g["lists"][lo:hi]).astype(np.int64)
    order = np.argsort(lists, kind="stable")
    sorted_lists = lists[order]
    heads = np.flatnonzero(np.diff(sorted_lists, prepend=-1))  # where each list's run starts (already sorted)
    have, have_sizes = sorted_lists[heads], np.diff(heads, append=hi - lo)
    if not (np.array_equal(have, present) and np.array_equal(have_sizes, sizes)):
        raise StoreError(f"{path}: chunk {i}'s lists disagree with its counts in ivf/counts (the store was changed "
                         "or damaged). Re-encode with `pqgpu encode --overwrite`.")
    first = np.searchsorted(sorted_lists, sorted_lists, side="left")  # first sorted position of each row's list
    dest = np.repeat(starts, sizes) + (np.arange(hi - lo) - first)
    staging = _staging(path, node)
    codes = _memmap(staging, "codes", n, cs)
    codes[dest] = np.asarray(g["codes"][lo:hi])[order]
    rows = _memmap(staging, "rows", n, cs)
    rows[dest] = lo + order
    mapped = [codes, rows]
    if "ids" in g[node]:
        ids = _memmap(staging, "ids", n, cs)
        ids[dest] = np.asarray(g["ids"][lo:hi]).astype(np.int64)[order]
        mapped.append(ids)
    fault_point("ivf-scatter", i)
    for m in mapped:
        m.flush()
    del mapped, codes, rows
    g[f"{node}/scatter_done"][i] = True
    return hi - lo


def _write_checksums(ivf: Any, j: int, count: int, values: dict[str, np.ndarray], start: int) -> None:
    """Rows j .. j+count-1 of ivf/checksums: the CRCs of each layout chunk of `values`, arrays whose row 0 is
    layout row `start` (both inversion routes write them, so they agree byte for byte)."""
    icr, n = int(ivf.attrs["chunk_rows"]), int(ivf.attrs["n"])
    cols = list(ivf["checksums"].attrs["columns"])
    ivf["checksums"][j:j + count] = np.stack([
        integrity.chunk_crcs({k: v[jj * icr - start:min(n, (jj + 1) * icr) - start] for k, v in values.items()},
                             cols)
        for jj in range(j, j + count)])


def copy_chunk(path: str, j: int, count: int = 1, node: str = "ivf") -> int:
    """Dask task (phase 4): output chunks j .. j + count - 1 of the inverted arrays from the staging files into
    Zarr, in one write per array (Zarr writes the chunks concurrently), then marked done together."""
    from ._faults import fault_point
    from .store import open_store

    store = open_store(path, mode="r+")
    g = store.group
    ivf = g[node]
    icr = int(ivf.attrs["chunk_rows"])
    n, cs = int(ivf.attrs["n"]), int(g.attrs["code_size"])
    staging = _staging(path, node)
    lo, hi = j * icr, min(n, (j + count) * icr)
    values = {}
    for name in ("codes", "rows", "ids"):
        if name in ivf:
            arr = ivf[name]
            raw = np.asarray(_memmap(staging, name, n, cs)[lo:hi])
            # staged ids are int64 bytes: a view gives uint64 ids back exactly
            values[name] = raw.view(arr.dtype) if raw.dtype.itemsize == arr.dtype.itemsize and \
                arr.dtype.kind in "iu" else raw.astype(arr.dtype, copy=False)
            arr[lo:hi] = values[name]
    if "checksums" in ivf:
        _write_checksums(ivf, j, count, values, lo)
    for jj in range(j, j + count):
        fault_point("ivf-copy", jj)
    ivf["copy_done"][j:j + count] = True
    return hi - lo


def _copy_items(ivf: Any, per_task: int, node: str | None = None) -> Iterator[tuple[int, tuple]]:
    """(first, (count,)) for runs of at most per_task consecutive output chunks not yet copied, never across
    a multiple of per_task (so each Zarr chunk of ivf/checksums has one writer)."""
    todo = np.flatnonzero(~integrity.whole(ivf["copy_done"]))
    start = prev = None
    for j in todo.tolist():
        if start is not None and (j != prev + 1 or j // per_task != start // per_task):
            yield start, (prev + 1 - start,) + ((node,) if node else ())
            start = None
        if start is None:
            start = j
        prev = j
    if start is not None:
        yield start, (prev + 1 - start,) + ((node,) if node else ())


def _run(client: Any, fn: Any, path: str, items: Iterable[tuple[int, tuple]], what: str) -> None:
    """fn(path, i, *args) for each (i, args) of items: here, or on the Dask client with at most two tasks per
    worker thread in flight, so the driver holds the arguments of a few tasks, not of all."""
    t0 = time.perf_counter()
    count = 0
    if client is None:  # on this process's threads (tasks write disjoint bytes and chunks), a few in flight
        import concurrent.futures as cf

        from .cluster import default_workers

        threads = default_workers()[0]
        todo = iter(items)
        with cf.ThreadPoolExecutor(threads, thread_name_prefix="pqgpu-invert") as pool:
            flying = {pool.submit(fn, path, i, *args) for i, args in itertools.islice(todo, 2 * threads)}
            try:
                while flying:
                    finished, flying = cf.wait(flying, return_when=cf.FIRST_COMPLETED)
                    for fut in finished:
                        fut.result()
                        count += 1
                    flying |= {pool.submit(fn, path, i, *args) for i, args in itertools.islice(todo, len(finished))}
            except BaseException:
                for fut in flying:
                    fut.cancel()
                raise
    else:
        from distributed import as_completed

        workers = client.scheduler_info()["workers"].values()
        window = max(4, 2 * sum(w.get("nthreads", 1) for w in workers))
        todo = iter(items)
        flying: set[Any] = set()
        done = as_completed()

        def submit_next() -> None:
            nxt = next(todo, None)
            if nxt is not None:
                i, args = nxt
                fut = client.submit(fn, path, i, *args, key=f"pqgpu-{what}-{i}-{os.getpid()}-{time.monotonic_ns()}",
                                    pure=False, retries=0)
                flying.add(fut)
                done.add(fut)

        try:
            for _ in range(window):
                submit_next()
            for fut in done:
                flying.discard(fut)
                if fut.status == "error":
                    raise fut.exception()
                count += 1
                submit_next()
        except BaseException:
            client.cancel(list(flying))
            raise
    if count:
        log.info("IVF layout: %s, %d tasks in %.2f s", what, count, time.perf_counter() - t0)


def build_inverted(store_or_path: Any, *, client: Any = None) -> None:
    """Build (or finish) the inverted layout of a complete IVF store. client: a Dask client, or None to run
    the tasks in this process."""
    store = as_store(store_or_path)
    if not is_ivf_store(store):
        raise StoreError(f"{store.path} is not an IVF store (it was encoded with quantizer.nlist: 0).")
    if not store.is_complete():
        raise StoreError(f"{store.path}: {len(store.pending_chunks())} chunk(s) are not encoded yet; run "
                         "`pqgpu encode` to finish them before building the inverted lists.")
    store = _open_rw(store)
    for layout in layouts(store) if store.writing is None else [Layout("ivf", 0, store.n)]:
        build_layout(store, layout, client=client)


def build_layout(store: Any, layout: Layout, *, client: Any = None) -> None:
    """Build (or finish) one inverted layout: rows [layout.lo, layout.hi) of a store whose chunks holding
    them are encoded, into the group layout.node (created here for a segment)."""
    g = store.group
    if layout.node not in g:
        g.create_group(layout.node)
    ivf = g[layout.node]
    if ivf.attrs.get("complete"):
        return
    if "nlist" not in ivf.attrs:
        ivf.attrs.update({"nlist": int(g["ivf"].attrs["nlist"]), "chunk_rows": int(g["ivf"].attrs["chunk_rows"]),
                          "complete": False, "lo": layout.lo, "n": layout.n})
    in_memory = client is None and layout.n * (int(g.attrs["code_size"]) + 32) <= _in_memory_bytes()
    ivf, staging = _prepare(store, layout, with_staging=not in_memory)
    if in_memory:
        _invert_in_memory(store, layout, ivf)
        ivf.attrs["complete"] = True
        shutil.rmtree(staging, ignore_errors=True)  # left by a task-route build of the same layout
        return
    _run(client, scatter_chunk, store.path, _scatter_items(store, layout), "scatter")
    if not ivf["scatter_done"][...].all():
        raise StoreError(f"{store.path}: some inverted-list scatter tasks did not finish; run `pqgpu encode` again.")
    # as many rows per copy task as per encode chunk: fewer, larger tasks than one per output chunk
    per_task = copy_group(store.group)
    _run(client, copy_chunk, store.path, _copy_items(ivf, per_task, None if layout.node == "ivf" else layout.node),
         "copy")
    if not ivf["copy_done"][...].all():
        raise StoreError(f"{store.path}: some inverted-list copy tasks did not finish; run `pqgpu encode` again.")
    ivf.attrs["complete"] = True
    shutil.rmtree(staging, ignore_errors=True)


# Layouts up to this many bytes of codes, rows, ids and lists (code_size + 32 per row) are inverted in memory
# when the build runs in this process: one stable argsort instead of scatter and copy tasks through staging
# files, which on 200,000 rows (nlist 1,024, M 16) cost 0.4-0.5 s in Zarr and file round trips on one thread.
# Same arrays, same flags, same bytes (tested); PQGPU_INVERT_IN_MEMORY_BYTES overrides it (0: always tasks).
INVERT_IN_MEMORY_BYTES = 256 << 20


def _in_memory_bytes() -> int:
    return int(os.environ.get("PQGPU_INVERT_IN_MEMORY_BYTES", INVERT_IN_MEMORY_BYTES))


def _invert_in_memory(store: Any, layout: Layout, ivf: Any) -> None:
    """Phases 3 and 4 in this process: the layout's rows sorted by list (stable: row order within a list) and
    written chunk run by chunk run, with the checksums and done flags the tasks would write, so a kill between
    runs resumes (the order is recomputed) and the result is the task route's, byte for byte."""
    from ._faults import fault_point

    g = store.group
    lo, hi, n = layout.lo, layout.hi, layout.n
    lists = np.asarray(g["lists"][lo:hi]).astype(np.int64)
    nlist = int(ivf.attrs["nlist"])
    spans = pieces(layout, store.chunk_rows)
    for k, row in _iter_counts(g, layout):
        c, a, b = spans[k]
        if not np.array_equal(np.bincount(lists[a - lo:b - lo], minlength=nlist), row):
            raise StoreError(f"{store.path}: chunk {c}'s lists disagree with its counts in ivf/counts (the store was "
                             "changed or damaged). Re-encode with `pqgpu encode --overwrite`.")
        fault_point("ivf-scatter", k)
    order = np.argsort(lists, kind="stable")
    del lists
    ivf["scatter_done"][...] = True
    values = {"codes": np.asarray(g["codes"][lo:hi])[order], "rows": lo + order}
    if "ids" in ivf:
        values["ids"] = np.asarray(g["ids"][lo:hi])[order].astype(ivf["ids"].dtype, copy=False)
    del order
    icr = int(ivf.attrs["chunk_rows"])
    for j, (count, *_) in _copy_items(ivf, copy_group(g)):
        a, b = j * icr, min(n, (j + count) * icr)
        for name, v in values.items():
            ivf[name][a:b] = v[a:b]
        _write_checksums(ivf, j, count, values, 0)
        for jj in range(j, j + count):
            fault_point("ivf-copy", jj)
        ivf["copy_done"][j:j + count] = True


def _open_rw(store: Any) -> Any:
    from .store import CodeStore, open_store

    if store.writing is not None:
        return CodeStore(store.path, open_store(store.path, mode="r+").group, writing=store.writing)
    return open_store(store.path, mode="r+")


def iter_lists(store: Any, block_rows: int | None = None, *, labels: str = "rows"
               ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(list, codes uint8 (size, code_size), labels (size,)) for every non-empty list in list order, labels
    from `ivf/rows` (store rows) or `ivf/ids`, reading the inverted arrays sequentially in blocks of whole
    inverted chunks, each checked against its CRC (memory: one block plus one list). Over an appended store's
    segments, a list's rows of each segment follow one another in segment (so row) order: what one layout of
    all rows holds."""
    check_inverted(store)
    its = [_iter_layout(store, lay, block_rows, labels) for lay in layouts(store)]
    if len(its) == 1:
        yield from its[0]
        return
    heads = [next(it, None) for it in its]
    while any(h is not None for h in heads):
        lst = min(h[0] for h in heads if h is not None)
        parts = [h for h in heads if h is not None and h[0] == lst]
        yield lst, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
        heads = [next(it, None) if h is not None and h[0] == lst else h for h, it in zip(heads, its)]


def _iter_layout(store: Any, layout: Layout, block_rows: int | None, labels: str
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    ivf = store.group[layout.node]
    offsets = integrity.check_offsets(store.path, ivf, np.asarray(ivf["offsets"][...]))
    checker = layout_checker(store, layout.node)
    icr = int(ivf.attrs["chunk_rows"])
    step = int(block_rows or icr) * 4
    buf_lo = buf_hi = 0
    codes = np.zeros((0, int(store.group.attrs["code_size"])), np.uint8)
    rows = np.zeros(0, np.int64)
    for lst in np.flatnonzero(np.diff(offsets)):
        a, b = int(offsets[lst]), int(offsets[lst + 1])
        if b > buf_hi:
            lo = (a // icr) * icr
            hi = min(layout.n, max(-(-b // icr) * icr, lo + step))
            codes = read_inverted(ivf, checker, "codes", lo, hi, layout.node)
            rows = read_inverted(ivf, checker, labels, lo, hi, layout.node)
            buf_lo, buf_hi = lo, hi
        yield int(lst), codes[a - buf_lo:b - buf_lo], rows[a - buf_lo:b - buf_lo]


def layout_checker(store: Any, node: str = "ivf") -> integrity.Checker | None:
    """The CRCs of one layout's inverted arrays (None for a layout built by a pqgpu that recorded none)."""
    family = integrity.ivf_family(store.group, node)
    return None if family is None else integrity.Checker(store.path, store.group, family)


def read_inverted(ivf: Any, checker: integrity.Checker | None, name: str, lo: int, hi: int,
                  node: str = "ivf") -> np.ndarray:
    """Rows [lo, hi) of <node>/<name>, checked chunk by chunk when the layout has CRCs."""
    if checker is None:
        return np.asarray(ivf[name][lo:hi])
    return checker.read(ivf[name], f"{node}/{name}", lo, hi)


def recheck_layout(store: Any) -> bool:
    """Before a resume that has nothing left to encode: verify the built layouts; mark each damaged one for a
    rebuild, naming the damage in a WARNING. Returns True when one must be (re)built."""
    todo = False
    for lay in layouts(store):
        ivf = store.group[lay.node] if lay.node in store.group else None
        if ivf is None or not ivf.attrs.get("complete"):
            todo = True
            continue
        if not integrity.ENABLED:  # pqgpu.bench.integrity's baseline
            continue
        state = integrity.node_state(store, lay)
        bad = integrity.verify_node(store, lay)
        if not bad and state == "built":
            continue
        what = "; ".join(f"{name} chunk {c}: {why}" if c >= 0 else name for name, c, why, _ in bad[:5]) or state
        log.warning("%s: the inverted layout %s is damaged (%s); rebuilding it from the codes and lists", store.path,
                    lay.node, what)
        ivf.attrs.update({"complete": False, "starts_done": False})
        todo = True
    return todo


def build_inverted_with(path: str, client: Any, *, rebuild: bool = False) -> None:
    """build_inverted on the given Dask client, or in this process when client is None (small local runs).
    rebuild: chunks were (re-)encoded just now, so any inverted layout built before is stale."""
    from .store import open_store

    store = open_store(path, mode="r+")
    if rebuild:
        for lay in layouts(store):
            if lay.node in store.group:
                store.group[lay.node].attrs.update({"complete": False, "starts_done": False})
    elif not recheck_layout(store):
        return
    build_inverted(store, client=client)


def export_ivf(store: Any, out_path: str | os.PathLike) -> Path:
    """Write the store as a faiss IndexIVFPQ (IndexPreTransform with OPQ) holding every row with its id,
    streamed list by list from the inverted layout (faiss is not needed; memory: one block of lists)."""
    from .errors import InputError
    from .ivf import write_index

    check_inverted(store)
    if store.ids.dtype.kind not in "iu":
        raise InputError(f"{store.path} has string ids ({store.ids.dtype}), but a faiss IndexIVFPQ holds only int64 "
                         "ids, and unlike IndexPQ its ids cannot be replaced by row numbers plus a sidecar without "
                         "losing the list layout. Re-encode with an integer id column (source.id_column), or with "
                         "source.id_column: null for row numbers, to export this store to faiss.")
    if store.ids.dtype.kind == "u" and store.n:
        top = max(int(np.asarray(store.group[lay.node]["ids"][lo:lo + (1 << 20)]).max())
                  for lay in layouts(store) for lo in range(0, lay.n, 1 << 20))
        if top > np.iinfo(np.int64).max:
            raise InputError(f"{store.path}: ids up to {top} do not fit faiss's int64 ids. Re-encode with ids "
                             "below 2**63.")
    cb = store.codebook()
    sizes = sum(np.diff(np.asarray(store.group[lay.node]["offsets"][...])) for lay in layouts(store))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    t0 = time.perf_counter()
    try:
        with open(tmp, "wb") as f:
            write_index(f, cb, sizes=sizes,
                        lists_data=((lst, c, i.astype(np.int64)) for lst, c, i in iter_lists(store, labels="ids")))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("export-faiss: IndexIVFPQ with %d rows in %d lists written to %s in %.2f s", store.n, cb.nlist, out,
             time.perf_counter() - t0)
    return out
