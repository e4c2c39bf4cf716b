"""The inverted layout of an IVF store: rows grouped by list, built with memory bounded by the chunk size.

Store nodes (beside codes/ids/done): `lists` int32 (n,), `codebook/coarse` float32 (nlist, d),
`ivf/counts` int64 (n_chunks, nlist) (rows of chunk c in each list, written by the encode task),
`ivf/starts` int64 (n_chunks, nlist) (where chunk c's rows of list l go), `ivf/offsets` int64 (nlist + 1),
`ivf/codes` uint8 (n, code_size), `ivf/rows` int64 (n,) (store row of each inverted row), `ivf/ids` (n,)
(integer ids only), and done flags `ivf/scatter_done` (n_chunks,), `ivf/copy_done` (output chunks,).

Build (count, then scatter, then copy), every phase resumable:
 1. counts: each encode task writes its chunk's per-list counts (with its lists, before its done flag);
 2. offsets and starts: one streaming pass over the counts in the driver (memory O(nlist));
 3. scatter: one Dask task per encoded chunk writes its rows, in row order within each list, straight to
    their final positions in flat staging files beside the store (`<store>.ivf-staging/`, memory-mapped:
    tasks write disjoint bytes, so they never race, unlike read-modify-write of shared Zarr chunks);
 4. copy: one task per output Zarr chunk copies the staging bytes into `ivf/codes`, `ivf/rows`, `ivf/ids`.
Positions depend only on the lists, so a killed build resumes to byte-identical arrays. Within a list rows
keep increasing row order: the order faiss's `add` gives them.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

from .errors import StoreError
from .store import as_store, check_inverted, is_ivf_store

log = logging.getLogger(__name__)

def write_chunk_lists(path: str, i: int, start: int, lists: np.ndarray) -> None:
    """Encode-task hook: one chunk's lists and per-list counts, written before the chunk is marked done."""
    group = zarr.open_group(path, mode="r+")
    group["lists"][start:start + lists.shape[0]] = lists
    counts = group["ivf/counts"]
    counts[i] = np.bincount(lists, minlength=counts.shape[1]).astype(np.int64)


# -- phases ---------------------------------------------------------------------------------------------

def _staging(path: str) -> Path:
    return Path(str(path).rstrip("/") + ".ivf-staging")


def _prepare(store: Any) -> tuple[Any, Path]:
    """Phase 2: offsets and starts (once), staging files and done flags (when missing)."""
    g = store.group
    ivf = g["ivf"]
    nlist = int(ivf.attrs["nlist"])
    n, n_chunks = store.n, store.n_chunks
    if not ivf.attrs.get("starts_done"):
        counts = ivf["counts"]
        total = np.zeros(nlist, np.int64)
        for c in range(n_chunks):
            total += counts[c]
        if int(total.sum()) != n:
            raise StoreError(f"{store.path}: the per-chunk list counts add up to {int(total.sum())} rows, not "
                             f"{n}. Re-encode with `pqgpu encode --overwrite`.")
        offsets = np.zeros(nlist + 1, np.int64)
        np.cumsum(total, out=offsets[1:])
        starts = ivf.require_array("starts", shape=(n_chunks, nlist), chunks=(1, nlist), dtype="int64",
                                   fill_value=0)
        running = offsets[:-1].copy()
        for c in range(n_chunks):
            starts[c] = running
            running += counts[c]
        ivf.require_array("offsets", shape=(nlist + 1,), chunks=(nlist + 1,), dtype="int64")[...] = offsets
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
        ivf.attrs["starts_done"] = True
        sizes = np.diff(offsets)
        log.info("IVF layout: %d lists, sizes min %d / median %d / max %d rows; %.1f MiB of codes to invert",
                 nlist, sizes.min(), int(np.median(sizes)), sizes.max(), n * cs / 2**20)
    staging = _staging(store.path)
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


def _staging_files(staging: Path, n: int, code_size: int, with_ids: bool) -> dict[str, tuple[Path, int]]:
    out = {"codes": (staging / "codes.bin", n * code_size), "rows": (staging / "rows.bin", n * 8)}
    if with_ids:
        out["ids"] = (staging / "ids.bin", n * 8)
    return out


def _memmap(staging: Path, name: str, n: int, code_size: int) -> np.memmap:
    if name == "codes":
        return np.memmap(staging / "codes.bin", dtype=np.uint8, mode="r+", shape=(n, code_size))
    return np.memmap(staging / f"{name}.bin", dtype=np.int64, mode="r+", shape=(n,))


def scatter_chunk(path: str, i: int) -> int:
    """Dask task (phase 3): chunk i's rows to their final inverted positions in the staging files."""
    from ._faults import fault_point
    from .store import open_store

    store = open_store(path, mode="r+")
    g = store.group
    lo, hi = store.chunk_range(i)
    n, cs = store.n, int(g.attrs["code_size"])
    lists = np.asarray(g["lists"][lo:hi]).astype(np.int64)
    starts = np.asarray(g["ivf/starts"][i])
    order = np.argsort(lists, kind="stable")
    sorted_lists = lists[order]
    first = np.searchsorted(sorted_lists, sorted_lists, side="left")  # first sorted position of each row's list
    dest = starts[sorted_lists] + (np.arange(hi - lo) - first)
    staging = _staging(path)
    codes = _memmap(staging, "codes", n, cs)
    codes[dest] = np.asarray(g["codes"][lo:hi])[order]
    rows = _memmap(staging, "rows", n, cs)
    rows[dest] = lo + order
    mapped = [codes, rows]
    if "ids" in g["ivf"]:
        ids = _memmap(staging, "ids", n, cs)
        ids[dest] = np.asarray(g["ids"][lo:hi]).astype(np.int64)[order]
        mapped.append(ids)
    fault_point("ivf-scatter", i)
    for m in mapped:
        m.flush()
    del mapped, codes, rows
    g["ivf/scatter_done"][i] = True
    return hi - lo


def copy_chunk(path: str, j: int) -> int:
    """Dask task (phase 4): output chunk j of the inverted arrays from the staging files into Zarr."""
    from .store import open_store

    store = open_store(path, mode="r+")
    g = store.group
    ivf = g["ivf"]
    icr = int(ivf.attrs["chunk_rows"])
    n, cs = store.n, int(g.attrs["code_size"])
    lo, hi = j * icr, min(n, (j + 1) * icr)
    staging = _staging(path)
    ivf["codes"][lo:hi] = np.asarray(_memmap(staging, "codes", n, cs)[lo:hi])
    ivf["rows"][lo:hi] = np.asarray(_memmap(staging, "rows", n, cs)[lo:hi])
    if "ids" in ivf:
        ivf["ids"][lo:hi] = np.asarray(_memmap(staging, "ids", n, cs)[lo:hi]).astype(ivf["ids"].dtype)
    from ._faults import fault_point

    fault_point("ivf-copy", j)
    ivf["copy_done"][j] = True
    return hi - lo


def _run(client: Any, fn: Any, path: str, items: list[int], what: str) -> None:
    if not items:
        return
    t0 = time.perf_counter()
    if client is None:
        for i in items:
            fn(path, i)
    else:
        from distributed import wait

        futures = [client.submit(fn, path, i, key=f"pqgpu-{what}-{i}-{os.getpid()}-{time.monotonic_ns()}",
                                 pure=False, retries=0) for i in items]
        try:
            wait(futures)
            for f in futures:
                if f.status == "error":
                    raise f.exception()
        except BaseException:
            client.cancel(futures)
            raise
    log.info("IVF layout: %s of %d chunks in %.2f s", what, len(items), time.perf_counter() - t0)


def build_inverted(store_or_path: Any, *, client: Any = None) -> None:
    """Build (or finish) the inverted layout of a complete IVF store. client: a Dask client, or None to run
    the tasks in this process."""
    store = as_store(store_or_path)
    if not is_ivf_store(store):
        raise StoreError(f"{store.path} is not an IVF store (it was encoded with quantizer.nlist: 0).")
    if not store.is_complete():
        raise StoreError(f"{store.path}: {len(store.pending_chunks())} chunk(s) are not encoded yet; run "
                         "`pqgpu encode` to finish them before building the inverted lists.")
    if store.group["ivf"].attrs.get("complete"):
        return
    store = _open_rw(store)
    ivf, staging = _prepare(store)
    _run(client, scatter_chunk, store.path, [int(i) for i in np.flatnonzero(~ivf["scatter_done"][...])], "scatter")
    if not ivf["scatter_done"][...].all():
        raise StoreError(f"{store.path}: some inverted-list scatter tasks did not finish; run `pqgpu encode` again.")
    _run(client, copy_chunk, store.path, [int(j) for j in np.flatnonzero(~ivf["copy_done"][...])], "copy")
    if not ivf["copy_done"][...].all():
        raise StoreError(f"{store.path}: some inverted-list copy tasks did not finish; run `pqgpu encode` again.")
    ivf.attrs["complete"] = True
    shutil.rmtree(staging, ignore_errors=True)


def _open_rw(store: Any) -> Any:
    from .store import open_store

    return open_store(store.path, mode="r+")


def iter_lists(store: Any, block_rows: int | None = None, *, labels: str = "rows"
               ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(list, codes uint8 (size, code_size), labels (size,)) for every non-empty list in list order, labels
    from `ivf/rows` (store rows) or `ivf/ids`, reading the inverted arrays sequentially in blocks (memory:
    one block plus one list)."""
    check_inverted(store)
    ivf = store.group["ivf"]
    offsets = np.asarray(ivf["offsets"][...])
    step = int(block_rows or ivf.attrs["chunk_rows"]) * 4
    buf_lo = buf_hi = 0
    codes = np.zeros((0, int(store.group.attrs["code_size"])), np.uint8)
    rows = np.zeros(0, np.int64)
    for lst in np.flatnonzero(np.diff(offsets)):
        a, b = int(offsets[lst]), int(offsets[lst + 1])
        if b > buf_hi:
            lo, hi = a, max(b, min(a + step, store.n))
            codes, rows = np.asarray(ivf["codes"][lo:hi]), np.asarray(ivf[labels][lo:hi])
            buf_lo, buf_hi = lo, hi
        yield int(lst), codes[a - buf_lo:b - buf_lo], rows[a - buf_lo:b - buf_lo]


def build_inverted_with(path: str, client: Any, *, rebuild: bool = False) -> None:
    """build_inverted on the given Dask client, or in this process when client is None (small local runs).
    rebuild: chunks were (re-)encoded just now, so any inverted layout built before is stale."""
    from .store import open_store

    store = open_store(path, mode="r+" if rebuild else "r")
    if rebuild:
        store.group["ivf"].attrs.update({"complete": False, "starts_done": False})
    elif store.group["ivf"].attrs.get("complete"):
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
    ivf = store.group["ivf"]
    if store.ids.dtype.kind == "u" and store.n:
        top = max(int(np.asarray(ivf["ids"][lo:lo + (1 << 20)]).max()) for lo in range(0, store.n, 1 << 20))
        if top > np.iinfo(np.int64).max:
            raise InputError(f"{store.path}: ids up to {top} do not fit faiss's int64 ids. Re-encode with ids "
                             "below 2**63.")
    cb = store.codebook()
    offsets = np.asarray(ivf["offsets"][...])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    t0 = time.perf_counter()
    try:
        with open(tmp, "wb") as f:
            write_index(f, cb, sizes=np.diff(offsets),
                        lists_data=((lst, c, i.astype(np.int64)) for lst, c, i in iter_lists(store, labels="ids")))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("export-faiss: IndexIVFPQ with %d rows in %d lists written to %s in %.2f s", store.n, cb.nlist, out,
             time.perf_counter() - t0)
    return out
