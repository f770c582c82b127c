#!/usr/bin/env bash
# One call on the lent GPU machine (see the README's "On a GPU"): the test suite on CUDA, then the
# GPU benchmark. Results in $OUT: pytest.log, gpu.json, gpu.md. Needs .whl/ from gpu_wheels.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/featcache-gpu}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/featcache-site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/featcache-site" PYTHONUNBUFFERED=1 FEATCACHE_TEST_DEVICE=cuda
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
# Every failure is reported (no -x: one GPU run has to show them all); the whole log comes back.
timeout "${FEATCACHE_TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -m "not slow and not real" \
    --maxfail=30 -rfE tests/test_on_device.py tests/test_devices.py tests/test_extract.py tests/test_distributed.py \
    > "$OUT/pytest.log" 2>&1
tail -25 "$OUT/pytest.log"
FEATCACHE_GPU_TIMEOUT="${FEATCACHE_GPU_TIMEOUT:-330}" FEATCACHE_GPU_BUDGET="${FEATCACHE_GPU_BUDGET:-280}" \
    OUT="$OUT" bash benchmarks/gpu.sh
