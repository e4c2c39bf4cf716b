"""Numba kernels for ADC search on the CPU: fused table look-ups and running top-k (like faiss IndexPQ).

Importing this module needs numba; pqgpu.search falls back to the array-API path without it.
Heaps are max-heaps ordered by (distance, row), so each one always holds the k smallest (distance, row)
pairs it has seen: ties go to the lower row, as in faiss.
"""

from __future__ import annotations

import numba as nb
import numpy as np

# Rows summed per pass: the (rows,) float32 accumulator and the codes it reads stay in L1/L2.
SCAN_BLOCK_ROWS = 1024


@nb.njit(cache=True, nogil=True, inline="always")
def _heap_replace_top(hd, hi, d, i):
    k = hd.shape[0]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= k:
            break
        right = child + 1
        if right < k and (hd[right] > hd[child] or (hd[right] == hd[child] and hi[right] > hi[child])):
            child = right
        if hd[child] < d or (hd[child] == d and hi[child] < i):
            break
        hd[pos] = hd[child]
        hi[pos] = hi[child]
        pos = child
    hd[pos] = d
    hi[pos] = i


@nb.njit(cache=True, nogil=True, parallel=True)
def scan_topk(tables, codes_t, start, heap_d, heap_i, group4):
    """Update the heaps with the rows of one chunk.

    tables: (nq, M * ksub) float32, flattened ADC tables; codes_t: (M, rows) uint8 | uint16 sub-codes,
    sub-quantizer-major so that the inner loop runs over rows (independent sums the CPU can overlap);
    start: global row of the chunk's first row; heap_d (P, nq, k) float32 / heap_i (P, nq, k) int64:
    P partial heaps per query (P > 1 lets few queries still use every core), updated in place.
    group4: sum the look-ups four at a time, ((t0 + t1) + t2) + t3, then add to the total: faiss's
    order for M % 4 == 0 (pq_estimators_from_tables_Mmul4); otherwise one at a time, as faiss's generic path.
    """
    P, nq, _k = heap_d.shape
    M, rows = codes_t.shape
    ksub = tables.shape[1] // M
    for t in nb.prange(P * nq):
        q = t // P
        p = t % P
        lo = rows * p // P
        hi = rows * (p + 1) // P
        tab = tables[q]
        hd = heap_d[p, q]
        hix = heap_i[p, q]
        acc = np.empty(SCAN_BLOCK_ROWS, np.float32)
        for b0 in range(lo, hi, SCAN_BLOCK_ROWS):
            b1 = min(b0 + SCAN_BLOCK_ROWS, hi)
            nb_rows = b1 - b0
            acc[:nb_rows] = 0
            if group4:
                for m in range(0, M, 4):
                    t0 = tab[m * ksub:(m + 1) * ksub]
                    t1 = tab[(m + 1) * ksub:(m + 2) * ksub]
                    t2 = tab[(m + 2) * ksub:(m + 3) * ksub]
                    t3 = tab[(m + 3) * ksub:(m + 4) * ksub]
                    c0 = codes_t[m, b0:b1]
                    c1 = codes_t[m + 1, b0:b1]
                    c2 = codes_t[m + 2, b0:b1]
                    c3 = codes_t[m + 3, b0:b1]
                    for r in range(nb_rows):
                        acc[r] += t0[c0[r]] + t1[c1[r]] + t2[c2[r]] + t3[c3[r]]
            else:
                for m in range(M):
                    tm = tab[m * ksub:(m + 1) * ksub]
                    cm = codes_t[m, b0:b1]
                    for r in range(nb_rows):
                        acc[r] += tm[cm[r]]
            top = hd[0]
            for r in range(nb_rows):
                if acc[r] < top:
                    _heap_replace_top(hd, hix, acc[r], np.int64(b0 + r + start))
                    top = hd[0]


@nb.njit(cache=True, nogil=True, parallel=True)
def unpack_t(packed, M, nbits, out):
    """faiss LSB-first packed codes (rows, code_size) uint8 -> sub-codes `out` (M, rows) (uint8 | uint16)."""
    rows, cs = packed.shape
    mask = (1 << nbits) - 1
    for r in nb.prange(rows):
        for m in range(M):
            bit = m * nbits
            byte = bit >> 3
            v = np.uint32(packed[r, byte])
            if byte + 1 < cs:
                v |= np.uint32(packed[r, byte + 1]) << 8
            if byte + 2 < cs:
                v |= np.uint32(packed[r, byte + 2]) << 16
            out[m, r] = (v >> (bit & 7)) & mask


@nb.njit(cache=True, nogil=True, parallel=True)
def transpose(codes, out):
    """(rows, M) -> out (M, rows), in row tiles: several times faster than NumPy's strided copy of bytes."""
    rows, M = codes.shape
    for b in nb.prange((rows + 255) // 256):
        r1 = min(b * 256 + 256, rows)
        for m in range(M):
            for r in range(b * 256, r1):
                out[m, r] = codes[r, m]


def sub_codes_t(packed: np.ndarray, M: int, nbits: int) -> np.ndarray:
    """(rows, code_size) uint8 -> (M, rows) uint8 (nbits <= 8) or uint16 sub-codes, sub-quantizer-major."""
    packed = np.ascontiguousarray(packed)
    if nbits in (8, 16):
        sub = packed if nbits == 8 else packed.view("<u2")
        out = np.empty((M, packed.shape[0]), sub.dtype)
        transpose(sub, out)
        return out
    out = np.empty((M, packed.shape[0]), np.uint8 if nbits <= 8 else np.uint16)
    unpack_t(packed, M, nbits, out)
    return out
