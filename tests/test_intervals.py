"""Bootstrap intervals of the held-out metrics, paired comparisons and the detectable difference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from featcache.metrics.intervals import (
    _auc_placements,
    bootstrap_intervals,
    detectable_difference,
    detectable_difference_line,
    mcnemar_exact,
    paired_difference,
)
from featcache.metrics.scores import classification_metrics, split_metrics


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
    from conftest import make_three_class_cache

    return make_three_class_cache(tmp_path_factory.mktemp("ci"), per_class=6)


def test_fit_head_reports_intervals_in_json_table_and_metrics_json_and_saves_its_predictions(cache3, tmp_path):
    from featcache.cli import main
    from featcache.runs.saved import load_predictions

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


def _bench_records(accuracies, n=150, seeds=1, digest="rows-1"):
    """Records of one cell per accuracy (and its saved predictions): each row right with that accuracy."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], n // 3)
    records, saved = [], {}
    base = rng.random(n)
    for i, acc in enumerate(accuracies):
        for seed in range(seeds):
            right = base < acc  # nested: a better cell is right wherever a worse one is
            pred = np.where(right, y, (y + 1) % 3)
            run = f"runs/{i}-{seed}"
            saved[run] = {"test": {"y": y, "pred": pred, "digest": digest}}
            records.append({"backbone": f"b{i}", "layer": "pre_logits", "source": "s", "head": "logreg", "shots": 0,
                            "seed": seed, "run": run, "best": {"scored_on": "val"},
                            "metrics": {"test": {"n": n, "top1": float(right.mean())}, "val": {"n": 30, "top1": 1.0}}})
    return records, lambda rec: saved[rec["run"]]


def test_the_leaderboard_pairs_every_row_with_the_best_and_marks_ties(tmp_path):
    import csv

    from featcache.reports.leaderboard import leaderboard, leaderboard_csv, leaderboard_markdown

    records, saved = _bench_records([0.90, 0.87, 0.60])
    rows = leaderboard(records, predictions=saved)
    assert [r["backbone"] for r in rows] == ["b0", "b1", "b2"] and rows[0]["split"] == "test"
    assert rows[0]["tied_with_best"] is None and rows[1]["tied_with_best"] is True and rows[2]["tied_with_best"] is False
    assert rows[1]["p_vs_best"] > 0.05 > rows[2]["p_vs_best"] and rows[1]["diff_vs_best"] < 0
    for r in rows:
        assert r["top1_ci"][0] <= r["top1_mean"] <= r["top1_ci"][1]
    md = leaderboard_markdown(rows)
    lines = md.splitlines()
    assert "| 95% CI |" in lines[0] and lines[0].endswith("| vs #1 |")
    assert "| #1 |" in lines[2] and "| tied with #1 (" in lines[3] and "tied" not in lines[4]
    assert "with 150 test images, differences under 4.0 points are not resolved" in md
    back = list(csv.DictReader(open(leaderboard_csv(rows, tmp_path / "lb.csv"))))
    assert [b["tied_with_best"] for b in back] == ["", "True", "False"]
    assert float(back[1]["top1_ci_low"]) == pytest.approx(rows[1]["top1_ci"][0])
    # Seeds: the pooled interval and a paired bootstrap; rows on other rows are not compared.
    records, saved = _bench_records([0.90, 0.60], seeds=2)
    rows = leaderboard(records, predictions=saved)
    assert rows[1]["runs"] == 2 and rows[1]["p_vs_best"] is None and rows[1]["tied_with_best"] is False
    other, saved_other = _bench_records([0.5], digest="rows-2")
    other[0]["backbone"] = "elsewhere"
    both = {**{r["run"]: saved(r) for r in records}, "runs/x": saved_other(other[0])}
    other[0]["run"] = "runs/x"
    rows = leaderboard(records + other, predictions=lambda rec: both[rec["run"]])
    assert rows[-1]["backbone"] == "elsewhere" and rows[-1]["tied_with_best"] is None


def test_bench_writes_intervals_ties_and_the_detectable_difference(tmp_path):
    from conftest import make_image_folder
    from featcache.runs.bench import BenchConfig, run_bench
    from featcache.cli import main

    folder = make_image_folder(tmp_path / "imgs", per_class=6, splits=("train", "val", "test"))
    args = ["bench", "--backbones", "resnet18.none", "--sources", str(folder), "--heads", "ncm,knn", "--input-size",
            "32", "--workers", "0", "--cache-dir", str(tmp_path / "c"), "-o", str(tmp_path / "out")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "with 12 test images, differences under 50.0 points are not resolved" in r.output
    md = (tmp_path / "out" / "leaderboard.md").read_text().splitlines()
    assert "| #1 |" in md[2] and ("tied with #1" in md[3] or "points, p " in md[3])
    assert (tmp_path / "out" / "leaderboard.png").is_file()
    r = CliRunner().invoke(main, [*args, "--json", "--skip-existing"])
    rows = json.loads(r.stdout)["leaderboard"]
    assert rows[0]["top1_ci"] and rows[1]["tied_with_best"] is not None
    r = CliRunner().invoke(main, ["report", str(tmp_path / "out"), "-o", str(tmp_path / "b.html")])
    html = (tmp_path / "b.html").read_text()
    assert r.exit_code == 0 and "95% CI" in html and "vs #1" in html and "leaderboard intervals" in html


def test_evaluate_and_the_run_report_show_intervals_and_class_counts(cache3, tmp_path):
    from featcache.cli import main

    runner = CliRunner()
    assert runner.invoke(main, ["fit-head", cache3, "--head", "ncm", "-o", str(tmp_path / "run")]).exit_code == 0
    r = runner.invoke(main, ["evaluate", str(tmp_path / "run"), cache3])
    assert r.exit_code == 0 and r.output.count("  95% CI") == 3  # train, val, test of the other cache
    r = runner.invoke(main, ["evaluate", str(tmp_path / "run"), cache3, "--json"])
    assert all(len(m["top1_ci"]) == 2 for m in json.loads(r.output)["metrics"].values())
    r = runner.invoke(main, ["report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html")])
    html = (tmp_path / "r.html").read_text()
    assert r.exit_code == 0 and "its 95% interval" in html and '<span class="ci">' in html
    test = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["test"]
    assert f'({test["per_class_correct"]["a"]}/6)' in html
