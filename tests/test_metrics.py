"""classification_metrics agrees with scikit-learn and returns plain JSON-able values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    recall_score,
    roc_auc_score,
    top_k_accuracy_score,
)

from featcache.errors import ConfigError
from featcache.metrics.scores import classification_metrics, format_metrics_table


def _random_proba(n, k, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 2
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def _plain(value):
    """True when a value is built only from JSON's own Python types."""
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) is list:
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    return False


def test_multiclass_matches_sklearn():
    rng = np.random.default_rng(0)
    classes = np.array(["a", "b", "c", "d", "e", "f"])
    y_idx = np.concatenate([np.arange(6), rng.integers(0, 6, 94)])
    proba = _random_proba(100, 6, 1)
    proba[np.arange(100), y_idx] += 0.3  # better than chance
    proba /= proba.sum(axis=1, keepdims=True)
    y = classes[y_idx]
    m = classification_metrics(y, proba, classes)
    pred = proba.argmax(axis=1)
    assert m["n"] == 100
    assert m["top1"] == pytest.approx(np.mean(pred == y_idx))
    assert m["top5"] == pytest.approx(top_k_accuracy_score(y_idx, proba, k=5, labels=range(6)))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_idx, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_idx, pred, average="macro"))
    assert m["roc_auc"] == pytest.approx(
        roc_auc_score(y_idx, proba, multi_class="ovr", average="macro")
    )
    assert m["log_loss"] == pytest.approx(log_loss(y_idx, proba, labels=range(6)))
    recalls = recall_score(y_idx, pred, average=None, labels=range(6))
    assert m["per_class_recall"] == pytest.approx(dict(zip(classes.tolist(), recalls)))
    assert m["confusion_matrix"] == confusion_matrix(y_idx, pred, labels=range(6)).tolist()
    assert m["classes"] == classes.tolist()
    assert 0.0 < m["top1"] < m["top5"] <= 1.0
    assert _plain(m)
    json.dumps(m)


def test_binary_roc_auc_uses_the_positive_column():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60) * 5 + 3  # labels 3 and 8
    proba = _random_proba(60, 2, 3)
    m = classification_metrics(y, proba, [3, 8])
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y == 8, proba[:, 1]))
    assert "top5" not in m
    assert set(m["per_class_recall"]) == {"3", "8"}
    assert m["log_loss"] == pytest.approx(log_loss(y, proba, labels=[3, 8]))


def test_absent_class_gives_none_not_an_exception():
    proba = _random_proba(40, 4, 4)
    y = np.array([0, 1, 2] * 13 + [0])  # class 3 never occurs
    m = classification_metrics(y, proba, [0, 1, 2, 3])
    assert m["roc_auc"] is None
    assert m["per_class_recall"]["3"] is None
    assert m["per_class_recall"]["0"] is not None
    pred = proba.argmax(axis=1)
    with pytest.warns(UserWarning):  # scikit-learn warns about the class absent from y_true
        ref = balanced_accuracy_score(y, pred)
    assert m["balanced_accuracy"] == pytest.approx(ref)
    assert m["log_loss"] == pytest.approx(log_loss(y, proba, labels=[0, 1, 2, 3]))
    assert sum(map(sum, m["confusion_matrix"])) == 40
    assert _plain(m)

    binary = classification_metrics([1, 1, 1], _random_proba(3, 2, 5), [0, 1])
    assert binary["roc_auc"] is None


def test_log_loss_is_clipped_and_finite():
    proba = np.array([[1.0, 0.0], [0.0, 1.0]])
    m = classification_metrics([1, 1], proba, [0, 1])
    assert np.isfinite(m["log_loss"]) and m["log_loss"] > 10
    assert m["top1"] == 0.5


def test_bad_inputs_raise_config_error():
    proba = _random_proba(3, 3, 0)
    with pytest.raises(
        ConfigError, match=r"y_true holds label\(s\) \['z'\] that are not in classes"
    ):
        classification_metrics(["a", "b", "z"], proba, ["a", "b", "c"])
    with pytest.raises(
        ConfigError, match=r"proba must have shape \(n_samples, n_classes\) = \(3, 2\)"
    ):
        classification_metrics(["a", "b", "a"], proba, ["a", "b"])
    with pytest.raises(ConfigError, match="finite non-negative"):
        classification_metrics([0, 1, 2], -proba, [0, 1, 2])


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(2, 7),
    seed=st.integers(0, 10_000),
)
def test_metric_invariants(n, k, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    proba = _random_proba(n, k, seed)
    m = classification_metrics(y, proba, list(range(k)))
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (k, k) and cm.sum() == n
    assert np.array_equal(cm.sum(axis=1), np.bincount(y, minlength=k))
    assert m["top1"] == pytest.approx(np.trace(cm) / n)
    assert 0.0 <= m["balanced_accuracy"] <= 1.0 and 0.0 <= m["macro_f1"] <= 1.0
    assert m["log_loss"] >= 0.0
    assert (m["roc_auc"] is None) == (len(np.unique(y)) < k)
    assert ("top5" in m) == (k >= 5)
    assert _plain(m)


def test_format_metrics_table():
    proba = _random_proba(50, 6, 7)
    y = np.arange(50) % 6
    val = classification_metrics(y, proba, list(range(6)))
    test = classification_metrics(y[:5], proba[:5], list(range(6)))  # roc_auc is None
    table = format_metrics_table({"val": val, "test": test})
    lines = table.split("\n")
    assert len(lines) == 5  # each split's row, then its 95% intervals
    assert lines[0].split() == [
        "split",
        "n",
        "top1",
        "top5",
        "bal_acc",
        "macro_f1",
        "roc_auc",
        "log_loss",
    ]
    assert lines[1].split()[:3] == ["val", "50", f"{val['top1']:.4f}"]
    lo, hi = val["top1_ci"]
    assert lines[2].split()[:3] == ["95%", "CI", f"{lo:.3f}-{hi:.3f}"] and lo < val["top1"] < hi
    assert lines[3].split()[6] == "-"
    assert lines[4].split()[2:] == [f"{test[k][0]:.3f}-{test[k][1]:.3f}" for k in
                                    ("top1_ci", "balanced_accuracy_ci", "macro_f1_ci", "log_loss_ci")]
    assert len({len(line) for line in lines}) == 1, "columns must be aligned"
    # Without any >= 5-class split there is no top5 column.
    small = classification_metrics([0, 1], _random_proba(2, 2, 0), [0, 1])
    assert "top5" not in format_metrics_table({"train": small}).split("\n")[0].split()
