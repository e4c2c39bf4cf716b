"""Numba kernels for IVF-PQ search on the CPU: the nprobe nearest lists, per (query, probed list) ADC tables
(faiss's precomputed form, or direct from the residual) and a heap scan.

Importing this module needs numba; pqgpu.ivf_search uses the array-API path without it.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._cpu_adc import _heap_replace_top


# Queries per pass over the coarse centroids in probe_lists: their partial dot products stay in L1.
COARSE_QUERY_BLOCK = 4


@nb.njit(cache=True, nogil=True, parallel=True)
def probe_lists(y, coarse_t, cnorm, probe, pdist, inner_product=False):
    """The nprobe = probe.shape[1] nearest lists of each query and their coarse distances, in one parallel
    pass (no BLAS call: its thread pool would fight numba's for the cores, see scan_tables).

    y (nq, d) float32; coarse_t (d, nlist) float32 the coarse centroids transposed; cnorm (nlist,) float32
    ||c||^2; fills probe (nq, nprobe) int64 and pdist (nq, nprobe) float32 with the lists, nearest first
    (ties: lower list), and their distances ||y||^2 + ||c||^2 - 2<y, c> clipped at 0, as faiss's IndexFlatL2.
    inner_product: the lists of largest <y, c> instead (faiss IndexFlatIP), with pdist = -<y, c> (cnorm unused).
    """
    nq, d = y.shape
    nlist = coarse_t.shape[1]
    QB = COARSE_QUERY_BLOCK
    for blk in nb.prange((nq + QB - 1) // QB):
        q0 = blk * QB
        nb_q = min(QB, nq - q0)
        acc = np.zeros((QB, nlist), np.float32)
        for t in range(d):
            c_row = coarse_t[t]
            for u in range(nb_q):
                yv = y[q0 + u, t]
                a = acc[u]
                for lst in range(nlist):
                    a[lst] += yv * c_row[lst]
        dist = np.empty(nlist, np.float32)
        for u in range(nb_q):
            q = q0 + u
            yn = np.float32(0.0)
            for t in range(d):
                yn += y[q, t] * y[q, t]
            if inner_product:
                for lst in range(nlist):
                    dist[lst] = -acc[u, lst]
            else:
                for lst in range(nlist):
                    dist[lst] = max(yn + cnorm[lst] - np.float32(2.0) * acc[u, lst], np.float32(0.0))
            _select(dist, probe[q], pdist[q])


@nb.njit(cache=True, nogil=True)
def _select(dist, pl, pd):
    """The len(pl) smallest of dist, ascending (ties: lower index first), by insertion into a sorted array."""
    nlist = dist.shape[0]
    nprobe = pl.shape[0]
    filled = 0
    for lst in range(nlist):
        v = dist[lst]
        if filled == nprobe and not v < pd[nprobe - 1]:
            continue
        pos = filled if filled < nprobe else nprobe - 1
        while pos > 0 and pd[pos - 1] > v:
            pd[pos] = pd[pos - 1]
            pl[pos] = pl[pos - 1]
            pos -= 1
        pd[pos] = v
        pl[pos] = lst
        if filled < nprobe:
            filled += 1


@nb.njit(cache=True, nogil=True, parallel=True)
def select_probes(dist, probe, pdist):
    """The nprobe = probe.shape[1] smallest coarse distances of each query, ascending (ties: lower list
    first): dist (nq, nlist) float32 -> probe (nq, nprobe) int64 lists and pdist (nq, nprobe) float32 their
    distances, filled in place. nprobe <= nlist."""
    for q in nb.prange(dist.shape[0]):
        _select(dist[q], probe[q], pdist[q])


@nb.njit(cache=True, nogil=True, inline="always")
def _push(hd, hi, d, row):
    if d < hd[0] or (d == hd[0] and row < hi[0]):
        _heap_replace_top(hd, hi, d, row)


@nb.njit(cache=True, nogil=True, parallel=True)
def scan_tables(y, cent_t, term2, probe, dis0, seg_lo, seg_hi, codes, rows, heap_d, heap_i, scale):
    """Top-k over the probed lists with faiss's precomputed tables, updating the heaps in place:
    ||y - c_l - r||^2 = ||y - c_l||^2 + (||r||^2 + 2<c_l, r>) - 2<y, r>, so a list's table is
    term2[l] + ip (M * ksub additions, ip = -2<y_m, r_mk> once per query) and a row's distance dis0 + its M
    look-ups.

    y (nq, d) float32 rotated queries; cent_t (M, dsub, ksub) float32 the PQ centroids, transposed so that
    ip is computed along ksub (vectorised; no BLAS call, whose threads would fight numba's for the cores);
    term2 (nlist, M * ksub) float32, or (1, M * ksub): one row for every list; scale float32: -2 (L2, as
    above), or -1 with a zero term2 row for inner product (a table -<y_m, r_mk>, dis0 = -<y, c_l>: negated
    scores); probe (nq, nprobe) int64 and
    dis0 (nq, nprobe) float32 ||y - c_l||^2; seg_lo / seg_hi (nlist,) int64: where list l lies in codes
    (R, M) uint8|uint16 sub-codes and rows (R,) int64 store rows; heap_d / heap_i (nq, k) max-heaps by
    (distance, row). Four rows at a time: four independent sums (each in sub-quantizer order) keep the
    CPU's adders busy while the look-ups of the next row are in flight.
    """
    nq = y.shape[0]
    M, dsub, ksub = cent_t.shape
    MK = M * ksub
    nprobe = probe.shape[1]
    for q in nb.prange(nq):
        ip = np.zeros(MK, np.float32)
        for m in range(M):
            for t in range(dsub):
                yv = scale * y[q, m * dsub + t]
                for c in range(ksub):
                    ip[m * ksub + c] += yv * cent_t[m, t, c]
        tab = np.empty(MK, np.float32)
        hd = heap_d[q]
        hx = heap_i[q]
        for j in range(nprobe):
            lst = probe[q, j]
            if lst < 0:
                continue
            lo = seg_lo[lst]
            hi = seg_hi[lst]
            if hi <= lo:
                continue
            t2 = lst if term2.shape[0] > 1 else 0
            for e in range(MK):
                tab[e] = term2[t2, e] + ip[e]
            d0 = dis0[q, j]
            i = lo
            while i + 4 <= hi:
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                for m in range(M):
                    b = m * ksub
                    s0 += tab[b + codes[i, m]]
                    s1 += tab[b + codes[i + 1, m]]
                    s2 += tab[b + codes[i + 2, m]]
                    s3 += tab[b + codes[i + 3, m]]
                _push(hd, hx, d0 + s0, rows[i])
                _push(hd, hx, d0 + s1, rows[i + 1])
                _push(hd, hx, d0 + s2, rows[i + 2])
                _push(hd, hx, d0 + s3, rows[i + 3])
                i += 4
            while i < hi:
                s = np.float32(0.0)
                for m in range(M):
                    s += tab[m * ksub + codes[i, m]]
                _push(hd, hx, d0 + s, rows[i])
                i += 1


@nb.njit(cache=True, nogil=True, parallel=True)
def scan_probes(y, coarse, centroids, probe, seg_lo, seg_hi, codes, rows, heap_d, heap_i):
    """Top-k over the probed lists, updating the heaps in place.

    y (nq, d) float32 rotated queries; coarse (nlist, d) float32; centroids (M, ksub, dsub) float32;
    probe (nq, nprobe) int64 lists (-1: none); seg_lo / seg_hi (nlist,) int64: where list l's rows lie in
    codes (R, M) uint8|uint16 sub-codes and rows (R,) int64 store rows; heap_d (nq, k) float32 / heap_i
    (nq, k) int64 max-heaps by (distance, row). The table entry ||(y - c_l)_m - centroid_mk||^2 is summed
    in float64 and rounded once, so distances are exact to float32 up to the M-term sum.
    """
    nq, d = y.shape
    M, ksub, dsub = centroids.shape
    nprobe = probe.shape[1]
    for q in nb.prange(nq):
        tab = np.empty(M * ksub, np.float32)
        r = np.empty(d, np.float32)
        hd = heap_d[q]
        hi_ = heap_i[q]
        for j in range(nprobe):
            lst = probe[q, j]
            if lst < 0:
                continue
            lo = seg_lo[lst]
            hi = seg_hi[lst]
            if hi <= lo:
                continue
            for t in range(d):
                r[t] = y[q, t] - coarse[lst, t]
            for m in range(M):
                for c in range(ksub):
                    s = 0.0
                    for t in range(dsub):
                        diff = np.float64(r[m * dsub + t]) - np.float64(centroids[m, c, t])
                        s += diff * diff
                    tab[m * ksub + c] = s
            for i in range(lo, hi):
                acc = np.float32(0.0)
                for m in range(M):
                    acc += tab[m * ksub + codes[i, m]]
                row = rows[i]
                if acc < hd[0] or (acc == hd[0] and row < hi_[0]):
                    _heap_replace_top(hd, hi_, acc, row)
