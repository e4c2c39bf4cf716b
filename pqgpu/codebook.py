"""Codebook: a trained ProductQuantizer (faiss-compatible), with optional OPQ rotation.

Files use faiss's own binary format, written and read here without faiss:
ProductQuantizer = d, M, nbits (uint64 each), then the centroid vector (uint64 length + float32 data),
exactly what `faiss.write_ProductQuantizer` writes and `faiss.read_ProductQuantizer` reads.

An OPQ rotation is stored beside it in ``<path>.opq``, in faiss's VectorTransform file format (what
`faiss.write_VectorTransform` writes for an OPQMatrix: faiss saves it as a generic LinearTransform,
fourcc "LTra"):

    b"LTra" | have_bias: uint8 | A: uint64 count + count float32 | b: uint64 count + count float32
    | d_in: int32 | d_out: int32 | is_trained: uint8

all little-endian, A row-major (d_out, d_in), applied as y = A x.

A metric other than l2 is written to ``<path>.metric`` (one word: ip or cosine; see pqgpu.metric), since a
ProductQuantizer file has no metric field; no such file means l2.
Training lives in training.py (PQ) and opq.py (OPQ); this module only holds and stores the result.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import kernels
from .backend import resolve_backend
from .errors import ConfigError, InputError
from .metric import check_metric, normalize_rows

log = logging.getLogger(__name__)


def check_params(d: int, M: int, nbits: int) -> None:
    if not isinstance(M, (int, np.integer)) or M <= 0:
        raise ConfigError(f"M: expected a positive integer. Got {M!r} instead.")
    if not isinstance(nbits, (int, np.integer)) or not 1 <= nbits <= 16:
        raise ConfigError(f"nbits: expected an integer in 1..16. Got {nbits!r} instead.")
    if d % M:
        divisors = [m for m in range(1, d + 1) if d % m == 0]
        raise ConfigError(f"d={d} is not divisible by M={M}. Choose M among the divisors of d: "
                          f"{', '.join(map(str, divisors[-12:]))}.")


def as_float32_matrix(x: Any, what: str = "input", *, d: int | None = None, row_offset: int = 0) -> np.ndarray:
    """Validate a host matrix: 2-D, real floating dtype, optional width d, all finite. Returns float32 C-order.

    Errors name the first bad row, counted from row_offset (so callers can report global row numbers).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"{what}: expected a 2-D array (rows, d). Got shape {x.shape} instead.")
    if x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4, 8):
        raise InputError(f"{what}: expected float16, float32 or float64 values. Got dtype {x.dtype} instead.")
    if d is not None and x.shape[1] != d:
        raise InputError(f"{what}: vectors have dimension {x.shape[1]}, but the codebook expects d={d}.")
    x = np.ascontiguousarray(x, dtype=np.float32)
    # one sum over all values (no temporary array; BLAS would be faster alone but its spinning threads then
    # slow the numba kernels that follow): NaN and Inf always reach the sum, and finite values whose sum
    # overflows only cost the exact check below
    with np.errstate(over="ignore", invalid="ignore"):
        if x.size and np.isfinite(x.sum()):
            return x
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        col = int(np.flatnonzero(~np.isfinite(x[bad]))[0])
        raise InputError(f"{what}: row {row_offset + bad} has a non-finite value ({x[bad, col]}) at column {col}; "
                         f"{int((~finite).sum())} row(s) in this block are affected. Remove or fix NaN/Inf rows.")
    return x


def normalize_training(x: np.ndarray, backend: str) -> np.ndarray:
    """Host rows (n, d) float32 L2-normalised on the resolved backend's device ("cpu" | "gpu") and brought back
    (metric cosine, before training); InputError names the first zero row."""
    if backend == "cpu":
        return normalize_rows(x, "training vectors")
    from .backend import namespace, to_device, to_host

    xp = namespace("gpu")
    return np.asarray(to_host(normalize_rows(to_device(x, xp), "training vectors")), dtype=np.float32)


@dataclass(frozen=True, eq=False)
class Codebook:
    """PQ parameters and centroids. centroids: float32 (M, ksub, dsub); rotation: float32 (d, d) or None,
    applied as x @ rotation.T before quantizing (faiss OPQMatrix convention: y = A x); metric: l2, ip or
    cosine (pqgpu.metric; cosine normalises every row before it is rotated and encoded)."""

    d: int
    M: int
    nbits: int
    centroids: np.ndarray = field(repr=False)
    rotation: np.ndarray | None = field(default=None, repr=False)
    metric: str = "l2"

    def __post_init__(self) -> None:
        check_params(self.d, self.M, self.nbits)
        check_metric(self.metric)
        c = np.ascontiguousarray(self.centroids, dtype=np.float32)
        if c.shape != (self.M, self.ksub, self.dsub):
            raise InputError(f"centroids: expected shape {(self.M, self.ksub, self.dsub)} for d={self.d}, "
                             f"M={self.M}, nbits={self.nbits}. Got {c.shape} instead.")
        object.__setattr__(self, "centroids", c)
        if self.rotation is not None:
            r = np.ascontiguousarray(self.rotation, dtype=np.float32)
            if r.shape != (self.d, self.d):
                raise InputError(f"rotation: expected shape {(self.d, self.d)}. Got {r.shape} instead.")
            object.__setattr__(self, "rotation", r)

    @property
    def ksub(self) -> int:
        return 1 << self.nbits

    @property
    def dsub(self) -> int:
        return self.d // self.M

    @property
    def code_size(self) -> int:
        return kernels.code_size(self.M, self.nbits)

    # -- encoding ---------------------------------------------------------------------------------------

    def rotate(self, x: np.ndarray) -> np.ndarray:
        return x if self.rotation is None else np.ascontiguousarray(x @ self.rotation.T)

    def prepare(self, x: np.ndarray, what: str = "vectors", *, row_offset: int = 0) -> np.ndarray:
        """Validated float32 rows as the quantizer sees them before rotation: L2-normalised under cosine
        (InputError naming the first all-zero row), unchanged otherwise."""
        return normalize_rows(x, what, row_offset=row_offset) if self.metric == "cosine" else x

    def assign(self, x: Any, *, row_offset: int = 0, checked: bool = False) -> np.ndarray:
        """Unpacked sub-codes (n, M) (uint16 or int64) of host x after validation and rotation (CPU).
        checked=True: x is already a validated float32 (n, d) matrix (skips a pass over the data)."""
        if not checked:
            x = as_float32_matrix(x, "vectors to encode", d=self.d, row_offset=row_offset)
        x = self.rotate(self.prepare(x, "vectors to encode", row_offset=row_offset))
        try:
            from . import _cpu
        except ImportError:
            return np.asarray(kernels.assign(x, self.centroids))
        return _cpu.assign(x, _cpu.prepare(self.centroids))

    def encode(self, x: Any, backend: str = "auto", *, row_offset: int = 0, checked: bool = False) -> np.ndarray:
        """float vectors (n, d) -> uint8 codes (n, code_size), equal to faiss compute_codes.
        checked=True skips validation for input that as_float32_matrix has already passed."""
        if resolve_backend(backend) == "gpu":
            from .backend import cupy_device, encode_blocks

            x = np.asarray(x)
            # validate on the host but keep float16 as float16: half the bytes over PCIe
            valid = x if checked else as_float32_matrix(x, "vectors to encode", d=self.d, row_offset=row_offset)
            wire = x if x.dtype == np.float16 else valid
            return encode_blocks(np.ascontiguousarray(wire), self.centroids, self.nbits, cupy_device(),
                                 rotation=self.rotation, normalize=self.metric == "cosine",
                                 row_offset=row_offset)
        return np.asarray(kernels.pack_codes(self.assign(x, row_offset=row_offset, checked=checked), self.nbits))

    def decode(self, codes: Any) -> np.ndarray:
        """uint8 codes (n, code_size) -> float32 reconstructions (n, d), in the original (unrotated) space."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.code_size or codes.dtype != np.uint8:
            raise InputError(f"codes: expected uint8 of shape (n, {self.code_size}). "
                             f"Got {codes.dtype} {codes.shape} instead.")
        sub = kernels.unpack_codes(codes, self.M, self.nbits)
        y = np.asarray(kernels.decode(sub, self.centroids))
        return y if self.rotation is None else np.ascontiguousarray(y @ self.rotation)

    # -- identity and files -------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """sha256 over parameters, centroids and rotation: stable across processes and machines."""
        h = hashlib.sha256(b"pqgpu-codebook-v1")
        h.update(struct.pack("<QQQ", self.d, self.M, self.nbits))
        h.update(np.ascontiguousarray(self.centroids, dtype="<f4").tobytes())
        if self.rotation is not None:
            h.update(b"rotation")
            h.update(np.ascontiguousarray(self.rotation, dtype="<f4").tobytes())
        if self.metric != "l2":  # (l2 adds nothing: fingerprints of stores made before metrics stay valid)
            h.update(b"metric:" + self.metric.encode())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        """Write the faiss ProductQuantizer file atomically (and `<path>.opq` when there is a rotation)."""
        path = Path(path)
        header = struct.pack("<QQQQ", self.d, self.M, self.nbits, self.centroids.size)
        atomic_write_bytes(path, header + np.ascontiguousarray(self.centroids, dtype="<f4").tobytes())
        opq_path = Path(str(path) + ".opq")
        if self.rotation is not None:
            atomic_write_bytes(opq_path, opq_matrix_bytes(self.rotation))
        else:  # a rotation left from an earlier OPQ quantizer at this path would be loaded with these centroids
            opq_path.unlink(missing_ok=True)
        write_metric_sidecar(path, self.metric)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Codebook":
        """Read a faiss ProductQuantizer file (plus `<path>.opq` if present)."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise InputError(f"Cannot read quantizer file {path}: {exc.strerror}. Train one with `pqgpu train`.") from None
        if len(raw) < 32:
            raise InputError(f"Quantizer file {path} is truncated ({len(raw)} bytes); it is not a faiss "
                             "ProductQuantizer file.")
        d, M, nbits, size = struct.unpack_from("<QQQQ", raw)
        if not (0 < M <= d and 1 <= nbits <= 16 and size == d * (1 << nbits) and len(raw) == 32 + 4 * size):
            raise InputError(f"Quantizer file {path} is not a valid faiss ProductQuantizer file "
                             f"(header d={d}, M={M}, nbits={nbits}, {size} floats, {len(raw)} bytes).")
        centroids = np.frombuffer(raw, dtype="<f4", offset=32).reshape(M, 1 << nbits, d // M)
        rotation = None
        opq_path = Path(str(path) + ".opq")
        if opq_path.exists():
            rotation = read_opq_matrix(opq_path)
        return cls(int(d), int(M), int(nbits), centroids.astype(np.float32), rotation,
                   read_metric_sidecar(path) or "l2")

    def to_faiss(self) -> Any:
        """A faiss.ProductQuantizer with these centroids (needs faiss; the metric is not part of it)."""
        import faiss

        pq = faiss.ProductQuantizer(self.d, self.M, self.nbits)
        faiss.copy_array_to_vector(self.centroids.ravel(), pq.centroids)
        return pq

    @classmethod
    def from_faiss(cls, pq: Any) -> "Codebook":
        import faiss

        c = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
        return cls(int(pq.d), int(pq.M), int(pq.nbits), c)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- metric sidecar (<quantizer>.metric) ----------------------------------------------------------------

def metric_sidecar(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".metric")


def write_metric_sidecar(path: str | os.PathLike, metric: str, *, needed: bool | None = None) -> None:
    """Write `<path>.metric` when needed (default: metric is not l2), else remove a stale one."""
    side = metric_sidecar(path)
    if needed if needed is not None else metric != "l2":
        atomic_write_bytes(side, (metric + "\n").encode())
    else:  # one left from an earlier quantizer at this path would be read with this one
        side.unlink(missing_ok=True)


def read_metric_sidecar(path: str | os.PathLike) -> str | None:
    """The metric in `<path>.metric`, or None when there is no such file."""
    side = metric_sidecar(path)
    try:
        text = side.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Cannot read the metric file {side}: {exc}. It holds one word (ip or cosine); "
                         "retrain the quantizer or fix the file.") from None
    try:
        return check_metric(text, f"metric file {side}")
    except ConfigError as exc:
        raise InputError(str(exc) + " Retrain the quantizer or fix the file.") from None


# -- OPQ rotation file (faiss VectorTransform) ----------------------------------------------------------

_LTRA = b"LTra"
_LINEAR_FOURCCS = (b"LTra", b"rrot")  # both are a plain LinearTransform on disk after the fourcc


def opq_matrix_bytes(rotation: Any) -> bytes:
    """faiss VectorTransform bytes for an OPQMatrix holding `rotation` (d_out, d_in) float32 (y = A x)."""
    a = np.ascontiguousarray(np.asarray(rotation), dtype="<f4")
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(f"OPQ rotation: expected a 2-D (d_out, d_in) matrix. Got shape {a.shape} instead.")
    d_out, d_in = a.shape
    return b"".join([
        _LTRA,
        struct.pack("<B", 0),  # have_bias: OPQ is a pure rotation
        struct.pack("<Q", a.size), a.tobytes(),
        struct.pack("<Q", 0),  # empty bias vector
        struct.pack("<iiB", d_in, d_out, 1),
    ])


def parse_opq_matrix(raw: bytes, where: str = "<bytes>") -> np.ndarray:
    """Inverse of opq_matrix_bytes; also accepts faiss's own files (LTra / rrot). Returns float32 (d_out, d_in)."""
    def bad(why: str) -> InputError:
        return InputError(f"OPQ file {where} is not a faiss OPQMatrix/LinearTransform file: {why}. "
                          "Write it with faiss.write_VectorTransform or retrain with `quantizer.opq: true`.")

    if len(raw) < 4 + 1 + 8 + 8 + 9:
        raise bad(f"only {len(raw)} bytes")
    fourcc = raw[:4]
    if fourcc not in _LINEAR_FOURCCS:
        raise bad(f"fourcc {fourcc!r} (expected {_LTRA!r}; PCA/ITQ and other transforms are not a rotation)")
    pos = 4
    (have_bias,) = struct.unpack_from("<B", raw, pos)
    pos += 1
    (na,) = struct.unpack_from("<Q", raw, pos)
    pos += 8
    if pos + 4 * na + 8 > len(raw):
        raise bad(f"matrix of {na} floats does not fit in {len(raw)} bytes")
    a = np.frombuffer(raw, dtype="<f4", count=na, offset=pos)
    pos += 4 * na
    (nb,) = struct.unpack_from("<Q", raw, pos)
    pos += 8
    if pos + 4 * nb + 9 != len(raw):
        raise bad(f"unexpected length {len(raw)} for a {na}-float matrix and a {nb}-float bias")
    b = np.frombuffer(raw, dtype="<f4", count=nb, offset=pos)
    pos += 4 * nb
    d_in, d_out, is_trained = struct.unpack_from("<iiB", raw, pos)
    if d_in <= 0 or d_out <= 0 or na != d_in * d_out:
        raise bad(f"d_in={d_in}, d_out={d_out} do not match a matrix of {na} floats")
    if not is_trained:
        raise bad("the transform is not trained")
    if have_bias and nb and np.any(b != 0):
        raise bad("it has a non-zero bias, which a PQ rotation cannot represent")
    return a.reshape(d_out, d_in).astype(np.float32)


def read_opq_matrix(path: str | os.PathLike) -> np.ndarray:
    """Read `<quantizer>.opq` (ours or faiss.write_VectorTransform's). Returns float32 (d, d)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"Cannot read OPQ file {path}: {exc.strerror}.") from None
    a = parse_opq_matrix(raw, str(path))
    if a.shape[0] != a.shape[1]:
        raise InputError(f"OPQ file {path} maps d_in={a.shape[1]} to d_out={a.shape[0]}; pqgpu supports only "
                         "square OPQ rotations (faiss OPQ with d_out == d).")
    return a
