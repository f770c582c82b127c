"""Self-contained HTML reports of a run, a benchmark or a layer probe, and the benchmark leaderboard.

A report is one HTML file: CSS inline, plots embedded as base64 PNG ``data:`` URIs, no script,
nothing fetched. It can be mailed, attached to a ticket or opened offline.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
import os
import tempfile
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from . import __version__, plots
from .errors import ConfigError
from .files import atomic_write, write_text

logger = logging.getLogger(__name__)

RUN_FILES = ("run.json", "metrics.json")
RECORDS = "records.jsonl"
LAYERS_JSON = "layers.json"
#: Keys of a leaderboard row, in column order.
LEADERBOARD_KEYS = ("backbone", "layer", "source", "head", "shots", "top1_mean", "top1_std", "runs")
#: Scalar metrics of the run page: (key, header).
METRIC_COLUMNS = (
    ("n", "n"),
    ("top1", "top-1"),
    ("top5", "top-5"),
    ("balanced_accuracy", "balanced acc."),
    ("macro_f1", "macro F1"),
    ("roc_auc", "ROC-AUC"),
    ("log_loss", "log-loss"),
)
#: Above this many classes a confusion matrix is unreadable as a picture; the table stays.
MAX_CM_CLASSES = 60


# --- leaderboard -----------------------------------------------------------------------------


def _hashable(v: Any) -> Any:
    try:
        hash(v)
        return v
    except TypeError:
        return json.dumps(v, sort_keys=True, default=str)


def _score(rec: dict, split: str, metric: str = "top1") -> float | None:
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
        cells[key].append(_score(r, split))
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
        cells = [i, r["backbone"], r["layer"], r["source"], r["head"], _shots_label(r["shots"]),
                 _fmt(r["top1_mean"]), _fmt(r["top1_std"]), r["runs"]]
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


# --- HTML building blocks --------------------------------------------------------------------


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _shots_label(s: Any) -> str:
    return "all" if not s else str(s)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _fmt_value(v: Any) -> str:
    """A swept parameter value: 0.001, 1, 1e+04."""
    if isinstance(v, float):
        return f"{v:g}"
    return "–" if v is None else str(v)


def _seconds(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "–"
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def _table(headers: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]], *, table_id: str | None = None,
           row_classes: Sequence[str] | None = None, scroll: bool = False) -> str:
    """``headers`` are (text, kind) with kind "num", "text" or "wrap"; cells are pre-escaped HTML."""
    head = "".join(f'<th class="{k}">{_e(h)}</th>' for h, k in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td class="{k}">{c}</td>' for (_, k), c in zip(headers, row))
        body.append(f"<tr{cls}>{cells}</tr>")
    tid = f' id="{_e(table_id)}"' if table_id else ""
    table = f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="{"scroll" if scroll else "wide"}">{table}</div>'


def _facts(items: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items if v is not None and v != "")
    return f'<dl class="facts">{rows}</dl>'


def _img(path: Path, alt: str, caption: str | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">{cap}</figure>'


def _plot(make: Callable[[Path], Path], tmp: Path, name: str, alt: str, caption: str | None = None) -> str:
    """A plot embedded, or a note saying why it could not be drawn (the page still renders)."""
    try:
        return _img(make(tmp / name), alt, caption)
    except (ConfigError, ValueError) as e:  # one plot that cannot be drawn must not cost the whole page
        logger.warning("Plot %s skipped: %s", name, e)
        return _note(f"Plot not drawn: {e}")


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _section(title: str, *parts: str, sid: str | None = None) -> str:
    sid_attr = f' id="{_e(sid)}"' if sid else ""
    return f"<section{sid_attr}><h2>{_e(title)}</h2>{''.join(parts)}</section>"


def _bar_cell(v: Any) -> str:
    """A score in [0, 1] with a proportional bar behind it (pure CSS)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return _e(_fmt(v, 3))
    pct = max(0.0, min(100.0, 100.0 * v))
    return (f'<span class="bar" style="background:linear-gradient(90deg,#c7dcf5 {pct:.1f}%,'
            f'transparent {pct:.1f}%)">{_e(f"{v:.3f}")}</span>')


_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: #1f2933;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 36px 48px; }
header { border-bottom: 3px solid #2563eb; padding-bottom: 14px; margin-bottom: 8px; }
.kind { text-transform: uppercase; letter-spacing: .08em; font-size: 12px; font-weight: 700; color: #2563eb; margin: 0; }
h1 { font-size: 27px; line-height: 1.25; margin: 2px 0 6px; overflow-wrap: anywhere; }
.lede { margin: 0 0 6px; color: #3e4c59; max-width: 900px; }
.meta { margin: 0; color: #7b8794; font-size: 13px; overflow-wrap: anywhere; }
h2 { font-size: 19px; margin: 30px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #e4e7eb; }
section > p { max-width: 900px; }
.wide { overflow-x: auto; max-width: 100%; }
.scroll { overflow: auto; max-height: 520px; max-width: 100%; border: 1px solid #e4e7eb; border-radius: 4px; }
table { border-collapse: collapse; font-size: 14px; margin: 4px 0 8px; }
th, td { padding: 5px 12px; border-bottom: 1px solid #e4e7eb; text-align: left; vertical-align: top; }
thead th { background: #f5f7fa; font-weight: 600; position: sticky; top: 0; border-bottom: 2px solid #cbd2d9; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.wrap { overflow-wrap: anywhere; max-width: 320px; }
td.text { white-space: nowrap; }
tr.top td { background: #fff8e1; font-weight: 600; }
tr.freeze td { background: #fdecea; }
tr.tune td { background: #fff4e5; }
.bar { display: inline-block; min-width: 64px; padding: 0 6px; border-radius: 3px; }
.tag { display: inline-block; margin-left: 6px; padding: 0 7px; border-radius: 9px; font-size: 11px;
  font-weight: 600; background: #e0e7ff; color: #3730a3; white-space: nowrap; }
.tag.freeze { background: #fbd5d0; color: #922b21; }
.tag.tune { background: #ffe3bf; color: #8a4b00; }
.tag.best { background: #fff0b3; color: #6b5000; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 18px; margin: 6px 0; font-size: 14px; }
dl.facts dt { color: #616e7c; }
dl.facts dd { margin: 0; overflow-wrap: anywhere; font-variant-numeric: tabular-nums; }
figure { margin: 10px 0 14px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #e4e7eb; border-radius: 4px; }
figcaption { color: #616e7c; font-size: 13px; margin-top: 4px; }
.callout { border-left: 5px solid #2563eb; background: #eff6ff; padding: 12px 18px; border-radius: 4px; margin: 8px 0 12px; }
.callout p { margin: 4px 0; }
.callout .big { font-size: 17px; font-weight: 600; }
.note { color: #7b8794; font-style: italic; }
details summary { cursor: pointer; color: #2563eb; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px;
  background: #f5f7fa; padding: 0 4px; border-radius: 3px; overflow-wrap: anywhere; }
footer { margin-top: 40px; padding-top: 8px; border-top: 1px solid #e4e7eb; color: #9aa5b1; font-size: 12px; }
"""


def _page(kind: str, title: str, lede: str, src: Path, body: str) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="featcache {_e(__version__)}">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f'<header><p class="kind">{_e(kind)}</p><h1>{_e(title)}</h1><p class="lede">{_e(lede)}</p>'
        f'<p class="meta">Generated {_e(now)} from <code>{_e(src)}</code></p></header>'
        f"{body}"
        f"<footer>featcache {_e(__version__)} · self-contained report: no scripts, no external resources.</footer>"
        "</main></body></html>\n"
    )


# --- reading the inputs ----------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"'{path}' is not valid JSON ({e}). Re-create it with featcache.") from None


def _read_records(path: Path) -> list[dict]:
    out = []
    bad = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1  # a line cut by a crash mid-write; the bench runner ignores it too
            continue
        if isinstance(rec, dict):
            out.append(rec)
    if bad:
        logger.warning("%s: skipped %d line(s) that are not JSON.", path, bad)
    return out


def _kind(src: Path) -> str:
    if not src.exists():
        raise ConfigError(f"'{src}' does not exist. Pass a run folder (fit-head), a bench folder or a "
                          f"probe-layers folder.")
    if not src.is_dir():
        raise ConfigError(f"'{src}' is a file; pass the folder that holds it.")
    if all((src / f).is_file() for f in RUN_FILES):
        run = _read_json(src / "run.json")
        return "finetune" if isinstance(run, dict) and run.get("format") == "featcache-finetune" else "run"
    if (src / RECORDS).is_file():
        return "bench"
    if (src / LAYERS_JSON).is_file():
        return "layers"
    found = sorted(p.name for p in src.iterdir())[:8]
    raise ConfigError(
        f"'{src}' is not a featcache run, bench or layers folder: expected {RUN_FILES[0]} and {RUN_FILES[1]} "
        f"(from 'featcache fit-head'), {RECORDS} (from 'featcache bench') or {LAYERS_JSON} (from 'featcache "
        f"probe-layers'). It holds: {', '.join(found) if found else 'nothing'}."
    )


# --- run page --------------------------------------------------------------------------------


def _eval_split(metrics: dict, run: dict, best: dict) -> str | None:
    candidates = [(run.get("config") or {}).get("eval_split"), best.get("scored_on"), "val", "test"]
    for c in candidates:
        if c in metrics:
            return c
    return next(iter(metrics), None)


def _run_page(src: Path, tmp: Path) -> tuple[str, str, str, str]:
    run = _read_json(src / "run.json")
    doc = _read_json(src / "metrics.json")
    if not isinstance(run, dict) or not isinstance(doc, dict):
        raise ConfigError(f"'{src}': run.json and metrics.json must each hold a JSON object. Re-run fit-head.")
    metrics = doc.get("metrics") or {}
    sweep = doc.get("sweep") or []
    best = doc.get("best") or run.get("best") or {}
    config = run.get("config") or {}
    fp = run.get("fingerprint") or {}
    backbone = (fp.get("backbone") or {}).get("name", "?")
    head = config.get("head", "?")
    layer = run.get("layer", "?")
    eval_split = _eval_split(metrics, run, best)
    few = doc.get("few_shot")

    best_text = None
    if best.get("param"):
        best_text = f"{best['param']} = {_fmt_value(best.get('value'))}"
        if best.get("score") is not None:
            metric = {"top1": "top-1"}.get(best.get("select_by", "top1"), best.get("select_by"))
            best_text += f" ({metric} {best['score']:.4f} on {best.get('scored_on')})"
    facts = _facts([
        ("head", head),
        ("best value", best_text or "no sweep (single value)"),
        ("backbone", backbone),
        ("weights", (fp.get("backbone") or {}).get("weights")),
        ("layer", layer),
        ("source", (fp.get("source") or {}).get("spec")),
        ("classes", len(run.get("classes") or [])),
        ("features", _feature_steps(config)),
        ("few-shot", f"{few['shots']} per class, {few['seeds']} seed(s)" if isinstance(few, dict) else None),
        ("cache", run.get("cache")),
        ("run folder", str(src)),
        ("seconds", _seconds(doc.get("seconds"))),
    ])
    parts = [_section("Run", facts, sid="facts")]

    cols, metrics_section = _metrics_section(metrics, eval_split)
    parts.append(metrics_section)

    if isinstance(few, dict) and isinstance(few.get("summary"), dict):
        srows = []
        for split, m in few["summary"].items():
            srows.append([_e(split), *[_e(f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}") if isinstance(m.get(k), dict)
                                       else "–" for k, _ in cols if k != "n"]])
        parts.append(_section(
            f"Few-shot: mean ± std over {few.get('seeds')} seeds",
            _table([("split", "text"), *[(h, "num") for k, h in cols if k != "n"]], srows, table_id="few-shot"),
            "<p>The tables above and below describe the first seed's head, the one saved in this run.</p>"))

    parts.extend(_class_sections(run, metrics, eval_split, tmp))

    if any(isinstance(r.get("value"), (int, float)) for r in sweep):
        param = best.get("param") or "value"
        srows = [[_e(_fmt_value(r.get("value"))), _e(_fmt(r.get("top1"))), _e(_fmt(r.get("log_loss")))]
                 for r in sweep]
        tags = ["top" if r.get("value") == best.get("value") else "" for r in sweep]
        parts.append(_section(
            f"Sweep of {param}",
            _plot(lambda p: plots.sweep_curve(sweep, param, p, best=best), tmp, "sweep.png", f"sweep of {param}",
                  f"Chosen by top-1 on {best.get('scored_on')} (ties broken by log-loss); never on test."),
            "<details><summary>Sweep values</summary>"
            + _table([(param, "num"), ("top-1", "num"), ("log-loss", "num")], srows, table_id="sweep",
                     row_classes=tags) + "</details>",
            sid="sweep-section"))
    else:
        parts.append(_section("Sweep", _note("This head swept nothing (one grid value or no parameter).")))

    title = f"{head} on {backbone} · {layer}"
    score = (metrics.get(eval_split) or {}).get("top1")
    lede = (f"A {head} head fitted on cached {backbone} features from layer {layer}"
            + (f": top-1 {score:.4f} on {eval_split}." if isinstance(score, (int, float)) else ".")
            + " Scores per split, recall per class, the confusion matrix and the regularisation sweep.")
    return "featcache run", title, lede, "".join(parts)


def _metrics_section(metrics: dict, eval_split: str | None) -> tuple[list, str]:
    cols = [c for c in METRIC_COLUMNS if c[0] != "top5" or any("top5" in (m or {}) for m in metrics.values())]
    rows, classes_ = [], []
    for split, m in metrics.items():
        name = _e(split) + ('<span class="tag">eval</span>' if split == eval_split else "")
        rows.append([name, *[_e(_fmt((m or {}).get(k))) for k, _ in cols]])
        classes_.append("")
    table = _table([("split", "text"), *[(h, "num") for _, h in cols]], rows, table_id="metrics",
                   row_classes=classes_) if rows else _note("No split besides the training split was scored.")
    return cols, _section("Metrics per split", table, sid="metrics-section")



def _class_sections(run: dict, metrics: dict, eval_split: str | None, tmp: Path) -> list[str]:
    """Recall per class and the confusion matrix on the eval split."""
    parts = []
    splits = [s for s, m in metrics.items() if isinstance((m or {}).get("per_class_recall"), dict)]
    if splits:
        names = _class_order(run, metrics, splits)
        rrows = [[_e(c), *[_bar_cell(metrics[s]["per_class_recall"].get(c)) for s in splits]] for c in names]
        parts.append(_section(
            "Recall per class",
            _table([("class", "wrap"), *[(s, "num") for s in splits]], rrows, table_id="recall",
                   scroll=len(names) > 15),
            sid="recall-section"))

    cm_parts = []
    m = metrics.get(eval_split) or {}
    if m.get("confusion_matrix") and m.get("classes"):
        if len(m["classes"]) > MAX_CM_CLASSES:
            cm_parts.append(_note(f"{len(m['classes'])} classes are too many to draw; the counts are in "
                                  f"metrics.json under metrics.{eval_split}.confusion_matrix."))
        else:
            cm_parts.append(_plot(lambda p: plots.confusion_matrix(
                m["confusion_matrix"], m["classes"], p, title=f"Confusion matrix on {eval_split} ({m.get('n')} samples)"),
                tmp, "confusion.png", f"confusion matrix on {eval_split}",
                "Rows are true classes, columns predictions; cells hold counts, colour is the row fraction."))
    else:
        cm_parts.append(_note("No confusion matrix in metrics.json."))
    parts.append(_section(f"Confusion matrix ({eval_split or 'no eval split'})", *cm_parts, sid="confusion"))

    return parts


def _finetune_page(src: Path, tmp: Path) -> tuple[str, str, str, str]:
    """A 'featcache finetune' run: a whole fine-tuned network, scored per split after the last epoch."""
    run, doc = _read_json(src / "run.json"), _read_json(src / "metrics.json")
    metrics = doc.get("metrics") or {}
    config = run.get("config") or {}
    backbone = run.get("backbone") or "?"
    eval_split = "val" if "val" in metrics else next(iter(metrics), None)
    boundary = (f"after {config['freeze_until']}" if config.get("freeze_until")
                else ", ".join(config.get("train") or []))
    params = run.get("parameters") or {}
    facts = _facts([
        ("backbone", backbone),
        ("trained", f"{', '.join(run.get('trainable_modules') or [])} ({boundary})"),
        ("parameters", f"{params.get('trainable', '?'):,} trained, {params.get('frozen', '?'):,} frozen"
         if params else None),
        ("epochs", f"{config.get('epochs')} at lr {config.get('lr')}, batch {config.get('batch_size')}"),
        ("source", (run.get("source") or {}).get("spec")),
        ("classes", len(run.get("classes") or [])),
        ("run folder", str(src)),
        ("seconds", _seconds(doc.get("seconds"))),
    ])
    parts = [_section("Run", facts, sid="facts"), _metrics_section(metrics, eval_split)[1]]
    parts.extend(_class_sections(run, metrics, eval_split, tmp))
    epochs = [e for e in doc.get("per_epoch") or [] if isinstance(e, dict)]
    if epochs:
        rows = [[_e(e.get("epoch")), _e(_fmt(e.get("train_loss"))), _e(_fmt(e.get("val_top1"))),
                 _e(_seconds(e.get("seconds")))] for e in epochs]
        parts.append(_section("Per epoch", _table([("epoch", "num"), ("train loss", "num"), ("val top-1", "num"),
                                                   ("seconds", "num")], rows, table_id="epochs"), sid="epochs"))
    score = (metrics.get(eval_split) or {}).get("top1")
    title = f"fine-tuned {backbone}"
    lede = (f"{backbone} fine-tuned on raw images ({boundary} trained)"
            + (f": top-1 {score:.4f} on {eval_split}." if isinstance(score, (int, float)) else
               ": no split besides train was scored (fine-tune with --val-fraction).")
            + " Scores per split, recall per class, the confusion matrix and the training curve.")
    return "featcache finetune run", title, lede, "".join(parts)


def _feature_steps(config: dict) -> str:
    steps = [f"normalize {config['normalize']}" if config.get("normalize") else "",
             f"PCA to {config['pca']}" if config.get("pca") else ""]
    return " · ".join(s for s in steps if s)


def _class_order(run: dict, metrics: dict, splits: list[str]) -> list[str]:
    names = [str(c) for c in run.get("classes") or []]
    for s in splits:
        for c in metrics[s]["per_class_recall"]:
            if c not in names:
                names.append(c)
    return names


# --- bench page ------------------------------------------------------------------------------


def _bench_split(records: list[dict]) -> str:
    if any(_score(r, "val") is not None for r in records):
        return "val"
    counts = Counter(s for r in records for s in (r.get("metrics") or {}) if _score(r, s) is not None)
    return counts.most_common(1)[0][0] if counts else "val"


def _join(values: Iterable) -> str:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return ", ".join(str(v) for v in out)


def _bench_page(src: Path, tmp: Path) -> tuple[str, str, str, str]:
    records = _read_records(src / RECORDS)
    title = f"Benchmark {src.resolve().name}"
    if not records:
        body = _section("Leaderboard", _note(f"{RECORDS} holds no records yet. Run 'featcache bench'."))
        return "featcache benchmark", title, "A linear-probe benchmark with no runs yet.", body
    split = _bench_split(records)
    rows = leaderboard(records, split=split)
    shots = sorted({int(r.get("shots") or 0) for r in records}, key=lambda s: (s == 0, s))
    caches: dict = {}
    for r in records:
        c = r.get("cache") or f"{r.get('backbone')}|{r.get('source')}"
        caches[c] = max(caches.get(c, 0.0), float(r.get("extract_seconds") or 0.0))
    fit_s = sum(float(r.get("fit_seconds") or 0.0) for r in records)
    facts = _facts([
        ("runs", len(records)),
        ("backbones", _join(r.get("backbone") for r in records)),
        ("layers", _join(r.get("layer") for r in records)),
        ("sources", _join(r.get("source") for r in records)),
        ("heads", _join(r.get("head") for r in records)),
        ("shots per class", ", ".join(_shots_label(s) for s in shots)),
        ("seeds", _join(sorted({r.get("seed") for r in records}, key=str))),
        ("scored on", split),
        ("time", f"{_seconds(sum(caches.values()))} extracting ({len(caches)} cache{'s' if len(caches) != 1 else ''}), {_seconds(fit_s)} fitting"),
        ("featcache", _join(r.get("featcache_version") for r in records)),
    ])
    lrows = [[_e(i), _e(r["backbone"]), _e(r["layer"]), _e(r["source"]), _e(r["head"]), _e(_shots_label(r["shots"])),
              _bar_cell(r["top1_mean"]), _e(_fmt(r["top1_std"])), _e(r["runs"])] for i, r in enumerate(rows, 1)]
    table = _table([("#", "num"), ("backbone", "wrap"), ("layer", "wrap"), ("source", "wrap"), ("head", "text"),
                    ("shots", "num"), (f"top-1 {split} (mean)", "num"), ("std", "num"), ("runs", "num")],
                   lrows, table_id="leaderboard", row_classes=["top"] + [""] * (len(rows) - 1),
                   scroll=len(rows) > 20)
    parts = [
        _section("Benchmark", facts, sid="facts"),
        _section("Leaderboard", f"<p>Mean and standard deviation over seeds of top-1 accuracy on {_e(split)}, "
                                f"per backbone, layer, source, head and shots; best first.</p>", table,
                 sid="leaderboard-section"),
        _section("Accuracy vs shots",
                 _plot(lambda p: plots.shots_curve(records, p, split=split), tmp, "shots.png", "accuracy vs shots",
                       "Mean over seeds, band ±1 std; a backbone run on several layers shows its best layer.")),
        _section("Accuracy by layer",
                 _plot(lambda p: plots.accuracy_by_layer(records, p, split=split), tmp, "layers.png",
                       "accuracy by layer")),
        _section("Where the time goes",
                 _plot(lambda p: plots.time_breakdown(records, p), tmp, "time.png", "time breakdown",
                       "Extraction is paid once per cache and reused by every fit on it.")),
    ]
    best = rows[0]
    lede = (f"Linear-probe benchmark of {len(records)} runs. Best: {best['backbone']} · {best['layer']} · "
            f"{best['head']} with {_shots_label(best['shots'])} shots, top-1 {_fmt(best['top1_mean'])} on {split}."
            if best["top1_mean"] is not None else f"Linear-probe benchmark of {len(records)} runs.")
    return "featcache benchmark", title, lede, "".join(parts)


# --- layers page -----------------------------------------------------------------------------

_LAYER_COLUMNS = (("dim", "dim"), ("top1", "top-1"), ("balanced_accuracy", "balanced acc."),
                  ("macro_f1", "macro F1"), ("log_loss", "log-loss"))


def _recommendation_html(rec: dict) -> str:
    if not rec:
        return _note("layers.json holds no recommendation.")
    freeze, tune = rec.get("freeze_until"), list(rec.get("fine_tune") or [])
    if tune:
        headline = (f"Freeze the backbone up to and including {freeze}; fine-tune {', '.join(map(str, tune))} "
                    f"with a new classifier.")
    else:
        headline = f"Keep the whole backbone frozen and train a linear head on its features ({freeze})."
    strategy = {"linear-probe": "linear probe", "partial-fine-tune": "partial fine-tune"}.get(
        rec.get("strategy"), rec.get("strategy"))
    details = []
    if isinstance(rec.get("best_top1"), (int, float)):
        details.append(f"Best layer: {rec.get('best_layer')} (top-1 {rec['best_top1']:.4f})")
    if isinstance(rec.get("last_top1"), (int, float)):
        d = f"last layer: top-1 {rec['last_top1']:.4f}"
        if isinstance(rec.get("best_top1"), (int, float)):
            d += f" ({(rec['best_top1'] - rec['last_top1']) * 100:+.1f} points for the best)"
        details.append(d)
    if isinstance(rec.get("tolerance"), (int, float)):
        details.append(f"tolerance {rec['tolerance'] * 100:.1f} points")
    return ('<div class="callout" id="recommendation">'
            f'<p class="big">{_e(headline)}</p>'
            f"<p>Strategy: <strong>{_e(strategy)}</strong>. {_e('; '.join(details))}.</p>"
            + (f"<p>{_e(rec['reason'])}</p>" if rec.get("reason") else "") + "</div>")


def _layers_page(src: Path, tmp: Path) -> tuple[str, str, str, str]:
    doc = _read_json(src / LAYERS_JSON)
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list):
        raise ConfigError(f"'{src / LAYERS_JSON}' has no 'layers' list. Re-run 'featcache probe-layers'.")
    layers = [r for r in doc["layers"] if isinstance(r, dict)]
    rec = doc.get("recommendation") or {}
    backbone, source, head = doc.get("backbone", "?"), doc.get("source", "?"), doc.get("head", "?")
    freeze, tune = rec.get("freeze_until"), set(rec.get("fine_tune") or [])
    cols = [c for c in _LAYER_COLUMNS if any(c[0] in r for r in layers)]
    rows, classes_ = [], []
    for r in layers:
        name = str(r.get("name"))
        tags = ""
        if name == freeze:
            tags += '<span class="tag freeze">freeze until</span>'
        if name in tune:
            tags += '<span class="tag tune">fine-tune</span>'
        if name == rec.get("best_layer"):
            tags += '<span class="tag best">best</span>'
        best = r.get("best") if isinstance(r.get("best"), dict) else {}
        cells = [_e(name) + tags]
        for k, _ in cols:
            cells.append(_bar_cell(r.get(k)) if k == "top1" else _e(_fmt(r.get(k))))
        cells.append(_e(f"{best['param']} = {_fmt_value(best.get('value'))}") if best.get("param") else "–")
        cells.append(_e(_seconds(r.get("fit_seconds"))))
        rows.append(cells)
        classes_.append("freeze" if name == freeze else "tune" if name in tune else "")
    table = _table([("layer", "wrap"), *[(h, "num") for _, h in cols], ("best value", "num"), ("fit", "num")],
                   rows, table_id="layers", row_classes=classes_)
    splits = _join(r.get("split") for r in layers if r.get("split"))
    facts = _facts([("backbone", backbone), ("source", source), ("head", head), ("scored on", splits),
                    ("layers probed", len(layers)), ("cache", doc.get("cache"))])
    parts = [
        _section("Recommendation", _recommendation_html(rec), sid="recommendation-section"),
        _section("Accuracy by depth",
                 _plot(lambda p: plots.layer_curve(layers, p, recommendation=rec,
                                                   title=f"{backbone} on {source}: {head} head per layer"),
                       tmp, "layers.png", "accuracy by depth",
                       "The dashed line is the freeze boundary; shaded layers are the ones to fine-tune.")
                 if layers else _note("No layers were probed.")),
        _section("Layers", table, sid="layers-section"),
        _section("Probe", facts, sid="facts"),
    ]
    title = f"Which layers to freeze: {backbone}"
    lede = (f"The same {head} head fitted on every stage of {backbone} over {source}; how well each depth "
            f"transfers tells where to stop freezing.")
    return "featcache layer probe", title, lede, "".join(parts)


# --- entry point -----------------------------------------------------------------------------


_PAGES = {"run": _run_page, "finetune": _finetune_page, "bench": _bench_page, "layers": _layers_page}


def write_report(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write one self-contained HTML page about a run, benchmark or layer-probe folder.

    Parameters
    ----------
    src : path-like
        A RUN_DIR (``run.json`` + ``metrics.json``, from ``fit-head``), a BENCH_DIR
        (``records.jsonl``, from ``bench``) or a LAYERS_DIR (``layers.json``, from
        ``probe-layers``).
    out : path-like
        The HTML file to write (atomically); an existing folder gets ``report.html`` inside.

    Returns
    -------
    Path
        The file written. Plots are redrawn from the data and embedded as base64 PNG; the page
        needs no script and fetches nothing.

    Raises
    ------
    ConfigError
        ``src`` is none of the three kinds of folder (the message lists the files expected), or
        its JSON is unreadable.
    """
    src = Path(src)
    kind = _kind(src)
    with tempfile.TemporaryDirectory(prefix="featcache-report-") as tmp:
        label, title, lede, body = _PAGES[kind](src, Path(tmp))
    page = _page(label, title, lede, src, body)
    out = Path(out)
    if out.is_dir():
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, page)
    return out


__all__ = ["leaderboard", "leaderboard_csv", "leaderboard_markdown", "write_report"]
