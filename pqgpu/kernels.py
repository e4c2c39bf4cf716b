"""PQ kernels written once against the array API: they run on NumPy, CuPy and array_api_strict alike.

Shapes: x (n, d) float32; centroids (M, ksub, dsub) float32; codes (n, M) integer sub-codes;
packed codes (n, code_size) uint8 in faiss's layout (sub-codes LSB-first, consecutive bits).
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

# Upper bound for the (M, rows, ksub) float32 distance block; keeps encode memory independent of n.
DEFAULT_BLOCK_BYTES = 64 << 20


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
    matmul over all M subspaces per block of rows; ties resolve to the lowest index.
    """
    xp = array_namespace(x, centroids)
    M, ksub, dsub = centroids.shape
    n = x.shape[0]
    ct, cnorm = prepared if prepared is not None else prepare_centroids(centroids)
    step = rows_per_block(M, ksub, block_bytes)
    parts = []
    for start in range(0, n, step):
        xb = x[start:min(start + step, n), :]
        b = xb.shape[0]
        xs = xp.permute_dims(xp.reshape(xb, (b, M, dsub)), (1, 0, 2))  # (M, b, dsub)
        dist = xp.matmul(xs, ct) + cnorm  # (M, b, ksub)
        parts.append(xp.permute_dims(xp.argmin(dist, axis=2), (1, 0)))
    if not parts:
        return xp.zeros((0, M), dtype=xp.int64)
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


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

