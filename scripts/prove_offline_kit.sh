#!/usr/bin/env bash
# Prove the offline GPU kit on this CPU machine, before any GPU is lent:
#   1. a Python 3.12 venv holding only what the GPU machine has preinstalled (benchmarks/gpu_machine.txt,
#      from the registry; minus CuPy, PyTorch, triton and numba-cuda, which a CPU cannot use), checked to
#      hold nothing of the kit;
#   2. then, with NO NETWORK (a fresh network namespace, only loopback, when `unshare` works):
#      the kit (.whl/) installed with `pip install --no-index --no-deps --target`, and from it
#      the CPU test suite (-m "not gpu and not postgres and not slow"), `pqgpu demo`, and
#      `bash benchmarks/gpu_check.sh --offline RESULTS --quick` (its GPU steps must say "skipped: no GPU").
#   bash scripts/prove_offline_kit.sh [--fresh-kit] [--keep]
# --fresh-kit runs `gpu_check.sh --prepare` first even if .whl/ exists (needs the registry).
# PY312 (default /root/.pyenv/versions/3.12.1/bin/python3) picks the Python 3.12; PROVE_KIT_DIR the work folder.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python3}
FRESH=0 KEEP=0
for arg in "$@"; do
  case $arg in
    --fresh-kit) FRESH=1 ;;
    --keep) KEEP=1 ;;
    *) echo "usage: bash scripts/prove_offline_kit.sh [--fresh-kit] [--keep]" >&2; exit 2 ;;
  esac
done
WORK=${PROVE_KIT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/pqgpu-prove-kit.XXXXXX")}
mkdir -p "$WORK"
[ "$KEEP" = 1 ] || trap 'rm -rf "$WORK"' EXIT
T0=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - T0 )) s)"; }

"$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
  || { echo "PY312=$PY312 is not Python 3.12" >&2; exit 2; }

if [ "$FRESH" = 1 ] || ! compgen -G ".whl/*.whl" > /dev/null; then
  step "preparing the kit (registry)"
  PYTHON="$PY312" bash benchmarks/gpu_check.sh --prepare
fi

step "venv with the GPU machine's preinstalled set (registry)"
"$PY312" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
"$VPY" -m pip install --quiet --disable-pip-version-check -r benchmarks/gpu_machine.txt
"$VPY" -m pip list --format=freeze --disable-pip-version-check > "$WORK/venv-packages.txt"
echo "$(wc -l < "$WORK/venv-packages.txt") packages: $(tr '\n' ' ' < "$WORK/venv-packages.txt")"
kit_names=$(sed -e 's/#.*//' -e 's/[=<>!~].*//' -e 's/[[:space:]]//g' benchmarks/gpu_kit.txt | sed '/^$/d' \
            | tr 'A-Z_.' 'a-z--')
present=$(cut -d= -f1 "$WORK/venv-packages.txt" | tr 'A-Z_.' 'a-z--' | grep -Fx -f <(echo "$kit_names") || true)
if [ -n "$present" ]; then
  echo "the venv already has packages of the kit, so it would prove nothing: $present" >&2
  exit 1
fi
if "$VPY" -c 'import cupy' 2> /dev/null; then echo "CuPy imports in the venv: not a CPU proof" >&2; exit 1; fi

# Everything below runs without a network: a new network namespace with only loopback (Dask needs it).
cat > "$WORK/offline.sh" <<EOF
set -euo pipefail
cd "$ROOT"
ip link set lo up 2> /dev/null || true
if python3 -c 'import urllib.request; urllib.request.urlopen("https://pypi.org/simple/", timeout=5)' 2> /dev/null; then
  echo "NETWORK: the registry is reachable here"
else
  echo "NETWORK: none (the registry cannot be reached)"
fi
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL
echo; echo "== kit into a --target folder, no index (\$(( \$(date +%s) - $T0 )) s)"
"$VPY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$WORK/site" .whl/*.whl
export PYTHONPATH="$WORK/site:$ROOT" PYTHONNOUSERSITE=1
"$VPY" -c 'import pqgpu, dask, distributed, zarr, faiss, sys; print("python", sys.version.split()[0], "pqgpu from", pqgpu.__file__, "dask", dask.__version__, "zarr", zarr.__version__, "faiss", faiss.__version__)'
echo; echo "== CPU test suite (\$(( \$(date +%s) - $T0 )) s)"
"$VPY" -m pytest -q -p no:cacheprovider -m "not gpu and not postgres and not slow" ${PROVE_KIT_PYTEST_ARGS:-} 2>&1 | tail -n 25
echo; echo "== pqgpu demo (\$(( \$(date +%s) - $T0 )) s)"
"$VPY" -m pqgpu.cli demo --out "$WORK/demo"
echo; echo "== gpu_check.sh --offline --quick (\$(( \$(date +%s) - $T0 )) s)"
PYTHON="$VPY" PYTHONPATH= bash benchmarks/gpu_check.sh --offline "$WORK/results" --quick
echo; echo "== the same without pip (wheels unpacked), versions step only (\$(( \$(date +%s) - $T0 )) s)"
GPU_CHECK_INSTALLER=unzip PYTHON="$VPY" PYTHONPATH= bash benchmarks/gpu_check.sh --offline "$WORK/results-nopip" \
  --quick --steps versions
EOF
step "offline part"
if unshare -n true 2> /dev/null; then
  unshare -n bash "$WORK/offline.sh"
else
  echo "unshare -n is not available here: the offline part runs with the network present (pip still gets no index)"
  bash "$WORK/offline.sh"
fi

step "checking the check's results"
"$VPY" - "$WORK/results" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
files = sorted(p.name for p in out.iterdir())
res = json.loads((out / "results.json").read_text())
bad = []
for s in res["steps"]:
    print(f"  {s['name']:12s} {s['status']}")
    if not (s["status"] == "ok" or s["status"].startswith("skipped: no GPU")):
        bad.append(s["name"])
needs_gpu = {"gpu_tests", "encode_grid"}
for s in res["steps"]:
    if s["name"] in needs_gpu and not s["status"].startswith("skipped: no GPU"):
        bad.append(s["name"] + " (should say skipped: no GPU)")
assert len(res["steps"]) == 7, len(res["steps"])
assert len(files) <= 8 and all((out / f).stat().st_size < 16 << 20 for f in files), files
imports = {r["module"]: r["imports"] for r in res["steps"][0]["tables"]["packages"]}
missing = [m for m in ("dask", "distributed", "zarr", "numcodecs", "faiss", "array_api_compat", "pqgpu", "pqgpu._cpu")
           if not imports[m].startswith("yes")]
print("  files:", ", ".join(files), f"; {res['elapsed_s']} s")
print("  kit modules that do not import:", ", ".join(m for m, r in imports.items() if not r.startswith("yes")) or "none")
nopip = json.loads((out.parent / "results-nopip" / "results.json").read_text())["steps"][0]
nopip_imports = {r["module"]: r["imports"] for r in nopip["tables"]["packages"]}
differ = [m for m in imports if imports[m].startswith("yes") != nopip_imports[m].startswith("yes")]
print("  without pip (unpacked wheels): the same modules import" if not differ else f"  without pip: {differ} differ")
if bad or missing or differ:
    raise SystemExit(f"FAILED: steps {bad}, modules {missing}, differing without pip {differ}")
PY
echo
echo "offline kit proven in $(( $(date +%s) - T0 )) s"
