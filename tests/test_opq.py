"""OPQ: faiss VectorTransform file format both ways, code parity with faiss, recall vs faiss OPQ and plain PQ."""

from __future__ import annotations

import numpy as np
import pytest

import pqgpu
from pqgpu.codebook import Codebook, opq_matrix_bytes, parse_opq_matrix, read_opq_matrix
from pqgpu.opq import opq_rotation, procrustes, train_opq
from pqgpu.evaluation import recall_metrics

from .helpers import NAMESPACES, assert_codes_match, synthetic

faiss = pytest.importorskip("faiss")


def anisotropic(n: int, d: int, seed: int) -> np.ndarray:
    """Correlated dimensions whose variance falls 80x across d: plain PQ wastes codes on the quiet
    subspaces, a rotation spreads the variance evenly, so OPQ clearly helps here."""
    return synthetic(n, d, seed=seed) * np.geomspace(4.0, 0.05, d).astype(np.float32)


def faiss_opq_index(cb: Codebook):
    opq = faiss.OPQMatrix(cb.d, cb.M)
    faiss.copy_array_to_vector(cb.rotation.ravel(), opq.A)
    opq.is_trained = True
    index_pq = faiss.IndexPQ(cb.d, cb.M, cb.nbits)
    faiss.copy_array_to_vector(cb.centroids.ravel(), index_pq.pq.centroids)
    index_pq.is_trained = True
    index = faiss.IndexPreTransform(opq, index_pq)
    index.referenced_objects = [opq, index_pq]  # faiss's wrappers do not own constructor arguments
    return index


# -- file format --------------------------------------------------------------------------------------------

def test_opq_file_round_trips_both_ways_with_faiss(tmp_path):
    rng = np.random.default_rng(0)
    a = np.linalg.qr(rng.standard_normal((24, 24)))[0].astype(np.float32)
    ours = tmp_path / "ours.opq"
    ours.write_bytes(opq_matrix_bytes(a))
    vt = faiss.read_VectorTransform(str(ours))
    assert (vt.d_in, vt.d_out, vt.is_trained) == (24, 24, True)
    assert np.array_equal(faiss.vector_to_array(faiss.downcast_VectorTransform(vt).A).reshape(24, 24), a)
    x = rng.standard_normal((5, 24)).astype(np.float32)
    np.testing.assert_allclose(vt.apply(x), x @ a.T, rtol=1e-5, atol=1e-5)

    # faiss-trained OPQMatrix -> faiss file -> ours, and ours writes the identical bytes
    m = faiss.OPQMatrix(24, 4)
    m.niter = 2
    m.train(synthetic(2000, 24))
    theirs = tmp_path / "theirs.opq"
    faiss.write_VectorTransform(m, str(theirs))
    got = read_opq_matrix(theirs)
    assert got.dtype == np.float32 and np.array_equal(got, faiss.vector_to_array(m.A).reshape(24, 24))
    assert opq_matrix_bytes(got) == theirs.read_bytes()


def test_codebook_save_load_with_rotation(tmp_path):
    x = synthetic(1200, 16, seed=3)
    cb = train_opq(x, 4, 4, niter=3, opq_iter=2, niter_pq_0=3, backend="cpu")
    cb.save(tmp_path / "pq.faiss")
    assert faiss.read_ProductQuantizer(str(tmp_path / "pq.faiss")).M == 4
    vt = faiss.read_VectorTransform(str(tmp_path / "pq.faiss.opq"))
    assert np.array_equal(faiss.vector_to_array(faiss.downcast_VectorTransform(vt).A).reshape(16, 16), cb.rotation)
    back = Codebook.load(tmp_path / "pq.faiss")
    assert np.array_equal(back.rotation, cb.rotation) and back.fingerprint() == cb.fingerprint()


def test_opq_file_errors(tmp_path):
    with pytest.raises(pqgpu.InputError, match="only 3 bytes"):
        parse_opq_matrix(b"abc")
    pca = faiss.PCAMatrix(8, 8)
    pca.train(synthetic(200, 8))
    faiss.write_VectorTransform(pca, str(tmp_path / "pca.vt"))
    with pytest.raises(pqgpu.InputError, match="fourcc b'Pcam'"):
        read_opq_matrix(tmp_path / "pca.vt")
    (tmp_path / "wide.opq").write_bytes(opq_matrix_bytes(np.zeros((4, 8), np.float32)))
    with pytest.raises(pqgpu.InputError, match="only square"):
        read_opq_matrix(tmp_path / "wide.opq")
    raw = opq_matrix_bytes(np.eye(4, dtype=np.float32))
    with pytest.raises(pqgpu.InputError, match="unexpected length"):
        parse_opq_matrix(raw[:-5])
    with pytest.raises(pqgpu.InputError, match="Cannot read OPQ file"):
        read_opq_matrix(tmp_path / "missing.opq")


# -- training pieces ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("xp", NAMESPACES)
def test_procrustes_recovers_a_rotation(xp):
    rng = np.random.default_rng(1)
    r0 = np.linalg.qr(rng.standard_normal((12, 12)))[0].astype(np.float32)
    x = rng.standard_normal((300, 12)).astype(np.float32)
    got = np.asarray(procrustes(xp.asarray(x @ r0.T), xp.asarray(x)))
    np.testing.assert_allclose(got, r0, atol=1e-4)


@pytest.mark.parametrize("xp", NAMESPACES)
def test_opq_rotation_runs_on_namespace(xp):
    x = anisotropic(600, 16, seed=2)
    a = opq_rotation(xp.asarray(x), 4, 4, opq_iter=3, niter_pq=2, niter_pq_0=4, seed=5)
    assert a.shape == (16, 16) and a.dtype == np.float32
    np.testing.assert_allclose(a @ a.T, np.eye(16), atol=1e-4)
    ref = opq_rotation(x, 4, 4, opq_iter=3, niter_pq=2, niter_pq_0=4, seed=5)
    np.testing.assert_allclose(a, ref, atol=2e-3)


def test_train_with_opq_flag_and_errors():
    x = anisotropic(800, 16, seed=4)
    cb = pqgpu.train(x, 4, 4, niter=3, opq=True)
    assert cb.rotation is not None and cb.rotation.shape == (16, 16)
    assert pqgpu.train(x, 4, 4, niter=3).rotation is None
    with pytest.raises(pqgpu.ConfigError, match="opq_iter"):
        train_opq(x, 4, 4, opq_iter=0)
    with pytest.raises(pqgpu.InputError, match="at least 2\\*\\*nbits = 256 rows"):
        train_opq(x[:100], 4, 8)


def test_opq_codes_match_faiss_pretransform():
    x = anisotropic(3000, 32, seed=6)
    cb = train_opq(x[:2000], 8, 6, niter=5, opq_iter=3, niter_pq_0=5, backend="cpu")
    ours = cb.encode(x, backend="cpu")
    ref = faiss_opq_index(cb).sa_encode(x)
    assert_codes_match(ours, ref, x, cb.centroids, 6, rotation=cb.rotation)


# -- quality -----------------------------------------------------------------------------------------------

def test_opq_recall_at_least_faiss_opq_and_better_than_pq():
    d, M, nbits, opq_iter = 32, 8, 6, 25  # converged enough that the random start does not matter
    xt, xb, q = anisotropic(5000, d, 11), anisotropic(8000, d, 12), anisotropic(400, d, 13)
    gt = faiss.knn(q, xb, 10)[1]

    def recall(index):
        index.add(xb)
        return recall_metrics(index.search(q, 10)[1], gt, (10,))["10-recall@10"]

    cb_opq = train_opq(xt, M, nbits, niter=10, opq_iter=opq_iter, backend="cpu")
    ours_opq = recall(faiss_opq_index(cb_opq))
    cb_pq = pqgpu.train(xt, M, nbits, niter=10, backend="cpu")
    index_pq = faiss.IndexPQ(d, M, nbits)
    faiss.copy_array_to_vector(cb_pq.centroids.ravel(), index_pq.pq.centroids)
    index_pq.is_trained = True
    ours_pq = recall(index_pq)

    ref = faiss.index_factory(d, f"OPQ{M},PQ{M}x{nbits}")
    opq = faiss.downcast_VectorTransform(ref.chain.at(0))
    opq.niter = opq_iter
    # faiss's default inner PQ is 8 bits whatever the final nbits; give it the final one, like ours
    opq.pq = faiss.ProductQuantizer(d, M, nbits)
    faiss.downcast_index(ref.index).pq.cp.niter = 10
    ref.train(xt)
    theirs_opq = recall(ref)
    assert ours_opq >= theirs_opq - 0.005, (ours_opq, theirs_opq)
    assert ours_opq > ours_pq + 0.1, (ours_opq, ours_pq)
