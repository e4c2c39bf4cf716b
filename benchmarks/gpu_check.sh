#!/usr/bin/env bash
# One command for a GPU machine: install the GPU extras, run the gpu tests, the CPU/GPU/faiss parity check
# and the GPU benchmarks, and write a short results file (default gpu-check/RESULTS-gpu.md).
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
bash scripts/setup.sh
PY=.venv/bin/python
$PY -m pip install -q 'cupy-cuda12x>=13' || $PY -m pip install -q 'cupy-cuda13x'
$PY -m pip install -q 'dask-cuda' || echo "dask-cuda not installed: local-cuda cluster tests will skip"
$PY -m pip install -q 'faiss-gpu-cu12' 2>/dev/null && echo "faiss-gpu installed" || echo "faiss-gpu unavailable: GPU faiss rows skipped"
{
  echo "# pqgpu GPU check ($(date -u +%F' '%T) UTC)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  .venv/bin/pqgpu doctor
  echo '```'
} > "$OUT/RESULTS-gpu.md"
$PY - <<'PY'
from pqgpu.backend import gpu_status
ok, reason = gpu_status()
print("GPU:", reason)
raise SystemExit(0 if ok else "no usable GPU: " + reason)
PY
set +e
$PY -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}
set -e
$PY benchmarks/bench_encode.py --n 1000000 --runs 5 --json "$OUT/encode.json" | tee "$OUT/encode.txt"
$PY benchmarks/bench_gpu.py --json "$OUT/gpu.json" | tee "$OUT/gpu.txt"
{
  echo "## gpu tests (exit $tests_rc)"; echo '```'; tail -n 5 "$OUT/gpu-tests.txt"; echo '```'
  echo "## encode grid"; sed -n '/Encode throughput/,$p' "$OUT/encode.txt"
  echo "## GPU benchmarks"; cat "$OUT/gpu.txt"
} >> "$OUT/RESULTS-gpu.md"
echo "written: $OUT/RESULTS-gpu.md"
exit $tests_rc
