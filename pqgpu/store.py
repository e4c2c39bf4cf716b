"""The Zarr v3 code store (DESIGN §5): codes, ids, per-chunk done flags and the codebook, in one group.

Chunks of `codes`, `ids` and `done` line up with encode tasks, so no two tasks ever write the same
Zarr chunk, and a chunk's done flag is set only after its codes and ids are on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

from ._faults import fault_point
from .codebook import Codebook
from .errors import StoreError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    import numpy

    from . import __version__

    out = {"pqgpu": __version__, "numpy": numpy.__version__, "zarr": zarr.__version__}
    try:
        import faiss

        out["faiss"] = faiss.__version__
    except ImportError:
        pass
    return out


@dataclass
class CodeStore:
    """An opened code store. Arrays are zarr.Array objects; read them with slicing."""

    path: str
    group: Any

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
        return int(self.group.attrs["n"])

    @property
    def chunk_rows(self) -> int:
        return int(self.group.attrs["chunk_rows"])

    @property
    def n_chunks(self) -> int:
        return int(self.done.shape[0])

    def chunk_range(self, i: int) -> tuple[int, int]:
        return i * self.chunk_rows, min(self.n, (i + 1) * self.chunk_rows)

    def codebook(self) -> Codebook:
        a = self.attrs
        cb = self.group["codebook"]
        rotation = cb["rotation"][...] if "rotation" in cb else None
        if "coarse" in cb:  # IVF store
            from .ivf import IvfCodebook

            return IvfCodebook(int(a["d"]), int(a["M"]), int(a["nbits"]), cb["centroids"][...], rotation,
                               coarse=cb["coarse"][...])
        return Codebook(int(a["d"]), int(a["M"]), int(a["nbits"]), cb["centroids"][...], rotation)

    def pending_chunks(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done[...])]

    def is_complete(self) -> bool:
        return bool(self.done[...].all())

    def info(self) -> dict[str, Any]:
        a = self.attrs
        done = self.done[...]
        nbytes = sum(f.stat().st_size for f in Path(self.path).rglob("*") if f.is_file())
        return {
            "path": self.path, "n": a["n"], "d": a["d"], "M": a["M"], "nbits": a["nbits"],
            "code_size": a["code_size"], "opq": "rotation" in self.group["codebook"],
            "chunk_rows": a["chunk_rows"], "chunks_done": int(done.sum()), "chunks": int(done.size),
            "complete": bool(done.all()), "codebook_sha256": a["codebook_sha256"],
            "ids_dtype": str(self.ids.dtype), "store_bytes": nbytes,
            "raw_float32_bytes": int(a["n"]) * int(a["d"]) * 4,
            "compression_ratio": round(4 * int(a["d"]) / int(a["code_size"]), 2),
            "source": a.get("source"), "created_by": a.get("created_by"), "nlist": int(a.get("nlist", 0)),
        }


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


def create_store(path: str | os.PathLike, *, codebook: Codebook, n: int, chunk_rows: int, id_dtype: Any,
                 source: dict[str, Any]) -> CodeStore:
    """Create a fresh store (the caller has already decided that overwriting is allowed)."""
    path = str(path)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
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
    cbg = group.create_group("codebook")
    cbg.create_array("centroids", data=codebook.centroids)
    if codebook.rotation is not None:
        cbg.create_array("rotation", data=codebook.rotation)
    if getattr(codebook, "nlist", 0):  # IVF: lists, coarse centroids, inverted layout (pqgpu.invert)
        from .invert import add_ivf_nodes

        add_ivf_nodes(group, codebook, n, chunk_rows)
    group.attrs.update({
        "format_version": FORMAT_VERSION, "d": codebook.d, "M": codebook.M, "nbits": codebook.nbits,
        "code_size": codebook.code_size, "n": int(n), "chunk_rows": int(chunk_rows),
        "codebook_sha256": codebook.fingerprint(), "source": source, "created_by": versions(),
    })
    return CodeStore(path, group)


def prepare_store(path: str | os.PathLike, *, codebook: Codebook, n: int, chunk_rows: int, id_dtype: Any,
                  source: dict[str, Any], overwrite: bool = False) -> CodeStore:
    """Open the store for resuming when it matches this codebook and source, refuse when it does not;
    with overwrite=True, replace whatever is at `path` with a fresh store."""
    path = str(path)
    if Path(path).exists():
        if overwrite:
            log.info("--overwrite: replacing the existing store %s", path)
            shutil.rmtree(path)
        else:
            try:
                store = open_store(path, mode="r+")
            except StoreError:
                raise StoreError(f"{path} exists and is not a pqgpu code store. Remove it, pick another "
                                 "encode.output, or pass --overwrite.") from None
            problems = _mismatches(store, codebook, n, chunk_rows, source)
            if problems:
                raise StoreError(f"Refusing to resume the code store {path}: {'; '.join(problems)}. "
                                 "Pass --overwrite to start it again, or choose another encode.output.")
            return store
    return create_store(path, codebook=codebook, n=n, chunk_rows=chunk_rows, id_dtype=id_dtype, source=source)


def _mismatches(store: CodeStore, codebook: Codebook, n: int, chunk_rows: int, source: dict) -> list[str]:
    a = store.attrs
    out = []
    if a.get("codebook_sha256") != codebook.fingerprint():
        out.append(f"it was made with another codebook (sha256 {str(a.get('codebook_sha256'))[:12]}…, "
                   f"now {codebook.fingerprint()[:12]}…)")
    if a.get("source") != source:
        out.append("the source changed since it was made (files, sizes or modification times differ)")
    if int(a.get("n", -1)) != n:
        out.append(f"it holds {a.get('n')} rows but the source has {n}")
    if int(a.get("chunk_rows", -1)) != chunk_rows:
        out.append(f"its chunk_rows is {a.get('chunk_rows')}, the config says {chunk_rows}")
    return out


def write_chunk(path: str, i: int, start: int, codes: np.ndarray, ids: np.ndarray) -> int:
    """Write one task's rows, then mark its chunk done (in that order, so done implies complete)."""
    group = zarr.open_group(path, mode="r+")
    stop = start + codes.shape[0]
    group["codes"][start:stop] = codes
    fault_point("after-codes", i)
    group["ids"][start:stop] = ids
    group["done"][i] = True
    return codes.shape[0]


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the store for a whole encode: a second encode on it fails at once."""
    lock_path = Path(str(path) + ".lock")
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
