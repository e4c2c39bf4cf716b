"""The export's resume record: ``<output>/_manifest.json``, written atomically after every shard.

It names the source (table or query, id and vector columns), the id and vector types, every finished
shard with its row count and last id, and the id to resume after; a re-run continues after the last
complete shard (and picks up rows appended since). Shard files beyond the manifest and temporary files
are left by an interrupted run and are removed before exporting again.

``exports`` lists the exports into the directory, one entry per call that found rows to export (the first
export, then one per ``--since-last``): the ids asked for (``after_id``), the ids exported (``first_id`` ..
``last_id``), rows, NULL vectors skipped, shard files, start and finish time, and ``complete``. An interrupted
export stays the last, incomplete entry until a re-run finishes it. The manifest is what the directory holds:
a shard file it does not name was renamed into place by an export killed before it recorded the file, and is
deleted by the next export, so the Parquet source reads only the shards the manifest names (`recorded_shards`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from typing import Any, Iterable

from ...errors import InputError, StoreError

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
MANIFEST_FORMAT = "pqgpu-postgres-export"
MANIFEST_VERSION = 1
SHARD_RE = re.compile(r"^part-(\d{6,})\.parquet$")


def open_output(out_dir: str, desc: dict[str, Any]) -> dict | None:
    """Create `out_dir` and read its manifest (None for a new export), refusing shards without a manifest
    and a manifest of another source (`desc`)."""
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"postgres.output: cannot create {out_dir} ({exc.strerror}).") from None
    manifest = read_manifest(manifest_path)
    if manifest is None:
        strays = sorted(f for f in os.listdir(out_dir) if SHARD_RE.match(f))
        if strays:
            raise StoreError(
                f"{out_dir} already holds Parquet shards ({', '.join(strays[:3])}, ...) but no {MANIFEST_NAME}, "
                "so they cannot be resumed safely. Delete them or choose another postgres.output."
            )
    elif manifest.get("source") != desc:
        raise StoreError(
            f"{manifest_path} records an export of {describe_source(manifest.get('source'))}, not of "
            f"{describe_source(desc)}: the shards of one directory come from one table or query. Set postgres.table "
            "/ postgres.query and the column names back to those of that export, or choose another postgres.output "
            "for a separate export. Nothing was written."
        )
    return manifest


def describe_source(desc: Any) -> str:
    """'table 'items' (id column 'id', vector column 'embedding')', or the query's text."""
    if not isinstance(desc, dict):
        return repr(desc)
    what = f"the query {desc.get('query')!r}" if desc.get("query") else f"table {desc.get('table')!r}"
    return f"{what} (id column {desc.get('id_column')!r}, vector column {desc.get('vector_column')!r})"


def previous_export(out_dir: str, desc: dict[str, Any]) -> dict:
    """For ``--since-last``: the manifest of the previous export into `out_dir`, checked before anything is
    created or written. StoreError when there is none or it is of another table or query; InputError when its
    ids are not integers (the new rows are those with an id above the highest one exported)."""
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    manifest = read_manifest(manifest_path)
    if manifest is None:
        raise StoreError(
            f"--since-last: there is no previous export in {out_dir} (no {MANIFEST_NAME}), so there is no highest "
            "exported id to continue after. Run `pqgpu export-postgres` once without --since-last for the first "
            "export (then `pqgpu run` without --append), or point postgres.output at the directory of the previous "
            "export. Nothing was written."
        )
    if manifest.get("source") != desc:
        raise StoreError(
            f"--since-last: the previous export in {out_dir} ({manifest_path}) is of "
            f"{describe_source(manifest.get('source'))}, but the config asks for {describe_source(desc)}. "
            "--since-last continues the same table or query into the same directory. Set postgres.table / "
            "postgres.query and the column names back to those of the previous export, or export the other "
            "source into another postgres.output without --since-last. Nothing was written."
        )
    if manifest.get("id_type") != "int64":
        raise InputError(integer_ids_message(manifest_path, desc, manifest.get("id_type")))
    return manifest


def integer_ids_message(where: str | None, desc: dict[str, Any], id_type: Any) -> str:
    what = f"the query {desc.get('query')!r}" if desc.get("query") else f"table {desc.get('table')!r}"
    kind = "text" if id_type in ("string", "text", "varchar", "bpchar") else id_type
    return (f"--since-last: {where + ': ' if where else ''}the id column {desc.get('id_column')!r} of {what} holds "
            f"{kind} ids; --since-last needs an integer id column (smallint, integer or bigint), because the new "
            "rows are those whose id is above the highest id exported so far. Export an integer key (e.g. a bigserial column, or `SELECT "
            "seq_id AS id, ...` in postgres.query, into a new postgres.output), or re-export the whole table "
            "without --since-last. Nothing was written.")


def start_manifest(manifest: dict | None, manifest_path: str, desc: dict[str, Any], id_type: str,
                   vector_type: str) -> dict:
    """A new manifest, or `manifest` after checking that the source still has the types it was started with."""
    if manifest is None:
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "source": desc,
                "id_type": id_type, "vector_type": vector_type, "d": None, "rows": 0,
                "null_vectors": 0, "null_ids": 0, "resume_after": None, "complete": False,
                "shards": [], "exports": []}
    if manifest.get("id_type") != id_type or manifest.get("vector_type") != vector_type:
        raise StoreError(
            f"{manifest_path}: the export was started with id type {manifest.get('id_type')} and vector "
            f"type {manifest.get('vector_type')}; the source now has {id_type} and {vector_type}. Delete "
            "the output directory to export again."
        )
    return manifest


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def exports(manifest: dict) -> list[dict]:
    """The manifest's export entries; for a manifest written before they were recorded, one entry holding all
    its shards (written to the manifest with the next change)."""
    if "exports" not in manifest:
        shards = manifest.get("shards") or []
        manifest["exports"] = [{
            "export": 0, "after_id": None, "first_id": shards[0]["first_id"] if shards else None,
            "last_id": shards[-1]["last_id"] if shards else None, "rows": int(manifest.get("rows", 0)),
            "null_vectors": int(manifest.get("null_vectors", 0)), "files": [s["file"] for s in shards],
            "started": None, "finished": None, "complete": bool(manifest.get("complete"))}] if shards else []
    return manifest["exports"]


def begin_export(manifest: dict) -> tuple[dict, bool]:
    """The export entry this run fills: the last one when an interrupted export left it incomplete (resumed:
    True), else a new one for the rows after the highest id exported so far (not yet written)."""
    entries = exports(manifest)
    if entries and not entries[-1].get("complete"):
        return entries[-1], True
    entry = {"export": len(entries), "after_id": manifest.get("resume_after"), "first_id": None, "last_id": None,
             "rows": 0, "null_vectors": 0, "files": [], "started": _now(), "finished": None, "complete": False}
    entries.append(entry)
    return entry, False


def record_shard(entry: dict, shard: dict | None, null_vectors: int) -> None:
    """Add a finished shard (None: a page of NULL vectors only, no file) to the export entry."""
    entry["null_vectors"] = int(entry.get("null_vectors", 0)) + int(null_vectors)
    if shard is None:
        return
    entry["files"].append(shard["file"])
    entry["rows"] = int(entry.get("rows", 0)) + int(shard["rows"])
    if entry.get("first_id") is None:
        entry["first_id"] = shard["first_id"]
    entry["last_id"] = shard["last_id"]


def finish_export(entry: dict) -> None:
    entry["finished"] = _now()
    entry["complete"] = True


def write_json_atomic(path: str, data: dict) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def read_manifest(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: cannot read the export manifest ({exc}). Delete the output directory "
                         "to start the export again.") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("shards"), list):
        raise StoreError(f"{path} is not a pqgpu PostgreSQL export manifest. Choose another postgres.output.")
    if m.get("version") != MANIFEST_VERSION:
        raise StoreError(f"{path}: manifest version {m.get('version')} is not supported (expected "
                         f"{MANIFEST_VERSION}). Delete the output directory to export again.")
    return m


def cleanup_strays(out_dir: str, n_shards: int) -> None:
    """Remove temp files and shards beyond the manifest (left by an interrupted run)."""
    for f in os.listdir(out_dir):
        m = SHARD_RE.match(f)
        stray_tmp = f.startswith(".part-") and ".parquet.tmp-" in f
        if stray_tmp or (m and int(m.group(1)) >= n_shards):
            try:
                os.unlink(os.path.join(out_dir, f))
                log.debug("Removed %s left by an interrupted export", f)
            except OSError:
                pass


def recorded_shards(paths: Iterable[str]) -> list[str]:
    """`paths` without the shard files of a pqgpu export directory that its manifest does not name: those were
    renamed into place by an export that was killed (or is still running) before it recorded them, and the next
    export deletes and writes them again, so encoding them would record a file that is about to change. Paths in
    other directories pass unchanged; InputError when no shard is left."""
    paths = list(paths)
    named: dict[str, set[str] | None] = {}
    kept, left_out = [], []
    for p in paths:
        if "://" in p and not p.startswith("file://"):
            kept.append(p)
            continue
        folder, name = os.path.split(p)
        if folder not in named:
            named[folder] = _manifest_files(folder)
        if named[folder] is None or name in named[folder] or not SHARD_RE.match(name):
            kept.append(p)
        else:
            left_out.append(p)
    if left_out:
        log.warning("%s: left out %d shard file(s) that its %s does not name yet (%s): an export into that "
                    "directory is running or was interrupted; re-run `pqgpu export-postgres` to finish it",
                    os.path.dirname(left_out[0]), len(left_out), MANIFEST_NAME,
                    ", ".join(os.path.basename(p) for p in left_out[:3]) + (" ..." if len(left_out) > 3 else ""))
        if not kept:
            raise InputError(f"{os.path.dirname(left_out[0])}: its {MANIFEST_NAME} names none of the shards "
                             f"{', '.join(os.path.basename(p) for p in left_out[:3])}: the export writing them was "
                             "interrupted before its first shard was recorded. Re-run `pqgpu export-postgres`.")
    return kept


def _manifest_files(folder: str) -> set[str] | None:
    """The shard files a pqgpu export manifest in `folder` names; None when there is none, or another tool's
    file of that name (the files are then taken as listed), or one that cannot be read (likewise, with a warning:
    the next export says what is wrong with it)."""
    path = os.path.join(folder, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: cannot read the export manifest (%s); reading every shard file of the directory", path, exc)
        return None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("shards"), list):
        return None
    return {s["file"] for s in m["shards"] if isinstance(s, dict) and "file" in s}
