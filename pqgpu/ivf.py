"""IVF-PQ quantizer: a coarse k-means of nlist lists plus a PQ of the residuals (faiss IndexIVFPQ, by_residual).

A row x (after the optional OPQ rotation R: y = R x) goes to list l = argmin_l ||y - c_l||^2 and is stored as
the PQ code of the residual y - c_l, exactly what faiss's IndexIVFPQ (inside IndexPreTransform with OPQ)
computes for `add`. With metric ip or cosine (cosine: rows L2-normalised first) the list is
argmax_l <y, c_l> and the coarse centroids come from spherical k-means with inner-product assignment, as
faiss's IndexIVF trains its IndexFlatIP quantizer for METRIC_INNER_PRODUCT (cp.spherical = true); the
residual PQ is L2 k-means either way.
The trained quantizer is written as a faiss index file, in pure Python (faiss is not a runtime dependency). Layout, all little-endian, as faiss's index_write.cpp writes it:

    index header  = d:int32 ntotal:int64 dummy:int64 dummy:int64 is_trained:uint8 metric_type:int32
                    (1 = L2, 0 = inner product; cosine = inner product behind an L2 normalisation)
    IndexFlat     = "IxF2" (L2) | "IxFI" (IP) header  count:uint64 (= nlist*d) float32[nlist*d]  (coarse)
    IndexIVFPQ    = "IwPQ" header  nlist:uint64 nprobe:uint64  <IndexFlat>  direct_map_type:int8
                    direct_map:uint64 count (+ int64s)  by_residual:uint8  code_size:uint64
                    ProductQuantizer (d, M, nbits:uint64, count:uint64, float32 centroids)  <invlists>
    invlists      = "il00" (none) | "ilar" nlist:uint64 code_size:uint64 ("full" sizes:uint64 vec |
                    "sprs" (list, size) pairs:uint64 vec) then per non-empty list: codes bytes, int64 ids
    OPQ / cosine  = "IxPT" header nt:int32 [<"VNrm" norm:float32 d_in:int32 d_out:int32 is_trained:uint8>]
                    [<VectorTransform "LTra" ...>] <IndexIVFPQ>   (VNrm: faiss's L2norm, metric cosine)
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np
from array_api_compat import array_namespace

from . import kernels
from .backend import namespace, resolve_backend, to_device, to_host
from .codebook import Codebook, as_float32_matrix, atomic_write_bytes, check_params, normalize_training
from .errors import ConfigError, InputError
from .metric import FAISS_METRIC_INNER_PRODUCT, FAISS_METRIC_L2, check_metric, faiss_metric_type, normalize_rows

log = logging.getLogger(__name__)

METRIC_L2 = FAISS_METRIC_L2
_DUMMY = 1 << 20
# faiss reads an IVF list number as int64 and our lists array is int32; nlist beyond this is never needed.
MAX_NLIST = 1 << 24
_INDEX_FOURCCS = (b"IwPQ", b"IvPQ", b"IxPT")


def check_nlist(nlist: Any, n_train: int | None = None) -> int:
    """nlist: 0 (plain PQ) or a positive integer <= MAX_NLIST and <= the training rows."""
    if isinstance(nlist, bool) or not isinstance(nlist, (int, np.integer)) or nlist < 0:
        raise ConfigError(f"quantizer.nlist: expected 0 (plain PQ) or a positive number of IVF lists. "
                          f"Got {nlist!r} instead.")
    if nlist > MAX_NLIST:
        raise ConfigError(f"quantizer.nlist: at most {MAX_NLIST} lists are supported. Got {nlist} instead.")
    if n_train is not None and nlist > n_train:
        raise InputError(f"quantizer.nlist={nlist} is larger than the {n_train} rows of the training sample: "
                         "k-means needs at least one row per list (faiss recommends >= 39). Lower quantizer.nlist "
                         "or raise quantizer.train_size (the source must hold that many rows).")
    return int(nlist)


@dataclass(frozen=True, eq=False)
class IvfCodebook(Codebook):
    """A Codebook whose PQ encodes residuals to the nearest of `coarse` (nlist, d) float32 centroids (in the
    rotated space when there is an OPQ rotation). `codes` of a row are the PQ code of y - coarse[list]."""

    coarse: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        c = np.ascontiguousarray(self.coarse, dtype=np.float32) if self.coarse is not None else None
        if c is None or c.ndim != 2 or c.shape[1] != self.d or c.shape[0] < 1:
            raise InputError(f"coarse centroids: expected float32 (nlist, {self.d}). "
                             f"Got {None if c is None else c.shape} instead.")
        object.__setattr__(self, "coarse", c)
        object.__setattr__(self, "_cache", {})

    @property
    def nlist(self) -> int:
        return int(self.coarse.shape[0])

    @property
    def pq(self) -> Codebook:
        """The residual PQ alone (no rotation, no coarse quantizer, metric l2: residuals are not normalised)."""
        return Codebook(self.d, self.M, self.nbits, self.centroids)

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"pqgpu-ivf-v1")
        h.update(super().fingerprint().encode())
        h.update(struct.pack("<Q", self.nlist))
        h.update(np.ascontiguousarray(self.coarse, dtype="<f4").tobytes())
        return h.hexdigest()

    # -- encoding ---------------------------------------------------------------------------------------

    def assign_lists(self, y: np.ndarray) -> np.ndarray:
        """Nearest coarse centroid of rotated host rows y float32 (n, d) -> int32 (n,) (ties: lowest list);
        for ip / cosine the largest inner product (faiss IndexFlatIP.assign)."""
        if self.metric != "l2":
            return np.asarray(kernels.assign_ip(y, self.coarse)).astype(np.int32)
        if self.nlist <= 65536:
            try:
                from . import _cpu
            except ImportError:
                _cpu = None
            if _cpu is not None:
                prepared = self._cache.get("coarse")
                if prepared is None:
                    prepared = self._cache["coarse"] = _cpu.prepare(self.coarse[None])
                return _cpu.assign(y, prepared)[:, 0].astype(np.int32)
        return np.asarray(kernels.assign(y, self.coarse[None]))[:, 0].astype(np.int32)

    def encode_ivf(self, x: Any, backend: str = "auto", *, row_offset: int = 0,
                   checked: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """float vectors (n, d) -> (lists int32 (n,), residual codes uint8 (n, code_size)), equal to faiss
        IndexIVFPQ's quantizer.assign and pq.compute_codes of the residual (except at float32 ties)."""
        if not checked:
            x = as_float32_matrix(x, "vectors to encode", d=self.d, row_offset=row_offset)
        if resolve_backend(backend) == "gpu":
            return encode_ivf_xp(x, self, namespace("gpu"), row_offset=row_offset)
        y = self.rotate(self.prepare(x, "vectors to encode", row_offset=row_offset))
        lists = self.assign_lists(y)
        residual = y - self.coarse[lists]
        return lists, self.pq.encode(residual, "cpu", checked=True)

    def encode(self, x: Any, backend: str = "auto", *, row_offset: int = 0, checked: bool = False) -> np.ndarray:
        """The residual codes of encode_ivf (the `codes` a store holds); the lists are dropped."""
        return self.encode_ivf(x, backend, row_offset=row_offset, checked=checked)[1]

    def decode_ivf(self, codes: Any, lists: Any) -> np.ndarray:
        """Residual codes (n, code_size) and their lists (n,) -> float32 reconstructions (n, d), unrotated."""
        y = self.pq.decode(codes) + self.coarse[np.asarray(lists, dtype=np.int64)]
        return y if self.rotation is None else np.ascontiguousarray(y @ self.rotation)

    # -- files ------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write a trained, empty faiss IndexIVFPQ (IndexPreTransform with OPQ and / or, for cosine, faiss's
        L2 normalisation) atomically; the metric is in the file's own header (no .metric sidecar)."""
        from .codebook import write_metric_sidecar

        buf = io.BytesIO()
        write_index(buf, self, sizes=np.zeros(self.nlist, np.int64), lists_data=())
        atomic_write_bytes(Path(path), buf.getvalue())
        write_metric_sidecar(path, self.metric, needed=False)  # a stale one from a plain-PQ quantizer here

    @classmethod
    def load(cls, path: str | os.PathLike) -> "IvfCodebook":
        return read_index(path)[0]


def encode_ivf_xp(x: np.ndarray, cb: IvfCodebook, xp: Any, *, row_offset: int = 0,
                  prepared: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """encode_ivf with the array-API kernels on namespace xp (CuPy on the GPU; array_api_strict in tests).
    prepared: x is already normalised (cosine) and rotated."""
    xd = to_device(x, xp)
    if not prepared:
        if cb.metric == "cosine":  # on the device, as the rest of the encode
            xd = normalize_rows(xd, "vectors to encode", row_offset=row_offset)
        if cb.rotation is not None:
            xd = xp.matmul(xd, xp.permute_dims(to_device(cb.rotation, xp), (1, 0)))
    coarse = to_device(cb.coarse, xp)
    lists = assign_coarse(xd, coarse, cb.metric)
    residual = xd - xp.take(coarse, lists, axis=0)
    sub = kernels.assign(residual, to_device(cb.centroids, xp))
    codes = kernels.pack_codes(sub, cb.nbits)
    return to_host(lists).astype(np.int32), to_host(codes).astype(np.uint8)


def assign_coarse(y: Any, coarse: Any, metric: str) -> Any:
    """List of each rotated row y (n, d) on any namespace: nearest coarse centroid (l2) or largest inner
    product (ip, cosine) -> (n,) int64, ties to the lowest list."""
    xp = array_namespace(y)
    if metric != "l2":
        return kernels.assign_ip(y, coarse)
    return kernels.assign(y, xp.reshape(coarse, (1, coarse.shape[0], coarse.shape[1])))[:, 0]


# -- training -------------------------------------------------------------------------------------------

def train_coarse(y: np.ndarray, nlist: int, *, niter: int, seed: int, backend: str,
                 metric: str = "l2") -> np.ndarray:
    """k-means of nlist centroids on host rows y float32 (n, d) -> (nlist, d) float32 (our batched k-means,
    as one sub-quantizer of width d; assignment blocked so nlist up to 65,536 stays within a block budget).
    metric ip / cosine: spherical k-means with inner-product assignment, as faiss's IndexIVF for
    METRIC_INNER_PRODUCT (centroids renormalised after the initial draw and after every iteration)."""
    from .kmeans import ArrayEngine, InnerProductEngine, train_subquantizers

    spherical = check_metric(metric) != "l2"
    if resolve_backend(backend) == "cpu":
        engine = InnerProductEngine() if spherical else None
        return train_subquantizers(y, 1, nlist, niter=niter, seed=seed, engine=engine, spherical=spherical)[0]
    from .backend import free_device_memory

    xp = namespace("gpu")
    block = max(64 << 20, free_device_memory() // 4)
    engine = (InnerProductEngine if spherical else ArrayEngine)(block_bytes=block)
    return train_subquantizers(to_device(y, xp), 1, nlist, niter=niter, seed=seed, engine=engine,
                               spherical=spherical)[0]


def plan_training(n: int, d: int, nlist: int, M: int, nbits: int) -> str:
    """One line on what coarse training costs: the per-iteration work scales with sample x nlist x d."""
    from .kmeans import MAX_POINTS_PER_CENTROID

    rows = min(n, MAX_POINTS_PER_CENTROID * nlist)
    flops = 2.0 * rows * nlist * d
    mem = nlist * d * 4 * 3 + rows * d * 4
    return (f"IVF training: coarse k-means of {nlist} lists on {rows:,} rows x d={d}: {flops / 1e9:.1f} GFLOP per "
            f"iteration, ~{mem / 2**20:.0f} MiB; then PQ M={M} nbits={nbits} on the residuals")


def train_ivf(x: Any, M: int, nbits: int, nlist: int, *, niter: int = 25, seed: int = 1234,
              backend: str = "auto", opq: bool = False, metric: str = "l2") -> IvfCodebook:
    """Train an IVF-PQ quantizer on x (n, d), as faiss "IVF{nlist},PQ{M}x{nbits}" (by_residual) or, with opq,
    "OPQ{M},IVF{nlist},PQ{M}x{nbits}": the rotation is learned on x, the coarse k-means on the rotated x,
    the PQ on the residuals of the rotated x to their nearest coarse centroid. metric (pqgpu.metric): ip /
    cosine train the coarse quantizer as faiss does for METRIC_INNER_PRODUCT; cosine normalises x first."""
    check_metric(metric)
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"training vectors: expected a 2-D array (rows, d). Got shape {x.shape} instead.")
    n, d = x.shape
    check_params(d, M, nbits)
    check_nlist(nlist, n)
    if nlist == 0:
        raise ConfigError("train_ivf needs quantizer.nlist > 0 (nlist 0 is plain PQ: use pqgpu.codebook.train).")
    if niter < 1:
        raise ConfigError(f"niter: expected a positive integer. Got {niter} instead.")
    if n < (1 << nbits):
        raise InputError(f"training needs at least 2**nbits = {1 << nbits} rows for nbits={nbits}; got {n}. "
                         f"Provide more rows (faiss recommends >= {39 * (1 << nbits)}) or lower nbits.")
    if n < 39 * nlist:
        log.warning("IVF training: %d rows for %d lists is fewer than faiss's recommended 39 per list; "
                    "raise quantizer.train_size for better lists", n, nlist)
    x = as_float32_matrix(x, "training vectors")
    backend = resolve_backend(backend)
    if metric == "cosine":
        x = normalize_training(x, backend)
    log.info(plan_training(n, d, nlist, M, nbits))
    rotation = None
    if opq:
        rotation = _train_rotation(x, M, nbits, seed, backend)
        x = np.ascontiguousarray(x @ rotation.T)
    t0 = time.perf_counter()
    coarse = train_coarse(x, nlist, niter=niter, seed=seed, backend=backend, metric=metric)
    t1 = time.perf_counter()
    tmp = IvfCodebook(d, M, nbits, np.zeros((M, 1 << nbits, d // M), np.float32), metric=metric, coarse=coarse)
    lists = tmp.assign_lists(x) if backend == "cpu" else encode_ivf_xp(x, tmp, namespace("gpu"), prepared=True)[0]
    residual = x - coarse[lists]
    from .training import train as train_pq

    pq = train_pq(residual, M, nbits, niter=niter, seed=seed, backend=backend)
    log.info("IVF training: coarse k-means %.2f s, residual PQ %.2f s", t1 - t0, time.perf_counter() - t1)
    return IvfCodebook(d, M, nbits, pq.centroids, rotation, metric, coarse=coarse)


def _train_rotation(x: np.ndarray, M: int, nbits: int, seed: int, backend: str) -> np.ndarray:
    from . import opq as opq_module
    from .opq import MAX_INNER_NBITS, MAX_TRAIN_POINTS, opq_rotation

    rng = np.random.default_rng(seed)
    sample = x
    if x.shape[0] > MAX_TRAIN_POINTS:
        sample = x[np.sort(rng.choice(x.shape[0], MAX_TRAIN_POINTS, replace=False))]
    inner = min(nbits, MAX_INNER_NBITS)
    if backend == "cpu":
        return opq_rotation(sample, M, inner, opq_iter=opq_module.OPQ_ITER, seed=seed)
    return opq_rotation(to_device(sample, namespace("gpu")), M, inner, opq_iter=opq_module.OPQ_ITER, seed=seed)


# -- faiss file format ------------------------------------------------------------------------------------

def _header(d: int, ntotal: int, metric: str = "l2") -> bytes:
    return struct.pack("<iqqq?i", d, ntotal, _DUMMY, _DUMMY, True, faiss_metric_type(metric))


def normalization_bytes(d: int) -> bytes:
    """A faiss NormalizationTransform (L2, norm 2.0: faiss's "L2norm"), as write_VectorTransform writes it."""
    return b"VNrm" + struct.pack("<fiiB", 2.0, d, d, 1)


def ivf_prefix_bytes(cb: IvfCodebook, ntotal: int, nprobe: int = 1) -> bytes:
    """Everything of the faiss file before the inverted lists (IxPT + transforms + IwPQ ... PQ). Transforms:
    faiss's L2 normalisation for cosine, then the OPQ rotation; faiss applies them in that order."""
    parts = []
    transforms = []
    if cb.metric == "cosine":
        transforms.append(normalization_bytes(cb.d))
    if cb.rotation is not None:
        from .codebook import opq_matrix_bytes

        transforms.append(opq_matrix_bytes(cb.rotation))
    if transforms:
        parts += [b"IxPT", _header(cb.d, ntotal, cb.metric), struct.pack("<i", len(transforms)), *transforms]
    coarse = np.ascontiguousarray(cb.coarse, dtype="<f4")
    flat = b"IxF2" if cb.metric == "l2" else b"IxFI"  # faiss IndexFlatL2 / IndexFlatIP
    parts += [
        b"IwPQ", _header(cb.d, ntotal, cb.metric), struct.pack("<QQ", cb.nlist, nprobe),
        flat, _header(cb.d, cb.nlist, cb.metric), struct.pack("<Q", coarse.size), coarse.tobytes(),
        struct.pack("<bQ", 0, 0),  # direct map: none, empty array
        struct.pack("<?Q", True, cb.code_size),
        struct.pack("<QQQQ", cb.d, cb.M, cb.nbits, cb.centroids.size),
        np.ascontiguousarray(cb.centroids, dtype="<f4").tobytes(),
    ]
    return b"".join(parts)


def invlists_prefix_bytes(nlist: int, code_size: int, sizes: np.ndarray) -> bytes:
    """"ilar" header and list sizes, "full" or "sprs" as faiss chooses (full when > nlist/2 lists are used)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    nonzero = np.flatnonzero(sizes)
    if nonzero.size > nlist // 2:
        body = b"full" + struct.pack("<Q", nlist) + sizes.astype("<u8").tobytes()
    else:
        pairs = np.stack([nonzero, sizes[nonzero]], axis=1).astype("<u8")
        body = b"sprs" + struct.pack("<Q", pairs.size) + pairs.tobytes()
    return b"ilar" + struct.pack("<QQ", nlist, code_size) + body


def write_index(f: BinaryIO, cb: IvfCodebook, *, sizes: np.ndarray,
                lists_data: Iterable[tuple[int, np.ndarray, np.ndarray]], nprobe: int = 1) -> None:
    """Stream a faiss IndexIVFPQ to f: sizes int (nlist,) rows per list; lists_data yields (list, codes uint8
    (size, code_size), ids int64 (size,)) for every non-empty list in increasing list order."""
    sizes = np.asarray(sizes, dtype=np.int64)
    f.write(ivf_prefix_bytes(cb, int(sizes.sum()), nprobe))
    f.write(invlists_prefix_bytes(cb.nlist, cb.code_size, sizes))
    expected = iter(np.flatnonzero(sizes))
    for lst, codes, ids in lists_data:
        want = next(expected, None)
        if want != lst or codes.shape != (sizes[lst], cb.code_size) or ids.shape != (sizes[lst],):
            raise InputError(f"inverted list {lst}: expected list {want} with {sizes[want] if want is not None else 0} "
                             f"rows, got codes {codes.shape} and ids {ids.shape}.")
        f.write(np.ascontiguousarray(codes, dtype=np.uint8).tobytes())
        f.write(np.ascontiguousarray(ids, dtype="<i8").tobytes())
    if next(expected, None) is not None:
        raise InputError("the inverted lists ended before every non-empty list was written.")


class _Reader:
    def __init__(self, raw: bytes, where: str):
        self.raw, self.pos, self.where = raw, 0, where
        self.metric: str | None = None  # from the first header read; later headers must agree

    def peek(self) -> bytes:
        return self.raw[self.pos:self.pos + 4]

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.raw):
            raise self.bad(f"truncated at byte {self.pos}")
        out = struct.unpack_from(fmt, self.raw, self.pos)
        self.pos += size
        return out

    def array(self, dtype: str, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if count < 0 or self.pos + size > len(self.raw):
            raise self.bad(f"truncated at byte {self.pos} (wanted {count} x {dtype})")
        out = np.frombuffer(self.raw, dtype=dtype, count=count, offset=self.pos)
        self.pos += size
        return out

    def fourcc(self) -> bytes:
        return self.take("<4s")[0]

    def header(self) -> tuple[int, int]:
        d, ntotal, _, _, _trained, metric = self.take("<iqqq?i")
        if metric not in (FAISS_METRIC_L2, FAISS_METRIC_INNER_PRODUCT):
            raise self.bad(f"metric type {metric} (pqgpu reads METRIC_L2 = 1 and METRIC_INNER_PRODUCT = 0)")
        name = "l2" if metric == FAISS_METRIC_L2 else "ip"
        if self.metric is not None and name != self.metric:
            raise self.bad(f"its parts disagree on the metric ({self.metric} and {name})")
        self.metric = name
        return d, ntotal

    def bad(self, why: str) -> InputError:
        return InputError(f"{self.where} is not a faiss IndexIVFPQ file pqgpu can read: {why}. Train one with "
                          "`pqgpu train` and quantizer.nlist > 0, or write it with faiss.write_index.")


def read_index(path: str | os.PathLike, *, with_lists: bool = False
               ) -> tuple[IvfCodebook, np.ndarray, list[tuple[np.ndarray, np.ndarray]] | None]:
    """Read a faiss IndexIVFPQ (or IndexPreTransform(LinearTransform, IndexIVFPQ)) file.

    Returns (codebook, sizes int64 (nlist,), lists) where lists is [(codes, ids)] per list when with_lists.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"Cannot read quantizer file {path}: {exc.strerror}. Train one with `pqgpu train`.") from None
    r = _Reader(raw, str(path))
    h = r.fourcc()
    rotation = None
    normalized = False
    if h == b"IxPT":
        r.header()
        (nt,) = r.take("<i")
        if not 1 <= nt <= 2:
            raise r.bad(f"{nt} vector transforms (pqgpu reads an optional L2 normalisation, then an optional "
                        "square OPQ rotation)")
        for i in range(nt):
            if r.peek() == b"VNrm":
                if i != 0:
                    raise r.bad("an L2 normalisation after the rotation (pqgpu normalises first, as 'L2norm,OPQ')")
                _read_normalization(r)
                normalized = True
            else:
                if rotation is not None:
                    raise r.bad("two linear transforms (pqgpu reads one OPQ rotation)")
                rotation = _read_linear(r)
        h = r.fourcc()
    if h == b"IvPQ":
        raise r.bad("legacy 'IvPQ' layout (re-save it with a recent faiss)")
    if h != b"IwPQ":
        raise r.bad(f"fourcc {h!r} (expected b'IwPQ' or b'IxPT')")
    d, _ntotal = r.header()
    nlist, _nprobe = r.take("<QQ")
    flat = r.fourcc()
    if flat not in (b"IxF2", b"IxFI"):
        raise r.bad(f"the coarse quantizer is {flat!r}, not an IndexFlatL2 / IndexFlatIP")
    qd, qn = r.header()
    (count,) = r.take("<Q")
    if qd != d or qn != nlist or count != nlist * d:
        raise r.bad(f"coarse quantizer holds {qn} x {qd} (count {count}) for nlist={nlist}, d={d}")
    coarse = r.array("<f4", count).reshape(nlist, d)
    dm_type, dm_count = r.take("<bQ")
    r.array("<i8", dm_count)
    if dm_type == 2:  # hashtable direct map: (id, offset) pairs
        (pairs,) = r.take("<Q")
        r.array("<i8", 2 * pairs)
    by_residual, code_size = r.take("<?Q")
    if not by_residual:
        raise r.bad("by_residual is false (pqgpu's IVF codes are residual codes)")
    pd, M, nbits, ccount = r.take("<QQQQ")
    if pd != d or not 0 < M <= d or not 1 <= nbits <= 16 or ccount != d * (1 << nbits):
        raise r.bad(f"product quantizer d={pd}, M={M}, nbits={nbits}, {ccount} floats")
    centroids = r.array("<f4", ccount).reshape(M, 1 << nbits, d // M)
    if code_size != kernels.code_size(M, nbits):
        raise r.bad(f"code_size {code_size} for M={M}, nbits={nbits}")
    sizes = np.zeros(nlist, np.int64)
    lists = None
    ih = r.fourcc()
    if ih == b"ilar":
        il_nlist, il_cs = r.take("<QQ")
        if il_nlist != nlist or il_cs != code_size:
            raise r.bad(f"inverted lists for nlist={il_nlist}, code_size={il_cs}")
        kind = r.fourcc()
        (cnt,) = r.take("<Q")
        vec = r.array("<u8", cnt).astype(np.int64)
        if kind == b"full" and cnt == nlist:
            sizes[:] = vec
        elif kind == b"sprs" and cnt % 2 == 0 and (vec[0::2] < nlist).all():
            sizes[vec[0::2]] = vec[1::2]
        else:
            raise r.bad(f"inverted list sizes of kind {kind!r} with {cnt} entries")
        if with_lists:
            lists = []
            for s in sizes:
                codes = r.array("u1", int(s) * code_size).reshape(int(s), code_size)
                lists.append((codes, r.array("<i8", int(s))))
    elif ih != b"il00":
        raise r.bad(f"inverted lists of type {ih!r} (pqgpu reads 'ilar' and 'il00')")
    metric = r.metric or "l2"
    if normalized:
        if metric != "ip":
            raise r.bad("an L2 normalisation in front of an L2 index (pqgpu reads normalisation as metric cosine, "
                        "which needs METRIC_INNER_PRODUCT)")
        metric = "cosine"
    cb = IvfCodebook(d, int(M), int(nbits), centroids.astype(np.float32), rotation, metric,
                     coarse=coarse.astype(np.float32))
    return cb, sizes, lists


def _read_normalization(r: _Reader) -> None:
    r.fourcc()
    norm, d_in, d_out, _trained = r.take("<fiiB")
    if norm != 2.0 or d_in != d_out:
        raise r.bad(f"a normalisation transform with norm {norm} ({d_in} -> {d_out}); pqgpu reads L2 (norm 2)")


def _read_linear(r: _Reader) -> np.ndarray:
    h = r.fourcc()
    if h not in (b"LTra", b"rrot"):
        raise r.bad(f"vector transform {h!r} (pqgpu reads an OPQ rotation, 'LTra')")
    (have_bias,) = r.take("<B")
    (na,) = r.take("<Q")
    a = r.array("<f4", na)
    (nb,) = r.take("<Q")
    b = r.array("<f4", nb)
    d_in, d_out, _trained = r.take("<iiB")
    if na != d_in * d_out or d_in != d_out:
        raise r.bad(f"linear transform {d_out} x {d_in} with {na} coefficients (expected a square rotation)")
    if have_bias and np.any(b != 0):
        raise r.bad("the linear transform has a bias (an OPQ rotation has none)")
    return a.reshape(d_out, d_in).astype(np.float32)


def is_ivf_file(path: str | os.PathLike) -> bool:
    """Whether path starts like a faiss IVF-PQ index (as opposed to a ProductQuantizer file)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in _INDEX_FOURCCS
    except OSError:
        return False


def load_quantizer(path: str | os.PathLike, nlist: int) -> Codebook:
    """The quantizer at path, IVF-PQ or plain PQ as the file says; refuses a file that contradicts nlist."""
    ivf = is_ivf_file(path)
    if nlist and not ivf and Path(path).exists():
        raise ConfigError(f"quantizer.nlist={nlist} but {path} is a plain ProductQuantizer file. Train an IVF "
                          "quantizer into another quantizer.path (or delete this one), or set quantizer.nlist: 0.")
    if not ivf:
        return Codebook.load(path)
    cb = IvfCodebook.load(path)
    if nlist != cb.nlist:
        raise ConfigError(f"quantizer.nlist={nlist} but {path} is an IVF index with {cb.nlist} lists. Set "
                          f"quantizer.nlist: {cb.nlist}, retrain it with `pqgpu run --retrain`, or train into another "
                          "quantizer.path. Nothing was written.")
    return cb
