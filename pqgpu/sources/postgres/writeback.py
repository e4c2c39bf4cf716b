"""Write PQ codes back into PostgreSQL: one bytea column of the source table, matched by id.

`write_codes_postgres` reads the code store (``codes`` uint8 (n, code_size), ``ids`` (n,)) in batches;
each batch is one ``COPY`` into a temporary table + ``UPDATE ... FROM`` that touches only rows whose code
differs, so running it twice gives the same table and rewrites nothing. It writes the rows of the store's
generations that were not written into that table yet (`written`: after ``pqgpu run --append``, only the
new rows) and records in the store which generation it reached; ``all_rows`` writes every row again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterator

import numpy as np

from ...config import PostgresConfig
from ...errors import ConfigError, InputError, StoreError
from .connect import column_types, connect, import_psycopg, run_pg, split_table
from .copy_rows import ID_KINDS
from .written import Plan, WriteBackResult, plan, record, target_of

log = logging.getLogger(__name__)

BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"  # starts a binary COPY FROM stream


def _open_store(store_path: str) -> tuple[Any, int]:
    """The store's Zarr group and its committed rows n (attrs ``n``; the arrays may be longer while an append
    is under way or was interrupted), checked: StoreError when it cannot be read or is not finished."""
    import zarr

    try:
        g = zarr.open_group(store_path, mode="r")
        codes, ids = g["codes"], g["ids"]
    except Exception as exc:  # zarr raises various errors for missing/invalid stores
        raise StoreError(f"{store_path}: cannot open the code store ({type(exc).__name__}: {exc}). Give the "
                         "encode.output of a finished `pqgpu encode`.") from None
    if len(codes.shape) != 2 or codes.dtype != np.uint8 or len(ids.shape) != 1 or ids.shape[0] != codes.shape[0]:
        raise StoreError(f"{store_path}: expected codes uint8 (n, code_size) and ids (n,); found codes "
                         f"{codes.dtype} {codes.shape} and ids {ids.dtype} {ids.shape}.")
    n = int(g.attrs.get("n", codes.shape[0]))
    if "done" in g and not g.attrs.get("generations"):  # committed generations are complete by construction
        done = np.asarray(g["done"][...], dtype=bool)
        if not done.all():
            raise StoreError(f"{store_path}: {int((~done).sum())} of {done.size} chunks are not encoded yet. "
                             "Finish `pqgpu encode` first, then write the codes.")
    return g, n


def _iter_rows(g: Any, lo: int, hi: int, batch_rows: int) -> Iterator[tuple[np.ndarray, Any]]:
    codes, ids = g["codes"], g["ids"]
    for s in range(lo, hi, batch_rows):
        e = min(hi, s + batch_rows)
        yield np.ascontiguousarray(codes[s:e]), np.asarray(ids[s:e])


def _refuse_ivf_store(store_path: str) -> None:
    """StoreError for an IVF-PQ store (quantizer.nlist > 0), before anything connects or writes: its codes
    are PQ codes of the residual to the row's coarse centroid, meaningless without the row's list and the
    coarse centroids, so a bytea column of them alone could not be decoded or searched."""
    import zarr

    try:
        g = zarr.open_group(store_path, mode="r")
    except Exception:  # not a store: _iter_store says so, in its own words
        return
    if "lists" in g or g.attrs.get("nlist"):
        raise StoreError(
            f"{store_path} is an IVF-PQ store (nlist={g.attrs.get('nlist')}): its codes encode each row's residual "
            "to its IVF list's coarse centroid, so without the list and the coarse centroids they cannot be "
            "decoded or searched, and write-codes-postgres writes codes alone. Nothing was written. To keep PQ "
            "codes in Postgres, encode a plain PQ store (quantizer.nlist: 0, with another quantizer.path and "
            "encode.output) and write that one; to search this store use `pqgpu search --nprobe` or "
            "`pqgpu export-faiss`.")


def write_codes_postgres(pg: PostgresConfig, store_path: str, *, batch_rows: int | None = None,
                         all_rows: bool = False, progress: Callable[[int], None] | None = None) -> WriteBackResult:
    """Write store rows' codes into ``pg.codes_column`` (bytea) of ``pg.table``, matched by id: the rows of the
    generations not yet written into that table (all of them the first time, or with ``all_rows``).

    The column is added when missing. Each batch of `batch_rows` (default ``pg.batch_rows``) is one
    transaction: COPY into a temporary table, then one ``UPDATE ... FROM`` that touches only rows whose
    code differs, so a re-run (or a resume after an interruption) is idempotent and cheap. Once every batch
    is committed, the store records the newest generation written (pqgpu.sources.postgres.written); the store's
    lock is held throughout, so no append commits meanwhile. The result counts the table rows that hold this
    call's codes (ids found in the table); store ids missing from the table are counted and reported with a
    warning. `progress(n)` is called after each batch with its size.
    """
    if pg.query:
        raise ConfigError("write-codes-postgres needs postgres.table (the table that receives the codes); "
                          "it cannot write into the result of postgres.query. Set postgres.table and remove "
                          "postgres.query.")
    if not pg.table:
        raise ConfigError("postgres.table is not set. Name the table that receives the codes.")
    _refuse_ivf_store(store_path)
    batch = int(batch_rows if batch_rows is not None else pg.batch_rows)
    if batch <= 0:
        raise ConfigError(f"postgres.batch_rows: expected a positive integer. Got {batch}.")
    psycopg = import_psycopg()
    from psycopg import sql

    from ...store import exclusive_lock

    dsn = pg.resolved_dsn()
    table = sql.Identifier(*split_table(pg.table))
    _open_store(store_path)  # checks the store before connecting (and before its lock file is made)
    lock = contextlib.ExitStack()
    try:
        lock.enter_context(exclusive_lock(store_path))
    except StoreError as exc:
        raise StoreError(f"{exc} write-codes-postgres holds the store's lock while it writes, and records in the "
                         "store which generations it wrote (so it needs write access to it). Nothing was written "
                         "into the table.") from None
    with lock:
        g, n = _open_store(store_path)  # opened under the lock: its attrs are those the record updates
        conn = connect(dsn, autocommit=False)
        try:
            target = run_pg(lambda: _target(conn, table, pg), dsn, f"looking up table {pg.table!r}")
            p = plan(dict(g.attrs), n, target, all_rows=all_rows, where=store_path)
            if p.empty:
                log.info("%s: generation(s) %s already written into %s.%s; nothing to write", store_path,
                         _span(p.already), pg.table, pg.codes_column)
                return WriteBackResult(pg.table, pg.codes_column, 0, 0, 0, (p.lo, p.hi), (), p.already)
            res = _write(conn, pg, dsn, table, g, p, batch, store_path, progress)
        finally:
            try:
                conn.rollback()
            except psycopg.Error:
                pass
            conn.close()
        import zarr

        record(zarr.open_group(store_path, mode="r+"), target, p, rows_written=res.rows, n=n)
    return res


def _span(gens: tuple[int, ...]) -> str:
    if not gens:
        return "none"
    return str(gens[0]) if len(gens) == 1 else f"{gens[0]}-{gens[-1]}"


def _target(conn, table, pg: PostgresConfig) -> dict[str, Any]:
    with conn.cursor() as cur:
        out = target_of(cur, table.as_string(conn), pg.codes_column, pg.table)
    conn.commit()
    return out


def _write(conn, pg: PostgresConfig, dsn: str, table, g: Any, p: Plan, batch: int, store_path: str,
           progress: Callable[[int], None] | None) -> WriteBackResult:
    """The batches of rows [p.lo, p.hi), each committed on its own."""
    from psycopg import sql

    idc, codec_ = sql.Identifier(pg.id_column), sql.Identifier(pg.codes_column)
    what = f"table {pg.table!r}"
    updated = missing = changed_total = 0
    t0 = time.perf_counter()

    def prepare():
        with conn.cursor() as cur:
            cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} bytea").format(table, codec_))
            types = column_types(cur, sql.SQL("SELECT {}, {} FROM {} LIMIT 0").format(idc, codec_, table))
        conn.commit()
        return types

    id_pg, code_pg = run_pg(prepare, dsn, f"preparing {what}")
    if code_pg != "bytea":
        raise InputError(f"{what}: column {pg.codes_column!r} exists with type {code_pg}; the codes need a "
                         "bytea column. Choose another postgres.codes_column or drop that column.")
    if id_pg not in ID_KINDS:
        raise InputError(f"{what}: id column {pg.id_column!r} has unsupported type {id_pg}.")
    text_ids = ID_KINDS[id_pg] is None
    tmp = sql.Identifier("_pqgpu_codes")

    def setup_tmp():
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (id {}, code bytea)").format(
                tmp, sql.SQL("text" if text_ids else "int8")))
        conn.commit()

    run_pg(setup_tmp, dsn, "creating a temporary table")
    # Rows that already hold the same code are left alone: a re-run rewrites nothing (no table bloat).
    update = sql.SQL("UPDATE {t} AS t SET {c} = s.code FROM {tmp} AS s "
                     "WHERE t.{id} = s.id AND t.{c} IS DISTINCT FROM s.code").format(
        t=table, c=codec_, tmp=tmp, id=idc)
    matched = sql.SQL("SELECT count(*) FROM {tmp} AS s WHERE EXISTS (SELECT 1 FROM {t} AS t WHERE t.{id} = s.id)"
                      ).format(t=table, tmp=tmp, id=idc)

    def do_batch(codes: np.ndarray, ids: np.ndarray) -> tuple[int, int]:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("TRUNCATE {}").format(tmp))
            with cur.copy(sql.SQL("COPY {} (id, code) FROM STDIN (FORMAT BINARY)").format(tmp)) as cp:
                if text_ids:
                    cp.set_types(["text", "bytea"])
                    for i, c in zip(ids.tolist(), codes):
                        cp.write_row((str(i), c.tobytes()))
                else:
                    cp.write(_binary_copy_int_bytea(ids, codes))
            cur.execute(sql.SQL("ANALYZE {}").format(tmp))
            cur.execute(update)
            changed = cur.rowcount
            cur.execute(matched)
            n = int(cur.fetchone()[0])
        conn.commit()
        log.debug("batch of %d codes: %d rows matched, %d changed", len(ids), n, changed)
        return n, changed

    for codes, ids in _iter_rows(g, p.lo, p.hi, batch):
        if ids.dtype.kind not in "iu" and not text_ids:
            raise InputError(f"{store_path}: the store has {ids.dtype} ids but {what}.{pg.id_column} is "
                             f"{id_pg}; they cannot be matched.")
        if ids.dtype.kind in "iu" and text_ids:
            ids = ids.astype(str)
        n, changed = run_pg(lambda: do_batch(codes, ids), dsn, f"writing codes into {what}")
        updated += n
        changed_total += changed
        missing += len(ids) - n
        if progress is not None:
            progress(len(ids))
    if missing:
        log.warning("%s: %d id(s) of the store were not found in the table; their codes were not written",
                    what, missing)
    seconds = time.perf_counter() - t0
    log.info("Wrote %d codes (store rows %d-%d, generation(s) %s) into %s.%s in %.1f s", updated, p.lo, p.hi - 1,
             _span(p.generations), pg.table, pg.codes_column, seconds)
    return WriteBackResult(pg.table, pg.codes_column, updated, changed_total, missing, (p.lo, p.hi), p.generations,
                           p.already, seconds)


def _binary_copy_int_bytea(ids: np.ndarray, codes: np.ndarray) -> bytes:
    """Binary COPY stream of rows (int8 id, bytea code), built with one structured array."""
    n, cs = codes.shape
    dt = np.dtype([("nf", ">i2"), ("l1", ">i4"), ("id", ">i8"), ("l2", ">i4"), ("code", "u1", (cs,))])
    rec = np.empty(n, dtype=dt)
    rec["nf"] = 2
    rec["l1"] = 8
    rec["id"] = ids
    rec["l2"] = cs
    rec["code"] = codes
    return BINARY_SIGNATURE + b"\x00" * 8 + rec.tobytes() + b"\xff\xff"
