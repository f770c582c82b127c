"""Start-up: what a command costs before it does any work (issue 14).

Wall time of ``featcache --help``, ``featcache ls``, ``featcache info CACHE`` and a cache hit of
``featcache extract``, each in a fresh process, median of 5, against ``python -c "import torch"``
measured alternately in the same run; and the heaviest modules ``python -X importtime`` reports
for ``featcache --help``.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import WORK, Row

RUNS = 5


def _wall(args: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    subprocess.run(args, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t


def _heaviest_imports(cwd: Path, n: int = 5) -> str:
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "featcache", "--help"], cwd=cwd,
                         capture_output=True, text=True, check=True).stderr
    rows = []
    for line in out.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+(\S.*)$", line)
        if m and not m.group(2).startswith(" "):  # top-level packages only
            rows.append((int(m.group(1)), m.group(2).strip()))
    rows.sort(reverse=True)
    return ", ".join(f"{name} {us / 1000:.0f} ms" for us, name in rows[:n])


def run() -> list[Row]:
    work = WORK / "startup"
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    extract = [py, "-m", "featcache", "extract", "digits", "-b", "resnet18.none", "--input-size", "32",
               "--cache-dir", str(work / "cache"), "-q"]
    subprocess.run(extract, cwd=work, check=True, capture_output=True)  # the cache the hits below reuse
    cache = next((work / "cache").glob("*.h5"))
    commands = {"featcache --help": [py, "-m", "featcache", "--help"],
                "featcache ls": [py, "-m", "featcache", "ls", "--cache-dir", str(work / "cache")],
                "featcache info CACHE": [py, "-m", "featcache", "info", str(cache)],
                "featcache extract (cache hit)": extract}
    torch_times: list[float] = []
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(RUNS):
        for name, args in commands.items():
            torch_times.append(_wall([py, "-c", "import torch"], work))
            times[name].append(_wall(args, work))
    t_torch = statistics.median(torch_times)
    heavy = _heaviest_imports(work)
    rows = []
    for name, ts in times.items():
        t = statistics.median(ts)
        target = "< 1 s" if name in ("featcache --help", "featcache ls") else "report"
        met = t < 1.0 if target == "< 1 s" else True
        rows.append(Row(f"{name} / python -c 'import torch'", t / t_torch, target, met,
                        f"{t:.2f} s vs {t_torch:.2f} s (medians of {RUNS}, fresh processes)"))
    rows[0].detail += f"; heaviest imports of --help: {heavy}"
    return rows
