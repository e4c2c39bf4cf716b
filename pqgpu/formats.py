"""Which source format a path names: by its extension, or for a local directory by the files in it.

Below both pqgpu.config (a config without source.format takes it from source.path) and pqgpu.sources
(directory listing), so neither imports the other for it.
"""

from __future__ import annotations

import os

from .errors import ConfigError

SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".npy": "npy", ".zarr": "zarr"}
# What `pqgpu make-sample` writes beside its shards: never a shard of a directory SOURCE.
COMPANIONS = ("queries.npy",)


def kind_of(path: str) -> str | None:
    p = path.rstrip("/").lower()
    return next((f for s, f in SUFFIXES.items() if p.endswith(s)), None)


def _is_local_dir(path: str) -> bool:
    return "://" not in path and not any(ch in path for ch in "*?[") and os.path.isdir(path)


def directory_kinds(path: str) -> dict[str, list[str]]:
    """{format: entry names} of a local directory's shard-like entries (hidden files and COMPANIONS left out)."""
    kinds: dict[str, list[str]] = {}
    for name in sorted(os.listdir(path)):
        kind = kind_of(name)
        if kind and not name.startswith(".") and name not in COMPANIONS:
            kinds.setdefault(kind, []).append(name)
    return kinds


def subdirectory_hint(path: str) -> str:
    """For a local directory without shards of its own: ' Its subdirectories hold ...: give one ...', or ''."""
    if not _is_local_dir(path):
        return ""
    found = []  # (subdirectory, {kind: names})
    for name in sorted(os.listdir(path)):
        sub = os.path.join(path, name)
        if os.path.isdir(sub) and not name.startswith(".") and kind_of(name) is None:
            kinds = directory_kinds(sub)
            if kinds:
                found.append((sub, kinds))
    if not found:
        return ""
    example, kinds = next((f for f in found if os.path.basename(f[0]) == "train"), found[0])
    suffix = {"parquet": ".parquet", "npy": ".npy", "zarr": ".zarr"}[next(iter(kinds))]
    listed = "; ".join(f"{sub} ({', '.join(f'{len(v)} {k}' for k, v in kinds.items())})" for sub, kinds in found[:5])
    return (f" pqgpu does not search subdirectories (a split layout such as train/ and test/ would mix them); "
            f"these hold shards: {listed}{' ...' if len(found) > 5 else ''}. Give one of them, e.g. {example}, or a "
            f"glob such as {os.path.join(path, '*', '*' + suffix)}.")


def infer_format(paths: str | list[str] | tuple[str, ...], *, key: str | None = None) -> str | None:
    """The source format the paths' extensions name (a local directory: the one kind of shard it holds,
    make-sample's queries.npy aside). None when that is missing or ambiguous; with `key` (the config key or
    argument the paths came from) a ConfigError that says why and how to fix it instead."""
    if isinstance(paths, str):
        paths = [paths]
    found: dict[str, str] = {}
    for path in paths:
        kind = kind_of(path)
        why, hint = f"{path!r} has no .parquet, .pq, .npy or .zarr extension", ""
        if kind is None and _is_local_dir(path.rstrip("/")):
            kinds = directory_kinds(path.rstrip("/"))
            if len(kinds) == 1:
                kind = next(iter(kinds))
            elif kinds:
                why = (f"directory {path} holds several kinds of files ("
                       + "; ".join(f"{len(v)} {k}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}"
                                   for k, v in kinds.items()) + ")")
            else:
                why = f"directory {path} holds no .parquet, .npy or .zarr files of its own"
                hint = subdirectory_hint(path.rstrip("/"))
        if kind is None:
            if key is None:
                return None
            raise ConfigError(f"Cannot tell the source format from {key}: {why}." + (hint or " Give the format: "
                              "--format parquet|npy|zarr (or source.format), or a path or glob with the extension, "
                              "e.g. data/*.parquet."))
        found.setdefault(kind, path)
    if len(found) > 1:
        if key is None:
            return None
        raise ConfigError(f"{key} mixes formats ({', '.join(f'{k}: {p}' for k, p in found.items())}); one source "
                          "has one format. Give the files of one format only.")
    return next(iter(found)) if found else None
