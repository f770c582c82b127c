"""PNG plots of runs, benchmarks and layer probes.

Figures are built with :class:`matplotlib.figure.Figure` and rendered by the Agg canvas
directly, never through ``pyplot``: nothing is registered in pyplot's global figure list, the
caller's backend (a notebook's inline one, say) is left alone, and no display is needed. Every
function writes one PNG atomically and returns its path.

A benchmark *record* (one line of ``records.jsonl``) is a dict with ``backbone``, ``weights``,
``layer``, ``source``, ``head``, ``shots`` (0 = all training data), ``seed``, ``metrics``
(``{split: {metric: value}}``), ``extract_seconds``, ``fit_seconds``, ``cache`` and
``featcache_version``.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..errors import ConfigError
from ..common.files import atomic_write

logger = logging.getLogger(__name__)

DPI = 110
_STYLE = {
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 10.5,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.framealpha": 0.9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "axes.axisbelow": True,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}
_METRIC_LABELS = {
    "top1": "top-1 accuracy",
    "top5": "top-5 accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "roc_auc": "ROC-AUC",
    "log_loss": "log-loss",
}
#: Above this many classes the confusion-matrix cells are too small to hold their counts.
MAX_ANNOTATED_CLASSES = 30


# --- helpers ---------------------------------------------------------------------------------


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    # rc_context restores the caller's rcParams on exit, whatever happens inside.
    with matplotlib.rc_context(_STYLE):
        yield


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    finally:
        fig.clear()
    return path


def _t(value: Any) -> str:
    """Data-derived text for a label: ``$`` would otherwise start mathtext (and can fail to parse)."""
    return str(value).replace("$", r"\$")


def _short(value: Any, n: int = 28) -> str:
    """Cut in the middle: class names and paths differ at their ends more than at their starts."""
    s = str(value)
    if len(s) <= n:
        return s
    head = (n - 1) // 2
    return s[:head] + "…" + s[len(s) - (n - 1 - head):]


def _metric_label(metric: str, split: str | None = None) -> str:
    label = _METRIC_LABELS.get(metric, metric)
    return f"{label} ({split})" if split else label


def _value(rec: dict, split: str, metric: str) -> float | None:
    v = (rec.get("metrics") or {}).get(split, {}) or {}
    v = v.get(metric) if isinstance(v, dict) else None
    if isinstance(v, dict):  # a few-shot summary {"mean", "std"}
        v = v.get("mean")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _unique(values: Iterable) -> list:
    out: list = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _shots(rec: dict) -> int:
    return int(rec.get("shots") or 0)


def _shots_label(s: int) -> str:
    return "all" if s == 0 else str(s)


def _require(records: list[dict], what: str) -> list[dict]:
    if not records:
        raise ConfigError(f"{what}() needs at least one record; got none. Run 'featcache bench' first.")
    return list(records)


def _no_data(fig, ax, message: str) -> None:
    logger.warning("%s", message)
    ax.set_axis_off()
    ax.text(0.5, 0.5, _t(message), ha="center", va="center", wrap=True, fontsize=11, color="#555",
            transform=ax.transAxes)


def _legend_below(fig, axes, handles=None) -> None:
    """One legend under the plot area, so it never hides a curve or a bar."""
    if handles is None:
        seen: dict = {}
        for ax in axes:
            for h, label in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(label, h)
        handles = list(seen.values())
    if not handles:
        return
    # Fewer columns until the legend fits the figure's width: long labels would otherwise be cut at its edges.
    renderer = fig.canvas.get_renderer()
    for ncols in range(min(4, len(handles)), 0, -1):
        legend = fig.legend(handles=handles, loc="outside lower center", ncols=ncols, frameon=False)
        if ncols == 1 or legend.get_window_extent(renderer).width <= fig.bbox.width * 0.98:
            return
        legend.remove()


def _grid_shape(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


# --- benchmark plots -------------------------------------------------------------------------


def _cell_ci(rows: list[dict] | None) -> dict:
    """Leaderboard rows -> {(backbone, layer, source, head, shots): (low, high)} of those with an interval."""
    return {(r.get("backbone"), r.get("layer"), r.get("source"), r.get("head"), int(r.get("shots") or 0)):
            tuple(r["top1_ci"]) for r in rows or [] if r.get("top1_ci")}


def shots_curve(records: list[dict], path: str | os.PathLike, *, metric: str = "top1",
                split: str = "val", rows: list[dict] | None = None) -> Path:
    """Accuracy against shots per class, one line per backbone (and head, when several).

    Parameters
    ----------
    records : list of dict
        Benchmark records (see the module docstring). Records with shots 0 ("all training
        data") are drawn at the right end, labelled "all".
    path : path-like
        PNG file to write.
    metric : str, default "top1"
        Key of ``record["metrics"][split]``.
    split : str, default "val"

    Returns
    -------
    Path
        ``path``. Each line is the mean over seeds, with a band of +-1 standard deviation. When
        a backbone was run on several layers, its line is its best layer (highest mean ``metric``
        over all shots), named in the legend. One subplot per source when there are several.
    """
    recs = [r for r in _require(records, "shots_curve") if _value(r, split, metric) is not None]
    cis = _cell_ci(rows)
    sources = _unique(r.get("source") for r in recs) or [None]
    several_heads = len(_unique(r.get("head") for r in recs)) > 1
    shots = sorted({_shots(r) for r in recs}, key=lambda s: (s == 0, s))
    xpos = {s: i for i, s in enumerate(shots)}
    keys = _unique((r.get("backbone"), r.get("head")) for r in recs)
    colours = {k: f"C{i % 10}" for i, k in enumerate(keys)}
    nrows, ncols = _grid_shape(len(sources))
    with _style():
        fig = _figure(max(6.4, 5.2 * ncols), 4.3 * nrows + 0.4)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
        for ax in axes[len(sources):]:
            ax.set_axis_off()
        if not recs:
            _no_data(fig, axes[0], f"No record has metrics['{split}']['{metric}'] to plot.")
        for ax, source in zip(axes, sources):
            if not recs:
                break
            sub = [r for r in recs if r.get("source") == source]
            by_key: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
            for r in sub:
                by_key[(r.get("backbone"), r.get("head"))][r.get("layer")][_shots(r)].append(
                    _value(r, split, metric))
            for key, by_layer in by_key.items():
                # One line per backbone: its best layer, so lines compare backbones, not depths.
                layer, pts = max(by_layer.items(),
                                 key=lambda kv: np.mean([v for vs in kv[1].values() for v in vs]))
                xs = sorted(pts, key=lambda s: xpos[s])
                mean = np.array([np.mean(pts[s]) for s in xs])
                std = np.array([np.std(pts[s]) for s in xs])
                x = np.array([xpos[s] for s in xs], dtype=float)
                label = _t(key[0]) + (f" · {_t(key[1])}" if several_heads else "")
                if len(by_layer) > 1:
                    label += f" ({_t(layer)})"
                c = colours[key]
                ax.plot(x, mean, "o-", color=c, lw=2, ms=5, label=label)
                ax.fill_between(x, mean - std, mean + std, color=c, alpha=0.18, lw=0)
                ci = [cis.get((key[0], layer, source, key[1], s)) for s in xs] if metric == "top1" else []
                at = [i for i, v in enumerate(ci) if v is not None]
                if at:
                    lo, hi = np.array([ci[i] for i in at]).T
                    ax.errorbar(x[at], mean[at], yerr=[np.maximum(mean[at] - lo, 0), np.maximum(hi - mean[at], 0)],
                                fmt="none", ecolor=c, elinewidth=1.2, capsize=3)
            ax.set_xticks(range(len(shots)), [_shots_label(s) for s in shots])
            ax.set_xlim(-0.3, len(shots) - 0.7)
            ax.set_xlabel("training images per class (shots)")
            ax.set_ylabel(_metric_label(metric, split))
            ax.yaxis.set_tick_params(labelleft=True)
            if len(sources) > 1:
                ax.set_title(_t(_short(source, 40)))
        _legend_below(fig, axes)
        title = f"{_METRIC_LABELS.get(metric, metric).capitalize()} vs shots"
        if len(sources) == 1 and sources[0] is not None:
            title += f" on {_t(_short(sources[0], 40))}"
        fig.suptitle(title + "  (mean ± 1 std over seeds" + ("; bars: 95% CI)" if cis else ")"),
                     fontweight="bold", fontsize=12)
        return _save(fig, path)


def accuracy_by_layer(records: list[dict], path: str | os.PathLike, *, split: str = "val",
                      rows: list[dict] | None = None) -> Path:
    """Bars of mean top-1 accuracy by layer, grouped by backbone.

    Parameters
    ----------
    records : list of dict
        Benchmark records. Only the runs with the most training data are drawn (shots 0 when
        present, else the largest shots), so bars compare layers, not amounts of data; the
        title says which. Error bars are the 95% intervals of ``rows`` where they have one, else
        +-1 standard deviation over seeds.
    path : path-like
        PNG file to write.
    split : str, default "val"
    rows : list of dict, optional
        Leaderboard rows on ``split``, for their intervals.

    Returns
    -------
    Path
    """
    recs = [r for r in _require(records, "accuracy_by_layer") if _value(r, split, "top1") is not None]
    several_heads = len(_unique(r.get("head") for r in recs)) > 1
    several_sources = len(_unique(r.get("source") for r in recs)) > 1
    setting = ""
    if recs:
        shots = {_shots(r) for r in recs}
        pick = 0 if 0 in shots else max(shots)
        recs = [r for r in recs if _shots(r) == pick]
        setting = "all training data" if pick == 0 else f"{pick} shots per class"
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in recs:
        g = (r.get("backbone"), r.get("head") if several_heads else None, r.get("source") if several_sources else None)
        groups[g][r.get("layer")].append(_value(r, split, "top1"))
    cis = _cell_ci(rows)
    ci_of: dict = {}  # (group, layer) -> interval, when the cell is one leaderboard row with one
    for r in recs:
        g = (r.get("backbone"), r.get("head") if several_heads else None, r.get("source") if several_sources else None)
        ci_of.setdefault((g, r.get("layer")), cis.get((r.get("backbone"), r.get("layer"), r.get("source"),
                                                       r.get("head"), _shots(r))))
    n_bars = sum(len(v) for v in groups.values())
    with _style():
        fig = _figure(max(6.4, 0.62 * n_bars + 0.5 * len(groups) + 2.5), 4.8)
        ax = fig.subplots()
        if not recs:
            _no_data(fig, ax, f"No record has metrics['{split}']['top1'] to plot.")
            return _save(fig, path)
        x, ticks, labels = 0.0, [], []
        for i, (g, by_layer) in enumerate(groups.items()):
            xs = x + np.arange(len(by_layer))
            means = np.array([np.mean(v) for v in by_layer.values()])
            stds = np.array([np.std(v) for v in by_layer.values()])
            ci = [ci_of.get((g, layer)) for layer in by_layer]
            yerr = np.array([[m - c[0], c[1] - m] if c else [s, s] for m, s, c in zip(means, stds, ci)]).T
            label = " · ".join(_t(_short(p, 32)) for p in g if p is not None)
            bars = ax.bar(xs, means, 0.8, yerr=np.maximum(yerr, 0), capsize=3, color=f"C{i % 10}", label=label,
                          error_kw={"elinewidth": 1, "ecolor": "#333"})
            if n_bars <= 24:
                ax.bar_label(bars, labels=[f"{m:.3f}" for m in means], padding=2, fontsize=8)
            ticks += list(xs)
            labels += [_t(_short(layer, 20)) for layer in by_layer]
            x = xs[-1] + 1.8
        ax.set_xticks(ticks, labels, rotation=35, ha="right", rotation_mode="anchor")
        ax.grid(axis="x", visible=False)
        top = max([np.mean(v) + np.std(v) for by_layer in groups.values() for v in by_layer.values()]
                  + [c[1] for c in ci_of.values() if c])
        ax.set_ylim(0, min(1.12, top * 1.12) if top <= 1 else top * 1.12)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"mean {_metric_label('top1', split)}")
        ax.set_title(f"Top-1 accuracy by layer ({setting}; bars: "
                     + ("95% CI)" if any(ci_of.values()) else "±1 std over seeds)"))
        _legend_below(fig, [ax])
        return _save(fig, path)


def leaderboard_intervals(rows: list[dict], path: str | os.PathLike, *, top: int = 25) -> Path:
    """The leaderboard's top-1 with 95% intervals, best at the top, rows tied with #1 marked.

    Parameters
    ----------
    rows : list of dict
        :func:`featcache.reports.leaderboard.leaderboard` output (``top1_mean``, ``top1_ci``,
        ``tied_with_best``, ``split``).
    path : path-like
        PNG file to write.
    top : int, default 25
        Rows drawn (the best ones).

    Returns
    -------
    Path
    """
    scored = [r for r in rows if r.get("top1_mean") is not None][:top]
    if not scored:
        raise ConfigError("leaderboard_intervals() needs at least one row with a top-1 score. Run 'featcache bench'.")
    split = scored[0].get("split")
    with _style():
        fig = _figure(8.0, 1.4 + 0.36 * len(scored))
        ax = fig.subplots()
        y = np.arange(len(scored))
        for yi, r in zip(y, scored):
            colour = "#d4a017" if yi == 0 else "#2563eb" if r.get("tied_with_best") else "#7b8794"
            m = r["top1_mean"]
            if r.get("top1_ci"):
                lo, hi = r["top1_ci"]
                ax.errorbar([m], [yi], xerr=[[max(m - lo, 0)], [max(hi - m, 0)]], fmt="o", color=colour, capsize=3,
                            elinewidth=1.6, ms=6)
            else:
                ax.plot([m], [yi], "o", color=colour, ms=6)
        labels = [_t(_short(" · ".join(str(r.get(k)) for k in ("backbone", "layer", "head"))
                            + f" · {_shots_label(int(r.get('shots') or 0))} shots", 60)) for r in scored]
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        ax.set_xlabel(_metric_label("top1", split) + " (95% CI)")
        ax.set_title("Leaderboard: #1 gold, tied with #1 blue, distinguishably worse grey")
        return _save(fig, path)


def time_breakdown(records: list[dict], path: str | os.PathLike) -> Path:
    """Stacked horizontal bars of where the time went, per backbone (and source, when several).

    Parameters
    ----------
    records : list of dict
        Benchmark records. Extraction is counted once per cache file (the largest
        ``extract_seconds`` of the records that share a ``cache``: a cache hit records the
        extraction time stored in the cache);
        fitting is the sum of ``fit_seconds``.
    path : path-like
        PNG file to write.

    Returns
    -------
    Path
    """
    recs = _require(records, "time_breakdown")
    several_sources = len(_unique(r.get("source") for r in recs)) > 1
    extract: dict = defaultdict(dict)
    fits: dict = defaultdict(float)
    count: dict = defaultdict(int)
    for r in recs:
        g = (r.get("backbone"), r.get("source") if several_sources else None)
        cache = r.get("cache") or f"{r.get('backbone')}|{r.get('source')}"
        extract[g][cache] = max(extract[g].get(cache, 0.0), float(r.get("extract_seconds") or 0.0))
        fits[g] += float(r.get("fit_seconds") or 0.0)
        count[g] += 1
    groups = list(fits)
    ex = np.array([sum(extract[g].values()) for g in groups])
    ft = np.array([fits[g] for g in groups])
    labels = [" · ".join(_t(_short(p, 32)) for p in g if p is not None) for g in groups]
    with _style():
        fig = _figure(8.0, 1.6 + 0.55 * len(groups))
        ax = fig.subplots()
        y = np.arange(len(groups))
        ax.barh(y, ex, 0.6, color="#4c78a8", label="feature extraction (once per cache)")
        ax.barh(y, ft, 0.6, left=ex, color="#f58518", label="fitting heads (all runs)")
        total = ex + ft
        for yi, tot, n in zip(y, total, (count[g] for g in groups)):
            ax.text(tot, yi, f"  {tot:.1f} s, {n} fit{'s' if n != 1 else ''}", va="center", fontsize=9)
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xlim(0, max(total.max(initial=0.0), 1e-9) * 1.3)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("seconds")
        ax.set_title("Where the time goes")
        _legend_below(fig, [ax])
        return _save(fig, path)


# --- layer probe -----------------------------------------------------------------------------


def layer_curve(layers: list[dict], path: str | os.PathLike, *, recommendation: dict | None = None,
                title: str | None = None) -> Path:
    """Top-1 accuracy by depth, with the recommended freeze boundary.

    Parameters
    ----------
    layers : list of dict
        In forward order, each with ``name`` and ``top1`` (optionally ``split``, and ``top1_ci``:
        drawn as an error bar).
    path : path-like
        PNG file to write.
    recommendation : dict, optional
        ``freeze_until`` (a layer name: drawn as a vertical line) and ``fine_tune`` (when not
        empty, the layers after the boundary are shaded "fine-tune"); ``best_layer`` is starred.
    title : str, optional

    Returns
    -------
    Path
    """
    if not layers:
        raise ConfigError("layer_curve() needs at least one layer with 'name' and 'top1'. Run 'featcache probe-layers'.")
    names = [str(r.get("name")) for r in layers]
    ys = np.array([r["top1"] if isinstance(r.get("top1"), (int, float)) else np.nan for r in layers], dtype=float)
    splits = _unique(r.get("split") for r in layers)
    split = splits[0] if len(splits) == 1 else None
    x = np.arange(len(names))
    with _style():
        fig = _figure(max(6.4, 0.62 * len(names) + 2.6), 4.6)
        ax = fig.subplots()
        ax.plot(x, ys, "o-", color="C0", lw=2, ms=6, label="top-1", zorder=3)
        ci = np.array([r["top1_ci"] if isinstance(r.get("top1_ci"), (list, tuple)) else [np.nan, np.nan]
                       for r in layers], dtype=float)
        if np.isfinite(ci).any():
            ax.errorbar(x, ys, yerr=[np.maximum(ys - ci[:, 0], 0), np.maximum(ci[:, 1] - ys, 0)], fmt="none",
                        ecolor="C0", elinewidth=1.2, capsize=3, label="95% CI", zorder=3)
        rec = recommendation or {}
        if rec.get("freeze_until") in names:
            k = names.index(rec["freeze_until"])
            if rec.get("fine_tune"):
                ax.axvspan(k + 0.5, len(names) - 0.5, color="#f58518", alpha=0.13, lw=0, label="fine-tune")
                ax.text((k + len(names)) / 2, 0.97, "fine-tune", transform=ax.get_xaxis_transform(),
                        ha="center", va="top", color="#b35c00", fontweight="bold")
            ax.axvline(k, color="#c0392b", ls="--", lw=1.6, label=f"freeze until {_t(names[k])}", zorder=2)
        elif rec.get("freeze_until"):
            logger.warning("freeze_until %r is not one of the plotted layers; no marker drawn.", rec["freeze_until"])
        if rec.get("best_layer") in names:
            b = names.index(rec["best_layer"])
            ax.plot([b], [ys[b]], marker="*", ms=16, color="#f2b701", mec="#7a5c00", ls="none",
                    label=f"best: {_t(names[b])}", zorder=4)
        if np.isfinite(ys).any():
            best_i = names.index(rec["best_layer"]) if rec.get("best_layer") in names else -1
            for i, (xi, yi) in enumerate(zip(x, ys)):
                if np.isfinite(yi):
                    ax.annotate(f"{yi:.3f}", (xi, yi), textcoords="offset points", xytext=(0, 13 if i == best_i else 8),
                                ha="center", fontsize=8)
            lo, hi = np.nanmin(np.fmin(ys, ci[:, 0])), np.nanmax(np.fmax(ys, ci[:, 1]))
            pad = max(0.05, (hi - lo) * 0.2)
            ax.set_ylim(max(0.0, lo - pad), min(1.05, hi + pad) if hi <= 1 else hi + pad)
        ax.set_xticks(x, [_t(_short(n, 24)) for n in names], rotation=35, ha="right", rotation_mode="anchor")
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_xlabel("layer (input → output)")
        ax.set_ylabel(_metric_label("top1", split))
        ax.set_title(_t(_short(title, 60)) if title else "Accuracy by depth")
        _legend_below(fig, [ax])
        return _save(fig, path)


# --- run plots -------------------------------------------------------------------------------


def confusion_matrix(cm: list[list[int]], classes: list[str], path: str | os.PathLike, *,
                     title: str | None = None) -> Path:
    """Confusion matrix: counts written in the cells, colour normalised per true class (row).

    Parameters
    ----------
    cm : list of list of int, shape (n_classes, n_classes)
        Rows are true classes, columns predicted ones (``metrics["confusion_matrix"]``).
    classes : list of str, length n_classes
    path : path-like
        PNG file to write.
    title : str, optional

    Returns
    -------
    Path
    """
    arr = np.asarray(cm, dtype=np.int64)
    n = len(classes)
    if arr.ndim != 2 or arr.shape != (n, n) or n == 0:
        raise ConfigError(f"The confusion matrix must be square with one row per class ({n} classes); "
                          f"got shape {arr.shape}. Pass metrics['confusion_matrix'] and metrics['classes'].")
    rows = arr.sum(axis=1, keepdims=True)
    norm = np.divide(arr, rows, out=np.zeros(arr.shape, dtype=float), where=rows > 0)
    side = float(np.clip(0.42 * n + 3.2, 5.0, 16.0))
    names = [_t(_short(c, 22)) for c in classes]
    with _style():
        fig = _figure(side + 1.2, side)
        ax = fig.subplots()
        ax.grid(False)
        im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        cbar = fig.colorbar(im, ax=ax, shrink=0.8)
        cbar.set_label("fraction of the true class")
        if n <= MAX_ANNOTATED_CLASSES:
            size = 10 if n <= 10 else 8 if n <= 20 else 6
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, str(arr[i, j]), ha="center", va="center", fontsize=size,
                            color="white" if norm[i, j] > 0.55 else "#1f2933")
        ax.set_xticks(range(n), names, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center",
                      rotation_mode="anchor", fontsize=9 if n <= 20 else 7)
        ax.set_yticks(range(n), names, fontsize=9 if n <= 20 else 7)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(_t(title) if title else f"Confusion matrix ({int(arr.sum())} samples)")
        return _save(fig, path)


def sweep_curve(sweep: list[dict], param: str, path: str | os.PathLike, *, best: dict | None = None) -> Path:
    """Top-1 accuracy (left axis) and log-loss (right axis) across a head's sweep.

    Parameters
    ----------
    sweep : list of dict
        ``metrics.json["sweep"]``: rows with ``value``, ``top1`` and ``log_loss``.
    param : str
        The swept parameter (``C``, ``alpha``, ``k``...), for the axis label.
    path : path-like
        PNG file to write.
    best : dict, optional
        ``metrics.json["best"]``: its ``value`` is marked, and ``scored_on`` named in the title.

    Returns
    -------
    Path
        The x axis is logarithmic when every value is positive.
    """
    rows = [r for r in sweep if isinstance(r.get("value"), (int, float)) and not isinstance(r.get("value"), bool)]
    if not rows:
        raise ConfigError("sweep_curve() needs sweep rows with a numeric 'value'; this head swept nothing "
                          "(one grid value, or a head without a parameter).")
    rows.sort(key=lambda r: r["value"])
    v = np.array([r["value"] for r in rows], dtype=float)
    top1 = np.array([r.get("top1") if r.get("top1") is not None else np.nan for r in rows], dtype=float)
    ll = np.array([r.get("log_loss") if r.get("log_loss") is not None else np.nan for r in rows], dtype=float)
    pname = _t(param) if param else "value"
    with _style():
        fig = _figure(7.2, 4.4)
        ax = fig.subplots()
        ax2 = ax.twinx()
        ax2.grid(False)
        ax2.spines["right"].set_visible(True)
        if (v > 0).all():
            ax.set_xscale("log")
        l1 = ax.plot(v, top1, "o-", color="C0", lw=2, ms=5, label="top-1 accuracy")
        l2 = ax2.plot(v, ll, "s--", color="C3", lw=1.6, ms=4, label="log-loss")
        handles = l1 + l2
        if best and isinstance(best.get("value"), (int, float)):
            bv = float(best["value"])
            h = ax.axvline(bv, color="#2ca02c", ls=":", lw=2, label=f"best {pname} = {bv:g}")
            handles.append(h)
            i = int(np.argmin(np.abs(v - bv)))
            if np.isclose(v[i], bv) and np.isfinite(top1[i]):
                ax.plot([v[i]], [top1[i]], marker="o", ms=11, mfc="none", mec="#2ca02c", mew=2)
        ax.set_xlabel(pname + (" (log scale)" if (v > 0).all() else ""))
        ax.set_ylabel("top-1 accuracy", color="C0")
        ax2.set_ylabel("log-loss", color="C3")
        ax.tick_params(axis="y", colors="C0")
        ax2.tick_params(axis="y", colors="C3")
        scored = (best or {}).get("scored_on")
        ax.set_title(f"Sweep of {pname}" + (f" (scored on {_t(scored)})" if scored else ""))
        _legend_below(fig, [ax], handles=handles)
        return _save(fig, path)


__all__ = ["accuracy_by_layer", "confusion_matrix", "layer_curve", "leaderboard_intervals", "shots_curve", "sweep_curve",
           "time_breakdown"]
