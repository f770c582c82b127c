"""probe-layers' recommendation agrees with its own table (issue 15)."""

from __future__ import annotations

import re

import pytest

from featcache.runs.probe import recommend


def _curve(*tops):
    names = [f"stage{i + 1}" for i in range(len(tops) - 1)] + ["pre_logits"]
    return [{"name": n, "top1": t} for n, t in zip(names, tops)]


def _points(reason: str) -> list[float]:
    return [float(x) for x in re.findall(r"([\d.]+) points", reason)]


def test_final_features_5_points_behind_are_not_within_half_a_point():
    """The reported case: pre_logits 0.950 against stage7 1.000 was called 'within 0.5 points'."""
    rec = recommend(_curve(0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 0.95))
    assert "within" not in rec["reason"]
    assert rec["freeze_until"] == "stage7" and rec["fine_tune"] == []
    assert rec["strategy"] == "linear-probe" and rec["probe_layer"] == "stage7"
    assert rec["gap_points"] == pytest.approx(5.0)
    assert _points(rec["reason"]) == [5.0]
    assert "tolerance of 0.5" in rec["reason"] and "fit-head --layer stage7" in rec["reason"]


@pytest.mark.parametrize("last, within", [(0.996, True), (0.995, True), (0.994, False), (0.95, False)])
def test_within_tolerance_compares_fractions_with_fractions(last, within):
    rec = recommend(_curve(0.6, 1.0, last), tolerance=0.005)
    assert rec["probe_layer"] == ("pre_logits" if within else "stage2")
    assert ("within 0.5 points" in rec["reason"]) == within
    assert rec["gap_points"] == pytest.approx((1.0 - last) * 100)


def test_a_middle_stage_far_ahead_asks_for_fine_tuning():
    rec = recommend(_curve(0.60, 0.88, 0.80, 0.78))
    assert rec["strategy"] == "partial-fine-tune" and rec["probe_layer"] == "stage2"
    assert _points(rec["reason"])[0] == pytest.approx(10.0)
