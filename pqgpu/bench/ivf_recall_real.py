"""IVF-PQ recall on real sentence embeddings (all-MiniLM-L6-v2, d=384): an index trained by pqgpu vs one
trained by faiss, same nlist, M, nbits, niter, base and queries.

    python -m pqgpu.bench.ivf_recall_real [--n 20000] [--nq 1000] [--nlist 128] [--M 48] [--nbits 8]
                                          [--niter 25] [--opq] [--cache /tmp/emb.npy] [--json out.json]

Embeddings, sentences and the base/query split come from pqgpu.bench.recall_real (same cache, same seeds; see
its docstring for the optional model stack). pqgpu trains with `pqgpu.ivf.train_ivf`, saves the faiss file
(written without faiss); faiss loads it, `add`s the base and searches: the tests show that pqgpu's own store
search returns the same ids, so this measures the quality of pqgpu's training. faiss trains
`index_factory(d, "IVF{nlist},PQ{M}x{nbits}")` (polysemous training off, cp.niter = pq.cp.niter = niter).
Recall: 1-recall@10 and 10-recall@10 against the exact top 10 (faiss.knn), per nprobe.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--nq", type=int, default=1_000)
    ap.add_argument("--nlist", type=int, default=128)
    ap.add_argument("--M", type=int, default=48)
    ap.add_argument("--nbits", type=int, default=8)
    ap.add_argument("--niter", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--opq", action="store_true")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--cache", default="/tmp/emb.npy")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import faiss

    from ..evaluation import recall_metrics
    from ..ivf import train_ivf
    from .recall_real import load_embeddings

    x, _meta = load_embeddings(Path(args.cache), args.n, args.split_seed, False)
    perm = np.random.default_rng(args.split_seed + 7).permutation(x.shape[0])
    queries = np.ascontiguousarray(x[perm[:args.nq]])
    base = np.ascontiguousarray(x[perm[args.nq:]])
    d = base.shape[1]
    _gd, gt = faiss.knn(queries, base, 10)

    t0 = time.perf_counter()
    cb = train_ivf(base, args.M, args.nbits, args.nlist, niter=args.niter, seed=args.seed, backend="cpu", opq=args.opq)
    t_ours = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cb.save(Path(tmp) / "ivf.faiss")
        ours = faiss.read_index(str(Path(tmp) / "ivf.faiss"))
    ours.add(base)

    theirs = faiss.index_factory(d, f"{'OPQ%d,' % args.M if args.opq else ''}IVF{args.nlist},PQ{args.M}x{args.nbits}")
    ivf = faiss.downcast_index(faiss.extract_index_ivf(theirs))
    ivf.cp.niter = args.niter
    ivf.cp.seed = args.seed
    ivf.pq.cp.niter = args.niter
    ivf.pq.cp.seed = args.seed
    ivf.do_polysemous_training = False
    t0 = time.perf_counter()
    theirs.train(base)
    t_theirs = time.perf_counter() - t0
    theirs.add(base)

    rows = []
    for nprobe in [p for p in (1, 2, 4, 8, 16, 32, 64) if p <= args.nlist]:
        row = {"nprobe": nprobe}
        for name, index in (("pqgpu", ours), ("faiss", theirs)):
            faiss.extract_index_ivf(index).nprobe = nprobe
            _, found = index.search(queries, 10)
            r = recall_metrics(found.astype(np.int64), gt.astype(np.int64), (10,))
            row[f"{name} 1-R@10"] = round(r["1-recall@10"], 4)
            row[f"{name} 10-R@10"] = round(r["10-recall@10"], 4)
        row["diff 10-R@10"] = round(row["pqgpu 10-R@10"] - row["faiss 10-R@10"], 4)
        rows.append(row)
    head = (f"IVF{args.nlist},PQ{args.M}x{args.nbits}{' with OPQ' if args.opq else ''}: {base.shape[0]} base, "
            f"{args.nq} queries, d={d}, niter {args.niter}; training pqgpu {t_ours:.1f} s, faiss {t_theirs:.1f} s")
    print(head)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": vars(args), "train_seconds": {"pqgpu": t_ours,
                                               "faiss": t_theirs}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
