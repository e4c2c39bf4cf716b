"""IVF-PQ search over a store's inverted layout: only the nprobe nearest lists of each query are read.

Like faiss IndexIVFPQ (by_residual): a query y (rotated when there is OPQ) probes the nprobe lists whose
coarse centroids c_l are nearest; a row of list l with residual code r scores sum_m ||(y - c_l)_m - r_m||^2.
`IvfIndex` opens a store once, as faiss.read_index does (the inverted layout in memory when it fits), and
serves any number of searches; `search_ivf_store` is the one-call form. Rows are scored by fused numba kernels
on the CPU (faiss's precomputed tables: a list's table is term2[l] - 2<y, r>) or by array-API kernels (CuPy
on the GPU) over the probed lists of each query batch.

Metric ip / cosine (cosine: queries L2-normalised first), as faiss IndexIVFPQ with METRIC_INNER_PRODUCT: a
query probes the nprobe lists of largest <y, c_l>, and a row of list l with residual code r scores
<y, c_l> + sum_m <y_m, r_m> (the tables do not depend on the list). The kernels keep their min-heaps on the
negated scores (exact), and results are negated back: similarities, largest first, ties to the lower row.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

import numpy as np

from . import integrity, kernels
from .backend import namespace, resolve_backend, to_device, to_host
from .codebook import as_float32_matrix
from .errors import ConfigError
from .evaluation import (ExactKnn, check_k, evaluation_inputs, prepare_queries, recall_metrics,
                         reconstruction_pass, to_metric)
from .invert import layout_checker
from .refine import check_refine, refine_rows, refine_summary, store_metric
from .sources.recorded import check_source_unchanged
from .store import check_inverted, layouts

log = logging.getLogger(__name__)

DEFAULT_NPROBE = 16
MISSING_DISTANCE = float(np.finfo(np.float32).max)
# Budgets per query batch: coarse distances (nq, nlist) float32, rows read from the store, residual tables.
COARSE_BYTES = 128 << 20
LOAD_ROWS = 1 << 22
TABLE_BYTES = 256 << 20
PRECOMPUTED_BYTES = 512 << 20
# One-off searches whose probes cover the lists load the whole inverted layout (codes + rows) up to this size.
LOAD_BYTES = 1 << 30
# Without load: appended segments (an append's new rows) up to this size are read once, when the index opens,
# instead of once per query batch (one read per segment and batch is what segments cost, pqgpu.append).
SEGMENT_LOAD_BYTES = 64 << 20


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


def coarse_distances(y: np.ndarray, coarse: np.ndarray, cnorm: np.ndarray, metric: str = "l2") -> np.ndarray:
    """(nq, nlist) float32 ||y||^2 + ||c||^2 - 2<y, c>, clipped at 0: what faiss's IndexFlatL2 quantizer
    returns, and the dis0 that its by_residual scan adds to every table sum. metric ip / cosine: -<y, c>
    (the smallest first are faiss IndexFlatIP's largest; negated, the dis0 of its inner-product scan)."""
    if metric != "l2":
        return np.ascontiguousarray(-(y @ coarse.T), dtype=np.float32)
    dist = y @ coarse.T
    dist *= np.float32(-2.0)
    dist += cnorm[None, :]
    dist += np.einsum("ij,ij->i", y, y)[:, None]
    np.maximum(dist, np.float32(0.0), out=dist)
    return dist


def select_probes(dist: np.ndarray, nprobe: int, use_numba: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The nprobe nearest lists of each query, nearest first (ties: lower list), and their coarse distances:
    (nq, nprobe) int64 and float32."""
    nq, nlist = dist.shape
    if use_numba:
        from . import _ivf_cpu

        probe = np.empty((nq, nprobe), np.int64)
        pdist = np.empty((nq, nprobe), np.float32)
        _ivf_cpu.select_probes(dist, probe, pdist)
        return probe, pdist
    probe = np.argsort(dist, axis=1, kind="stable")[:, :nprobe].astype(np.int64)  # stable: lower list first
    return probe, np.take_along_axis(dist, probe, axis=1)


def load_lists(codes_src: Any, rows_src: Any, lists: np.ndarray, offsets: np.ndarray, gap: int,
               checker: Any = None, node: str = "ivf") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Codes and store rows of the given lists (sorted, unique), read from codes_src (n, code_size) and
    rows_src (n,) (Zarr or NumPy arrays in inverted order) as few contiguous ranges: lists closer than gap
    rows share one read. With a checker (pqgpu.integrity, for Zarr arrays) each range is read as whole
    inverted chunks, each checked against its CRC.

    Returns codes (R, code_size) uint8, rows (R,) int64, seg_lo and seg_hi (nlist,) int64 (list l lies at
    seg_lo[l]:seg_hi[l] of the loaded rows; empty for lists not loaded)."""
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
        if checker is None:
            codes_parts.append(np.asarray(codes_src[a:b]))
            rows_parts.append(np.asarray(rows_src[a:b]))
        else:
            codes_parts.append(checker.read(codes_src, f"{node}/codes", a, b))
            rows_parts.append(checker.read(rows_src, f"{node}/rows", a, b))
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
    codes = np.concatenate(codes_parts) if codes_parts else np.zeros((0, codes_src.shape[1]), np.uint8)
    rows = np.concatenate(rows_parts) if rows_parts else np.zeros(0, np.int64)
    return codes, rows, seg_lo, seg_hi


def merge_by_list(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], nlist: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One (codes, rows, seg_lo, seg_hi) from the loaded lists of several segments (each as load_lists
    returns them, in row order): list l holds its rows of segment 0, then of segment 1, ..., so its rows stay
    in increasing row order, as in one layout built over all rows (and the scans see the same sequence)."""
    if len(parts) == 1:
        return parts[0]
    sizes = np.stack([hi - lo for _, _, lo, hi in parts])  # (segments, nlist)
    total = sizes.sum(0)
    new_lo = np.zeros(nlist, np.int64)
    np.cumsum(total[:-1], out=new_lo[1:])
    before = np.cumsum(sizes, axis=0) - sizes  # rows of each list in the segments before
    codes = np.empty((int(total.sum()), parts[0][0].shape[1]), np.uint8)
    rows = np.empty(int(total.sum()), np.int64)
    for s, (c, r, lo, _hi) in enumerate(parts):
        lists = np.flatnonzero(sizes[s])
        cnt = sizes[s, lists]
        within = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        src = np.repeat(lo[lists], cnt) + within
        dst = np.repeat(new_lo[lists] + before[s, lists], cnt) + within
        codes[dst] = c[src]
        rows[dst] = r[src]
    return codes, rows, new_lo, new_lo + total


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k by (distance, row) of several top-k results over disjoint rows (each segment's heap keeps its
    k smallest (distance, row) pairs, so this is the top-k of one scan over all of them)."""
    d = np.concatenate([x for x, _ in results], axis=1)
    r = np.concatenate([x for _, x in results], axis=1)
    order = np.lexsort((r, d), axis=-1)[:, :k]
    return np.take_along_axis(d, order, axis=1), np.take_along_axis(r, order, axis=1)


def precomputed_term2(cb: Any) -> np.ndarray | None:
    """(nlist, M * ksub) float32 ||r_mk||^2 + 2<c_l,m, r_mk> (one GEMM per sub-quantizer); None when it would exceed
    PRECOMPUTED_BYTES (faiss has the same switch, precomputed_table_max_bytes)."""
    if cb.nlist * cb.M * cb.ksub * 4 > PRECOMPUTED_BYTES:
        return None
    c = cb.centroids  # (M, ksub, dsub)
    rnorm = np.einsum("mkt,mkt->mk", c, c)
    coarse_sub = cb.coarse.reshape(cb.nlist, cb.M, cb.dsub)
    term2 = np.empty((cb.nlist, cb.M, cb.ksub), np.float32)
    for m in range(cb.M):  # one GEMM per sub-quantizer: numpy's batched matmul is slow for these shapes
        cross = coarse_sub[:, m, :] @ np.ascontiguousarray(c[m].T)
        cross *= np.float32(2.0)
        cross += rnorm[m][None, :]
        term2[:, m, :] = cross
    return term2.reshape(cb.nlist, cb.M * cb.ksub)


def sub_codes(codes: np.ndarray, cb: Any) -> np.ndarray:
    """Packed codes (R, code_size) -> sub-codes (R, M) for the numba kernels: the codes themselves for
    nbits 8, else unpacked to uint8 (nbits < 8) or uint16."""
    if cb.nbits == 8:
        return np.ascontiguousarray(codes)
    return np.ascontiguousarray(np.asarray(kernels.unpack_codes(codes, cb.M, cb.nbits)).astype(
        np.uint8 if cb.nbits < 8 else np.uint16))


def scan_cpu(y: np.ndarray, cb: Any, probe: np.ndarray, dis0: np.ndarray, seg_lo: np.ndarray, seg_hi: np.ndarray,
             sub: np.ndarray, rows: np.ndarray, k: int, term2: np.ndarray | None,
             metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    """Top-k (distances float32 (nq, k), rows int64 (nq, k)) with the numba kernels: faiss's precomputed
    tables when term2 is given (a list's table is term2[l] - 2<y, r>, its distances dis0 + the table sum),
    else a table per (query, list) from the residual y - c_l. metric ip / cosine: one table -<y, r> for
    every list (term2 is ignored), distances dis0 = -<y, c_l> plus its sum: negated scores."""
    from . import _ivf_cpu

    scale = np.float32(-2.0)
    if metric != "l2":
        term2, scale = np.zeros((1, cb.M * cb.ksub), np.float32), np.float32(-1.0)

    nq = y.shape[0]
    heap_d = np.full((nq, k), MISSING_DISTANCE, np.float32)
    heap_i = np.full((nq, k), -1, np.int64)
    if term2 is not None:
        cent_t = np.ascontiguousarray(cb.centroids.transpose(0, 2, 1))
        _ivf_cpu.scan_tables(y, cent_t, term2, probe, dis0, seg_lo, seg_hi, sub, rows, heap_d, heap_i, scale)
    else:
        _ivf_cpu.scan_probes(y, cb.coarse, cb.centroids, probe, seg_lo, seg_hi, sub, rows, heap_d, heap_i)
    order = np.lexsort((heap_i, heap_d), axis=-1)
    return np.take_along_axis(heap_d, order, axis=1), np.take_along_axis(heap_i, order, axis=1)


def scan_xp(y: np.ndarray, cb: Any, probe: np.ndarray, seg_lo: np.ndarray, seg_hi: np.ndarray, codes: np.ndarray,
            rows: np.ndarray, k: int, xp: Any, dis0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The same top-k with array-API kernels on namespace xp: every (query, candidate) pair padded to the
    longest candidate list of the batch, scored by table look-ups, then sorted. metric ip / cosine: dis0
    (nq, nprobe) float32 -<y, c_l> of the probes, plus the sum of the query's tables -<y_m, r_mk>."""
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
    ip = cb.metric != "l2"
    if ip:  # one table per query: pair q * nprobe + j looks up table q
        tables = -kernels.inner_product_tables(to_device(y, xp), to_device(cb.centroids, xp))  # (nq, M, ksub)
    else:
        residual = (np.repeat(y, nprobe, axis=0) - cb.coarse[lst.reshape(-1)]).astype(np.float32)
        tables = kernels.distance_tables(to_device(residual, xp), to_device(cb.centroids, xp))  # (nq*nprobe, M, ksub)
    flat_tables = xp.reshape(tables, (-1,))
    sub = xp.astype(kernels.unpack_codes(to_device(np.ascontiguousarray(codes), xp), M, cb.nbits), xp.int64)
    pair = to_device(cand_pair.reshape(-1), xp)
    pos = to_device(cand_pos.reshape(-1), xp)
    table_of = pair // nprobe if ip else pair
    dist = xp.zeros((nq * L,), dtype=xp.float32)
    for m in range(M):
        code_m = xp.take(sub[:, m], pos, axis=0) if sub.shape[0] else xp.zeros_like(pos)
        dist = dist + xp.take(flat_tables, table_of * (M * ksub) + m * ksub + code_m, axis=0)
    if ip:  # faiss: dis0 + the table sum
        dist = xp.take(to_device(np.ascontiguousarray(dis0, dtype=np.float32).reshape(-1), xp), pair, axis=0) + dist
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


class IvfIndex:
    """An IVF store opened for searching, like faiss.read_index: codebook, coarse centroids, list offsets,
    faiss's precomputed tables and (load=True) the whole inverted layout in memory, so that repeated
    searches read nothing more from the store. load=False reads only the probed lists of each query batch
    from the store (one-off searches of stores larger than memory)."""

    def __init__(self, store: Any, *, load: bool = True):
        check_inverted(store)
        t0 = time.perf_counter()
        self.store = store
        self.path = store.path
        self.n = store.n
        self.cb = cb = store.codebook()
        # every committed layout (an appended store: one segment per append until `pqgpu compact`)
        self.layouts = layouts(store)
        self._segs = []
        for lay in self.layouts:
            ivf = store.group[lay.node]
            self._segs.append((lay.node, ivf, integrity.check_offsets(store.path, ivf, np.asarray(ivf["offsets"][...])),
                               layout_checker(store, lay.node)))
        ivf = self._ivf = self._segs[0][1]
        self.gap = int(ivf.attrs["chunk_rows"])
        self.offsets = self._segs[0][2] if len(self._segs) == 1 else \
            np.concatenate([[0], np.cumsum(sum(np.diff(o) for _, _, o, _ in self._segs))]).astype(np.int64)
        self.checker = self._segs[0][3]
        self._held: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # small segments, read once (load=False)
        self.cnorm = np.einsum("ij,ij->i", cb.coarse, cb.coarse).astype(np.float32)
        self.term2 = precomputed_term2(cb) if cb.metric == "l2" else None
        self.loaded = bool(load)
        self.codes = self.rows = self._sub = self._coarse_t = None
        if self.loaded:  # read once and checked once: later searches read nothing from the store
            parts = []
            for (node, ivf, offsets, checker), lay in zip(self._segs, self.layouts):
                if checker is None:
                    codes, rows = np.asarray(ivf["codes"][...]), np.asarray(ivf["rows"][...])
                else:
                    codes = checker.read(ivf["codes"], f"{node}/codes", 0, lay.n)
                    rows = checker.read(ivf["rows"], f"{node}/rows", 0, lay.n)
                parts.append((codes, rows, offsets[:-1], offsets[1:]))
            self.codes, self.rows, _, _ = merge_by_list(parts, cb.nlist)
        self.load_seconds = time.perf_counter() - t0
        log.info("IVF index %s opened in %.3f s (%s)", self.path, self.load_seconds,
                 f"{self.n} rows in memory" if self.loaded else "probed lists read per query batch")

    def _lists(self, probe: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Packed codes, rows and list segments holding the probed lists (read from the store unless loaded)."""
        lists = np.unique(probe)
        if self.loaded:
            return load_lists(self.codes, self.rows, lists, self.offsets, 0)
        return merge_by_list(self._segment_lists(probe), self.cb.nlist)

    def _segment_lists(self, probe: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """load_lists of the probed lists in each segment (small segments held in memory after one read)."""
        lists = np.unique(probe)
        parts = []
        for (node, ivf, offsets, checker), lay in zip(self._segs, self.layouts):
            held = self._held.get(node)
            if held is None and len(self._segs) > 1 and lay.n * (self.cb.code_size + 8) <= SEGMENT_LOAD_BYTES:
                held = self._held[node] = (
                    (np.asarray(ivf["codes"][...]), np.asarray(ivf["rows"][...])) if checker is None else
                    (checker.read(ivf["codes"], f"{node}/codes", 0, lay.n),
                     checker.read(ivf["rows"], f"{node}/rows", 0, lay.n)))
            if held is not None:
                parts.append(load_lists(held[0], held[1], lists, offsets, 0))
            else:
                parts.append(load_lists(ivf["codes"], ivf["rows"], lists, offsets, self.gap, checker, node))
        return parts

    def _probe_cpu(self, y: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """coarse_distances + select_probes in one numba pass (same lists and distances up to float32 rounding
        of the dot products)."""
        from . import _ivf_cpu

        if self._coarse_t is None:
            self._coarse_t = np.ascontiguousarray(self.cb.coarse.T)
        probe = np.empty((y.shape[0], nprobe), np.int64)
        pdist = np.empty((y.shape[0], nprobe), np.float32)
        _ivf_cpu.probe_lists(y, self._coarse_t, self.cnorm, probe, pdist, self.cb.metric != "l2")
        return probe, pdist

    def _batch(self, nprobe: int, cpu: bool) -> int:
        """Queries per batch: their coarse distances within COARSE_BYTES, the lists they read within
        LOAD_ROWS, on the GPU their residual tables within TABLE_BYTES."""
        cb = self.cb
        b = COARSE_BYTES // (4 * cb.nlist)
        if not (cpu and self.loaded):
            b = min(b, LOAD_ROWS // (nprobe * max(1, self.n // cb.nlist)))
        if not cpu:
            b = min(b, TABLE_BYTES // (4 * nprobe * cb.M * cb.ksub))
        return max(1, b)

    def search(self, queries: Any, k: int, *, nprobe: Any = None, backend: str = "auto",
               xp: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k: distances float32 (nq, k) and store rows int64 (nq, k) (-1 and FLT_MAX where fewer than
        k rows lie in the probed lists; metric ip / cosine: similarities, largest first, -FLT_MAX where
        missing). xp: force an array namespace."""
        k = check_k(k)
        cb = self.cb
        nprobe = resolve_nprobe(nprobe, cb.nlist, self.path)
        y = np.ascontiguousarray(prepare_queries(queries, cb), dtype=np.float32)
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
        batch = self._batch(nprobe, use_cpu)
        t0 = time.perf_counter()
        out_d, out_r = [], []
        for b0 in range(0, nq, batch):
            yb = y[b0:b0 + batch]
            if use_cpu:
                probe, dis0 = self._probe_cpu(yb, nprobe)
            else:
                probe, dis0 = select_probes(coarse_distances(yb, cb.coarse, self.cnorm, cb.metric), nprobe,
                                            use_numba=False)
            if use_cpu and self.loaded:  # the whole layout in memory: lists lie at their offsets
                if self._sub is None:
                    self._sub = sub_codes(self.codes, cb)
                d, r = scan_cpu(yb, cb, probe, dis0, self.offsets[:-1], self.offsets[1:], self._sub, self.rows, k,
                                self.term2, cb.metric)
            elif use_cpu and len(self._segs) > 1:  # each segment scanned apart, the top-k merged: no merge copy
                d, r = merge_topk([scan_cpu(yb, cb, probe, dis0, lo, hi, sub_codes(c, cb), rw, k, self.term2,
                                            cb.metric) for c, rw, lo, hi in self._segment_lists(probe)], k)
            else:
                codes, rows, seg_lo, seg_hi = self._lists(probe)
                if use_cpu:
                    d, r = scan_cpu(yb, cb, probe, dis0, seg_lo, seg_hi, sub_codes(codes, cb), rows, k, self.term2,
                                    cb.metric)
                else:
                    d, r = scan_xp(yb, cb, probe, seg_lo, seg_hi, codes, rows, k, xp, dis0)
            out_d.append(d)
            out_r.append(r)
        d = to_metric(np.concatenate(out_d) if out_d else np.zeros((0, k), np.float32), cb.metric)
        r = np.concatenate(out_r) if out_r else np.zeros((0, k), np.int64)
        dt = time.perf_counter() - t0
        log.info("IVF search: %d queries, k=%d, nprobe=%d of %d lists in %.3f s (%.1f queries/s)", nq, k, nprobe,
                 cb.nlist, dt, nq / dt if dt > 0 else float("inf"))
        return d, r


def fits_in_memory(store: Any) -> bool:
    """Whether the inverted codes and rows of a store take at most LOAD_BYTES."""
    return store.n * (int(store.group.attrs["code_size"]) + 8) <= LOAD_BYTES


def search_ivf_store(store: Any, queries: Any, k: int, *, nprobe: Any = None, backend: str = "auto",
                     xp: Any = None, load: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """IVF top-k over an opened IVF store, in one call (IvfIndex(store).search for many calls). Returns
    distances float32 (nq, k) and store rows int64 (nq, k) (-1 and FLT_MAX where fewer than k rows lie in the
    probed lists). load: read the whole inverted layout first (None: when the queries probe at least as
    many lists as there are and it fits in LOAD_BYTES; otherwise only the probed lists are read)."""
    if store.metric == "cosine":  # refuse a zero query before the index is opened
        from .metric import normalize_rows

        normalize_rows(as_float32_matrix(queries, "queries"), "queries")
    if load is None:
        nq = len(queries) if hasattr(queries, "__len__") else 1
        nlist = int(store.group.attrs.get("nlist", 1))
        probes = nprobe if isinstance(nprobe, (int, np.integer)) and not isinstance(nprobe, bool) else DEFAULT_NPROBE
        load = nq * max(1, int(probes)) >= nlist and fits_in_memory(store)
    return IvfIndex(store, load=load).search(queries, k, nprobe=nprobe, backend=backend, xp=xp)


# -- evaluation -----------------------------------------------------------------------------------------

def evaluate_ivf(store: Any, queries: Any, *, base_chunks: Iterable[np.ndarray] | None = None,
                 ground_truth: Any = None, ks: Iterable[int] = (1, 10, 100), nprobes: Iterable[int] | None = None,
                 backend: str = "auto", refine: int | None = None) -> dict[str, Any]:
    """Recall@k and queries/s at each nprobe, reconstruction MSE and compression of an IVF store. refine R:
    the top k*R candidates re-ranked with the source's vectors (pqgpu.refine); queries/s include the reads."""
    check_inverted(store)
    R = check_refine(refine)
    cb, n, q, ks, gt = evaluation_inputs(store, queries, ks, ground_truth, base_chunks)
    source = check_source_unchanged(store) if R else None
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
            ExactKnn(q, kmax, metric=cb.metric) if gt is None else None, cb.metric)
        gt = exact if gt is None else gt
    result: dict[str, Any] = {
        "n": n, "d": cb.d, "M": cb.M, "nbits": cb.nbits, "opq": cb.rotation is not None, "metric": cb.metric,
        "nlist": cb.nlist,
        "code_size": cb.code_size, "compression_ratio": round(4 * cb.d / cb.code_size, 2), "nq": nq,
        "ground_truth": "given" if ground_truth is not None else "exact (from base vectors)",
    }
    # opened once, like faiss.read_index; queries/s count the search calls, the load is reported apart
    index = IvfIndex(store, load=fits_in_memory(store))
    result["index_load_seconds"] = round(index.load_seconds, 4)
    if R:
        result["refine"] = R
    for p in nprobes:
        index.search(q[:min(nq, 8)], kmax, nprobe=p, backend=backend)  # warm-up (kernel compile)
        t0 = time.perf_counter()
        _d, found = index.search(q, kmax * (R or 1), nprobe=p, backend=backend)
        if R:
            _d, found, read = refine_rows(source, q, found, kmax, store_metric(store), backend=backend)
            result.update({f"{key} (nprobe={p})": v for key, v in refine_summary(R, read).items() if key != "refine"})
        dt = time.perf_counter() - t0
        for key, value in recall_metrics(found, gt, ks).items():
            result[f"{key} (nprobe={p})"] = value
        result[f"queries_per_second (nprobe={p})"] = round(nq / dt, 1) if dt > 0 else float("inf")
    result["mse"] = mse
    result["relative_mse"] = relative_mse
    log.info("evaluate: %s", ", ".join(f"{k}={v}" for k, v in result.items()))
    return result
