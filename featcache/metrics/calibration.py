"""Calibrated probabilities: one temperature fitted on the eval split, and the calibration error.

A head's probabilities ``p`` become ``softmax(log p / T)``; ``T`` minimises the log-loss of the
eval split (the split the sweep selected on; never test). The arg-max, hence accuracy, balanced
accuracy and the binary ROC-AUC, do not change; the confidences do. The expected calibration error
(ECE: the mean gap between confidence and accuracy over 15 equal-width confidence bins, weighted by
their rows) is reported before and after for every scored split, in ``best.calibration``. A saved
run applies ``T`` in ``predict``, ``evaluate`` and the exported program.

The temperature must do no harm: on a small eval split a few confident errors pull ``T`` far from 1
(on the accuracy benchmark's 3-class digits proxy, 61 val rows gave ``T = 2.56`` and the test ECE
went from 0.07 to 0.17). So :func:`calibrate` first checks it held out: ``T`` fitted on the other
folds of the eval split (stratified, up to :data:`CHECK_FOLDS`) is applied to each fold, and the
temperature is kept only when those out-of-fold probabilities have a lower log-loss *and* no higher
ECE than the raw ones. Otherwise ``T = 1`` and ``best.calibration.skipped`` says why.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

#: Range of the fitted temperature (a wider one only fits noise on a small eval split).
T_BOUNDS = (0.05, 20.0)
BINS = 15
#: Most folds of the held-out check of the temperature on the eval split.
CHECK_FOLDS = 5


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(proba) / temperature)`` row by row (a zero probability stays zero)."""
    proba = np.asarray(proba, dtype=np.float64)
    if temperature == 1.0:
        return proba
    with np.errstate(divide="ignore"):
        z = np.log(proba) / temperature
    z = z - np.max(z, axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    """Top-label ECE of ``proba`` (n, k) against label indices ``y`` (n,)."""
    proba = np.asarray(proba, dtype=np.float64)
    conf, pred = proba.max(1), proba.argmax(1)
    hit = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() * abs(conf[m].mean() - hit[m].mean())
    return float(total / len(y))


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The temperature in :data:`T_BOUNDS` that minimises the log-loss of ``proba`` on ``y`` (1.0
    when none does better, when every row is right, or when the minimum lies at a bound)."""
    from scipy.optimize import minimize_scalar

    proba = np.asarray(proba, dtype=np.float64)
    if (proba.argmax(1) == y).all():
        # Every row right: the log-loss falls all the way to T -> 0 and flattens on the way, so the
        # search stops short of the bound (T ~ 0.07 on 24 rows right at 0.9), which says nothing
        # about new data.
        return 1.0
    logp = np.log(np.clip(proba, 1e-300, 1.0))

    def nll(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))

    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    res = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    # Keep T = 1 unless the fit is really better (a flat log-loss must not move the probabilities), and
    # when the optimum sits at a bound (on the accuracy benchmark such a T multiplied the test log-loss by 10).
    at_bound = min(res.x - lo, hi - res.x) < 0.01
    return float(np.exp(res.x)) if res.fun < nll(0.0) - 1e-9 and not at_bound else 1.0


def log_loss(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-probability of the true class (clipped at 1e-15)."""
    p = np.clip(np.asarray(proba, dtype=np.float64)[np.arange(len(y)), y], 1e-15, 1.0)
    return float(-np.mean(np.log(p)))


def held_out_check(proba: np.ndarray, y: np.ndarray, *, folds: int = CHECK_FOLDS, seed: int = 0) -> dict:
    """Out-of-fold effect of the temperature on ``proba`` (n, k) with labels ``y`` (n,).

    The rows are split into stratified folds (as many as the smallest class allows, at most
    ``folds``); each fold's probabilities are calibrated by the temperature fitted on the other
    folds. Returns ``{"folds", "log_loss": {"before", "after"}, "ece": {"before", "after"}}``, or
    ``{"folds": 0}`` when a class of ``y`` has a single row (no fold split is possible).
    """
    from sklearn.model_selection import StratifiedKFold

    proba = np.asarray(proba, dtype=np.float64)
    counts = np.bincount(y)
    k = min(folds, int(counts[counts > 0].min()))
    if k < 2:
        return {"folds": 0}
    out = np.empty_like(proba)
    for rest, fold in StratifiedKFold(k, shuffle=True, random_state=seed).split(proba, y):
        out[fold] = apply_temperature(proba[fold], fit_temperature(proba[rest], y[rest]))
    return {"folds": k,
            "log_loss": {"before": log_loss(proba, y), "after": log_loss(out, y)},
            "ece": {"before": expected_calibration_error(proba, y), "after": expected_calibration_error(out, y)}}


def _verdict(check: dict, t: float, n: int, split: str) -> str | None:
    """Why the temperature is not applied (None: it is)."""
    if t == 1.0:
        return (f"calibration skipped: the log-loss of {split} ({n} rows) has no minimum inside the range of T "
                f"(every row right, or no temperature does better); the probabilities are kept as the head "
                f"gives them.")
    if not check["folds"]:
        return (f"calibration skipped: a class of {split} has a single row, too few to check a temperature "
                f"held out; the probabilities are kept as the head gives them.")
    ll, ece = check["log_loss"], check["ece"]
    if ll["after"] < ll["before"] and ece["after"] <= ece["before"]:
        return None
    return (f"calibration skipped: T={t:.3g} fitted on {check['folds'] - 1}/{check['folds']} of {split} "
            f"({n} rows) did not help the held-out fold (log-loss {ll['before']:.3f} -> {ll['after']:.3f}, "
            f"ECE {ece['before']:.3f} -> {ece['after']:.3f}); the probabilities are kept as the head gives them.")


def calibrate(probas: Callable[[str], tuple[np.ndarray, np.ndarray]], eval_split: str,
              splits: Iterable[str]) -> dict:
    """Fit the temperature on ``eval_split``, keep it where the held-out check says it helps, and
    measure ECE before / after on ``splits``.

    Parameters
    ----------
    probas : callable
        ``split -> (proba over all classes, label indices)`` of the head to calibrate.

    Returns
    -------
    dict
        ``{"method": "temperature", "temperature", "fitted_on", "check", "ece": {split: {"before",
        "after"}}}``; ``temperature`` is 1.0 and ``skipped`` says why when the temperature is not
        applied (``fitted`` then holds the temperature the eval split alone would have chosen).
    """
    P, y = probas(eval_split)
    t = fit_temperature(P, y)
    check = held_out_check(P, y) if t != 1.0 else {"folds": 0}
    skipped = _verdict(check, t, len(y), eval_split)
    out = {"method": "temperature", "temperature": 1.0 if skipped else t, "fitted_on": eval_split, "check": check}
    if skipped:
        out.update(skipped=skipped, fitted=t)
    ece = {}
    for split in splits:
        P, y = probas(split)
        ece[split] = {"before": expected_calibration_error(P, y),
                      "after": expected_calibration_error(apply_temperature(P, out["temperature"]), y)}
    out["ece"] = ece
    return out


def temperature_of(meta: dict) -> float:
    """The temperature a saved run's ``run.json`` records (1.0 when it has none)."""
    cal = (meta.get("best") or {}).get("calibration") or {}
    return float(cal.get("temperature", 1.0))
