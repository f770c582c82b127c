#!/usr/bin/env bash
# GPU throughput of featcache on one CUDA device: no network, no pretrained weights.
# Usage (from the repository root, with the package installed): bash benchmarks/gpu.sh
# Results: printed, and written row by row to $OUT/gpu.json (default /tmp/featcache-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
timeout 290 "$PY" -m benchmarks.gpu
