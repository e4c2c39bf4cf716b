"""The worker side of pqgpu.logs (its own module because it imports distributed, which pqgpu.logs must not)."""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin


class QuietExpectedErrors(WorkerPlugin):
    """Installs pqgpu.logs.DropExpected in each worker process, including workers restarted later."""

    name = "pqgpu-quiet-expected-errors"
    idempotent = True

    def setup(self, worker) -> None:  # noqa: ANN001 (distributed.Worker)
        from .logs import install_filter

        install_filter()
