"""The Zarr v3 code store (DESIGN §5): codes, ids, per-chunk done flags and the codebook, in one group.

Chunks of `codes`, `ids` and `done` line up with encode tasks, so no two tasks ever write the same
Zarr chunk, and a chunk's done flag is set only after its codes and ids are on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import zarr

from . import _fs
from . import integrity
from .integrity import Layout, layouts  # noqa: F401 (re-exported: store.layouts)
from .integrity import stored_keys as _stored_keys
from ._faults import fault_point
from .codebook import Codebook
from .errors import StoreError

log = logging.getLogger(__name__)

# 2: CRC-32C per array and chunk (codes, ids, lists, the inverted arrays; pqgpu.integrity), canonical source
# fingerprints. Stores of format 1 (one zlib CRC-32 over codes and ids per chunk) are read and verified as before.
FORMAT_VERSION = 2
# Rows per Zarr chunk of the inverted IVF arrays (ivf/codes, ivf/rows, ivf/ids) at most.
MAX_IVF_CHUNK_ROWS = 16384


def versions() -> dict[str, str]:
    import numpy

    from . import __version__

    out = {"pqgpu": __version__, "numpy": numpy.__version__, "zarr": zarr.__version__}
    faiss_version = _faiss_version()
    if faiss_version:
        out["faiss"] = faiss_version
    return out


def _faiss_version() -> str | None:
    """faiss's version from the installed package's metadata: importing faiss only to read it costs a second
    and logs its loader's messages."""
    import sys
    from importlib import metadata

    if "faiss" in sys.modules:
        return getattr(sys.modules["faiss"], "__version__", None)
    for dist in ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


@dataclass
class CodeStore:
    """An opened code store. Arrays are zarr.Array objects; read them with slicing."""

    path: str
    group: Any
    # A writer's view: the rows it is writing (an append: more than the committed `n`) and the done flags as
    # they are. None: a reader's view, bounded by the committed state (the root attrs `n` and `generations`).
    writing: int | None = None

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def codes(self) -> Any:
        return self.group["codes"]

    @property
    def ids(self) -> Any:
        return self.group["ids"]

    @property
    def done(self) -> Any:
        return self.group["done"]

    @property
    def n(self) -> int:
        return int(self.group.attrs["n"]) if self.writing is None else int(self.writing)

    @property
    def chunk_rows(self) -> int:
        return int(self.group.attrs["chunk_rows"])

    @property
    def n_chunks(self) -> int:
        return max(1, -(-self.n // self.chunk_rows))

    def done_flags(self) -> np.ndarray:
        """The done flag of each chunk: as stored for a writer; for a reader of a store with a committed
        generation every chunk (that generation was complete when committed, and an append under way
        rewrites the flag of the last chunk it completes)."""
        if self.writing is None and self.group.attrs.get("generations"):
            return np.ones(self.n_chunks, bool)
        return integrity.whole(self.done)[:self.n_chunks]  # one batch of its tiny chunk files

    def chunk_range(self, i: int) -> tuple[int, int]:
        return i * self.chunk_rows, min(self.n, (i + 1) * self.chunk_rows)

    def codebook(self, *, check: bool = True) -> Codebook:
        """The store's codebook, checked against the codebook_sha256 recorded when the store was made
        (StoreError naming the way out when it differs; check=False for the repair that restores it)."""
        a = self.attrs
        cb = self.group["codebook"]
        try:
            rotation = cb["rotation"][...] if "rotation" in cb else None
            if "coarse" in cb:  # IVF store
                from .ivf import IvfCodebook

                out: Codebook = IvfCodebook(int(a["d"]), int(a["M"]), int(a["nbits"]), cb["centroids"][...],
                                            rotation, self.metric, coarse=cb["coarse"][...])
            else:
                out = Codebook(int(a["d"]), int(a["M"]), int(a["nbits"]), cb["centroids"][...], rotation,
                               self.metric)
        except StoreError:
            raise
        except Exception as exc:  # a missing or undecodable codebook node
            if not check:
                raise
            raise StoreError(integrity.codebook_problem(self.path, a.get("codebook_sha256"), "unreadable") or
                             f"{self.path}: the codebook cannot be read ({exc}).") from None
        if check and integrity.ENABLED:
            problem = integrity.codebook_problem(self.path, a.get("codebook_sha256"), out.fingerprint())
            if problem:
                raise StoreError(problem)
        return out

    def codebook_problem(self) -> str | None:
        """None when the codebook is the one recorded, else what is wrong (for verify and info)."""
        try:
            cb = self.codebook(check=False)
        except Exception as exc:
            return f"{self.path}: the codebook cannot be read ({exc})"
        return integrity.codebook_problem(self.path, self.attrs.get("codebook_sha256"), cb.fingerprint())

    def checker(self) -> Any:
        """The recorded CRCs of codes, ids (and lists) per chunk, for readers to check what they read (None
        for a store of format 1: its one CRC over codes and ids together is checked by verify and resume)."""
        if "_checker" not in self.__dict__:  # loaded once per opened store (one small read per chunk)
            family = integrity.chunk_family(self.group)
            family = integrity.chunk_family(self.group, self.n)
            self.__dict__["_checker"] = None if family is None else integrity.Checker(self.path, self.group, family)
        return self.__dict__["_checker"]

    @property
    def metric(self) -> str:
        """l2, ip or cosine (pqgpu.metric); stores made before metrics existed are l2."""
        return str(self.group.attrs.get("metric", "l2"))

    def pending_chunks(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done_flags())]

    @property
    def has_checksums(self) -> bool:
        """False for stores written by a pqgpu without per-chunk checksums."""
        return "checksums" in self.group

    def missing_chunks(self, chunks: list[int] | None = None) -> dict[int, str]:
        """Chunks (default: the done ones) whose codes or ids chunk object is absent: {chunk: reason}.
        One listing of each array's keys: cheap enough for every search and export."""
        if chunks is None:
            chunks = [int(i) for i in np.flatnonzero(self.done_flags())]
        out: dict[int, str] = {}
        for name in ("codes", "ids"):
            arr = self.group[name]
            present = _stored_keys(arr)
            for i in chunks:
                lo, hi = self.chunk_range(i)
                key = arr.metadata.encode_chunk_key((i, 0) if arr.ndim == 2 else (i,))
                if hi > lo and key not in present:
                    out.setdefault(i, f"{name}/{key} is missing")
        return out

    def check_chunks_present(self) -> None:
        """StoreError naming the done chunks whose files are gone, instead of reading Zarr fill values."""
        missing = self.missing_chunks()
        if missing:
            raise StoreError(f"Store {self.path} has lost data: {_describe(self, missing)}. Reading it would "
                             "return fill values. Run `pqgpu encode` with the same config to re-encode those "
                             f"chunks (or `pqgpu verify {self.path}` for a full check).")

    def verify(self, chunks: list[int] | None = None, *, layout: bool = True) -> VerifyReport:
        """Check without writing: the done chunks (or `chunks`) of codes, ids and lists are present, readable
        and equal to their recorded checksums; with layout=True also the codebook and an IVF store's
        inverted layout (pqgpu.integrity)."""
        done = self.done_flags()
        if chunks is None:
            chunks = [int(i) for i in np.flatnonzero(done)]
        bad = self.missing_chunks(chunks)
        family = integrity.chunk_family(self.group, self.n)
        legacy = self.group["checksums"][...] if family is None and self.has_checksums else None
        if family is not None:
            for name, c, why, _ in integrity.verify_family(self.path, self.group, family,
                                                           [i for i in chunks if i not in bad]):
                bad.setdefault(c, f"{name} {why}")
        elif legacy is not None:
            for i in chunks:
                if i in bad:
                    continue
                lo, hi = self.chunk_range(i)
                try:
                    got = chunk_checksum(self.codes[lo:hi], self.ids[lo:hi])
                except Exception as exc:  # a damaged compressed chunk fails to decode
                    bad[i] = f"unreadable ({type(exc).__name__}: {exc})"
                    continue
                if got != int(legacy[i]):
                    bad[i] = f"checksum mismatch (recorded {int(legacy[i]):08x}, stored data gives {got:08x})"
        report = VerifyReport(checked=len(chunks), bad=dict(sorted(bad.items())),
                              checksums=family is not None or legacy is not None, not_done=int((~done).sum()))
        if layout:
            report.codebook = self.codebook_problem()
            if is_ivf_store(self):
                report.layout_state, report.layout = integrity.verify_layout(self)
        return report

    def is_complete(self) -> bool:
        """Every chunk of codes (and ids, lists) is encoded; for an IVF store see also layout_state()."""
        return bool(self.done_flags().all())

    def info(self) -> dict[str, Any]:
        a = self.attrs
        done = self.done_flags()
        nbytes = _fs.tree_bytes(self.path)
        missing = sorted(self.missing_chunks([int(i) for i in np.flatnonzero(done)]))
        codes_state = ("complete" if done.all() and not missing else
                       f"{len(missing)} done chunk(s) missing" if missing else
                       f"{int(done.sum())}/{int(done.size)} chunks encoded")
        layout = None
        if is_ivf_store(self):
            layout = integrity.layout_state(self)
        codebook = self.codebook_problem()
        complete = bool(done.all()) and not missing and codebook is None and (layout in (None, "built"))
        return {
            "path": self.path, "n": a["n"], "d": a["d"], "M": a["M"], "nbits": a["nbits"],
            "code_size": a["code_size"], "opq": "rotation" in self.group["codebook"], "metric": self.metric,
            "chunk_rows": a["chunk_rows"], "chunks_done": int(done.sum()) - len(missing), "chunks": int(done.size),
            "chunks_missing": missing,
            "complete": complete, "codes": codes_state, "layout": layout,
            "codebook": "intact" if codebook is None else "damaged", "codebook_sha256": a["codebook_sha256"],
            "ids_dtype": str(self.ids.dtype), "store_bytes": nbytes,
            "raw_float32_bytes": int(a["n"]) * int(a["d"]) * 4,
            "compression_ratio": round(4 * int(a["d"]) / int(a["code_size"]), 2),
            "source": a.get("source"), "created_by": a.get("created_by"), "nlist": int(a.get("nlist", 0)),
            "format_version": int(a.get("format_version", 1)),
            "generations": a.get("generations") or [], "segments": _segments(self),
            "postgres_writeback": a.get("postgres_writeback") or [],
            "append": "interrupted or running (run the same `--append` command to finish it)" if a.get("appending")
            else None,
        }


@dataclass
class VerifyReport:
    checked: int  # done chunks checked
    bad: dict[int, str] = field(default_factory=dict)  # chunk -> what is wrong with its codes, ids or lists
    checksums: bool = True  # False: an older store, checked for presence only
    not_done: int = 0  # chunks not encoded yet (not damage)
    codebook: str | None = None  # what is wrong with the codebook
    layout_state: str | None = None  # IVF: built | building (...) | not built | damaged
    layout: list = field(default_factory=list)  # IVF: (array, chunk, why, (row lo, row hi)) damaged

    @property
    def ok(self) -> bool:
        return not self.bad and self.codebook is None and not self.layout and \
            (self.layout_state in (None, "built") or self.not_done > 0)


# Format 1's per-chunk checksum (format 2: pqgpu.integrity): CRC-32 (zlib) of the chunk's values as read through
# Zarr, not of the chunk files: the files' bytes depend on the codec and Zarr version, while the values are
# what search and export read. Accidental damage (a partial copy or sync, flipped bytes) is the threat; CRC-32
# catches every burst up to 32 bits and all but 2^-32 of the rest. A missing file reads as fill values, which
# the checksum sees unless the chunk really was all fill values, hence also the presence check.
def chunk_checksum(codes: Any, ids: Any) -> int:
    """CRC-32 of one chunk: codes uint8 (rows, code_size) bytes, then ids (int64 little-endian, or each
    string id as its UTF-8 length (4 bytes) and bytes)."""
    crc = zlib.crc32(np.ascontiguousarray(codes, dtype=np.uint8).data)
    ids = np.asarray(ids)
    if ids.dtype.kind in "iub":
        return zlib.crc32(np.ascontiguousarray(ids, dtype="<i8").data, crc)
    for v in ids.tolist():
        b = str(v).encode()
        crc = zlib.crc32(b, zlib.crc32(len(b).to_bytes(4, "little"), crc))
    return crc


def _segments(store: CodeStore) -> list[dict[str, Any]] | None:
    if not is_ivf_store(store):
        return None
    return [{"node": lay.node, "rows": [lay.lo, lay.hi]} for lay in layouts(store)]


def _describe(store: CodeStore, bad: dict[int, str], limit: int = 10) -> str:
    items = [f"chunk {i} (rows {store.chunk_range(i)[0]}-{store.chunk_range(i)[1] - 1}): {why}"
             for i, why in list(bad.items())[:limit]]
    more = f"; and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"{len(bad)} chunk(s) damaged or missing: " + "; ".join(items) + more


def open_store(path: str | os.PathLike, mode: str = "r") -> CodeStore:
    """Open an existing store; StoreError if it is missing or not a pqgpu store."""
    path = str(path)
    try:
        group = zarr.open_group(path, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError if hasattr(zarr.errors, "GroupNotFoundError") else FileNotFoundError):
        raise StoreError(f"No code store at {path}. Create one with `pqgpu encode` or `pqgpu run`.") from None
    except Exception as exc:
        raise StoreError(f"Cannot open code store {path}: {exc}") from None
    if group.attrs.get("format_version") is None or "codes" not in group:
        raise StoreError(f"{path} is a Zarr group but not a pqgpu code store (no format_version/codes).")
    return CodeStore(path, group)


def as_store(store_or_path: Any) -> CodeStore:
    """An opened store as it is, or the store at a path opened for reading."""
    return store_or_path if isinstance(store_or_path, CodeStore) else open_store(store_or_path)


def create_store(path: str | os.PathLike, *, codebook: Codebook, n: int, chunk_rows: int, id_dtype: Any,
                 source: dict[str, Any]) -> CodeStore:
    """Create a fresh store (the caller has already decided that overwriting is allowed)."""
    path = str(path)
    try:
        _fs.make_parent(path)
        group = zarr.open_group(path, mode="w")
    except OSError as exc:
        raise StoreError(f"Cannot create the code store at {path}: {exc.strerror or exc}. "
                         "Choose a writable encode.output.") from None
    n_chunks = max(1, -(-n // chunk_rows))
    cr = max(1, min(chunk_rows, n)) if n else 1
    # PQ codes are near-random bytes: compressing them costs CPU and saves nothing.
    group.create_array("codes", shape=(n, codebook.code_size), chunks=(cr, codebook.code_size), dtype="uint8",
                       fill_value=0, compressors=None)
    group.create_array("ids", shape=(n,), chunks=(cr,), dtype=id_dtype)
    group.create_array("done", shape=(n_chunks,), chunks=(1,), dtype=bool, fill_value=False)
    # one chunk per task, like done: no two tasks write the same Zarr chunk
    columns = ["codes", "ids"] + (["lists"] if getattr(codebook, "nlist", 0) else [])
    integrity.create_table(group, "checksums", n_chunks, columns)
    cbg = group.create_group("codebook")
    cbg.create_array("centroids", data=codebook.centroids)
    if codebook.rotation is not None:
        cbg.create_array("rotation", data=codebook.rotation)
    if getattr(codebook, "nlist", 0):  # IVF: lists, coarse centroids, inverted layout (pqgpu.invert)
        add_ivf_nodes(group, codebook, n, chunk_rows)
    group.attrs.update({
        "format_version": FORMAT_VERSION, "d": codebook.d, "M": codebook.M, "nbits": codebook.nbits,
        "metric": codebook.metric, "code_size": codebook.code_size, "n": int(n), "chunk_rows": int(chunk_rows),
        "codebook_sha256": codebook.fingerprint(), "source": source, "created_by": versions(),
    })
    return CodeStore(path, group, writing=int(n))


def prepare_store(path: str | os.PathLike, *, codebook: Codebook, n: int, chunk_rows: int, id_dtype: Any,
                  source: dict[str, Any], overwrite: bool = False) -> CodeStore:
    """Open the store for resuming when it matches this codebook and source, refuse when it does not;
    with overwrite=True, replace whatever is at `path` with a fresh store.

    Resuming also repairs what can be repaired without the caller: a damaged codebook is restored from
    `codebook` (whose sha256 is the one the store records), and the chunks of source files rewritten in place
    (same rows, new contents) are marked to be encoded again."""
    from .sources.fingerprint import chunks_of_shards, compare

    path = str(path)
    if _fs.exists(path):
        if overwrite:
            log.info("--overwrite: replacing the existing store %s", path)
            _fs.remove_tree(path)
        else:
            try:
                store = open_store(path, mode="r+")
            except StoreError:
                raise StoreError(f"{path} exists and is not a pqgpu code store. Remove it, pick another "
                                 "encode.output, or pass --overwrite.") from None
            problems = _mismatches(store, codebook, chunk_rows)
            diff = compare(store.attrs.get("source"), source)
            if diff.refused:
                problems.append(diff.refused)
            elif diff.added:
                if not problems:
                    raise StoreError(
                        f"The source of the code store {path} has {len(diff.added)} new file(s) since it was made "
                        f"({', '.join(diff.added[:5])}{' …' if len(diff.added) > 5 else ''}). Nothing was changed. "
                        "Pass --append to encode only the new files into new rows at the end of the store (its "
                        "codebook and the rows already there are kept), or --overwrite to encode the whole source "
                        "again into a fresh store.")
                problems.append(f"{len(diff.added)} file(s) were added to the source since it was made")
            elif store.n != n:
                problems.append(f"it holds {store.n} rows but the source has {n}")
            if problems:
                raise StoreError(f"Refusing to resume the code store {path}: {'; '.join(problems)}. Nothing was "
                                 "changed. Pass --overwrite to encode the whole source again, or choose another "
                                 "encode.output.")
            store = CodeStore(path, store.group, writing=n)
            _restore_codebook(store, codebook)
            if diff.changed:
                files = store.attrs["source"]["files"]
                redo = chunks_of_shards(files, diff.changed, chunk_rows)
                names = [source["files"][i]["path"] for i in diff.changed]
                log.warning("%s: %d source file(s) were rewritten since they were encoded (%s); encoding their %d "
                            "chunk(s) again, keeping the others", path, len(names), ", ".join(names[:5]), len(redo))
                for i in redo:  # before the new fingerprint is recorded: a crash in between redoes the same
                    store.done[i] = False
            if diff.changed or diff.upgraded or store.attrs.get("source") != source:
                store.group.attrs["source"] = source
            return store
    return create_store(path, codebook=codebook, n=n, chunk_rows=chunk_rows, id_dtype=id_dtype, source=source)


def _restore_codebook(store: CodeStore, codebook: Codebook) -> None:
    """Rewrite a damaged codebook from the quantizer (already known to have the recorded sha256)."""
    problem = store.codebook_problem()
    if problem is None:
        return
    log.warning("%s: its codebook is damaged (not the sha256 recorded when it was made); restoring it from the "
                "quantizer file, which has that sha256", store.path)
    cbg = store.group["codebook"]
    cbg.create_array("centroids", data=codebook.centroids, overwrite=True)
    if codebook.rotation is not None:
        cbg.create_array("rotation", data=codebook.rotation, overwrite=True)
    if getattr(codebook, "nlist", 0):
        cbg.create_array("coarse", data=codebook.coarse, overwrite=True)
    if store.codebook_problem() is not None:
        raise StoreError(f"{store.path}: the codebook could not be restored from the quantizer file. Run "
                         "`pqgpu run --overwrite` to encode the store again.")


def _mismatches(store: CodeStore, codebook: Codebook, chunk_rows: int) -> list[str]:
    a = store.attrs
    out = []
    if store.metric != codebook.metric:
        out.append(f"it was made with metric {store.metric}, the quantizer now has metric {codebook.metric}")
    elif a.get("codebook_sha256") != codebook.fingerprint():
        out.append(f"it was made with another codebook (sha256 {str(a.get('codebook_sha256'))[:12]}…, "
                   f"now {codebook.fingerprint()[:12]}…)")
    if int(a.get("chunk_rows", -1)) != chunk_rows:
        out.append(f"its chunk_rows is {a.get('chunk_rows')}, the config says {chunk_rows}")
    return out


# -- IVF nodes (the inverted layout itself is built by pqgpu.invert) ------------------------------------

def is_ivf_store(store: Any) -> bool:
    return "lists" in store.group


def add_ivf_nodes(group: Any, codebook: Any, n: int, chunk_rows: int) -> None:
    """Create the IVF nodes of a fresh store (called by store.create_store for an IvfCodebook)."""
    nlist = codebook.nlist
    n_chunks = max(1, -(-n // chunk_rows))
    cr = max(1, min(chunk_rows, n)) if n else 1
    group.create_array("lists", shape=(n,), chunks=(cr,), dtype="int32", fill_value=-1)
    group["codebook"].create_array("coarse", data=codebook.coarse)
    ivf = group.create_group("ivf")
    # int32: a count is at most one chunk's rows; one Zarr chunk per encode chunk, so tasks never share one
    ivf.create_array("counts", shape=(n_chunks, nlist), chunks=(1, nlist), dtype="int32", fill_value=0)
    ivf.attrs.update({"nlist": nlist, "complete": False, "chunk_rows": ivf_chunk_rows(chunk_rows)})
    group.attrs["nlist"] = nlist


def ivf_chunk_rows(chunk_rows: int) -> int:
    """Rows per Zarr chunk of the inverted arrays: smaller than encode chunks, so a probed list of a few
    thousand rows reads little beyond itself."""
    return max(1, min(chunk_rows, MAX_IVF_CHUNK_ROWS))


def check_inverted(store: Any) -> None:
    if not is_ivf_store(store):
        raise StoreError(f"{store.path} is not an IVF store (it was encoded with quantizer.nlist: 0).")
    if not all(lay.node in store.group and store.group[lay.node].attrs.get("complete") for lay in layouts(store)):
        raise StoreError(f"{store.path}: the inverted lists are not built yet (an encode was interrupted). Run "
                         "`pqgpu encode` with the same config again to finish them.")


def write_chunk(path: str, i: int, start: int, codes: np.ndarray, ids: np.ndarray,
                lists: np.ndarray | None = None) -> int:
    """Write one task's rows and their checksums, then mark its chunk done (in that order, so done implies
    complete). Chunks equal to the fill value are written all the same, so that a missing chunk file always
    means lost data. `lists` (IVF) were written before (pqgpu.invert.write_chunk_lists); here their CRC is
    recorded with the others. `ids` hold the store's id dtype's values (Source.read_piece converts them exactly)."""
    group = zarr.open_group(path, mode="r+")
    stop = start + codes.shape[0]
    with zarr.config.set({"array.write_empty_chunks": True}):
        group["codes"][start:stop] = codes
        fault_point("after-codes", i)
        id_arr = group["ids"]
        if id_arr.dtype.kind in "iub":
            ids = np.asarray(ids).astype(id_arr.dtype)  # the values as stored (exact: Source.read_piece)
        id_arr[start:stop] = ids
        family = integrity.chunk_family(group)
        if family is not None:
            values = {"codes": codes, "ids": ids,
                      "lists": None if lists is None else np.asarray(lists).astype(group["lists"].dtype)}
            group["checksums"][i] = integrity.chunk_crcs(values, family.arrays)
        elif "checksums" in group:  # format 1
            group["checksums"][i] = chunk_checksum(codes, ids)
        group["done"][i] = True
    return codes.shape[0]


def recheck_done_chunks(store: CodeStore) -> list[int]:
    """Before resuming: verify every done chunk and clear the done flag of those that are missing or
    damaged (named in a WARNING), so they are encoded again. Returns them."""
    if not integrity.ENABLED:  # pqgpu.bench.integrity's baseline
        return []
    report = store.verify(layout=False)
    if not report.checksums:
        log.warning("%s: no checksums recorded (made by an older pqgpu); checked that done chunks are present "
                    "only", store.path)
    if report.bad:
        log.warning("%s: %s. Re-encoding them.", store.path, _describe(store, report.bad))
        for i in report.bad:
            store.done[i] = False
    return list(report.bad)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the store for a whole encode: a second encode on it fails at once."""
    lock_path = _fs.lock_file(path)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a+")
    except OSError as exc:
        raise StoreError(f"Cannot create the code store at {path}: {exc.strerror or exc}. "
                         "Choose a writable encode.output.") from None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise StoreError(f"The code store {path} is being written by {holder}. Wait for it to finish "
                             "(or stop it) before encoding into the same store.") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
