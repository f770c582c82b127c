"""Bootstrap intervals of the held-out metrics (issue 27): do they cover, and what do they cost?

- Coverage: synthetic predictions from a fixed generator (5 classes of equal size, class-dependent
  separation, so the classes differ in accuracy), test sets of 50 to 5,000 rows, 1,000 simulated
  test sets per size; the share of the 95% intervals that hold the generator's true value (top-1,
  balanced accuracy, macro F1, ROC-AUC, log loss, each computed on 2,000,000 rows of the generator)
  should lie in 93-97%.
- Cost: the intervals of all five metrics for 100,000 rows x 10 classes, 1,000 resamples (target
  under 2 s); and the pooled interval of three seeds over the same rows, for the record.
"""

from __future__ import annotations

import numpy as np

from featcache.metrics.intervals import CI_METRICS, bootstrap_intervals
from featcache.metrics.scores import classification_metrics

from .common import Row, median_time

SIZES = (50, 150, 500, 1500, 5000)
SIMULATIONS = 1000
K = 5


def _draw(n: int, rng: np.random.Generator, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows, classes of equal size; class c's true logit is raised by 0.8 + 0.4 c."""
    y = np.repeat(np.arange(k), n // k)
    z = rng.normal(size=(len(y), k))
    z[np.arange(len(y)), y] += 0.8 + 0.4 * y
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return y, p / p.sum(axis=1, keepdims=True)


def coverage() -> list[Row]:
    rng = np.random.default_rng(0)
    truth = classification_metrics(*_draw(2_000_000, rng), np.arange(K), resamples=0)
    rows = []
    for n in SIZES:
        hits = {m: 0 for m in CI_METRICS}
        widths = {m: [] for m in CI_METRICS}
        for t in range(SIMULATIONS):
            ci = bootstrap_intervals(*_draw(n, rng), seed=t)
            for m in CI_METRICS:
                lo, hi = ci[f"{m}_ci"]
                hits[m] += lo <= truth[m] <= hi
                widths[m].append(hi - lo)
        for m in CI_METRICS:
            cov = hits[m] / SIMULATIONS
            rows.append(Row(f"coverage of the 95% interval of {m}, n={n}", cov, "0.93-0.97", 0.93 <= cov <= 0.97,
                            f"{hits[m]} of {SIMULATIONS} simulated test sets hold the true {truth[m]:.4f}; "
                            f"mean width {np.mean(widths[m]):.4f}"))
    return rows


def cost() -> list[Row]:
    rng = np.random.default_rng(1)
    y, p = _draw(100_000, rng, k=10)
    t, times = median_time(lambda: bootstrap_intervals(y, p), repeat=3, warmup=1)
    rows = [Row("intervals of all 5 metrics, 100,000 rows x 10 classes, 1,000 resamples", t / 2.0, "< 2 s",
                t < 2.0, f"{t:.2f} s (median of {', '.join(f'{x:.2f}' for x in times)} s); ratio = seconds / 2 s")]
    sets = [_draw(100_000, np.random.default_rng(s), k=10)[1] for s in range(3)]
    t3, _ = median_time(lambda: bootstrap_intervals(y, sets), repeat=3, warmup=1)
    rows.append(Row("pooled intervals of 3 seeds, 100,000 rows x 10 classes", t3 / 2.0, "report", True,
                    f"{t3:.2f} s (median of 3)"))
    return rows


def run() -> list[Row]:
    return cost() + coverage()
