"""Which rows of a code store a write-back still owes a table: its generations, and the store's record of what
was written where.

A store grows by generations (the first encode, then one per ``--append``: attrs ``generations``, each with
its rows ``[lo, hi)``). After a write-back has written every row of generations 0..k into a table's codes
column, it records that in the store's root attrs ``postgres_writeback``: one entry per target (database,
table, codes column), with k and the row it reached. The next write-back to the same target writes only the
rows of the generations after k (`plan`); ``all_rows`` writes them all again. The record is written last and
only once every batch is committed, so a write-back killed half-way writes the same generations again when it
is re-run, which rewrites nothing that is already in the table (the UPDATE skips equal codes).

A target is recognised by the database (its name and oid), the table (its name and oid: a table dropped and
created again is a new target) and the codes column, which must still exist; anything else gets every row.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

RECORD_KEY = "postgres_writeback"


@dataclass(frozen=True)
class Plan:
    """The rows [lo, hi) of the store to write: those of `generations`; `already` were written before."""

    lo: int
    hi: int
    generations: tuple[int, ...]
    already: tuple[int, ...] = ()
    last: int = 0  # the newest committed generation (recorded once the rows are written)

    @property
    def empty(self) -> bool:
        return self.hi <= self.lo


def generations(attrs: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The store's committed generations ({generation, rows: [lo, hi]}) covering rows [0, n); a store without
    them (made before generations were recorded) is one generation 0 of all its rows."""
    gens = [g for g in attrs.get("generations") or [] if isinstance(g, dict) and int(g["rows"][1]) <= n]
    if not gens or int(gens[-1]["rows"][1]) != n:
        return [{"generation": 0, "rows": [0, n]}]
    return [{"generation": int(g["generation"]), "rows": [int(g["rows"][0]), int(g["rows"][1])]} for g in gens]


def target_of(cur: Any, table_sql: str, codes_column: str, table: str) -> dict[str, Any]:
    """What identifies the table that receives the codes: the database (name and oid), the table's oid (None
    when it does not exist), name and codes column, and whether that column exists now. (The server's system
    identifier would be better still, but pg_control_system() fails where the server cannot read its own
    pg_control file for this session, so the key would change between runs.)"""
    cur.execute("SELECT current_database(), (SELECT d.oid::int8 FROM pg_database d WHERE d.datname = "
                "current_database()), c.oid::int8, EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid "
                "AND a.attname = %s AND NOT a.attisdropped AND a.attnum > 0) "
                "FROM (SELECT to_regclass(%s)::oid AS oid) AS c", (codes_column, table_sql))
    database, database_oid, oid, has_column = cur.fetchone()
    return {"database": database, "database_oid": database_oid, "table_oid": oid, "table": table,
            "codes_column": codes_column, "column_exists": bool(has_column)}


def _key(target: dict[str, Any]) -> tuple:
    return (target.get("database"), target.get("database_oid"), target.get("table_oid"), target.get("table"),
            target.get("codes_column"))


def recorded(attrs: dict[str, Any], target: dict[str, Any]) -> dict[str, Any] | None:
    """The store's record of the last write-back into `target` (None: none, or the codes column is new)."""
    if not target.get("column_exists") or target.get("table_oid") is None:
        return None
    for entry in attrs.get(RECORD_KEY) or []:
        if isinstance(entry, dict) and _key(entry.get("target") or {}) == _key(target):
            return entry
    return None


def plan(attrs: dict[str, Any], n: int, target: dict[str, Any], *, all_rows: bool, where: str) -> Plan:
    """The rows to write into `target`: every row with `all_rows` or without a record, else those of the
    generations after the last one recorded."""
    gens = generations(attrs, n)
    last = gens[-1]["generation"]
    every = Plan(0, n, tuple(g["generation"] for g in gens), (), last)
    if all_rows:
        return every
    rec = recorded(attrs, target)
    if rec is None:
        return every
    done = int(rec.get("generation", -1))
    upto = next((g for g in gens if g["generation"] == done), None)
    if upto is None or upto["rows"][1] != int(rec.get("rows", -1)):
        log.warning("%s: its record of the write-back into %s (generation %s, rows up to %s) does not match its "
                    "generations; writing every row", where, target.get("table"), done, rec.get("rows"))
        return every
    todo = [g for g in gens if g["generation"] > done]
    already = tuple(g["generation"] for g in gens if g["generation"] <= done)
    if not todo:
        return Plan(n, n, (), already, last)
    return Plan(todo[0]["rows"][0], n, tuple(g["generation"] for g in todo), already, last)


def record(group: Any, target: dict[str, Any], p: Plan, *, rows_written: int, n: int) -> None:
    """Record in the store's root attrs that generations 0..p.last of `group` are in `target`. `group` must be
    opened after the store's lock was taken, so that no append's commit is overwritten."""
    entries = [e for e in group.attrs.get(RECORD_KEY) or []
               if isinstance(e, dict) and _key(e.get("target") or {}) != _key(target)]
    tgt = {k: v for k, v in target.items() if k != "column_exists"}
    entries.append({"target": tgt, "generation": int(p.last), "rows": int(n),
                    "written": {"generations": list(p.generations), "rows": [int(p.lo), int(p.hi)],
                                "table_rows": int(rows_written)},
                    "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    group.attrs[RECORD_KEY] = entries


@dataclass(frozen=True)
class WriteBackResult:
    """What `write_codes_postgres` did: `rows` table rows now hold this call's codes (ids found in the table),
    `changed` of them differed before, `missing` store ids were not in the table."""

    table: str
    codes_column: str
    rows: int
    changed: int
    missing: int
    store_rows: tuple[int, int]  # the store rows [lo, hi) read
    generations: tuple[int, ...]  # written by this call
    already: tuple[int, ...] = ()  # written before and left alone
    seconds: float = 0.0
