"""Task functions that run where the work is: on a Dask worker, or on a thread of this process.

Each task resolves the backend itself, so the machine doing the work decides CPU or GPU: a CPU-only client
drives GPU workers with `backend: auto`, and `gpu` on a worker without a usable GPU fails naming that worker.
Tasks take plain objects (Source, Chunk, Codebook, Config) and paths to the store, never open clients.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import gpu_status, resolve_backend
from .codebook import Codebook, as_float32_matrix
from .config import Config
from .errors import BackendUnavailable, InputError, PqgpuError
from ._faults import fault_point
from .sources import Chunk, Source, open_source

log = logging.getLogger(__name__)

# numba's default (workqueue) threading layer aborts when two threads of one process launch parallel
# kernels at once: CPU encodes of one process take turns; each one uses all the kernel threads it is given.
_CPU_KERNEL = threading.Lock()
_GPU_TURN = threading.Lock()


def where_am_i() -> dict[str, str]:
    """{'worker': Dask worker address or 'pid N', 'host': host name} of the process running this code."""
    address = f"pid {os.getpid()}"
    if "distributed" in sys.modules:  # never import Dask just to ask
        try:
            from distributed import get_worker

            address = get_worker().address
        except ValueError:  # not inside a worker task
            pass
    return {"worker": address, "host": socket.gethostname()}


def resolve_here(requested: str) -> str:
    """resolve_backend(requested) on this worker; a failure names the worker and host."""
    try:
        return resolve_backend(requested)
    except BackendUnavailable as exc:
        me = where_am_i()
        who = f"process {me['worker']}" if me["worker"].startswith("pid ") else f"Dask worker {me['worker']}"
        raise BackendUnavailable(f"On {who} (host {me['host']}): {exc}") from None


def probe_gpu() -> dict[str, Any]:
    """Run on every worker (client.run) to find the ones with a usable GPU, before choosing where to train."""
    ok, reason = gpu_status()
    return {**where_am_i(), "gpu": ok, "reason": reason}


@dataclass(frozen=True)
class ChunkResult:
    index: int
    rows: int
    t_read: float
    t_encode: float
    backend: str  # as resolved on the worker: "cpu" or "gpu"
    worker: str
    host: str


def check_vectors(source: Source, x: np.ndarray, start: int, d: int, metric: str = "l2") -> np.ndarray:
    """float32 (rows, d), with a NaN/Inf error (and, for metric cosine, an all-zero row error) that names the
    file and row it came from."""
    try:
        x = as_float32_matrix(x, "vectors", d=d, row_offset=start)
        if metric == "cosine":
            _refuse_zero_rows(source, x, start)
        return x
    except InputError:
        finite = np.isfinite(np.asarray(x, dtype=np.float32)).all(axis=1) if np.asarray(x).ndim == 2 else None
        if finite is None or finite.all():
            raise
        row = start + int(np.flatnonzero(~finite)[0])
        path, local = source.locate(row)
        raise InputError(f"{path}: row {local} (global row {row}) has a NaN or Inf value. Fix it in place and run "
                         "the same command again: the chunks of the rewritten file are encoded again and the others "
                         "kept. Dropping the row instead changes the file's row count, which needs --overwrite (the "
                         "whole source encoded again).") from None


def _refuse_zero_rows(source: Source, x: np.ndarray, start: int, rows: np.ndarray | None = None) -> None:
    """InputError naming the file and row of the first all-zero row of x (metric cosine cannot normalise it).
    rows: the global row of each row of x (a training sample); default start + position."""
    from .metric import zero_norm_rows

    first, count = zero_norm_rows(x)
    if count:
        row = int(rows[first]) if rows is not None else start + first
        path, local = source.locate(row)
        raise InputError(f"{path}: row {local} (global row {row}) is all zeros ({count} such row(s) in this "
                         f"{'sample' if rows is not None else 'chunk'}); quantizer.metric cosine divides every row "
                         "by its norm. Drop or fix zero vectors in the source, or use metric ip or l2.")


def encode_chunk(source: Source, chunk: Chunk, store_path: str, codebook: Codebook, requested_backend: str,
                 threads: int | None, keep: int = 0) -> ChunkResult | PqgpuError:
    """Read one chunk, encode it on the backend this worker resolves, write it, mark it done.

    An expected failure (bad row, unreadable file, no GPU here) is returned, not raised: Dask logs every
    failed task at ERROR with a traceback in the worker, ahead of the CLI's one paragraph. (The error keeps
    its traceback: Dask pickles it along, and --debug shows it.)

    keep: rows at the chunk's start already in the store (an append completing the last chunk): their codes,
    ids and lists are read back (checked against their CRCs) and written again as they are; only the rows
    after them are read from the source and encoded."""
    try:
        return _encode_chunk(source, chunk, store_path, codebook, requested_backend, threads, keep)
    except PqgpuError as exc:
        return exc


def _encode_chunk(source: Source, chunk: Chunk, store_path: str, codebook: Codebook, requested_backend: str,
                  threads: int | None, keep: int = 0) -> ChunkResult:
    from .store import write_chunk

    backend = resolve_here(requested_backend)
    if threads:
        _set_kernel_threads(threads)
    t0 = time.perf_counter()
    whole = chunk
    if keep:
        chunk = _after(chunk, keep)
    x, ids = source.read_chunk(chunk)
    t1 = time.perf_counter()
    x = check_vectors(source, x, chunk.start, codebook.d, codebook.metric)
    if backend == "gpu":
        from .backend import pinned_copy

        x = pinned_copy(x)  # a host copy done here, in parallel, not during the GPU turn below
    # CPU: numba's workqueue layer aborts on two parallel kernels at once, so encodes take turns on all cores.
    # GPU: one encode at a time per worker process (device memory is planned for one); the worker's other
    # threads read, decode and write chunks meanwhile (cluster.cuda_worker_threads)
    with _CPU_KERNEL if backend == "cpu" else _GPU_TURN:
        t_enc = time.perf_counter()
        if getattr(codebook, "nlist", 0):  # IVF: the list of each row, and the codes of its residual
            lists, codes = codebook.encode_ivf(x, backend, checked=True)
        else:
            codes = codebook.encode(x, backend, checked=True)
        t2 = time.perf_counter()
    if not getattr(codebook, "nlist", 0):
        lists = None
    if keep:  # the rows already there, as stored, then the new ones
        from .append import read_kept

        old = read_kept(store_path, whole.index, whole.start, keep, lists is not None)
        codes = np.concatenate([old["codes"], codes])
        ids = np.concatenate([old["ids"], np.asarray(ids).astype(old["ids"].dtype)])
        if lists is not None:
            lists = np.concatenate([old["lists"], np.asarray(lists).astype(old["lists"].dtype)])
    if lists is not None:  # lists (and per-list counts) land before the done flag
        from .invert import write_chunk_lists

        write_chunk_lists(store_path, whole.index, whole.start, lists)
    fault_point("before-write", whole.index)
    write_chunk(store_path, whole.index, whole.start, codes, ids, lists)
    me = where_am_i()
    return ChunkResult(whole.index, whole.rows, t1 - t0, t2 - t_enc, backend, me["worker"], me["host"])


def _after(chunk: Chunk, keep: int) -> Chunk:
    """The part of a chunk after its first `keep` rows (whole pieces: an append's new rows start a new file)."""
    pieces, skipped = list(chunk.pieces), 0
    while pieces and skipped < keep:
        skipped += pieces[0].hi - pieces[0].lo
        pieces.pop(0)
    if skipped != keep:
        raise PqgpuError(f"chunk {chunk.index}: the rows kept ({keep}) do not end at a file boundary")
    return Chunk(chunk.index, chunk.start + keep, chunk.stop, tuple(pieces))


def _set_kernel_threads(threads: int) -> None:
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


@dataclass(frozen=True)
class Trained:
    codebook: Codebook
    backend: str
    worker: str
    host: str
    sample_rows: int
    read_seconds: float
    train_seconds: float


def read_sample_part(source: Source, blocks: Any, unit_rows: int) -> tuple[np.ndarray, int] | PqgpuError:
    """One part of the training sample (pqgpu.sources.sampling.read_blocks), read on this worker; an expected
    failure is returned, not raised (see encode_chunk)."""
    from .sources.sampling import read_blocks

    try:
        return read_blocks(source, blocks, unit_rows)
    except PqgpuError as exc:
        return exc


def train_task(cfg: Config, requested_backend: str, plan: Any = None, parts: Any = None,
               read_seconds: float = 0.0) -> Trained:
    """Train the quantizer of cfg.quantizer here on its training sample: with `plan` (a sampling.Plan) and
    `parts` (read_sample_part of each of its parts, read on the workers) from those; otherwise drawn here.
    The caller writes the quantizer file: workers need not see quantizer.path."""
    from . import progress
    from .sources.sampling import assemble, draw_sample

    q = cfg.quantizer
    with progress.forward_from():
        backend = resolve_here(requested_backend)
        t0 = time.perf_counter()
        source = open_source(cfg.source)
        if plan is None:
            sample = draw_sample(source, q.train_size, q.seed)
        else:
            failed = next((r for r in parts if isinstance(r, PqgpuError)), None)
            if failed is not None:
                raise failed
            sample = assemble(source, plan, parts, read_seconds + time.perf_counter() - t0)
        x, rows = sample.x, sample.rows
        t_read = sample.seconds
        if not np.isfinite(x).all():
            _name_bad_sample_row(source, x, rows)
        x = as_float32_matrix(x, "training sample")
        if q.metric == "cosine":
            _refuse_zero_rows(source, x, 0, rows)
        log.info("%s (d=%d)", sample.describe(source.n), source.d)
        t1 = time.perf_counter()
        if q.nlist:  # IVF-PQ: coarse k-means, then PQ of the residuals (pqgpu.ivf)
            from .ivf import train_ivf

            cb = train_ivf(x, q.M, q.nbits, q.nlist, niter=q.niter, seed=q.seed, backend=backend, opq=q.opq,
                           metric=q.metric)
        elif q.opq:
            from .opq import train_opq

            cb = train_opq(x, q.M, q.nbits, niter=q.niter, seed=q.seed, backend=backend, metric=q.metric)
        else:
            from .training import train as train_pq

            cb = train_pq(x, q.M, q.nbits, niter=q.niter, seed=q.seed, backend=backend, metric=q.metric)
    me = where_am_i()
    return Trained(cb, backend, me["worker"], me["host"], len(x), t_read, time.perf_counter() - t1)


def train_task_returning_errors(cfg: Config, requested_backend: str, *sample: Any) -> Trained | PqgpuError:
    """train_task on a Dask worker: an expected failure (M not dividing d, a bad sample row) is returned, not
    raised, so the worker logs no traceback ahead of the CLI's one paragraph (as encode_chunk). `sample`:
    train_task's plan, parts and read_seconds."""
    try:
        return train_task(cfg, requested_backend, *sample)
    except PqgpuError as exc:
        return exc


def _name_bad_sample_row(source: Source, x: np.ndarray, rows: np.ndarray) -> None:
    bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
    path, local = source.locate(int(rows[bad]))
    raise InputError(f"{path}: row {local} (global row {int(rows[bad])}) has a NaN or Inf value; the training "
                     "sample cannot contain it. Fix or drop that row.")
