"""Shared test setup: every test starts with the `pqgpu` logger as a library leaves it (level unset)."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _unset_pqgpu_logger_level():
    """`pqgpu.cli.main` sets the `pqgpu` logger's level (WARNING with -q), in tests too, also from module-scoped
    fixtures that run before a test; unset it around each test so caplog sees pqgpu's records whatever ran
    before."""
    logger = logging.getLogger("pqgpu")
    logger.setLevel(logging.NOTSET)
    yield
    logger.setLevel(logging.NOTSET)
