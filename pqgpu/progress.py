"""Progress of long stages (reading the training sample, k-means, encoding): log lines or a terminal bar.

Library code reports through `stage(name, total, unit)` and `report(name, done, total)`; what the user sees
is chosen once by the CLI with `use_terminal_bars()`: a tqdm bar with rate and ETA on an interactive
terminal, and otherwise (logs, pipes, the Python API) a log line at most every few seconds.
Work that runs on a Dask worker forwards its reports to the client as worker events (see `forward_from`).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

EVENT_TOPIC = "pqgpu-progress"

_bars = False  # set by the CLI when stderr is a terminal
_sink: Callable[[str, int, int, str, bool], None] | None = None  # where report() goes; None: this process's stages
_open: dict[str, "Stage"] = {}
_lock = threading.Lock()


def use_terminal_bars(on: bool) -> None:
    """Draw tqdm bars instead of periodic log lines (the CLI calls this, after configuring logging, when
    stderr is a terminal). Log records to stderr are then written above the bars instead of through them."""
    global _bars
    _bars = bool(on)
    if not _bars:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            handler.setStream(_AboveBars())


class _AboveBars:
    """A stderr stand-in for logging handlers: tqdm.write() clears the bars, writes, and redraws them."""

    def write(self, text: str) -> None:
        from tqdm import tqdm

        if text.strip():
            tqdm.write(text.rstrip("\n"), file=sys.stderr)

    def flush(self) -> None:
        sys.stderr.flush()


def bars_enabled() -> bool:
    return _bars


class Stage:
    """Count of `total` units done; logs '<name>: done / total, rate, ETA' at most every `every` seconds,
    or draws a bar. `callback(done, total, elapsed)` is called on every update. With brief=True a stage that
    ends within its first `every` seconds logs nothing (its caller logs a summary of its own)."""

    def __init__(self, name: str, total: int, unit: str = "rows", every: float = 2.0,
                 callback: Callable[[int, int, float], None] | None = None, brief: bool = False):
        self.name, self.total, self.unit, self.every, self.callback = name, int(total), unit, every, callback
        self.brief = brief
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if _bars:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=name, unit=" " + unit if unit != "rows" else " rows",
                            unit_scale=unit == "rows", dynamic_ncols=True, leave=True, smoothing=0.1)

    def add(self, n: int) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        step, self.done = done - self.done, done
        now = time.perf_counter()
        if self.callback:
            self.callback(self.done, self.total, now - self.t0)
        if self.bar is not None:
            self.bar.update(step)
            if self.done >= self.total:
                self.close()
            return
        quick_end = self.brief and self.last == self.t0 and now - self.t0 < self.every
        if now - self.last >= self.every or (self.done >= self.total and not quick_end):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info("%s %s / %s %s (%.1f%%), %s %s/s, ETA %.0f s", self.name, f"{self.done:,}", f"{self.total:,}",
                     self.unit, 100 * self.done / max(self.total, 1), f"{rate:,.0f}", self.unit, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def report(name: str, done: int, total: int, unit: str = "iterations", *, brief: bool = False) -> None:
    """Progress of stage `name` from anywhere (e.g. k-means): shown here, or forwarded to the Dask client
    when running on a worker under `forward_from`. Cheap when nobody listens. brief: see Stage (for a
    stage whose caller logs its own summary line)."""
    if _sink is not None:
        _sink(name, done, total, unit, brief)
        return
    show(name, done, total, unit, brief)


def show(name: str, done: int, total: int, unit: str, brief: bool = False) -> None:
    """Update (opening or closing as needed) this process's stage called `name`."""
    with _lock:
        st = _open.get(name)
        if st is None or done == 0 or done < st.done:  # a stage left open by a failed run starts afresh
            if st is not None:
                st.close()
            st = _open[name] = Stage(name, total, unit, every=5.0, brief=brief)
        st.set(done)
        if done >= total:
            st.close()
            _open.pop(name, None)


class forward_from:
    """Context manager used inside a Dask task: report() calls become worker events on EVENT_TOPIC, which a
    client that called `listen(client)` shows as its own progress."""

    def __enter__(self) -> "forward_from":
        global _sink
        try:
            from distributed import get_worker

            worker = get_worker()
        except (ImportError, ValueError):
            return self  # not on a worker: report() shows locally
        self._prev = _sink
        last = [0.0]

        def send(name: str, done: int, total: int, unit: str, brief: bool) -> None:
            now = time.perf_counter()
            if now - last[0] >= 0.5 or done >= total:  # at most two events a second
                last[0] = now
                worker.log_event(EVENT_TOPIC, {"name": name, "done": done, "total": total, "unit": unit,
                                               "brief": brief})

        _sink = send
        return self

    def __exit__(self, *exc: Any) -> None:
        global _sink
        if hasattr(self, "_prev"):
            _sink = self._prev


def listen(client: Any) -> None:
    """Show progress events sent by workers (forward_from) in this process."""
    def handler(event: Any) -> None:
        _, msg = event
        show(msg["name"], int(msg["done"]), int(msg["total"]), msg["unit"], bool(msg.get("brief")))

    try:
        client.subscribe_topic(EVENT_TOPIC, handler)
    except Exception as exc:  # an old scheduler: no live training progress, nothing else lost
        log.debug("cannot subscribe to worker progress events: %s", exc)
