#!/usr/bin/env bash
# The GPU check, built for a borrowed GPU machine with no network (see README, "GPU check on an air-gapped
# workstation"):
#   bash benchmarks/gpu_check.sh --prepare              where there is a network: the wheels the GPU machine
#                                                        lacks (benchmarks/gpu_kit.txt) into git-ignored .whl/
#   bash benchmarks/gpu_check.sh --offline RESULTS_DIR [RUNNER ARGS]
#                                                        on the GPU machine: install .whl/ into a temporary
#                                                        target (no index, no network, never CuPy), import
#                                                        pqgpu from this source tree, run the check
#   bash benchmarks/gpu_check.sh --local RESULTS_DIR [RUNNER ARGS]
#                                                        the same check with the current environment as it is
#                                                        (e.g. a venv with `pip install -e '.[gpu,dev]'`)
# RUNNER ARGS go to `python -m pqgpu.bench.gpu_check`: --quick, --steps a,b, --param name=value, --budget S.
# PYTHON picks the interpreter (default python3); the kit's wheels are for CPython 3.12.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
KIT_LIST=benchmarks/gpu_kit.txt
WHL=${GPU_CHECK_WHEELS:-$ROOT/.whl}
MAX_MIB=60

die() { echo "gpu_check: $*" >&2; exit 2; }

kit_requirements() { sed -e 's/#.*//' -e 's/[[:space:]]//g' "$KIT_LIST" | sed '/^$/d'; }

prepare() {
  local tmp reqs n_req n_whl bytes
  mapfile -t reqs < <(kit_requirements)
  n_req=${#reqs[@]}
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  echo "downloading $n_req pinned wheels (CPython 3.12, manylinux x86-64, no dependencies) ..."
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --no-cache-dir \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 \
    -d "$tmp" "${reqs[@]}" || die "pip download failed (is the package registry reachable?); .whl/ left as it was"
  n_whl=$(find "$tmp" -maxdepth 1 -name '*.whl' | wc -l)
  [ "$n_whl" -eq "$n_req" ] || die "expected $n_req wheels, got $n_whl: $(ls "$tmp")"
  bytes=$(du -cb "$tmp"/*.whl | tail -n 1 | cut -f1)
  if [ "$bytes" -gt $((MAX_MIB * 1024 * 1024)) ]; then
    die "the kit is $((bytes / 1048576)) MiB, over the ${MAX_MIB} MiB limit; .whl/ left as it was"
  fi
  mkdir -p "$WHL"
  rm -f "$WHL"/*.whl "$WHL"/SHA256SUMS
  mv "$tmp"/*.whl "$WHL"/
  (cd "$WHL" && sha256sum ./*.whl > SHA256SUMS)
  echo "kit in $WHL:"
  (cd "$WHL" && du -b ./*.whl | sort -k2 | awk '{printf "  %8.2f MiB  %s\n", $1 / 1048576, substr($2, 3)}')
  printf '%d wheels, %.1f MiB (limit %d MiB)\n' "$n_whl" "$(echo "$bytes / 1048576" | bc -l)" "$MAX_MIB"
}

# Install the kit into $1 without any index, network or configuration (pip.conf find-links included).
install_kit() {
  local site=$1 log=$2
  compgen -G "$WHL/*.whl" > /dev/null || die "no wheels in $WHL: run \`bash benchmarks/gpu_check.sh --prepare\` \
where there is a network and copy .whl/ along with the repository"
  if [ -f "$WHL/SHA256SUMS" ]; then
    (cd "$WHL" && sha256sum --check --quiet SHA256SUMS) || die "a wheel in $WHL does not match SHA256SUMS (copy it again)"
  fi
  "$PY" - <<'PY' || die "$PY is not CPython 3.12; the kit's wheels are cp312 (set PYTHON=/path/to/python3.12)"
import sys, platform
raise SystemExit(0 if sys.version_info[:2] == (3, 12) and platform.python_implementation() == "CPython" else 1)
PY
  mkdir -p "$site"
  if [ "${GPU_CHECK_INSTALLER:-pip}" = pip ] && "$PY" -m pip --version > /dev/null 2>&1; then
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 \
      "$PY" -m pip install --no-index --no-deps --no-cache-dir --disable-pip-version-check \
      --no-warn-script-location --target "$site" "$WHL"/*.whl > "$log" 2>&1 \
      || { tail -n 20 "$log" >&2; die "installing the kit failed (log: $log)"; }
  else
    # No pip for this interpreter: a wheel is a zip file, so unpack it (what pip does for these wheels).
    "$PY" - "$site" "$WHL"/*.whl > "$log" 2>&1 <<'PY' || { cat "$log" >&2; die "unpacking the kit failed"; }
import pathlib, shutil, sys, zipfile
target = pathlib.Path(sys.argv[1])
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    print("unpacked", pathlib.Path(wheel).name)
for data in target.glob("*.data"):
    for part in ("purelib", "platlib"):
        if (data / part).is_dir():
            for item in (data / part).iterdir():
                shutil.move(str(item), str(target / item.name))
    shutil.rmtree(data)
PY
    "$PY" -m compileall -q -j 0 "$site" >> "$log" 2>&1 || true  # as pip does: imports need not compile
  fi
  echo "kit installed into $site ($(ls "$WHL"/*.whl | wc -l) wheels)" >> "$log"
}

case "${1:-}" in
  --prepare)
    prepare
    ;;
  --offline)
    [ $# -ge 2 ] || die "usage: bash benchmarks/gpu_check.sh --offline RESULTS_DIR [runner args]"
    OUT=$2; shift 2
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/pqgpu-kit.XXXXXX")
    trap 'rm -rf "$TMP"' EXIT
    t0=$(date +%s)
    install_kit "$TMP/site" "$OUT/install.txt"
    echo "kit installed in $(( $(date +%s) - t0 )) s; running the check (results in $OUT)"
    PYTHONPATH="$TMP/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONNOUSERSITE=1 \
      "$PY" -m pqgpu.bench.gpu_check --out "$OUT" --mode offline "$@"
    ;;
  --local)
    [ $# -ge 2 ] || die "usage: bash benchmarks/gpu_check.sh --local RESULTS_DIR [runner args]"
    OUT=$2; shift 2
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pqgpu.bench.gpu_check --out "$OUT" --mode local "$@"
    ;;
  *)
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    [ -z "${1:-}" ] || [ "$1" = -h ] || [ "$1" = --help ] || exit 2
    ;;
esac
