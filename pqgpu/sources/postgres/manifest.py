"""The export's resume record: ``<output>/_manifest.json``, written atomically after every shard.

It names the source (table or query, id and vector columns), the id and vector types, every finished
shard with its row count and last id, and the id to resume after; a re-run continues after the last
complete shard (and picks up rows appended since). Shard files beyond the manifest and temporary files
are left by an interrupted run and are removed before exporting again.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from ...errors import StoreError

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
            f"{manifest_path} records an export of {manifest.get('source')}, not of {desc}. Choose another "
            "postgres.output, or delete that directory to export again."
        )
    return manifest


def start_manifest(manifest: dict | None, manifest_path: str, desc: dict[str, Any], id_type: str,
                   vector_type: str) -> dict:
    """A new manifest, or `manifest` after checking that the source still has the types it was started with."""
    if manifest is None:
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "source": desc,
                "id_type": id_type, "vector_type": vector_type, "d": None, "rows": 0,
                "null_vectors": 0, "null_ids": 0, "resume_after": None, "complete": False,
                "shards": []}
    if manifest.get("id_type") != id_type or manifest.get("vector_type") != vector_type:
        raise StoreError(
            f"{manifest_path}: the export was started with id type {manifest.get('id_type')} and vector "
            f"type {manifest.get('vector_type')}; the source now has {id_type} and {vector_type}. Delete "
            "the output directory to export again."
        )
    return manifest


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
