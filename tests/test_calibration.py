"""Temperature calibration fitted on the eval split: ECE before / after in ``best.calibration``, and
the calibrated probabilities in the metrics, ``Run.predict_proba``, predict and export."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss

from conftest import make_three_class_cache
from featcache import open_cache
from featcache.metrics.calibration import (apply_temperature, calibrate, expected_calibration_error, fit_temperature,
                                           held_out_check)
from featcache.runs.fit import fit_head
from featcache.metrics.scores import expand_proba
from featcache.runs.saved import evaluate, load_run


def _overconfident(n=600, seed=0):
    """Labels drawn from p, reported as p sharpened (p ** 3): an overconfident model."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 3))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    return apply_temperature(p, 1 / 3), y


def test_temperature_undoes_overconfidence():
    q, y = _overconfident()
    t = fit_temperature(q, y)
    assert t == pytest.approx(3.0, rel=0.25)
    assert expected_calibration_error(apply_temperature(q, t), y) < expected_calibration_error(q, y) / 2
    assert np.array_equal(apply_temperature(q, t).argmax(1), q.argmax(1))  # accuracy unchanged
    np.testing.assert_allclose(apply_temperature(q, 1.0), q)


def test_a_separated_eval_split_keeps_the_probabilities():
    # Every row right: the log-loss falls as T -> 0, so T would sit at its lower bound, or short of it
    # where the log-loss flattens (T ~ 0.07 at confidence 0.9). Keep 1.
    y = np.array([0, 1, 2] * 20)
    for right in (0.6, 0.9):
        p = np.full((60, 3), (1 - right) / 2)
        p[np.arange(60), y] = right
        assert fit_temperature(p, y) == 1.0


def test_a_temperature_that_helps_held_out_is_kept():
    q, y = _overconfident()
    check = held_out_check(q, y)
    assert check["folds"] == 5 and check["log_loss"]["after"] < check["log_loss"]["before"]
    cal = calibrate(lambda s: (q, y), "val", ["val"])
    assert "skipped" not in cal and cal["temperature"] == pytest.approx(3.0, rel=0.25)


def test_a_temperature_fitted_on_a_few_confident_errors_is_skipped():
    # 30 val rows right at confidence 0.95 but two confident errors: on the whole split T = 1.26
    # lowers the log-loss, but held out it raises it (a fold without the errors fits T = 1, a fold
    # with them softens every right row of the others). The default must do no harm: T stays 1.
    y = np.array([0, 1, 2] * 10)
    p = np.full((30, 3), 0.025)
    p[np.arange(30), y] = 0.95
    p[:2] = 0.005
    p[[0, 1], [1, 2]] = 0.99
    assert fit_temperature(p, y) > 1.2
    cal = calibrate(lambda s: (p, y), "val", ["val", "test"])
    assert cal["temperature"] == 1.0 and cal["fitted"] > 1.0
    assert cal["skipped"].startswith("calibration skipped: T=")
    assert "did not help the held-out fold" in cal["skipped"]
    assert cal["ece"]["test"]["after"] == cal["ece"]["test"]["before"]
    assert calibrate(lambda s: (p[:4], y[:4]), "val", ["val"])["skipped"].startswith(
        "calibration skipped: a class of val has a single row")


def test_ece_of_a_confident_and_right_model_is_zero():
    y = np.array([0, 1, 1, 0])
    assert expected_calibration_error(np.eye(2)[y], y) == 0.0
    assert expected_calibration_error(np.full((4, 2), 0.5), y) == pytest.approx(0.0)
    assert expected_calibration_error(np.eye(2)[1 - y], y) == 1.0


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_three_class_cache(tmp_path_factory.mktemp("cal"), per_class=8)


def test_an_eval_split_without_errors_keeps_the_probabilities(cache, tmp_path):
    # Every head separates this tiny val split: a temperature would only sharpen (T -> 0). None is kept.
    res = fit_head(cache, head="logreg", grid=(1e4,), output=str(tmp_path / "r"))
    cal = res.best["calibration"]
    assert res.metrics["val"]["top1"] == 1.0 and cal["temperature"] == 1.0
    assert cal["skipped"].startswith("calibration skipped: the log-loss of val (24 rows) has no minimum")
    assert cal["ece"]["test"]["after"] == cal["ece"]["test"]["before"] and load_run(res.run).temperature == 1.0


def test_fit_head_saves_and_applies_the_temperature(cache, tmp_path, monkeypatch):
    # The fit and the held-out check are tested above; here they say T = 2 helps, so that the
    # temperature is saved and applied in the metrics, predict_proba and evaluate.
    helps = {"folds": 5, "log_loss": {"before": 1.0, "after": 0.5}, "ece": {"before": 0.2, "after": 0.1}}
    monkeypatch.setattr("featcache.metrics.calibration.fit_temperature", lambda p, y: 2.0)
    monkeypatch.setattr("featcache.metrics.calibration.held_out_check", lambda p, y: helps)
    res = fit_head(cache, head="logreg", grid=(1e4,), output=str(tmp_path / "r"))
    cal = res.best["calibration"]
    assert cal["fitted_on"] == "val" and set(cal["ece"]) == {"val", "test"}
    assert cal["temperature"] == 2.0 and "skipped" not in cal and cal["check"] == helps
    run = load_run(res.run)
    assert run.temperature == 2.0
    with open_cache(cache) as c:
        X, y = c.load("val")
    raw = expand_proba(run.head.predict_proba(run.transform.transform(X)), run.head.classes_, 3)
    calibrated = run.predict_proba(X)
    np.testing.assert_allclose(calibrated, apply_temperature(raw, 2.0), atol=1e-9)
    assert not np.allclose(calibrated, raw)
    assert res.metrics["val"]["log_loss"] == pytest.approx(log_loss(y, calibrated, labels=[0, 1, 2]), rel=1e-6)
    assert evaluate(res.run, cache)["test"]["log_loss"] == pytest.approx(res.metrics["test"]["log_loss"])


def test_no_calibration_without_an_eval_split_or_after_a_refit(cache, tmp_path):
    kfold = fit_head(cache, head="ridge", eval_split="none", output=str(tmp_path / "k"))
    assert "calibration" not in kfold.best and load_run(kfold.run).temperature == 1.0
    refit = fit_head(cache, head="logreg", refit_on_trainval=True, output=str(tmp_path / "t"))
    assert "calibration" not in refit.best
