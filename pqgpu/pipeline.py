"""train / encode / run: orchestrate source -> quantizer -> Dask tasks -> code store."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .backend import resolve_backend
from .codebook import Codebook, as_float32_matrix
from .config import Config
from .errors import InputError, PqgpuError, StoreError
from .sources import Chunk, Source, open_source, plan_chunks
from ._faults import fault_point
from .store import exclusive_lock, prepare_store, write_chunk

log = logging.getLogger(__name__)


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def check_vectors(source: Source, x: np.ndarray, start: int, d: int) -> np.ndarray:
    """float32 (rows, d), with a NaN/Inf error that names the file and row it came from."""
    try:
        return as_float32_matrix(x, "vectors", d=d, row_offset=start)
    except InputError:
        finite = np.isfinite(np.asarray(x, dtype=np.float32)).all(axis=1) if np.asarray(x).ndim == 2 else None
        if finite is None or finite.all():
            raise
        row = start + int(np.flatnonzero(~finite)[0])
        path, local = source.locate(row)
        raise InputError(f"{path}: row {local} (global row {row}) has a NaN or Inf value. Fix or drop it and "
                         "run again; chunks already encoded are kept.") from None


def train(cfg: Config, *, backend: str | None = None) -> Codebook:
    """Draw quantizer.train_size rows from across the whole source, train, write quantizer.path atomically."""
    q = cfg.quantizer
    backend = resolve_backend(backend or cfg.encode.backend)
    t0 = time.perf_counter()
    source = open_source(cfg.source)
    x, rows = source.sample(q.train_size, q.seed)
    t_read = time.perf_counter() - t0
    if not np.isfinite(x).all():
        _name_bad_sample_row(source, x, rows)
    x = as_float32_matrix(x, "training sample")
    log.info("training sample: %d of %d rows (d=%d) read in %.2f s; RSS %.0f MiB", len(x), source.n, source.d,
             t_read, rss_mib())
    t1 = time.perf_counter()
    if q.nlist:  # IVF-PQ: coarse k-means, then PQ of the residuals (pqgpu.ivf)
        from .ivf import train_ivf

        cb = train_ivf(x, q.M, q.nbits, q.nlist, niter=q.niter, seed=q.seed, backend=backend, opq=q.opq)
    elif q.opq:
        from .opq import train_opq

        cb = train_opq(x, q.M, q.nbits, niter=q.niter, seed=q.seed, backend=backend)
    else:
        from .codebook import train as train_pq

        cb = train_pq(x, q.M, q.nbits, niter=q.niter, seed=q.seed, backend=backend)
    log.info("trained M=%d nbits=%d%s on %s in %.2f s; RSS %.0f MiB", q.M, q.nbits, " with OPQ" if q.opq else "",
             backend, time.perf_counter() - t1, rss_mib())
    cb.save(q.path)
    log.info("quantizer written to %s (sha256 %s)", q.path, cb.fingerprint()[:16])
    return cb


def _name_bad_sample_row(source: Source, x: np.ndarray, rows: np.ndarray) -> None:
    bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
    path, local = source.locate(int(rows[bad]))
    raise InputError(f"{path}: row {local} (global row {int(rows[bad])}) has a NaN or Inf value; the training "
                     "sample cannot contain it. Fix or drop that row.")


@dataclass
class EncodeReport:
    store: str
    n: int
    chunks: int
    chunks_encoded: int
    seconds: float
    rows_per_second: float


def _encode_chunk(source: Source, chunk: Chunk, store_path: str, codebook: Codebook, backend: str,
                  threads: int | None) -> tuple[int, int, float, float]:
    """Dask task: read one chunk, encode it, write it, mark it done. Returns (index, rows, t_read, t_encode)."""
    if threads:
        _set_kernel_threads(threads)
    t0 = time.perf_counter()
    x, ids = source.read_chunk(chunk)
    t1 = time.perf_counter()
    x = check_vectors(source, x, chunk.start, codebook.d)
    if getattr(codebook, "nlist", 0):  # IVF: lists (and per-list counts) land before the done flag
        from .invert import write_chunk_lists

        lists, codes = codebook.encode_ivf(x, backend, checked=True)
        write_chunk_lists(store_path, chunk.index, chunk.start, lists)
    else:
        codes = codebook.encode(x, backend, checked=True)
    t2 = time.perf_counter()
    fault_point("before-write", chunk.index)
    write_chunk(store_path, chunk.index, chunk.start, codes, ids)
    return chunk.index, chunk.rows, t1 - t0, t2 - t1


def _set_kernel_threads(threads: int) -> None:
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


class Progress:
    """Rows done, rate and ETA, logged at most every `every` seconds."""

    def __init__(self, total: int, every: float = 2.0, callback: Callable[[int, int, float], None] | None = None):
        self.total, self.every, self.callback = total, every, callback
        self.done = 0
        self.t0 = self.last = time.perf_counter()

    def add(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        if self.callback:
            self.callback(self.done, self.total, now - self.t0)
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info("encoded %s / %s rows (%.1f%%), %s rows/s, ETA %.0f s", f"{self.done:,}", f"{self.total:,}",
                     100 * self.done / max(self.total, 1), f"{rate:,.0f}", eta)


def encode(cfg: Config, *, overwrite: bool = False, client: Any = None, strict_ids: bool = False,
           progress: Callable[[int, int, float], None] | None = None) -> EncodeReport:
    """Encode every chunk of the source not yet done into encode.output, with Dask."""
    from .cluster import dask_client

    backend = resolve_backend(cfg.encode.backend)
    qpath = Path(cfg.quantizer.path)
    if not qpath.exists():
        raise PqgpuError(f"No quantizer at {qpath}. Train one first with `pqgpu train -c CONFIG` "
                         "(or use `pqgpu run`, which trains when it is missing).")
    from .ivf import load_quantizer

    codebook = load_quantizer(qpath, cfg.quantizer.nlist)
    source = open_source(cfg.source)
    if source.d != codebook.d:
        raise InputError(f"The source vectors have d={source.d} but the quantizer {qpath} expects d={codebook.d}. "
                         "Retrain the quantizer for this source or point source.path at the right data.")
    chunk_rows = cfg.encode.chunk_rows
    chunks = plan_chunks([s.n_rows for s in source.shards], chunk_rows)
    out = cfg.encode.output
    t0 = time.perf_counter()
    with exclusive_lock(out):
        store = prepare_store(out, codebook=codebook, n=source.n, chunk_rows=chunk_rows,
                              id_dtype=source.id_dtype, source=source.fingerprint(), overwrite=overwrite)
        pending = store.pending_chunks()
        if len(pending) < len(chunks):
            log.info("resuming %s: %d of %d chunks already done", out, len(chunks) - len(pending), len(chunks))
        todo = [chunks[i] for i in pending]
        total_rows = sum(c.rows for c in todo)
        if todo:
            if client is not None:
                _run_tasks(client, source, todo, out, codebook, backend, total_rows, progress, cfg)
            else:
                with dask_client(cfg.cluster) as c:
                    _run_tasks(c, source, todo, out, codebook, backend, total_rows, progress, cfg)
        if not store.is_complete():
            raise StoreError(f"{out}: encoding finished but {len(store.pending_chunks())} chunk(s) are not marked "
                             "done. Run `pqgpu encode` again to finish them.")
        check_duplicate_ids(store, source, strict=strict_ids)
        if getattr(codebook, "nlist", 0):  # IVF: group the rows by list (pqgpu.invert), resumable
            from .invert import build_inverted_with

            build_inverted_with(out, client, cfg.cluster, rebuild=bool(todo))
    seconds = time.perf_counter() - t0
    report = EncodeReport(out, source.n, len(chunks), len(todo), seconds, total_rows / max(seconds, 1e-9))
    log.info("store %s complete: %d rows, %d chunks (%d encoded now) in %.2f s", out, source.n, len(chunks),
             len(todo), seconds)
    return report


def _run_tasks(client: Any, source: Source, todo: list[Chunk], out: str, codebook: Codebook, backend: str,
               total_rows: int, progress: Any, cfg: Config) -> None:
    from distributed import as_completed

    workers = client.scheduler_info()["workers"]
    threads = max(1, min(w.get("nthreads", 1) for w in workers.values())) if workers else 1
    # the codebook travels to each worker once, not once per task
    [cb_future] = client.scatter([codebook], broadcast=True)
    [src_future] = client.scatter([source], broadcast=True)
    futures = [client.submit(_encode_chunk, src_future, c, out, cb_future, backend, threads,
                             key=f"pqgpu-encode-{c.index}-{os.getpid()}-{time.monotonic_ns()}", pure=False,
                             retries=0) for c in todo]
    meter = Progress(total_rows, callback=progress)
    t_read = t_enc = 0.0
    completed = 0
    try:
        for fut in as_completed(futures):
            if fut.status == "error":
                exc = fut.exception()
                raise exc
            _, rows, tr, te = fut.result()
            t_read += tr
            t_enc += te
            meter.add(rows)
            completed += 1
            fault_point("driver-after", completed)
    except BaseException:
        client.cancel(futures)
        raise
    log.info("task time: read %.1f s, encode %.1f s (summed over workers); driver RSS %.0f MiB",
             t_read, t_enc, rss_mib())


def check_duplicate_ids(store: Any, source: Source, *, strict: bool) -> int:
    """Count ids that occur more than once; warn, or raise InputError naming the first one when strict.

    Memory: one copy of the ids, sorted in place (8 bytes a row for integer ids); the rows of the first
    duplicate are found by a second pass over the store's id chunks, only when there is one."""
    ids = store.ids[...]
    if ids.dtype.kind not in "iu":
        ids = np.asarray(ids, dtype=object).astype(str)
    ids.sort()
    dup = np.flatnonzero(ids[1:] == ids[:-1])
    if not dup.size:
        return 0
    repeated = ids[dup]  # sorted: one entry per extra occurrence
    n_dup = 1 + int(np.count_nonzero(repeated[1:] != repeated[:-1]))
    first_id = ids[dup[0]]
    del ids
    first_id = first_id.item() if hasattr(first_id, "item") else first_id
    rows = _rows_with_id(store, first_id, limit=2)
    (p0, r0), (p1, r1) = source.locate(int(rows[0])), source.locate(int(rows[1]))
    msg = (f"{n_dup} id(s) occur more than once, e.g. id {first_id!r} at {p0} row {r0} and {p1} row {r1}. "
           "Search results will not tell these rows apart.")
    if strict:
        raise InputError(msg + " (--strict-ids makes this an error; the codes are stored in "
                         f"{store.path} all the same.)")
    log.warning(msg + " Pass --strict-ids to make this an error.")
    return n_dup


def _rows_with_id(store: Any, value: Any, limit: int) -> list[int]:
    """The first `limit` rows whose id equals value, reading the ids chunk by chunk."""
    rows: list[int] = []
    for i in range(store.n_chunks):
        lo, hi = store.chunk_range(i)
        ids = store.ids[lo:hi]
        if ids.dtype.kind not in "iu":
            ids = np.asarray(ids, dtype=object).astype(str)
        rows += [lo + int(r) for r in np.flatnonzero(ids == value)[:limit - len(rows)]]
        if len(rows) == limit:
            break
    return rows


def run(cfg: Config, *, overwrite: bool = False, client: Any = None, progress: Any = None,
        strict_ids: bool = False) -> EncodeReport:
    """Train when quantizer.path is missing, then encode."""
    if not Path(cfg.quantizer.path).exists():
        train(cfg)
    else:
        log.info("using the existing quantizer %s", cfg.quantizer.path)
    return encode(cfg, overwrite=overwrite, client=client, progress=progress, strict_ids=strict_ids)


def evaluate_config(cfg: Config, queries: Any, *, ground_truth: Any = None,
                    ks: tuple[int, ...] = (1, 10, 100), nprobes: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Recall@k and reconstruction MSE of the store encode.output against its source (read chunk by chunk)."""
    from .search import evaluate

    source = open_source(cfg.source)
    blocks = (x for _, x, _ in source.iter_chunks(cfg.encode.chunk_rows))
    return evaluate(cfg.encode.output, queries, base_chunks=blocks, ground_truth=ground_truth, ks=ks,
                    backend=cfg.encode.backend, nprobes=nprobes)
