"""Self-contained HTML reports of a run, a benchmark or a layer probe.

A report is one HTML file: CSS inline, plots embedded as base64 PNG ``data:`` URIs, no script,
nothing fetched. It can be mailed, attached to a ticket or opened offline.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from . import plots
from ..errors import ConfigError
from ..common.files import write_text
from .html import (Page, bar_cell, esc, facts, fmt, fmt_value, note, plot, render, seconds, section,
                        shots_label, table)
from ..metrics.intervals import detectable_difference_line
from .leaderboard import board_split, leaderboard, vs_best
from ..metrics.scores import format_interval

logger = logging.getLogger(__name__)

RUN_FILES = ("run.json", "metrics.json")
RECORDS = "records.jsonl"
LAYERS_JSON = "layers.json"
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


def _run_page(src: Path, tmp: Path) -> Page:
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
        best_text = f"{best['param']} = {fmt_value(best.get('value'))}"
        if best.get("score") is not None:
            metric = {"top1": "top-1"}.get(best.get("select_by", "top1"), best.get("select_by"))
            best_text += f" ({metric} {best['score']:.4f} on {best.get('scored_on')})"
    run_facts = facts([
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
        ("seconds", seconds(doc.get("seconds"))),
    ])
    parts = [section("Run", run_facts, sid="facts")]

    cols, metrics_section = _metrics_section(metrics, eval_split)
    parts.append(metrics_section)

    if isinstance(few, dict) and isinstance(few.get("summary"), dict):
        srows = []
        for split, m in few["summary"].items():
            srows.append([esc(split), *[esc(f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}")
                                        + (f'<br><span class="ci">{esc(format_interval(m[k].get("ci")))}</span>'
                                           if m[k].get("ci") else "") if isinstance(m.get(k), dict)
                                       else "–" for k, _ in cols if k != "n"]])
        parts.append(section(
            f"Few-shot: mean ± std over {few.get('seeds')} seeds (under it, the pooled 95% interval)",
            table([("split", "text"), *[(h, "num") for k, h in cols if k != "n"]], srows, table_id="few-shot"),
            "<p>The tables above and below describe the first seed's head, the one saved in this run.</p>"))

    parts.extend(_class_sections(run, metrics, eval_split, tmp))

    if isinstance(best.get("layers"), list):  # a layer sweep: one row per layer, the curve of the chosen one
        lrows = [[esc(r.get("layer")), esc(fmt_value(r.get("value"))), esc(fmt(r.get("score"))),
                  esc(fmt(r.get("log_loss")))] for r in best["layers"]]
        parts.append(section(
            "Layers swept", table([("layer", "wrap"), ("best value", "num"), ("score", "num"), ("log-loss", "num")],
                                  lrows, table_id="layers", row_classes=["top" if r.get("layer") == layer else ""
                                                                         for r in best["layers"]]),
            sid="layers-section"))
        sweep = [r for r in sweep if r.get("layer") == layer]
    if any(isinstance(r.get("value"), (int, float)) for r in sweep):
        param = best.get("param") or "value"
        metric = {"top1": "top-1"}.get(best.get("select_by", "top1"), best.get("select_by"))
        srows = [[esc(fmt_value(r.get("value"))), esc(fmt(r.get("top1"))), esc(fmt(r.get("log_loss")))]
                 for r in sweep]
        tags = ["top" if r.get("value") == best.get("value") else "" for r in sweep]
        parts.append(section(
            f"Sweep of {param}" + (f" on {layer}" if isinstance(best.get("layers"), list) else ""),
            plot(lambda p: plots.sweep_curve(sweep, param, p, best=best), tmp, "sweep.png", f"sweep of {param}",
                  f"Chosen by {metric} on {best.get('scored_on')} (ties broken by log-loss); never on test."),
            "<details><summary>Sweep values</summary>"
            + table([(param, "num"), ("top-1", "num"), ("log-loss", "num")], srows, table_id="sweep",
                     row_classes=tags) + "</details>",
            sid="sweep-section"))
    else:
        parts.append(section("Sweep", note("This head swept nothing (one grid value or no parameter).")))

    title = f"{head} on {backbone} · {layer}"
    score = (metrics.get(eval_split) or {}).get("top1")
    lede = (f"A {head} head fitted on cached {backbone} features from layer {layer}"
            + (f": top-1 {score:.4f} on {eval_split}." if isinstance(score, (int, float)) else ".")
            + " Scores per split, recall per class, the confusion matrix and the regularisation sweep.")
    return Page("featcache run", title, lede, "".join(parts))


def _metrics_section(metrics: dict, eval_split: str | None) -> tuple[list, str]:
    cols = [c for c in METRIC_COLUMNS if c[0] != "top5" or any("top5" in (m or {}) for m in metrics.values())]
    rows = []
    for split, m in metrics.items():
        name = esc(split) + ('<span class="tag">eval</span>' if split == eval_split else "")
        rows.append([name, *[_with_ci(m or {}, k) for k, _ in cols]])
    html_table = (table([("split", "text"), *[(h, "num") for _, h in cols]], rows, table_id="metrics") if rows
                  else note("No split besides the training split was scored."))
    explain = ("<p>Under each score, its 95% interval: a stratified bootstrap over the split's rows. Two scores "
               "whose intervals overlap widely are not told apart by this split.</p>"
               if any(f"{k}_ci" in (m or {}) for m in metrics.values() for k, _ in cols) else "")
    return cols, section("Metrics per split", html_table, explain, sid="metrics-section")


def _with_ci(m: dict, key: str) -> str:
    """A metric cell: the value, and its 95% interval underneath when there is one."""
    ci = format_interval(m.get(f"{key}_ci"))
    return esc(fmt(m.get(key))) + (f'<br><span class="ci">{esc(ci)}</span>' if ci else "")



def _class_sections(run: dict, metrics: dict, eval_split: str | None, tmp: Path) -> list[str]:
    """Recall per class and the confusion matrix on the eval split."""
    parts = []
    splits = [s for s, m in metrics.items() if isinstance((m or {}).get("per_class_recall"), dict)]
    if splits:
        names = _class_order(run, metrics, splits)
        rrows = [[esc(c), *[bar_cell(metrics[s]["per_class_recall"].get(c)) + _counts(metrics[s], c) for s in splits]]
                 for c in names]
        parts.append(section(
            "Recall per class",
            table([("class", "wrap"), *[(s, "num") for s in splits]], rrows, table_id="recall",
                   scroll=len(names) > 15),
            sid="recall-section"))

    cm_parts = []
    m = metrics.get(eval_split) or {}
    if m.get("confusion_matrix") and m.get("classes"):
        if len(m["classes"]) > MAX_CM_CLASSES:
            cm_parts.append(note(f"{len(m['classes'])} classes are too many to draw; the counts are in "
                                  f"metrics.json under metrics.{eval_split}.confusion_matrix."))
        else:
            cm_parts.append(plot(lambda p: plots.confusion_matrix(
                m["confusion_matrix"], m["classes"], p, title=f"Confusion matrix on {eval_split} ({m.get('n')} samples)"),
                tmp, "confusion.png", f"confusion matrix on {eval_split}",
                "Rows are true classes, columns predictions; cells hold counts, colour is the row fraction."))
    else:
        cm_parts.append(note("No confusion matrix in metrics.json."))
    parts.append(section(f"Confusion matrix ({eval_split or 'no eval split'})", *cm_parts, sid="confusion"))

    return parts


def _counts(m: dict, name: str) -> str:
    """" (5/6)": right and rows of a class, so a reader sees when a recall rests on a handful of images."""
    n, right = (m.get("per_class_n") or {}).get(name), (m.get("per_class_correct") or {}).get(name)
    return f' <span class="ci">({right}/{n})</span>' if isinstance(n, int) and isinstance(right, int) else ""


def _finetune_page(src: Path, tmp: Path) -> Page:
    """A 'featcache finetune' run: a whole fine-tuned network, scored per split after the last epoch."""
    run, doc = _read_json(src / "run.json"), _read_json(src / "metrics.json")
    metrics = doc.get("metrics") or {}
    config = run.get("config") or {}
    backbone = run.get("backbone") or "?"
    eval_split = "val" if "val" in metrics else next(iter(metrics), None)
    boundary = (f"after {config['freeze_until']}" if config.get("freeze_until")
                else ", ".join(config.get("train") or []))
    params = run.get("parameters") or {}
    run_facts = facts([
        ("backbone", backbone),
        ("trained", f"{', '.join(run.get('trainable_modules') or [])} ({boundary})"),
        ("parameters", f"{params.get('trainable', '?'):,} trained, {params.get('frozen', '?'):,} frozen"
         if params else None),
        ("epochs", f"{config.get('epochs')} at lr {config.get('lr')}, batch {config.get('batch_size')}"),
        ("source", (run.get("source") or {}).get("spec")),
        ("classes", len(run.get("classes") or [])),
        ("run folder", str(src)),
        ("seconds", seconds(doc.get("seconds"))),
    ])
    parts = [section("Run", run_facts, sid="facts"), _metrics_section(metrics, eval_split)[1]]
    parts.extend(_class_sections(run, metrics, eval_split, tmp))
    epochs = [e for e in doc.get("per_epoch") or [] if isinstance(e, dict)]
    if epochs:
        rows = [[esc(e.get("epoch")), esc(fmt(e.get("train_loss"))), esc(fmt(e.get("val_top1"))),
                 esc(seconds(e.get("seconds")))] for e in epochs]
        parts.append(section("Per epoch", table([("epoch", "num"), ("train loss", "num"), ("val top-1", "num"),
                                                   ("seconds", "num")], rows, table_id="epochs"), sid="epochs"))
    score = (metrics.get(eval_split) or {}).get("top1")
    title = f"fine-tuned {backbone}"
    lede = (f"{backbone} fine-tuned on raw images ({boundary} trained)"
            + (f": top-1 {score:.4f} on {eval_split}." if isinstance(score, (int, float)) else
               ": no split besides train was scored (fine-tune with --val-fraction).")
            + " Scores per split, recall per class, the confusion matrix and the training curve.")
    return Page("featcache finetune run", title, lede, "".join(parts))


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


def _latest_per_cell(records: list[dict]) -> list[dict]:
    """One record per grid cell, the latest (a re-run grid replaces its cells, as the bench runner reads them)."""
    cells: dict = {}
    for r in records:
        key = json.dumps([r.get(k) for k in ("backbone", "layer", "source", "head", "shots", "seed")], default=str)
        cells.pop(key, None)
        cells[key] = r
    return list(cells.values())


def _join(values: Iterable) -> str:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return ", ".join(str(v) for v in out)


def _bench_page(src: Path, tmp: Path) -> Page:
    from ..runs.bench import resolve_paths

    records = [resolve_paths(r, src) for r in _latest_per_cell(_read_records(src / RECORDS))]
    title = f"Benchmark {src.resolve().name}"
    if not records:
        body = section("Leaderboard", note(f"{RECORDS} holds no records yet. Run 'featcache bench'."))
        return Page("featcache benchmark", title, "A linear-probe benchmark with no runs yet.", body)
    split, held_out = board_split(records)
    rows = leaderboard(records, split=split)
    shots = sorted({int(r.get("shots") or 0) for r in records}, key=lambda s: (s == 0, s))
    caches: dict = {}
    for r in records:
        c = r.get("cache") or f"{r.get('backbone')}|{r.get('source')}"
        caches[c] = max(caches.get(c, 0.0), float(r.get("extract_seconds") or 0.0))
    fit_s = sum(float(r.get("fit_seconds") or 0.0) for r in records)
    run_facts = facts([
        ("runs", len(records)),
        ("backbones", _join(r.get("backbone") for r in records)),
        ("layers", _join(r.get("layer") for r in records)),
        ("sources", _join(r.get("source") for r in records)),
        ("heads", _join(r.get("head") for r in records)),
        ("shots per class", ", ".join(shots_label(s) for s in shots)),
        ("seeds", _join(sorted({r.get("seed") for r in records}, key=str))),
        ("scored on", split if held_out else f"{split} (the split the sweeps selected on: not held out)"),
        ("time", f"{seconds(sum(caches.values()))} extracting ({len(caches)} cache{'s' if len(caches) != 1 else ''}), {seconds(fit_s)} fitting"),
        ("featcache", _join(r.get("featcache_version") for r in records)),
    ])
    lrows = [[esc(i), esc(r["backbone"]), esc(r["layer"]), esc(r["source"]), esc(r["head"]), esc(shots_label(r["shots"])),
              bar_cell(r["top1_mean"]), esc(format_interval(r.get("top1_ci"), 4) or "–"), esc(fmt(r["top1_std"])),
              esc(r["runs"]), esc(vs_best(i, r))] for i, r in enumerate(rows, 1)]
    html_table = table([("#", "num"), ("backbone", "wrap"), ("layer", "wrap"), ("source", "wrap"), ("head", "text"),
                    ("shots", "num"), (f"top-1 on {split} (mean)", "num"), ("95% CI", "num"), ("std", "num"),
                    ("runs", "num"), ("vs #1", "text")],
                   lrows, table_id="leaderboard",
                   row_classes=["top"] + ["tied" if r.get("tied_with_best") else "" for r in rows[1:]],
                   scroll=len(rows) > 20)
    resolves = (note(f"On {split}: {detectable_difference_line(rows[0]['n'], rows[0]['top1_mean'], split)}. "
                     f"Rows marked 'tied with #1' are not distinguishable from the best at 95% (McNemar's exact "
                     f"test for one run each, else a paired bootstrap over the same rows).")
                if rows[0].get("n") and rows[0]["top1_mean"] is not None else "")
    parts = [
        section("Benchmark", run_facts, sid="facts"),
        section("Leaderboard", f"<p>Mean and standard deviation over seeds of top-1 accuracy on {esc(split)}, "
                                f"per backbone, layer, source, head and shots; best first.</p>"
                                + ("" if held_out else note(f"No test split: {split} is the split each sweep selected "
                                                            f"its value on, so these scores are optimistic, not held "
                                                            f"out. Add a test split to rank on held-out data.")),
                 html_table, resolves,
                 plot(lambda p: plots.leaderboard_intervals(rows, p), tmp, "leaderboard.png", "leaderboard intervals",
                       "Top-1 with its 95% interval; blue rows are tied with #1."),
                 sid="leaderboard-section"),
        section("Accuracy vs shots",
                 plot(lambda p: plots.shots_curve(records, p, split=split, rows=rows), tmp, "shots.png", "accuracy vs shots",
                       "Mean over seeds, band ±1 std, bars the 95% interval; a backbone run on several layers "
                       "shows its best layer.")),
        section("Accuracy by layer",
                 plot(lambda p: plots.accuracy_by_layer(records, p, split=split, rows=rows), tmp, "layers.png",
                       "accuracy by layer")),
        section("Where the time goes",
                 plot(lambda p: plots.time_breakdown(records, p), tmp, "time.png", "time breakdown",
                       "Extraction is paid once per cache and reused by every fit on it.")),
    ]
    best = rows[0]
    lede = (f"Linear-probe benchmark of {len(records)} runs. Best: {best['backbone']} · {best['layer']} · "
            f"{best['head']} with {shots_label(best['shots'])} shots, top-1 {fmt(best['top1_mean'])} on {split}."
            if best["top1_mean"] is not None else f"Linear-probe benchmark of {len(records)} runs.")
    return Page("featcache benchmark", title, lede, "".join(parts))


# --- layers page -----------------------------------------------------------------------------

_LAYER_COLUMNS = (("dim", "dim"), ("top1", "top-1"), ("balanced_accuracy", "balanced acc."),
                  ("macro_f1", "macro F1"), ("log_loss", "log-loss"))


def _recommendation_html(rec: dict) -> str:
    if not rec:
        return note("layers.json holds no recommendation.")
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
    nxt = rec.get("vs_next")
    if isinstance(nxt, dict):
        details.append(f"{'distinguishably' if nxt.get('distinguishable') else 'not distinguishably'} better than the "
                       f"next layer, {nxt.get('layer')} (McNemar p {nxt.get('p_value') or 1.0:.2f})")
    return ('<div class="callout" id="recommendation">'
            f'<p class="big">{esc(headline)}</p>'
            f"<p>Strategy: <strong>{esc(strategy)}</strong>. {esc('; '.join(details))}.</p>"
            + (f"<p>{esc(rec['reason'])}</p>" if rec.get("reason") else "") + "</div>")


def _layers_page(src: Path, tmp: Path) -> Page:
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
        cells = [esc(name) + tags]
        for k, _ in cols:
            ci = format_interval(r.get("top1_ci")) if k == "top1" else ""
            cells.append((bar_cell(r.get(k)) + (f'<br><span class="ci">{esc(ci)}</span>' if ci else "")) if k == "top1"
                         else esc(fmt(r.get(k))))
        cells.append(esc(f"{best['param']} = {fmt_value(best.get('value'))}") if best.get("param") else "–")
        cells.append(esc(seconds(r.get("fit_seconds"))))
        rows.append(cells)
        classes_.append("freeze" if name == freeze else "tune" if name in tune else "")
    html_table = table([("layer", "wrap"), *[(h, "num") for _, h in cols], ("best value", "num"), ("fit", "num")],
                   rows, table_id="layers", row_classes=classes_)
    splits = _join(r.get("split") for r in layers if r.get("split"))
    run_facts = facts([("backbone", backbone), ("source", source), ("head", head), ("scored on", splits),
                    ("layers probed", len(layers)), ("cache", doc.get("cache"))])
    parts = [
        section("Recommendation", _recommendation_html(rec), sid="recommendation-section"),
        section("Accuracy by depth",
                 plot(lambda p: plots.layer_curve(layers, p, recommendation=rec,
                                                   title=f"{backbone} on {source}: {head} head per layer"),
                       tmp, "layers.png", "accuracy by depth",
                       "The dashed line is the freeze boundary; shaded layers are the ones to fine-tune; bars are "
                       "95% intervals.")
                 if layers else note("No layers were probed.")),
        section("Layers", html_table, sid="layers-section"),
        section("Probe", run_facts, sid="facts"),
    ]
    title = f"Which layers to freeze: {backbone}"
    lede = (f"The same {head} head fitted on every stage of {backbone} over {source}; how well each depth "
            f"transfers tells where to stop freezing.")
    return Page("featcache layer probe", title, lede, "".join(parts))


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
        page = render(_PAGES[kind](src, Path(tmp)), src)
    out = Path(out)
    if out.is_dir():
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, page)
    return out


__all__ = ["write_report"]
