"""The benchmark leaderboard: records grouped by (backbone, layer, source, head, shots), ranked by
mean top-1, as rows, Markdown and CSV."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .files import atomic_write
from .html_page import fmt, shots_label

#: Keys of a leaderboard row, in column order.
LEADERBOARD_KEYS = ("backbone", "layer", "source", "head", "shots", "top1_mean", "top1_std", "runs")


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


def leaderboard(records: Iterable[dict], *, split: str = "val") -> list[dict]:
    """Mean and standard deviation of top-1 accuracy per benchmark cell, best first.

    Parameters
    ----------
    records : iterable of dict
        Benchmark records (lines of ``records.jsonl``).
    split : str, default "val"
        Split whose ``top1`` is averaged.

    Returns
    -------
    list of dict
        One row per (backbone, layer, source, head, shots), with those keys and ``top1_mean``,
        ``top1_std`` (population standard deviation over seeds), ``runs`` (records of the cell).
        ``shots`` 0 means all training data. Sorted by ``top1_mean``, highest first; cells with
        no score on ``split`` (mean and std None) come last.
    """
    cells: dict[tuple, list] = defaultdict(list)
    for r in records:
        key = (_hashable(r.get("backbone")), _hashable(r.get("layer")), _hashable(r.get("source")),
               _hashable(r.get("head")), int(r.get("shots") or 0))
        cells[key].append(score(r, split))
    rows = []
    for (backbone, layer, source, head, shots), scores in cells.items():
        vals = [s for s in scores if s is not None]
        rows.append({"backbone": backbone, "layer": layer, "source": source, "head": head, "shots": shots,
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
        Columns rank, backbone, layer, source, head, shots ("all" for 0), top-1 mean, std, runs.
    """
    lines = ["| # | backbone | layer | source | head | shots | top-1 (mean) | std | runs |",
             "|--:|---|---|---|---|--:|--:|--:|--:|"]
    for i, r in enumerate(rows, 1):
        cells = [i, r["backbone"], r["layer"], r["source"], r["head"], shots_label(r["shots"]),
                 fmt(r["top1_mean"]), fmt(r["top1_std"]), r["runs"]]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    if not rows:
        lines.append("\n_No runs yet._")
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


__all__ = ["LEADERBOARD_KEYS", "leaderboard", "leaderboard_csv", "leaderboard_markdown", "score"]
