"""`pqgpu bench` keeps working: every stage runs at toy sizes and the report is written (no timing checks)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("faiss")


@pytest.mark.slow
def test_bench_tiny_writes_report(tmp_path):
    from pqgpu.bench.suite import run_bench

    assert run_bench(quick=True, out=str(tmp_path / "rep"), tiny=True) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert {"encode", "train", "scaling", "pipeline", "environment"} <= set(report)
    assert all(r["rows_equal_faiss"] >= 0.999 for r in report["encode"]["rows"])
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| d | dsub |" in md and "harmonic limit" in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "rep" / "encode_throughput.png").stat().st_size > 1000
