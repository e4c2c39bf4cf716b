"""Numba CPU kernels for PQ encoding (nearest sub-centroid) and k-means updates.

Importing this module needs numba; callers fall back to the array-API kernels without it.

assign() computes, per subspace m, argmin_k ||c_mk||^2 - 2 x_m.c_mk (the ||x_m||^2 term cannot change the
argmin) with ties going to the lowest k, like numpy's argmin. Where the runner-up lies within that
decomposition's float32 error bound (kernels.TIE_BOUND), the row is re-ranked by the exact distance
||x_m - c_mk||^2 in float64, so the code is the exact nearest centroid (lowest k on exact ties). Its micro-kernel is written in LLVM IR (a
numba intrinsic): numba's auto-vectorised loops keep accumulators in memory and cannot vectorise an argmin,
which made them 2-4x slower. The IR is plain vector IR (no x86 intrinsics), so it compiles for any target.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import NamedTuple

import llvmlite.binding as llb
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["PreparedCodebook", "accumulate", "assign", "assign_with_distances", "prepare"]

# Rows per register tile: R rows x V vectors of L centroids are accumulated in registers, so each centroid
# load feeds R FMAs and each broadcast x value feeds V FMAs. Per row the tile also keeps three vectors (best,
# its block, second best), updated once per block, so it needs about R (V + 3) + V vector registers and pays
# a fixed cost per block that larger V amortises. With the 32 AVX-512 registers: V=4, R=4 (32); V<=2, R=4.
# (V=4, R=4 against R=3 on Sapphire Rapids, pqgpu.bench.kernel_ab --procs 12, quiet: 1.11x at d 768 dsub 16,
# 1.09x at dsub 32, 1.04x at dsub 4, 0.99x at dsub 8, 1.01x at d 96 dsub 8 nbits 12; RESULTS.md session 8.)
# With the 16 of AVX2 (Zen 3, pqgpu.bench.kernel_ab, quiet): V=4, R=2 (18) beat V=2, R=4 (22) and
# V=2, R=3 at nbits 8-12 (codebooks smaller than 4 vectors keep V<=2, R=4, faster there), and V=4, R=3 (25)
# ran at 0.6x of V=4, R=2.
def _rows_per_tile(L: int, V: int) -> int:
    return (2 if L == 8 else 4) if V == 4 else 4


# Rows per parallel task: big enough to amortise the per-subspace setup, small enough to balance threads.
_CHUNK_ROWS = 256
# Centroid slab (dsub x S floats) processed per pass over a chunk's rows. A codebook of up to _SLAB_FLOATS
# (32 KiB) is one slab: each row is decided right after its tile. Larger ones go in slabs of _MULTI_SLAB_FLOATS
# (16 KiB), which leave room in a 32 KiB L1 for the tile's distance buffer and the rows. Against 32 KiB slabs
# (pqgpu.bench.kernel_ab --procs 12, Zen 3): 1.07x on the coarse quantizer's shape (dsub 128,
# 1,024 centroids), 0.99x at d 96, dsub 8, nbits 12 (within the noise: a 4-process run had shown 1.13x).
_SLAB_FLOATS = 8192
_MULTI_SLAB_FLOATS = 4096
# dsub values the tile kernel is compiled for as a constant (the others read it at run time): the constant
# trip count made the encode 8 % faster at dsub 4 and at dsub 8 (pqgpu.bench.kernel_ab --procs 6,
# median over processes, Zen 3).
_CONST_DSUB = (4, 8)
# Bytes of sums one accumulate() task updates at random: about half of a 2 MiB L2.
_ACC_TASK_BYTES = 1 << 20


def _host_lanes() -> int:
    """float32 lanes per vector register of the target numba compiles for (16 with AVX-512, else 8)."""
    feats = numba.config.CPU_FEATURES if numba.config.CPU_NAME else llb.get_host_cpu_features().flatten()
    return 16 if "+avx512f" in (feats or "") else 8


class PreparedCodebook(NamedTuple):
    """Centroids in the layout assign() reads. Build it with prepare(); reuse it across calls.

    ct: (M, ldk // W, dsub, W) float32, -2 * c^T packed in blocks of W = lanes * vecs centroids, so that a
    block is one contiguous run (no cache-set conflicts from power-of-two strides); zeros pad ksub to ldk.
    norms: (M, ldk) float32, ||c||^2 (rounded from float64), +inf on the padding so it never wins.
    cmax: (M,) float32, max_k ||c||^2 per subspace (for the near-tie bound).
    """

    ct: np.ndarray
    norms: np.ndarray
    cmax: np.ndarray
    ksub: int
    dsub: int
    lanes: int
    vecs: int
    slab: int


def prepare(centroids: np.ndarray, *, lanes: int | None = None) -> PreparedCodebook:
    """centroids float32 (M, ksub, dsub) -> PreparedCodebook. `lanes` (8 or 16) overrides the SIMD width
    (the default follows the CPU); results do not depend on it."""
    c = np.asarray(centroids)
    if c.ndim != 3 or min(c.shape) < 1:
        raise ValueError(f"centroids must be (M, ksub, dsub), got shape {c.shape}")
    M, ksub, dsub = c.shape
    if ksub > 65536:
        raise ValueError(f"ksub={ksub} does not fit uint16 codes")
    L = _host_lanes() if lanes is None else int(lanes)
    if L not in (8, 16):
        raise ValueError("lanes must be 8 or 16")
    # Fewer vectors per block for tiny codebooks (less padding); _rows_per_tile says how many rows then fit.
    V = 1 if ksub <= L else (2 if ksub <= 2 * L else 4)
    W = L * V
    ldk = -(-ksub // W) * W
    c32 = c.astype(np.float32, copy=False)
    ct = np.zeros((M, ldk, dsub), np.float32)
    ct[:, :ksub] = c32
    ct *= np.float32(-2.0)  # exact: a power of two
    ct = np.ascontiguousarray(ct.reshape(M, ldk // W, W, dsub).transpose(0, 1, 3, 2))
    norms = np.full((M, ldk), np.inf, np.float32)
    c64 = c32.astype(np.float64)
    norms[:, :ksub] = np.einsum("mkj,mkj->mk", c64, c64)
    cmax = np.ascontiguousarray(norms[:, :ksub].max(axis=1))
    slab = ldk if ldk * dsub <= _SLAB_FLOATS else max(W, _MULTI_SLAB_FLOATS // dsub // W * W)
    return PreparedCodebook(ct, norms, cmax, ksub, dsub, L, V, slab)


def _check_x(x: np.ndarray, prepared: PreparedCodebook) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    M = prepared.ct.shape[0]
    if x.ndim != 2 or x.shape[1] != M * prepared.dsub:
        raise ValueError(f"x must be (n, {M * prepared.dsub}), got shape {x.shape}")
    return x


def assign(x: np.ndarray, prepared: PreparedCodebook, out: np.ndarray | None = None) -> np.ndarray:
    """Nearest centroid per subspace: x float32 (n, d) -> codes uint16 (n, M); ties go to the lowest index.

    Distances are ||c||^2 + sum_j x_j * (-2 c_j), accumulated in float32 in j order with fused
    multiply-adds where the CPU has them (one rounding per term, no reassociation), so the result is the
    same for every thread count and tiling. Near-ties within the error bound of that sum are re-ranked by
    the float64 distance ||x - c||^2: the code is the exact nearest, as faiss's direct path (dsub < 16)
    finds it.
    """
    x = _check_x(x, prepared)
    out = _check_out(out, (x.shape[0], prepared.ct.shape[0]), np.uint16)
    _run_assign(x, prepared, out, np.empty((0, 0), np.float32))
    return out


def assign_with_distances(
    x: np.ndarray, prepared: PreparedCodebook, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """assign() plus the squared distance to the chosen centroid per (row, m), float32 (n, M):
    ||x_m||^2 + (||c||^2 - 2 x_m.c), clamped at 0 (rounding can push it below), as faiss's BLAS path does;
    on re-ranked near-ties, the float64 ||x_m - c||^2 rounded to float32."""
    x = _check_x(x, prepared)
    shape = (x.shape[0], prepared.ct.shape[0])
    out = _check_out(out, shape, np.uint16)
    dist = np.empty(shape, np.float32)
    _run_assign(x, prepared, out, dist)
    return out, dist


def _check_out(out: np.ndarray | None, shape: tuple[int, int], dtype) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype)
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous {np.dtype(dtype)} array of shape {shape}")
    return out


def _run_assign(x, p: PreparedCodebook, out, dist) -> None:
    if x.shape[0]:
        D = p.dsub if p.dsub in _CONST_DSUB else 0
        _assign_kernel(p.lanes, p.vecs, D)(x, p.ct, p.norms, p.cmax, p.ksub, p.slab, out, dist)


def accumulate(x: np.ndarray, codes: np.ndarray, ksub: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means M-step inputs: per (m, k) the float64 sum of the rows' sub-vectors assigned to k, and counts.

    x float32 (n, d); codes integer (n, M) in [0, ksub). Returns sums float64 (M, ksub, dsub) and counts
    int64 (M, ksub). Summation runs in row order for every entry, so it is deterministic.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    codes = np.asarray(codes)
    if codes.ndim != 2 or x.ndim != 2 or codes.shape[0] != x.shape[0] or codes.shape[1] < 1:
        raise ValueError(f"x (n, d) and codes (n, M) disagree: {x.shape} vs {codes.shape}")
    if codes.dtype.kind not in "iu":
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    n, d = x.shape
    M = codes.shape[1]
    if d % M:
        raise ValueError(f"d={d} is not a multiple of M={M}")
    codes = np.ascontiguousarray(codes)
    sums = np.zeros((M, ksub, d // M), np.float64)
    counts = np.zeros((M, ksub), np.int64)
    # Tasks own contiguous column ranges of x (whole subspaces when possible): no two tasks write the same
    # entry, x is read once in total, and the per-entry order stays the row order. Split further so that a
    # task's slice of sums stays in L2, in a multiple of the thread count to keep threads balanced.
    threads = numba.get_num_threads()
    ntask = max(threads, -(-sums.nbytes // _ACC_TASK_BYTES))
    ntask = min(d, -(-ntask // threads) * threads)
    bad = np.zeros(ntask, np.bool_)
    if n:
        _accumulate_kernel(d // M)(x, codes, ksub, sums, counts, ntask, bad)
    if bad.any():
        raise ValueError(f"codes outside [0, {ksub})")
    return sums, counts


# ---------------------------------------------------------------------------------------------------------
# numba drivers


@njit(cache=True, nogil=True)
def _exact_nearest(x, i, o, ct, m, ksub, exact):
    """(k, d): the centroid of subspace m nearest to row i's sub-vector x[i, o:o+dsub] by the float64
    ||x - c||^2, lowest k on exact ties; ct holds -2c (exactly), so c = -0.5 ct."""
    dsub, W = ct.shape[2], ct.shape[3]
    bk = 0
    bd = np.inf  # float64
    for blk in range(-(-ksub // W)):
        exact[:] = 0
        for j in range(dsub):
            xj = np.float64(x[i, o + j])
            for w in range(W):
                t = xj + 0.5 * np.float64(ct[m, blk, j, w])
                exact[w] += t * t
        for w in range(min(W, ksub - blk * W)):
            if exact[w] < bd:  # strict: the lowest index wins an exact tie
                bd = exact[w]
                bk = blk * W + w
    return bk, bd


@njit(cache=True, nogil=True)
def _sub_norm(x, i, o, dsub):
    """||x[i, o:o+dsub]||^2 in float32."""
    xx = np.float32(0)
    for j in range(dsub):
        xx += x[i, o + j] * x[i, o + j]
    return xx


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _row_norms(x, s, e, out):
    """out[i - s] >= ||x[i]||^2 for rows s..e: the float32 sum, vectorised (any order), times 1 + (d + 16) 2^-22,
    which covers its rounding error (at most d 2^-24 relative)."""
    d = x.shape[1]
    grow = np.float32(1 + (d + 16) * 2.0**-22)
    for i in range(s, e):
        acc = np.float32(0)
        for c in range(d):
            acc += x[i, c] * x[i, c]
        out[i - s] = acc * grow


@njit(cache=True, nogil=True)
def _decide(x, i, o, ct, m, ksub, coef, c2, dists, k, exact):
    """(code, distance) of row i in subspace m, whose decomposed distances dists[:ksub] have their minimum at
    k and a runner-up within the loose margin: ||x_im||^2 and the runner-up itself now make the exact test."""
    best = dists[k]
    sec = np.float32(np.inf)
    for kk in range(ksub):
        if kk != k and dists[kk] < sec:
            sec = dists[kk]
    xx = _sub_norm(x, i, o, ct.shape[2])
    # A runner-up within the decomposition's error bound may be the exact nearest: re-rank by the exact
    # distance (rare: a few rows in 10^4 on real data).
    if sec - best <= coef * (xx + c2):
        k, bd = _exact_nearest(x, i, o, ct, m, ksub, exact)
        return k, np.float32(bd)
    return k, max(np.float32(0), xx + best)


@njit(cache=True, nogil=True)
def _assign_rows(x, ct, norms, cmax, ksub, slab, out, dist, s, e, L, V, D):
    numba.literally(L)
    numba.literally(V)
    numba.literally(D)
    d = x.shape[1]
    M, _, dsub, W = ct.shape
    ldk = norms.shape[1]
    R = (2 if L == 8 else 4) if V == 4 else 4  # _rows_per_tile(L, V), inlined for numba
    rows = e - s
    buf = np.empty((R, slab), np.float32)
    mins = np.empty(R, np.float32)
    idxs = np.empty(R, np.int64)
    thr = np.zeros(R, np.float32)
    nears = np.empty(R, np.int64)
    exact = np.empty(W, np.float64)
    coef = np.float32((dsub + 2) * 2.0**-22)  # kernels.TIE_BOUND: the derivation is there
    want_dist = dist.shape[0] > 0
    # ||x_i||^2 >= ||x_im||^2 gives every subspace a loose near-tie margin for the cost of one vectorised pass;
    # the few rows within it (0.1-0.5 % of (row, subspace) pairs on the benchmark data) get the exact test.
    rn = np.empty(rows, np.float32)
    _row_norms(x, s, e, rn)
    # The last rows % R rows go through the same kernel from a zero-padded copy: same arithmetic.
    nfull = rows // R * R
    tail = np.zeros((R, d), np.float32)
    for i in range(nfull, rows):
        for c in range(d):
            tail[i - nfull, c] = x[s + i, c]
    if ldk <= slab:
        # One slab holds the whole codebook (nbits <= 8 up to dsub 32): the tile's answer is final and buf
        # holds every distance of its rows, so each row is decided right after its tile.
        nblk = ldk // W
        for m in range(M):
            o = m * dsub
            coff = m * nblk * dsub * W
            c2 = np.float32(2) * cmax[m]
            for r0 in range(0, rows, R):
                nr = min(R, rows - r0)
                for r in range(nr):
                    thr[r] = coef * (rn[r0 + r] + c2)
                if r0 < nfull:
                    _tile(x, (s + r0) * d + o, d, ct, coff, norms, m * ldk, dsub, nblk, buf, slab, mins, idxs, thr,
                          nears, L, V, D)
                else:
                    _tile(tail, o, d, ct, coff, norms, m * ldk, dsub, nblk, buf, slab, mins, idxs, thr, nears, L, V, D)
                for r in range(nr):
                    i = s + r0 + r
                    if nears[r]:
                        k, dv = _decide(x, i, o, ct, m, ksub, coef, c2, buf[r], idxs[r], exact)
                        out[i, m] = k
                        if want_dist:
                            dist[i, m] = dv
                    else:
                        out[i, m] = idxs[r]
                        if want_dist:
                            dist[i, m] = max(np.float32(0), _sub_norm(x, i, o, dsub) + mins[r])
        return
    bestv = np.empty(rows, np.float32)
    besti = np.empty(rows, np.int64)
    nearv = np.empty(rows, np.bool_)
    for m in range(M):
        o = m * dsub
        c2 = np.float32(2) * cmax[m]
        bestv[:] = np.inf
        besti[:] = 0
        nearv[:] = False
        for k0 in range(0, ldk, slab):
            nblk = min(slab, ldk - k0) // W
            coff = (m * (ldk // W) + k0 // W) * dsub * W
            noff = m * ldk + k0
            for r0 in range(0, rows, R):
                nr = min(R, rows - r0)
                for r in range(nr):
                    thr[r] = coef * (rn[r0 + r] + c2)
                if r0 < nfull:
                    _tile(x, (s + r0) * d + o, d, ct, coff, norms, noff, dsub, nblk, buf, slab, mins, idxs, thr,
                          nears, L, V, D)
                else:
                    _tile(tail, o, d, ct, coff, norms, noff, dsub, nblk, buf, slab, mins, idxs, thr, nears, L, V, D)
                for r in range(nr):
                    i = r0 + r
                    # strict '<': an earlier slab keeps a tie, so the lowest index wins overall; either way a
                    # runner-up from the other side within the margin marks the row
                    if mins[r] < bestv[i]:
                        nearv[i] = nears[r] != 0 or bestv[i] <= mins[r] + thr[r]
                        bestv[i] = mins[r]
                        besti[i] = k0 + idxs[r]
                    elif mins[r] <= bestv[i] + thr[r]:
                        nearv[i] = True
        for i in range(rows):
            # Rows within the loose margin are re-ranked outright: the runner-up's value is not kept across
            # slabs, and at these codebook sizes the re-rank of ~0.1 % of rows costs about 1 %.
            if nearv[i]:
                k, bd = _exact_nearest(x, s + i, o, ct, m, ksub, exact)
                out[s + i, m] = k
                if want_dist:
                    dist[s + i, m] = np.float32(bd)
            else:
                out[s + i, m] = besti[i]
                if want_dist:
                    dist[s + i, m] = max(np.float32(0), _sub_norm(x, s + i, o, dsub) + bestv[i])


# The tile shape (L, V) and the constant dsub D must be compile-time constants. They reach the kernels as
# closure constants of one specialised kernel per value, not as numba.literally() arguments: a literal
# argument sends every call back through numba's typing (milliseconds, and reference cycles that keep each
# call's arrays alive until the garbage collector runs: hundreds of MiB per Dask worker).
@functools.lru_cache(maxsize=None)
def _assign_kernel(L: int, V: int, D: int):
    @njit(cache=True, nogil=True, parallel=True)
    def kernel(x, ct, norms, cmax, ksub, slab, out, dist):
        n = x.shape[0]
        for c in prange((n + _CHUNK_ROWS - 1) // _CHUNK_ROWS):
            _assign_rows(x, ct, norms, cmax, ksub, slab, out, dist, c * _CHUNK_ROWS,
                         min(n, (c + 1) * _CHUNK_ROWS), L, V, D)

    return kernel


@njit(cache=True, nogil=True)
def _accumulate_cols(x, codes, ksub, sums, counts, c0, c1, dsub):
    """Columns c0:c1 of x into sums and counts; False if a code is out of range."""
    # dsub as a compile-time constant turns the common whole-subspace update into straight-line code.
    numba.literally(dsub)
    n = x.shape[0]
    ok = True
    for i in range(n):
        for m in range(c0 // dsub, (c1 - 1) // dsub + 1):
            k = np.int64(codes[i, m])
            if k < 0 or k >= ksub:
                ok = False
                continue
            o = m * dsub
            if o >= c0 and o + dsub <= c1:
                counts[m, k] += 1
                for j in range(dsub):
                    sums[m, k, j] += x[i, o + j]
            else:  # a subspace split between tasks (only when there are more tasks than subspaces)
                if o >= c0:
                    counts[m, k] += 1
                # unsigned indices skip numba's negative-index wrap-around, so the loop vectorises
                for j in range(np.uint64(max(c0 - o, 0)), np.uint64(min(c1 - o, dsub))):
                    sums[m, k, j] += x[i, np.uint64(o) + j]
    return ok


@functools.lru_cache(maxsize=None)
def _accumulate_kernel(dsub: int):
    @njit(cache=True, nogil=True, parallel=True)
    def kernel(x, codes, ksub, sums, counts, ntask, bad):
        d = x.shape[1]
        M = d // dsub
        for t in prange(ntask):
            if ntask <= M:  # whole subspaces per task
                c0 = t * M // ntask * dsub
                c1 = (t + 1) * M // ntask * dsub
            else:
                c0 = t * d // ntask
                c1 = (t + 1) * d // ntask
            bad[t] = not _accumulate_cols(x, codes, ksub, sums, counts, c0, c1, dsub)

    return kernel


# ---------------------------------------------------------------------------------------------------------
# LLVM IR micro-kernel

_f32 = ir.FloatType()
_i32 = ir.IntType(32)
_i64 = ir.IntType(64)


def _c64(v: int) -> ir.Constant:
    return ir.Constant(_i64, v)


@contextmanager
def _for(b: ir.IRBuilder, start, stop):
    """for i in range(start, stop) as a yielded i64 phi."""
    pre = b.block
    hdr = b.append_basic_block("for.hdr")
    body = b.append_basic_block("for.body")
    end = b.append_basic_block("for.end")
    b.branch(hdr)
    b.position_at_end(hdr)
    i = b.phi(_i64)
    i.add_incoming(start, pre)
    b.cbranch(b.icmp_signed("<", i, stop), body, end)
    b.position_at_end(body)
    yield i
    i.add_incoming(b.add(i, _c64(1)), b.block)
    b.branch(hdr)
    b.position_at_end(end)


def _splat(b, val, L):
    v = b.insert_element(ir.Constant(ir.VectorType(val.type, L), ir.Undefined), val, ir.Constant(_i32, 0))
    return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, L), [0] * L))


def _vptr(b, base, off, L):
    return b.bitcast(b.gep(base, [off]), ir.VectorType(_f32, L).as_pointer())


def _vmin(b, a, c):
    # select(a < c, a, c) is exactly x86 MINPS, so this is one instruction without any fast-math flag.
    return b.select(b.fcmp_ordered("<", a, c), a, c)


def _hmin(b, vec, L, lt):
    """min over the lanes of vec (by halving), lt(a, c) -> vector of i1."""
    w = L
    while w > 1:
        w //= 2
        sh = b.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_i32, L), [(i + w) % L for i in range(L)]))
        vec = b.select(lt(vec, sh), vec, sh)
    return b.extract_element(vec, ir.Constant(_i32, 0))


def _tile_fn(module: ir.Module, L: int, V: int, R: int, D: int) -> ir.Function:
    """void tile(x, ldx, ct, nm, dsub, nblk, buf, ldb, mins, idx, thr, near)

    For rows r < R (x + r*ldx, dsub floats) and centroids k < nblk*W (W = L*V; block b of ct holds
    ct[j, k] at ct + (b*dsub + j)*W + k%W; nm + k):
    dist[r, k] = nm[k] + sum_j x[r, j] * ct[j, k], one fmuladd per j in j order, stored to buf + r*ldb;
    mins[r] = min_k dist[r, k] and idx[r] = the lowest k attaining it; near[r] = 1 if some k != idx[r] has
    dist[r, k] <= mins[r] + thr[r] (a runner-up within the margin thr[r] >= 0), else 0.
    """
    name = f"pqgpu_pq_tile_L{L}_V{V}_R{R}_D{D}"
    if name in module.globals:
        return module.globals[name]
    fp = _f32.as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [fp, _i64, fp, fp, _i64, _i64, fp, _i64, fp, _i64.as_pointer(), fp,
                                                  _i64.as_pointer()])
    fn = ir.Function(module, fnty, name)
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    if L * 32 > 256:
        # CPUs tuned to prefer 256-bit vectors (most AVX-512 ones) would otherwise split each 512-bit
        # operation in two. llvmlite has no API for string attributes, hence set.add; should that ever
        # fail, the kernel is still correct, only slower.
        try:
            set.add(fn.attributes, f'"min-legal-vector-width"="{L * 32}"')
            set.add(fn.attributes, f'"prefer-vector-width"="{L * 32}"')
        except TypeError:
            pass
    for a in (0, 2, 3, 6, 8, 9, 10, 11):
        fn.args[a].add_attribute("noalias")
    x, ldx, ct, nm, dsub, nblk, buf, ldb, mins, idx, thr, near = fn.args
    if D:
        dsub = _c64(D)  # a constant trip count: LLVM unrolls the j loop and folds the offsets
    vt = ir.VectorType(_f32, L)
    it = ir.VectorType(_i32, L)
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    # fmuladd fuses where the CPU has FMA and is a plain multiply-add elsewhere: never a slow libcall.
    fmuladd = cgutils.get_or_insert_function(module, ir.FunctionType(vt, [vt, vt, vt]), f"llvm.fmuladd.v{L}f32")
    cttz = cgutils.get_or_insert_function(module, ir.FunctionType(_i64, [_i64, ir.IntType(1)]), "llvm.cttz.i64")
    ctpop = cgutils.get_or_insert_function(module, ir.FunctionType(_i64, [_i64]), "llvm.ctpop.i64")
    # Allocas in the entry block become registers (mem2reg); they only make the IR easy to write.
    acc = [[b.alloca(vt) for _ in range(V)] for _ in range(R)]
    best = [b.alloca(vt) for _ in range(R)]  # per lane: smallest distance so far
    bblk = [b.alloca(it) for _ in range(R)]  # per lane: first block that reached it
    # per lane: second smallest of the per-block minima (a lower bound on every other value of the lane
    # outside the best block); with best it bounds the runner-up at 2 operations per row and block.
    second = [b.alloca(vt) for _ in range(R)]
    inf_v = _splat(b, ir.Constant(_f32, float("inf")), L)
    for r in range(R):
        b.store(inf_v, best[r])
        b.store(inf_v, second[r])
        b.store(ir.Constant(it, [0] * L), bblk[r])
    W = L * V

    def accumulate(blk):
        """acc[r][v] = the block's distances of row r (the FMA loop); returns the block's first index."""
        k0 = b.mul(blk, _c64(W))
        for v in range(V):
            nv = b.load(_vptr(b, nm, b.add(k0, _c64(v * L)), L), align=4)
            for r in range(R):
                b.store(nv, acc[r][v])
        cblk = b.mul(b.mul(blk, dsub), _c64(W))
        with _for(b, _c64(0), dsub) as j:
            crow = b.add(cblk, b.mul(j, _c64(W)))
            cv = [b.load(_vptr(b, ct, b.add(crow, _c64(v * L)), L), align=4) for v in range(V)]
            for r in range(R):
                xs = _splat(b, b.load(b.gep(x, [b.add(b.mul(_c64(r), ldx), j)])), L)
                for v in range(V):
                    b.store(b.call(fmuladd, [xs, cv[v], b.load(acc[r][v])]), acc[r][v])
        return k0

    def answer(r, vals, mv, base, also_near):
        """Row r's results from vals, the V vectors of distances at centroid base that hold the minimum mv:
        mins[r] = mv, idx[r] = base + the first lane equal to mv, near[r] = a second distance within the margin
        among vals, or also_near (an i1, or None)."""
        mvs = _splat(b, mv, L)
        lim = _splat(b, b.fadd(mv, b.load(b.gep(thr, [_c64(r)]))), L)
        mask = _bits(b, [b.fcmp_ordered("==", val, mvs) for val in vals], L)
        close = _bits(b, [b.fcmp_ordered("<=", val, lim) for val in vals], L)
        # No match only when no distance is finite (NaN in x): report index 0 then.
        found = b.icmp_unsigned("!=", mask, _c64(0))
        off = b.call(cttz, [mask, ir.Constant(ir.IntType(1), 0)])
        b.store(mv, b.gep(mins, [_c64(r)]))
        b.store(b.select(found, b.add(base, off), _c64(0)), b.gep(idx, [_c64(r)]))
        # the minimum itself is within the margin: a second bit in `close` is a runner-up (or a tie) within it
        hit = b.icmp_unsigned(">", b.call(ctpop, [close]), _c64(1))
        if also_near is not None:
            hit = b.or_(hit, also_near(lim))
        b.store(b.zext(hit, _i64), b.gep(near, [_c64(r)]))

    # One block (codebooks of at most W centroids, e.g. nbits 4): the row's distances are all in registers
    # after the FMA loop, so the per-block best / block / second bookkeeping below is skipped; near is then
    # just a second distance within the margin.
    one = b.append_basic_block("one_block")
    many = b.append_basic_block("many_blocks")
    b.cbranch(b.icmp_signed("==", nblk, _c64(1)), one, many)
    b.position_at_end(one)
    accumulate(_c64(0))
    for r in range(R):
        vals = [b.load(acc[r][v]) for v in range(V)]
        rb = b.mul(_c64(r), ldb)
        bm = None
        for v, a in enumerate(vals):
            b.store(a, _vptr(b, buf, b.add(rb, _c64(v * L)), L), align=4)  # for the exact test's runner-up
            bm = a if bm is None else _vmin(b, a, bm)
        answer(r, vals, _hmin(b, bm, L, lambda p, q: b.fcmp_ordered("<", p, q)), _c64(0), None)
    b.ret_void()
    b.position_at_end(many)
    with _for(b, _c64(0), nblk) as blk:
        k0 = accumulate(blk)
        blk32 = _splat(b, b.trunc(blk, _i32), L)
        for r in range(R):
            rb = b.add(b.mul(_c64(r), ldb), k0)
            bm = None
            for v in range(V):
                a = b.load(acc[r][v])
                b.store(a, _vptr(b, buf, b.add(rb, _c64(v * L)), L), align=4)
                bm = a if bm is None else _vmin(b, a, bm)
            # Tracking the block, not the index, costs 3 operations per row and block instead of 3 per
            # vector; the exact index is recovered from buf once, at the end.
            cur = b.load(best[r])
            better = b.fcmp_ordered("<", bm, cur)
            b.store(b.select(better, bm, cur), best[r])
            b.store(b.select(better, blk32, b.load(bblk[r])), bblk[r])
            b.store(_vmin(b, b.select(better, cur, bm), b.load(second[r])), second[r])
    for r in range(R):
        bv = b.load(best[r])
        mv = _hmin(b, bv, L, lambda p, q: b.fcmp_ordered("<", p, q))
        # Lanes holding the minimum. With one, the first occurrence lies in the block that lane recorded
        # (the first to reach its best). Two lanes holding it is a tie: the row is marked near, and the exact
        # re-rank, not idx, then decides.
        held = b.fcmp_ordered("==", bv, _splat(b, mv, L))
        hbits = b.zext(b.bitcast(held, ir.IntType(L)), _i64)
        lane = b.trunc(b.and_(b.call(cttz, [hbits, ir.Constant(ir.IntType(1), 0)]), _c64(L - 1)), _i32)
        base = b.mul(b.sext(b.extract_element(b.load(bblk[r]), lane), _i64), _c64(W))
        rb = b.add(b.mul(_c64(r), ldb), base)
        vals = [b.load(_vptr(b, buf, b.add(rb, _c64(v * L)), L), align=4) for v in range(V)]

        def outside(lim, held=held, hbits=hbits, bv=bv, r=r):
            # A runner-up within the margin lies either in the best block (a second bit in `close`, which
            # answer() tests), or in another lane (whose best is <= it), or in the winner's lane in another
            # block (>= that lane's second), or it is a tie between lanes.
            cand = b.select(held, b.load(second[r]), bv)
            within = b.icmp_unsigned("!=", b.bitcast(b.fcmp_ordered("<=", cand, lim), ir.IntType(L)),
                                     ir.Constant(ir.IntType(L), 0))
            return b.or_(within, b.icmp_unsigned(">", b.call(ctpop, [hbits]), _c64(1)))

        answer(r, vals, mv, base, outside)
    b.ret_void()
    return fn


def _bits(b, masks, L):
    """V masks <L x i1> -> one i64 bitmask, mask v in bits v*L .. v*L + L - 1 (concatenated mask registers)."""
    while len(masks) > 1:
        n = masks[0].type.count
        pairs = ir.Constant(ir.VectorType(_i32, 2 * n), list(range(2 * n)))
        masks = [b.shuffle_vector(masks[i], masks[i + 1], pairs) for i in range(0, len(masks), 2)]
    return b.zext(b.bitcast(masks[0], ir.IntType(masks[0].type.count)), _i64)


def _data(context, builder, aryty, ary, off):
    return builder.gep(context.make_array(aryty)(context, builder, ary).data, [off])


@intrinsic
def _tile(typingctx, x, xoff, ldx, ct, ctoff, nm, nmoff, dsub, nblk, buf, ldb, mins, idx, thr, near, L, V, D):
    """Calls the IR tile kernel on flat offsets into C-contiguous arrays; L, V and D (dsub, or 0 for a
    run-time dsub) must be literals."""
    if not all(isinstance(a, types.IntegerLiteral) for a in (L, V, D)):
        return None
    if any(a.layout != "C" for a in (x, ct, nm, buf, mins, idx, thr, near)):
        raise TypeError("_tile needs C-contiguous arrays")
    lanes, vecs, const_dsub = L.literal_value, V.literal_value, D.literal_value

    def codegen(context, builder, sig, args):
        a = sig.args
        fn = _tile_fn(builder.module, lanes, vecs, _rows_per_tile(lanes, vecs), const_dsub)
        builder.call(fn, [
            _data(context, builder, a[0], args[0], args[1]), args[2],
            _data(context, builder, a[3], args[3], args[4]),
            _data(context, builder, a[5], args[5], args[6]), args[7], args[8],
            _data(context, builder, a[9], args[9], _c64(0)), args[10],
            _data(context, builder, a[11], args[11], _c64(0)),
            _data(context, builder, a[12], args[12], _c64(0)),
            _data(context, builder, a[13], args[13], _c64(0)),
            _data(context, builder, a[14], args[14], _c64(0)),
        ])
        return context.get_dummy_value()

    sig = types.none(x, xoff, ldx, ct, ctoff, nm, nmoff, dsub, nblk, buf, ldb, mins, idx, thr, near, L, V, D)
    return sig, codegen
