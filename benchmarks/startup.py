"""Start-up: what a command costs before it does any work (issue 14).

Wall time of each command in a fresh process, median of 5, measured in turn with ``python -c
"import torch"`` so that both see the same load: ``--help``, ``ls``, ``info``, ``backbones`` and
``heads`` (which need no torch), a cache hit of ``featcache extract`` and a ``fit-head --head
logreg``, on hymenoptera with the default backbone where the data set is present (else digits with
resnet18.none at 32 px). The last two are also run the way they ran before issue 14, in the same
loop: the cache hit through ``prepare`` (which builds the network, folds BatchNorm and probes the
layer shapes before it finds the cache) and the fit with torchvision imported first (as
``featcache.heads`` imported it); their rows are the ratio now / before. Each row's detail names the
heaviest imports ``python -X importtime`` reports for that command.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import REAL_DATA, WORK, Row

RUNS = 5

#: Today's cache hit the way it ran before issue 14: the network is built (and its layers probed)
#: before the cache is looked for.
_BUILD_THEN_HIT = """
import torchvision
from featcache.extraction.pipeline import run_prepared
from featcache.extraction.plan import ExtractConfig, prepare
res = run_prepared(prepare({source!r}, ExtractConfig(**{options!r})))
assert res.cache_hit, res
"""

#: The fit as it ran before issue 14, when importing the heads imported torchvision.
_FIT_WITH_TORCHVISION = """
import sys, runpy, torchvision
sys.argv = ["featcache", *{args!r}]
runpy.run_module("featcache", run_name="__main__")
"""


def _wall(args: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    subprocess.run(args, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t


def _heaviest_imports(args: list[str], cwd: Path, n: int = 5) -> str:
    """The top-level modules with the largest cumulative import time in ``python -X importtime``."""
    out = subprocess.run([args[0], "-X", "importtime", *args[1:]], cwd=cwd, capture_output=True, text=True,
                         check=True).stderr
    rows = []
    for line in out.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S.*)$", line)
        if m and len(m.group(2)) == 1:  # top-level imports only (nested ones are indented further)
            rows.append((int(m.group(1)), m.group(3).strip()))
    rows.sort(reverse=True)
    return ", ".join(f"{name} {us / 1000:.0f} ms" for us, name in rows[:n]) or "none"


def _setup(work: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The commands, and the two the way they ran before; extracts the cache they read first."""
    py = sys.executable
    if REAL_DATA.is_dir():
        source, options, flags = str(REAL_DATA), {}, []
    else:
        source = "digits"
        options = {"backbone": "resnet18.none", "input_size": 32}
        flags = ["-b", "resnet18.none", "--input-size", "32"]
    cache_dir = str(work / "cache")
    extract = [py, "-m", "featcache", "extract", source, *flags, "--cache-dir", cache_dir, "-q"]
    made = subprocess.run([*extract, "--json"], cwd=work, check=True, capture_output=True, text=True)
    cache = json.loads(made.stdout.strip().splitlines()[-1])["cache"]
    fit = ["fit-head", cache, "--head", "logreg", "--runs-dir", str(work / "runs"), "-o", str(work / "runs" / "logreg"),
           "--overwrite", "--json"]
    commands = {"featcache --help": [py, "-m", "featcache", "--help"],
                "featcache ls": [py, "-m", "featcache", "ls", "--cache-dir", cache_dir],
                "featcache info CACHE": [py, "-m", "featcache", "info", cache],
                "featcache backbones": [py, "-m", "featcache", "backbones"],
                "featcache heads": [py, "-m", "featcache", "heads"],
                "featcache extract (cache hit)": extract,
                "featcache fit-head --head logreg": [py, "-m", "featcache", *fit]}
    before = {"featcache extract (cache hit)":
              [py, "-c", _BUILD_THEN_HIT.format(source=source, options={**options, "cache_dir": cache_dir})],
              "featcache fit-head --head logreg": [py, "-c", _FIT_WITH_TORCHVISION.format(args=fit)]}
    return commands, before


def run() -> list[Row]:
    work = WORK / "startup"
    work.mkdir(parents=True, exist_ok=True)
    commands, before = _setup(work)
    data = "hymenoptera, efficientnet_lite0" if REAL_DATA.is_dir() else "digits, resnet18.none at 32 px"
    torch_times: list[float] = []
    times: dict[str, list[float]] = {k: [] for k in commands}
    times_before: dict[str, list[float]] = {k: [] for k in before}
    for _ in range(RUNS):
        for name, args in commands.items():
            torch_times.append(_wall([sys.executable, "-c", "import torch"], work))
            times[name].append(_wall(args, work))
            if name in before:
                times_before[name].append(_wall(before[name], work))
    t_torch = statistics.median(torch_times)
    rows = []
    for name, ts in times.items():
        t = statistics.median(ts)
        heavy = _heaviest_imports(commands[name], work)
        if name in before:
            t0 = statistics.median(times_before[name])
            rows.append(Row(f"{name} / the same before issue 14 ({data})", t / t0, "< 0.5", t / t0 < 0.5,
                            f"{t:.2f} s vs {t0:.2f} s before, import torch {t_torch:.2f} s (medians of {RUNS}, "
                            f"fresh processes); heaviest imports: {heavy}"))
            continue
        fast = name in ("featcache --help", "featcache ls")
        rows.append(Row(f"{name} / python -c 'import torch'", t / t_torch, "< 1 s" if fast else "report",
                        t < 1.0 if fast else True,
                        f"{t:.2f} s vs {t_torch:.2f} s (medians of {RUNS}, fresh processes); heaviest imports: {heavy}"))
    return rows
