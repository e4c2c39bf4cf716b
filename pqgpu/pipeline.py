"""train / encode / run: orchestrate source -> quantizer -> Dask tasks -> code store."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .codebook import Codebook
from .config import Config, QuantizerConfig, load_config
from .errors import ConfigError, InputError, PqgpuError, StoreError
from .sources import Chunk, Source, open_source, plan_chunks
from . import _fs
from ._faults import fault_point
from .store import exclusive_lock, prepare_store, recheck_done_chunks

log = logging.getLogger(__name__)


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def train(cfg: Config | dict | str | os.PathLike, *, backend: str | None = None, client: Any = None) -> Codebook:
    """Draw quantizer.train_size rows from across the whole source, train, write quantizer.path atomically.

    With a Dask client (cluster.kind address) training is a task on a worker (one with a GPU when the
    backend is gpu, or auto and one has a GPU): the sample is read there and the trained codebook comes back
    here, where quantizer.path is written, so workers need not see quantizer.path. Without a client
    (local runs) it runs in this process. cfg: a Config, a dict of sections or a YAML file (load_config)."""
    from . import progress
    from .tasks import train_task, train_task_returning_errors

    cfg = load_config(cfg)
    if client is None and cfg.cluster.kind == "address":
        from .cluster import dask_client

        with dask_client(cfg.cluster) as c:
            return train(cfg, backend=backend, client=c)
    q = cfg.quantizer
    requested = backend or cfg.encode.backend
    if client is None:
        done = train_task(cfg, requested)
    else:
        worker = _training_worker(client, requested)
        progress.listen(client)
        plan, parts, t_read = _read_sample_on_workers(client, cfg)
        where = {"workers": [worker], "allow_other_workers": False} if worker else {}
        fut = client.submit(train_task_returning_errors, cfg, requested, plan, parts, t_read, pure=False,
                            key=f"pqgpu-train-{os.getpid()}-{time.monotonic_ns()}", **where)
        done = fut.result()
        if isinstance(done, PqgpuError):  # an expected failure, returned by the task (see tasks.encode_chunk)
            raise done
    cb = done.codebook
    log.info("trained M=%d nbits=%d%s on %s (%s, host %s): sample of %d rows read in %.2f s, trained in %.2f s; "
             "RSS here %.0f MiB", q.M, q.nbits, " with OPQ" if q.opq else "", done.backend, done.worker,
             done.host, done.sample_rows, done.read_seconds, done.train_seconds, rss_mib())
    cb.save(q.path)
    log.info("quantizer written to %s (sha256 %s)", q.path, cb.fingerprint()[:16])
    return cb


def _read_sample_on_workers(client: Any, cfg: Config) -> tuple[Any, list[Any], float]:
    """Plan the training sample here and read its parts as tasks spread over all workers (4 per thread);
    the parts stay on the workers, as futures, until the training task gathers them."""
    from distributed import wait

    from . import progress
    from .cluster import share
    from .sources.sampling import plan_for
    from .tasks import read_sample_part

    t0 = time.perf_counter()
    source = open_source(cfg.source)
    threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()) or 1
    plan = plan_for(source, cfg.quantizer.train_size, cfg.quantizer.seed, parts=4 * threads)
    src = share(client, source, "source")
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    parts = [client.submit(read_sample_part, src, part, plan.unit_rows, pure=False, key=f"pqgpu-sample-{i}-{tag}")
             for i, part in enumerate(plan.parts)]
    meter = progress.Stage("training sample", len(parts), "parts", brief=True)
    try:
        from distributed import as_completed

        for _ in as_completed(parts):
            meter.add(1)
    finally:
        meter.close()
    wait(parts)
    return plan, parts, time.perf_counter() - t0


def _params(M: int, nbits: int, opq: bool, metric: str = "l2") -> str:
    return f"M={M}, nbits={nbits}, opq={'true' if opq else 'false'}, metric={metric}"


def check_quantizer_matches(codebook: Codebook, q: QuantizerConfig, where: str, *, store: bool = False) -> None:
    """ConfigError when a quantizer (file, or a store's codebook when store=True) has another M, nbits,
    OPQ setting or metric than the config: using it would silently give codes (or scores) of another kind
    than asked for."""
    have = (codebook.M, codebook.nbits, codebook.rotation is not None, codebook.metric)
    want = (q.M, q.nbits, q.opq, q.metric)
    if have == want:
        return
    if store:
        raise ConfigError(
            f"The code store {where} was made with a quantizer of {_params(*have)}, but the config asks for "
            f"{_params(*want)}; its figures would describe another quantizer than the one configured. Either "
            "encode again with this config (`pqgpu run --retrain --overwrite`, which replaces quantizer.path and "
            "the store), or set encode.output (and quantizer.path) to the ones made with these settings.")
    sidecars = [s for s, on in ((".opq", have[2]), (".metric", have[3] != "l2" and not getattr(codebook, "nlist", 0)))
                if on]
    files = f"{where} (with {' and '.join(where + s for s in sidecars)})" if sidecars else str(where)
    raise ConfigError(
        f"The quantizer {files} has {_params(*have)}, but the config asks for {_params(*want)}; pqgpu will not "
        "use a quantizer that disagrees with the config, and nothing was written. Either retrain it "
        f"explicitly with `pqgpu run --retrain` (or `pqgpu train`), which replaces {where}"
        f"{' and its .opq file' if have[2] or want[2] else ''} (add --overwrite to replace a store made with "
        "the old one), or set quantizer.path to another file to keep this one.")


def _training_worker(client: Any, requested: str) -> str | None:
    """The worker that trains: one with a usable GPU for gpu (refusing, naming the workers, when there is
    none) and for auto when there is one; None (any worker) otherwise."""
    from .errors import BackendUnavailable
    from .tasks import probe_gpu

    if requested == "cpu":
        return None
    probes = client.run(probe_gpu)
    if not probes:
        raise PqgpuError("The Dask cluster has no workers. Start some (`dask worker ADDRESS`) and run again.")
    gpus = sorted(addr for addr, p in probes.items() if p["gpu"])
    if gpus:
        return gpus[0]
    if requested == "gpu":
        names = _describe_probes(probes)
        raise BackendUnavailable(f"backend 'gpu' was requested but no Dask worker has a usable GPU: {names}. "
                                 "Start the workers on GPU machines (e.g. `dask cuda worker ADDRESS`) with the GPU "
                                 "extra installed, or use backend 'cpu' (or 'auto').")
    return None


def _describe_probes(probes: dict[str, dict[str, Any]]) -> str:
    """'address (host h): why' for each worker's tasks.probe_gpu answer, in address order."""
    return "; ".join(f"{addr} (host {p['host']}): {p['reason']}" for addr, p in sorted(probes.items()))


@dataclass
class EncodeReport:
    store: str
    n: int
    chunks: int
    chunks_encoded: int
    seconds: float
    rows_per_second: float
    backends: dict[str, str] = field(default_factory=dict)  # worker -> backend it resolved (this run)


def encode(cfg: Config | dict | str | os.PathLike, *, overwrite: bool = False, client: Any = None, strict_ids: bool = False,
           progress: Callable[[int, int, float], None] | None = None, append: bool = False) -> EncodeReport:
    """Encode every chunk of the source not yet done into encode.output: on threads of this process for a
    small local run, on Dask workers otherwise. Each task resolves encode.backend where it runs.
    cfg: a Config, a dict of sections or a YAML file (load_config). append: encode the source's files that are
    new since the store was made into new rows (pqgpu.append)."""
    from .cluster import task_runner

    cfg = load_config(cfg)
    qpath = Path(cfg.quantizer.path)
    if not qpath.exists():
        raise PqgpuError(f"No quantizer at {qpath}. Train one first with `pqgpu train -c CONFIG` "
                         "(or use `pqgpu run`, which trains when it is missing).")
    from .ivf import load_quantizer

    codebook = load_quantizer(qpath, cfg.quantizer.nlist)
    check_quantizer_matches(codebook, cfg.quantizer, str(qpath))
    source = open_source(cfg.source)
    if source.d != codebook.d:
        raise InputError(f"The source vectors have d={source.d} but the quantizer {qpath} expects d={codebook.d}. "
                         "Retrain the quantizer for this source or point source.path at the right data.")
    chunk_rows = cfg.encode.chunk_rows
    chunks = plan_chunks([s.n_rows for s in source.shards], chunk_rows)
    out = cfg.encode.output
    if append:
        _check_append_args(out, qpath, overwrite=overwrite, retrain=False)
    t0 = time.perf_counter()
    backends: dict[str, str] = {}
    plan = None
    with exclusive_lock(out):
        if append:
            from .append import prepare_append

            plan = prepare_append(out, codebook=codebook, source=source, chunk_rows=chunk_rows)
            if plan is None:
                log.info("--append: the source has no files that are new since %s was made; nothing to do", out)
                return EncodeReport(out, source.n, len(chunks), 0, time.perf_counter() - t0, 0.0, {})
            store = plan.store
        else:
            store = prepare_store(out, codebook=codebook, n=source.n, chunk_rows=chunk_rows,
                                  id_dtype=source.id_dtype, source=source.fingerprint(), overwrite=overwrite)
            if store.done_flags().any():  # resuming: done chunks must still be there and intact
                recheck_done_chunks(store)
        pending = store.pending_chunks()
        if len(pending) < len(chunks):
            log.info("resuming %s: %d of %d chunks already done", out, len(chunks) - len(pending), len(chunks))
        todo = [chunks[i] for i in pending]
        total_rows = sum(c.rows for c in todo)

        def work(runner: Any) -> None:
            if cfg.encode.backend == "gpu":  # fail before any task, naming every worker without a GPU
                require_gpu_everywhere(runner)
            if todo:
                backends.update(_run_tasks(runner, source, todo, out, codebook, cfg.encode.backend, total_rows,
                                           progress, keep=plan.keep if plan else None))
                _record_run(store, backends, len(todo))
            if not store.is_complete():
                raise StoreError(f"{out}: encoding finished but {len(store.pending_chunks())} chunk(s) are not "
                                 "marked done. Run `pqgpu encode` again to finish them.")
            if plan is not None:  # the new ids, the new rows' inverted segment, then the commit (pqgpu.append)
                from .append import check_ids, commit

                id_range = check_ids(plan, source, strict=strict_ids, client=_dask_only(runner))
                if plan.segment is not None:
                    from .invert import build_layout

                    build_layout(store, plan.segment, client=_dask_only(runner))
                commit(plan, backends, id_range)
            else:
                from .append import record_first_generation

                id_range = check_duplicate_ids(store, source, strict=strict_ids, client=_dask_only(runner))
                if getattr(codebook, "nlist", 0):  # IVF: group the rows by list (pqgpu.invert), resumable
                    from .invert import build_inverted_with

                    build_inverted_with(out, _dask_only(runner), rebuild=bool(todo))
                record_first_generation(store, backends, id_range)

        if client is not None:
            work(client)
        else:
            with task_runner(cfg.cluster, total_rows * source.d) as runner:
                work(runner)
    seconds = time.perf_counter() - t0
    report = EncodeReport(out, source.n, len(chunks), len(todo), seconds, total_rows / max(seconds, 1e-9), backends)
    log.info("store %s complete: %d rows, %d chunks (%d encoded now) in %.2f s", out, source.n, len(chunks),
             len(todo), seconds)
    return report


def require_gpu_everywhere(runner: Any) -> None:
    """BackendUnavailable naming each worker (or this process) where backend 'gpu' is not usable."""
    from .errors import BackendUnavailable
    from .tasks import probe_gpu, resolve_here

    if _dask_only(runner) is None:
        resolve_here("gpu")
        return
    bad = {addr: p for addr, p in runner.run(probe_gpu).items() if not p["gpu"]}
    if bad:
        names = _describe_probes(bad)
        raise BackendUnavailable(f"backend 'gpu' was requested but {len(bad)} Dask worker(s) have no usable GPU: "
                                 f"{names}. Start the workers on GPU machines (e.g. `dask cuda worker ADDRESS`) "
                                 "with the GPU extra installed, or use backend 'auto' (each worker picks) or 'cpu'.")


def _dask_only(runner: Any) -> Any:
    from .cluster import InProcess

    return None if isinstance(runner, InProcess) else runner


def _record_run(store: Any, backends: dict[str, str], chunks: int) -> None:
    """Append this run's workers and the backends they resolved to the store's attrs (the last 20 runs)."""
    import datetime

    runs = list(store.group.attrs.get("encode_runs", []))[-19:]
    runs.append({"finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "chunks_encoded": chunks, "workers": backends})
    store.group.attrs["encode_runs"] = runs


def _run_tasks(runner: Any, source: Source, todo: list[Chunk], out: str, codebook: Codebook, backend: str,
               total_rows: int, callback: Any, keep: dict[int, int] | None = None) -> dict[str, str]:
    """Submit one encode task per chunk and wait for them, with progress. Returns {worker: backend}."""
    from . import progress
    from .cluster import InProcess
    from .tasks import encode_chunk

    if isinstance(runner, InProcess):
        import concurrent.futures

        threads, cb_arg, src_arg = runner.threads, codebook, source
        as_completed = concurrent.futures.as_completed
    else:
        from distributed import as_completed

        workers = runner.scheduler_info()["workers"]
        threads = max(1, min(w.get("nthreads", 1) for w in workers.values())) if workers else 1
        from .cluster import share

        # the codebook travels to each worker once, not once per task
        cb_arg, src_arg = share(runner, codebook, "codebook"), share(runner, source, "source")
    keep = keep or {}
    futures = [runner.submit(encode_chunk, src_arg, c, out, cb_arg, backend, threads, keep.get(c.index, 0),
                             key=f"pqgpu-encode-{c.index}-{os.getpid()}-{time.monotonic_ns()}", pure=False,
                             retries=0) for c in todo]
    meter = progress.Stage("encoded", total_rows, "rows", callback=callback)
    t_read = t_enc = 0.0
    completed = 0
    backends: dict[str, str] = {}
    try:
        for fut in as_completed(futures):
            r = fut.result()
            if isinstance(r, PqgpuError):  # an expected failure, returned by the task (see tasks.encode_chunk)
                raise r
            t_read += r.t_read
            t_enc += r.t_encode
            if r.worker not in backends:
                backends[r.worker] = r.backend
                log.info("%s (host %s) encodes on %s", r.worker, r.host, r.backend)
            meter.add(r.rows)
            completed += 1
            fault_point("driver-after", completed)
    except BaseException:
        if isinstance(runner, InProcess):
            for f in futures:
                f.cancel()
        else:
            runner.cancel(futures)
        raise
    finally:
        meter.close()
    log.info("task time: read %.1f s, encode %.1f s (summed over workers); driver RSS %.0f MiB",
             t_read, t_enc, rss_mib())
    return backends


def check_duplicate_ids(store: Any, source: Source, *, strict: bool, client: Any = None) -> list[Any] | None:
    """Warn about ids that occur more than once, or raise InputError naming the smallest one when strict.
    On the workers when a Dask client is given: the driver's memory does not grow with n (see pqgpu.ids).
    Returns the ids' [smallest, largest] (None for string ids), recorded with the generation."""
    from .ids import report, scan_ids

    scan = report(scan_ids(store, client=client), store, source, strict=strict)
    return None if scan.lo is None else [scan.lo, scan.hi]


def run(cfg: Config | dict | str | os.PathLike, *, overwrite: bool = False, client: Any = None, progress: Any = None,
        strict_ids: bool = False, retrain: bool = False, append: bool = False) -> EncodeReport:
    """Train when quantizer.path is missing (or retrain=True), then encode, with one set of workers for both.
    An existing quantizer must have the config's M, nbits and OPQ setting (ConfigError otherwise, before
    anything is written). With Dask workers (an existing scheduler, a local cluster of processes for a large
    run, or a client passed in) training is a worker task, so this process never reads the training sample;
    small local runs train in this process. cfg: a Config, a dict of sections or a YAML file (load_config)."""
    cfg = load_config(cfg)
    qpath = Path(cfg.quantizer.path)
    out = cfg.encode.output
    if append:  # before anything is trained or written
        _check_append_args(out, qpath, overwrite=overwrite, retrain=retrain)
    if retrain and _fs.exists(out) and not overwrite:
        raise StoreError(f"--retrain replaces the quantizer {qpath}, so the existing code store {out}, made with "
                         "the current one, could not be resumed with it. Add --overwrite to replace the store too, "
                         "or set encode.output to a new store. Nothing was changed.")
    if not retrain and qpath.exists():  # refuse before any worker starts
        from .ivf import load_quantizer

        check_quantizer_matches(load_quantizer(qpath, cfg.quantizer.nlist), cfg.quantizer, str(qpath))
    if client is None:
        from .cluster import task_runner

        source = open_source(cfg.source)
        with task_runner(cfg.cluster, source.n * source.d) as runner:
            return run(cfg, overwrite=overwrite, client=runner, progress=progress, strict_ids=strict_ids,
                       retrain=retrain, append=append)
    if retrain or not qpath.exists():
        train(cfg, client=_dask_only(client))
    else:  # checked against the config above
        log.info("using the existing quantizer %s", qpath)
    return encode(cfg, overwrite=overwrite, client=client, progress=progress, strict_ids=strict_ids, append=append)


def _check_append_args(out: str, qpath: Path, *, overwrite: bool, retrain: bool) -> None:
    if overwrite or retrain:
        raise ConfigError(f"--append adds new files to the existing store {out} with its own quantizer; it cannot "
                          f"be combined with {'--overwrite' if overwrite else '--retrain'}. Drop one of them.")
    if not _fs.exists(out):
        raise StoreError(f"--append: there is no code store at {out} to append to. Run the same command without "
                         "--append to create it.")
    if not qpath.exists():
        raise PqgpuError(f"--append encodes the new rows with the quantizer the store {out} was made with, but "
                         f"quantizer.path ({qpath}) does not exist. Point quantizer.path at that file.")


def evaluate_config(cfg: Config | dict | str | os.PathLike, queries: Any, *, ground_truth: Any = None,
                    ks: tuple[int, ...] = (1, 10, 100), nprobes: tuple[int, ...] | None = None,
                    refine: int | None = None) -> dict[str, Any]:
    """Recall@k and reconstruction MSE of the store encode.output against its source (read chunk by chunk).
    cfg: a Config, a dict of sections or a YAML file (load_config). refine R: of the top k*R ADC candidates
    re-ranked with the source's vectors."""
    from .refine import check_refine

    cfg = load_config(cfg)
    from .search import evaluate
    from .store import open_store

    refine = check_refine(refine)

    store = open_store(cfg.encode.output)
    check_quantizer_matches(store.codebook(), cfg.quantizer, cfg.encode.output, store=True)
    source = open_source(cfg.source)
    blocks = (x for _, x, _ in source.iter_chunks(cfg.encode.chunk_rows))
    return evaluate(store, queries, base_chunks=blocks, ground_truth=ground_truth, ks=ks,
                    backend=cfg.encode.backend, nprobes=nprobes, refine=refine)
