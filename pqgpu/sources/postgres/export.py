"""Export a PostgreSQL table (or query) to Parquet shards that the parquet source reads directly.

`export_postgres` streams ``SELECT id, vector`` in id order, one binary ``COPY`` per shard (keyset
pagination: ``WHERE id > last ORDER BY id LIMIT rows_per_shard``), reads it with psycopg's COPY reader
and pgvector's loaders (`copy_rows`), writes ``part-NNNNNN.parquet`` files on a background thread (`shards`)
and records each finished shard in the manifest (`manifest`), so a re-run resumes after the last complete shard.
``since_last=True`` (``pqgpu export-postgres --since-last``, the nightly job) exports only the rows whose
integer id is above the highest id of the previous export of the same table or query into new shards beside
the old ones (their numbers continue, so they sort after them), recorded as a new export in the manifest; it
refuses when there is no previous export, when it was of another source, and for non-integer ids. Rows
changed or deleted after they were exported are not seen: that needs a full export into a new directory.
With ``postgres.query`` each shard re-runs the query wrapped as
``SELECT id, vec FROM (query) WHERE id > last ORDER BY id LIMIT n``: keep the query simple enough for
the planner to push the id condition down to an index, or use a larger rows_per_shard.
Identifiers are always composed with ``psycopg.sql.Identifier`` and values with ``psycopg.sql.Literal``.

psycopg's reader replaced a binary-COPY decoder of our own (issue 22): ours was 1.38x end to end at 200,000 x
384 (1.13x at d=768), below the 1.5x that would have kept it (``python -m pqgpu.bench.pg_copy --rows 200000
--dim 384 --repeat 9`` at commit 2abb32e, median of 9 interleaved rounds, shared 2-core AMD EPYC; the whole
export: 1.35x at d=384, 1.08x at d=768). Details in `copy_rows` and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from ..._faults import fault_point
from ...config import PostgresConfig
from ...errors import ConfigError, InputError
from .connect import column_types, connect, import_psycopg, redact_dsn, run_pg, split_table
from .copy_rows import ID_KINDS, VECTOR_CODECS, Block, CopyDecoder, copy_into
from .manifest import (
    MANIFEST_NAME,
    begin_export,
    cleanup_strays,
    exports,
    finish_export,
    integer_ids_message,
    open_output,
    previous_export,
    record_shard,
    start_manifest,
    write_json_atomic,
)
from .shards import ShardWriter, block_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    """What `export_postgres` did. Counts cover the whole export (all runs), `new_*` only this call."""

    output: str
    manifest: str
    files: tuple[str, ...]
    rows: int
    new_rows: int
    new_files: int
    null_vectors: int
    null_ids: int
    d: int | None
    id_type: str  # "int64" | "string"
    vector_type: str  # vector | halfvec | real[] | double precision[] | bytea
    resumed: bool
    seconds: float
    export: int | None = None  # the manifest's export entry this call wrote (None: nothing new to export)
    new_shards: tuple[str, ...] = ()  # file names of this call's shards
    after_id: Any = None  # this export's rows have ids above this one (None: the first export)
    first_new_id: Any = None
    last_new_id: Any = None
    up_to_date: bool = False  # a complete export and no rows after its highest id: nothing was written


def export_postgres(pg: PostgresConfig, *, strict: bool = False, since_last: bool = False,
                    progress: Callable[[int], None] | None = None) -> ExportResult:
    """Export `pg.table` (or the rows of `pg.query`) to Parquet shards in `pg.output`.

    Rows are read in id order, `pg.rows_per_shard` rows per shard (one binary COPY each), decoded with
    NumPy and written by a background thread, one Parquet row group per ~16 MiB block; memory stays
    bounded by a few blocks. A re-run resumes after the last shard recorded in
    ``<output>/_manifest.json`` (and exports rows with larger ids added since, as a new export entry).
    ``since_last=True``: only that continuation, refused (nothing created or written) without a previous
    export in `pg.output`, for another table or query than it, or for non-integer ids. A complete export with
    no rows after its highest id writes nothing (``up_to_date``). NULL vectors and NULL ids are skipped with a
    warning (``strict=True``: InputError naming the id). `progress(n)` is called with the number of vectors of
    each shard once that shard is safely on disk.
    """
    if pg.rows_per_shard <= 0:
        raise ConfigError(f"postgres.rows_per_shard: expected a positive integer. Got {pg.rows_per_shard}.")
    if not pg.output:
        raise ConfigError("postgres.output is empty. Give the directory that receives the Parquet shards.")
    import_psycopg()

    t0 = time.perf_counter()
    dsn = pg.resolved_dsn()
    src = _src_sql(pg)
    what = _what(pg)
    out_dir = os.path.abspath(pg.output)
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    desc = _source_desc(pg)
    if since_last:  # before the directory is created or anything is written
        previous_export(out_dir, desc)
    manifest = open_output(out_dir, desc)
    resumed = manifest is not None

    log.info("Exporting %s from %s to %s%s", what, redact_dsn(dsn), out_dir, " (since the last export)" if since_last
             else "")
    conn = connect(dsn, autocommit=True)
    try:
        id_pg, codec = _column_types(conn, pg, src, dsn, what)
        id_type = "string" if ID_KINDS[id_pg] is None else "int64"
        if since_last and id_type != "int64":
            raise InputError(integer_ids_message(None, desc, id_pg))
        manifest = start_manifest(manifest, manifest_path, desc, id_type, codec.name)
        if manifest.get("complete") and not _rows_after(conn, pg, src, dsn, what, manifest.get("resume_after")):
            return _up_to_date(manifest, out_dir, manifest_path, codec.name, id_type, time.perf_counter() - t0, what)
        entry, resumed_entry = begin_export(manifest)
        cleanup_strays(out_dir, len(manifest["shards"]))
        manifest["complete"] = False
        write_json_atomic(manifest_path, manifest)
        if resumed_entry:
            log.info("Resuming export %d into %s after id %r (%d shards, %d rows done in all)", entry["export"],
                     out_dir, manifest.get("resume_after"), len(manifest["shards"]), manifest.get("rows", 0))
        elif entry["after_id"] is not None:
            log.info("Export %d into %s: the rows of %s with %s above %r", entry["export"], out_dir, what,
                     pg.id_column, entry["after_id"])
        null_ids = _count_null_ids(conn, pg, src, dsn, what, strict)
        manifest["null_ids"] = null_ids
        run = _ShardRun(conn, pg, src=src, dsn=dsn, what=what, out_dir=out_dir, manifest=manifest,
                        manifest_path=manifest_path, id_pg=id_pg, codec=codec, strict=strict, progress=progress,
                        entry=entry)
        run.export_all()
        fault_point("pg-before-complete", len(manifest["shards"]))
        finish_export(entry)
        manifest["complete"] = True
        write_json_atomic(manifest_path, manifest)
    finally:
        conn.close()

    total_nulls = int(manifest.get("null_vectors", 0))
    if run.new_nulls:
        log.warning("%s: skipped %d row(s) whose %s is NULL (first: id %r); %d skipped in all", what, run.new_nulls,
                    pg.vector_column, run.first_null_id, total_nulls)
    files = tuple(os.path.join(out_dir, s["file"]) for s in manifest["shards"])
    res = ExportResult(output=out_dir, manifest=manifest_path, files=files, rows=int(manifest["rows"]),
                       new_rows=run.new_rows, new_files=run.new_files, null_vectors=total_nulls, null_ids=null_ids,
                       d=manifest.get("d"), id_type=id_type, vector_type=codec.name, resumed=resumed,
                       seconds=time.perf_counter() - t0, export=entry["export"], new_shards=tuple(run.new_names),
                       after_id=entry["after_id"], first_new_id=run.first_new_id, last_new_id=run.last_new_id)
    log.info("Exported %d new rows in %d new shard(s) to %s (%d rows in %d shards, d=%s) in %.1f s",
             run.new_rows, run.new_files, out_dir, res.rows, len(files), res.d, res.seconds)
    return res


def _rows_after(conn, pg: PostgresConfig, src, dsn: str, what: str, last_id: Any) -> bool:
    """Whether the source has a row whose id is above `last_id` (any non-NULL id when None)."""
    from psycopg import sql

    idc = sql.Identifier(pg.id_column)
    cond = (sql.SQL("{} IS NOT NULL").format(idc) if last_id is None
            else sql.SQL("{} > {}").format(idc, sql.Literal(last_id)))

    def probe():
        with conn.cursor() as cur:
            cur.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {})").format(src, cond))
            return bool(cur.fetchone()[0])

    return run_pg(probe, dsn, f"looking for new rows in {what}")


def _up_to_date(manifest: dict, out_dir: str, manifest_path: str, vector_type: str, id_type: str, seconds: float,
                what: str) -> ExportResult:
    entries = exports(manifest)
    log.info("%s has no rows with an id above %r, the highest of the previous export into %s (export %s); nothing "
             "was written", what, manifest.get("resume_after"), out_dir, entries[-1]["export"] if entries else "-")
    files = tuple(os.path.join(out_dir, s["file"]) for s in manifest["shards"])
    return ExportResult(output=out_dir, manifest=manifest_path, files=files, rows=int(manifest["rows"]), new_rows=0,
                        new_files=0, null_vectors=int(manifest.get("null_vectors", 0)),
                        null_ids=int(manifest.get("null_ids", 0)), d=manifest.get("d"), id_type=id_type,
                        vector_type=vector_type, resumed=True, seconds=seconds,
                        after_id=manifest.get("resume_after"), up_to_date=True)


# -- the source -----------------------------------------------------------------------------------------

def _source_desc(pg: PostgresConfig) -> dict[str, Any]:
    query = pg.query.strip().rstrip(";").strip() if pg.query else None
    return {"table": None if query else pg.table, "query": query,
            "id_column": pg.id_column, "vector_column": pg.vector_column}


def _src_sql(pg: PostgresConfig):
    from psycopg import sql

    if pg.query:
        q = pg.query.strip().rstrip(";").strip()
        if not q:
            raise ConfigError("postgres.query is empty. Give a SELECT statement or use postgres.table.")
        return sql.SQL("({}) AS _pqgpu_src").format(sql.SQL(q))
    if not pg.table:
        raise ConfigError("postgres: set either postgres.table or postgres.query.")
    return sql.Identifier(*split_table(pg.table))


def _what(pg: PostgresConfig) -> str:
    return "postgres.query" if pg.query else f"table {pg.table!r}"


def _column_types(conn, pg: PostgresConfig, src, dsn: str, what: str):
    """(id type name, vector decoder) of the source's two columns; InputError for unsupported types."""
    from psycopg import sql

    def probe():
        with conn.cursor() as cur:
            return column_types(cur, sql.SQL("SELECT {}, {} FROM {} LIMIT 0").format(
                sql.Identifier(pg.id_column), sql.Identifier(pg.vector_column), src))

    id_pg, vec_pg = run_pg(probe, dsn, f"reading the columns of {what}")
    if id_pg not in ID_KINDS:
        raise InputError(
            f"{what}: id column {pg.id_column!r} has type {id_pg}; supported: smallint, integer, bigint, "
            "text, varchar. Cast it in postgres.query, e.g. SELECT id::bigint AS id, ..."
        )
    if vec_pg not in VECTOR_CODECS:
        raise InputError(
            f"{what}: vector column {pg.vector_column!r} has type {vec_pg}; supported: vector, halfvec "
            "(pgvector), real[], double precision[], bytea (little-endian float32)."
        )
    return id_pg, VECTOR_CODECS[vec_pg]


def _count_null_ids(conn, pg: PostgresConfig, src, dsn: str, what: str, strict: bool) -> int:
    """Rows whose id is NULL (they cannot be exported): 0 without a scan when the column is NOT NULL;
    InputError when `strict`, else a warning."""
    from psycopg import sql

    def count():
        with conn.cursor() as cur:
            if not pg.query:
                cur.execute("SELECT a.attnotnull FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) "
                            "AND a.attname = %s AND NOT a.attisdropped", (src.as_string(conn), pg.id_column))
                row = cur.fetchone()
                if row and row[0]:
                    return 0
            cur.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(src, sql.Identifier(pg.id_column)))
            return int(cur.fetchone()[0])

    null_ids = run_pg(count, dsn, f"counting NULL ids in {what}")
    if null_ids:
        if strict:
            raise InputError(f"{what}: {null_ids} row(s) have a NULL id in column {pg.id_column!r}. Give "
                             "every row an id, or filter them out with postgres.query.")
        log.warning("%s: skipping %d row(s) whose id (%s) is NULL", what, null_ids, pg.id_column)
    return null_ids


# -- the shards -----------------------------------------------------------------------------------------

class _ShardRun:
    """Exports shard after shard until the source is exhausted.

    While shard k+1 is read and decoded, the writer thread finishes shard k; shard k is recorded in the
    manifest (and reported to `progress`) only once its file is closed, fsynced and renamed.
    """

    def __init__(self, conn, pg: PostgresConfig, *, src, dsn: str, what: str, out_dir: str, manifest: dict,
                 manifest_path: str, id_pg: str, codec, strict: bool, progress: Callable[[int], None] | None,
                 entry: dict):
        self.conn, self.pg, self.src, self.dsn, self.what = conn, pg, src, dsn, what
        self.out_dir, self.manifest, self.manifest_path = out_dir, manifest, manifest_path
        self.id_pg, self.codec, self.strict, self.progress = id_pg, codec, strict, progress
        self.string_ids = ID_KINDS[id_pg] is None
        self.limit = pg.rows_per_shard
        self.shards: list[dict] = manifest["shards"]
        self.writer: ShardWriter | None = None
        self.entry = entry  # the manifest's export entry that records this run's shards
        self.new_rows = self.new_files = self.new_nulls = 0
        self.new_names: list[str] = []
        self.first_null_id: Any = None
        self.first_new_id: Any = None
        self.last_new_id: Any = None

    def export_all(self) -> None:
        last_id = self.manifest.get("resume_after")
        d: int | None = self.manifest.get("d")
        pending: tuple[Future, dict, CopyDecoder] | None = None
        page: CopyDecoder | None = None
        shard: dict | None = None
        try:
            while True:
                name = f"part-{len(self.shards) + (1 if pending is not None else 0):06d}.parquet"
                shard = {"final": os.path.join(self.out_dir, name),
                         "tmp": os.path.join(self.out_dir, f".{name}.tmp-{os.getpid()}")}
                page = self._read_shard(shard, d, last_id)
                if pending is not None:
                    job, pending = pending, None
                    self._finish(*job)
                if page.null_vectors:
                    self.new_nulls += page.null_vectors
                    if self.first_null_id is None:
                        self.first_null_id = page.first_null_id
                if page.scanned == 0:
                    break
                d = page.d if page.d is not None else d
                if page.n:
                    entry = {"file": name, "rows": page.n, "null_vectors": page.null_vectors,
                             "first_id": page.first_id, "last_id": page.last_id}
                    pending = (self.writer.close_shard(shard), entry, page)
                else:  # every row of this page had a NULL vector: no file, but move on
                    self._record(None, page)
                shard = None
                last_id = page.last_id
                if page.scanned < self.limit:
                    break
            if pending is not None:
                job, pending = pending, None
                self._finish(*job)
        finally:
            if self.writer is not None:
                if shard is not None:  # interrupted inside a page: drop its partial file
                    if page is not None:
                        page.discard()
                    self.writer.abort_shard(shard)
                self.writer.stop()
        if self.writer is not None:
            self.writer.check()

    def _read_shard(self, shard: dict, d: int | None, last_id: Any) -> CopyDecoder:
        """One binary COPY of up to `limit` rows after `last_id`, decoded into blocks sent to the writer."""
        from psycopg import sql

        idc = sql.Identifier(self.pg.id_column)
        cond = (sql.SQL("{} IS NOT NULL").format(idc) if last_id is None
                else sql.SQL("{} > {}").format(idc, sql.Literal(last_id)))
        stmt = sql.SQL("COPY (SELECT {id}, {vec} FROM {src} WHERE {cond} ORDER BY {id} LIMIT {n}) "
                       "TO STDOUT (FORMAT BINARY)").format(id=idc, vec=sql.Identifier(self.pg.vector_column),
                                                           src=self.src, cond=cond, n=sql.Literal(self.limit))
        page = CopyDecoder(id_type=self.id_pg, codec=self.codec, d=d, limit=self.limit, strict=self.strict,
                           where=f"{self.what}, column {self.pg.vector_column!r}", new_block=self._new_block,
                           emit=lambda b: self.writer.put_block(shard, b), release=lambda b: self.writer.recycle(b))
        if last_id is not None:
            page.prev_id = last_id if not self.string_ids else None
        run_pg(lambda: copy_into(self.conn, stmt, page), self.dsn, f"exporting {self.what}")
        page.flush()
        return page

    def _new_block(self, dim: int) -> Block:
        if self.writer is None:  # started at the first vector: its dimension sizes the blocks
            self.writer = ShardWriter(d=dim, block_rows=block_rows(dim, self.limit), string_ids=self.string_ids,
                                      id_col=self.pg.id_column, vec_col=self.pg.vector_column)
        return self.writer.get_block()

    def _record(self, entry: dict | None, page: CopyDecoder) -> None:
        m = self.manifest
        if entry is not None:
            self.shards.append(entry)
            m["rows"] = int(m.get("rows", 0)) + entry["rows"]
        record_shard(self.entry, entry, page.null_vectors)
        m["null_vectors"] = int(m.get("null_vectors", 0)) + page.null_vectors
        m["resume_after"] = page.last_id
        m["d"] = page.d
        write_json_atomic(self.manifest_path, m)

    def _finish(self, fut: Future, entry: dict, page: CopyDecoder) -> None:
        fut.result()
        fault_point("pg-after-rename", len(self.shards))
        self._record(entry, page)
        self.new_rows += entry["rows"]
        self.new_files += 1
        self.new_names.append(entry["file"])
        if self.first_new_id is None:
            self.first_new_id = entry["first_id"]
        self.last_new_id = entry["last_id"]
        log.debug("Wrote %s: %d rows, ids %r..%r", entry["file"], entry["rows"], entry["first_id"],
                  entry["last_id"])
        if self.progress is not None:
            self.progress(entry["rows"])
