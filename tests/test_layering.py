"""Package layering: only the backend layer (pqgpu/backend.py and the pqgpu/_cuda.py it owns) imports CuPy or
numba.cuda; everything else asks the backend (device choice, sync, transfers)."""

from __future__ import annotations

import ast
from pathlib import Path

import pqgpu

PACKAGE = Path(pqgpu.__file__).parent
BACKEND_LAYER = {"backend.py", "_cuda.py"}
# Files that still import CuPy; each entry is a debt, to be removed (not added to). Empty since every module
# went through the backend helpers.
NOT_YET_MOVED: set[str] = set()


def _is_gpu_module(name: str) -> bool:
    return (name in ("cupy", "cupyx", "numba.cuda", "array_api_compat.cupy")
            or name.startswith(("cupy.", "cupyx.", "numba.cuda.", "array_api_compat.cupy.")))


def gpu_imports(source: str) -> list[str]:
    """The CuPy / numba.cuda modules that `source` imports (statements anywhere, also inside functions,
    and __import__ / importlib.import_module with a literal name), as 'line: module'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            called = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if called in ("__import__", "import_module") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        hits = [n for n in names if _is_gpu_module(n)]
        if hits:
            found.append(f"{node.lineno}: {hits[0]}")
    return found


def test_scanner_sees_each_form_of_import():
    src = ("import cupy\nfrom cupy import cuda\nimport cupyx.scipy\nfrom numba import cuda\nimport numba.cuda\n"
           "import array_api_compat.cupy as xp\ndef f():\n    import cupy as cp\n"
           "__import__('cupy')\nimportlib.import_module('numba.cuda')\n"
           "import numba\nfrom numba import njit\nimport cupy_like\nfrom .cupy import x\n")
    assert [s.split(": ")[0] for s in gpu_imports(src)] == ["1", "2", "3", "4", "5", "6", "8", "9", "10"]


def test_only_the_backend_imports_cupy_or_numba_cuda():
    offenders = {}
    seen_backend = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        found = gpu_imports(path.read_text(encoding="utf-8"))
        if rel in BACKEND_LAYER:
            seen_backend += found
        elif found and rel not in NOT_YET_MOVED:
            offenders[rel] = found
    assert seen_backend, "the scan found no CuPy import in backend.py: the scanner is broken"
    assert not offenders, (f"only {sorted(BACKEND_LAYER)} may import cupy / numba.cuda; move these behind "
                           f"pqgpu.backend helpers: {offenders}")
