"""Fused PQ encoder for NVIDIA GPUs, written with numba.cuda. Only pqgpu/backend.py imports this module.

Why numba.cuda and not a CuPy RawKernel: a numba.cuda kernel also runs on the CPU under numba's CUDA
simulator (`NUMBA_ENABLE_CUDASIM=1` set before numba is imported), so CI without a GPU executes this very
kernel source and checks its codes against faiss; a RawKernel's CUDA C can only be run on a GPU. CuPy arrays
are passed straight in through `__cuda_array_interface__` (no copy), on CuPy's current stream.

Two kernels, both tiny and readable:
1. `assign` (grid: row tiles x M subspaces, `threads` threads per block). A block stages the centroids of its
   subspace m in shared memory, `tile_k` centroids at a time (all of them when they fit in 32 KB: 8 KB at
   ksub=256, dsub=8; larger codebooks, nbits > 10 or wide dsub, stream through in tiles). Each thread keeps
   the sub-vectors of `rows_per_thread` rows in registers, so every centroid it reads from shared memory (a
   broadcast: all threads read the same address) is reused for several rows. Distances stay in registers: the
   exact ||x - c||^2, subtracting then square-accumulating over dsub in dsub order (what faiss computes for
   dsub < 16; no ||c||^2 - 2 x.c cancellation near ties). Scanning k upwards with a strict `<` keeps the
   lowest index on ties (faiss's scalar loop does too; its SIMD path for dsub 2, 4, 8 may keep another).
   The argmin goes to a uint16 scratch laid out (M, n): a block's threads write consecutive rows, so the
   stores coalesce.
2. `pack` (one thread per row): reads the row's M sub-codes (coalesced across threads thanks to the (M, n)
   layout) and packs them LSB-first, consecutively, into code_size bytes: faiss's layout for nbits 1..16,
   including sub-codes that straddle bytes.
Memory per row is d*4 bytes in, 2*M bytes scratch and code_size out, against the array-API route's
(M, rows, ksub) float32 distance tensor (~100 KB per row at d=768, M=96, nbits=8).

Design for an H200 (compiled to sm_90 PTX and ptxas-checked here, not timed: no GPU in CI). At dsub=8,
ksub=256 the inner loop per centroid is 8 shared loads, 4 rows x (8 subtract + 8 FMA + compare + 2 selects)
and 4 loop instructions: ~22 issued instructions per (row, centroid), all in 72 registers with no spills or
local memory (tests/test_cuda_kernel.py checks this for several shapes). d=768, M=96, nbits=8 is then ~540k
instructions per vector; the H200's ~33T lane-instructions/s bound that near 60M vectors/s, so the 20M/s
target needs about a third of peak issue rate. Knobs: `launch_plan` (at most 32 floats of x in registers per
thread, 128 threads per block, 32 KB centroid tiles). NVVM contracts subtract-square-add into FMA on the
device (the simulator rounds the product first): codes can then differ from the simulator or faiss only at
float32 near-ties, which the faiss-compatibility contract allows (faiss's own SIMD order differs too).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, NamedTuple

import numpy as np
from numba import cuda, float32, int32, int64

SHARED_FLOATS = 8192  # 32 KB of shared memory for one centroid tile
MAX_DSUB = SHARED_FLOATS  # one centroid must fit in a tile
PACK_THREADS = 256


class LaunchPlan(NamedTuple):
    threads: int          # threads per block of the assign kernel
    rows_per_thread: int  # rows whose sub-vectors one thread keeps in registers
    tile_k: int           # centroids staged in shared memory at a time


def available() -> tuple[bool, str]:
    """(usable, reason): numba.cuda imports (it did, or this module would not) and sees a device, or the
    simulator is on."""
    try:
        if cuda.is_available():
            return True, "numba.cuda simulator" if simulator_on() else "numba.cuda sees a CUDA device"
    except Exception as exc:  # a driver that fails to load
        return False, f"numba.cuda cannot use the CUDA driver ({type(exc).__name__}: {exc})"
    return False, "numba.cuda sees no usable CUDA device (driver, CUDA_VISIBLE_DEVICES, or numba-cuda missing)"


def simulator_on() -> bool:
    from numba.core import config

    return bool(config.ENABLE_CUDASIM)


def supports(dsub: int) -> bool:
    return 1 <= dsub <= MAX_DSUB


def launch_plan(dsub: int, ksub: int) -> LaunchPlan:
    """Launch shape for the device: at most 32 floats of x in registers per thread, 128 threads per block,
    as many centroids per tile as fit in SHARED_FLOATS."""
    rows = max(1, min(8, 32 // dsub))
    return LaunchPlan(threads=128, rows_per_thread=rows, tile_k=max(1, min(ksub, SHARED_FLOATS // dsub)))


@functools.lru_cache(maxsize=None)
def _assign_kernel(dsub: int, ksub: int, threads: int, rows_per_thread: int, tile_k: int) -> Any:
    """The argmin kernel specialised for one shape: the closure constants are compile-time constants for
    numba, so loop bounds are known and the small arrays can live in registers."""
    DSUB, KSUB, T, R, TK = dsub, ksub, threads, rows_per_thread, tile_k
    TILE, XS = TK * DSUB, R * DSUB  # array shapes must be compile-time constants

    @cuda.jit
    def assign(x, centroids, codes):
        """x (n, d) float32; centroids (M, ksub*dsub) float32; codes (M, n) uint16 out."""
        n = x.shape[0]
        m = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        first = cuda.blockIdx.x * (T * R) + tid  # this thread's rows: first, first + T, ...
        tile = cuda.shared.array(TILE, float32)
        xs = cuda.local.array(XS, float32)
        c = cuda.local.array(DSUB, float32)
        best = cuda.local.array(R, float32)
        arg = cuda.local.array(R, int32)
        for r in range(R):
            row = first + r * T
            for j in range(DSUB):
                xs[r * DSUB + j] = x[row, m * DSUB + j] if row < n else float32(0.0)
            best[r] = math.inf
            arg[r] = 0
        for k0 in range(0, KSUB, TK):
            kn = KSUB - k0 if KSUB - k0 < TK else TK  # (not min(): numba's CUDA min overload rejects 2 ints)
            cuda.syncthreads()  # every thread is done with the previous tile
            for i in range(tid, kn * DSUB, T):
                tile[i] = centroids[m, k0 * DSUB + i]
            cuda.syncthreads()
            for k in range(kn):
                for j in range(DSUB):
                    c[j] = tile[k * DSUB + j]
                for r in range(R):
                    dist = float32(0.0)
                    for j in range(DSUB):
                        diff = xs[r * DSUB + j] - c[j]
                        dist += diff * diff
                    if dist < best[r]:  # strict: the lowest index wins a tie
                        best[r] = dist
                        arg[r] = k0 + k
        for r in range(R):
            row = first + r * T
            if row < n:
                codes[m, row] = arg[r]

    return assign


@functools.lru_cache(maxsize=None)
def _pack_kernel() -> Any:
    @cuda.jit
    def pack(codes, nbits, out):
        """codes (M, n) uint16 -> out (n, code_size) uint8, sub-codes LSB-first and consecutive."""
        i = cuda.grid(1)
        if i < codes.shape[1]:
            acc = 0     # bits not yet written, lowest first; never more than 7 + 16
            filled = 0
            b = 0
            for m in range(codes.shape[0]):
                acc |= int64(codes[m, i]) << filled
                filled += nbits
                while filled >= 8:
                    out[i, b] = acc & 255
                    acc >>= 8
                    filled -= 8
                    b += 1
            if filled > 0:
                out[i, b] = acc & 255

    return pack


def compile_ptx(dsub: int, ksub: int, plan: LaunchPlan | None = None, cc: tuple[int, int] = (9, 0)) -> tuple[str, str]:
    """PTX of the assign and pack kernels for compute capability `cc`, without a GPU (needs NVVM, i.e. a CUDA
    toolkit or numba-cuda's NVVM wheel): lets tests check that the kernels compile for the device, which the
    simulator cannot, and that the per-thread arrays stay in registers (no .local memory)."""
    from numba import uint8, uint16, void

    plan = plan or launch_plan(dsub, ksub)
    assign = _assign_kernel(dsub, ksub, *plan).py_func
    a, _ = cuda.compile_ptx(assign, void(float32[:, ::1], float32[:, ::1], uint16[:, ::1]), cc=cc)
    p, _ = cuda.compile_ptx(_pack_kernel().py_func, void(uint16[:, ::1], int64, uint8[:, ::1]), cc=cc)
    return a, p


def _view(a: Any) -> Any:
    """numpy arrays go in as they are (simulator, or numba's own copies); device arrays without the stream
    synchronisation numba would otherwise add (the caller orders work on one stream)."""
    if isinstance(a, np.ndarray):
        return a
    return cuda.as_cuda_array(a, sync=False)


def encode(x: Any, centroids: Any, nbits: int, codes: Any, out: Any, *, stream_ptr: int = 0,
           device_id: int | None = None, plan: LaunchPlan | None = None) -> None:
    """Fill `out` (n, code_size) uint8 with the packed PQ codes of x, using `codes` (M, n) uint16 as scratch.

    x (n, d) float32 C-contiguous; centroids (M, ksub, dsub) float32 C-contiguous; all on one device (or all
    numpy under the simulator). Work is queued on the CUDA stream `stream_ptr` (0: the default stream);
    nothing is synchronised here.
    """
    n = x.shape[0]
    M, ksub, dsub = centroids.shape
    if not supports(dsub):
        raise ValueError(f"the fused encoder supports dsub up to {MAX_DSUB}; got dsub={dsub}")
    if ksub > 1 << 16 or nbits < 1 or nbits > 16 or ksub != 1 << nbits:
        raise ValueError(f"expected ksub = 2**nbits with nbits in 1..16; got ksub={ksub}, nbits={nbits}")
    if n == 0:
        return
    plan = plan or launch_plan(dsub, ksub)
    flat = centroids.reshape(M, ksub * dsub)
    assign = _assign_kernel(dsub, ksub, plan.threads, plan.rows_per_thread, plan.tile_k)
    pack = _pack_kernel()
    rows_per_block = plan.threads * plan.rows_per_thread
    grid = ((n + rows_per_block - 1) // rows_per_block, M)
    pack_threads = min(PACK_THREADS, n)
    on_device = device_id is not None and not simulator_on()
    with cuda.gpus[device_id] if on_device else contextlib.nullcontext():
        stream = cuda.external_stream(stream_ptr) if stream_ptr and not simulator_on() else 0
        assign[grid, plan.threads, stream](_view(x), _view(flat), _view(codes))
        pack[(n + pack_threads - 1) // pack_threads, pack_threads, stream](_view(codes), nbits, _view(out))
