"""How far a score can be trusted: bootstrap confidence intervals of the held-out metrics, paired
comparisons of two heads scored on the same rows, and the smallest difference a test split resolves.

The bootstrap resamples the evaluation rows within each true class (stratified: every resample
keeps the class counts of the split), ``RESAMPLES`` times from a seeded generator, and reports the
2.5 and 97.5 percentiles, widened about the score by sqrt(n / (n - classes)) for the variance a
resample of few rows per class lacks. It is vectorised, with no Python loop per resample:

- top-1, balanced accuracy and macro F1 depend on the rows only through the confusion matrix, so a
  resample of class c's rows is a multinomial draw of its row of the matrix (exact, and as cheap for
  100,000 rows as for 100);
- log loss is a mean over rows, and ROC-AUC is resampled through its DeLong placement values (the
  first-order expansion of the AUC in the rows, which makes it a mean over rows too): both are
  sums of resampled rows, drawn as row indices per class, a block of resamples at a time (or, when
  a class's rows take few distinct values, as a paired difference of right and wrong does, as a
  multinomial draw of those values' counts: the same distribution).

Several prediction sets over the same rows (the seeds of a few-shot run) share each resample, and
the interval is that of their mean (the "pooled" interval).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: Resamples of the bootstrap, its level and the metrics it gives an interval to.
RESAMPLES = 1000
LEVEL = 0.95
CI_METRICS = ("top1", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss")
#: Resampled row indices drawn at once (memory of one block: 4 bytes each, plus the gathered values).
_BLOCK = 1 << 22
#: Two-sided significance of the paired tests: a row pair is "tied" when p >= this.
ALPHA = 0.05


def _percentile(stats: np.ndarray, level: float, point: float, scale: float,
                bounds: tuple[float, float] = (0.0, 1.0)) -> list[float]:
    """The percentile interval, widened about ``point`` by ``scale`` (see :func:`_scale`), within ``bounds``."""
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    lo, hi = point - scale * (point - lo), point + scale * (hi - point)
    return [float(max(lo, bounds[0])), float(min(hi, bounds[1]))]


def _scale(y: np.ndarray) -> float:
    """A resample of a class's n_c rows varies (n_c - 1) / n_c as much as a new sample would: the
    intervals are widened by sqrt(n / (n - classes)) (Rao and Wu's rescaling; 5% at 50 rows in 5
    classes, nothing to speak of at thousands)."""
    strata = len(np.unique(y))
    return math.sqrt(len(y) / (len(y) - strata)) if len(y) > strata else 1.0


def _strata(y: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(y == c) for c in np.unique(y)]


def _resampled_sums(y: np.ndarray, values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Sums of ``values`` (complex: two real columns in one gather) over stratified resamples of the rows,
    shape (resamples,)."""
    out = np.zeros(resamples, dtype=values.dtype)
    for rows in _strata(y):
        v = values[rows]
        distinct, counts = np.unique(v, return_counts=True)
        if 4 * len(distinct) < len(rows):  # few values (a paired difference of right/wrong): draw their counts
            out += rng.multinomial(len(rows), counts / len(rows), size=resamples) @ distinct
            continue
        block = max(1, _BLOCK // len(rows))
        for start in range(0, resamples, block):
            b = min(block, resamples - start)
            idx = rng.integers(0, len(rows), size=(b, len(rows)), dtype=np.int32 if len(rows) < 2**31 else np.int64)
            out[start:start + b] += v[idx].sum(axis=1)
    return out


def _confusion_draws(y: np.ndarray, preds: np.ndarray, K: int, resamples: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per prediction set, resampled true positives and predicted counts per class, each of shape
    (n_sets, resamples, K). Rows alike in their class and every set's prediction are one category of
    a multinomial draw per class: exactly the stratified bootstrap of the confusion matrices."""
    S = len(preds)
    combos, counts = np.unique(np.vstack([y, preds]).T, axis=0, return_counts=True)
    draws = np.zeros((resamples, len(combos)), dtype=np.int64)
    for c in np.unique(combos[:, 0]):
        at = np.flatnonzero(combos[:, 0] == c)
        n_c = counts[at].sum()
        draws[:, at] = rng.multinomial(n_c, counts[at] / n_c, size=resamples)
    tp = np.zeros((S, resamples, K), dtype=np.int64)
    predicted = np.zeros((S, resamples, K), dtype=np.int64)
    for s in range(S):
        pred = combos[:, 1 + s]
        for k in np.unique(pred):
            at = pred == k
            predicted[s, :, k] = draws[:, at].sum(axis=1)
            hit = at & (combos[:, 0] == k)
            if hit.any():
                tp[s, :, k] = draws[:, hit].sum(axis=1)
    return tp, predicted


def _auc_placements(y: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Per-row contributions ``a`` with sum(a) = 2 AUC, and the AUC (binary: column 1; more classes:
    the one-vs-rest macro average), as scikit-learn computes it; None when a class is absent."""
    K = proba.shape[1]
    counts = np.bincount(y, minlength=K)
    if (counts == 0).any():
        return None
    columns = [1] if K == 2 else range(K)
    a = np.zeros(len(y))
    aucs = []
    for k in columns:
        s, pos = proba[:, k], y == k
        sp, sn = np.sort(s[pos]), np.sort(s[~pos])
        n_pos, n_neg = len(sp), len(sn)
        # Positive i: the share of negatives it outranks (ties half); negative j: of positives above it.
        below = np.searchsorted(sn, s[pos], "left") + 0.5 * (np.searchsorted(sn, s[pos], "right")
                                                             - np.searchsorted(sn, s[pos], "left"))
        above = n_pos - np.searchsorted(sp, s[~pos], "right") + 0.5 * (
            np.searchsorted(sp, s[~pos], "right") - np.searchsorted(sp, s[~pos], "left"))
        a[pos] += below / n_neg / n_pos
        a[~pos] += above / n_pos / n_neg
        aucs.append(below.sum() / (n_pos * n_neg))
    return a / len(aucs), float(np.mean(aucs))


def _log_losses(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    clipped = np.clip(proba, 1e-15, 1.0)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    return -np.log(clipped[np.arange(len(y)), y])


def _confusion_scores(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray) -> dict[str, np.ndarray]:
    """Top-1, balanced accuracy and macro F1 from per-class counts of shape (n_sets, n_draws, K), averaged
    over the sets: arrays of shape (n_draws,)."""
    present = support > 0
    top1 = tp.sum(axis=2) / support.sum()
    balanced = (tp[:, :, present] / support[present]).mean(axis=2)
    denom = 2 * tp + (predicted - tp) + (support - tp)  # 2 TP + FP + FN
    f1 = np.divide(2 * tp, denom, out=np.zeros(denom.shape), where=denom > 0)
    labels = present | (predicted > 0)  # scikit-learn's macro F1: labels in y_true or the predictions
    macro_f1 = (f1 * labels).sum(axis=2) / labels.sum(axis=2)
    return {"top1": top1.mean(axis=0), "balanced_accuracy": balanced.mean(axis=0), "macro_f1": macro_f1.mean(axis=0)}


def _confusion_intervals(y: np.ndarray, preds: np.ndarray, K: int, resamples: int, level: float,
                         rng: np.random.Generator) -> dict[str, list]:
    support = np.bincount(y, minlength=K)
    draws = _confusion_scores(*_confusion_draws(y, preds, K, resamples, rng), support)
    hit = preds == y
    tp = np.stack([np.bincount(y[h], minlength=K) for h in hit])[:, None]
    predicted = np.stack([np.bincount(p, minlength=K) for p in preds])[:, None]
    point = _confusion_scores(tp, predicted, support)
    scale = _scale(y)
    return {f"{m}_ci": _percentile(draws[m], level, float(point[m][0]), scale) for m in draws}


def prediction_intervals(y_idx: np.ndarray, preds: np.ndarray, *, resamples: int = RESAMPLES, level: float = LEVEL,
                         seed: int = 0) -> dict[str, list]:
    """The intervals of top-1, balanced accuracy and macro F1 from predicted classes alone.

    ``preds`` is of shape (n_samples,) or (n_sets, n_samples) (seeds: the interval of their mean).
    Equal to those of :func:`bootstrap_intervals` for the same predictions and seed.
    """
    y = np.asarray(y_idx, dtype=np.int64).reshape(-1)
    preds = np.atleast_2d(np.asarray(preds, dtype=np.int64))
    K = int(max(y.max(), preds.max())) + 1
    return _confusion_intervals(y, preds, K, resamples, level, np.random.default_rng(seed))


def bootstrap_intervals(y_idx: np.ndarray, probas: np.ndarray | Sequence[np.ndarray], *,
                        resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> dict[str, list | None]:
    """Stratified bootstrap intervals of top-1, balanced accuracy, macro F1, ROC-AUC and log loss.

    Parameters
    ----------
    y_idx : ndarray of shape (n_samples,), int
        True labels as column indices of the probabilities.
    probas : ndarray of shape (n_samples, n_classes), or a sequence of them
        Probabilities (rows summing to 1). Several sets over the same rows (the seeds of a
        few-shot run) give the interval of their mean, each resample shared by every set.
    resamples, level, seed : int, float, int
        Bootstrap resamples, the interval's coverage, and the seed of its generator.

    Returns
    -------
    dict
        ``{metric}_ci``: ``[low, high]`` for each of :data:`CI_METRICS`, as the metrics are
        defined in :func:`featcache.metrics.scores.classification_metrics`; ``roc_auc_ci`` is None when a
        class is absent from ``y_idx`` (there is no AUC).
    """
    y = np.asarray(y_idx, dtype=np.int64).reshape(-1)
    sets = [np.asarray(p, dtype=np.float64) for p in (probas if isinstance(probas, (list, tuple)) else [probas])]
    K, n = sets[0].shape[1], len(y)
    rng = np.random.default_rng(seed)
    out = _confusion_intervals(y, np.stack([p.argmax(axis=1) for p in sets]), K, resamples, level, rng)
    loss = np.mean([_log_losses(y, p) for p in sets], axis=0) / n
    auc = [_auc_placements(y, p) for p in sets]
    values = loss.astype(np.complex128)
    if auc[0] is not None:
        values = values + 1j * np.mean([a for a, _ in auc], axis=0)
    sums = _resampled_sums(y, values, resamples, rng)
    scale = _scale(y)
    if auc[0] is None:
        out["roc_auc_ci"] = None
    else:
        point = float(np.mean([v for _, v in auc]))
        out["roc_auc_ci"] = _percentile(sums.imag - point, level, point, scale)
    out["log_loss_ci"] = _percentile(sums.real, level, float(loss.sum()), scale, (0.0, math.inf))
    return out


def paired_difference(y_idx: np.ndarray, correct_a: np.ndarray, correct_b: np.ndarray, *,
                      resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> dict:
    """Top-1 of A minus top-1 of B on the same rows, with a paired test.

    Parameters
    ----------
    y_idx : ndarray of shape (n_samples,)
        True labels (the strata of the bootstrap).
    correct_a, correct_b : ndarray of shape (n_samples,) or (n_seeds, n_samples)
        Whether each row was classified right (several seeds: averaged per row).

    Returns
    -------
    dict
        ``diff`` (a fraction), ``diff_ci`` (the paired stratified bootstrap interval of the
        difference), ``p_value`` (McNemar's exact test, when A and B are one prediction each; else
        None), ``test`` ("mcnemar-exact" or "paired-bootstrap") and ``distinguishable``: the exact
        test's p < 0.05 for one prediction each, else the interval excludes 0.
    """
    a, b = np.atleast_2d(correct_a).astype(float), np.atleast_2d(correct_b).astype(float)
    y = np.asarray(y_idx).reshape(-1)
    d = (a.mean(axis=0) - b.mean(axis=0)) / len(y)
    sums = _resampled_sums(y, d.astype(np.complex128), resamples, np.random.default_rng(seed)).real
    out = {"diff": float(d.sum()), "diff_ci": _percentile(sums, level, float(d.sum()), _scale(y), (-1.0, 1.0)),
           "p_value": None,
           "test": "paired-bootstrap"}
    if len(a) == 1 and len(b) == 1:
        out["p_value"] = mcnemar_exact(int(((a[0] == 1) & (b[0] == 0)).sum()), int(((a[0] == 0) & (b[0] == 1)).sum()))
        out["test"] = "mcnemar-exact"
        out["distinguishable"] = out["p_value"] < ALPHA
    else:
        out["distinguishable"] = not (out["diff_ci"][0] <= 0.0 <= out["diff_ci"][1])
    return out


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of ``b`` rows only A got right against ``c`` only B got right."""
    if b + c == 0:
        return 1.0
    from scipy.stats import binom

    return float(min(1.0, 2.0 * binom.cdf(min(b, c), b + c, 0.5)))


def fewest_resolvable(alpha: float = ALPHA) -> int:
    """The fewest rows that must go one model's way for McNemar's exact test to call a difference."""
    k = 1
    while 2.0 * 0.5 ** k >= alpha:
        k += 1
    return k


def detectable_difference(n: int, top1: float | None = None) -> dict:
    """What a split of ``n`` rows can resolve.

    Returns
    -------
    dict
        ``n``; ``points``: the difference in top-1 (in points) under which no paired test at 95%
        can call two heads different, even when every row they disagree on favours one
        (McNemar's exact test needs :func:`fewest_resolvable` such rows); ``half_width``: about
        half the 95% interval of one top-1 score near ``top1`` (normal approximation), in points,
        or None without ``top1``.
    """
    k = fewest_resolvable()
    half = None if top1 is None else 100 * 1.96 * math.sqrt(max(top1 * (1 - top1), 0.0) / n)
    return {"n": int(n), "rows": k, "points": 100.0 * k / n, "half_width": half}


def detectable_difference_line(n: int, top1: float | None, split: str) -> str:
    """One line: how large a difference ``split`` (``n`` rows) can resolve, for the CLI and reports."""
    d = detectable_difference(n, top1)
    line = (f"with {n} {split} images, differences under {d['points']:.1f} points are not resolved (a paired test "
            f"at 95% needs {d['rows']} more images right)")
    if d["half_width"] is not None:
        line += f"; one top-1 score's 95% interval is about ±{d['half_width']:.1f} points"
    return line


__all__ = ["CI_METRICS", "LEVEL", "RESAMPLES", "bootstrap_intervals", "detectable_difference",
           "detectable_difference_line", "mcnemar_exact", "paired_difference", "prediction_intervals"]
