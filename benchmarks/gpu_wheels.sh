#!/usr/bin/env bash
# Download, here, the wheels the lent GPU machine lacks for running the test suite there
# (pytest and hypothesis with their needs; featcache's other dependencies are installed there).
# They land in .whl/ (git-ignored through .git/info/exclude); benchmarks/gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d .whl pytest==9.0.3 iniconfig pluggy packaging hypothesis==6.151.9 sortedcontainers attrs
ls -1 .whl
