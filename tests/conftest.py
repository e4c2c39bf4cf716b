"""Shared test setup: every test starts with the logging state the CLI leaves behind undone."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_pqgpu_logger_level():
    """Tests that call `pqgpu.cli.main` configure the `pqgpu` logger (WARNING with -q, ...); put its level back
    so a later test's caplog sees pqgpu's INFO records whatever ran before it."""
    logger = logging.getLogger("pqgpu")
    level = logger.level
    yield
    logger.setLevel(level)
