"""The worker side of pqgpu.logs (its own module because it imports distributed, which pqgpu.logs must not)."""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

from .logs import filtering_expected, install_filter


class QuietExpectedErrors(WorkerPlugin):
    """Installs pqgpu.logs.DropExpected in each worker process, including workers restarted later."""

    name = "pqgpu-quiet-expected-errors"
    idempotent = True

    def setup(self, worker) -> None:  # noqa: ANN001 (distributed.Worker)
        install_filter()


def worker_plugin() -> QuietExpectedErrors | None:
    """A Dask WorkerPlugin that installs DropExpected in each worker, or None when --debug asked for every
    record (or the CLI did not configure logging: library users keep their own setup)."""
    return QuietExpectedErrors() if filtering_expected() else None
