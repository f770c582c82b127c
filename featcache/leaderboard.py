"""The benchmark leaderboard: records grouped by (backbone, layer, source, head, shots), ranked by
mean top-1 on a held-out split (test when there is one), as rows, Markdown and CSV."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .files import atomic_write
from .html_page import fmt, shots_label

#: Keys of a leaderboard row, in column order.
LEADERBOARD_KEYS = ("backbone", "layer", "source", "head", "shots", "split", "held_out", "top1_mean", "top1_std",
                    "runs")


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


def leaderboard(records: Iterable[dict], *, split: str | None = None) -> list[dict]:
    """Mean and standard deviation of top-1 accuracy per benchmark cell, best first.

    Parameters
    ----------
    records : iterable of dict
        Benchmark records (lines of ``records.jsonl``).
    split : str, optional
        Split whose ``top1`` is averaged; default :func:`board_split` (test when there is one).

    Returns
    -------
    list of dict
        One row per (backbone, layer, source, head, shots), with those keys and ``split``,
        ``held_out`` (False when ``split`` is the one the sweeps selected on), ``top1_mean``,
        ``top1_std`` (population standard deviation over seeds), ``runs`` (records of the cell).
        ``shots`` 0 means all training data. Sorted by ``top1_mean``, highest first; cells with
        no score on ``split`` (mean and std None) come last.
    """
    records = list(records)
    if split is None:
        split, held_out = board_split(records)
    else:
        held_out = not any(selection_split(r) == split for r in records if score(r, split) is not None)
    cells: dict[tuple, list] = defaultdict(list)
    for r in records:
        key = (_hashable(r.get("backbone")), _hashable(r.get("layer")), _hashable(r.get("source")),
               _hashable(r.get("head")), int(r.get("shots") or 0))
        cells[key].append(score(r, split))
    rows = []
    for (backbone, layer, source, head, shots), scores in cells.items():
        vals = [s for s in scores if s is not None]
        rows.append({"backbone": backbone, "layer": layer, "source": source, "head": head, "shots": shots,
                     "split": split, "held_out": held_out,
                     "top1_mean": float(np.mean(vals)) if vals else None,
                     "top1_std": float(np.std(vals)) if vals else None, "runs": len(scores)})
    rows.sort(key=lambda r: (r["top1_mean"] is None, -(r["top1_mean"] or 0.0),
                             *(str(r[k]) for k in ("backbone", "layer", "source", "head")), r["shots"]))
    return rows


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def leaderboard_markdown(rows: Sequence[dict]) -> str:
    """The leaderboard as a GitHub-flavoured Markdown table (ends with a newline).

    Parameters
    ----------
    rows : sequence of dict
        :func:`leaderboard` output.

    Returns
    -------
    str
        Columns rank, backbone, layer, source, head, shots ("all" for 0), top-1 mean, std, runs;
        the top-1 header names the split, and a line under the table says when that split is the
        one the sweeps selected on (no test split): those scores are not held out.
    """
    split = rows[0]["split"] if rows else "test"
    lines = [f"| # | backbone | layer | source | head | shots | top-1 on {_md_cell(split)} (mean) | std | runs |",
             "|--:|---|---|---|---|--:|--:|--:|--:|"]
    for i, r in enumerate(rows, 1):
        cells = [i, r["backbone"], r["layer"], r["source"], r["head"], shots_label(r["shots"]),
                 fmt(r["top1_mean"]), fmt(r["top1_std"]), r["runs"]]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    if not rows:
        lines.append("\n_No runs yet._")
    elif not rows[0]["held_out"]:
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
                w.writerow({k: "" if r.get(k) is None else r.get(k) for k in LEADERBOARD_KEYS})

    atomic_write(path, write)
    return path


__all__ = ["LEADERBOARD_KEYS", "board_split", "leaderboard", "leaderboard_csv", "leaderboard_markdown", "score",
           "selection_split"]
