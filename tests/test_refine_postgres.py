"""--refine on a store encoded from a Postgres export: the original vectors come back from the exported
Parquet shards, and the refined results are the exact re-rank of the ADC candidates by the table's vectors."""

from __future__ import annotations

import numpy as np
import pytest

from .test_postgres import _create, _table, db, pg_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.postgres


def test_refine_reads_the_exported_shards(pg_server, db, tmp_path):  # noqa: F811
    import yaml

    import pqgpu
    from pqgpu import cli

    from .helpers import synthetic
    from .test_refine import brute_rerank

    table = _table("refine")
    n, d, k, R = 900, 16, 5, 4
    ids = np.arange(n, dtype=np.int64) * 5 + 3
    x = synthetic(n, d, seed=21)
    _create(db, table, ids, x, "vector")
    cfg = {
        "postgres": {"dsn": pg_server, "table": table, "output": str(tmp_path / "shards"), "rows_per_shard": 250},
        "source": {"format": "parquet", "path": str(tmp_path / "shards" / "*.parquet"), "id_column": "id"},
        "quantizer": {"path": str(tmp_path / "pq.faiss"), "M": 4, "nbits": 5, "train_size": n, "niter": 5},
        "encode": {"output": str(tmp_path / "codes.zarr"), "chunk_rows": 256, "backend": "cpu"},
        "cluster": {"processes": False},
    }
    cfg_path = tmp_path / "pg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    for cmd in ("export-postgres", "run"):
        assert cli.main(["-q", cmd, "-c", str(cfg_path)]) == 0, cmd
    q = synthetic(12, d, seed=99)
    store = str(tmp_path / "codes.zarr")
    _d, cand_ids = pqgpu.search(store, q, k * R, backend="cpu")
    by_id = dict(zip(ids.tolist(), x))
    cand = np.stack([[by_id[int(i)] for i in row] for row in cand_ids])
    ref_s, ref_ids = brute_rerank(q, cand, cand_ids, "l2", k)
    dist, got = pqgpu.search(store, q, k, backend="cpu", refine=R)
    assert (got == ref_ids).mean() >= 0.99
    np.testing.assert_allclose(dist, ref_s, rtol=1e-5, atol=1e-6)
