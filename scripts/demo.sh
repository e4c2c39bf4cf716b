#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo: sample data -> train -> encode -> evaluate, local files only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pqgpu demo "$@"
