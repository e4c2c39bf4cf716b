"""The search metric of a quantizer: l2, ip (inner product) or cosine, as faiss's metric_type.

- ``l2``: squared Euclidean distance, smaller is better (faiss METRIC_L2).
- ``ip``: inner product <q, x> of the vectors as they are, larger is better (faiss METRIC_INNER_PRODUCT).
- ``cosine``: every row is L2-normalised before training and encoding, and every query before searching;
  then inner product (faiss's "L2norm" + METRIC_INNER_PRODUCT). Scores are cosine similarities.

PQ training is L2 k-means for every metric, as in faiss; only an IVF coarse quantizer changes with it
(spherical k-means with inner-product assignment, as faiss IndexIVF does for METRIC_INNER_PRODUCT).

Where the metric is recorded: the store attribute ``metric``; an IVF quantizer file (a faiss index) carries
faiss's own metric_type header field (0 = inner product, 1 = L2), and cosine is an inner-product index behind
faiss's L2 normalisation transform (what index_factory "L2norm,IVF..,PQ.." builds), so faiss.read_index of it
normalises queries itself; a plain ProductQuantizer file has no metric field, so a non-L2 metric is written
beside it in ``<quantizer.path>.metric`` (one word, like ``.opq``); no such file means l2.

`exact_scores` is the exact metric between queries and vectors (for re-ranking and ground truth).
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

from .errors import ConfigError, InputError

METRICS = ("l2", "ip", "cosine")
# faiss MetricType values as written in index headers
FAISS_METRIC_INNER_PRODUCT = 0
FAISS_METRIC_L2 = 1


def check_metric(metric: Any, where: str = "quantizer.metric") -> str:
    """The metric name, or ConfigError listing the valid names."""
    if not isinstance(metric, str) or metric not in METRICS:
        raise ConfigError(f"{where}: expected one of {', '.join(METRICS)} (l2: squared Euclidean distance; ip: "
                          "inner product; cosine: rows and queries L2-normalised, then inner product). "
                          f"Got {metric!r} instead.")
    return metric


def is_similarity(metric: str) -> bool:
    """True when larger scores are better (ip, cosine)."""
    return check_metric(metric) != "l2"


def faiss_metric_type(metric: str) -> int:
    return FAISS_METRIC_L2 if check_metric(metric) == "l2" else FAISS_METRIC_INNER_PRODUCT


def zero_norm_rows(x: Any) -> tuple[int, int]:
    """(first row, count) of the rows of x (n, d), on any namespace, whose L2 norm is zero (cosine cannot
    normalise them); (-1, 0) when there is none."""
    xp = array_namespace(x)
    zero = xp.sum(x * x, axis=1) == 0
    count = int(xp.count_nonzero(zero))
    return (int(xp.argmax(xp.astype(zero, xp.int8))) if count else -1), count


def normalize_rows(x: Any, what: str = "vectors", *, row_offset: int = 0) -> Any:
    """x (n, d) float32 with every row divided by its L2 norm, on x's namespace (NumPy, CuPy, array_api_strict).

    A zero row cannot be normalised: InputError naming the first one (counted from row_offset). The norm is
    summed in float32, as faiss's fvec_renorm_L2."""
    xp = array_namespace(x)
    norm = xp.sqrt(xp.sum(x * x, axis=1))
    if x.shape[0] and bool(xp.any(norm == 0)):
        first, count = zero_norm_rows(x)
        raise InputError(f"{what}: row {row_offset + first} is all zeros ({count} such row(s) in this "
                         "block): quantizer.metric cosine divides every row by its norm. Drop or fix zero "
                         "vectors, or use metric ip or l2.")
    return x / norm[:, None]


def exact_scores(queries: Any, vectors: Any, metric: str) -> Any:
    """Exact metric between queries (nq, d) and vectors (n, d), float64, on their namespace -> (nq, n):
    l2: squared distances ||q - x||^2 (smaller is better); ip: <q, x>; cosine: <q, x> / (||q|| ||x||)
    (larger is better). Computed in float64 (one matmul; memory nq x n), so re-ranking PQ candidates with it
    orders them as the exact metric does up to float64 rounding (ties: callers keep the lower row). A zero
    vector under cosine is an error."""
    metric = check_metric(metric)
    xp = array_namespace(queries, vectors)
    q = xp.astype(queries, xp.float64)
    x = xp.astype(vectors, xp.float64)
    if metric == "cosine":
        q = normalize_rows(q, "queries")
        x = normalize_rows(x, "vectors")
    dots = xp.matmul(q, xp.permute_dims(x, (1, 0)))
    if metric != "l2":
        return dots
    # ||q||^2 + ||x||^2 - 2 <q, x> in float64 (no (nq, n, d) temporary): its cancellation error, ~1e-16 of the
    # norms, is far below the float32 resolution of the inputs
    dist = xp.sum(q * q, axis=1)[:, None] + xp.sum(x * x, axis=1)[None, :] - 2.0 * dots
    return xp.maximum(dist, xp.zeros_like(dist))
