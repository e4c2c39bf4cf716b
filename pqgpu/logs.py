"""Terminal logging for the command line: pqgpu's own loggers speak at INFO, every other library at WARNING,
and an expected failure (a PqgpuError) reaches the user once, as the CLI's one paragraph.

Library code only calls `logging.getLogger(__name__)`; `configure` is for the CLI (and tests of it).
Dask workers are separate processes: `pqgpu._worker_logs.worker_plugin()` carries the same filter into them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Callable, Iterator

from .errors import PqgpuError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# dask reads DASK_* variables when it is imported, in this process and in every worker process it spawns
# (they inherit the environment), so distributed's own INFO chatter is off from the start without
# importing Dask here
_DASK_LOG_ENV = "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED"

_filter_expected = False  # set by configure(debug=False): drop the records DropExpected describes
_closing = False  # set by begin_teardown(): the cluster is being shut down
# the loggers that speak while a Dask cluster shuts down (a worker's heartbeat to a scheduler already gone,
# a nanny killing a slow worker, the event loop's cancelled tasks)
TEARDOWN_LOGGERS = ("distributed", "tornado", "asyncio", "bokeh")


class DropExpected(logging.Filter):
    """Drops records that only repeat an expected failure: one carrying a PqgpuError as exc_info (the CLI
    prints it as one paragraph), and the warnings Dask workers log when they are closed with a task still
    running, which is how a run stops after such a failure. Once the cluster shuts down (begin_teardown, or
    `closing()` true: a worker that is closing), every record of TEARDOWN_LOGGERS: the run is over by then, and
    what Dask says while its processes stop one after another is not about it."""

    def __init__(self, closing: Callable[[], bool] | None = None):
        super().__init__()
        self.closing = closing

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, PqgpuError):
            return False
        if record.name.startswith("distributed.worker") and "ended with CancelledError" in record.getMessage():
            return False
        if record.name.startswith(TEARDOWN_LOGGERS) and (_closing or (self.closing is not None and self.closing())):
            return False
        return True


def configure(*, debug: bool = False, quiet: bool = False) -> None:
    """Root logger at WARNING with one stderr handler; the `pqgpu` logger at INFO (DEBUG with debug, WARNING
    with quiet). Without debug, DropExpected guards the handlers, here and (see pqgpu._worker_logs) in workers."""
    global _filter_expected
    _filter_expected = not debug
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_pqgpu", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._pqgpu = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    elif isinstance(handler, logging.StreamHandler):
        # main() called again (tests): write where stderr is now; not setStream, which flushes the old stream
        handler.stream = sys.stderr
    root.setLevel(logging.WARNING)
    logging.getLogger("pqgpu").setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    os.environ.setdefault(_DASK_LOG_ENV, "warning")
    if "distributed" in sys.modules:  # already imported (e.g. by a test): its handlers are in place
        logging.getLogger("distributed").setLevel(logging.WARNING)
    for h in (*root.handlers, *logging.getLogger("distributed").handlers):
        _set_filter(h, _filter_expected)
    # the dashboard, when on, asks for a free port and its link is logged; with it off, which port the idle
    # HTTP server got does not matter
    if not debug:
        warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)


def _set_filter(handler: logging.Handler, on: bool, closing: Callable[[], bool] | None = None) -> None:
    for f in [f for f in handler.filters if isinstance(f, DropExpected)]:
        handler.removeFilter(f)
    if on:
        handler.addFilter(DropExpected(closing))


def install_filter(closing: Callable[[], bool] | None = None) -> None:
    """DropExpected on the handlers of this process's root and `distributed` loggers (run in a worker;
    `closing` tells whether that worker is shutting down)."""
    for h in (*logging.getLogger().handlers, *logging.getLogger("distributed").handlers):
        _set_filter(h, True, closing)


def begin_teardown() -> None:
    """In a worker (client.run): the cluster is shutting down, drop Dask's records from now on."""
    global _closing
    _closing = True


def filtering_expected() -> bool:
    """Whether configure() asked for DropExpected (the CLI without --debug); workers then get it too."""
    return _filter_expected


@contextlib.contextmanager
def quiet_teardown() -> Iterator[None]:
    """Around closing a Dask cluster: what Dask logs while it stops (a worker's heartbeat that finds the
    scheduler gone, a nanny killing a slow worker, warnings about tasks cut short after an expected error)
    stays out of the terminal; the run's result or its one-paragraph error is what the user needs. Not with
    --debug, nor for library users who did not configure logging through `configure`."""
    global _closing
    if not _filter_expected:
        yield
        return
    logger = logging.getLogger("distributed")  # its own handlers carry no DropExpected in this process
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    _closing = True
    try:
        yield
    finally:
        _closing = False
        logger.setLevel(level)
