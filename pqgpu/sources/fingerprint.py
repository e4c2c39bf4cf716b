"""Source fingerprints that mean what they say: the set of files a store was made from, each by its canonical
path (or URL), row count, size, modification time and, where the file system offers one cheaply, a content tag.

The spelling of `source.path` does not matter (`data`, `data/`, `data/*.parquet` and an absolute path name the
same files), while a rewrite in place does:
- plain files (Parquet, .npy and the ids .npy beside one): size and mtime in nanoseconds; on object stores
  also the ETag (a content hash the store keeps for free);
- Zarr groups, whose directory says nothing of its chunks: the size and mtime (or ETag) of every chunk file of
  the vector and id arrays and a sha256 of their metadata documents, folded into one tag.

`compare` says what differs between a recorded fingerprint and today's: nothing; files whose contents changed
with the same row count (their chunks can be encoded again, keeping the rest); or a change resume cannot
follow (files added, removed, renamed, resized; another format, column or dimension), with a message naming
the files and the ways out.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

VERSION = 2
_NAMED = 5  # files named in one message at most


def canonical(path: str) -> str:
    """An absolute, symlink-free local path, or a URL as fsspec spells it (protocol://bucket/key)."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" in path:
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        return f"{protocol}://{root.rstrip('/')}"
    return os.path.realpath(os.path.abspath(path))


def _remote_info(path: str) -> dict[str, Any]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return fs.info(root)


def _etag(info: dict[str, Any]) -> str:
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("md5") or ""
    return str(tag).strip('"')


def _mtime(info: dict[str, Any]) -> str:
    return str(info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created") or "")


def file_entry(path: str) -> dict[str, Any]:
    """{path, size, mtime, tag} of one plain file."""
    if "://" in path and not path.startswith("file://"):
        info = _remote_info(path)
        return {"path": canonical(path), "size": int(info.get("size") or 0), "mtime": _mtime(info), "tag": _etag(info)}
    st = os.stat(path[len("file://"):] if path.startswith("file://") else path)
    return {"path": canonical(path), "size": int(st.st_size), "mtime": str(st.st_mtime_ns), "tag": ""}


def zarr_entry(path: str, arrays: Sequence[str]) -> dict[str, Any]:
    """{path, size, mtime, tag} of a Zarr group: the listing of the given arrays' files (size and mtime or
    ETag of each chunk) and the hash of every metadata document among them, in one sha256."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    h = hashlib.sha256(b"pqgpu-zarr-source-v1")
    size = 0
    newest = ""
    names: dict[str, dict[str, Any]] = {}
    for meta in ("zarr.json", ".zgroup", ".zattrs"):  # the group's own metadata (v3, v2)
        if fs.exists(f"{root}/{meta}"):
            names[meta] = fs.info(f"{root}/{meta}")
    for name in arrays:
        try:
            found = fs.find(f"{root}/{name}", detail=True)
        except FileNotFoundError:
            continue
        for p, info in found.items():
            names[p[len(root) + 1:]] = info
    for rel in sorted(names):
        info = names[rel]
        full = f"{root}/{rel}"
        local = fs.protocol in ("file", "local") or (isinstance(fs.protocol, tuple) and "file" in fs.protocol)
        if local:
            st = os.stat(full)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
            mt = str(st.st_mtime_ns).rjust(24, "0")
            nbytes = st.st_size
        else:
            nbytes = int(info.get("size") or 0)
            stamp = f"{nbytes}:{_mtime(info)}:{_etag(info)}"
            mt = _mtime(info)
        if rel.rsplit("/", 1)[-1] in ("zarr.json", ".zarray", ".zattrs", ".zgroup"):
            with fs.open(full, "rb") as f:  # small documents: the shape, dtype, codecs and attributes
                stamp += ":" + hashlib.sha256(f.read()).hexdigest()
        h.update(f"{rel}\0{stamp}\n".encode())
        size += nbytes
        newest = max(newest, mt)
    return {"path": canonical(path), "size": size, "mtime": newest.lstrip("0") or "0", "tag": h.hexdigest()}


def shard_entry(fmt: str, shard: Any, cfg: Any) -> dict[str, Any]:
    """The fingerprint entry of one shard (see pqgpu.sources.Shard): its rows and what identifies its bytes."""
    if fmt == "zarr":
        entry = zarr_entry(shard.path, [c for c in (cfg.vector_column, cfg.id_column) if c])
    else:
        entry = file_entry(shard.path)
        if fmt == "npy" and shard.extra is not None:  # the ids file paired with this shard
            ids = file_entry(shard.extra[0])
            entry["ids"] = ids
    entry["rows"] = int(shard.n_rows)
    return entry


def fingerprint(source: Any) -> dict[str, Any]:
    """What the store records of its source (Source.fingerprint)."""
    cfg = source.cfg
    return {"version": VERSION, "format": cfg.format, "path": cfg.path, "id_column": cfg.id_column,
            "vector_column": cfg.vector_column, "n": source.n, "d": source.d,
            "files": [shard_entry(cfg.format, s, cfg) for s in source.shards]}


@dataclass
class Comparison:
    """What differs between the recorded fingerprint and today's."""

    refused: str | None = None  # why resume cannot follow (a sentence naming the files), or None
    changed: list[int] = field(default_factory=list)  # shards (today's order) whose contents changed, same rows
    added: list[str] = field(default_factory=list)  # files new since the store was made (at the end)
    upgraded: bool = False  # the recorded fingerprint is of an older kind; today's one replaces it

    @property
    def same(self) -> bool:
        return self.refused is None and not self.changed and not self.added


def _names(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:_NAMED])
    return shown + (f" and {len(paths) - _NAMED} more" if len(paths) > _NAMED else "")


def _stamp(entry: dict[str, Any]) -> tuple:
    ids = entry.get("ids") or {}
    return (entry.get("size"), entry.get("mtime"), entry.get("tag"), ids.get("path"), ids.get("size"),
            ids.get("mtime"), ids.get("tag"))


def compare(recorded: dict[str, Any] | None, now: dict[str, Any]) -> Comparison:
    """How today's fingerprint `now` relates to the `recorded` one."""
    if not recorded:
        return Comparison(refused="it records no source")
    if recorded.get("version") != VERSION:
        return _compare_legacy(recorded, now)
    for key, what in (("format", "source.format"), ("vector_column", "source.vector_column"),
                      ("id_column", "source.id_column"), ("d", "the vector dimension")):
        if recorded.get(key) != now.get(key):
            return Comparison(refused=f"it was made from a source with {what} {recorded.get(key)!r}, the source now "
                                      f"has {now.get(key)!r}")
    old = {e["path"]: (i, e) for i, e in enumerate(recorded["files"])}
    new_paths = [e["path"] for e in now["files"]]
    gone = [p for p in old if p not in set(new_paths)]
    if gone:
        return Comparison(refused=f"{len(gone)} file(s) it was made from are gone or renamed: {_names(gone)}")
    order = [old[p][0] for p in new_paths if p in old]
    if order != sorted(order) or new_paths[:len(old)] != list(old):
        added_mid = [p for p in new_paths[:len(old)] if p not in old]
        return Comparison(refused=(f"new files sort among the ones it was made from ({_names(added_mid)}), which "
                                   "would move every row after them" if added_mid else
                                   "its files are now listed in another order"))
    resized = [f"{p} had {old[p][1]['rows']} rows and now has {e['rows']}" for p, e in zip(new_paths, now["files"])
               if p in old and old[p][1]["rows"] != e["rows"]]
    if resized:
        return Comparison(refused="the row count of a file it was made from changed: " + "; ".join(resized[:_NAMED]))
    changed = [i for i, (p, e) in enumerate(zip(new_paths, now["files"])) if p in old and _stamp(old[p][1]) != _stamp(e)]
    return Comparison(changed=changed, added=new_paths[len(old):])


def _compare_legacy(recorded: dict[str, Any], now: dict[str, Any]) -> Comparison:
    """A fingerprint of format 1 (basename, rows, size, mtime as a float string; Zarr: shape and chunking):
    unchanged when every file matches by name and rows (and size where it was recorded); then today's,
    stronger fingerprint replaces it."""
    files = recorded.get("files") or []
    now_files = now["files"]
    if (recorded.get("format"), recorded.get("vector_column"), recorded.get("id_column"), recorded.get("d")) != \
            (now["format"], now["vector_column"], now["id_column"], now["d"]) or len(files) != len(now_files):
        return Comparison(refused="the source changed since it was made (files, columns or dimension differ)")
    for old, e in zip(files, now_files):
        name, rows = old[0], old[1]
        if name != os.path.basename(e["path"]) or rows != e["rows"] or \
                (now["format"] != "zarr" and len(old) > 3 and (str(old[2]) != str(e["size"]) or
                                                              not _same_seconds(old[3], e["mtime"]))):
            return Comparison(refused=f"the source changed since it was made ({name} differs)")
    return Comparison(upgraded=True)


def _same_seconds(old: Any, mtime_ns: str) -> bool:
    try:
        return abs(float(old) - int(mtime_ns) / 1e9) < 1e-3
    except (TypeError, ValueError):  # a remote store's timestamp string: compare as written
        return str(old) == str(mtime_ns)


def chunks_of_shards(recorded_files: Sequence[dict[str, Any]], shards: Sequence[int], chunk_rows: int) -> list[int]:
    """Encode chunks that hold rows of the given shards (row ranges from the recorded row counts)."""
    starts = [0]
    for e in recorded_files:
        starts.append(starts[-1] + int(e["rows"]))
    out: set[int] = set()
    for s in shards:
        lo, hi = starts[s], starts[s + 1]
        if hi > lo:
            out.update(range(lo // chunk_rows, (hi - 1) // chunk_rows + 1))
    return sorted(out)
