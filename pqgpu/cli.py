"""The `pqgpu` command line. Errors print one paragraph and exit non-zero; --debug shows tracebacks."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from .errors import PqgpuError

log = logging.getLogger("pqgpu.cli")

EXIT_ERROR = 2  # a PqgpuError: bad input, config, store or backend
EXIT_BUG = 1  # anything unexpected
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `cat` whose reader left early
DASK_COMMANDS = ("demo", "train", "encode", "run", "bench")
REFINE_HELP = ("re-rank the top k*R ADC candidates exactly with the original vectors read back from the store's "
               "source (which must be unchanged since encoding)")


def _config(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, args.set or [], updates=_shorthand(args))


def _shorthand(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Config values from the common-case arguments (source paths, --out, --M, ...). The config file gives
    way to them, and --set to nothing: file < these < --set."""
    updates: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            updates.setdefault(section, {})[key] = value

    paths = getattr(args, "source", None) or []
    if paths:
        from .sources import infer_format

        fmt = args.format or infer_format(paths, key="SOURCE")
        put("source", "path", paths[0] if len(paths) == 1 else list(paths))
        put("source", "format", fmt)
    elif getattr(args, "format", None):
        put("source", "format", args.format)
    put("source", "id_column", getattr(args, "id_column", None))
    put("source", "vector_column", getattr(args, "vector_column", None))
    out = getattr(args, "out", None)
    if out is not None:
        put("quantizer", "path", str(Path(out) / "pq.faiss"))
        put("encode", "output", str(Path(out) / "codes.zarr"))
    put("quantizer", "M", getattr(args, "M", None))
    put("quantizer", "nbits", getattr(args, "nbits", None))
    put("quantizer", "metric", getattr(args, "metric", None))
    return updates


def cmd_make_sample(args: argparse.Namespace) -> int:
    from .sample import make_sample

    paths = make_sample(args.out, args.n, args.d, shards=args.shards, fmt=args.format, seed=args.seed,
                        string_ids=args.string_ids)
    print(f"wrote {args.n} x {args.d} {args.format} sample in {len(paths)} shard(s) to {args.out} "
          f"(queries: {Path(args.out) / 'queries.npy'})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .pipeline import train

    cfg = _config(args)
    cb = train(cfg)
    print(f"quantizer: {cfg.quantizer.path} (d={cb.d}, M={cb.M}, nbits={cb.nbits}, sha256 {cb.fingerprint()[:16]})")
    return 0


def _print_report(report: Any) -> None:
    print(f"store: {report.store}  rows: {report.n:,}  chunks: {report.chunks} ({report.chunks_encoded} encoded now)  "
          f"time: {report.seconds:.1f} s  rate: {report.rows_per_second:,.0f} rows/s")


def cmd_encode(args: argparse.Namespace) -> int:
    from .pipeline import encode

    _print_report(encode(_config(args), overwrite=args.overwrite, strict_ids=args.strict_ids, append=args.append))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run

    _print_report(run(_config(args), overwrite=args.overwrite, strict_ids=args.strict_ids, retrain=args.retrain,
                      append=args.append))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .store import open_store

    info = open_store(args.store).info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for key in ("path", "n", "d", "M", "nbits", "code_size", "opq", "metric", "nlist", "ids_dtype", "chunk_rows"):
        print(f"{key:>18}: {info[key]}")
    if info["complete"]:
        state = " (complete)"
    elif info["codes"] == "complete" and info["codebook"] == "intact":
        state = f" (inverted layout {info['layout']}: run pqgpu encode with the same config to finish or repair it)"
    else:
        state = " (incomplete or damaged: run pqgpu encode with the same config to finish or repair it)"
    print(f"{'progress':>18}: {info['chunks_done']}/{info['chunks']} chunks{state}")
    print(f"{'codes':>18}: {info['codes']}")
    if info["layout"] is not None:
        print(f"{'inverted layout':>18}: {info['layout']}")
    print(f"{'codebook':>18}: {info['codebook']}")
    print(f"{'codebook_sha256':>18}: {info['codebook_sha256']}")
    print(f"{'store size':>18}: {info['store_bytes'] / 2**20:.1f} MiB "
          f"(float32 vectors: {info['raw_float32_bytes'] / 2**20:.1f} MiB, codes {info['compression_ratio']}x smaller)")
    src = info.get("source") or {}
    files = src.get("files") or []
    where = files[0]["path"] if files and isinstance(files[0], dict) else src.get("path")
    print(f"{'source':>18}: {src.get('format')} {where}{' …' if len(files) > 1 else ''} ({len(files)} file(s))")
    print(f"{'created_by':>18}: {info.get('created_by')}")
    for gen in info.get("generations") or []:
        files = gen.get("files") or []
        lo, hi = gen.get("rows", [0, 0])
        names = ", ".join(os.path.basename(f) for f in files[:3]) + (" …" if len(files) > 3 else "")
        print(f"{'generation ' + str(gen.get('generation')):>18}: rows {lo}-{hi - 1} from {len(files)} file(s)"
              f"{f' ({names})' if files else ''}, {gen.get('finished')}, backend {','.join(gen.get('backend') or []) or '?'}, "
              f"{len(gen.get('workers') or {})} worker(s), pqgpu {(gen.get('versions') or {}).get('pqgpu', '?')}")
    for wb in info.get("postgres_writeback") or []:
        t = wb.get("target") or {}
        print(f"{'written back':>18}: generations 0-{wb.get('generation')} (rows 0-{int(wb.get('rows', 0)) - 1}) in "
              f"{t.get('table')}.{t.get('codes_column')} (database {t.get('database')}), {wb.get('finished')}")
    if info.get("segments") and len(info["segments"]) > 1:
        print(f"{'inverted segments':>18}: {len(info['segments'])} (`pqgpu compact {info['path']}` merges them)")
    if info.get("append"):
        print(f"{'append':>18}: {info['append']}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from .append import compact

    merged = compact(args.store)
    print(f"{args.store}: {merged} inverted segments merged into one" if merged else
          f"{args.store}: one inverted layout already; nothing to compact")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .results import output_format, padded, write_results
    from .search import search
    from .sources import read_vectors

    if args.out:
        output_format(args.out)  # a suffix we cannot write is refused before the search
    queries = read_vectors(args.queries, vector_column=args.vector_column)
    distances, ids = search(args.store, queries, args.k, backend=args.backend, nprobe=args.nprobe,
                            refine=args.refine)
    short = padded(distances, ids)
    if short.any():
        log.info("%d of %d queries have fewer than k=%d results (the store, or the lists probed, hold fewer rows); "
                 "only their real results are listed", int(short.any(axis=1).sum()), len(short), args.k)
    if args.out:
        rows = write_results(args.out, distances, ids)
        if args.out != "-":
            print(f"wrote {rows} results ({queries.shape[0]} queries, k={args.k}) to {args.out}")
    else:
        for q in range(min(queries.shape[0], 10)):
            print(f"query {q}: " + ", ".join(f"{i} ({d:.4g})" for i, d, pad in zip(ids[q], distances[q], short[q])
                                             if not pad))
        if queries.shape[0] > 10:
            print(f"... {queries.shape[0] - 10} more queries (use --out to save all)")
    return 0


def _load_npy(path: str, what: str):
    import numpy as np

    from .errors import InputError

    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{what} {path}: cannot read it as .npy ({exc}).") from None
    return a


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .codebook import atomic_write_bytes
    from .evaluation import format_table
    from .pipeline import evaluate_config
    from .sources import read_vectors

    if args.out and args.out.lower().endswith(".json"):
        from .errors import ConfigError

        raise ConfigError(f"--out {args.out}: for evaluate, as for run, --out is the directory holding pq.faiss and "
                          "codes.zarr. Write the results JSON with --results FILE.json.")
    cfg = _config(args)
    ks = tuple(int(k) for k in str(args.k).split(","))
    gt = _load_npy(args.ground_truth, "--ground-truth") if args.ground_truth else None
    nprobes = tuple(int(p) for p in str(args.nprobe).split(",")) if args.nprobe else None
    queries = read_vectors(args.queries, vector_column=cfg.source.vector_column)
    result = evaluate_config(cfg, queries, ground_truth=gt, ks=ks, nprobes=nprobes,
                             refine=args.refine)
    out = Path(args.results) if args.results else Path(cfg.encode.output).with_suffix(".eval.json")
    atomic_write_bytes(out, json.dumps(result, indent=2, default=float).encode())
    print(format_table(result))
    print(f"(written to {out})")
    return 0


def cmd_export_faiss(args: argparse.Namespace) -> int:
    from .export import export_faiss

    export_faiss(args.store, args.out)
    print(f"faiss index written to {args.out}")
    return 0


def cmd_export_postgres(args: argparse.Namespace) -> int:
    from .sources.postgres import export_postgres

    cfg = _config(args)
    r = export_postgres(cfg.postgres, strict=args.strict, since_last=args.since_last)
    if r.up_to_date:
        print(f"no new rows: nothing in the source has an id above {r.after_id!r}, the highest already exported to "
              f"{r.output} ({r.rows:,} rows in {len(r.files)} shard(s)); nothing was written")
        return 0
    names = ", ".join(r.new_shards[:3]) + (" …" if len(r.new_shards) > 3 else "")
    ids = f"ids {r.first_new_id!r}..{r.last_new_id!r}" if r.new_rows else "no vectors"
    after = f"ids above {r.after_id!r}: " if r.after_id is not None else ""
    print(f"export {r.export}: {after}{r.new_rows:,} new rows ({ids}) in {r.new_files} new shard(s)"
          f"{f' ({names})' if names else ''}; {r.rows:,} rows (d={r.d}, {r.vector_type}) in {len(r.files)} Parquet "
          f"shard(s) in {r.output}; NULL vectors skipped: {r.null_vectors}; {r.seconds:.1f} s")
    return 0


def cmd_write_codes_postgres(args: argparse.Namespace) -> int:
    from .sources.postgres import write_codes_postgres

    cfg = _config(args)
    store = args.store or cfg.encode.output
    r = write_codes_postgres(cfg.postgres, store, all_rows=args.all)
    where = f"{r.table}.{r.codes_column}"
    if not r.generations:
        print(f"nothing to write: generation(s) {_span(r.already)} of {store} are already in {where} "
              "(--all writes every row again)")
        return 0
    lo, hi = r.store_rows
    before = f"; generation(s) {_span(r.already)} were written before and left alone" if r.already else ""
    missing = f"; {r.missing:,} store id(s) not in the table" if r.missing else ""
    print(f"wrote {r.rows:,} codes into {where}: generation(s) {_span(r.generations)} (store rows {lo}-{hi - 1}, "
          f"{r.changed:,} changed){before}{missing}")
    return 0


def _span(gens: Any) -> str:
    gens = list(gens)
    if not gens:
        return "none"
    return str(gens[0]) if len(gens) == 1 else f"{gens[0]}-{gens[-1]}"


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.suite import run_bench

    return run_bench(quick=args.quick, out=args.out)


def cmd_doctor(args: argparse.Namespace) -> int:
    import os
    import platform

    from .backend import gpu_status
    from .store import versions

    print(f"python: {platform.python_version()} on {platform.machine()} ({os.cpu_count()} CPUs)")
    for name, version in versions().items():
        print(f"{name}: {version}")
    for mod in ("dask", "distributed", "pyarrow", "numba", "array_api_compat", "cupy", "psycopg", "pgvector"):
        try:
            m = __import__(mod)
        except Exception as exc:
            print(f"{mod}: not available ({type(exc).__name__})")
            continue
        print(f"{mod}: {getattr(m, '__version__', None) or _distribution_version(mod)}")
    from .cluster import dask_cuda_status

    print(f"dask_cuda: {dask_cuda_status()}")
    try:
        import faiss

        print(f"faiss GPUs: {faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0}")
    except ImportError:
        print("faiss: not installed (optional; needed only for tests, benchmarks and export-faiss)")
    ok, reason = gpu_status()
    print(f"backend gpu: {'usable' if ok else 'unavailable'} ({reason})")
    print(f"backend auto -> {'gpu' if ok else 'cpu'}")
    return 0


def _distribution_version(module: str) -> str:
    """The installed version of the distribution that provides `module` (pgvector has no __version__)."""
    import importlib.metadata as md

    for name in (module, module.replace("_", "-"), *md.packages_distributions().get(module, [])):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return "?"


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np
    import yaml

    from .config import load_config
    from .pipeline import run
    from .sample import make_sample
    from .store import open_store

    out = Path(args.out)
    t0 = time.perf_counter()
    data = out / "data"
    make_sample(data, args.n, args.d, shards=4, fmt="parquet", seed=0, n_queries=200)
    cfg_dict = {
        "source": {"format": "parquet", "path": str(data / "*.parquet"), "id_column": "id", "vector_column": "embedding"},
        "quantizer": {"path": str(out / "pq.faiss"), "M": args.d // 8, "nbits": 8, "train_size": 50000, "niter": 20},
        "encode": {"output": str(out / "codes.zarr"), "chunk_rows": 25000, "backend": args.backend},
        "cluster": {"kind": "local", "n_workers": None},
    }
    (out / "demo.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    cfg = load_config(out / "demo.yaml")
    # fresh sample data: a quantizer left by an earlier demo (maybe another --d) does not fit it
    report = run(cfg, overwrite=True, retrain=True)
    info = open_store(cfg.encode.output).info()
    print()
    print(f"codes:        {info['path']}  ({info['n']:,} rows x {info['code_size']} bytes)")
    print(f"quantizer:    {cfg.quantizer.path}  (loads with faiss.read_ProductQuantizer)")
    print(f"config:       {out / 'demo.yaml'}")
    print(f"compression:  {info['compression_ratio']}x  ({info['raw_float32_bytes'] / 2**20:.1f} MiB float32 -> "
          f"{info['n'] * info['code_size'] / 2**20:.1f} MiB codes)")
    from .pipeline import evaluate_config

    result = evaluate_config(cfg, np.load(data / "queries.npy"), ks=(1, 10, 100))
    print(f"recall@10:    {result['1-recall@10']:.3f}  (exact nearest neighbour in the ADC top 10; "
          f"10-recall@10 {result['10-recall@10']:.3f})")
    print(f"MSE:          {result['mse']:.5f}  (relative {result['relative_mse']:.4f})")
    print(f"encode rate:  {report.rows_per_second:,.0f} rows/s; demo total {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pqgpu", description="faiss-compatible Product Quantization of large "
                                "embedding collections on GPU or CPU, with Dask and Zarr.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", help="YAML config (see configs/default.yaml); optional: without it, "
                        "defaults plus --set and the arguments below")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. quantizer.M=32")

    def with_shorthand(sp: argparse.ArgumentParser) -> None:
        g = sp.add_argument_group("common settings without a config file (they override -c; --set overrides them)")
        g.add_argument("source", nargs="*", metavar="SOURCE",
                       help="vector files, directories or globs (source.path), e.g. data/shards/*.parquet")
        g.add_argument("--format", choices=["parquet", "zarr", "npy"],
                       help="source.format (default: from the extension of SOURCE)")
        g.add_argument("--id-column", help="source.id_column (default: row numbers are the ids)")
        g.add_argument("--vector-column", help="source.vector_column (default: embedding)")
        g.add_argument("--out", metavar="DIR", help="DIR/pq.faiss is quantizer.path and DIR/codes.zarr "
                       "encode.output (as run writes them)")
        g.add_argument("--M", type=int, help="quantizer.M, sub-quantizers per vector (d %% M == 0)")
        g.add_argument("--nbits", type=int, help="quantizer.nbits, bits per sub-code (1..16)")
        g.add_argument("--metric", help="quantizer.metric: l2 (default), ip (inner product) or cosine (rows and "
                       "queries L2-normalised, then inner product)")

    sp = sub.add_parser("demo", help="sample data -> train -> encode -> evaluate, on this machine")
    sp.add_argument("--out", default="pqgpu-demo")
    sp.add_argument("--n", type=int, default=100_000)
    sp.add_argument("--d", type=int, default=128)
    sp.add_argument("--backend", default="auto", choices=["auto", "cpu", "gpu"])
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("make-sample", help="write seeded sample embeddings")
    sp.add_argument("--out", required=True)
    sp.add_argument("--n", type=int, required=True)
    sp.add_argument("--d", type=int, required=True)
    sp.add_argument("--shards", type=int, default=4)
    sp.add_argument("--format", default="parquet", choices=["parquet", "zarr", "npy"])
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--string-ids", action="store_true")
    sp.set_defaults(func=cmd_make_sample)

    for name, func, helptext in (("train", cmd_train, "train and write quantizer.path"),
                                 ("encode", cmd_encode, "encode chunks not yet done into encode.output"),
                                 ("run", cmd_run, "train if quantizer.path is missing (or --retrain), then encode")):
        sp = sub.add_parser(name, help=helptext)
        with_config(sp)
        with_shorthand(sp)
        if name != "train":
            sp.add_argument("--overwrite", action="store_true",
                            help="replace an existing store with a fresh one (e.g. made with another codebook)")
            sp.add_argument("--strict-ids", action="store_true", help="duplicate ids are an error, not a warning")
            sp.add_argument("--append", action="store_true",
                            help="encode only the source files that are new since the store was made, into new "
                            "rows at its end, with its codebook (one generation; IVF: one inverted segment)")
        if name == "run":
            sp.add_argument("--retrain", action="store_true",
                            help="train a new quantizer even when quantizer.path exists, replacing it (with "
                            "--overwrite when encode.output exists)")
        sp.set_defaults(func=func)

    sp = sub.add_parser("info", help="describe a code store")
    sp.add_argument("store")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("compact", help="merge an IVF store's appended inverted segments into one layout")
    sp.add_argument("store")
    sp.set_defaults(func=cmd_compact)

    queries_help = ("query vectors: a .npy, .parquet or .zarr file, directory or glob, read as a source is (a "
                    "Parquet list / fixed_size_list column, a Zarr array, a 2-D .npy array)")
    sp = sub.add_parser("search", help="ADC top-k search over a store")
    sp.add_argument("store")
    sp.add_argument("--queries", required=True, help=queries_help)
    sp.add_argument("--vector-column", default="embedding",
                    help="Parquet column / Zarr array of the query vectors (default: embedding)")
    sp.add_argument("-k", type=int, default=10,
                    help="results per query; where the store (or the IVF lists probed) holds fewer rows, a query "
                    "gets fewer results")
    sp.add_argument("--out", help="write all results (query, rank, id, distance): .parquet, .csv, .json (JSON "
                    "lines), or - for CSV on standard output")
    sp.add_argument("--backend", default="auto", choices=["auto", "cpu", "gpu"])
    sp.add_argument("--nprobe", type=int, help="IVF stores: lists probed per query (default 16, at most nlist)")
    sp.add_argument("--refine", type=int, metavar="R", help=REFINE_HELP)
    sp.set_defaults(func=cmd_search)

    sp = sub.add_parser("evaluate", help="recall@k and reconstruction MSE")
    with_config(sp)
    with_shorthand(sp)
    sp.add_argument("--queries", required=True, help=queries_help + "; the column is source.vector_column")
    sp.add_argument("--ground-truth")
    sp.add_argument("-k", default="1,10,100")
    sp.add_argument("--results", metavar="FILE", help="JSON results (default: <encode.output>.eval.json)")
    sp.add_argument("--nprobe", help="IVF stores: comma-separated nprobe values to evaluate (default 1,4,16,...)")
    sp.add_argument("--refine", type=int, metavar="R", help=REFINE_HELP)
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("export-faiss", help="write a faiss IndexPQ holding the codes")
    sp.add_argument("store")
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_export_faiss)

    sp = sub.add_parser("export-postgres", help="Postgres table -> Parquet shards")
    with_config(sp)
    sp.add_argument("--strict", action="store_true", help="NULL vectors are an error instead of skipped")
    sp.add_argument("--since-last", action="store_true",
                    help="export only the rows whose (integer) id is above the highest id of the previous export "
                    "into postgres.output, into new shards beside its old ones (then `pqgpu run --append`); "
                    "rows changed or deleted since are not seen")
    sp.set_defaults(func=cmd_export_postgres)

    sp = sub.add_parser("write-codes-postgres", help="store codes -> postgres.codes_column (bytea), by id")
    with_config(sp)
    sp.add_argument("--store", help="code store (default: encode.output)")
    sp.add_argument("--all", action="store_true",
                    help="write the codes of every store row, not only those of the generations (runs and "
                    "appends) not yet written into this table")
    sp.set_defaults(func=cmd_write_codes_postgres)

    sp = sub.add_parser("bench", help="benchmark grid vs faiss; writes a report")
    sp.add_argument("--quick", action="store_true")
    sp.add_argument("--out", default="bench-report")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("doctor", help="versions, GPUs, backends")
    sp.set_defaults(func=cmd_doctor)
    _add_verify_parser(sub)
    for sp in sub.choices.values():  # also after the command: `pqgpu run ... --debug`
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="as before the command")
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="as before the command")
    return p


# -- pqgpu verify STORE (self-contained) --------------------------------------------------------------------

def _add_verify_parser(sub: Any) -> None:
    sp = sub.add_parser("verify", help="check that every done chunk of a store is present and intact")
    sp.add_argument("store")
    sp.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    """Reads every done chunk of codes, ids and lists, the codebook and an IVF store's inverted layout, and
    compares each with what was recorded when it was written; writes nothing. Exit 0 when all are intact,
    EXIT_ERROR naming every damaged array and chunk otherwise (or an inverted layout left unbuilt)."""
    from .store import _describe, open_store

    store = open_store(args.store)
    report = store.verify()
    problems = []
    if report.bad:
        problems.append(_describe(store, report.bad, limit=len(report.bad)))
    if report.codebook:
        problems.append("codebook: its sha256 differs from the codebook_sha256 recorded when the store was made")
    if report.layout:
        problems.append(f"{len(report.layout)} damaged part(s) of the inverted layout: " + "; ".join(
            f"{name} chunk {c} (inverted rows {lo}-{hi - 1}): {why}" if c >= 0 and hi > lo else
            f"{name}{': ' + why if why else ''}" for name, c, why, (lo, hi) in report.layout))
    unbuilt = report.layout_state not in (None, "built") and not report.layout and not report.not_done
    if unbuilt:
        problems.append(f"the inverted layout is {report.layout_state}, so the store cannot be searched by list")
    if problems:
        print(f"error: {store.path}: " + ". ".join(problems) + ". Run `pqgpu encode` with the same config: it "
              "re-encodes damaged chunks, restores the codebook from the quantizer file and rebuilds the inverted "
              "layout.", file=sys.stderr)
        return EXIT_ERROR
    how = "" if report.checksums else " (present; no checksums recorded (made by an older pqgpu))"
    todo = f"; {report.not_done} chunk(s) not encoded yet" if report.not_done else ""
    layout = f"; inverted layout {report.layout_state}" if report.layout_state else ""
    print(f"{report.checked} chunks OK{how}; codebook OK{layout}{todo}")
    return 0


def _terminal_columns() -> int:
    """Width of the terminal on stderr; 0 when stderr is not a terminal, or is one of no width (a pty
    without a size, where tqdm would draw empty bars: periodic log lines are shown instead)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else 0
    except (OSError, ValueError):
        return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import progress
    from .logs import configure

    configure(debug=args.debug, quiet=args.quiet)  # before Dask is imported (other commands never import it)
    progress.use_terminal_bars(not args.quiet and _terminal_columns() > 0)
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a reader that left early (BrokenPipeError) is handled below
        return rc
    except PqgpuError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # the reader of our output left (`pqgpu search ... | head -1`): nothing to say, and nothing more to flush
        # at exit into the closed pipe
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("interrupted: chunks already marked done are kept; run the same command again to resume.",
              file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"unexpected error: {type(exc).__name__}: {exc}\nRun again with --debug for the traceback.",
              file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
