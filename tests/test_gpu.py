"""GPU plumbing. The block pipeline and planner run on the CPU here (NumpyDevice); tests marked `gpu` need
CuPy and a CUDA device and are skipped, with the reason, everywhere else."""

from __future__ import annotations

import numpy as np
import pytest

import pqgpu
from pqgpu import kernels
from pqgpu.backend import (BackendUnavailable, NumpyDevice, encode_blocks, gpu_status, plan_block_rows,
                           resolve_backend)
from pqgpu.codebook import Codebook

from .helpers import assert_codes_match, synthetic

HAS_GPU, GPU_REASON = gpu_status()
gpu = pytest.mark.skipif(not HAS_GPU, reason=f"needs a CUDA GPU: {GPU_REASON}")


def small_codebook(d=32, M=8, nbits=8, seed=0):
    x = synthetic(3000, d, seed=seed)
    return x, pqgpu.train(x, M, nbits, niter=4, backend="cpu")


def test_planner_scales_with_memory_and_fails_clearly():
    d, M, ksub = 768, 96, 256
    small = plan_block_rows(24 * 2**30, d, M, ksub)
    large = plan_block_rows(80 * 2**30, d, M, ksub)
    assert 64 <= small < large
    per_row = d * 4 + d * 4 + M * ksub * 4 + M * 8 + M * 2
    assert 2 * small * per_row <= 0.6 * 24 * 2**30  # two blocks in flight fit in the budget
    assert plan_block_rows(80 * 2**30, d, M, ksub, 2) > large  # float16 input: more rows per block
    with pytest.raises(BackendUnavailable, match="Not enough free GPU memory.*d=768, M=96"):
        plan_block_rows(8 * 2**20, d, M, ksub)


@pytest.mark.parametrize("block_rows", [1, 7, 64, 5000])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_block_pipeline_matches_direct_encode(block_rows, dtype):
    x, cb = small_codebook()
    x = x[:1001].astype(dtype)
    out = encode_blocks(x, cb.centroids, cb.nbits, NumpyDevice(), block_rows=block_rows)
    assert np.array_equal(out, cb.encode(x.astype(np.float32), backend="cpu"))


def test_block_pipeline_with_rotation_and_odd_nbits():
    x = synthetic(800, 24, seed=3)
    rot, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((24, 24)))
    cb0 = pqgpu.train(x @ rot.T.astype(np.float32), 6, 5, niter=3, backend="cpu")
    cb = Codebook(24, 6, 5, cb0.centroids, rot.astype(np.float32))
    out = encode_blocks(x, cb.centroids, 5, NumpyDevice(), block_rows=100, rotation=cb.rotation)
    assert np.array_equal(out, cb.encode(x, backend="cpu"))


def test_gpu_backend_never_falls_back():
    if HAS_GPU:
        pytest.skip("a GPU is visible")
    with pytest.raises(BackendUnavailable, match="backend 'gpu' was requested"):
        resolve_backend("gpu")
    assert resolve_backend("auto") == "cpu"


# ---------------------------------------------------------------------------------------------- on a GPU

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("nbits", [4, 8, 10, 16])
def test_gpu_codes_equal_cpu_and_faiss(nbits):
    faiss = pytest.importorskip("faiss")
    d, M = 64, 16
    x = synthetic(20000 if nbits < 16 else 3000, d, seed=nbits)
    pool = synthetic(max(1 << nbits, 512), d, seed=99)
    rng = np.random.default_rng(nbits)
    c = np.stack([pool[rng.permutation(len(pool))[: 1 << nbits], m * 4:(m + 1) * 4] for m in range(M)])
    cb = Codebook(d, M, nbits, c)
    gpu_codes = cb.encode(x, backend="gpu")
    assert_codes_match(gpu_codes, cb.encode(x, backend="cpu"), x, c, nbits)
    assert_codes_match(gpu_codes, cb.to_faiss().compute_codes(x), x, c, nbits)


@gpu
@pytest.mark.gpu
def test_gpu_kernels_and_packing_on_cupy():
    import cupy

    rng = np.random.default_rng(0)
    for nbits in (1, 3, 8, 12, 16):
        codes = rng.integers(0, 1 << nbits, size=(100, 7))
        packed = kernels.pack_codes(cupy.asarray(codes), nbits)
        assert isinstance(packed, cupy.ndarray)
        assert np.array_equal(cupy.asnumpy(kernels.unpack_codes(packed, 7, nbits)), codes)
        assert np.array_equal(cupy.asnumpy(packed), np.asarray(kernels.pack_codes(codes, nbits)))


@gpu
@pytest.mark.gpu
def test_gpu_training_quality_matches_cpu():
    x = synthetic(20000, 64, seed=1)
    held = synthetic(5000, 64, seed=2)
    g = pqgpu.train(x, 16, 8, niter=10, backend="gpu")
    c = pqgpu.train(x, 16, 8, niter=10, backend="cpu")
    mse = lambda cb: ((cb.decode(cb.encode(held)) - held) ** 2).sum(1).mean()  # noqa: E731
    assert mse(g) <= mse(c) * 1.01


@gpu
@pytest.mark.gpu
def test_gpu_float16_and_small_memory_budget():
    from pqgpu.backend import cupy_device

    x, cb = small_codebook()
    x16 = x.astype(np.float16)
    out = encode_blocks(x16, cb.centroids, cb.nbits, cupy_device(), block_rows=plan_block_rows(64 << 20, 32, 8, 256, 2))
    assert np.array_equal(out, cb.encode(x16.astype(np.float32), backend="cpu"))


@gpu
@pytest.mark.gpu
def test_gpu_pipeline_end_to_end(tmp_path):
    from pqgpu.config import config_from_dict
    from pqgpu.pipeline import run
    from pqgpu.sample import make_sample
    from pqgpu.store import open_store

    make_sample(tmp_path / "data", 20000, 64, shards=2, fmt="parquet")
    cfg = config_from_dict({
        "source": {"format": "parquet", "path": str(tmp_path / "data/*.parquet"), "id_column": "id"},
        "quantizer": {"path": str(tmp_path / "pq.faiss"), "M": 16, "nbits": 8, "train_size": 10000, "niter": 5},
        "encode": {"output": str(tmp_path / "codes.zarr"), "chunk_rows": 4096, "backend": "gpu"},
        "cluster": {"n_workers": 1, "threads_per_worker": 1},
    })
    run(cfg)
    store = open_store(cfg.encode.output)
    cb = Codebook.load(cfg.quantizer.path)
    from pqgpu.sources import open_source, plan_chunks

    src = open_source(cfg.source)
    [whole] = plan_chunks([s.n_rows for s in src.shards], src.n)
    x, _ = src.read_chunk(whole)
    assert_codes_match(store.codes[...], cb.encode(x, backend="cpu"), x, cb.centroids, 8)


def test_split_training_over_devices_equals_single_run():
    """The multi-GPU split, run here with the CPU engine per group: same centroids as one run over all M."""
    from pqgpu.kmeans import train_split, train_subquantizers

    x = synthetic(4000, 24, seed=8)
    whole = train_subquantizers(x, 6, 32, niter=5, seed=3)
    seen = []

    def group(i, cols, m):
        seen.append((i, cols.shape, m))
        return train_subquantizers(cols, m, 32, niter=5, seed=3)

    split = train_split(x, 6, 32, 4, group)
    assert sorted(seen) == [(0, (4000, 4), 1), (1, (4000, 8), 2), (2, (4000, 4), 1), (3, (4000, 8), 2)]
    np.testing.assert_allclose(split, whole, rtol=1e-6, atol=1e-6)


@gpu
@pytest.mark.gpu
def test_gpu_training_on_all_visible_devices():
    import cupy

    x = synthetic(20000, 64, seed=1)
    cb = pqgpu.train(x, 16, 8, niter=5, backend="gpu", devices=list(range(cupy.cuda.runtime.getDeviceCount())))
    assert cb.centroids.shape == (16, 256, 4)


@pytest.mark.skipif(HAS_GPU, reason="checks the answers on a machine without a usable GPU")
def test_device_helpers_without_a_gpu():
    from pqgpu.backend import device_count, device_info, on_device, sync

    assert device_count() == 0
    sync("cpu")  # no-op
    sync("auto")  # resolves to the CPU here: no-op
    for call in (lambda: sync("gpu"), lambda: sync(), lambda: device_info(0), lambda: on_device(0).__enter__()):
        with pytest.raises(BackendUnavailable, match="backend 'gpu' was requested"):
            call()


@gpu
@pytest.mark.gpu
def test_device_helpers_on_the_gpu():
    import cupy

    from pqgpu.backend import device_count, device_info, on_device, sync

    n = device_count()
    assert n == cupy.cuda.runtime.getDeviceCount() >= 1
    with on_device(n - 1):
        assert cupy.cuda.Device().id == n - 1
        a = cupy.arange(1 << 20, dtype=cupy.float32)
        b = a * 2
        sync()
        assert float(b[-1].get()) == 2 * ((1 << 20) - 1)
    info = device_info(0)
    assert info["gpu_name"] and info["cuda_driver"] > 0 and info["cupy"] == cupy.__version__
