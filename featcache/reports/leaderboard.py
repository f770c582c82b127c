"""The benchmark leaderboard: records grouped by (backbone, layer, source, head, shots), ranked by
mean top-1 on a held-out split (test when there is one), as rows, Markdown and CSV."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..common.files import atomic_write
from .html import fmt, shots_label

#: Keys of a leaderboard row, in column order.
LEADERBOARD_KEYS = ("backbone", "layer", "source", "head", "shots", "split", "held_out", "n", "top1_mean",
                    "top1_ci_low", "top1_ci_high", "top1_std", "runs", "diff_vs_best", "diff_ci_low", "diff_ci_high",
                    "p_vs_best", "tied_with_best")


def _hashable(v: Any) -> Any:
    try:
        hash(v)
        return v
    except TypeError:
        return json.dumps(v, sort_keys=True, default=str)


def score(rec: dict, split: str, metric: str = "top1") -> float | None:
    m = (rec.get("metrics") or {}).get(split)
    v = m.get(metric) if isinstance(m, dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def selection_split(rec: dict) -> str | None:
    """The split a record's sweep chose its value on (``best.scored_on``): its scores there are not held out."""
    best = rec.get("best")
    return best.get("scored_on") if isinstance(best, dict) else None


def board_split(records: Iterable[dict]) -> tuple[str, bool]:
    """The split a leaderboard ranks on, and whether it is held out.

    ``test`` when some record has a held-out test score; else the held-out split most records
    have (``val`` when the sweep chose by k-fold on train); else, when every scored split is the one
    the sweep selected on, that split, with ``False``: its scores are optimistic.
    """
    records = list(records)
    held = Counter(s for r in records for s in (r.get("metrics") or {})
                   if s != selection_split(r) and score(r, s) is not None)
    if held.get("test"):
        return "test", True
    if held:
        return held.most_common(1)[0][0], True
    scored = Counter(s for r in records for s in (r.get("metrics") or {}) if score(r, s) is not None)
    return (scored.most_common(1)[0][0] if scored else "val"), False


def _run_predictions(rec: dict) -> dict:
    """The per-row predictions saved in a record's run folder ({} when there are none)."""
    from ..runs.saved import load_predictions

    run = rec.get("run")
    return load_predictions(run) if isinstance(run, str) and run and os.path.isdir(run) else {}


def _cell_rows(recs: list[dict], split: str, predictions: Callable[[dict], dict]) -> tuple | None:
    """(labels, predictions of shape (n_seeds, n), rows digest) of a cell on ``split``, when every record of
    the cell saved them for the same rows; else None."""
    saved = [(predictions(r) or {}).get(split) for r in recs]
    if not saved or any(s is None for s in saved) or len({s["digest"] for s in saved}) != 1:
        return None
    if any(len(s["y"]) != len(saved[0]["y"]) or not np.array_equal(s["y"], saved[0]["y"]) for s in saved):
        return None
    return saved[0]["y"], np.stack([s["pred"] for s in saved]), saved[0]["digest"]


def leaderboard(records: Iterable[dict], *, split: str | None = None,
                predictions: Callable[[dict], dict] | None = None) -> list[dict]:
    """Mean top-1 accuracy per benchmark cell with its 95% interval, best first, each row compared
    with the best one.

    Parameters
    ----------
    records : iterable of dict
        Benchmark records (lines of ``records.jsonl``, ``run`` paths resolved: :func:`featcache.runs.bench.read_records`).
    split : str, optional
        Split whose ``top1`` is averaged; default :func:`board_split` (test when there is one).
    predictions : callable, optional
        ``record -> {split: {"y", "pred", "digest"}}``; default: the ``predictions.safetensors``
        of the record's run folder (:func:`featcache.runs.saved.load_predictions`).

    Returns
    -------
    list of dict
        One row per (backbone, layer, source, head, shots), with those keys and ``split``,
        ``held_out`` (False when ``split`` is the one the sweeps selected on), ``n`` (rows of the
        split), ``top1_mean``, ``top1_ci`` ([low, high]: the stratified bootstrap interval of the
        mean over seeds, or None), ``top1_std`` (population standard deviation over seeds), ``runs``
        (records of the cell), and the comparison with the first row on the same rows:
        ``diff_vs_best`` (top-1 minus the best's), ``diff_ci``, ``p_vs_best`` (McNemar's exact test
        when both cells are one run each, else None: a paired bootstrap), ``tied_with_best`` (not
        distinguishable at 95%; None for the best row and rows not scored on the same rows).
        ``shots`` 0 means all training data. Sorted by ``top1_mean``, highest first; cells with
        no score on ``split`` (mean and std None) come last.
    """
    from ..metrics.intervals import paired_difference, prediction_intervals

    records = list(records)
    predictions = predictions or _run_predictions
    if split is None:
        split, held_out = board_split(records)
    else:
        held_out = not any(selection_split(r) == split for r in records if score(r, split) is not None)
    cells: dict[tuple, list] = defaultdict(list)
    for r in records:
        key = (_hashable(r.get("backbone")), _hashable(r.get("layer")), _hashable(r.get("source")),
               _hashable(r.get("head")), int(r.get("shots") or 0))
        cells[key].append(r)
    rows, paired = [], []
    for (backbone, layer, source, head, shots), recs in cells.items():
        vals = [v for v in (score(r, split) for r in recs) if v is not None]
        own = _cell_rows(recs, split, predictions) if vals else None
        ns = [m.get("n") for r in recs if isinstance(m := (r.get("metrics") or {}).get(split), dict)]
        ci = None
        if own is not None:
            ci = prediction_intervals(own[0], own[1])["top1_ci"]
        elif len(recs) == 1 and vals:
            ci = ((recs[0].get("metrics") or {}).get(split) or {}).get("top1_ci")
        rows.append({"backbone": backbone, "layer": layer, "source": source, "head": head, "shots": shots,
                     "split": split, "held_out": held_out, "n": max((n for n in ns if isinstance(n, int)), default=None),
                     "top1_mean": float(np.mean(vals)) if vals else None, "top1_ci": ci,
                     "top1_std": float(np.std(vals)) if vals else None, "runs": len(recs),
                     "diff_vs_best": None, "diff_ci": None, "p_vs_best": None, "tied_with_best": None})
        paired.append(own)
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["top1_mean"] is None, -(rows[i]["top1_mean"] or 0.0),
                   *(str(rows[i][k]) for k in ("backbone", "layer", "source", "head")), rows[i]["shots"]))
    rows, paired = [rows[i] for i in order], [paired[i] for i in order]
    best = paired[0] if paired else None
    for row, own in zip(rows[1:], paired[1:]):
        if best is None or own is None or own[2] != best[2]:
            continue  # not scored on the best row's rows: nothing to pair
        y = best[0]
        c = paired_difference(y, own[1] == own[0], best[1] == y)
        row.update(diff_vs_best=c["diff"], diff_ci=c["diff_ci"], p_vs_best=c["p_value"],
                   tied_with_best=not c["distinguishable"])
    return rows


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def vs_best(i: int, r: dict) -> str:
    """The comparison cell: "#1", "tied with #1 (...)", "-5.3 points (...)", or "–" when not paired."""
    if i == 1:
        return "#1" if r["top1_mean"] is not None else "–"
    if r["tied_with_best"] is None:
        return "–"
    test = (f"p {r['p_vs_best']:.3f}" if r["p_vs_best"] is not None
            else f"[{100 * r['diff_ci'][0]:+.1f}, {100 * r['diff_ci'][1]:+.1f}]")
    text = f"{100 * r['diff_vs_best']:+.1f} points, {test}"
    return f"tied with #1 ({text})" if r["tied_with_best"] else text


def leaderboard_markdown(rows: Sequence[dict]) -> str:
    """The leaderboard as a GitHub-flavoured Markdown table (ends with a newline).

    Parameters
    ----------
    rows : sequence of dict
        :func:`leaderboard` output.

    Returns
    -------
    str
        Columns rank, backbone, layer, source, head, shots ("all" for 0), top-1 mean, its 95%
        interval, std, runs and the comparison with #1 ("tied with #1" when not distinguishable at
        95%); the top-1 header names the split. Under the table: what the split can resolve, and
        when that split is the one the sweeps selected on (no test split), that its scores are not
        held out.
    """
    from ..metrics.intervals import detectable_difference_line

    split = rows[0]["split"] if rows else "test"
    lines = [f"| # | backbone | layer | source | head | shots | top-1 on {_md_cell(split)} (mean) | 95% CI | std | runs "
             f"| vs #1 |",
             "|--:|---|---|---|---|--:|--:|--:|--:|--:|---|"]
    for i, r in enumerate(rows, 1):
        ci = r.get("top1_ci")
        cells = [i, r["backbone"], r["layer"], r["source"], r["head"], shots_label(r["shots"]),
                 fmt(r["top1_mean"]), f"{ci[0]:.4f}–{ci[1]:.4f}" if ci else "–", fmt(r["top1_std"]), r["runs"],
                 vs_best(i, r)]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    if not rows:
        lines.append("\n_No runs yet._")
        return "\n".join(lines) + "\n"
    if rows[0]["n"] and rows[0]["top1_mean"] is not None:
        lines.append(f"\n_On {_md_cell(split)}: {detectable_difference_line(rows[0]['n'], rows[0]['top1_mean'], split)}. "
                     f"\"tied with #1\": not distinguishable from the best row at 95% (McNemar's exact test for one run "
                     f"each, else a paired bootstrap over the same rows)._")
    if not rows[0]["held_out"]:
        lines.append(f"\n_No test split: top-1 is on {_md_cell(split)}, the split each sweep selected its value on, "
                     f"so it is optimistic, not held out. Add a test split to rank on held-out data._")
    return "\n".join(lines) + "\n"


def leaderboard_csv(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write the leaderboard as CSV (header = :data:`LEADERBOARD_KEYS`; None as an empty cell).

    ``shots`` stays an integer, 0 meaning all training data. Written atomically; returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LEADERBOARD_KEYS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                flat = {**r, **{f"{key}_{end}": (r.get(key) or [None, None])[j]
                                for key in ("top1_ci", "diff_ci") for j, end in enumerate(("low", "high"))}}
                w.writerow({k: "" if flat.get(k) is None else flat.get(k) for k in LEADERBOARD_KEYS})

    atomic_write(path, write)
    return path


__all__ = ["LEADERBOARD_KEYS", "board_split", "leaderboard", "leaderboard_csv", "leaderboard_markdown", "score", "vs_best",
           "selection_split"]
