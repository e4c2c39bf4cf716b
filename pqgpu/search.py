"""Search and evaluation over a code store: exhaustive ADC top-k (like faiss IndexPQ), recall@k, MSE.

Asymmetric distance computation: each query gets a table of squared distances to every centroid of every
sub-quantizer, (nq, M, ksub); the distance to a code is the sum of M table look-ups. The scan runs chunk
by chunk with a running top-k per query, so memory is bounded by the chunk size, not by n.

Inner product (metric ip, and cosine after normalising the queries): the tables hold -<q_m, c_mk>, so the
same min-heap engines keep the largest scores (negation is exact: the sums are faiss's, negated), and the
results are negated back: scores in the metric's own sense, larger first, ties to the lower row.

Two engines share that shape (as faiss's DatasetAssign / DatasetAssignGPU): the array-API one runs on
NumPy, CuPy and array_api_strict; on the CPU a fused numba kernel (pqgpu._cpu_adc) replaces it.
Compute functions take arrays and iterators; only `search`, `evaluate` and `search_store` open stores.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from . import kernels
from .backend import namespace, resolve_backend, to_device, to_host
from .codebook import Codebook, as_float32_matrix
from .errors import ConfigError, InputError, StoreError
from .evaluation import (ExactKnn, check_k, evaluation_inputs, prepare_queries, recall_metrics,
                         reconstruction_pass, to_metric)
from .refine import check_refine, refine_rows, refine_summary, store_metric
from .sources.recorded import check_source_unchanged
from .store import as_store

log = logging.getLogger(__name__)

# Distance of a missing result (k > n): FLT_MAX, exactly what faiss IndexPQ returns there.
MISSING_DISTANCE = float(np.finfo(np.float32).max)
MISSING_ROW = -1
# Budget for the ADC tables of one query batch: nbits=16 tables are M * 65536 floats per query.
TABLE_BYTES = 256 << 20
# Budget for the (nq, rows) distance block of the array-API engine.
SCAN_BYTES = 128 << 20


# -- array-API core -------------------------------------------------------------------------------------

def adc_scan(tables: Any, codes_sub: Any) -> Any:
    """ADC distances: tables (nq, M, ksub) float32, sub-codes (rows, M) integer -> (nq, rows) float32.

    Sums the M look-ups in sub-quantizer order, as faiss does.
    """
    xp = array_namespace(tables, codes_sub)
    nq, M, _ksub = tables.shape
    rows = codes_sub.shape[0]
    idx = xp.astype(codes_sub, xp.int64)
    out = xp.zeros((nq, rows), dtype=tables.dtype)
    for m in range(M):
        out = out + xp.take(tables[:, m, :], idx[:, m], axis=1)
    return out


def topk_merge(best_d: Any, best_rows: Any, dist: Any, start: int, k: int) -> tuple[Any, Any]:
    """Merge a block of distances (nq, rows) for global rows start.. into the running top-k.

    best_d (nq, k) float32 / best_rows (nq, k) int64 are sorted by (distance, row); so is the result.
    The stable sort keeps the lower row first on ties (the running best always holds lower rows).
    """
    xp = array_namespace(best_d, dist)
    nq, rows = dist.shape
    row_ids = xp.broadcast_to(xp.arange(start, start + rows, dtype=xp.int64)[None, :], (nq, rows))
    cand_d = xp.concat([best_d, dist], axis=1)
    cand_i = xp.concat([best_rows, row_ids], axis=1)
    order = xp.argsort(cand_d, axis=1, stable=True)[:, :k]
    return xp.take_along_axis(cand_d, order, axis=1), xp.take_along_axis(cand_i, order, axis=1)


class ArrayScanner:
    """Running ADC top-k with array-API kernels, on the namespace the tables live in."""

    def __init__(self, tables: Any, k: int, nbits: int, *, scan_bytes: int = SCAN_BYTES):
        self.xp = xp = array_namespace(tables)
        self.tables = tables
        self.k = k
        self.nbits = nbits
        nq, self.M, _ = tables.shape
        self.block = max(1, scan_bytes // (12 * max(nq, 1)))  # dist + concat copies, float32 + int64
        self.best_d = xp.full((nq, k), MISSING_DISTANCE, dtype=xp.float32)
        self.best_rows = xp.full((nq, k), MISSING_ROW, dtype=xp.int64)

    def add(self, start: int, codes: np.ndarray) -> None:
        sub = kernels.unpack_codes(to_device(codes, self.xp), self.M, self.nbits)
        rows = sub.shape[0]
        for b0 in range(0, rows, self.block):
            b1 = min(b0 + self.block, rows)
            dist = adc_scan(self.tables, sub[b0:b1, :])
            self.best_d, self.best_rows = topk_merge(self.best_d, self.best_rows, dist, start + b0, self.k)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return to_host(self.best_d).astype(np.float32), to_host(self.best_rows).astype(np.int64)


class NumbaScanner:
    """Running ADC top-k on the CPU with the fused numba kernel (table look-ups + heap update)."""

    def __init__(self, tables: np.ndarray, k: int, nbits: int):
        import numba

        from . import _cpu_adc

        self._adc = _cpu_adc
        nq, self.M, ksub = tables.shape
        self.tables = np.ascontiguousarray(tables.reshape(nq, self.M * ksub), dtype=np.float32)
        self.k = k
        self.nbits = nbits
        self.group4 = self.M % 4 == 0 and nbits in (8, 16)  # faiss's summation order, see scan_topk
        # Several partial heaps per query when there are fewer queries than threads, so all cores scan.
        threads = numba.get_num_threads()
        parts = max(1, min(threads, math.ceil(threads / max(nq, 1))))
        self.heap_d = np.full((parts, nq, k), MISSING_DISTANCE, np.float32)
        self.heap_rows = np.full((parts, nq, k), MISSING_ROW, np.int64)

    def add(self, start: int, codes: np.ndarray) -> None:
        self._adc.scan_topk(self.tables, self._adc.sub_codes_t(codes, self.M, self.nbits), start, self.heap_d,
                            self.heap_rows, self.group4)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        parts, nq, k = self.heap_d.shape
        d = self.heap_d.transpose(1, 0, 2).reshape(nq, parts * k)
        r = self.heap_rows.transpose(1, 0, 2).reshape(nq, parts * k)
        order = np.lexsort((r, d), axis=-1)[:, :k]
        return np.take_along_axis(d, order, axis=1), np.take_along_axis(r, order, axis=1)


def adc_tables(queries: Any, centroids: Any, metric: str) -> Any:
    """Tables the min-heap scan sums: (nq, M, ksub) ||q_m - c_mk||^2 for l2, -<q_m, c_mk> for ip / cosine."""
    if metric == "l2":
        return kernels.distance_tables(queries, centroids)
    return -kernels.inner_product_tables(queries, centroids)


def make_scanner(queries: np.ndarray, codebook: Codebook, k: int, backend: str) -> Any:
    """Tables for host queries (already normalised and rotated) and the engine that scans codes with them."""
    if resolve_backend(backend) == "cpu":
        # float64 tables cost nothing next to the scan and keep ||q||^2 + ||c||^2 - 2 q.c cancellation
        # out of the distances.
        tables = np.asarray(adc_tables(queries.astype(np.float64), codebook.centroids.astype(np.float64),
                                       codebook.metric)).astype(np.float32)
        try:
            return NumbaScanner(tables, k, codebook.nbits)
        except ImportError:
            log.info("numba is not installed: ADC search runs on the array-API kernels (slower)")
            import array_api_compat.numpy as xp

            return ArrayScanner(xp.asarray(tables), k, codebook.nbits)
    xp = namespace("gpu")
    tables = adc_tables(to_device(queries, xp), to_device(codebook.centroids, xp), codebook.metric)
    return ArrayScanner(tables, k, codebook.nbits)


def query_batch_size(codebook: Codebook, table_bytes: int = TABLE_BYTES) -> int:
    """Queries per pass over the codes, so that their ADC tables fit in table_bytes."""
    return max(1, table_bytes // (4 * codebook.M * codebook.ksub))


def search_codes(queries: Any, codebook: Codebook, chunks: Iterable[tuple[int, np.ndarray]], k: int, *,
                 backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive ADC top-k of queries (nq, d) over chunks of (start_row, codes uint8 (rows, code_size)).

    Chunks come in row order. Returns distances float32 (nq, k) and rows int64 (nq, k), sorted by
    distance (ties: lower row first); where fewer than k rows exist: row -1, distance FLT_MAX. For metric
    ip / cosine the first array holds similarities, largest first (missing: -FLT_MAX).
    """
    k = check_k(k)
    q = prepare_queries(queries, codebook)
    scanner = make_scanner(q, codebook, k, backend)
    for start, codes in chunks:
        if codes.ndim != 2 or codes.shape[1] != codebook.code_size:
            raise InputError(f"codes at row {start}: expected (rows, {codebook.code_size}) uint8 for M="
                             f"{codebook.M}, nbits={codebook.nbits}. Got {codes.dtype} {codes.shape} instead.")
        scanner.add(int(start), np.asarray(codes, dtype=np.uint8))
    d, rows = scanner.result()
    return to_metric(d, codebook.metric), rows


# -- store wrappers -------------------------------------------------------------------------------------

def store_chunks(store: Any, chunk_rows: int | None = None, *, prefetch: bool = True
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """(start, codes) over a complete store in row order, reading the next block while the caller computes.
    Blocks are whole store chunks (chunk_rows rounded up to them), each checked against its recorded CRC."""
    if not store.is_complete():
        raise StoreError(f"Store {store.path} is incomplete ({len(store.pending_chunks())} of {store.n_chunks} "
                         "chunks not done). Finish it with `pqgpu encode` first.")
    store.check_chunks_present()
    if chunk_rows is not None and (not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1):
        raise ConfigError(f"chunk_rows: expected a positive integer or None. Got {chunk_rows!r} instead.")
    checker = store.checker()
    grid = store.chunk_rows
    step = -(-int(chunk_rows or grid) // grid) * grid
    n = store.n
    starts = list(range(0, n, step))

    def read(lo: int) -> np.ndarray:
        if checker is None:
            return np.asarray(store.codes[lo:min(lo + step, n)])
        return checker.read(store.codes, "codes", lo, min(lo + step, n))

    if not prefetch or len(starts) < 2:
        for lo in starts:
            yield lo, read(lo)
        return
    # One read ahead: Zarr I/O, decompression and the CRC overlap the scan (the numba kernel releases the GIL).
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pqgpu-read") as pool:
        pending = pool.submit(read, starts[0])
        for i, lo in enumerate(starts):
            codes = pending.result()
            if i + 1 < len(starts):
                pending = pool.submit(read, starts[i + 1])
            yield lo, codes


def search_store(store: Any, queries: Any, k: int, *, backend: str = "auto",
                 chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ADC top-k over an opened store. Returns distances float32 (nq, k) and store rows int64 (nq, k)."""
    k = check_k(k)
    cb = store.codebook()
    q = as_float32_matrix(queries, "queries", d=cb.d)
    nq = q.shape[0]
    batch = query_batch_size(cb)
    t0 = time.perf_counter()
    if nq <= batch:
        d, rows = search_codes(q, cb, store_chunks(store, chunk_rows), k, backend=backend)
    else:
        # Large tables (nbits > 12): one pass over the codes per query batch keeps them within TABLE_BYTES.
        log.info("search: %d queries in batches of %d (ADC tables of %d MiB per query batch)", nq, batch,
                 TABLE_BYTES >> 20)
        parts = [search_codes(q[i:i + batch], cb, store_chunks(store, chunk_rows), k, backend=backend)
                 for i in range(0, nq, batch)]
        d = np.concatenate([p[0] for p in parts])
        rows = np.concatenate([p[1] for p in parts])
    dt = time.perf_counter() - t0
    log.info("search: %d queries, k=%d over %d codes in %.3f s (%.1f queries/s)", nq, k, store.n, dt,
             nq / dt if dt > 0 else float("inf"))
    return d, rows


def rows_to_ids(store: Any, rows: np.ndarray) -> np.ndarray:
    """Map store rows (-1 = missing) to store ids, reading (and checking) only the chunks of ids that hold
    them: int64 or uint64 as stored (missing: -1, or for uint64 2**64 - 1; a missing result also has distance
    MISSING_DISTANCE), or object (None missing)."""
    ids_array = store.ids
    checker = store.checker()
    valid = rows >= 0
    uniq, inverse = np.unique(rows[valid], return_inverse=True)
    if not uniq.size:
        found = np.asarray(ids_array[0:0])
    elif checker is None:
        found = np.asarray(ids_array.oindex[uniq])
    else:
        found = checker.take(ids_array, "ids", uniq)
    if found.dtype.kind in "iu":
        dtype = np.uint64 if found.dtype == np.uint64 else np.int64
        out = np.full(rows.shape, np.iinfo(dtype).max if dtype == np.uint64 else -1, dtype)
        out[valid] = found.astype(dtype)[inverse]
    else:
        out = np.full(rows.shape, None, dtype=object)
        out[valid] = found.astype(object)[inverse]
    return out


def search(store_or_path: Any, queries: Any, k: int, *, backend: str = "auto",
           chunk_rows: int | None = None, nprobe: int | None = None,
           refine: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive ADC top-k over a code store (same results as faiss IndexPQ.search on these codes).

    queries: (nq, d) float; returns distances float32 (nq, k) (squared L2, ascending; for metric ip / cosine
    similarities, descending, as faiss's METRIC_INNER_PRODUCT) and the store's ids (nq, k): int64 with -1,
    or object with None, where the store has fewer than k rows (distance FLT_MAX, np.finfo(np.float32).max,
    as faiss pads; similarity -FLT_MAX: a real id -1 scores otherwise; pqgpu.results drops these).
    IVF stores (quantizer.nlist > 0) scan only the nprobe nearest lists (None: a stated default).
    refine R: take the top k*R by ADC and re-rank them exactly with the original vectors read back from the
    store's source (pqgpu.refine); the distances are then exact (for ip / cosine: similarities, largest first).
    """
    store = as_store(store_or_path)
    k = check_k(k)
    R = check_refine(refine)
    source = check_source_unchanged(store) if R else None  # refuse before searching
    kk = k * R if R else k
    if "lists" in store.group:  # IVF store: pqgpu.ivf_search
        from .ivf_search import search_ivf_store

        d, rows = search_ivf_store(store, queries, kk, nprobe=nprobe, backend=backend)
    else:
        if nprobe is not None:
            raise ConfigError(f"--nprobe applies to IVF stores only; {store.path} was encoded with quantizer.nlist: 0 "
                              "(every search scans all its codes). Drop --nprobe.")
        d, rows = search_store(store, queries, kk, backend=backend, chunk_rows=chunk_rows)
    if R:
        q = as_float32_matrix(queries, "queries", d=int(store.attrs["d"]))
        d, rows, _ = refine_rows(source, q, rows, k, store_metric(store), backend=backend)
    return d, rows_to_ids(store, rows)


# -- evaluation -----------------------------------------------------------------------------------------

def evaluate(store_or_path: Any, queries: Any, *, base_chunks: Iterable[np.ndarray] | None = None,
             ground_truth: Any = None, ks: Iterable[int] = (1, 10, 100), backend: str = "auto",
             nprobes: Iterable[int] | None = None, refine: int | None = None) -> dict[str, Any]:
    """Recall@k of ADC search against exact neighbours, reconstruction MSE and compression of a store.
    refine R: recall of the top k*R ADC candidates re-ranked with the source's vectors (pqgpu.refine).

    base_chunks: float (rows, d) blocks of the original vectors in store row order; used for the exact
    neighbours (when ground_truth is None) and the reconstruction MSE. ground_truth: (nq, >= max k) store
    row indices of the exact neighbours, best first. One of the two is required.
    """
    store = as_store(store_or_path)
    R = check_refine(refine)
    if "lists" in store.group:  # IVF store: recall and queries/s per nprobe (pqgpu.ivf_search)
        from .ivf_search import evaluate_ivf

        return evaluate_ivf(store, queries, base_chunks=base_chunks, ground_truth=ground_truth, ks=ks,
                            nprobes=nprobes, backend=backend, refine=R)
    cb, n, q, ks, gt = evaluation_inputs(store, queries, ks, ground_truth, base_chunks)
    nq, kmax = q.shape[0], ks[-1]
    source = check_source_unchanged(store) if R else None

    t0 = time.perf_counter()
    _dist, found = search_store(store, q, kmax * (R or 1), backend=backend)
    read: dict[str, Any] = {}
    if R:
        _dist, found, read = refine_rows(source, q, found, kmax, store_metric(store), backend=backend)
    t_search = time.perf_counter() - t0

    mse = relative_mse = None
    if base_chunks is not None:
        mse, relative_mse, exact = reconstruction_pass(
            base_chunks, n, cb.d, lambda lo, hi: cb.decode(np.asarray(store.codes[lo:hi])),
            ExactKnn(q, kmax, metric=cb.metric) if gt is None else None, cb.metric)
        gt = exact if gt is None else gt

    result: dict[str, Any] = {
        "n": n, "d": cb.d, "M": cb.M, "nbits": cb.nbits, "opq": cb.rotation is not None, "metric": cb.metric,
        "code_size": cb.code_size, "compression_ratio": round(4 * cb.d / cb.code_size, 2), "nq": nq,
        "ground_truth": "given" if ground_truth is not None else "exact (from base vectors)",
    }
    if R:
        result.update(refine_summary(R, read))
    result.update(recall_metrics(found, gt, ks))
    result["mse"] = mse
    result["relative_mse"] = relative_mse
    result["search_seconds"] = round(t_search, 4)
    log.info("evaluate: %s", ", ".join(f"{k}={v}" for k, v in result.items()))
    return result


