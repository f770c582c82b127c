#!/usr/bin/env bash
# GPU throughput of featcache extract against its ceilings (benchmarks/gpu.py says what is measured).
#
#   bash benchmarks/gpu.sh                          # on a CUDA machine, from anywhere
#   FEATCACHE_GPU_SMOKE=1 bash benchmarks/gpu.sh    # the same rows on the CPU, tiny: does it run?
#
# featcache runs from this source tree (PYTHONPATH); nothing is pip-installed and nothing needs
# carrying to the lent H200 (torch, torchvision, h5py, scikit-learn, click, tqdm, Pillow and
# safetensors are there; the backbones use random weights). Results (small JSON and Markdown) go to
# $OUT (default /tmp/featcache-gpu); images and caches to $FEATCACHE_GPU_SCRATCH (default under
# /tmp), removed at the end. benchmarks/gpu_check.sh runs the CUDA test suite and then this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OUT="${OUT:-/tmp/featcache-gpu}"
exec timeout "${FEATCACHE_GPU_TIMEOUT:-480}" "$PY" -m benchmarks.gpu
