"""Dask clients: a local cluster of processes, one worker per GPU (dask-cuda), or an existing scheduler."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from .config import ClusterConfig
from .errors import BackendUnavailable, PqgpuError
from .logs import quiet_teardown, worker_plugin

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


@contextlib.contextmanager
def dask_client(cfg: ClusterConfig) -> Iterator["distributed.Client"]:  # noqa: F821
    from distributed import Client, LocalCluster

    if cfg.kind == "address":
        try:
            client = Client(cfg.address, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise PqgpuError(f"Cannot connect to the Dask scheduler at {cfg.address}: {exc}. Check "
                             "cluster.address and that the scheduler is running.") from None
        try:
            yield client
        finally:
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
        cluster = LocalCUDACluster(memory_limit=cfg.memory_limit, threads_per_worker=threads,
                                   dashboard_address=None)
    else:
        workers, threads = default_workers()
        cluster = LocalCluster(n_workers=cfg.n_workers or workers, threads_per_worker=cfg.threads_per_worker or threads,
                               processes=True, memory_limit=cfg.memory_limit, dashboard_address=None,
                               silence_logs=logging.WARNING)
    client = Client(cluster)
    plugin = worker_plugin()  # these workers log to our terminal: keep expected errors to one paragraph there
    if plugin is not None:
        client.register_plugin(plugin)
    log.info("Dask %s cluster: %d worker(s)", cfg.kind, len(client.scheduler_info()["workers"]))
    failed = False
    try:
        yield client
    except (PqgpuError, KeyboardInterrupt):
        failed = True
        raise
    finally:
        with quiet_teardown(failed):
            client.close()
            cluster.close()


def _visible_gpus() -> int:
    try:
        from dask_cuda.utils import get_n_gpus

        return max(1, int(get_n_gpus()))
    except Exception:  # an older dask-cuda: count CUDA_VISIBLE_DEVICES, else assume one
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        return max(1, len([v for v in visible.split(",") if v.strip()]))
