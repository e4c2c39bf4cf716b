"""The chunk planner on its own: invariants over many random shard layouts."""

from __future__ import annotations

import numpy as np
import pytest

from pqgpu.sources import plan_chunks


def check_plan(shard_rows: list[int], chunk_rows: int) -> None:
    chunks = plan_chunks(shard_rows, chunk_rows)
    total = sum(shard_rows)
    offsets = np.concatenate([[0], np.cumsum(shard_rows)])
    seen = []
    expected_start = 0
    for i, c in enumerate(chunks):
        assert c.index == i
        assert c.start == expected_start
        # exact sizes except the last chunk
        assert c.rows == (chunk_rows if i < len(chunks) - 1 else total - c.start)
        assert 0 < c.rows <= chunk_rows
        assert sum(p.hi - p.lo for p in c.pieces) == c.rows
        for p in c.pieces:
            assert 0 <= p.lo < p.hi <= shard_rows[p.shard]
            seen.extend(range(offsets[p.shard] + p.lo, offsets[p.shard] + p.hi))
        expected_start = c.stop
    # every row exactly once, in order
    assert seen == list(range(total))
    assert len(chunks) == -(-total // chunk_rows)


@pytest.mark.parametrize("shard_rows,chunk_rows", [
    ([10], 3), ([10], 10), ([10], 11), ([0, 0, 5, 0], 2), ([3, 3, 3], 3), ([3, 3, 3], 4), ([1] * 20, 7),
    ([100, 0, 1, 250], 64), ([], 5), ([0], 5),
])
def test_plan_examples(shard_rows, chunk_rows):
    check_plan(shard_rows, chunk_rows)


def test_plan_random_layouts():
    rng = np.random.default_rng(0)
    for _ in range(300):
        shards = [int(v) for v in rng.integers(0, 50, size=rng.integers(1, 12))]
        shards = [s if rng.random() > 0.2 else 0 for s in shards]
        check_plan(shards, int(rng.integers(1, 80)))


def test_plan_rejects_bad_chunk_rows():
    with pytest.raises(ValueError):
        plan_chunks([5], 0)
