"""The source a store records in its attrs: reopened for reading its rows back, refused when it changed.

`check_source_unchanged` is the one place that compares what a store recorded about its source (its
fingerprint, pqgpu.sources.fingerprint) with the files as they are now; readers of original vectors
(pqgpu.refine) go through it.
"""

from __future__ import annotations

import json
from typing import Any

from ..config import SourceConfig
from ..errors import InputError
from . import Source, open_source
from .fingerprint import VERSION, compare

HOW_TO_FIX = ("--refine re-ranks with the vectors that were encoded, so they must be unchanged: restore the file, "
              "re-encode the store from the source as it is now (`pqgpu run ...`), or search without --refine.")


def recorded_source_config(store: Any) -> SourceConfig:
    """The SourceConfig that lists exactly the files a store was encoded from: their canonical paths when the
    fingerprint records them (so neither the working directory nor files added since matter), else the
    recorded source.path."""
    rec = store.attrs.get("source") or {}
    if not isinstance(rec, dict) or not rec.get("format") or not rec.get("path"):
        raise InputError(f"Store {store.path} records no source it was encoded from (attrs 'source' is {rec!r}), so "
                         "--refine cannot read the original vectors back. Search without --refine, or re-encode the "
                         "store with `pqgpu run`.")
    path, id_column = rec["path"], rec.get("id_column")
    files = rec.get("files") or []
    if rec.get("version") == VERSION and files:
        path = [e["path"] for e in files]
        if rec["format"] == "npy" and id_column:
            id_column = [e["ids"]["path"] for e in files if e.get("ids")]
    return SourceConfig(format=rec["format"], path=path, id_column=id_column,
                        vector_column=rec.get("vector_column") or "embedding")


def _exists(path: str) -> bool:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return bool(fs.exists(root))


def check_source_unchanged(store: Any) -> Source:
    """Open the files a store was encoded from and check they are what was encoded (the same files, rows,
    dimension and stamps as its fingerprint records). InputError naming the first file gone or changed."""
    cfg = recorded_source_config(store)
    rec = store.attrs["source"]
    where = f"Store {store.path} was encoded from the {cfg.format} source {rec['path']!r}"
    if isinstance(cfg.path, list):  # the recorded files themselves: name the first one that is gone
        gone = next((p for p in cfg.path + list(cfg.id_column if isinstance(cfg.id_column, list) else [])
                     if not _exists(p)), None)
        if gone is not None:
            raise InputError(f"{where}, but its file {gone} is gone. {HOW_TO_FIX}")
    try:
        source = open_source(cfg)
    except InputError as exc:
        raise InputError(f"{where}, which cannot be read now: {exc} {HOW_TO_FIX}") from None
    now = json.loads(json.dumps(source.fingerprint()))  # tuples -> lists, as the attrs hold them
    if isinstance(cfg.path, list):  # listed by file: the recorded globs stand (each file's entry is compared)
        now["path"], now["id_column"] = rec["path"], rec.get("id_column")
    diff = compare(rec, now)
    if diff.refused:
        raise InputError(f"{where}, but {diff.refused}. {HOW_TO_FIX}")
    if diff.changed:
        names = ", ".join(source.shards[i].path for i in diff.changed[:3])
        more = f" and {len(diff.changed) - 3} more" if len(diff.changed) > 3 else ""
        raise InputError(f"{where}, but {len(diff.changed)} of its files changed since (size, modification time or "
                         f"content tag differ): {names}{more}. {HOW_TO_FIX}")
    if diff.added:  # only a legacy fingerprint's source.path can list files that were not encoded
        raise InputError(f"{where}, but it now also lists {diff.added[0]}, which was not encoded. {HOW_TO_FIX}")
    if source.n != store.n:
        raise InputError(f"{where}, which has {source.n} rows now, but the store holds {store.n}. {HOW_TO_FIX}")
    return source
