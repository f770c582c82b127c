"""The built-in demo: on ``digits`` with the default backbone, extract once, fit two heads with
regularisation sweeps, print the leaderboard and write an HTML report. Offline, a few minutes on
two CPU cores."""

from __future__ import annotations

from pathlib import Path

from ..backbones.base import DEFAULT_BACKBONE
from .bench import BenchConfig, run_bench
from ..reports.leaderboard import leaderboard
from ..reports.pages import write_report

DEMO_HEADS = ("linear", "knn")


def run_demo(*, out_dir: str = "demo-out", cache_dir: str = "cache", backbone: str = DEFAULT_BACKBONE,
             heads: tuple[str, ...] = DEMO_HEADS, progress=None, extract_progress=None) -> dict:
    """Run the demo grid; returns ``{"records", "leaderboard", "report", "bench_dir"}``."""
    out = Path(out_dir)
    config = BenchConfig(backbones=(backbone,), sources=("digits",), heads=heads, shots=(0,), seeds=1,
                         extract={"cache_dir": cache_dir})
    # The demo folder shows this run only: a re-run replaces it (the cache makes it a cache hit).
    records = run_bench(config, out / "bench", overwrite=True, progress=progress, extract_progress=extract_progress)
    report = write_report(out / "bench", out / "report.html")
    return {"records": records, "leaderboard": leaderboard(records), "report": str(report),
            "bench_dir": str(out / "bench")}
