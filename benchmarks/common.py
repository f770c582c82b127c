"""Shared helpers for the benchmarks: timing medians, machine description, data paths."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hymenoptera_data"
WORK = Path(os.environ.get("FEATCACHE_BENCH_DIR", "/tmp/featcache-bench"))


@dataclass
class Row:
    """One line of the BENCHMARKS.md table: a ratio measured side by side, and its target."""

    name: str
    ratio: float
    target: str
    met: bool
    detail: str
    extra: dict = field(default_factory=dict)


def median_time(fn, repeat: int = 3, warmup: int = 0) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def require_real_data() -> Path:
    if not REAL_DATA.is_dir():
        raise SystemExit(f"The real data set is missing at {REAL_DATA}; this benchmark needs it.")
    return REAL_DATA
