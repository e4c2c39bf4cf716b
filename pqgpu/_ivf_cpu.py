"""Numba kernel for IVF-PQ search on the CPU: per (query, probed list) residual ADC tables and a heap scan.

Importing this module needs numba; pqgpu.ivf_search uses the array-API path without it.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._cpu_adc import _heap_replace_top


@nb.njit(cache=True, nogil=True, parallel=True)
def scan_probes_precomputed(y, coarse, centroids, term2, probe, seg_lo, seg_hi, codes, rows, heap_d, heap_i):
    """scan_probes with faiss's precomputed tables: ||y - c_l - r||^2 = ||y - c_l||^2 + (||r||^2 + 2<c_l, r>)
    - 2<y, r>, with term2 (nlist, M * ksub) = ||r_mk||^2 + 2<c_l,m, r_mk> computed once per index, -2<y, r>
    once per query: a probe then costs M * ksub additions instead of ksub * d multiply-adds."""
    nq, d = y.shape
    M, ksub, dsub = centroids.shape
    nprobe = probe.shape[1]
    for q in nb.prange(nq):
        tab = np.empty(M * ksub, np.float32)
        term3 = np.empty(M * ksub, np.float32)
        for m in range(M):
            for c in range(ksub):
                s = np.float32(0.0)
                for t in range(dsub):
                    s += y[q, m * dsub + t] * centroids[m, c, t]
                term3[m * ksub + c] = np.float32(-2.0) * s
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
            dis0 = np.float32(0.0)
            for t in range(d):
                diff = y[q, t] - coarse[lst, t]
                dis0 += diff * diff
            for e in range(M * ksub):
                tab[e] = term2[lst, e] + term3[e]
            for i in range(lo, hi):
                acc = dis0
                for m in range(M):
                    acc += tab[m * ksub + codes[i, m]]
                row = rows[i]
                if acc < hd[0] or (acc == hd[0] and row < hi_[0]):
                    _heap_replace_top(hd, hi_, acc, row)


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
