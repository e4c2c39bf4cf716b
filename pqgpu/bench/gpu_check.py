"""The GPU check: every step of pqgpu.bench.gpu in its own process with its own timeout, within one budget.

    python -m pqgpu.bench.gpu_check --out RESULTS_DIR [--quick] [--steps a,b] [--param name=value] [--budget S]

Usually started by `bash benchmarks/gpu_check.sh --offline RESULTS_DIR` on the air-gapped GPU machine.
A step that hangs or crashes (a CUDA fault kills its process) is ended at its timeout with its process
group, and the next step runs. After every step RESULTS_DIR holds results.json (everything, including each
step's output tail), RESULTS-gpu.md (the same, readable) and log.txt (all output), so whatever happens
later, what was measured has come back.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import markdown_table


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    timeout_s: int


# The timeouts add up to the default budget (420 s): with the kit's install (~10 s) the check stays within
# 7.5 minutes on the GPU machine. gpu_tests has 120 s: 26 tests, six of them IVF-PQ (tests/test_ivf_gpu.py),
# four inner product / cosine (tests/test_metric.py), three the refine re-rank (tests/test_refine.py) and two
# an append (tests/test_append.py);
# several of the others compare with numba CPU kernels, which compile on the machine's cold cache. Each
# step's size knobs are --param names (see pqgpu/bench/gpu.py).
STEPS = [
    Step("versions", "(a) versions, nvidia-smi, which packages import", 30),
    Step("gpu_tests", "(b) pytest -m gpu (PQ, OPQ, IVF-PQ, ip/cosine, refine, append, the pipeline on CuPy)", 120),
    Step("parity", "(c) codes: GPU == CPU == faiss-cpu compute_codes (nbits 4/8/10/12/16, OPQ)", 35),
    Step("encode_grid", "(d) device-resident encode: GPU routes vs the PyTorch baseline", 60),
    Step("train", "(e) training 1M x 768, M=96, 25 iterations, and OPQ: GPU vs CPU", 55),
    Step("search", "(f) ADC search: GPU vs CPU", 20),
    Step("pipeline", "(g) Parquet -> Zarr: local-cuda vs CPU workers vs read-only", 100),
]
DEFAULT_BUDGET = sum(s.timeout_s for s in STEPS)
TAIL_CHARS = 6000


def _parse_params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--param: expected name=value. Got {item!r} instead.")
        params[key] = value
    return params


class Runner:
    def __init__(self, out: Path, *, quick: bool, params: dict[str, Any], budget: float, mode: str,
                 step_module: str = "pqgpu.bench.gpu"):
        self.out = out
        self.step_module = step_module
        # --quick runs where it is proven: slow shared CPUs, where starting Python and importing take longer
        self.scale = 3 if quick else 1
        self.quick = quick
        self.params = params
        self.deadline = time.monotonic() + budget
        self.log = open(out / "log.txt", "a", buffering=1)
        self.results: dict[str, Any] = {
            "check": "pqgpu GPU check", "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "mode": mode, "quick": quick, "params": params, "budget_s": budget,
            "command": " ".join([os.path.basename(sys.executable), "-m", "pqgpu.bench.gpu_check"] + sys.argv[1:]),
            "steps": []}

    # -- running one step ----------------------------------------------------------------------------------

    def run_step(self, step: Step) -> dict[str, Any]:
        left = self.deadline - time.monotonic()
        record: dict[str, Any] = {"name": step.name, "title": step.title}
        if left < 5:
            record.update(status=f"skipped: the check's time budget was used up ({left:.0f} s left)", seconds=0)
            return record
        timeout = min(step.timeout_s * self.scale, left)
        if "timeout_" + step.name in self.params:
            timeout = min(float(self.params["timeout_" + step.name]), left)
        params = dict(self.params, _timeout=timeout)
        with tempfile.TemporaryDirectory(prefix=f"pqgpu-{step.name}-") as work:
            result_file = Path(work) / "result.json"
            cmd = [sys.executable, "-m", self.step_module, step.name, "--result", str(result_file),
                   "--workdir", str(Path(work) / "data"), "--params", json.dumps(params)]
            if self.quick:
                cmd.append("--quick")
            self.log.write(f"\n===== {step.name} (timeout {timeout:.0f} s) {time.strftime('%H:%M:%S')}\n")
            t0 = time.monotonic()
            # own session: on timeout the whole group (Dask workers included) is ended, nothing lingers
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", start_new_session=True, bufsize=1)
            tail: list[str] = []
            reader = threading.Thread(target=self._pump, args=(proc, tail), daemon=True)
            reader.start()
            timed_out = False
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                rc = self._kill(proc)
            reader.join(timeout=5)
            secs = time.monotonic() - t0
            try:
                data = json.loads(result_file.read_text())
            except (OSError, ValueError):
                data = {}
        status = data.pop("status", "no result written")
        if timed_out:
            status = f"timeout: ended after {timeout:.0f} s (results measured before are kept)"
        elif rc != 0 and not status.startswith("failed"):
            status = f"failed: exit code {rc} ({'killed by signal ' + str(-rc) if rc < 0 else status})"
        elif status == "running":
            status = "failed: the step ended without finishing"
        record.update(status=status, seconds=round(secs, 1), timeout_s=round(timeout), exit_code=rc, **data)
        record["output_tail"] = "".join(tail)[-TAIL_CHARS:]
        return record

    def _pump(self, proc: subprocess.Popen, tail: list[str]) -> None:
        size = 0
        for line in proc.stdout:
            self.log.write(line)
            tail.append(line)
            size += len(line)
            while size > 2 * TAIL_CHARS and len(tail) > 1:
                size -= len(tail.pop(0))

    def _kill(self, proc: subprocess.Popen) -> int:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                return proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return proc.returncode if proc.returncode is not None else -9

    # -- writing results -----------------------------------------------------------------------------------

    def write(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.t_start, 1)
        _atomic(self.out / "results.json", json.dumps(self.results, indent=1, default=str))
        _atomic(self.out / "RESULTS-gpu.md", render_markdown(self.results))

    def run(self, steps: list[Step]) -> int:
        self.t_start = time.monotonic()
        self.write()
        failures = 0
        for step in steps:
            print(f"--- {step.title}", flush=True)
            record = self.run_step(step)
            self.results["steps"].append(record)
            self.write()
            failures += record["status"].startswith(("failed", "timeout", "mismatch"))
            print(f"    {record['status']} ({record.get('seconds', 0)} s)", flush=True)
        self.results["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        self.write()
        self.log.close()
        print(f"results: {self.out}/RESULTS-gpu.md, results.json, log.txt "
              f"({self.results['elapsed_s']} s, {failures} step(s) failed)")
        return 1 if failures else 0


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def render_markdown(results: dict[str, Any]) -> str:
    lines = [f"# pqgpu GPU check, {results['started_utc']} UTC", "",
             f"mode: {results['mode']}{' (quick sizes)' if results['quick'] else ''}; command: "
             f"`{results['command']}`; {results.get('elapsed_s', 0)} s of a {results['budget_s']:.0f} s budget", ""]
    lines += ["| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['title']} | {s['status']} | {s.get('seconds', '')} |" for s in results["steps"]]
    for s in results["steps"]:
        lines += ["", f"## {s['title']}", "", f"**{s['status']}**", ""]
        summary = s.get("summary") or {}
        for key, value in summary.items():
            if isinstance(value, str) and "\n" in value:
                lines += [f"- {key}:", "", "```", value, "```", ""]
            else:
                lines.append(f"- {key}: {value:,.4g}" if isinstance(value, float) else f"- {key}: {value}")
        for note in s.get("notes") or []:
            lines.append(f"- note: {note}")
        for title, rows in (s.get("tables") or {}).items():
            columns: list[str] = []
            for r in rows:
                columns += [c for c in r if c not in columns]
            lines += ["", f"### {title}", "", markdown_table(rows, columns)]
        for diff in s.get("differing") or []:
            lines.append(f"- differing rows, nbits {diff['nbits']}{' OPQ' if diff['opq'] else ''} {diff['route']}: "
                         f"{diff['rows']}; first: {json.dumps(diff['examples'][:4])}")
        if s.get("failures"):
            lines += ["", "```", *s["failures"], "```"]
        if not s["status"].startswith(("ok", "skipped")):
            lines += ["", "output tail:", "", "```", s.get("output_tail", "")[-2500:].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results folder (results.json, RESULTS-gpu.md, log.txt)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: proves the runner, measures nothing useful")
    ap.add_argument("--steps", default=",".join(s.name for s in STEPS),
                    help="comma-separated subset of: " + ", ".join(s.name for s in STEPS))
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="size knobs, e.g. pipeline_n=2000000, encode_n=262144, train_n=..., timeout_pipeline=90")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for all steps together (default {DEFAULT_BUDGET}; x3 with --quick)")
    ap.add_argument("--mode", default="local", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {s.name for s in STEPS})
    if unknown:
        raise SystemExit(f"--steps: unknown {', '.join(unknown)}; choose from {', '.join(s.name for s in STEPS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET * (3 if args.quick else 1)
    runner = Runner(out, quick=args.quick, params=_parse_params(args.param), budget=budget, mode=args.mode)
    raise SystemExit(runner.run([s for s in STEPS if s.name in wanted]))


if __name__ == "__main__":
    main()
