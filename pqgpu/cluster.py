"""Where tasks run: threads of this process (small local runs), a local cluster of processes, one worker
per GPU (dask-cuda), or an existing scheduler."""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

from .config import ClusterConfig
from .errors import BackendUnavailable, PqgpuError
from .logs import quiet_teardown

log = logging.getLogger(__name__)


def default_workers(n_cpus: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) for a local cluster: one single-threaded process per core, since the
    kernels release the GIL and processes keep Parquet decoding and encoding truly parallel."""
    if n_cpus is None:
        n_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n_cpus), 1


def cuda_worker_threads(n_cpus: int, n_gpus: int) -> int:
    """Threads per GPU worker for local-cuda: the cores shared out among the GPUs, at least 2. While one
    thread's chunk is on the GPU the others read and decode Parquet and write codes; the encodes themselves take
    turns on the GPU (pipeline._encode_chunk), so device memory is one planned encode per GPU and host memory
    about threads x one chunk."""
    return max(2, n_cpus // max(1, n_gpus))


# Up to this many values (rows x d) a local run uses threads of this process. Whole `pqgpu encode`, 768-d, M=96,
# forked workers (2-core Sapphire Rapids, quiet, RESULTS.md session 8): processes took 1.10-1.13x the threads'
# time at 1M rows, 1.09x at 2M and 1.08-1.09x at 4M (Parquet in the page cache: the same ~8 % per row plus ~0.3 s
# of start and close), and 1.08-1.29x at 8M (24.6 GB, more than the page cache holds), so threads stay up to
# 8M x 768. Above it processes paid off where measured: 100M x 96 read from disk, 0.93x the threads' encode and
# 0.65x the whole run (the training sample read on the workers in parallel; session 7); between 8M x 768 and
# 100M x 96 it is not measured.
IN_PROCESS_MAX_VALUES = 8 * 1_048_576 * 768


class InProcess:
    """Tasks on a pool of threads in this process: no scheduler, no worker processes, no Dask import.
    The numba kernels release the GIL, and CPU encodes take turns on all cores (see pqgpu.tasks)."""

    def __init__(self, threads: int):
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="pqgpu")

    def submit(self, fn: Callable[..., Any], *args: Any, **dask_options: Any) -> Future:
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _held(value: Any) -> Any:
    return value


def share(client: Any, value: Any, name: str) -> Any:
    """A future of `value` that every task of a run can take as an argument, sent to each worker once.

    Not `client.scatter`: scattered data lives only on the workers that hold it, so a worker killed before the
    others have a copy (a broadcast made while the cluster is still starting reaches only the workers up so far)
    takes it with it, and every task that needs it is cancelled ("already forgotten"). A task that returns the
    value keeps it in its spec on the scheduler and is simply run again elsewhere."""
    import time
    import warnings

    with warnings.catch_warnings():  # the value is meant to be in the graph, once
        warnings.filterwarnings("ignore", message="Sending large graph")
        return client.submit(_held, value, pure=False, key=f"pqgpu-{name}-{os.getpid()}-{time.monotonic_ns()}")


def choose_in_process(cfg: ClusterConfig, values: int) -> bool:
    """Whether a run of `values` (rows x d) runs on threads of this process: kind local, neither
    cluster.processes nor n_workers / threads_per_worker set, and a run small enough (IN_PROCESS_MAX_VALUES)."""
    if cfg.kind != "local" or cfg.processes is True:
        return False
    if cfg.processes is False:
        return True
    if cfg.n_workers is not None or cfg.threads_per_worker is not None:
        return False
    return values <= IN_PROCESS_MAX_VALUES


@contextlib.contextmanager
def task_runner(cfg: ClusterConfig, values: int) -> Iterator[Any]:
    """An InProcess pool for small local runs (see choose_in_process), a Dask client otherwise."""
    if choose_in_process(cfg, values):
        threads = default_workers()[0]
        log.info("in-process run on %d thread(s): %s values (rows x d) %s", threads, f"{values:,}",
                 "with cluster.processes: false" if cfg.processes is False else
                 f"are below {IN_PROCESS_MAX_VALUES:,}, where a process cluster does not pay for its start-up "
                 "(cluster.processes: true starts one anyway)")
        runner = InProcess(threads)
        try:
            yield runner
        finally:
            runner.close()
        return
    with dask_client(cfg) as client:
        yield client


def _log_dashboard(client: Any) -> None:
    try:
        if "dashboard" in client.scheduler_info().get("services", {}):
            log.info("Dask dashboard: %s", client.dashboard_link)
    except Exception as exc:  # the link is a convenience; never fail a run over it
        log.debug("no dashboard link: %s", exc)


def _dashboard_address(cfg: ClusterConfig) -> str | None:
    if not cfg.dashboard:
        return None
    import importlib.util

    if importlib.util.find_spec("bokeh") is None:  # distributed serves the dashboard only with bokeh
        log.info("no Dask dashboard: it needs bokeh (`pip install 'bokeh>=3.1'`); set cluster.dashboard: false "
                 "to skip it quietly")
        return None
    # distributed lets the dashboard's websocket accept any origin, and bokeh warns about it on every start
    logging.getLogger("bokeh.server.util").setLevel(logging.ERROR)
    return "127.0.0.1:0"  # a free port, on this machine only


# Distributed's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 (to hand freed memory back), and setting
# it turns off glibc's dynamic mmap threshold: every buffer above 128 KiB (Parquet pages, decoded columns) is
# then a fresh mmap, paid again in page faults. Reading the same 300k x 768 Parquet rows took 1.36 s in such a
# worker against 0.52 s in the main process; with MALLOC_MMAP_THRESHOLD_ at 64 MiB, 0.49 s (median of 4,
# interleaved, 2-core AMD EPYC Zen 4, shared machine; /tmp script, see RESULTS.md "Process cluster cost").
# Chunks (tens of MiB and more) are still mmapped, so they are still returned when freed.
# (Forked workers keep this process's malloc settings, read at its start: neither variable applies to them.)
WORKER_MMAP_THRESHOLD = 64 << 20


_MP_KEY = "distributed.worker.multiprocessing-method"


def fork_unsafe_reason() -> str | None:
    """Why forking this process could break its children (None when it is safe): numba's OpenMP threads, once
    started here, abort a forked child at its first parallel kernel (GNU OpenMP is not fork-safe), and a
    CUDA library loaded here may hold a context the children cannot use."""
    import sys

    if not sys.platform.startswith("linux"):
        return f"fork is not safe on {sys.platform}"
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is not None and getattr(parallel, "_is_initialized", False):
        try:
            layer = parallel.threading_layer()
        except Exception:  # noqa: BLE001 (unknown layer: assume the worst)
            layer = "?"
        if layer not in ("workqueue", "tbb"):
            return f"numba's {layer} threads already run in this process"
    loaded = [m for m in ("cupy", "torch", "numba.cuda", "rmm") if m in sys.modules]
    if loaded:
        return f"{loaded[0]} is loaded in this process (CUDA state does not survive a fork)"
    return None


def worker_start_method(cfg: ClusterConfig) -> str:
    """How a local cluster starts its worker processes. auto: fork when this process is fork-safe
    (fork_unsafe_reason), else Dask's spawn. A forked worker starts with this process's imports: at 2 workers
    it saved 0.35 s of cluster start, 0.1 s of each worker's first kernel and 0.2 s of the close against
    spawn (RESULTS.md, session 8). A user's own distributed.worker.multiprocessing-method other than spawn
    wins over auto; cluster.start_method fork asked for in an unsafe process is refused."""
    import dask

    if cfg.start_method != "auto":
        why = fork_unsafe_reason() if cfg.start_method == "fork" else None
        if why:
            raise PqgpuError(f"cluster.start_method is 'fork', but {why}: forked workers would crash. Use "
                             "cluster.start_method auto or spawn, or start the cluster before running kernels here.")
        return cfg.start_method
    mine = dask.config.get(_MP_KEY, "spawn")
    if mine != "spawn":
        return mine
    why = fork_unsafe_reason()
    if why:
        log.debug("local cluster workers start by spawn: %s", why)
        return "spawn"
    return "fork"


def _keepalive_inodes(cluster: Any) -> dict[str, int]:
    """{worker address: inode of the pipe whose write end, held by its nanny here, keeps that worker alive}."""
    found = {}
    for nanny in list(getattr(cluster, "workers", {}).values()):
        proc = getattr(getattr(nanny, "process", None), "process", None)  # WorkerProcess -> AsyncProcess
        pipe = getattr(proc, "_keep_child_alive", None)
        addr = getattr(nanny, "worker_address", None)
        if pipe is not None and not pipe.closed and addr:
            found[addr] = os.fstat(pipe.fileno()).st_ino
    return found


def _drop_pipes(inodes: list[int]) -> int:
    """On a worker: close every descriptor of these pipes (both ends), through its Connection object where one
    owns it (so that nothing closes the number again later); returns how many were closed."""
    import gc
    import stat
    from multiprocessing.connection import Connection

    want, closed = set(inodes), 0
    for obj in gc.get_objects():
        if isinstance(obj, Connection) and not obj.closed:
            try:
                ino = os.fstat(obj.fileno()).st_ino
            except OSError:
                continue
            if ino in want:
                obj.close()
                closed += 1
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:
            continue
        if stat.S_ISFIFO(st.st_mode) and st.st_ino in want:
            os.close(int(name))
            closed += 1
    return closed


def release_sibling_keepalives(client: Any, cluster: Any) -> None:
    """After a local cluster has forked its workers: each closes its copies of the other workers' keep-alive pipes.

    A Dask worker process exits when the write end of its "parent alive" pipe, held by its nanny in this process,
    closes (as when this process is SIGKILLed). A forked child inherits every descriptor, so each worker held the
    pipes of the workers started before or alongside it, and a SIGKILLed `pqgpu` could leave its workers keeping
    each other alive on its output pipes (1 run in ~12 of tests/test_reliability.py's SIGKILL test hung). Spawned
    workers inherit only what they are given. The pipes are matched by inode, not by the objects copied into the
    child: a nanny starting concurrently can have made its pipe before any object in the copy refers to it (an
    at-fork handler that closed the objects' pipes missed 3 of 25 in tests/test_progress.py)."""
    try:
        inodes = _keepalive_inodes(cluster)
        for addr in inodes:
            others = [ino for a, ino in inodes.items() if a != addr]
            client.run(_drop_pipes, others, workers=[addr])
    except Exception as exc:  # noqa: BLE001 (a distributed without these internals: the workers still work)
        log.debug("could not release the workers' inherited keep-alive pipes: %s", exc)


@contextlib.contextmanager
def _worker_environ(start_method: str | None = None) -> Iterator[None]:
    """Dask settings for the workers a local cluster starts now: the malloc threshold, and the start method
    when one is given (None keeps Dask's, or the user's)."""
    import dask

    settings: dict[str, Any] = {} if start_method is None else {_MP_KEY: start_method}
    key = "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_"
    if dask.config.get(key, None) is None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        settings[key] = WORKER_MMAP_THRESHOLD  # else the user's own setting wins
    with dask.config.set(settings):
        yield


@contextlib.contextmanager
def dask_client(cfg: ClusterConfig) -> Iterator["distributed.Client"]:  # noqa: F821
    from distributed import Client, LocalCluster

    from ._worker_logs import worker_plugin

    if cfg.kind == "address":
        try:
            client = Client(cfg.address, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise PqgpuError(f"Cannot connect to the Dask scheduler at {cfg.address}: {exc}. Check "
                             "cluster.address and that the scheduler is running.") from None
        log.info("Dask scheduler %s: %d worker(s)", cfg.address, len(client.scheduler_info()["workers"]))
        _log_dashboard(client)
        try:
            yield client
        finally:
            with quiet_teardown():
                client.close()
        return
    if cfg.kind == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise BackendUnavailable("cluster.kind 'local-cuda' needs dask-cuda: `pip install 'pqgpu[gpu]'` or the "
                                     "conda environment in environment.yml.") from None
        n_gpus = _visible_gpus()
        threads = cfg.threads_per_worker or cuda_worker_threads(default_workers()[0], n_gpus)
        log.info("local-cuda plan: %d GPU worker(s) x %d thread(s)%s: chunks are read, decoded and written in "
                 "parallel, encoded one at a time per GPU", n_gpus, threads,
                 "" if cfg.threads_per_worker else " (cores / GPUs, at least 2)")
        with _worker_environ():
            cluster = LocalCUDACluster(memory_limit=cfg.memory_limit, threads_per_worker=threads,
                                       dashboard_address=_dashboard_address(cfg))
    else:
        workers, threads = default_workers()
        dashboard = _dashboard_address(cfg)
        # Without a dashboard the scheduler still serves /health and /metrics, by default on port 8787 (and
        # warns "Port 8787 is already in use" beside another cluster): a free port on this machine instead
        quiet = {} if dashboard else {"scheduler_kwargs": {"dashboard": False, "dashboard_address": "127.0.0.1:0"}}
        method = worker_start_method(cfg)
        with _worker_environ(method):
            cluster = LocalCluster(n_workers=cfg.n_workers or workers,
                                   threads_per_worker=cfg.threads_per_worker or threads, processes=True,
                                   memory_limit=cfg.memory_limit, dashboard_address=dashboard,
                                   silence_logs=logging.WARNING, **quiet)
    client = Client(cluster)
    if cfg.kind == "local" and method == "fork":
        release_sibling_keepalives(client, cluster)
    plugin = worker_plugin()  # these workers log to our terminal: keep expected errors to one paragraph there
    if plugin is not None:
        client.register_plugin(plugin)
    log.info("Dask %s cluster: %d worker(s)%s", cfg.kind, len(client.scheduler_info()["workers"]),
             f", started by {method}" if cfg.kind == "local" else "")
    if cfg.dashboard:
        _log_dashboard(client)
    try:
        yield client
    finally:
        with quiet_teardown():
            if plugin is not None:
                from ._worker_logs import quiet_workers

                quiet_workers(client)
            client.close()
            cluster.close()


def dask_cuda_version() -> tuple[str | None, str]:
    """(dask-cuda's version, '') when it imports, else (None, why not): for doctor and the GPU check, so that
    this module stays the only one that imports dask_cuda."""
    try:
        import dask_cuda
    except Exception as exc:  # not installed, or its CUDA libraries fail to load
        return None, f"{type(exc).__name__}: {exc}"
    return str(getattr(dask_cuda, "__version__", "?")), ""


def dask_cuda_status() -> str:
    """One line for `pqgpu doctor`: the version, or why dask-cuda is not available."""
    version, why = dask_cuda_version()
    return version if version is not None else f"not available ({why.split(':')[0]})"


def _visible_gpus() -> int:
    try:
        from dask_cuda.utils import get_n_gpus

        return max(1, int(get_n_gpus()))
    except Exception:  # an older dask-cuda: count CUDA_VISIBLE_DEVICES, else assume one
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        return max(1, len([v for v in visible.split(",") if v.strip()]))
