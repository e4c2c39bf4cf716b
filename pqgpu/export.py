"""Export a code store as a faiss index file that searches exactly like `pqgpu.search`.

Layout: IndexIDMap2(IndexPQ) holding the store's codes and int64 ids, or
IndexIDMap2(IndexPreTransform(OPQMatrix, IndexPQ)) when the codebook has an OPQ rotation. The IndexPQ has
the store's metric (METRIC_INNER_PRODUCT for ip and cosine); cosine puts faiss's L2 normalisation
(NormalizationTransform, index_factory's "L2norm") in front, so faiss normalises the queries as pqgpu does.
Stores with string ids get IndexIDMap over row numbers plus a sidecar `<out>.ids.parquet`
(columns row, id) that maps faiss results back to the source ids.
faiss is imported only here, lazily: the rest of pqgpu never needs it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, PqgpuError, StoreError

log = logging.getLogger(__name__)

FAISS_INSTALL_HINT = ("Install faiss with `pip install faiss-cpu` (or `conda install -c pytorch faiss-cpu`; "
                      "faiss-gpu works too), or `pip install 'pqgpu[bench]'`.")


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise PqgpuError(f"Exporting a faiss index needs the faiss package, which cannot be imported ({exc}). "
                         f"{FAISS_INSTALL_HINT}") from None
    return faiss


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def build_faiss_index(codebook: Any, chunks: Any, ids: np.ndarray | None, n: int) -> Any:
    """A faiss index holding codes from chunks of (start, codes uint8 (rows, code_size)) in row order.

    ids: int64 (n,) wrapped with IndexIDMap2, or None for row numbers wrapped with IndexIDMap.
    """
    faiss = import_faiss()
    metric = faiss.METRIC_L2 if codebook.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    index_pq = faiss.IndexPQ(codebook.d, codebook.M, codebook.nbits, metric)
    faiss.copy_array_to_vector(np.ascontiguousarray(codebook.centroids).ravel(), index_pq.pq.centroids)
    index_pq.is_trained = True
    inner = index_pq
    keep = [index_pq]
    transforms = []  # in the order faiss applies them
    if codebook.metric == "cosine":
        transforms.append(faiss.NormalizationTransform(codebook.d, 2.0))
    if codebook.rotation is not None:
        opq = faiss.OPQMatrix(codebook.d, codebook.M)
        faiss.copy_array_to_vector(np.ascontiguousarray(codebook.rotation, dtype=np.float32).ravel(), opq.A)
        opq.is_trained = True
        opq.is_orthonormal = True  # lets faiss reconstruct() through the rotation
        transforms.append(opq)
    if transforms:
        inner = faiss.IndexPreTransform(index_pq)
        for vt in reversed(transforms):
            inner.prepend_transform(vt)
        keep += transforms + [inner]
    # faiss only wraps empty indexes in an IDMap: wrap first, then fill the codes and the id map.
    index = faiss.IndexIDMap(inner) if ids is None else faiss.IndexIDMap2(inner)
    expected = 0
    for start, codes in chunks:
        if start != expected:
            raise StoreError(f"codes chunk starts at row {start}, expected {expected}: chunks must be in order.")
        index_pq.add_sa_codes(np.ascontiguousarray(codes, dtype=np.uint8))
        expected += codes.shape[0]
    if expected != n:
        raise StoreError(f"the store yielded {expected} rows of codes but says it holds {n}.")
    inner.ntotal = index.ntotal = n
    faiss.copy_array_to_vector(np.arange(n, dtype=np.int64) if ids is None
                               else np.ascontiguousarray(ids, dtype=np.int64), index.id_map)
    if ids is not None:
        index.construct_rev_map()
    # faiss's Python wrappers do not own sub-objects passed to constructors: keep them alive with the index.
    index.referenced_objects = keep
    return index


def _int64_ids(ids: np.ndarray, where: str) -> np.ndarray:
    if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max:
        raise InputError(f"{where}: ids up to {ids.max()} do not fit faiss's int64 ids. Re-encode with ids below "
                         "2**63 or with string ids (exported as row numbers plus a sidecar).")
    return ids.astype(np.int64)


def export_faiss(store_or_path: Any, out_path: str | os.PathLike) -> Path:
    """Write a faiss index file holding the store's codes and ids (atomically: temp file + rename).

    Returns the index path. faiss.read_index(out) then searches with the same results as pqgpu.search.
    """
    faiss = import_faiss()
    from .search import store_chunks
    from .store import as_store

    store = as_store(store_or_path)
    if store.is_complete():  # (store_chunks refuses an incomplete one)
        store.check_chunks_present()
    if "lists" in store.group:  # IVF store: an IndexIVFPQ, written without faiss (pqgpu.invert)
        from .invert import export_ivf

        return export_ivf(store, out_path)
    cb = store.codebook()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    checker = store.checker()  # every chunk of ids checked, as store_chunks checks the codes
    ids_raw = np.asarray(store.ids[...]) if checker is None else checker.read(store.ids, "ids", 0, store.n)
    string_ids = ids_raw.dtype.kind not in "iu"
    ids = None if string_ids else _int64_ids(ids_raw, f"store {store.path}")
    log.info("export-faiss: %d codes (M=%d, nbits=%d%s) -> %s; faiss holds the whole index in memory "
             "(%.1f MiB of codes)", store.n, cb.M, cb.nbits, ", OPQ" if cb.rotation is not None else "", out,
             store.n * cb.code_size / 2**20)
    index = build_faiss_index(cb, store_chunks(store), ids, store.n)
    tmp = _temp_path(out)
    try:
        faiss.write_index(index, str(tmp))
        if string_ids:
            sidecar = Path(str(out) + ".ids.parquet")
            _write_ids_sidecar(sidecar, ids_raw)
            log.warning("export-faiss: the store has string ids; the faiss index returns row numbers. Map them "
                        "to ids with %s (columns row, id).", sidecar)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write_ids_sidecar(path: Path, ids: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"row": pa.array(np.arange(ids.shape[0], dtype=np.int64)),
                      "id": pa.array(ids.astype(object).tolist(), type=pa.string())})
    tmp = _temp_path(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
