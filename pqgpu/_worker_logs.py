"""The worker side of pqgpu.logs (its own module because it imports distributed, which pqgpu.logs must not)."""

from __future__ import annotations

import weakref
from typing import Any

from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin

from .logs import begin_teardown, filtering_expected, install_filter

_CLOSING = {Status.closing, Status.closing_gracefully, Status.closed}


class QuietExpectedErrors(WorkerPlugin):
    """Installs pqgpu.logs.DropExpected in each worker process, including workers restarted later; it drops
    Dask's records once that worker is closing."""

    name = "pqgpu-quiet-expected-errors"
    idempotent = True

    def setup(self, worker) -> None:  # noqa: ANN001 (distributed.Worker)
        ref = weakref.ref(worker)

        def closing() -> bool:
            w = ref()
            return w is None or w.status in _CLOSING

        install_filter(closing)


def worker_plugin() -> QuietExpectedErrors | None:
    """A Dask WorkerPlugin that installs DropExpected in each worker, or None when --debug asked for every
    record (or the CLI did not configure logging: library users keep their own setup)."""
    return QuietExpectedErrors() if filtering_expected() else None


def quiet_workers(client: Any) -> None:
    """Before a cluster with our plugin is closed: its workers drop Dask's records from now on (the retiring,
    a last heartbeat that finds the scheduler gone). Best effort: a worker that does not answer within a few
    seconds is being closed anyway."""
    try:
        client.run(begin_teardown, on_error="ignore", callback_timeout=5)
    except Exception:  # noqa: BLE001 (a cluster already half gone; closing it goes on regardless)
        pass
