"""Every byte that search trusts is checked (issue 21): the IVF layout and the codebook are checksummed like
the codes, a killed inverted build is not "complete", source fingerprints follow the files (not the spelling
of source.path, but in-place rewrites), uint64 ids stay exact, and a fixed bad row resumes as promised."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import pqgpu
from pqgpu import cli
from pqgpu.config import config_from_dict
from pqgpu.errors import InputError, StoreError
from pqgpu.pipeline import encode, run
from pqgpu.sample import make_sample
from pqgpu.search import search
from pqgpu.store import open_store

N, D = 3001, 32


def config(tmp_path, *, path=None, fmt="parquet", nlist=0, chunk_rows=700, id_column="id", out="codes.zarr"):
    return config_from_dict({
        "source": {"format": fmt, "path": str(path or tmp_path / "data" / "*.parquet"), "id_column": id_column},
        "quantizer": {"path": str(tmp_path / "pq.faiss"), "M": 8, "nbits": 8, "nlist": nlist, "train_size": 2500,
                      "niter": 5},
        "encode": {"output": str(tmp_path / out), "chunk_rows": chunk_rows, "backend": "cpu"},
    })


def tree(path) -> dict[str, bytes]:
    """Every file under path (the store's root zarr.json without its run log, which differs between runs)."""
    root = Path(path)
    out = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    meta = json.loads(out["zarr.json"])
    meta["attributes"].pop("encode_runs", None)
    out["zarr.json"] = json.dumps(meta, sort_keys=True).encode()
    return out


@pytest.fixture(scope="module")
def ivf_clean(tmp_path_factory):
    """A built IVF store (3 Parquet shards, 24 lists, 5 inverted chunks) and its files, to copy and damage."""
    tmp = tmp_path_factory.mktemp("clean")
    make_sample(tmp / "data", N, D, shards=3, fmt="parquet")
    cfg = config(tmp, nlist=24)
    run(cfg)
    queries = np.load(tmp / "data" / "queries.npy")[:20]
    return tmp, tree(cfg.encode.output), search(cfg.encode.output, queries, 10, nprobe=4), queries


@pytest.fixture
def ivf_copy(ivf_clean, tmp_path):
    """A private copy of the clean IVF store (data, quantizer, store) and its config."""
    src, files, results, queries = ivf_clean
    shutil.copytree(src / "codes.zarr", tmp_path / "codes.zarr")  # the source stays where the store records it
    shutil.copy(src / "pq.faiss", tmp_path / "pq.faiss")
    return config(tmp_path, path=src / "data" / "*.parquet", nlist=24), files, results, queries


def _delete_chunk(g, path):
    Path(path, "ivf/codes/c/1/0").unlink()


def _rewrite_through_zarr(g, path):
    codes = g["ivf/codes"]
    codes[800:900] = (np.asarray(codes[800:900]) + 1).astype(np.uint8)  # a valid Zarr write: only a CRC sees it


def _truncate_chunk(g, path):
    p = Path(path, "ivf/rows/c/2")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _lose_rows_chunk(g, path):
    Path(path, "ivf/rows/c/0").unlink()  # searched naively this returned id -1


def _rewrite_offsets(g, path):
    off = np.asarray(g["ivf/offsets"][...])
    off[5] += 3
    g["ivf/offsets"][...] = off


@pytest.mark.parametrize("damage, named", [
    (_delete_chunk, "ivf/codes chunk 1"), (_rewrite_through_zarr, "ivf/codes chunk 1"),
    (_truncate_chunk, "ivf/rows chunk 2"), (_lose_rows_chunk, "ivf/rows chunk 0"), (_rewrite_offsets, "ivf/offsets"),
], ids=["deleted", "rewritten", "truncated", "lost-rows", "offsets"])
def test_damaged_ivf_layout_is_named_refused_and_rebuilt(ivf_copy, tmp_path, capsys, damage, named):
    cfg, clean, results, queries = ivf_copy
    out = cfg.encode.output
    assert cli.main(["verify", out]) == 0
    assert "inverted layout built" in capsys.readouterr().out
    damage(zarr.open_group(out, mode="r+"), out)

    assert cli.main(["verify", out]) != 0
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    q = tmp_path / "q.npy"
    np.save(q, queries)
    assert cli.main(["search", out, "--queries", str(q), "-k", "10", "--nprobe", "24"]) != 0
    assert "damaged" in capsys.readouterr().err
    index = tmp_path / "index.faiss"
    if "rows" in named:  # export writes codes and ids, not the rows: it reads nothing damaged
        assert cli.main(["export-faiss", out, "--out", str(index)]) == 0
        capsys.readouterr()
    else:
        assert cli.main(["export-faiss", out, "--out", str(index)]) != 0
        assert "damaged" in capsys.readouterr().err and not index.exists()

    report = encode(cfg)  # resume: nothing to encode, the layout is rebuilt
    assert report.chunks_encoded == 0
    assert tree(out) == clean
    assert cli.main(["verify", out]) == 0
    d, ids = search(out, queries, 10, nprobe=4)
    np.testing.assert_array_equal(ids, results[1])


def test_info_names_a_lost_inverted_chunk(ivf_copy, capsys):
    cfg, *_ = ivf_copy
    out = cfg.encode.output
    Path(out, "ivf/codes/c/3/0").unlink()
    assert cli.main(["info", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] is False and info["codes"] == "complete"
    assert info["layout"].startswith("damaged") and "ivf/codes" in info["layout"]


def test_damaged_codebook_is_refused_everywhere_and_restored_by_resume(ivf_copy, tmp_path, capsys):
    cfg, clean, results, queries = ivf_copy
    out = cfg.encode.output
    g = zarr.open_group(out, mode="r+")
    centroids = np.asarray(g["codebook/centroids"][...])
    altered = centroids.copy()
    altered[3] = altered[3][::-1]  # one subspace's rows reversed: every code of it now decodes wrongly
    g["codebook/centroids"][...] = altered

    assert cli.main(["verify", out]) != 0
    assert "codebook" in capsys.readouterr().err
    with pytest.raises(StoreError, match="codebook"):
        search(out, queries, 10, nprobe=4)
    q = tmp_path / "q.npy"
    np.save(q, queries)
    assert cli.main(["search", out, "--queries", str(q), "-k", "5"]) != 0
    err = capsys.readouterr().err
    assert "sha256" in err and "quantizer file" in err
    assert cli.main(["export-faiss", out, "--out", str(tmp_path / "i.faiss")]) != 0
    assert "codebook" in capsys.readouterr().err and not (tmp_path / "i.faiss").exists()
    assert cli.main(["info", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["codebook"] == "damaged" and info["complete"] is False

    encode(cfg)  # the quantizer file has the recorded sha256: it restores the codebook
    np.testing.assert_array_equal(open_store(out).group["codebook/centroids"][...], centroids)
    assert cli.main(["verify", out]) == 0
    np.testing.assert_array_equal(search(out, queries, 10, nprobe=4)[1], results[1])


@pytest.mark.parametrize("fault", ["ivf-scatter:2:kill", "ivf-copy:3:kill"])
def test_killed_inverted_build_is_not_complete(ivf_clean, tmp_path, capsys, fault):
    src, clean, results, queries = ivf_clean
    shutil.copytree(src / "data", tmp_path / "data")
    cfg = config(tmp_path, nlist=24)
    shutil.copy(src / "pq.faiss", cfg.quantizer.path)
    env = dict(os.environ, PQGPU_FAULT=fault, PYTHONPATH=str(Path(pqgpu.__file__).resolve().parents[1]))
    args = ["run", str(tmp_path / "data" / "*.parquet"), "--out", str(tmp_path), "--M", "8", "--id-column", "id",
            "--set", "quantizer.nlist=24", "--set", "encode.chunk_rows=700", "--set", "encode.backend=cpu"]
    r = subprocess.run([sys.executable, "-m", "pqgpu.cli", *args], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -9, r.stderr
    out = cfg.encode.output
    assert cli.main(["info", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["codes"] == "complete" and info["layout"].startswith("building") and info["complete"] is False
    assert cli.main(["info", out]) == 0
    assert "inverted layout: building" in capsys.readouterr().out
    assert cli.main(["verify", out]) != 0
    assert "inverted layout is building" in capsys.readouterr().err
    assert cli.main(args) == 0  # the same command finishes the build
    capsys.readouterr()
    done, ref = tree(out), dict(clean)
    del done["zarr.json"], ref["zarr.json"]  # the root attrs name the source's other directory
    assert done == ref
    assert cli.main(["verify", out]) == 0


# -- fingerprints ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["zarr", "npy"])
def test_source_rewritten_in_place_is_encoded_again(tmp_path, fmt):
    shards = make_sample(tmp_path / "data", N, D, shards=3, fmt=fmt)
    pattern = {"zarr": "*.zarr", "npy": "shard-*.npy"}[fmt]
    ids = str(tmp_path / "data" / "ids-*.npy") if fmt == "npy" else "id"
    cfg = config(tmp_path, path=tmp_path / "data" / pattern, fmt=fmt, id_column=ids)
    run(cfg)
    # shard 1 (rows 1000-1999) gets new values, same shape
    new = np.random.default_rng(5).standard_normal((1000, D)).astype(np.float32)
    if fmt == "zarr":
        zarr.open_group(str(shards[1]), mode="r+")["embedding"][...] = new
    else:
        np.save(shards[1], new)
    report = encode(cfg)
    assert report.chunks_encoded == 2  # chunks 1 and 2 (rows 700-2099) hold shard 1's rows; the others are kept
    fresh = encode(config(tmp_path, path=tmp_path / "data" / pattern, fmt=fmt, id_column=ids, out="fresh.zarr"))
    assert fresh.chunks_encoded == 5
    a, b = open_store(cfg.encode.output), open_store(str(tmp_path / "fresh.zarr"))
    np.testing.assert_array_equal(a.codes[...], b.codes[...])
    np.testing.assert_array_equal(a.ids[...], b.ids[...])
    assert encode(cfg).chunks_encoded == 0


def test_path_spellings_name_the_same_files(tmp_path, monkeypatch):
    make_sample(tmp_path / "data", N, D, shards=3, fmt="parquet")
    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, path="data")
    run(cfg)
    for spelling in ("data/", "data/*.parquet", str(tmp_path / "data"), "./data/../data"):
        assert encode(config(tmp_path, path=spelling)).chunks_encoded == 0, spelling
    big = tmp_path / "big.npy"
    np.save(big, np.random.default_rng(1).standard_normal((1500, D)).astype(np.float32))
    npy = config(tmp_path, path="./big.npy", fmt="npy", id_column=None, out="npy.zarr")
    encode(npy)
    assert encode(config(tmp_path, path=str(big), fmt="npy", id_column=None, out="npy.zarr")).chunks_encoded == 0


def test_added_and_removed_files_are_refused_naming_them(tmp_path):
    make_sample(tmp_path / "data", N, D, shards=3, fmt="parquet")
    cfg = config(tmp_path)
    run(cfg)
    before = tree(cfg.encode.output)
    shutil.copy(tmp_path / "data" / "shard-0002.parquet", tmp_path / "data" / "shard-0003.parquet")
    with pytest.raises(StoreError, match="shard-0003.parquet") as exc:
        encode(cfg)
    assert "--overwrite" in str(exc.value)
    (tmp_path / "data" / "shard-0003.parquet").unlink()
    (tmp_path / "data" / "shard-0001.parquet").rename(tmp_path / "data" / "moved.parquet.bak")
    with pytest.raises(StoreError, match="shard-0001.parquet"):
        encode(cfg)
    assert tree(cfg.encode.output) == before  # refused: nothing written


def test_fixed_bad_row_resumes_as_the_message_says(tmp_path):
    import pyarrow.parquet as pq

    from pqgpu.pipeline import train

    make_sample(tmp_path / "data", N, D, shards=3, fmt="parquet")
    cfg = config(tmp_path, chunk_rows=400)
    train(cfg)  # on the clean rows: the bad one is met by an encode task
    path = tmp_path / "data" / "shard-0002.parquet"
    table = pq.read_table(path)
    good = table.column("embedding").to_pylist()
    bad = [list(v) for v in good]
    bad[500][3] = float("nan")
    pq.write_table(table.set_column(1, "embedding", __import__("pyarrow").array(bad, table.schema.field(1).type)),
                   path)
    with pytest.raises(InputError) as exc:
        run(cfg)
    msg = str(exc.value)
    assert "shard-0002.parquet: row 500" in msg and "Fix it in place and run the same command again" in msg
    done_before = open_store(cfg.encode.output).done[...].copy()
    pq.write_table(table, path)  # fixed in place: same rows
    report = run(cfg)
    # the chunks not done, plus the done ones that hold rows of the rewritten shard (rows 2000-3000)
    redo = set(np.flatnonzero(~done_before)) | set(range(2000 // 400, 8))
    assert report.chunks_encoded == len(redo)
    fresh = encode(config(tmp_path, chunk_rows=400, out="fresh.zarr"))
    np.testing.assert_array_equal(open_store(cfg.encode.output).codes[...], open_store(fresh.store).codes[...])


# -- ids as they are ------------------------------------------------------------------------------------

def _uint64_shards(tmp_path, ids_per_shard):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    (tmp_path / "data").mkdir()
    for s, ids in enumerate(ids_per_shard):
        x = rng.standard_normal((len(ids), D)).astype(np.float32)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), D)
        pq.write_table(pa.table({"id": ids, "embedding": emb}), tmp_path / "data" / f"shard-{s}.parquet")


def test_uint64_ids_keep_their_values_and_export_refuses_them(tmp_path, capsys):
    import pyarrow as pa

    big = np.arange(1500, dtype=np.uint64) + np.uint64(2**63)
    big[-1] = np.uint64(2**64 - 2)
    _uint64_shards(tmp_path, [pa.array(big[:800], pa.uint64()), pa.array(big[800:], pa.uint64())])
    cfg = config(tmp_path)
    run(cfg)
    store = open_store(cfg.encode.output)
    assert store.ids.dtype == np.uint64
    np.testing.assert_array_equal(store.ids[...], big)
    _, found = search(cfg.encode.output, np.zeros((2, D), np.float32), 5)
    assert found.dtype == np.uint64 and set(found.reshape(-1).tolist()) <= set(big.tolist())
    q = tmp_path / "q.npy"
    np.save(q, np.zeros((2, D), np.float32))
    res = tmp_path / "res.parquet"
    assert cli.main(["search", cfg.encode.output, "--queries", str(q), "-k", "5", "--out", str(res)]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(res)
    assert str(table.schema.field("id").type) == "uint64"
    np.testing.assert_array_equal(table.column("id").to_numpy(), found.reshape(-1))
    assert cli.main(["export-faiss", cfg.encode.output, "--out", str(tmp_path / "i.faiss")]) == 2
    err = capsys.readouterr().err
    assert "2**63" in err and "Traceback" not in err and not (tmp_path / "i.faiss").exists()


def test_mixed_signed_and_unsigned_ids_that_do_not_fit_are_an_error(tmp_path):
    import pyarrow as pa

    _uint64_shards(tmp_path, [pa.array(np.arange(700), pa.int64()),
                              pa.array(np.array([5, 6, 2**63 + 1] + list(range(10, 707)), np.uint64), pa.uint64())])
    with pytest.raises(InputError, match=r"shard-1.parquet: row 2 .*9223372036854775809"):
        run(config(tmp_path))


# -- the fingerprint comparison, on its own ------------------------------------------------------------

def _fp(*files, fmt="parquet", d=8):
    return {"version": 2, "format": fmt, "path": "x", "id_column": "id", "vector_column": "embedding", "d": d,
            "n": sum(f[1] for f in files),
            "files": [{"path": p, "rows": r, "size": s, "mtime": "1", "tag": ""} for p, r, s in files]}


def test_fingerprint_comparison_says_what_changed():
    from pqgpu.sources.fingerprint import chunks_of_shards, compare

    base = _fp(("/d/a", 10, 100), ("/d/b", 10, 100), ("/d/c", 5, 50))
    assert compare(base, base).same
    grown = _fp(("/d/a", 10, 100), ("/d/b", 10, 100), ("/d/c", 5, 50), ("/d/d", 3, 30))
    assert compare(base, grown).added == ["/d/d"] and compare(base, grown).refused is None
    assert "/d/b" in compare(base, _fp(("/d/a", 10, 100), ("/d/c", 5, 50))).refused
    assert "sort among" in compare(base, _fp(("/d/a", 10, 100), ("/d/a2", 1, 1), ("/d/b", 10, 100),
                                             ("/d/c", 5, 50))).refused
    assert "/d/b had 10 rows and now has 11" in compare(base, _fp(("/d/a", 10, 100), ("/d/b", 11, 100),
                                                                   ("/d/c", 5, 50))).refused
    rewritten = compare(base, _fp(("/d/a", 10, 100), ("/d/b", 10, 101), ("/d/c", 5, 50)))
    assert rewritten.refused is None and rewritten.changed == [1]
    assert "dimension" in compare(base, _fp(("/d/a", 10, 100), ("/d/b", 10, 100), ("/d/c", 5, 50), d=16)).refused
    # rows 10-19 of shard b lie in chunks 1 and 2 of 7 rows (rows 7-13, 14-20)
    assert chunks_of_shards(base["files"], [1], 7) == [1, 2]


def test_store_with_an_older_fingerprint_resumes_and_gets_the_new_one(tmp_path):
    make_sample(tmp_path / "data", N, D, shards=3, fmt="parquet")
    cfg = config(tmp_path)
    run(cfg)
    store = open_store(cfg.encode.output, mode="r+")
    new = store.attrs["source"]
    # what pqgpu wrote before: base names, rows, size, mtime in seconds as fsspec gave them
    old = {k: new[k] for k in ("format", "path", "id_column", "vector_column", "n", "d")}
    old["files"] = [[os.path.basename(f["path"]), f["rows"], f["size"], str(int(f["mtime"]) / 1e9)]
                    for f in new["files"]]
    store.group.attrs["source"] = old
    assert encode(cfg).chunks_encoded == 0
    assert open_store(cfg.encode.output).attrs["source"] == new
