"""Bootstrap intervals of the held-out metrics, paired comparisons and the detectable difference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from featcache.intervals import (
    _auc_placements,
    bootstrap_intervals,
    detectable_difference,
    detectable_difference_line,
    mcnemar_exact,
    paired_difference,
)
from featcache.metrics import classification_metrics, split_metrics


def _predictions(n, k, acc, rng):
    """Rows stratified over k classes, each right with probability ``acc``; confident probabilities."""
    y = np.repeat(np.arange(k), n // k)
    right = rng.random(len(y)) < acc
    pred = np.where(right, y, (y + 1 + rng.integers(0, k - 1, len(y))) % k)
    p = np.full((len(y), k), 0.02)
    p[np.arange(len(y)), pred] = 1.0
    p += rng.random(p.shape) * 0.05
    return y, p / p.sum(axis=1, keepdims=True)


def test_every_held_out_metric_gets_a_seeded_interval_around_its_value():
    rng = np.random.default_rng(0)
    y, p = _predictions(120, 4, 0.8, rng)
    m = classification_metrics(y, p, np.arange(4))
    for key in ("top1", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss"):
        lo, hi = m[f"{key}_ci"]
        assert lo <= m[key] <= hi and lo < hi, key
    assert m["ci"] == {"level": 0.95, "resamples": 1000, "seed": 0, "method": "percentile bootstrap, stratified by class"}
    assert classification_metrics(y, p, np.arange(4))["top1_ci"] == m["top1_ci"]  # seeded
    assert classification_metrics(y, p, np.arange(4), seed=1)["log_loss_ci"] != m["log_loss_ci"]
    assert "top1_ci" not in classification_metrics(y, p, np.arange(4), resamples=0)
    # A class absent from the rows: no ROC-AUC, so no interval.
    assert classification_metrics(y[y < 3], p[y < 3], np.arange(4))["roc_auc_ci"] is None


@pytest.mark.parametrize("k", [2, 5])
def test_the_auc_placements_reproduce_scikit_learns_auc(k):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 200)
    p = np.exp(rng.integers(0, 3, (200, k)) + np.eye(k)[y])  # few distinct scores: ties count half
    p /= p.sum(axis=1, keepdims=True)
    a, auc = _auc_placements(y, p)
    ref = roc_auc_score(y, p[:, 1]) if k == 2 else roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert auc == pytest.approx(ref) and a.sum() == pytest.approx(2 * ref)


def test_top1_intervals_cover_the_true_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(3)
    covered = [lo <= 0.85 <= hi for lo, hi in
               (bootstrap_intervals(*_predictions(100, 5, 0.85, rng), resamples=400, seed=t)["top1_ci"]
                for t in range(200))]
    assert 0.88 <= np.mean(covered) <= 0.99


def test_the_pooled_interval_of_identical_seeds_is_the_single_interval_and_narrower_for_agreeing_seeds():
    rng = np.random.default_rng(1)
    y, p = _predictions(90, 3, 0.7, rng)
    assert bootstrap_intervals(y, [p, p]) == bootstrap_intervals(y, p)
    _, q = _predictions(90, 3, 0.7, np.random.default_rng(2))
    pooled = bootstrap_intervals(y, [p, q])["top1_ci"]
    single = [bootstrap_intervals(y, s)["top1_ci"] for s in (p, q)]
    assert pooled[1] - pooled[0] < max(hi - lo for lo, hi in single)


def test_per_class_results_keep_their_counts():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.eye(3)[[0, 0, 1, 1, 0, 2]] * 0.9 + 0.05
    m = split_metrics(y, p, ["ant", "bee", "wasp"])
    assert m["per_class_n"] == {"ant": 3, "bee": 2, "wasp": 1}
    assert m["per_class_correct"] == {"ant": 2, "bee": 1, "wasp": 1}


def test_paired_comparisons_use_mcnemar_for_one_prediction_each_and_the_bootstrap_for_seeds():
    assert mcnemar_exact(5, 0) == pytest.approx(0.0625) and mcnemar_exact(6, 0) == pytest.approx(0.03125)
    assert mcnemar_exact(0, 0) == 1.0
    y = np.repeat([0, 1], 75)
    a = np.ones(150, bool)
    b = a.copy()
    b[:5] = False  # A is right on 5 rows B gets wrong: 3.3 points, yet not resolved
    out = paired_difference(y, a, b)
    assert out["test"] == "mcnemar-exact" and out["diff"] == pytest.approx(5 / 150) and not out["distinguishable"]
    b[:30] = False
    assert paired_difference(y, a, b)["distinguishable"]
    seeds = paired_difference(y, np.stack([a, a]), np.stack([b, b]))
    assert seeds["test"] == "paired-bootstrap" and seeds["p_value"] is None and seeds["distinguishable"]
    lo, hi = seeds["diff_ci"]
    assert lo <= 30 / 150 <= hi


def test_the_detectable_difference_line():
    assert detectable_difference(150, 0.9)["points"] == pytest.approx(4.0)
    assert detectable_difference_line(150, 0.9, "test") == (
        "with 150 test images, differences under 4.0 points are not resolved (a paired test at 95% needs 6 more "
        "images right); one top-1 score's 95% interval is about ±4.8 points")


@pytest.fixture(scope="module")
def cache3(tmp_path_factory):
    from conftest import make_image_folder
    from featcache import extract

    root = tmp_path_factory.mktemp("ci")
    folder = make_image_folder(root / "imgs", classes=("a", "b", "c"), per_class=6, splits=("train", "val", "test"))
    return extract(str(folder), backbone="resnet18.none", input_size=32, num_workers=0,
                   cache_dir=str(root / "cache"), dtype="float32").cache


def test_fit_head_reports_intervals_in_json_table_and_metrics_json_and_saves_its_predictions(cache3, tmp_path):
    from featcache.cli import main
    from featcache.runs import load_predictions

    r = CliRunner().invoke(main, ["fit-head", cache3, "--head", "ncm", "-o", str(tmp_path / "run"), "--json"])
    assert r.exit_code == 0, r.output
    test = json.loads(r.output)["metrics"]["test"]
    for key in ("top1", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss"):
        assert len(test[f"{key}_ci"]) == 2 and test[f"{key}_ci"][0] <= test[key] <= test[f"{key}_ci"][1]
    assert test["per_class_n"] == {"a": 6, "b": 6, "c": 6}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["test"]
    assert saved["top1_ci"] == test["top1_ci"]
    rows = load_predictions(tmp_path / "run")
    assert set(rows) == {"val", "test"} and len(rows["test"]["y"]) == 18 and len(rows["test"]["digest"]) == 32
    assert (rows["test"]["pred"] == rows["test"]["y"]).mean() == pytest.approx(test["top1"])
    r = CliRunner().invoke(main, ["fit-head", cache3, "--head", "ncm", "-o", str(tmp_path / "run2")])
    lines = r.output.splitlines()
    ci_rows = [i for i, line in enumerate(lines) if line.startswith("  95% CI")]
    assert len(ci_rows) == 2 and [lines[i - 1].split()[0] for i in ci_rows] == ["val", "test"]
    assert (f"test: with 18 test images, differences under 33.3 points are not resolved (a paired test at 95% "
            f"needs 6 more images right)") in r.output


def test_few_shot_keeps_mean_and_sd_and_adds_the_pooled_interval(cache3, tmp_path):
    from featcache.cli import main

    r = CliRunner().invoke(main, ["fit-head", cache3, "--head", "ncm", "--shots", "2", "--seeds", "3",
                                  "-o", str(tmp_path / "run"), "--json"])
    assert r.exit_code == 0, r.output
    top1 = json.loads(r.output)["few_shot"]["summary"]["test"]["top1"]
    assert set(top1) == {"mean", "std", "ci"} and top1["ci"][0] <= top1["mean"] <= top1["ci"][1]
    r = CliRunner().invoke(main, ["fit-head", cache3, "--head", "ncm", "--shots", "2", "--seeds", "3",
                                  "-o", str(tmp_path / "run2")])
    assert f"2-shot over 3 seed(s), test top-1: {top1['mean']:.4f} +- {top1['std']:.4f} (pooled 95% CI " in r.output
