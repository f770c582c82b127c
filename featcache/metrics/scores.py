"""Classification metrics of predicted probabilities, as JSON-able dicts, and their text table."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.metrics import (
    confusion_matrix,
    f1_score,
    log_loss,
    roc_auc_score,
    top_k_accuracy_score,
)

from ..errors import ConfigError
from .intervals import CI_METRICS, LEVEL, RESAMPLES, bootstrap_intervals

#: Columns of :func:`format_metrics_table`: (metric key, header).
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("n", "n"),
    ("top1", "top1"),
    ("top5", "top5"),
    ("balanced_accuracy", "bal_acc"),
    ("macro_f1", "macro_f1"),
    ("roc_auc", "roc_auc"),
    ("log_loss", "log_loss"),
)


def _check_inputs(
    y_true: Any, proba: Any, classes: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    classes = np.asarray(classes)
    if classes.ndim != 1 or len(classes) < 2:
        raise ConfigError(
            f"classes must be a 1-D list of at least 2 labels; got shape {classes.shape}."
        )
    if len(np.unique(classes)) != len(classes):
        raise ConfigError("classes must not repeat a label. Pass head.classes_.")
    proba = np.asarray(proba, dtype=np.float64)
    y_true = np.asarray(y_true).reshape(-1)
    if proba.ndim != 2 or proba.shape != (len(y_true), len(classes)):
        raise ConfigError(
            f"proba must have shape (n_samples, n_classes) = ({len(y_true)}, {len(classes)}); "
            f"got {proba.shape}. Pass head.predict_proba(X) and head.classes_."
        )
    if len(y_true) == 0:
        raise ConfigError("y_true is empty: there is nothing to score.")
    if not np.isfinite(proba).all() or (proba < 0).any():
        raise ConfigError("proba must hold finite non-negative probabilities.")
    sums = proba.sum(axis=1, keepdims=True)
    if (sums <= 0).any():
        raise ConfigError("Every row of proba must have a positive sum.")
    try:
        order = np.argsort(classes, kind="stable")
        pos = np.clip(np.searchsorted(classes, y_true, sorter=order), 0, len(classes) - 1)
        y_idx = order[pos]
        unknown = np.asarray(classes[y_idx] != y_true, dtype=bool)
    except (TypeError, ValueError):
        raise ConfigError(
            f"y_true labels ({y_true.dtype}) cannot be compared with classes ({classes.dtype}). "
            "Score with the classes the head was fitted on (head.classes_)."
        ) from None
    if unknown.any():
        bad = np.unique(y_true[unknown])[:5].tolist()
        raise ConfigError(
            f"y_true holds label(s) {bad!r} that are not in classes {classes.tolist()!r}. "
            "Score with the classes the head was fitted on (head.classes_)."
        )
    return y_idx, proba / sums, classes


def classification_metrics(y_true: Any, proba: Any, classes: Any, *, resamples: int = RESAMPLES,
                           seed: int = 0) -> dict[str, Any]:
    """Metrics of predicted probabilities against true labels.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels, each one of ``classes``.
    proba : array-like of shape (n_samples, n_classes)
        Predicted probabilities, columns in ``classes`` order (rows are renormalised to 1).
    classes : array-like of shape (n_classes,)
        The labels of the columns (``head.classes_``).
    resamples : int, default 1000
        Resamples of the bootstrap intervals (0: no intervals).
    seed : int, default 0
        Seed of the bootstrap.

    Returns
    -------
    dict
        Plain Python values only:

        - ``n`` (int), ``top1`` (accuracy of the arg-max), ``top5`` (only with >= 5 classes);
        - ``balanced_accuracy`` (mean recall over the classes present in ``y_true``);
        - ``macro_f1`` (scikit-learn's macro F1 over the labels present in ``y_true`` or the
          predictions, 0 where undefined);
        - ``roc_auc``: binary, on the ``classes[1]`` column; more classes, one-vs-rest macro
          average; None when a class is absent from ``y_true``;
        - ``log_loss`` over all ``classes`` (probabilities clipped away from 0);
        - ``top1_ci``, ``balanced_accuracy_ci``, ``macro_f1_ci``, ``roc_auc_ci``, ``log_loss_ci``:
          ``[low, high]``, the 95% stratified bootstrap interval (:mod:`featcache.metrics.intervals`; None
          where the metric is None), and ``ci`` {"level", "resamples", "seed", "method"};
        - ``per_class_recall`` {str(class): recall, or None when the class is absent}, with the
          counts behind it: ``per_class_n`` (rows of the class) and ``per_class_correct``;
        - ``confusion_matrix`` (list of lists, rows = true class, columns = predicted, both in
          ``classes`` order) and ``classes`` (list of str).
    """
    y_idx, proba, classes = _check_inputs(y_true, proba, classes)
    K = len(classes)
    labels = np.arange(K)
    pred = np.argmax(proba, axis=1)
    cm = confusion_matrix(y_idx, pred, labels=labels)
    support = cm.sum(axis=1)
    present = support > 0
    recall = np.divide(np.diag(cm), support, out=np.zeros(K), where=present)

    out: dict[str, Any] = {"n": int(len(y_idx)), "top1": float(np.mean(pred == y_idx))}
    if K == 5:
        out["top5"] = 1.0  # every class is in the top 5 (scikit-learn would warn)
    elif K > 5:
        out["top5"] = float(top_k_accuracy_score(y_idx, proba, k=5, labels=labels))
    out["balanced_accuracy"] = float(recall[present].mean())
    out["macro_f1"] = float(f1_score(y_idx, pred, average="macro", zero_division=0.0))
    if not present.all():
        out["roc_auc"] = None
    elif K == 2:
        out["roc_auc"] = float(roc_auc_score(y_idx, proba[:, 1]))
    else:
        out["roc_auc"] = float(
            roc_auc_score(y_idx, proba, multi_class="ovr", average="macro", labels=labels)
        )
    eps = 1e-15
    clipped = np.clip(proba, eps, 1.0)
    out["log_loss"] = float(
        log_loss(y_idx, clipped / clipped.sum(axis=1, keepdims=True), labels=labels)
    )
    if resamples:
        out.update(bootstrap_intervals(y_idx, proba, resamples=resamples, seed=seed))
        out["ci"] = {"level": LEVEL, "resamples": int(resamples), "seed": int(seed),
                     "method": "percentile bootstrap, stratified by class"}
    out["per_class_recall"] = {
        str(c): (float(r) if p else None) for c, r, p in zip(classes.tolist(), recall, present)
    }
    out["per_class_n"] = {str(c): int(n) for c, n in zip(classes.tolist(), support)}
    out["per_class_correct"] = {str(c): int(n) for c, n in zip(classes.tolist(), np.diag(cm))}
    out["confusion_matrix"] = cm.astype(int).tolist()
    out["classes"] = [str(c) for c in classes.tolist()]
    return out


#: Metrics a sweep can select on (``fit-head --select-by``); all but log_loss are higher-is-better.
SELECT_BY: tuple[str, ...] = ("top1", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss")


def selection_scores(y_idx: np.ndarray, proba: np.ndarray, select_by: str = "top1") -> dict[str, float]:
    """Top-1, log-loss and the selection metric of one sweep point (no confusion tables).

    Parameters
    ----------
    y_idx : ndarray of shape (n_samples,), int
        True labels as column indices of ``proba``.
    proba : ndarray of shape (n_samples, n_classes)
        Probabilities over every class of the cache (a class the head never saw has a column
        of zeros, so its rows count as errors, as in :func:`classification_metrics`).
    select_by : str
        One of :data:`SELECT_BY`.

    Returns
    -------
    dict
        ``top1``, ``log_loss`` and ``select_by``'s value, as :func:`classification_metrics`
        reports them.
    """
    if select_by not in SELECT_BY:
        raise ConfigError(f"The 'select_by' option must be one of {', '.join(SELECT_BY)}. Got {select_by!r}.")
    K = proba.shape[1]
    clipped = np.clip(proba, 1e-15, 1.0)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    pred = np.argmax(proba, axis=1)
    out = {"top1": float(np.mean(pred == y_idx)),
           "log_loss": float(-np.mean(np.log(clipped[np.arange(len(y_idx)), y_idx])))}
    if select_by == "balanced_accuracy":
        support = np.bincount(y_idx, minlength=K)
        hits = np.bincount(y_idx[pred == y_idx], minlength=K)
        present = support > 0
        out[select_by] = float(np.mean(hits[present] / support[present]))
    elif select_by == "macro_f1":
        out[select_by] = float(f1_score(y_idx, pred, average="macro", zero_division=0.0))
    elif select_by == "roc_auc":
        auc = classification_metrics(y_idx, proba, np.arange(K), resamples=0)["roc_auc"]
        if auc is None:
            raise ConfigError(
                "select_by=roc_auc needs every class in the eval split; some have no rows there. "
                "Select by top1, balanced_accuracy or macro_f1 instead."
            )
        out[select_by] = float(auc)
    return out


def format_value(value: Any, digits: int = 4, missing: str = "-") -> str:
    """A metric as text: floats to ``digits`` decimals, None as ``missing``."""
    if value is None:
        return missing
    if isinstance(value, float) and not isinstance(value, bool):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_interval(ci: Any, digits: int = 3) -> str:
    """An interval ``[low, high]`` as ``low-high`` (empty when there is none)."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or any(v is None for v in ci):
        return ""
    return f"{ci[0]:.{digits}f}-{ci[1]:.{digits}f}"


def format_metrics_table(metrics_by_split: Mapping[str, Mapping[str, Any]]) -> str:
    """A short aligned text table of the scalar metrics, one row per split, each followed by a row
    of its 95% intervals when it has them.

    Parameters
    ----------
    metrics_by_split : mapping of str to dict
        Split name (e.g. "train", "val", "test") to :func:`classification_metrics` output.

    Returns
    -------
    str
        Lines without a trailing newline; the ``top5`` column only appears when some split has
        it; missing or None values print as ``-``; the interval row reads ``  95% CI`` with
        ``low-high`` cells.
    """
    columns = [
        (key, head)
        for key, head in TABLE_COLUMNS
        if key != "top5" or any("top5" in m for m in metrics_by_split.values())
    ]
    rows: list[Sequence[str]] = [["split", *[head for _, head in columns]]]
    for split, metrics in metrics_by_split.items():
        rows.append([str(split), *[format_value(metrics.get(key)) for key, _ in columns]])
        if any(f"{key}_ci" in metrics for key in CI_METRICS):
            level = (metrics.get("ci") or {}).get("level", LEVEL)
            rows.append([f"  {level:.0%} CI", *[format_interval(metrics.get(f"{key}_ci")) for key, _ in columns]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


__all__ = ["SELECT_BY", "classification_metrics", "format_interval", "format_metrics_table", "selection_scores"]


def expand_proba(proba: np.ndarray, head_classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over the head's classes -> over all ``n_classes`` of the cache (a class the
    head never saw gets 0)."""
    out = np.zeros((len(proba), n_classes), dtype=np.float64)
    out[:, np.asarray(head_classes, dtype=np.int64)] = proba
    return out


def split_metrics(y: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict:
    """Metrics of label indices ``y`` against probabilities over all classes, keyed by class name."""
    m = classification_metrics(y, proba, np.arange(len(class_names)))
    for key in ("per_class_recall", "per_class_n", "per_class_correct"):
        m[key] = {class_names[int(k)]: v for k, v in m[key].items()}
    m["classes"] = list(class_names)
    return m
