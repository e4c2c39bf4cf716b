"""PQ kernels written once against the array API: they run on NumPy, CuPy and array_api_strict alike.

Shapes: x (n, d) float32; centroids (M, ksub, dsub) float32; codes (n, M) integer sub-codes;
packed codes (n, code_size) uint8 in faiss's layout (sub-codes LSB-first, consecutive bits).
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

# Upper bound for the (M, rows, ksub) float32 distance block; keeps encode memory independent of n.
DEFAULT_BLOCK_BYTES = 64 << 20

# TIE_BOUND: when the decomposed argmin may not be the nearest centroid.
# Both assign routes (this one and pqgpu._cpu) compute D'_k = fl(||c_k||^2 - 2 x.c_k) in float32, where
# D_k + ||x||^2 = ||x - c_k||^2 exactly. With u = 2^-24 and gamma_n = n u / (1 - n u), the classic bound for a
# float32 dot product of length dsub (any summation order, with or without FMA), plus ||c_k||^2 rounded
# once from float64 (pqgpu._cpu) or summed in float32 (here), plus one rounding to add it, is
#     e_k = |D'_k - D_k| <= gamma_{dsub+2} (||c_k||^2 + 2 sum_j |x_j c_kj|) <= gamma_{dsub+2} (||x||^2 + 2 cmax)
# using 2 |x|.|c| <= 2 ||x|| ||c|| <= ||x||^2 + ||c||^2, with cmax = max_k ||c_k||^2 of the subspace. If k* is
# the decomposed argmin and k^ the exact nearest, D'_{k^} <= D_{k^} + e <= D_{k*} + e <= D'_{k*} + 2e: k* can
# only be wrong when another centroid lies within 2e of it in D'. We use (dsub + 2) 2^-22 (||x||^2 + 2 cmax),
# twice 2e: the margin covers gamma's denominator and the float32 rounding of ||x||^2 and of the bound itself.
# Every such (row, subspace) is re-ranked by the float64 ||x - c_k||^2 over all k (no cancellation there:
# relative error <= (dsub + 1) 2^-53), lowest k on exact ties. The bound assumes IEEE float32 products;
# it does not hold for TF32 matmuls (CuPy uses them only when CUPY_TF32=1).
def tie_bound_coef(dsub: int) -> float:
    """Coefficient of (||x_m||^2 + 2 max_k ||c_mk||^2) in the near-tie bound (see TIE_BOUND above)."""
    return (dsub + 2) * 2.0**-22


def code_size(M: int, nbits: int) -> int:
    return (M * nbits + 7) // 8


def prepare_centroids(centroids: Any) -> tuple[Any, Any]:
    """(-2 c^T as (M, dsub, ksub), ||c||^2 as (M, 1, ksub)): the two operands of ||c||^2 - 2 x.c.

    Scaling by -2 is exact in floating point, so x @ (-2 c^T) == -2 (x @ c^T) bit for bit.
    """
    xp = array_namespace(centroids)
    ct = xp.permute_dims(centroids, (0, 2, 1)) * -2.0
    cnorm = xp.sum(centroids * centroids, axis=2)[:, None, :]
    return ct, cnorm


def rows_per_block(M: int, ksub: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows per block so that the (M, rows, ksub) float32 distance block stays within block_bytes."""
    return max(1, block_bytes // (4 * M * ksub))


def assign(x: Any, centroids: Any, *, block_bytes: int = DEFAULT_BLOCK_BYTES, prepared: Any = None) -> Any:
    """Nearest centroid per subspace. x (n, d) float32 -> (n, M) int64 (index dtype of the namespace).

    Distances are ||c||^2 - 2 x.c (the ||x||^2 term cannot change the argmin), computed by one batched
    matmul over all M subspaces per block of rows. Where the runner-up is within that decomposition's
    error bound (TIE_BOUND), the float64 ||x - c||^2 decides: the code is the exact nearest centroid, the
    lowest index on exact ties, the same as pqgpu._cpu.assign.
    """
    xp = array_namespace(x, centroids)
    M, ksub, dsub = centroids.shape
    n = x.shape[0]
    ct, cnorm = prepared if prepared is not None else prepare_centroids(centroids)
    cmax2 = 2.0 * xp.max(cnorm, axis=2)  # (M, 1)
    step = rows_per_block(M, ksub, block_bytes)
    parts = []
    for start in range(0, n, step):
        xb = x[start:min(start + step, n), :]
        b = xb.shape[0]
        xs = xp.permute_dims(xp.reshape(xb, (b, M, dsub)), (1, 0, 2))  # (M, b, dsub)
        dist = xp.matmul(xs, ct) + cnorm  # (M, b, ksub)
        idx = _rerank_near_ties(xp, xs, centroids, dist, xp.argmin(dist, axis=2), cmax2, block_bytes)
        parts.append(xp.permute_dims(idx, (1, 0)))
    if not parts:
        return xp.zeros((0, M), dtype=xp.int64)
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def _rerank_near_ties(xp, xs, centroids, dist, idx, cmax2, block_bytes: int) -> Any:
    """idx (M, b) with every (subspace, row) whose runner-up in dist (M, b, ksub) lies within the
    TIE_BOUND of the minimum replaced by its float64 nearest centroid. xs (M, b, dsub) are the rows."""
    M, b, dsub = xs.shape
    ksub = dist.shape[2]
    bound = tie_bound_coef(dsub) * (xp.sum(xs * xs, axis=2) + cmax2)  # (M, b)
    # fl(best + bound) >= every value within bound of best (rounding is monotone): no candidate is missed.
    thr = xp.min(dist, axis=2) + bound
    near = xp.count_nonzero(dist <= thr[:, :, None], axis=2) >= 2
    mi, bi = xp.nonzero(near)
    f = int(mi.shape[0])  # a device sync on GPU: one per block
    if f == 0:
        return idx
    flat = mi * b + bi  # ascending: nonzero lists them in row-major order
    xs_flat = xp.reshape(xs, (M * b, dsub))
    step = max(1, block_bytes // (8 * ksub * dsub))  # float64 (step, ksub, dsub) differences
    best = []
    for s in range(0, f, step):
        e = min(f, s + step)
        xsel = xp.astype(xp.take(xs_flat, flat[s:e], axis=0), xp.float64)
        csel = xp.astype(xp.take(centroids, mi[s:e], axis=0), xp.float64)
        diff = xsel[:, None, :] - csel
        best.append(xp.argmin(xp.sum(diff * diff, axis=2), axis=1))  # first occurrence: lowest k on ties
    new = best[0] if len(best) == 1 else xp.concat(best)
    # Scatter the f new codes into idx without item assignment (not in the array API): each position finds
    # its slot in the sorted `flat` by binary search.
    pos = xp.arange(M * b, dtype=flat.dtype)
    slot = xp.minimum(xp.searchsorted(flat, pos), f - 1)
    hit = xp.take(flat, slot) == pos
    out = xp.where(hit, xp.astype(xp.take(new, slot), idx.dtype), xp.reshape(idx, (M * b,)))
    return xp.reshape(out, (M, b))


def pack_codes(codes: Any, nbits: int) -> Any:
    """(n, M) integer sub-codes -> (n, code_size) uint8, faiss layout (LSB-first, consecutive)."""
    xp = array_namespace(codes)
    n, M = codes.shape
    if nbits == 8:
        return xp.astype(codes, xp.uint8)
    c = xp.astype(codes, xp.uint32)
    if nbits == 16:
        lo = xp.astype(c & 0xFF, xp.uint8)
        hi = xp.astype(c >> 8, xp.uint8)
        return xp.reshape(xp.stack([lo, hi], axis=2), (n, 2 * M))
    cs = code_size(M, nbits)
    shifts = xp.arange(nbits, dtype=xp.uint32)
    bits = xp.reshape((c[:, :, None] >> shifts) & 1, (n, M * nbits))
    pad = cs * 8 - M * nbits
    if pad:
        bits = xp.concat([bits, xp.zeros((n, pad), dtype=xp.uint32)], axis=1)
    weights = xp.astype(2 ** xp.arange(8, dtype=xp.uint32), xp.uint32)
    packed = xp.sum(xp.reshape(bits, (n, cs, 8)) * weights, axis=2, dtype=xp.uint32)
    return xp.astype(packed, xp.uint8)


def unpack_codes(packed: Any, M: int, nbits: int) -> Any:
    """(n, code_size) uint8 -> (n, M) int32 sub-codes; inverse of pack_codes."""
    xp = array_namespace(packed)
    n = packed.shape[0]
    if packed.shape[1] != code_size(M, nbits):
        raise ValueError(f"packed codes have {packed.shape[1]} bytes per row; M={M}, nbits={nbits} needs "
                         f"{code_size(M, nbits)}")
    if nbits == 8:
        return xp.astype(packed, xp.int32)
    p = xp.astype(packed, xp.uint32)
    if nbits == 16:
        pairs = xp.reshape(p, (n, M, 2))
        return xp.astype(pairs[:, :, 0] | (pairs[:, :, 1] << 8), xp.int32)
    shifts8 = xp.arange(8, dtype=xp.uint32)
    bits = xp.reshape((p[:, :, None] >> shifts8) & 1, (n, -1))[:, : M * nbits]
    weights = xp.astype(2 ** xp.arange(nbits, dtype=xp.uint32), xp.uint32)
    codes = xp.sum(xp.reshape(bits, (n, M, nbits)) * weights, axis=2, dtype=xp.uint32)
    return xp.astype(codes, xp.int32)


def decode(codes: Any, centroids: Any) -> Any:
    """(n, M) integer sub-codes -> (n, d) float32 reconstructions."""
    xp = array_namespace(codes, centroids)
    M, ksub, dsub = centroids.shape
    n = codes.shape[0]
    flat = xp.reshape(centroids, (M * ksub, dsub))
    offsets = xp.arange(M, dtype=xp.int64) * ksub
    idx = xp.reshape(xp.astype(codes, xp.int64) + offsets, (-1,))
    return xp.reshape(xp.take(flat, idx, axis=0), (n, M * dsub))


def distance_tables(queries: Any, centroids: Any) -> Any:
    """ADC look-up tables: (nq, d) queries -> (nq, M, ksub) float32 squared L2 distances ||q_m - c_mk||^2."""
    xp = array_namespace(queries, centroids)
    M, ksub, dsub = centroids.shape
    nq = queries.shape[0]
    ct, cnorm = prepare_centroids(centroids)
    qs = xp.permute_dims(xp.reshape(queries, (nq, M, dsub)), (1, 0, 2))  # (M, nq, dsub)
    qnorm = xp.sum(qs * qs, axis=2)[:, :, None]
    tab = xp.matmul(qs, ct) + cnorm + qnorm  # (M, nq, ksub)
    return xp.permute_dims(tab, (1, 0, 2))



def inner_product_tables(queries: Any, centroids: Any) -> Any:
    """ADC look-up tables for inner product: (nq, d) queries -> (nq, M, ksub) <q_m, c_mk> (faiss
    compute_inner_prod_tables); the score of a code is the sum of its M entries."""
    xp = array_namespace(queries, centroids)
    M, ksub, dsub = centroids.shape
    nq = queries.shape[0]
    qs = xp.permute_dims(xp.reshape(queries, (nq, M, dsub)), (1, 0, 2))  # (M, nq, dsub)
    tab = xp.matmul(qs, xp.permute_dims(centroids, (0, 2, 1)))  # (M, nq, ksub)
    return xp.permute_dims(tab, (1, 0, 2))


def assign_ip(x: Any, centroids: Any, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> Any:
    """Largest inner product: x (n, d), centroids (k, d) float32 -> (n,) int64 argmax_k <x, c_k> (faiss
    IndexFlatIP.assign), lowest k on exact ties.

    float32 dot products, blocked; where the runner-up lies within the float32 error bound of the best
    ((d + 2) 2^-22 ||x|| max_k ||c_k||, twice the classic gamma_d bound, as TIE_BOUND for L2) the float64
    products decide, so the answer is the exact argmax whatever the summation order."""
    xp = array_namespace(x, centroids)
    n, d = x.shape
    k = centroids.shape[0]
    ct = xp.permute_dims(centroids, (1, 0))  # (d, k)
    cmax = xp.sqrt(xp.max(xp.sum(centroids * centroids, axis=1)))
    step = max(1, block_bytes // (4 * max(k, 1)))
    parts = []
    for start in range(0, n, step):
        xb = x[start:min(start + step, n), :]
        s = xp.matmul(xb, ct)  # (b, k)
        idx = xp.argmax(s, axis=1)
        bound = (d + 2) * 2.0**-22 * xp.sqrt(xp.sum(xb * xb, axis=1)) * cmax
        near = xp.count_nonzero(s >= (xp.max(s, axis=1) - bound)[:, None], axis=1) >= 2
        (rows,) = xp.nonzero(near)
        f = int(rows.shape[0])
        if f:
            xs = xp.astype(xp.take(xb, rows, axis=0), xp.float64)
            exact = xp.argmax(xp.matmul(xs, xp.astype(ct, xp.float64)), axis=1)  # first: lowest k on ties
            pos = xp.arange(xb.shape[0], dtype=rows.dtype)
            slot = xp.minimum(xp.searchsorted(rows, pos), f - 1)
            hit = xp.take(rows, slot) == pos
            idx = xp.where(hit, xp.astype(xp.take(exact, slot), idx.dtype), idx)
        parts.append(xp.astype(idx, xp.int64))
    if not parts:
        return xp.zeros((0,), dtype=xp.int64)
    return parts[0] if len(parts) == 1 else xp.concat(parts)
