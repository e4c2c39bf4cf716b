"""The nightly job on a real PostgreSQL + pgvector, through the CLI: `export-postgres --since-last` exports
only the rows added since the previous export, `run --append` encodes them, `write-codes-postgres` writes
only their codes. Also: no new rows, the refusals, an export killed (SIGKILL) at each step of writing a
shard, and a write-back interrupted half-way, each followed by the same command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .test_postgres import _create, _table, _vec_text, db, pg_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.postgres

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed (pip install 'pqgpu[postgres]')")
faiss = pytest.importorskip("faiss")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from psycopg import sql  # noqa: E402

import pqgpu  # noqa: E402
from pqgpu import cli  # noqa: E402
from pqgpu.sources.postgres import MANIFEST_NAME, export_postgres, write_codes_postgres  # noqa: E402

from .helpers import assert_codes_match, synthetic  # noqa: E402

D, M = 16, 4
N0, N1 = 1200, 300  # rows of the first export, rows added before the nightly job
RPS = 250  # rows per shard: the first export has shards 0-4, the nightly one 5 and 6
SENTINEL = b"\xde\xad\xbe\xef"  # a code no encoding writes (4 bytes, M=4 x 8 bits, is a valid length)


def _ids(lo: int, n: int) -> np.ndarray:
    return np.arange(lo, lo + n, dtype=np.int64) * 5 + 3  # not contiguous


def _insert(db, table: str, ids: np.ndarray, x: np.ndarray) -> None:
    with db.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} (id, embedding) VALUES (%s, %s::vector)").format(
            sql.Identifier(table)), [(int(i), _vec_text(v)) for i, v in zip(ids[::-1], x[::-1])])


def _config(tmp_path: Path, dsn: str, table: str, name: str = "pg.yaml", **postgres) -> Path:
    import yaml

    cfg = {
        "postgres": {"dsn": dsn, "table": table, "output": str(tmp_path / "shards"), "rows_per_shard": RPS,
                     **postgres},
        "source": {"format": "parquet", "path": str(tmp_path / "shards" / "*.parquet"), "id_column": "id"},
        "quantizer": {"path": str(tmp_path / "pq.faiss"), "M": M, "nbits": 8, "train_size": N0, "niter": 5},
        "encode": {"output": str(tmp_path / "codes.zarr"), "chunk_rows": 256, "backend": "cpu"},
        "cluster": {"processes": False},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _pg(cfg: Path):
    """The postgres section of a config file, as the CLI reads it."""
    from pqgpu.config import load_config

    return load_config(cfg).postgres


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _table_codes(db, table: str) -> dict[int, bytes | None]:
    rows = db.execute(sql.SQL("SELECT id, pq_code FROM {}").format(sql.Identifier(table))).fetchall()
    return {int(i): (bytes(c) if c is not None else None) for i, c in rows}


def _faiss_codes(tmp_path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """faiss's codes of `x` with the quantizer file `run` wrote, and its centroids (for the tie check)."""
    q = faiss.read_ProductQuantizer(str(tmp_path / "pq.faiss"))
    return q.compute_codes(x), faiss.vector_to_array(q.centroids).reshape(M, 256, D // M)


def _assert_table_has_codes(db, table: str, ids: np.ndarray, x: np.ndarray, tmp_path: Path) -> None:
    got = _table_codes(db, table)
    assert all(got[int(i)] is not None for i in ids)
    ours = np.frombuffer(b"".join(got[int(i)] for i in ids), np.uint8).reshape(len(ids), -1)
    ref, centroids = _faiss_codes(tmp_path, x)
    assert_codes_match(ours, ref, x, centroids, 8)


def _dir_state(out_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of an export directory: bytes and mtime (a rewrite with the same bytes shows too)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out_dir.iterdir()) if p.is_file()}


def _one_paragraph_error(rc: int, err: str) -> None:
    assert rc == cli.EXIT_ERROR, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert "Traceback" not in err


def _first_night(db, dsn: str, tmp_path: Path, capsys) -> tuple[str, Path]:
    """A table of N0 rows, exported, encoded and written back (the job's one-off setup)."""
    table = _table("nightly")
    _create(db, table, _ids(0, N0), synthetic(N0, D, seed=1), "vector")
    cfg = _config(tmp_path, dsn, table)
    for cmd in ("export-postgres", "run", "write-codes-postgres"):
        rc, _, err = _cli(capsys, "-q", cmd, "-c", str(cfg))
        assert rc == 0, (cmd, err)
    return table, cfg


# --------------------------------------------------------------------------------------------------


def test_nightly_job_writes_only_the_new_rows(pg_server, db, tmp_path, capsys):
    ids0, x0 = _ids(0, N0), synthetic(N0, D, seed=1)
    ids1, x1 = _ids(N0, N1), synthetic(N1, D, seed=2)
    table, cfg = _first_night(db, pg_server, tmp_path, capsys)
    _assert_table_has_codes(db, table, ids0, x0, tmp_path)
    db.execute(sql.SQL("UPDATE {} SET pq_code = %s").format(sql.Identifier(table)), (SENTINEL,))
    shards = tmp_path / "shards"
    first = _dir_state(shards)
    _insert(db, table, ids1, x1)

    # 1) export-postgres --since-last: the new rows only, into new shards after the old ones
    rc, out, err = _cli(capsys, "export-postgres", "--since-last", "-c", str(cfg))
    assert rc == 0, err
    assert "export 1:" in out and f"ids above {int(ids0[-1])}" in out and f"{N1} new rows" in out
    man = json.loads((shards / MANIFEST_NAME).read_text())
    old_names = [f"part-{i:06d}.parquet" for i in range(5)]
    new_names = ["part-000005.parquet", "part-000006.parquet"]
    assert [s["file"] for s in man["shards"]] == old_names + new_names
    e0, e1 = man["exports"]
    assert (e0["export"], e0["after_id"], e0["first_id"], e0["last_id"], e0["rows"], e0["files"]) == \
        (0, None, int(ids0[0]), int(ids0[-1]), N0, old_names)
    assert (e1["export"], e1["after_id"], e1["first_id"], e1["last_id"], e1["rows"], e1["files"]) == \
        (1, int(ids0[-1]), int(ids1[0]), int(ids1[-1]), N1, new_names)
    assert e0["complete"] and e1["complete"] and man["complete"] and e1["started"] and e1["finished"]
    assert sorted(os.listdir(shards)) == sorted([MANIFEST_NAME] + old_names + new_names)
    now = _dir_state(shards)
    assert {k: now[k] for k in old_names} == {k: first[k] for k in old_names}  # old shards untouched
    t = pa.concat_tables([pq.read_table(shards / f) for f in new_names])
    assert t.column("id").to_pylist() == ids1.tolist()
    np.testing.assert_array_equal(np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(N1, D), x1)

    # 2) run --append: one new generation of exactly the new shards
    rc, _, err = _cli(capsys, "-q", "run", "--append", "-c", str(cfg))
    assert rc == 0, err
    store = pqgpu.open_store(tmp_path / "codes.zarr")
    gens = store.attrs["generations"]
    assert [g["rows"] for g in gens] == [[0, N0], [N0, N0 + N1]]
    assert [os.path.basename(f) for f in gens[1]["files"]] == new_names
    np.testing.assert_array_equal(store.ids[...], np.concatenate([ids0, ids1]))

    # 3) refused while another process holds the store (an append under way): nothing written
    from pqgpu.store import exclusive_lock

    with exclusive_lock(tmp_path / "codes.zarr"):
        rc, _, err = _cli(capsys, "write-codes-postgres", "-c", str(cfg))
    _one_paragraph_error(rc, err)
    assert "is being written by" in err and "Nothing was written into the table" in err
    assert all(c == SENTINEL for c in _table_codes(db, table).values() if c is not None)
    assert all(_table_codes(db, table)[int(i)] is None for i in ids1)

    # 4) a write-back interrupted after its first batch, then write-codes-postgres: only the new rows
    seen = []

    def interrupt(n):
        seen.append(n)
        raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        write_codes_postgres(_pg(cfg), str(tmp_path / "codes.zarr"), batch_rows=100, progress=interrupt)
    assert seen == [100]
    half = _table_codes(db, table)
    assert sum(half[int(i)] is not None for i in ids1) == 100
    assert all(half[int(i)] == SENTINEL for i in ids0)
    rec = pqgpu.open_store(tmp_path / "codes.zarr").attrs["postgres_writeback"]
    assert [r["generation"] for r in rec] == [0]  # the interrupted one is not recorded
    xmin = sql.SQL("SELECT id, xmin::text FROM {} WHERE pq_code IS NOT NULL AND pq_code <> %s").format(
        sql.Identifier(table))
    written_first = dict(db.execute(xmin, (SENTINEL,)).fetchall())

    rc, out, err = _cli(capsys, "write-codes-postgres", "-c", str(cfg))
    assert rc == 0, err
    assert f"wrote {N1} codes into {table}.pq_code: generation(s) 1 (store rows {N0}-{N0 + N1 - 1}, 200 changed)" \
        in out and "generation(s) 0 were written before" in out
    got = _table_codes(db, table)
    assert all(got[int(i)] == SENTINEL for i in ids0)  # the old rows' codes were not written again
    _assert_table_has_codes(db, table, ids1, x1, tmp_path)
    after = dict(db.execute(xmin, (SENTINEL,)).fetchall())
    assert {i: after[i] for i in written_first} == written_first  # the first batch was not rewritten
    rec = pqgpu.open_store(tmp_path / "codes.zarr").attrs["postgres_writeback"]
    assert [(r["generation"], r["rows"], r["target"]["table"]) for r in rec] == [(1, N0 + N1, table)]
    rc, out, _ = _cli(capsys, "info", str(tmp_path / "codes.zarr"))
    assert rc == 0 and f"generations 0-1 (rows 0-{N0 + N1 - 1}) in {table}.pq_code" in out

    # 5) the same command again writes nothing; --all writes every row (the sentinels go)
    before = db.execute(sql.SQL("SELECT id, xmin::text FROM {}").format(sql.Identifier(table))).fetchall()
    rc, out, err = _cli(capsys, "write-codes-postgres", "-c", str(cfg))
    assert rc == 0, err
    assert out.startswith("nothing to write: generation(s) 0-1") and "--all" in out
    assert db.execute(sql.SQL("SELECT id, xmin::text FROM {}").format(sql.Identifier(table))).fetchall() == before
    rc, out, err = _cli(capsys, "write-codes-postgres", "--all", "-c", str(cfg))
    assert rc == 0, err
    assert f"wrote {N0 + N1:,} codes" in out and f"{N0:,} changed" in out
    _assert_table_has_codes(db, table, np.concatenate([ids0, ids1]), np.concatenate([x0, x1]), tmp_path)


def test_since_last_without_new_rows_writes_nothing(pg_server, db, tmp_path, capsys):
    table = _table("nonew")
    ids = _ids(0, 600)
    _create(db, table, ids, synthetic(600, D, seed=3), "vector")
    cfg = _config(tmp_path, pg_server, table)
    assert _cli(capsys, "-q", "export-postgres", "-c", str(cfg))[0] == 0
    before = _dir_state(tmp_path / "shards")
    # a row below the highest exported id is not a new row (README: inserts must have larger ids)
    _insert(db, table, np.array([1]), synthetic(1, D, seed=4))
    rc, out, err = _cli(capsys, "export-postgres", "--since-last", "-c", str(cfg))
    assert rc == 0, err
    assert out.startswith(f"no new rows: nothing in the source has an id above {int(ids[-1])}")
    assert "nothing was written" in out
    assert _dir_state(tmp_path / "shards") == before
    res = export_postgres(_pg(cfg), since_last=True)
    assert res.up_to_date and res.new_rows == 0 and res.rows == 600 and res.export is None
    assert _dir_state(tmp_path / "shards") == before


def test_since_last_refusals_leave_the_outputs_as_they_were(pg_server, db, tmp_path, capsys):
    table, other = _table("ref"), _table("other")
    for t in (table, other):
        _create(db, t, _ids(0, 300), synthetic(300, D, seed=5), "vector")

    # no previous export: said, and nothing created
    cfg = _config(tmp_path, pg_server, table, output=str(tmp_path / "none"))
    rc, _, err = _cli(capsys, "export-postgres", "--since-last", "-c", str(cfg))
    _one_paragraph_error(rc, err)
    assert "no previous export" in err and str(tmp_path / "none") in err and "without --since-last" in err
    assert not (tmp_path / "none").exists()

    # another table than the previous export's
    assert _cli(capsys, "-q", "export-postgres", "-c", str(_config(tmp_path, pg_server, table)))[0] == 0
    before = _dir_state(tmp_path / "shards")
    rc, _, err = _cli(capsys, "export-postgres", "--since-last", "-c", str(_config(tmp_path, pg_server, other)))
    _one_paragraph_error(rc, err)
    assert f"is of table {table!r}" in err and f"asks for table {other!r}" in err
    assert _dir_state(tmp_path / "shards") == before

    # another query than the previous export's
    q1 = f"SELECT id, embedding FROM {table} WHERE id % 2 = 1"
    q2 = f"SELECT id, embedding FROM {table} WHERE id % 3 = 1"
    qdir = tmp_path / "q"
    assert _cli(capsys, "-q", "export-postgres", "-c", str(_config(tmp_path, pg_server, table, output=str(qdir),
                                                                    query=q1)))[0] == 0
    qbefore = _dir_state(qdir)
    rc, _, err = _cli(capsys, "export-postgres", "--since-last", "-c",
                      str(_config(tmp_path, pg_server, table, output=str(qdir), query=q2)))
    _one_paragraph_error(rc, err)
    assert q1 in err and q2 in err
    assert _dir_state(qdir) == qbefore

    # text ids: a first export works, --since-last cannot tell new rows by id
    text_table = _table("text")
    _create(db, text_table, _ids(0, 50), synthetic(50, D, seed=6), "vector", id_type="text")
    tdir = tmp_path / "t"
    tcfg = _config(tmp_path, pg_server, text_table, output=str(tdir))
    assert _cli(capsys, "-q", "export-postgres", "-c", str(tcfg))[0] == 0
    tbefore = _dir_state(tdir)
    rc, _, err = _cli(capsys, "export-postgres", "--since-last", "-c", str(tcfg))
    _one_paragraph_error(rc, err)
    assert "'id'" in err and "text ids" in err and "integer id column" in err
    assert _dir_state(tdir) == tbefore


def _subprocess_cli(cfg: Path, args: list[str], env: dict) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(Path(pqgpu.__file__).resolve().parents[1]), **env)
    return subprocess.run([sys.executable, "-m", "pqgpu.cli", "-q", *args, "-c", str(cfg)], env=full,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fault,recorded", [
    ("pg-before-rename:6:kill", 6),  # shard 5 recorded; shard 6 a temporary file
    ("pg-after-rename:5:kill", 5),  # shard 5 renamed into place, not in the manifest
    ("pg-before-complete:7:kill", 7),  # every shard recorded, the export not marked complete
])
def test_killed_since_last_export_then_same_command(pg_server, db, tmp_path, capsys, fault, recorded):
    ids0, ids1, x1 = _ids(0, N0), _ids(N0, N1), synthetic(N1, D, seed=2)
    table, cfg = _first_night(db, pg_server, tmp_path, capsys)
    ref_cfg = _config(tmp_path, pg_server, table, name="ref.yaml", output=str(tmp_path / "ref"))
    assert _cli(capsys, "-q", "export-postgres", "-c", str(ref_cfg))[0] == 0
    _insert(db, table, ids1, x1)
    assert _cli(capsys, "-q", "export-postgres", "--since-last", "-c", str(ref_cfg))[0] == 0
    shards = tmp_path / "shards"

    r = _subprocess_cli(cfg, ["export-postgres", "--since-last"], {"PQGPU_FAULT": fault})
    assert r.returncode == -9, r.stderr
    man = json.loads((shards / MANIFEST_NAME).read_text())
    assert not man["complete"] and not man["exports"][-1]["complete"] and man["exports"][-1]["export"] == 1
    assert len(man["shards"]) == recorded
    for s in man["shards"]:  # every shard the manifest names is there, whole
        assert pq.ParquetFile(shards / s["file"]).metadata.num_rows == s["rows"]
    if fault.startswith("pg-after-rename"):
        assert (shards / "part-000005.parquet").exists()  # on disk, but not named by the manifest

    # an append meanwhile encodes the shards the manifest names, and only those
    rc, _, err = _cli(capsys, "-q", "run", "--append", "-c", str(cfg))
    assert rc == 0, err
    recorded_rows = sum(s["rows"] for s in man["shards"])
    assert pqgpu.open_store(tmp_path / "codes.zarr").n == recorded_rows

    rc, out, err = _cli(capsys, "export-postgres", "--since-last", "-c", str(cfg))
    assert rc == 0, err
    assert "export 1:" in out
    ref = json.loads((tmp_path / "ref" / MANIFEST_NAME).read_text())
    man = json.loads((shards / MANIFEST_NAME).read_text())
    assert man["shards"] == ref["shards"] and man["complete"]
    strip = [{k: v for k, v in e.items() if k not in ("started", "finished")} for e in man["exports"]]
    assert strip == [{k: v for k, v in e.items() if k not in ("started", "finished")} for e in ref["exports"]]
    parquet = {k: v[0] for k, v in _dir_state(shards).items() if k.endswith(".parquet")}
    assert parquet == {k: v[0] for k, v in _dir_state(tmp_path / "ref").items() if k.endswith(".parquet")}

    rc, _, err = _cli(capsys, "-q", "run", "--append", "-c", str(cfg))
    assert rc == 0, err
    store = pqgpu.open_store(tmp_path / "codes.zarr")
    np.testing.assert_array_equal(store.ids[...], np.concatenate([ids0, ids1]))
    ref_codes, centroids = _faiss_codes(tmp_path, x1)
    assert_codes_match(np.asarray(store.codes[N0:N0 + N1]), ref_codes, x1, centroids, 8)


def test_since_last_after_an_export_made_before_exports_were_recorded(pg_server, db, tmp_path, capsys):
    """A manifest without `exports` (written by an older pqgpu) counts as one export of all its shards."""
    table = _table("legacy")
    ids0, ids1 = _ids(0, 400), _ids(400, 30)
    _create(db, table, ids0, synthetic(400, D, seed=7), "vector")
    cfg = _config(tmp_path, pg_server, table)
    assert _cli(capsys, "-q", "export-postgres", "-c", str(cfg))[0] == 0
    path = tmp_path / "shards" / MANIFEST_NAME
    man = json.loads(path.read_text())
    del man["exports"]
    path.write_text(json.dumps(man))
    _insert(db, table, ids1, synthetic(30, D, seed=8))
    rc, out, err = _cli(capsys, "-q", "export-postgres", "--since-last", "-c", str(cfg))
    assert rc == 0, err
    e0, e1 = json.loads(path.read_text())["exports"]
    assert (e0["export"], e0["first_id"], e0["last_id"], e0["rows"], e0["files"], e0["complete"]) == \
        (0, int(ids0[0]), int(ids0[-1]), 400, ["part-000000.parquet", "part-000001.parquet"], True)
    assert (e1["export"], e1["after_id"], e1["first_id"], e1["last_id"], e1["rows"], e1["files"]) == \
        (1, int(ids0[-1]), int(ids1[0]), int(ids1[-1]), 30, ["part-000002.parquet"])
