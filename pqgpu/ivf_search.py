"""IVF-PQ search over a store's inverted layout: only the nprobe nearest lists of each query are read.

Like faiss IndexIVFPQ (by_residual): a query y (rotated when there is OPQ) probes the nprobe lists whose
coarse centroids c_l are nearest; a row of list l with residual code r scores sum_m ||(y - c_l)_m - r_m||^2.
The scan loads the union of the probed lists of a query batch once (contiguous ranges of `ivf/codes`), then
scores them with a fused numba kernel on the CPU or with array-API kernels (CuPy on the GPU).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

import numpy as np

from . import kernels
from .backend import namespace, resolve_backend, to_device, to_host
from .codebook import as_float32_matrix
from .errors import ConfigError
from .invert import check_inverted

log = logging.getLogger(__name__)

DEFAULT_NPROBE = 16
MISSING_DISTANCE = float(np.finfo(np.float32).max)
# Budgets per query batch: coarse distances (nq, nlist) float32, codes rows loaded, residual tables.
COARSE_BYTES = 128 << 20
LOAD_ROWS = 1 << 22
TABLE_BYTES = 256 << 20
PRECOMPUTED_BYTES = 512 << 20


def resolve_nprobe(nprobe: Any, nlist: int, where: str = "") -> int:
    """nprobe in 1..nlist; None -> min(nlist, DEFAULT_NPROBE), announced with a warning."""
    if nprobe is None:
        chosen = min(nlist, DEFAULT_NPROBE)
        log.warning("%sIVF store with %d lists searched without --nprobe: probing %d lists per query (the default); "
                    "pass --nprobe P (1..%d) to trade speed for recall.", f"{where}: " if where else "", nlist, chosen,
                    nlist)
        return chosen
    if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or not 1 <= nprobe <= nlist:
        raise ConfigError(f"--nprobe: expected an integer from 1 to nlist={nlist} (the number of IVF lists"
                          f"{' of ' + where if where else ''}). Got {nprobe!r} instead.")
    return int(nprobe)


def coarse_probe(y: np.ndarray, coarse: np.ndarray, nprobe: int) -> np.ndarray:
    """The nprobe nearest lists of each query, nearest first (ties: lower list): (nq, nprobe) int64."""
    cnorm = (coarse.astype(np.float64) ** 2).sum(1).astype(np.float32)
    dist = cnorm[None, :] - 2 * (y @ coarse.T)
    nlist = coarse.shape[0]
    if nprobe < nlist:
        part = np.argpartition(dist, nprobe - 1, axis=1)[:, :nprobe]
    else:
        part = np.broadcast_to(np.arange(nlist), dist.shape)
    pd = np.take_along_axis(dist, part, axis=1)
    order = np.lexsort((part, pd), axis=-1)
    return np.take_along_axis(part, order, axis=1).astype(np.int64)


def load_lists(store: Any, lists: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                            np.ndarray]:
    """Codes and store rows of the given lists (sorted, unique), read as few contiguous ranges.

    Returns codes (R, code_size) uint8, rows (R,) int64, seg_lo and seg_hi (nlist,) int64 (list l lies at
    seg_lo[l]:seg_hi[l] of the loaded rows; empty for lists not loaded)."""
    ivf = store.group["ivf"]
    gap = int(ivf.attrs["chunk_rows"])
    lo_all, hi_all = offsets[lists], offsets[lists + 1]
    keep = hi_all > lo_all
    lo_all, hi_all, lists = lo_all[keep], hi_all[keep], lists[keep]
    ranges: list[list[int]] = []
    for a, b in zip(lo_all.tolist(), hi_all.tolist()):
        if ranges and a - ranges[-1][1] <= gap:  # close enough to share Zarr chunks: read one range
            ranges[-1][1] = b
        else:
            ranges.append([a, b])
    codes_parts, rows_parts, bases = [], [], []
    pos = 0
    for a, b in ranges:
        codes_parts.append(np.asarray(ivf["codes"][a:b]))
        rows_parts.append(np.asarray(ivf["rows"][a:b]))
        bases.append((a, pos))
        pos += b - a
    nlist = offsets.shape[0] - 1
    seg_lo = np.zeros(nlist, np.int64)
    seg_hi = np.zeros(nlist, np.int64)
    starts = np.array([a for a, _ in bases], np.int64)
    loaded = np.array([p for _, p in bases], np.int64)
    which = np.searchsorted(starts, lo_all, side="right") - 1
    seg_lo[lists] = lo_all - starts[which] + loaded[which]
    seg_hi[lists] = seg_lo[lists] + (hi_all - lo_all)
    cs = int(store.group.attrs["code_size"])
    codes = np.concatenate(codes_parts) if codes_parts else np.zeros((0, cs), np.uint8)
    rows = np.concatenate(rows_parts) if rows_parts else np.zeros(0, np.int64)
    return codes, rows, seg_lo, seg_hi


_TERM2: dict[str, np.ndarray] = {}  # one entry: the tables of the last store searched, by codebook sha256


def precomputed_term2(cb: Any, key: str | None = None) -> np.ndarray | None:
    """(nlist, M * ksub) float32 ||r_mk||^2 + 2<c_l,m, r_mk> (one batched matmul); None when it would exceed
    PRECOMPUTED_BYTES (faiss has the same switch, precomputed_table_max_bytes). key: cache it under this
    name (the store's codebook sha256) so repeated searches of one store compute it once."""
    if cb.nlist * cb.M * cb.ksub * 4 > PRECOMPUTED_BYTES:
        return None
    if key is not None and key in _TERM2:
        return _TERM2[key]
    c = cb.centroids  # (M, ksub, dsub)
    rnorm = np.einsum("mkt,mkt->mk", c, c)
    coarse_sub = np.ascontiguousarray(cb.coarse.reshape(cb.nlist, cb.M, cb.dsub).transpose(1, 0, 2))
    cross = np.matmul(coarse_sub, c.transpose(0, 2, 1))  # (M, nlist, ksub)
    cross *= np.float32(2.0)
    cross += rnorm[:, None, :]
    term2 = np.ascontiguousarray(cross.transpose(1, 0, 2).reshape(cb.nlist, cb.M * cb.ksub), dtype=np.float32)
    if key is not None:
        _TERM2.clear()
        _TERM2[key] = term2
    return term2


def scan_cpu(y: np.ndarray, cb: Any, probe: np.ndarray, seg_lo: np.ndarray, seg_hi: np.ndarray, codes: np.ndarray,
             rows: np.ndarray, k: int, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (distances float32 (nq, k), rows int64 (nq, k)) with the numba kernel."""
    from . import _ivf_cpu

    sub = codes if cb.nbits == 8 else np.asarray(kernels.unpack_codes(codes, cb.M, cb.nbits)).astype(
        np.uint8 if cb.nbits < 8 else np.uint16)
    nq = y.shape[0]
    heap_d = np.full((nq, k), MISSING_DISTANCE, np.float32)
    heap_i = np.full((nq, k), -1, np.int64)
    y = np.ascontiguousarray(y, dtype=np.float32)
    term2 = precomputed_term2(cb, key)
    if term2 is not None:
        _ivf_cpu.scan_probes_precomputed(y, cb.coarse, cb.centroids, term2, probe, seg_lo, seg_hi,
                                         np.ascontiguousarray(sub), rows, heap_d, heap_i)
    else:
        _ivf_cpu.scan_probes(y, cb.coarse, cb.centroids, probe, seg_lo, seg_hi, np.ascontiguousarray(sub), rows,
                             heap_d, heap_i)
    order = np.lexsort((heap_i, heap_d), axis=-1)
    return np.take_along_axis(heap_d, order, axis=1), np.take_along_axis(heap_i, order, axis=1)


def scan_xp(y: np.ndarray, cb: Any, probe: np.ndarray, seg_lo: np.ndarray, seg_hi: np.ndarray, codes: np.ndarray,
            rows: np.ndarray, k: int, xp: Any) -> tuple[np.ndarray, np.ndarray]:
    """The same top-k with array-API kernels on namespace xp: every (query, candidate) pair padded to the
    longest candidate list of the batch, scored by table look-ups, then sorted."""
    nq, nprobe = probe.shape
    M, ksub = cb.M, cb.ksub
    valid_probe = probe >= 0
    lst = np.where(valid_probe, probe, 0)
    sizes = np.where(valid_probe, seg_hi[lst] - seg_lo[lst], 0)
    L = max(int(sizes.sum(1).max()) if nq else 0, 1)
    # candidate (query, slot) -> probe pair and loaded row position, built on the host (index arithmetic only)
    cand_pair = np.zeros((nq, L), np.int64)
    cand_pos = np.zeros((nq, L), np.int64)
    valid = np.zeros((nq, L), bool)
    for q in range(nq):
        pos = 0
        for j in range(nprobe):
            s = int(sizes[q, j])
            if s:
                cand_pair[q, pos:pos + s] = q * nprobe + j
                cand_pos[q, pos:pos + s] = np.arange(seg_lo[lst[q, j]], seg_lo[lst[q, j]] + s)
                valid[q, pos:pos + s] = True
                pos += s
    residual = (np.repeat(y, nprobe, axis=0) - cb.coarse[lst.reshape(-1)]).astype(np.float32)
    tables = kernels.distance_tables(to_device(residual, xp), to_device(cb.centroids, xp))  # (nq*nprobe, M, ksub)
    flat_tables = xp.reshape(tables, (-1,))
    sub = xp.astype(kernels.unpack_codes(to_device(np.ascontiguousarray(codes), xp), M, cb.nbits), xp.int64)
    pair = to_device(cand_pair.reshape(-1), xp)
    pos = to_device(cand_pos.reshape(-1), xp)
    dist = xp.zeros((nq * L,), dtype=xp.float32)
    for m in range(M):
        code_m = xp.take(sub[:, m], pos, axis=0) if sub.shape[0] else xp.zeros_like(pos)
        dist = dist + xp.take(flat_tables, pair * (M * ksub) + m * ksub + code_m, axis=0)
    valid_d = to_device(valid.reshape(-1), xp)
    dist = xp.where(valid_d, dist, xp.asarray(MISSING_DISTANCE, dtype=xp.float32))
    rows_d = to_device(rows, xp)
    cand_rows = xp.take(rows_d, pos, axis=0) if rows.shape[0] else xp.zeros_like(pos)
    cand_rows = xp.where(valid_d, cand_rows, xp.asarray(-1, dtype=xp.int64))
    dist = xp.reshape(dist, (nq, L))
    cand_rows = xp.reshape(cand_rows, (nq, L))
    order = xp.argsort(dist, axis=1, stable=True)[:, :k]
    d_out = to_host(xp.take_along_axis(dist, order, axis=1)).astype(np.float32)
    r_out = to_host(xp.take_along_axis(cand_rows, order, axis=1)).astype(np.int64)
    if d_out.shape[1] < k:
        pad = k - d_out.shape[1]
        d_out = np.concatenate([d_out, np.full((nq, pad), MISSING_DISTANCE, np.float32)], axis=1)
        r_out = np.concatenate([r_out, np.full((nq, pad), -1, np.int64)], axis=1)
    return d_out, r_out


def _query_batch(cb: Any, nprobe: int, n: int, gpu: bool) -> int:
    avg_list = max(1, n // cb.nlist)
    b = min(COARSE_BYTES // (4 * cb.nlist), LOAD_ROWS // (nprobe * avg_list))
    if gpu:
        b = min(b, TABLE_BYTES // (4 * nprobe * cb.M * cb.ksub))
    return max(1, b)


def search_ivf_store(store: Any, queries: Any, k: int, *, nprobe: Any = None, backend: str = "auto",
                     xp: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """IVF top-k over an opened IVF store. Returns distances float32 (nq, k) and store rows int64 (nq, k)
    (-1 and FLT_MAX where fewer than k rows lie in the probed lists). xp: force an array namespace."""
    from .search import check_k

    k = check_k(k)
    check_inverted(store)
    cb = store.codebook()
    nprobe = resolve_nprobe(nprobe, cb.nlist, store.path)
    q = as_float32_matrix(queries, "queries", d=cb.d)
    y = cb.rotate(q)
    offsets = np.asarray(store.group["ivf/offsets"][...])
    use_cpu = xp is None and resolve_backend(backend) == "cpu"
    if not use_cpu and xp is None:
        xp = namespace("gpu")
    if use_cpu:
        try:
            from . import _ivf_cpu  # noqa: F401
        except ImportError:
            import array_api_compat.numpy as xp

            use_cpu = False
            log.info("numba is not installed: IVF search runs on the array-API kernels (slower)")
    nq = y.shape[0]
    batch = _query_batch(cb, nprobe, store.n, not use_cpu)
    t0 = time.perf_counter()
    out_d, out_r = [], []
    for b0 in range(0, nq, batch):
        yb = np.ascontiguousarray(y[b0:b0 + batch])
        probe = coarse_probe(yb, cb.coarse, nprobe)
        codes, rows, seg_lo, seg_hi = load_lists(store, np.unique(probe), offsets)
        if use_cpu:
            d, r = scan_cpu(yb, cb, probe, seg_lo, seg_hi, codes, rows, k, store.attrs.get("codebook_sha256"))
        else:
            d, r = scan_xp(yb, cb, probe, seg_lo, seg_hi, codes, rows, k, xp)
        out_d.append(d)
        out_r.append(r)
    d = np.concatenate(out_d) if out_d else np.zeros((0, k), np.float32)
    r = np.concatenate(out_r) if out_r else np.zeros((0, k), np.int64)
    dt = time.perf_counter() - t0
    log.info("IVF search: %d queries, k=%d, nprobe=%d of %d lists in %.3f s (%.1f queries/s)", nq, k, nprobe,
             cb.nlist, dt, nq / dt if dt > 0 else float("inf"))
    return d, r


# -- evaluation -----------------------------------------------------------------------------------------

def evaluate_ivf(store: Any, queries: Any, *, base_chunks: Iterable[np.ndarray] | None = None,
                 ground_truth: Any = None, ks: Iterable[int] = (1, 10, 100), nprobes: Iterable[int] | None = None,
                 backend: str = "auto") -> dict[str, Any]:
    """Recall@k and queries/s at each nprobe, reconstruction MSE and compression of an IVF store."""
    from .search import ExactKnn, evaluation_inputs, recall_metrics, reconstruction_pass

    check_inverted(store)
    cb, n, q, ks, gt = evaluation_inputs(store, queries, ks, ground_truth, base_chunks)
    nq, kmax = q.shape[0], ks[-1]
    if nprobes is None:
        nprobes = sorted({p for p in (1, 4, 16, 64, 256) if p <= cb.nlist} | {min(cb.nlist, DEFAULT_NPROBE)})
    nprobes = [resolve_nprobe(p, cb.nlist, store.path) for p in nprobes]
    mse = relative_mse = None
    if base_chunks is not None:
        lists = store.group["lists"]
        mse, relative_mse, exact = reconstruction_pass(
            base_chunks, n, cb.d,
            lambda lo, hi: cb.decode_ivf(np.asarray(store.codes[lo:hi]), np.asarray(lists[lo:hi])),
            ExactKnn(q, kmax) if gt is None else None)
        gt = exact if gt is None else gt
    result: dict[str, Any] = {
        "n": n, "d": cb.d, "M": cb.M, "nbits": cb.nbits, "opq": cb.rotation is not None, "nlist": cb.nlist,
        "code_size": cb.code_size, "compression_ratio": round(4 * cb.d / cb.code_size, 2), "nq": nq,
        "ground_truth": "given" if ground_truth is not None else "exact (from base vectors)",
    }
    for p in nprobes:
        search_ivf_store(store, q[:min(nq, 8)], kmax, nprobe=p, backend=backend)  # warm-up (kernel compile)
        t0 = time.perf_counter()
        _d, found = search_ivf_store(store, q, kmax, nprobe=p, backend=backend)
        dt = time.perf_counter() - t0
        for key, value in recall_metrics(found, gt, ks).items():
            result[f"{key} (nprobe={p})"] = value
        result[f"queries_per_second (nprobe={p})"] = round(nq / dt, 1) if dt > 0 else float("inf")
    result["mse"] = mse
    result["relative_mse"] = relative_mse
    log.info("evaluate: %s", ", ".join(f"{k}={v}" for k, v in result.items()))
    return result
