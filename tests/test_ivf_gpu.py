"""IVF-PQ on the GPU: training, encoding, the pipeline and the nprobe search with backend gpu (CuPy).

Marked `gpu`: they need CuPy and a CUDA device and are skipped, with the reason, everywhere else; the GPU check
(`benchmarks/gpu_check.sh`, step "gpu_tests") runs them. Expected values come from faiss (the trained file
loaded by faiss, its quantizer.assign, compute_codes, search and its own training), never from the GPU route
itself. They call no numba kernel: on the GPU machine's cold cache each would compile within the step's time.
"""

from __future__ import annotations

import numpy as np
import pytest

from pqgpu.backend import gpu_status
from pqgpu.config import config_from_dict
from pqgpu.ivf import train_ivf
from pqgpu.sample import make_sample

from .helpers import assert_codes_match, synthetic
from .test_ivf import assert_lists_match, assert_same_topk, faiss_ivf, source_vectors

faiss = pytest.importorskip("faiss")
HAS_GPU, GPU_REASON = gpu_status()
gpu = pytest.mark.skipif(not HAS_GPU, reason=f"needs a CUDA GPU: {GPU_REASON}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("nbits,opq", [(8, False), (4, False), (12, False), (8, True)])
def test_gpu_trained_ivf_loads_in_faiss_and_gpu_encode_equals_faiss(tmp_path, nbits, opq):
    x = synthetic(6000, 32, seed=nbits + 10 * opq)
    cb = train_ivf(x, 8, nbits, 16, niter=4, seed=0, backend="gpu", opq=opq)
    path = tmp_path / "ivf.faiss"
    cb.save(path)
    index = faiss.read_index(str(path))
    assert isinstance(index, faiss.IndexPreTransform if opq else faiss.IndexIVFPQ)
    ivf = faiss_ivf(index)
    np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, 16), cb.coarse)
    lists, codes = cb.encode_ivf(x, backend="gpu")
    y = cb.rotate(x)
    assert_lists_match(lists, y, cb.coarse)  # faiss quantizer.assign, up to float32 ties
    residual = np.ascontiguousarray(y - cb.coarse[lists])
    assert_codes_match(codes, ivf.pq.compute_codes(residual), residual, cb.centroids, nbits)


@gpu
@pytest.mark.gpu
def test_gpu_ivf_training_quality_matches_faiss():
    """Trained on the GPU, the quantizer reconstructs held-out rows as well as faiss's own IndexIVFPQ trained
    on the same rows with the same nlist, M, nbits and iterations (other k-means seeds: within 5 %)."""
    x = synthetic(8000, 32, seed=5)
    held = synthetic(2000, 32, seed=6)
    cb = train_ivf(x, 8, 8, 32, niter=6, seed=0, backend="gpu")
    lists, codes = cb.encode_ivf(held, backend="gpu")
    ours = float(((cb.decode_ivf(codes, lists) - held) ** 2).sum(1).mean())
    index = faiss.index_factory(32, "IVF32,PQ8x8")
    ivf = faiss_ivf(index)
    ivf.cp.niter = ivf.pq.cp.niter = 6
    ivf.do_polysemous_training = False
    index.train(x)
    theirs = float(((index.sa_decode(index.sa_encode(held)) - held) ** 2).sum(1).mean())
    assert ours <= theirs * 1.05, (ours, theirs)


@gpu
@pytest.mark.gpu
def test_gpu_ivf_pipeline_search_and_export_equal_faiss(tmp_path):
    from pqgpu.export import export_faiss
    from pqgpu.ivf_search import IvfIndex
    from pqgpu.pipeline import run
    from pqgpu.store import open_store

    make_sample(tmp_path / "data", 12000, 32, shards=2, fmt="parquet")
    cfg = config_from_dict({
        "source": {"format": "parquet", "path": str(tmp_path / "data" / "*.parquet"), "id_column": "id"},
        "quantizer": {"path": str(tmp_path / "ivf.faiss"), "M": 8, "nbits": 8, "nlist": 32, "train_size": 6000,
                      "niter": 5},
        "encode": {"output": str(tmp_path / "codes.zarr"), "chunk_rows": 4096, "backend": "gpu"},
    })
    run(cfg)
    store = open_store(cfg.encode.output)
    x, ids = source_vectors(cfg)
    index = faiss.read_index(cfg.quantizer.path)
    index.add_with_ids(x, np.arange(x.shape[0], dtype=np.int64))  # faiss's own add, labelled by row
    q = synthetic(50, 32, seed=12)
    loaded = IvfIndex(store)
    for nprobe in (1, 6):
        faiss_ivf(index).nprobe = nprobe
        ref_d, ref_rows = index.search(q, 10)
        d, rows = loaded.search(q, 10, nprobe=nprobe, backend="gpu")
        assert_same_topk(np.asarray(d), np.asarray(rows), ref_d, ref_rows)
    out = tmp_path / "exported.faiss"
    export_faiss(store, out)
    exported = faiss.read_index(str(out))
    assert exported.ntotal == store.n
    faiss_ivf(exported).nprobe = 6
    _, f_ids = exported.search(q, 10)
    _, rows = loaded.search(q, 10, nprobe=6, backend="gpu")
    assert (f_ids == ids[np.asarray(rows)]).mean() >= 0.999
