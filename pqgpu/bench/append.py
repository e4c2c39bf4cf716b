"""What an append costs (issue 23): whole processes, as a user runs them. 10 Parquet shards are encoded, then an
11th lands: `pqgpu encode --append` (the new shard only) against `pqgpu encode --overwrite` of all 11 shards with
the same quantizer, flat and IVF. Then IVF search queries/s over a store of 4 segments (8 shards + 3 appends)
against one layout of the same rows (a one-shot encode), and after `pqgpu compact`, with the index loaded in
memory and with only the probed lists read per batch. Targets: append <= 0.2x the full encode; 4 segments >=
0.8x the queries/s of one layout, 1.0x after compact.

    python -m pqgpu.bench.append [--shard-rows 20000] [--d 64] [--nlist 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import environment, markdown_table


def _shard(folder: Path, s: int, rows: int, d: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..sample import sample_vectors

    x = sample_vectors(rows, d, seed=0, start=s * rows)
    ids = np.arange(s * rows, (s + 1) * rows, dtype=np.int64)
    pq.write_table(pa.table({"id": pa.array(ids), "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(x.reshape(-1)), d)}), folder / f"shard-{s:04d}.parquet", row_group_size=16384)


def _config(work: Path, data: Path, out: str, M: int, nlist: int) -> Path:
    cfg = {"source": {"format": "parquet", "path": str(data / "*.parquet"), "id_column": "id"},
           "quantizer": {"path": str(work / "q.faiss"), "M": M, "nbits": 8, "nlist": nlist,
                         "train_size": max(20000, 40 * nlist), "niter": 4},
           "encode": {"output": str(work / out), "chunk_rows": 32768, "backend": "cpu"},
           "cluster": {"dashboard": False}}
    p = work / f"{out}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _cli(*args: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pqgpu.cli", "-q", *args], env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"pqgpu {' '.join(args)} failed: {r.stderr[-2000:]}")
    return time.perf_counter() - t0


def append_cost(root: Path, shards: list[Path], M: int, nlist: int, runs: int) -> dict[str, Any]:
    """Median whole-process seconds of the append of shard 11 and of a full encode of the 11 shards."""
    work = root / f"nlist{nlist}"
    data = work / "data"
    data.mkdir(parents=True)
    for f in shards[:10]:
        os.link(f, data / f.name)
    base = _config(work, data, "base.zarr", M, nlist)
    _cli("run", "-c", str(base))
    grow = _config(work, data, "grow.zarr", M, nlist)
    full = _config(work, data, "full.zarr", M, nlist)
    t_app, t_full, i_app, i_full = [], [], [], []
    for _ in range(runs):  # interleaved: a busy spell of the shared machine hits both alike
        shutil.rmtree(work / "grow.zarr", ignore_errors=True)
        shutil.copytree(work / "base.zarr", work / "grow.zarr")
        os.link(shards[10], data / shards[10].name)
        t_app.append(_cli("encode", "--append", "-c", str(grow)))
        t_full.append(_cli("encode", "--overwrite", "-c", str(full)))
        # the same in this process (imports, and the pool or cluster start, not counted)
        shutil.rmtree(work / "grow.zarr")
        shutil.copytree(work / "base.zarr", work / "grow.zarr")
        i_app.append(_in_process(grow, append=True))
        i_full.append(_in_process(full, overwrite=True))
        (data / shards[10].name).unlink()
    a, f = statistics.median(t_app), statistics.median(t_full)
    ia, i_f = statistics.median(i_app), statistics.median(i_full)
    return {"nlist": nlist, "append_s": round(a, 2), "full_encode_s": round(f, 2), "ratio": round(a / f, 3),
            "in-process append_s": round(ia, 2), "in-process full_s": round(i_f, 2),
            "in-process ratio": round(ia / i_f, 3),
            "append_runs": [round(t, 2) for t in t_app], "full_runs": [round(t, 2) for t in t_full]}


def _in_process(cfg_path: Path, **kw: Any) -> float:
    """encode() in this process, one set of threads or workers (started before the clock) for the call."""
    from ..cluster import task_runner
    from ..config import load_config
    from ..pipeline import encode
    from ..sources import open_source

    cfg = load_config(str(cfg_path))
    source = open_source(cfg.source)
    with task_runner(cfg.cluster, source.n * source.d) as runner:
        t0 = time.perf_counter()
        encode(cfg, client=runner, **kw)
        return time.perf_counter() - t0


def segment_search(root: Path, shards: list[Path], M: int, nlist: int, nprobe: int, nq: int, runs: int
                   ) -> dict[str, Any]:
    """Queries/s over 4 segments vs one layout (one-shot) vs after compact, loaded and per-batch reads."""
    from ..append import compact
    from ..ivf_search import IvfIndex
    from ..sample import sample_vectors
    from ..store import open_store

    work = root / f"seg{nlist}"
    data = work / "data"
    data.mkdir(parents=True)
    for f in shards[:8]:
        os.link(f, data / f.name)
    grow = _config(work, data, "grow.zarr", M, nlist)
    _cli("run", "-c", str(grow))
    for f in shards[8:]:
        os.link(f, data / f.name)
        _cli("encode", "--append", "-c", str(grow))
    _cli("encode", "-c", str(_config(work, data, "once.zarr", M, nlist)))
    d = open_store(work / "once.zarr").attrs["d"]
    q = sample_vectors(nq, d, seed=1234)
    out: dict[str, Any] = {"nlist": nlist, "nprobe": nprobe, "nq": nq}

    def qps(path: Path, load: bool) -> float:
        index = IvfIndex(open_store(path), load=load)
        index.search(q[:16], 10, nprobe=nprobe, backend="cpu")
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            index.search(q, 10, nprobe=nprobe, backend="cpu")
            times.append(time.perf_counter() - t0)
        return nq / statistics.median(times)

    for load in (True, False):
        key = "loaded" if load else "probed lists read"
        one, seg = qps(work / "once.zarr", load), qps(work / "grow.zarr", load)
        out[f"{key}: one layout q/s"] = round(one, 1)
        out[f"{key}: 4 segments q/s"] = round(seg, 1)
        out[f"{key}: 4 segments / one"] = round(seg / one, 3)
    compact(str(work / "grow.zarr"))
    for load in (True, False):
        key = "loaded" if load else "probed lists read"
        one, comp = qps(work / "once.zarr", load), qps(work / "grow.zarr", load)
        out[f"{key}: compacted / one"] = round(comp / one, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shard-rows", type=int, default=20000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--M", type=int, default=16)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--nq", type=int, default=2000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default="bench-append.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pqgpu-bench-append-") as tmp:
        root = Path(tmp)
        src = root / "shards"
        src.mkdir()
        for s in range(11):
            _shard(src, s, args.shard_rows, args.d)
        shards = sorted(src.glob("*.parquet"))
        cost = [append_cost(root, shards, args.M, nlist, args.runs) for nlist in (0, args.nlist)]
        search = segment_search(root, shards, args.M, args.nlist, args.nprobe, args.nq, max(3, args.runs))
    result = {"environment": environment(), "shard_rows": args.shard_rows, "d": args.d, "M": args.M,
              "append_cost": cost, "segment_search": search}
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(markdown_table([{k: v for k, v in c.items() if not k.endswith("runs")} for c in cost]))
    print(json.dumps(search, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
