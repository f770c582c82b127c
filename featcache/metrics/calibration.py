"""Calibrated probabilities: one temperature fitted on the eval split, and the calibration error.

A head's probabilities ``p`` become ``softmax(log p / T)``; ``T`` minimises the log-loss of the
eval split (the split the sweep selected on; never test). The arg-max, hence accuracy, balanced
accuracy and the binary ROC-AUC, do not change; the confidences do. The expected calibration error
(ECE: the mean gap between confidence and accuracy over 15 equal-width confidence bins, weighted by
their rows) is reported before and after for every scored split, in ``best.calibration``. A saved
run applies ``T`` in ``predict``, ``evaluate`` and the exported program.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

#: Range of the fitted temperature (a wider one only fits noise on a small eval split).
T_BOUNDS = (0.05, 20.0)
BINS = 15


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
    when none does better, or when the minimum lies at a bound)."""
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(np.asarray(proba, dtype=np.float64), 1e-300, 1.0))

    def nll(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))

    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    res = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    # Keep T = 1 unless the fit is really better (a flat log-loss must not move the probabilities), and
    # when the optimum sits at a bound: an eval split the head separates without an error has its
    # log-loss fall all the way to T -> 0, which says nothing about new data (on the accuracy
    # benchmark such a T multiplied the test log-loss by 10).
    at_bound = min(res.x - lo, hi - res.x) < 0.01
    return float(np.exp(res.x)) if res.fun < nll(0.0) - 1e-9 and not at_bound else 1.0


def calibrate(probas: Callable[[str], tuple[np.ndarray, np.ndarray]], eval_split: str,
              splits: Iterable[str]) -> dict:
    """Fit the temperature on ``eval_split`` and measure ECE before / after on ``splits``.

    Parameters
    ----------
    probas : callable
        ``split -> (proba over all classes, label indices)`` of the head to calibrate.

    Returns
    -------
    dict
        ``{"method": "temperature", "temperature", "fitted_on", "ece": {split: {"before", "after"}}}``.
    """
    P, y = probas(eval_split)
    t = fit_temperature(P, y)
    ece = {}
    for split in splits:
        P, y = probas(split)
        ece[split] = {"before": expected_calibration_error(P, y),
                      "after": expected_calibration_error(apply_temperature(P, t), y)}
    return {"method": "temperature", "temperature": t, "fitted_on": eval_split, "ece": ece}


def temperature_of(meta: dict) -> float:
    """The temperature a saved run's ``run.json`` records (1.0 when it has none)."""
    cal = (meta.get("best") or {}).get("calibration") or {}
    return float(cal.get("temperature", 1.0))
