"""The steps of the GPU check (run one per process by pqgpu.bench.gpu_check, which gives each a timeout).

    python -m pqgpu.bench.gpu STEP --result FILE [--workdir DIR] [--params JSON] [--quick]

Each step writes its result (JSON: status, summary, tables, notes) to FILE after every measurement, so a
step killed by its timeout still leaves what it had measured. Parts that need CUDA say "skipped: ..." when
there is no usable GPU; no figure is ever made up. Device work is timed with backend.sync() inside the
timed region. Only pqgpu.backend touches CuPy; PyTorch is imported here as the baseline people would write.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..sample import sample_vectors
from . import PeakRSS, timeit

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


class Recorder:
    """The step's result, rewritten atomically to `path` after every change."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.data: dict[str, Any] = {"status": "running", "summary": {}, "tables": {}, "notes": []}
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def set(self, **items: Any) -> None:
        self.data["summary"].update(items)
        self.save()

    def row(self, table: str, row: dict[str, Any]) -> None:
        self.data["tables"].setdefault(table, []).append(row)
        self.save()
        print(f"[{table}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()
        print("note:", text, flush=True)

    def status(self, text: str) -> None:
        self.data["status"] = text
        self.save()

    @contextlib.contextmanager
    def gpu_part(self, what: str) -> Iterator[None]:
        """A GPU measurement whose failure is recorded (and fails the step at the end) while the step's
        other measurements still run."""
        try:
            yield
        except Exception as exc:
            traceback.print_exc()
            self.data.setdefault("gpu_failures", []).append(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
            self.save()

    def finish(self, ok_status: str = "ok") -> None:
        failures = self.data.get("gpu_failures")
        self.status(f"failed: {'; '.join(failures)}"[:1000] if failures else ok_status)


def _fmt(v: Any) -> str:
    return f"{v:,.4g}" if isinstance(v, float) else str(v)


def gpu_state() -> tuple[bool, str]:
    from ..backend import gpu_status

    return gpu_status()


def no_gpu(reason: str) -> str:
    return f"skipped: no GPU ({reason})"


SKIPPED = "skipped: no GPU"  # in table cells; the step's notes say why


def timed(fn: Callable[[], Any], runs: int, gpu: bool) -> Any:
    """timeit with the CUDA device synchronised inside the timed region when `gpu`."""
    from ..backend import sync

    return timeit(fn, runs=runs, warmup=1, sync=(lambda: sync("gpu")) if gpu else None)


def _sample_part(args: tuple[str, int, int, int, int, int]) -> None:
    path, lo, hi, d, seed, start = args
    out = np.load(path, mmap_mode="r+")
    out[lo:hi] = sample_vectors(hi - lo, d, seed=seed, start=start + lo)
    out.flush()


def sample_parallel(n: int, d: int, *, seed: int, workdir: str | os.PathLike, start: int = 0,
                    min_rows: int = 200_000) -> np.ndarray:
    """Seeded sample vectors (n, d) made by all cores (part i is sample_vectors(..., start=start + lo_i)):
    one process made ~15k rows x 768 a second on a shared core here, too slow for the 1M-row steps."""
    cores = os.cpu_count() or 1
    if n < min_rows or cores == 1:
        return sample_vectors(n, d, seed=seed, start=start)
    import multiprocessing

    Path(workdir).mkdir(parents=True, exist_ok=True)
    path = str(Path(workdir) / f"sample-{seed}-{start}-{n}x{d}.npy")
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d)).flush()
    bounds = np.linspace(0, n, min(16, cores) * 2 + 1).astype(np.int64)
    parts = [(path, int(a), int(b), d, seed, start) for a, b in zip(bounds[:-1], bounds[1:])]
    with multiprocessing.get_context("spawn").Pool(min(16, cores)) as pool:
        pool.map(_sample_part, parts)
    x = np.array(np.load(path, mmap_mode="r"))
    os.unlink(path)
    return x


# ------------------------------------------------------------------------------------------- (a) versions

# import name -> distribution name, in the order they are reported
EXPECTED = {
    "numpy": "numpy", "numba": "numba", "numba.cuda": "numba-cuda", "cuda.core": "cuda-core",
    "cupy": "cupy-cuda13x", "torch": "torch", "triton": "triton", "pyarrow": "pyarrow", "psutil": "psutil",
    "yaml": "PyYAML", "fsspec": "fsspec", "pytest": "pytest", "msgpack": "msgpack",
    "sortedcontainers": "sortedcontainers", "click": "click", "jinja2": "jinja2", "packaging": "packaging",
    "typing_extensions": "typing_extensions", "pynvml": "nvidia-ml-py",
    # carried by the kit (benchmarks/gpu_kit.txt)
    "dask": "dask", "distributed": "distributed", "dask_cuda": "dask-cuda", "zarr": "zarr",
    "numcodecs": "numcodecs", "array_api_compat": "array-api-compat", "donfig": "donfig", "crc32c": "crc32c",
    "google_crc32c": "google-crc32c", "toolz": "toolz", "partd": "partd", "locket": "locket", "tblib": "tblib",
    "zict": "zict", "tornado": "tornado", "cloudpickle": "cloudpickle", "msgspec": "msgspec", "faiss": "faiss-cpu",
    # this project
    "pqgpu": None, "pqgpu._cpu": None,
}


def _dist_info(dist: str | None) -> tuple[str, str]:
    import importlib.metadata as md

    if dist is None:
        return "", ""
    names = [dist] + (["cupy-cuda12x", "cupy"] if dist.startswith("cupy") else [])
    for name in names:
        try:
            d = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        where = str(d.locate_file("")).rstrip("/")
        return (d.version if name == dist else f"{name} {d.version}"), where
    return "not installed", ""


def _try_import(module: str, timeout: float) -> str:
    code = (f"import {module} as m, sys; v = getattr(m, '__version__', ''); "
            "sys.stdout.write(str(v))")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"no: import took more than {timeout:.0f} s"
    if p.returncode == 0:
        return "yes" + (f" ({p.stdout.strip()})" if p.stdout.strip() else "")
    last = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
    return f"no: {last[:200]}"


def step_versions(rec: Recorder, p: dict[str, Any], quick: bool) -> None:
    import platform
    from concurrent.futures import ThreadPoolExecutor, as_completed

    import pqgpu

    rec.set(python=sys.version.split()[0], executable=sys.executable, platform=platform.platform(),
            cpus=os.cpu_count(), pqgpu=str(Path(pqgpu.__file__).parent),
            pythonpath=os.environ.get("PYTHONPATH", ""))
    try:
        import psutil

        rec.set(host_memory_gib=round(psutil.virtual_memory().total / 2**30, 1))
    except ImportError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm",
                            "--format=csv"], capture_output=True, text=True, timeout=20)
        rec.set(nvidia_smi=(q.stdout or q.stderr).strip())
        full = subprocess.run([smi], capture_output=True, text=True, timeout=20)
        rec.data["nvidia_smi_full"] = (full.stdout or full.stderr)[-4000:]
    else:
        rec.set(nvidia_smi="nvidia-smi not found on PATH")
    ok, reason = gpu_state()
    rec.set(gpu=reason, gpu_usable=ok)
    # versions first (metadata only, fast), then each import in its own process, the table rewritten as
    # they finish: a crashing import cannot take the others with it, and a timeout keeps what was learned
    table = rec.data["tables"].setdefault("packages", [])
    for module, dist in EXPECTED.items():
        version, where = _dist_info(dist)
        table.append({"module": module, "imports": "not checked", "version": version, "location": where})
    rec.save()
    timeout = float(p.get("import_timeout", 45 if quick else 15))
    with ThreadPoolExecutor(min(16, 2 * (os.cpu_count() or 1))) as pool:
        futures = {pool.submit(_try_import, m, timeout): i for i, m in enumerate(EXPECTED)}
        for fut in as_completed(futures):
            table[futures[fut]]["imports"] = fut.result()
            rec.save()
    failed = [r["module"] for r in table if not r["imports"].startswith("yes")]
    rec.set(imports_failed=", ".join(failed) or "none")
    print("imports failed:", ", ".join(failed) or "none", flush=True)
    rec.status("ok")


# ------------------------------------------------------------------------------------------ (b) gpu tests

def step_gpu_tests(rec: Recorder, p: dict[str, Any], quick: bool) -> None:
    ok, reason = gpu_state()
    if not ok:
        rec.status(no_gpu(reason))
        return
    timeout = float(p.get("_timeout", 60)) - 5
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rfEs", "tests"]
    rec.set(command=" ".join(cmd[1:]))
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""), None
    lines = out.strip().splitlines()
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or " skipped" in ln
                    or "no tests ran" in ln or " error" in ln), lines[-1] if lines else "")
    rec.set(exit_code=rc, result=summary.strip("= "))
    rec.data["failures"] = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:50]
    rec.data["output_tail"] = "\n".join(lines[-60:])
    print("\n".join(lines[-60:]))
    if rc is None:
        rec.status(f"timeout: pytest ran more than {timeout:.0f} s")
    else:
        rec.status("ok" if rc == 0 else f"failed: pytest exit {rc}: {summary.strip('= ')}")


# ------------------------------------------------------------------------------------------- (c) parity

def tie_report(a: np.ndarray, b: np.ndarray, xr: np.ndarray, centroids: np.ndarray, limit: int = 12
               ) -> tuple[int, int, list[dict[str, Any]]]:
    """Compare unpacked sub-codes a, b (n, M) of the (rotated) vectors xr: (differing rows, differing
    sub-codes that are not float32 ties, up to `limit` examples)."""
    M, _, dsub = centroids.shape
    rows = np.flatnonzero((a != b).any(axis=1))
    non_ties = 0
    examples = []
    for i, m in zip(*np.nonzero(a[rows] != b[rows])):
        r = int(rows[i])
        xm = xr[r, m * dsub:(m + 1) * dsub].astype(np.float64)
        ca, cb = centroids[m, a[r, m]].astype(np.float64), centroids[m, b[r, m]].astype(np.float64)
        da, db = ((xm - ca) ** 2).sum(), ((xm - cb) ** 2).sum()
        tie = abs(da - db) <= 1e-5 * ((xm ** 2).sum() + (ca ** 2).sum() + 1e-30)
        non_ties += not tie
        if len(examples) < limit:
            examples.append({"row": r, "m": int(m), "codes": [int(a[r, m]), int(b[r, m])],
                             "distances": [float(da), float(db)], "float32_tie": bool(tie)})
    return len(rows), non_ties, examples


def routes() -> tuple[list[str], Callable[..., Any]]:
    """The GPU encode routes pqgpu has, and the function that runs one on device arrays:
    backend.gpu_encode_routes() / backend.device_encode() when the backend has them, else the array-API
    kernels (the reference route) called directly."""
    from .. import backend

    if hasattr(backend, "gpu_encode_routes") and hasattr(backend, "device_encode"):
        return list(backend.gpu_encode_routes()), backend.device_encode
    return ["arrayapi"], arrayapi_route


def arrayapi_route(x_dev: Any, centroids_dev: Any, nbits: int, route: str = "arrayapi") -> Any:
    """Device packed codes from the array-API kernels, for backends without device_encode."""
    from .. import kernels

    prepared = kernels.prepare_centroids(centroids_dev)
    return kernels.pack_codes(kernels.assign(x_dev, centroids_dev, prepared=prepared, block_bytes=1 << 30), nbits)


def step_parity(rec: Recorder, p: dict[str, Any], quick: bool) -> None:
    from ..backend import namespace, to_device, to_host
    from ..codebook import Codebook
    from ..kernels import unpack_codes
    from ..opq import train_opq
    from .encode import make_problem

    try:
        import faiss
    except ImportError as exc:
        rec.status(f"failed: faiss-cpu does not import ({exc}); it is in the kit")
        return
    ok, reason = gpu_state()
    names, device_encode = routes() if ok else ([], None)
    if not ok:
        rec.note("GPU columns: " + no_gpu(reason) + "; CPU == faiss is still checked")
    n = int(p.get("parity_n", 1000 if quick else 20000))
    mismatches = 0
    for nbits, opq in [(4, False), (8, False), (10, False), (12, False), (16, False), (8, True)]:
        d, M = (32, 4) if nbits == 16 else (64, 8)
        rows = max(64, n // 5) if nbits == 16 else n
        if opq:
            x = sample_vectors(rows, d, seed=nbits + 100)
            # any learned rotation will do here: a few OPQ rounds, not faiss's 50
            cb = train_opq(x[: max(2048, rows // 2)], M, nbits, niter=4, opq_iter=4, backend="cpu")
        else:
            x, c = make_problem(rows, d, d // M, nbits, seed=nbits)
            cb = Codebook(d, M, nbits, c)
        xr = cb.rotate(x)
        ref = cb.to_faiss().compute_codes(np.ascontiguousarray(xr))  # faiss OPQ applies x @ A^T the same way
        results = {"cpu": cb.encode(x, backend="cpu")}
        if ok:
            with rec.gpu_part(f"nbits {nbits}{' OPQ' if opq else ''} Codebook.encode(backend='gpu')"):
                results["gpu"] = cb.encode(x, backend="gpu")
            xp = namespace("gpu")
            xd, cd = to_device(np.ascontiguousarray(xr), xp), to_device(cb.centroids, xp)
            for name in names:
                with rec.gpu_part(f"nbits {nbits}{' OPQ' if opq else ''} route {name}"):
                    results[f"route_{name}"] = np.asarray(to_host(device_encode(xd, cd, nbits, route=name)))
        row: dict[str, Any] = {"nbits": nbits, "opq": opq, "n": rows, "d": d, "M": M}
        ref_sub = np.asarray(unpack_codes(ref, M, nbits))
        for key, codes in results.items():
            same = int((codes == ref).all(axis=1).sum())
            diff_rows, non_ties, examples = tie_report(np.asarray(unpack_codes(codes, M, nbits)), ref_sub, xr,
                                                       cb.centroids)
            row[f"{key}_rows_equal_faiss"] = f"{same}/{rows}"
            row[f"{key}_non_tie_subcodes"] = non_ties
            mismatches += non_ties
            if examples:
                rec.data.setdefault("differing", []).append({"nbits": nbits, "opq": opq, "route": key,
                                                             "rows": diff_rows, "examples": examples})
        if "gpu" in results:
            row["gpu_rows_equal_cpu"] = f"{int((results['gpu'] == results['cpu']).all(axis=1).sum())}/{rows}"
        elif not ok:
            row["gpu"] = SKIPPED
        rec.row("parity", row)
    rec.set(non_tie_differences=mismatches)
    rec.finish("ok" if mismatches == 0 else f"mismatch: {mismatches} differing sub-codes are not float32 ties")


# ------------------------------------------------------------------------------------- (d) encode grid

def torch_encoder(nbits: int, block_bytes: int = 1 << 30) -> Callable[[Any, Any], Any]:
    """What people would write with PyTorch: per block of rows, one batched matmul over all subspaces
    (||c||^2 - 2 x.c, what torch.cdist computes for large inputs) and argmin, then faiss's byte layout."""
    import torch

    def encode(xt: Any, ct: Any) -> Any:
        M, ksub, dsub = ct.shape
        n = xt.shape[0]
        cnorm = (ct * ct).sum(-1)[:, None, :]
        ctt = ct.transpose(1, 2)
        step = max(1, block_bytes // (4 * M * ksub))
        codes = torch.empty((n, M), dtype=torch.int64, device=xt.device)
        for s in range(0, n, step):
            xb = xt[s:s + step].reshape(-1, M, dsub).transpose(0, 1)
            codes[s:s + step] = torch.baddbmm(cnorm, xb, ctt, alpha=-2.0).argmin(dim=2).T
        if nbits == 8:
            return codes.to(torch.uint8)
        if nbits == 4:
            return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
        raise ValueError("the PyTorch baseline packs nbits 8 and 4 only")

    return encode


def step_encode_grid(rec: Recorder, p: dict[str, Any], quick: bool) -> None:
    ok, reason = gpu_state()
    if not ok:
        rec.status(no_gpu(reason))
        return
    from ..backend import free_device_memory, namespace, sync, to_device, to_host
    from .encode import make_problem

    names, device_encode = routes()
    rec.set(routes=", ".join(names))
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        rec.set(torch=torch.__version__, torch_tf32="off")
    except Exception as exc:  # ImportError, or CUDA libraries that fail to load
        torch = None
        rec.note(f"PyTorch baseline skipped: torch does not import ({type(exc).__name__}: {exc})")
    n = int(p.get("encode_n", 4096 if quick else 1 << 19))
    runs = int(p.get("encode_runs", 3))
    dims = [int(v) for v in str(p.get("encode_d", "128,768,1024")).split(",")]
    dsubs = [int(v) for v in str(p.get("encode_dsub", "4,8,16")).split(",")]
    rec.note(f"{n:,} rows per point (65,536 distinct seeded rows tiled: the kernels' cost does not depend on the "
             f"values); median of {runs} synchronised runs after one warm-up; vectors/s")
    base = sample_vectors(min(n, 65536), max(dims), seed=5)
    x_host = np.ascontiguousarray(np.tile(base, (-(-n // base.shape[0]), 1))[:n])
    xp = namespace("gpu")
    on_device = {d: (to_device(np.ascontiguousarray(x_host[:, :d]), xp),
                     torch.from_numpy(np.ascontiguousarray(x_host[:, :d])).cuda() if torch else None) for d in dims}
    del x_host
    for nbits in (8, 4):
        for d in dims:
            xd, xt = on_device[d]
            for dsub in dsubs:
                if d % dsub:
                    continue
                _, c = make_problem(16, d, dsub, nbits, seed=d + dsub)
                cd = to_device(c, xp)
                row: dict[str, Any] = {"nbits": nbits, "d": d, "dsub": dsub, "M": d // dsub}
                ref = None
                for name in names:
                    try:
                        t = timed(lambda: device_encode(xd, cd, nbits, route=name), runs, gpu=True)
                        row[name] = t.rate(n)
                        codes = to_host(device_encode(xd[:65536], cd, nbits, route=name))
                        if ref is None:
                            ref = np.asarray(codes)
                        else:
                            row[f"{name}_rows_equal_{names[0]}"] = float((np.asarray(codes) == ref).all(axis=1).mean())
                    except Exception as exc:  # one route failing must not hide the others' figures
                        row[name] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
                if torch is not None:
                    try:
                        enc = torch_encoder(nbits)
                        ct = torch.from_numpy(c).cuda()
                        t = timeit(lambda: enc(xt, ct), runs=runs, warmup=1, sync=torch.cuda.synchronize)
                        row["torch_bmm"] = t.rate(n)
                        if ref is not None:
                            row["torch_rows_equal"] = float((enc(xt[:65536], ct).cpu().numpy() == ref).all(axis=1).mean())
                        for name in names:
                            if isinstance(row.get(name), float):
                                row[f"{name}_vs_torch"] = row[name] / row["torch_bmm"]
                        del ct
                    except Exception as exc:
                        row["torch_bmm"] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
                rec.row("encode", row)
                sync("gpu")
    rec.set(free_device_memory_gib=round(free_device_memory() / 2**30, 1))
    failed = [f"{r['nbits']}/{r['d']}/{r['dsub']} {k}" for r in rec.data["tables"].get("encode", [])
              for k, v in r.items() if isinstance(v, str) and v.startswith("failed")]
    rec.status(f"failed: {', '.join(failed)}"[:1000] if failed else "ok")


# ------------------------------------------------------------------------------------------ (e) training

def reconstruction_mse(cb: Any, x: np.ndarray) -> float:
    return float(((cb.decode(cb.encode(x, backend="cpu")) - x) ** 2).sum(axis=1).mean())


def step_train(rec: Recorder, p: dict[str, Any], quick: bool) -> None:
    import pqgpu


    ok, reason = gpu_state()
    n = int(p.get("train_n", 4000 if quick else 1_000_000))
    d, M = (int(p.get("train_d", 32 if quick else 768)), int(p.get("train_M", 4 if quick else 96)))
    niter = int(p.get("train_niter", 3 if quick else 25))
    try:
        import numba

        rec.set(cpu_threads=numba.get_num_threads())
    except ImportError:
        pass
    t0 = time.perf_counter()
    x = sample_parallel(n, d, seed=11, workdir=p.get("_workdir") or tempfile.mkdtemp(prefix="pqgpu-train-"))
    held = sample_vectors(min(20000, n), d, seed=11, start=10**9)
    rec.set(n=n, d=d, M=M, nbits=8, niter=niter, data_s=round(time.perf_counter() - t0, 2))
    rec.note(f"k-means samples at most 256 rows per centroid (65,536 for nbits 8), as faiss, on both routes: "
             f"the CPU trains on the same {n:,} x {d} input, nothing scaled. One timed run each; MSE on "
             f"{held.shape[0]:,} held-out rows.")
    if ok:
        with rec.gpu_part("GPU warm-up"):
            pqgpu.train(x[:4096, :64], 8, 8, niter=1, backend="gpu")  # CUDA context, cuBLAS and kernels
    else:
        rec.note("GPU rows: " + no_gpu(reason))
    for backend in ("gpu", "cpu"):
        if backend == "gpu" and not ok:
            rec.row("train", {"what": "PQ", "backend": "gpu", "result": SKIPPED})
            continue
        with rec.gpu_part(f"PQ training on {backend}") if backend == "gpu" else contextlib.nullcontext():
            t0 = time.perf_counter()
            cb = pqgpu.train(x, M, 8, niter=niter, backend=backend)
            secs = time.perf_counter() - t0
            rec.row("train", {"what": "PQ", "backend": backend, "seconds": secs, "mse": reconstruction_mse(cb, held)})
    from ..opq import train_opq

    on = int(p.get("opq_n", 3000 if quick else 20000))
    od, oM = (32, 4) if quick else (128, 16)
    opq_iter = int(p.get("opq_iter", 3 if quick else 20))  # faiss's default is 50; 20 keeps the step in time
    rec.set(opq_iter=opq_iter)
    xo, ho = sample_vectors(on, od, seed=12), sample_vectors(5000, od, seed=12, start=10**9)
    for backend in ("gpu", "cpu"):
        if backend == "gpu" and not ok:
            rec.row("train", {"what": f"OPQ {on}x{od} M={oM}", "backend": "gpu", "result": SKIPPED})
            continue
        with rec.gpu_part(f"OPQ training on {backend}") if backend == "gpu" else contextlib.nullcontext():
            t0 = time.perf_counter()
            cb = train_opq(xo, oM, 8, niter=10, opq_iter=opq_iter, backend=backend)
            rec.row("train", {"what": f"OPQ {on}x{od} M={oM}", "backend": backend,
                              "seconds": time.perf_counter() - t0, "mse": reconstruction_mse(cb, ho)})
    rows = {(r["what"], r["backend"]): r for r in rec.data["tables"]["train"]}
    for what in ("PQ", f"OPQ {on}x{od} M={oM}"):
        g, c = rows.get((what, "gpu"), {}), rows.get((what, "cpu"), {})
        if "mse" in g and "mse" in c:
            rec.set(**{f"{what.split()[0]}_gpu_speedup": c["seconds"] / g["seconds"],
                       f"{what.split()[0]}_mse_gpu_vs_cpu": g["mse"] / c["mse"] - 1})
    rec.finish()


# --------------------------------------------------------------------------------------------- (f) search

def step_search(rec: Recorder, p: dict[str, Any], quick: bool) -> None:
    from ..codebook import Codebook
    from ..search import search_codes
    from .encode import make_problem

    ok, reason = gpu_state()
    n = int(p.get("search_n", 20000 if quick else 1_000_000))
    nq, k = int(p.get("search_nq", 100)), int(p.get("search_k", 10))
    d, M = (64, 8) if quick else (768, 96)
    _, c = make_problem(16, d, d // M, 8, seed=3)
    cb = Codebook(d, M, 8, c)
    codes = np.random.default_rng(3).integers(0, 256, (n, M), dtype=np.uint8)
    q = sample_vectors(nq, d, seed=3, start=10**12)
    step = 262144
    chunks = [(s, codes[s:s + step]) for s in range(0, n, step)]
    rec.set(n=n, d=d, M=M, nbits=8, queries=nq, k=k)
    rec.note("exhaustive ADC over seeded random codes held in host memory, in 262,144-row chunks (the "
             "store-reading path minus Zarr I/O); the GPU time includes copying the codes to the device")
    if not ok:
        rec.note("GPU row: " + no_gpu(reason))
    found = {}
    for backend in ("cpu", "gpu"):
        if backend == "gpu" and not ok:
            rec.row("search", {"backend": "gpu", "result": SKIPPED})
            continue
        with rec.gpu_part("search on gpu") if backend == "gpu" else contextlib.nullcontext():
            t = timed(lambda: found.__setitem__(backend, search_codes(q, cb, chunks, k, backend=backend)),
                      int(p.get("search_runs", 2)), gpu=backend == "gpu")
            rec.row("search", {"backend": backend, "seconds": t.median, "codes_per_s": n / t.median,
                               "queries_per_s": nq / t.median})
    if "gpu" in found:
        (dc, rc), (dg, rg) = found["cpu"], found["gpu"]
        rec.set(rows_equal_gpu_cpu=float((rc == rg).mean()),
                max_abs_distance_diff=float(np.abs(dc - dg).max()),
                gpu_speedup=rec.data["tables"]["search"][0]["seconds"] / rec.data["tables"]["search"][1]["seconds"])
    rec.finish()


# ------------------------------------------------------------------------------------------- (g) pipeline

def _write_shard(args: tuple[str, int, int, int, int]) -> int:
    from ..sample import _write_shard as write, sample_vectors

    out, s, lo, hi, d = args
    x = sample_vectors(hi - lo, d, seed=0, start=lo)
    path = write(Path(out), s, "parquet", x, np.arange(lo, hi, dtype=np.int64) * 7 + 1000)
    return path.stat().st_size


def _read_rows(source: Any, chunk: Any) -> int:
    x, _ = source.read_chunk(chunk)
    return int(x.shape[0])


def _warm_worker(backend: str, source: Any, chunk: Any) -> str:
    """Before anything is timed, on a worker: import the encode path, read one chunk (compiles the page
    reader) and encode a few rows (compiles the kernels; creates the CUDA context on a GPU worker)."""
    from .. import pipeline  # noqa: F401
    from ..backend import sync
    from ..codebook import Codebook

    x, _ = source.read_chunk(chunk)
    x = np.ascontiguousarray(x[:256, :8], dtype=np.float32)
    Codebook(8, 2, 8, np.random.default_rng(0).standard_normal((2, 256, 4), dtype=np.float32)).encode(x, backend)
    sync(backend)
    return backend


class PeakDeviceMemory:
    """Samples used device memory (all processes, via NVML) in a thread: the peak above the start."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self.error = interval, 0, ""
        self._stop = threading.Event()

    def _used(self) -> int:
        return int(self._pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._used() - self.base)

    def __enter__(self) -> "PeakDeviceMemory":
        try:
            import pynvml

            pynvml.nvmlInit()
            self._pynvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
            self.base = self._used()
        except Exception as exc:  # no NVML: say so instead of a number
            self.error = f"not measured: NVML unavailable ({type(exc).__name__}: {exc})"
            return self
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if not self.error:
            self._thread.join()

    def result(self) -> Any:
        return self.error or round(self.peak / 2**20)


def step_pipeline(rec: Recorder, p: dict[str, Any], quick: bool, workdir: str) -> None:
    import multiprocessing

    from ..cluster import dask_client
    from ..config import config_from_dict
    from ..pipeline import encode, train
    from ..sources import open_source, plan_chunks
    from ..store import open_store

    ok, reason = gpu_state()
    n = int(p.get("pipeline_n", 20000 if quick else 3_000_000))
    d, M = (64, 8) if quick else (int(p.get("pipeline_d", 768)), int(p.get("pipeline_M", 96)))
    cores = os.cpu_count() or 1
    workers = int(p.get("cpu_workers", min(2, cores) if quick else cores))
    shards = int(p.get("pipeline_shards", 4 if quick else 32))
    chunk_rows = int(p.get("chunk_rows", 4096 if quick else 131072))
    root = Path(workdir)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    rec.set(n=n, d=d, M=M, nbits=8, shards=shards, chunk_rows=chunk_rows, cpu_workers=workers)
    rec.note("one timed run each; cluster start and worker warm-up (imports, CUDA context) are reported apart "
             "and not in the rates; all files are in the page cache after writing, so 'read only' is decode "
             "speed, not disk speed")
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(min(cores, shards)) as pool:
        sizes = pool.map(_write_shard, [(str(data), s, int(bounds[s]), int(bounds[s + 1]), d) for s in range(shards)])
    rec.set(parquet_write_s=round(time.perf_counter() - t0, 2), parquet_gib=round(sum(sizes) / 2**30, 2),
            parquet_writers=min(cores, shards))

    source = open_source(config_from_dict({"source": {"format": "parquet", "path": str(data / "*.parquet"),
                                                      "id_column": "id"}}).source)
    chunks = plan_chunks([s.n_rows for s in source.shards], chunk_rows)

    def cfg_for(name: str, backend: str, cluster: dict[str, Any]) -> Any:
        return config_from_dict({
            "source": {"format": "parquet", "path": str(data / "*.parquet"), "id_column": "id"},
            "quantizer": {"path": str(root / "pq.faiss"), "M": M, "nbits": 8,
                          "train_size": 2000 if quick else 65536, "niter": 2 if quick else 10},
            "encode": {"output": str(root / f"{name}.zarr"), "chunk_rows": chunk_rows, "backend": backend},
            "cluster": cluster})

    trained = None
    if ok:
        with rec.gpu_part("pipeline training on gpu (the encode rows use a CPU-trained quantizer instead)"):
            t0 = time.perf_counter()
            train(cfg_for("train", "gpu", {"kind": "local"}))
            trained = "gpu"
    if trained is None:
        t0 = time.perf_counter()
        train(cfg_for("train", "cpu", {"kind": "local"}))
        trained = "cpu"
    rec.set(train_s=round(time.perf_counter() - t0, 2), train_backend=trained)

    def run_encode(name: str, cfg: Any, client: Any) -> None:
        with PeakRSS() as rss, PeakDeviceMemory() as dev:
            t0 = time.perf_counter()
            encode(cfg, overwrite=True, client=client)
            secs = time.perf_counter() - t0
        rec.row("pipeline", {"what": name, "seconds": secs, "rows_per_s": n / secs,
                             "peak_host_rss_mib": round(rss.peak / 2**20),
                             "peak_device_mib_above_start": dev.result() if cfg.encode.backend == "gpu" else "-"})

    if ok:
        from ..cluster import dask_cuda_version

        version, why = dask_cuda_version()  # only pqgpu.cluster imports dask_cuda
        if version is not None:
            kind, cluster = "local-cuda", {"kind": "local-cuda"}
        else:
            kind, cluster = "local", {"kind": "local", "n_workers": 1}
            rec.note(f"dask-cuda could not be used ({why}): the GPU pipeline ran on a plain "
                     "dask LocalCluster with one worker using the GPU instead of local-cuda")
        cfg = cfg_for("gpu", "gpu", cluster)
        t0 = time.perf_counter()
        with rec.gpu_part(f"{kind} encode"), dask_client(cfg.cluster) as client:
            client.run(_warm_worker, "gpu", source, chunks[0])
            rec.set(gpu_cluster=kind, gpu_cluster_start_s=round(time.perf_counter() - t0, 2),
                    gpu_workers=len(client.scheduler_info()["workers"]))
            run_encode(f"{kind} encode (gpu)", cfg, client)
    else:
        rec.row("pipeline", {"what": "local-cuda encode (gpu)", "result": SKIPPED})
        rec.note("GPU row: " + no_gpu(reason))
    cfg = cfg_for("cpu", "cpu", {"kind": "local", "n_workers": workers, "threads_per_worker": 1})
    t0 = time.perf_counter()
    with dask_client(cfg.cluster) as client:
        client.run(_warm_worker, "cpu", source, chunks[0])
        rec.set(cpu_cluster_start_s=round(time.perf_counter() - t0, 2))
        [src] = client.scatter([source], broadcast=True)
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            rows = sum(client.gather(client.map(_read_rows, [src] * len(chunks), chunks, pure=False)))
            secs = time.perf_counter() - t0
        rec.row("pipeline", {"what": f"read only ({workers} workers)", "seconds": secs, "rows_per_s": rows / secs,
                             "peak_host_rss_mib": round(rss.peak / 2**20), "peak_device_mib_above_start": "-"})
        run_encode(f"cpu encode ({workers} workers)", cfg, client)
    table = {r["what"].split(" ")[0]: r for r in rec.data["tables"]["pipeline"]}
    g = next((r for r in rec.data["tables"]["pipeline"] if "(gpu)" in r["what"]), {})
    if "rows_per_s" in g:
        rec.set(gpu_vs_read_only=g["rows_per_s"] / table["read"]["rows_per_s"],
                gpu_vs_cpu_pipeline=g["rows_per_s"] / table["cpu"]["rows_per_s"])
        cpu_codes, gpu_codes = open_store(root / "cpu.zarr").codes, open_store(root / "gpu.zarr").codes
        m = min(n, 262144)
        rec.set(rows_equal_gpu_cpu_first_rows=f"{int((cpu_codes[:m] == gpu_codes[:m]).all(axis=1).sum())}/{m}")
    rec.finish()


# ---------------------------------------------------------------------------------------------------- main

STEPS = {"versions": step_versions, "gpu_tests": step_gpu_tests, "parity": step_parity,
         "encode_grid": step_encode_grid, "train": step_train, "search": step_search, "pipeline": step_pipeline}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=list(STEPS))
    ap.add_argument("--result", required=True)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--params", default="{}")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    rec = Recorder(args.result)
    params = json.loads(args.params)
    params["_workdir"] = args.workdir or tempfile.mkdtemp(prefix=f"pqgpu-{args.step}-")
    try:
        if args.step == "pipeline":
            step_pipeline(rec, params, args.quick, params["_workdir"])
        else:
            STEPS[args.step](rec, params, args.quick)
    except BaseException as exc:
        import traceback

        traceback.print_exc()
        rec.status(f"failed: {type(exc).__name__}: {str(exc)[:300]}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
