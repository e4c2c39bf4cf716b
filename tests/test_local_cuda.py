"""Host side of local-cuda, on the CPU: GPU workers read, decode and write chunks on several threads while the
encodes take turns on the GPU; chunks are pinned outside that turn and uploaded from where they lie."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pqgpu import backend, store, tasks
from pqgpu.backend import NumpyDevice, encode_blocks
from pqgpu.cluster import cuda_worker_threads
from pqgpu.sources import Chunk

from .helpers import synthetic


def test_cuda_worker_threads_share_the_cores_among_gpus():
    assert cuda_worker_threads(16, 1) == 16
    assert cuda_worker_threads(16, 4) == 4
    assert cuda_worker_threads(16, 8) == 2
    assert cuda_worker_threads(2, 4) == 2  # never fewer than 2: one encodes while another reads
    assert cuda_worker_threads(1, 0) == 2


class Gauge:
    """Counts how many threads are inside a section at once."""

    def __init__(self):
        self.now = self.peak = 0
        self.lock = threading.Lock()

    def __enter__(self):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1


def test_gpu_tasks_read_in_parallel_and_encode_one_at_a_time(monkeypatch):
    reads, encodes, pinned = Gauge(), Gauge(), set()
    d = 8

    class Source:
        def read_chunk(self, chunk):
            with reads:
                time.sleep(0.05)
            return np.full((chunk.rows, d), chunk.index, np.float32), np.arange(chunk.start, chunk.stop)

    class Codebook:
        d = 8
        metric = "l2"

        def encode(self, x, backend, checked):
            assert backend == "gpu" and checked and id(x) in pinned  # the pinned copy, not the chunk as read
            with encodes:
                time.sleep(0.02)
            return np.zeros((len(x), 4), np.uint8)

    def fake_pinned_copy(x):
        copy = np.array(x)  # standing in for page-locked memory
        pinned.add(id(copy))
        return copy

    written = []
    monkeypatch.setattr(backend, "pinned_copy", fake_pinned_copy)
    monkeypatch.setattr(tasks, "resolve_here", lambda requested: requested)  # this machine has no GPU
    monkeypatch.setattr(store, "write_chunk", lambda path, i, start, codes, ids, *lists: written.append(i))
    chunks = [Chunk(i, 10 * i, 10 * i + 10, ()) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: tasks.encode_chunk(Source(), c, "store", Codebook(), "gpu", None),
                                chunks))
    assert sorted(written) == list(range(8)) and [(r.index, r.rows) for r in results] == [(i, 10) for i in range(8)]
    assert {r.backend for r in results} == {"gpu"}
    assert encodes.peak == 1  # one encode at a time on the GPU
    assert reads.peak >= 2  # reads overlapped each other (and the encodes)


def test_cpu_tasks_read_in_parallel_and_take_turns_on_the_kernel(monkeypatch):
    # numba's workqueue threading layer aborts the process when two threads launch parallel kernels at once
    reads, encodes = Gauge(), Gauge()

    class Source:
        def read_chunk(self, chunk):
            with reads:
                time.sleep(0.05)
            return np.zeros((chunk.rows, 4), np.float32), np.arange(chunk.rows)

    class Codebook:
        d = 4
        metric = "l2"

        def encode(self, x, backend, checked):
            with encodes:
                time.sleep(0.05)
            return np.zeros((len(x), 2), np.uint8)

    monkeypatch.setattr(store, "write_chunk", lambda *a: None)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda i: tasks.encode_chunk(Source(), Chunk(i, 0, 5, ()), "s", Codebook(), "cpu",
                                                             None), range(3)))
    assert [r.index for r in results] == [0, 1, 2] and {r.backend for r in results} == {"cpu"}
    assert encodes.peak == 1 and reads.peak >= 2


class PinnedNumpyDevice(NumpyDevice):
    """Claims every host array is page-locked and counts staging buffers it is asked for."""

    def __init__(self):
        super().__init__()
        self.staged = 0

    def is_pinned(self, host):
        return True

    def pinned_like(self, shape, dtype):
        if len(shape) == 2 and shape[1] > 4:  # (block_rows, d) staging, not the (block_rows, code_size) results
            self.staged += 1
        return super().pinned_like(shape, dtype)


def test_pinned_input_is_uploaded_without_staging():
    x = synthetic(700, 32, seed=6)
    c = np.ascontiguousarray(np.stack([synthetic(64, 32, seed=7)[:, m * 8:(m + 1) * 8] for m in range(4)]))
    dev = PinnedNumpyDevice()
    out = encode_blocks(x, c, 6, dev, block_rows=128)
    assert dev.staged == 0
    assert np.array_equal(out, encode_blocks(x, c, 6, NumpyDevice(), block_rows=128))
    assert np.array_equal(out, encode_blocks(x, c, 6, NumpyDevice(), block_rows=1000))


# ---------------------------------------------------------------------------------------------- on a GPU

HAS_GPU, GPU_REASON = backend.gpu_status()
gpu = pytest.mark.skipif(not HAS_GPU, reason=f"needs a CUDA GPU: {GPU_REASON}")


@gpu
@pytest.mark.gpu
def test_pinned_copy_is_recognised_and_pageable_memory_is_not():
    dev = backend.cupy_device()
    x = synthetic(1000, 64, seed=1)
    p = backend.pinned_copy(x)
    assert np.array_equal(p, x) and dev.is_pinned(p) and not dev.is_pinned(x)


@gpu
@pytest.mark.gpu
def test_local_cuda_pipeline_end_to_end(tmp_path):
    pytest.importorskip("dask_cuda")
    from pqgpu.codebook import Codebook
    from pqgpu.config import config_from_dict
    from pqgpu.pipeline import run
    from pqgpu.sample import make_sample
    from pqgpu.sources import open_source, plan_chunks
    from pqgpu.store import open_store

    from .helpers import assert_codes_match

    make_sample(tmp_path / "data", 30000, 64, shards=3, fmt="parquet")
    cfg = config_from_dict({
        "source": {"format": "parquet", "path": str(tmp_path / "data/*.parquet"), "id_column": "id"},
        "quantizer": {"path": str(tmp_path / "pq.faiss"), "M": 16, "nbits": 8, "train_size": 10000, "niter": 5},
        "encode": {"output": str(tmp_path / "codes.zarr"), "chunk_rows": 4096, "backend": "gpu"},
        "cluster": {"kind": "local-cuda"},
    })
    run(cfg)
    cb = Codebook.load(cfg.quantizer.path)
    src = open_source(cfg.source)
    [whole] = plan_chunks([s.n_rows for s in src.shards], src.n)
    x, _ = src.read_chunk(whole)
    assert_codes_match(open_store(cfg.encode.output).codes[...], cb.encode(x, backend="cpu"), x, cb.centroids, 8)
