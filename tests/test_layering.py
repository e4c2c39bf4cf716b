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


def gpu_imports(source: str, is_module=_is_gpu_module) -> list[str]:
    """The CuPy / numba.cuda modules (or those `is_module` names) that `source` imports (statements anywhere,
    also inside functions, and __import__ / importlib.import_module with a literal name), as 'line: module'."""
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
        hits = [n for n in names if is_module(n)]
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


# -- dask-cuda: only pqgpu/cluster.py (issue 22 item 5) ------------------------------------------------------

def _is_dask_cuda(name: str) -> bool:
    return name == "dask_cuda" or name.startswith("dask_cuda.")


def test_only_the_cluster_module_imports_dask_cuda():
    assert gpu_imports("def f():\n    from dask_cuda.utils import get_n_gpus\n", _is_dask_cuda) == ["2: dask_cuda.utils"]
    found = {path.relative_to(PACKAGE).as_posix(): gpu_imports(path.read_text(encoding="utf-8"), _is_dask_cuda)
             for path in sorted(PACKAGE.rglob("*.py"))}
    assert found.pop("cluster.py"), "the scan found no dask_cuda import in cluster.py: the scanner is broken"
    offenders = {rel: hits for rel, hits in found.items() if hits}
    assert not offenders, ("only pqgpu/cluster.py may import dask_cuda (ask it, e.g. cluster.dask_cuda_version()): "
                           f"{offenders}")


# -- no import circles -----------------------------------------------------------------------------------
# Data flows one way (store -> ivf_search -> search -> cli, DESIGN §1): a module never imports, directly or
# through others, a module that imports it. Imports inside functions count too: a lazy import hides a circle
# from Python's import machinery, not from the design. A module importing a package that contains it
# (`from . import __version__` in pqgpu/store.py, `from . import Shard` in pqgpu/sources/npy.py) is not an
# edge: a package's __init__ is the facade of its own modules, which Python imports first anyway.

def _module_names() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """module -> the pqgpu modules it imports (statements anywhere in the file)."""
    modules = _module_names() if modules is None else modules
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:  # `from . import kernels` imports the module pqgpu.kernels
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_cycle_finder_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_import_graph_reads_each_form_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {"__init__.py": "", "a.py": "from . import b\nfrom .sub.c import f\n",
             "b.py": "def g():\n    import pkg.a\n", "sub/__init__.py": "",
             "sub/c.py": "from .. import b, __version__\nfrom ..b import g\nfrom . import h\n"}
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    modules = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py",
               "pkg.sub": pkg / "sub" / "__init__.py", "pkg.sub.c": pkg / "sub" / "c.py"}
    graph = import_graph(modules)
    assert graph["pkg.a"] == {"pkg.b", "pkg.sub.c"}
    assert graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.sub.c"] == {"pkg.b"}


def test_no_import_circles_among_pqgpu_modules():
    graph = import_graph()
    assert "pqgpu.store" in graph["pqgpu.search"] and "pqgpu.evaluation" in graph["pqgpu.ivf_search"], \
        "the import scan missed known imports: it is broken"
    cycle = find_cycle(graph)
    assert cycle is None, ("pqgpu modules import each other in a circle: " + " -> ".join(cycle) + ". Move what "
                           "both need into a module below them (as pqgpu/evaluation.py holds what search and "
                           "ivf_search share) so that imports run one way.")
