"""A store that lost data must not pass for complete (issue 16 item 8): per-chunk checksums, `pqgpu verify`,
resume re-encodes missing or damaged chunks, search and export refuse a store with a missing chunk."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from pqgpu import cli
from pqgpu.codebook import Codebook
from pqgpu.errors import StoreError
from pqgpu.pipeline import encode
from pqgpu.search import search
from pqgpu.store import chunk_checksum, create_store, open_store, write_chunk

from .test_reliability import prepared  # noqa: F401  (fixture: sample data, quantizer, reference codes)


@pytest.fixture
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


def chunk_files(store_path: str) -> dict[str, bytes]:
    """Every file of the store, bytes; the root zarr.json without its `encode_runs` log (when each run
    finished, on which workers), which differs between any two runs."""
    import json

    root = Path(store_path)
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    meta = json.loads(files["zarr.json"])
    assert meta["attributes"].pop("encode_runs")
    files["zarr.json"] = json.dumps(meta, sort_keys=True).encode()
    return files


def flip_bytes(path: Path, offsets=(7, 8, 9)) -> None:
    data = bytearray(path.read_bytes())
    for o in offsets:
        data[o % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_lost_and_damaged_chunks_are_found_refused_and_re_encoded(prepared, client, tmp_path, capsys,  # noqa: F811
                                                                  caplog):
    cfg_path, cfg, codes, ids = prepared
    out = cfg.encode.output
    encode(cfg, client=client)
    clean = chunk_files(out)
    assert any(k.startswith("codes/c/") for k in clean) and any(k.startswith("checksums/c/") for k in clean)
    assert cli.main(["verify", out]) == 0
    assert "8 chunks OK" in capsys.readouterr().out

    Path(out, "codes/c/2/0").unlink()  # a partial copy
    flip_bytes(Path(out, "codes/c/5/0"))  # damaged bytes: reads back as wrong codes
    flip_bytes(Path(out, "ids/c/6"), offsets=(-3, -2))  # and in a (compressed) ids chunk

    assert cli.main(["info", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] is False and info["chunks_missing"] == [2]

    assert cli.main(["verify", out]) != 0
    err = capsys.readouterr().err
    assert "chunk 2 (rows 600-899): codes/c/2/0 is missing" in err
    assert "chunk 5 (rows 1500-1799): codes checksum mismatch" in err
    assert "chunk 6 (rows 1800-2099)" in err
    assert "chunk 1 " not in err and "chunk 7 " not in err

    q = tmp_path / "q.npy"
    np.save(q, np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32))
    assert cli.main(["search", out, "--queries", str(q), "-k", "5"]) != 0
    err = capsys.readouterr().err
    assert "has lost data" in err and "chunk 2 (rows 600-899)" in err
    index = tmp_path / "pq.index"
    assert cli.main(["export-faiss", out, "--out", str(index)]) != 0
    assert "has lost data" in capsys.readouterr().err and not index.exists()
    with pytest.raises(StoreError, match="codes/c/2/0 is missing"):
        search(out, np.zeros((1, 16), np.float32), 3)

    with caplog.at_level(logging.WARNING, logger="pqgpu.store"):
        report = encode(cfg, client=client)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "chunk 2 " in warned and "chunk 5 " in warned and "chunk 6 " in warned and "Re-encoding" in warned
    assert report.chunks_encoded == 3
    assert chunk_files(out) == clean  # byte-identical to the clean run
    store = open_store(out)
    assert np.array_equal(store.codes[...], codes) and np.array_equal(store.ids[...], ids)
    assert cli.main(["verify", out]) == 0


def test_store_from_an_older_pqgpu_without_checksums(prepared, client, capsys):  # noqa: F811
    _, cfg, codes, _ = prepared
    out = cfg.encode.output
    encode(cfg, client=client)
    import shutil

    shutil.rmtree(Path(out, "checksums"))  # what an older pqgpu wrote: no checksums array
    assert cli.main(["verify", out]) == 0
    assert "no checksums recorded (made by an older pqgpu)" in capsys.readouterr().out
    Path(out, "codes/c/3/0").unlink()
    assert cli.main(["verify", out]) != 0
    assert "chunk 3 (rows 900-1199): codes/c/3/0 is missing" in capsys.readouterr().err
    report = encode(cfg, client=client)  # presence check on resume
    assert report.chunks_encoded == 1
    assert np.array_equal(open_store(out).codes[...], codes)


def test_all_fill_value_chunk_is_written_and_checksum_is_of_values(tmp_path):
    cb = Codebook(8, 2, 4, np.random.default_rng(0).standard_normal((2, 16, 4)).astype(np.float32))
    path = str(tmp_path / "s.zarr")
    create_store(path, codebook=cb, n=10, chunk_rows=5, id_dtype=np.int64, source={})
    zeros = np.zeros((5, cb.code_size), np.uint8)
    write_chunk(path, 0, 0, zeros, np.zeros(5, np.int32))  # all fill values, ids cast to int64
    write_chunk(path, 1, 5, zeros + 3, np.arange(5, 10))
    assert Path(path, "codes/c/0/0").exists()  # a missing file must always mean lost data
    store = open_store(path)
    assert store.verify().bad == {}
    # the checksums are of the values: independent CRC-32Cs of the same bytes, one per array
    import google_crc32c

    row = store.group["checksums"][1]
    assert list(store.group["checksums"].attrs["columns"]) == ["codes", "ids"]
    assert int(row[0]) == google_crc32c.value((zeros + 3).tobytes())
    assert int(row[1]) == google_crc32c.value(np.arange(5, 10, dtype="<i8").tobytes())
    from pqgpu.integrity import crc

    assert crc(np.array(["a", "bc"])) != crc(np.array(["ab", "c"]))
    assert chunk_checksum(zeros[:2], np.array(["a", "bc"])) != chunk_checksum(zeros[:2], np.array(["ab", "c"]))
