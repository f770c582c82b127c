"""Extraction across processes (issue 8): 2 torchrun ranks x 1 thread vs 1 process x 2 threads on the
real data set, side by side (end-to-end wall time of the command, fresh cache each run)."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import WORK, Row, require_real_data


def _wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t


def run(repeat: int = 2) -> list[Row]:
    data = str(require_real_data())
    fc = [sys.executable, "-m", "featcache", "extract", data, "-q"]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    single, ranks = [], []
    for i in range(repeat):
        d1, d2 = WORK / f"dist-single-{i}", WORK / f"dist-ranks-{i}"
        shutil.rmtree(d1, ignore_errors=True)
        shutil.rmtree(d2, ignore_errors=True)
        single.append(_wall([*fc, "--threads", "2", "--cache-dir", str(d1)]))
        ranks.append(_wall([torchrun, "--nproc-per-node", "2", "--master-port", "29533", "-m", "featcache",
                            "extract", data, "-q", "--threads", "1", "--cache-dir", str(d2)]))
    s, r = statistics.median(single), statistics.median(ranks)
    return [Row("1 process x 2 threads / 2 torchrun ranks x 1 thread (time ratio), hymenoptera, efficientnet_lite0",
                r / s, "report", True,
                f"1x2: {s:.1f} s ({398 / s:.1f} img/s), 2x1: {r:.1f} s ({398 / r:.1f} img/s) end to end including "
                f"start-up, median of {repeat}")]
