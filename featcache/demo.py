"""The built-in demo: extract ``digits`` with the default backbone, fit two heads with a sweep,
compare them. Runs offline on a CPU in a couple of minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .extract import ExtractConfig, ExtractResult, extract
from .fit import FitResult, fit_head

DEMO_HEADS = ("logreg", "linear")


def run_demo(*, out_dir: str = "demo-out", cache_dir: str = "cache", backbone: str = "efficientnet_lite0",
             heads: tuple[str, ...] = DEMO_HEADS, progress=None,
             log: Callable[[str], None] = lambda s: None) -> tuple[ExtractResult, list[FitResult]]:
    """Extract ``digits`` once and fit ``heads`` on its cache; runs go under ``out_dir/runs``."""
    config = ExtractConfig(backbone=backbone, cache_dir=cache_dir)
    res = extract("digits", config, progress=progress)
    log(f"cache: {res.cache} ({'cache hit' if res.cache_hit else f'{res.computed} images extracted'}, "
        f"{res.seconds:.1f} s)")
    fits = []
    for head in heads:
        fit = fit_head(res.cache, head=head, runs_dir=str(Path(out_dir) / "runs"))
        log(f"{head}: best {fit.best['param']}={fit.best['value']:g}, val top-1 "
            f"{fit.metrics['val']['top1']:.4f} ({fit.seconds:.1f} s) -> {fit.run}")
        fits.append(fit)
    return res, fits
