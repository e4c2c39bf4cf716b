"""The source a store records in its attrs: reopened for reading its rows back, refused when it changed.

`check_source_unchanged` is the one place that compares what a store recorded about its source with the
files as they are now; readers of original vectors (pqgpu.refine) go through it.
"""

from __future__ import annotations

import json
from typing import Any

from ..config import SourceConfig
from ..errors import InputError
from . import Source, open_source

HOW_TO_FIX = ("--refine re-ranks with the vectors that were encoded, so they must be unchanged: restore the file, "
              "re-encode the store from the source as it is now (`pqgpu run ... --overwrite`), or search without "
              "--refine.")


def recorded_source_config(store: Any) -> SourceConfig:
    """The SourceConfig a store was encoded from (its `source` attribute)."""
    rec = store.attrs.get("source") or {}
    if not isinstance(rec, dict) or not rec.get("format") or not rec.get("path"):
        raise InputError(f"Store {store.path} records no source it was encoded from (attrs 'source' is {rec!r}), so "
                         "--refine cannot read the original vectors back. Search without --refine, or re-encode the "
                         "store with `pqgpu run`.")
    return SourceConfig(format=rec["format"], path=rec["path"], id_column=rec.get("id_column"),
                        vector_column=rec.get("vector_column") or "embedding")


def check_source_unchanged(store: Any) -> Source:
    """Open the source a store was encoded from and check it is what was encoded: the same files, rows,
    dimension and file stamps as the store recorded. InputError naming the first file gone or changed."""
    cfg = recorded_source_config(store)
    rec = store.attrs["source"]
    where = f"Store {store.path} was encoded from {cfg.format} source {cfg.path!r}"
    try:
        source = open_source(cfg)
    except InputError as exc:
        raise InputError(f"{where}, which cannot be opened now: {exc} {HOW_TO_FIX}") from None
    now = json.loads(json.dumps(source.fingerprint()))  # tuples -> lists, as the attrs hold them
    then = {f[0]: f for f in rec.get("files", [])}
    current = {f[0]: f for f in now["files"]}
    full = {s.path.rstrip("/").rsplit("/", 1)[-1]: s.path for s in source.shards}
    for name, entry in then.items():
        if name not in current:
            raise InputError(f"{where}, but its file {name} is gone (no longer listed under {cfg.path!r}). "
                             f"{HOW_TO_FIX}")
        if current[name] != entry:
            raise InputError(f"{where}, but its file {full.get(name, name)} changed since: recorded "
                             f"(name, rows, stamp) {entry}, now {current[name]}. {HOW_TO_FIX}")
    extra = [name for name in current if name not in then]
    if extra:
        raise InputError(f"{where}, but the source now also lists {full.get(extra[0], extra[0])}, which was not "
                         f"encoded, so store rows no longer match source rows. {HOW_TO_FIX}")
    if [f[0] for f in now["files"]] != [f[0] for f in rec.get("files", [])] or now["n"] != rec.get("n") \
            or now["d"] != rec.get("d"):
        raise InputError(f"{where}, but its files, rows or dimension differ now (n {rec.get('n')} -> {now['n']}, "
                         f"d {rec.get('d')} -> {now['d']}). {HOW_TO_FIX}")
    if source.n != store.n:
        raise InputError(f"{where}, which has {source.n} rows now, but the store holds {store.n}. {HOW_TO_FIX}")
    return source
