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
from typing import Iterator

from .errors import PqgpuError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# dask reads DASK_* variables when it is imported, in this process and in every worker process it spawns
# (they inherit the environment), so distributed's own INFO chatter is off from the start without
# importing Dask here
_DASK_LOG_ENV = "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED"

_filter_expected = False  # set by configure(debug=False): drop the records DropExpected describes


class DropExpected(logging.Filter):
    """Drops records that only repeat an expected failure: one carrying a PqgpuError as exc_info (the CLI
    prints it as one paragraph), and the warnings Dask workers log when they are closed with a task still
    running, which is how a run stops after such a failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, PqgpuError):
            return False
        if record.name.startswith("distributed.worker") and "ended with CancelledError" in record.getMessage():
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


def _set_filter(handler: logging.Handler, on: bool) -> None:
    for f in [f for f in handler.filters if isinstance(f, DropExpected)]:
        handler.removeFilter(f)
    if on:
        handler.addFilter(DropExpected())


def install_filter() -> None:
    """DropExpected on the handlers of this process's root and `distributed` loggers (run in a worker)."""
    for h in (*logging.getLogger().handlers, *logging.getLogger("distributed").handlers):
        _set_filter(h, True)


def filtering_expected() -> bool:
    """Whether configure() asked for DropExpected (the CLI without --debug); workers then get it too."""
    return _filter_expected


@contextlib.contextmanager
def quiet_teardown(after_expected_error: bool) -> Iterator[None]:
    """Around closing a local cluster: after an expected error, Dask's warnings about the tasks it cuts
    short (workers killed mid-task) only repeat that error, so they stay out of the terminal (not with
    --debug, nor for library users who did not configure logging through `configure`)."""
    if not (after_expected_error and _filter_expected):
        yield
        return
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
