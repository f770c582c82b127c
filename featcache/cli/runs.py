"""Commands that fit and use heads: ``fit-head``, ``evaluate``, ``predict``, ``export``, ``finetune``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from ..backbones.base import DEFAULT_BACKBONE
from .common import echo_json, fail_cleanly, flag_names, print_metrics


def _head_options(pairs: tuple[str, ...]) -> dict:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise click.BadParameter(f"expects KEY=VALUE, got {p!r}.", param_hint="--opt")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@click.command(name="fit-head")
@click.argument("cache", type=click.Path())
@click.option("--head", default="logreg", show_default=True, help="Head name (see 'featcache heads').")
@click.option("--layer", default=None,
              help="Cached layer to fit on, or layers joined with '+' (stage5+stage6); 'all' or a comma list "
                   "sweeps them too ('all': every layer and every run of 2-4 adjacent layers). Default: the "
                   "first layer, or each layer swept on a cache of several layers and a small training split.")
@click.option("--train-split", default="train", show_default=True)
@click.option("--eval-split", default=None,
              help="Split the sweep is scored on (default: val when present, else k-fold on train); "
                   "'none': k-fold on train even when val exists. Never test, nor the training split.")
@click.option("--normalize", type=click.Choice(["none", "l2", "standard"]), default="standard", show_default=True,
              help="Feature normalisation, fitted on the training split.")
@click.option("--pca", type=int, default=None, help="Reduce to N principal components (fitted on train).")
@click.option("--C", "--grid", "grid", default=None,
              help="Regularisation grid: 0.01,0.1,1 or logspace:-4:4:13 (default: the head's own).")
@click.option("--class-weight", type=click.Choice(["balanced", "none"]), default=None,
              help="Weigh classes by inverse frequency, or 'none' for equal weights (default: balanced on an "
                   "imbalanced training split).")
@click.option("--select-by", type=click.Choice(["top1", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss"]),
              default=None, help="Metric the sweep selects on (default: balanced_accuracy on an imbalanced training "
                                 "split, else top1).")
@click.option("--adapt/--no-adapt", default=True, show_default=True,
              help="Choose the options not given (layer, class weights, selection metric) from the data; each "
                   "choice is printed and recorded in best.adapted.")
@click.option("--train-views", is_flag=True,
              help="Train on the cached augmented views too (extract --views K): K extra rows per image, grouped "
                   "with it (heads of vectors).")
@click.option("--extend-grid/--no-extend-grid", default=True, show_default=True,
              help="Extend the grid a decade at a time while the best value sits at an end.")
@click.option("--threads", type=int, default=None,
              help="Threads of the head's pool (default: 1 for small problems, every core for large ones).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--refit-on-trainval", is_flag=True, help="Refit the chosen value on train + val.")
@click.option("--shots", type=int, default=None, help="Few-shot: K training examples per class.")
@click.option("--seeds", type=int, default=1, show_default=True, help="Few-shot: number of random draws.")
@click.option("--cv", type=int, default=None, help="Folds of the sweep when there is no eval split (default 5).")
@click.option("--max-memory", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="GiB of features to load into memory; larger caches are streamed (linear, mlp).")
@click.option("--epochs", type=int, default=None, help="Training epochs (tail, mlp, linear with adamw).")
@click.option("--lr", type=float, default=None, help="Learning rate (tail, mlp, linear with adamw).")
@click.option("--batch-size", type=int, default=None, help="Mini-batch size (tail, mlp, linear with adamw).")
@click.option("--patience", type=int, default=None,
              help="Stop after N epochs without a better eval score; keep the best epoch (tail, mlp, linear with adamw).")
@click.option("--opt", "opts", multiple=True, help="Head option KEY=VALUE (repeatable), e.g. --opt solver=adamw.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None, help="Run folder.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in -o, as a whole (refused without it).")
@click.option("--runs-dir", type=click.Path(file_okay=False), default="runs", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"run", "head", "best", "metrics" (each score with its 95% interval, e.g. top1_ci), '
                   '"seconds", "warnings"}.')
@fail_cleanly(interrupted="Stopped (Ctrl-C) before the fit finished; no run was written (an existing one is "
                          "unchanged).")
def fit_head(cache, head, layer, train_split, eval_split, normalize, pca, grid, class_weight, select_by, adapt,
             train_views, extend_grid, threads, seed, refit_on_trainval, shots, seeds, cv, max_memory, epochs, lr,
             batch_size, patience, opts, output, overwrite, runs_dir, quiet, as_json) -> None:
    """Fit a head on CACHE: sweep its regularisation, keep the model that scored best, score every other split.

    With --head tail, CACHE holds the activations at a freeze boundary (extract --layer B --pool none):
    the pretrained layers after B get a new classifier and are trained on them, sampling the cached
    augmented views (extract --views K) when there are any.
    """
    from ..runs.fit import FitConfig, fit_head as run, parse_grid
    from ..heads import HEADS

    head_opts = _head_options(opts)
    for name, value in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size), ("patience", patience)):
        if value is not None:
            if name not in HEADS.entry(head).extra["options"]:
                raise click.ClickException(f"--{name.replace('_', '-')} does not apply to head '{head}'. "
                                           f"Drop --{name.replace('_', '-')}.")
            head_opts[name] = value

    config = FitConfig(head=head, layer=layer, train_split=train_split, eval_split=eval_split, normalize=normalize,
                       pca=pca, grid=parse_grid(grid), class_weight=class_weight, select_by=select_by,
                       extend_grid=extend_grid, threads=threads, seed=seed,
                       refit_on_trainval=refit_on_trainval, shots=shots, seeds=seeds, cv=cv,
                       max_memory=int(max_memory * 2**30), head_options=head_opts, output=output,
                       runs_dir=runs_dir, overwrite=overwrite, adapt=adapt,
                       train_views=train_views)
    fit_log = logging.getLogger("featcache.runs.fit")
    level = fit_log.level
    fit_log.setLevel(logging.ERROR)  # its warnings are printed below, once, with the result
    bar = _EpochBar(quiet or as_json)
    try:
        res = run(cache, config, progress=bar)
    finally:
        bar.close()
        fit_log.setLevel(level)
    res.warnings = [flag_names(w) for w in res.warnings]
    if as_json:
        echo_json(res.to_dict())
        return
    for w in res.warnings:
        click.echo(f"Warning: {w}", err=True)
    for line in res.best.get("adapted", []):
        click.echo(f"Adapted: {flag_names(line)}")
    _print_fit(res, shots, seeds)


def _print_fit(res, shots: int | None, seeds: int) -> None:
    from ..metrics.intervals import detectable_difference_line
    from ..metrics.scores import format_interval, format_metrics_table

    b = res.best
    if b.get("score") is not None:
        name = "top-1" if b["select_by"] == "top1" else b["select_by"]
        value = f" {b['param']}={b['value']:g}" if b.get("param") else ""
        where = f" on layer {b['layer']}" if b.get("layer") else ""
        click.echo(f"{res.head}: best{value}{where} ({name} {b['score']:.4f} on {b['scored_on']})")
    if b.get("grid_extended") or b.get("at_bound"):
        added = ", ".join(f"{v:g}" for v in b.get("grid_extended") or [])
        click.echo(f"{res.head}: the best {b['param']} sat at an end of the grid"
                   + (f"; extended by {added}" if added else "")
                   + (f"; {b['param']}={b['value']:g} is as far as the search goes"
                      if b.get("at_bound") else ""))
    print_metrics(res.metrics, format_metrics_table)
    if res.few_shot:
        for split, m in res.few_shot["summary"].items():
            t = m.get("top1")
            if t:
                pooled = f" (pooled 95% CI {format_interval(t['ci'])})" if t.get("ci") else ""
                click.echo(f"{shots}-shot over {seeds} seed(s), {split} top-1: {t['mean']:.4f} +- {t['std']:.4f}"
                           + pooled)
    held_out = [s for s in res.metrics if s != b.get("scored_on")]
    split = "test" if "test" in held_out else (held_out or list(res.metrics) or [None])[0]
    if split is not None:
        m = res.metrics[split]
        click.echo(f"{split}: {detectable_difference_line(m['n'], m.get('top1'), split)}")
    click.echo(f"run saved to {res.run} ({res.seconds:.1f} s)")


class _EpochBar:
    """A tqdm bar over the epochs of a head trained by epochs, with its loss and eval score."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar = quiet, None

    def __call__(self, info: dict) -> None:
        if self.quiet:
            return
        if self.bar is None or info["epoch"] <= self.bar.n:  # a new training run (another grid or fold)
            from tqdm import tqdm

            self.close()
            self.bar = tqdm(total=info["epochs"], desc="train", unit="epoch", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(info["epoch"] - self.bar.n)
        shown = {"loss": f"{info['loss']:.4f}"}
        if info.get("score") is not None:
            shown[info["metric"]] = f"{info['score']:.4f}"
        self.bar.set_postfix(shown)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.command()
@click.argument("run_dir", type=click.Path())
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@fail_cleanly
def evaluate(run_dir, cache, as_json) -> None:
    """Score a saved head (RUN_DIR) on every split of another CACHE of the same backbone and layer."""
    from ..runs.saved import evaluate as run
    from ..metrics.scores import format_metrics_table

    metrics = run(run_dir, cache)
    if as_json:
        echo_json({"run": run_dir, "cache": cache, "metrics": metrics})
        return
    print_metrics(metrics, format_metrics_table)
    for split, m in metrics.items():
        if m["absent_classes"]:
            n = len(m["classes"]) - len(m["absent_classes"])
            click.echo(f"{split}: scored on the {n} of {len(m['classes'])} run classes it holds; no samples of "
                       f"{', '.join(m['absent_classes'])} (balanced accuracy and macro F1 are over the classes present)")


@click.command()
@click.argument("run_dir", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top", type=int, default=5, show_default=True, help="Classes to list per image.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Backbone weights file, if the run's original file moved.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write predictions to a .csv or .json file.")
@click.option("--tta", type=int, default=0, show_default=True,
              help="Test-time augmentation: average the probabilities of the image and K augmented views.")
@click.option("--json", "as_json", is_flag=True, help='Print {"predictions": [{"path", "label", "probability", "top"}]}.')
@fail_cleanly(interrupted="Stopped (Ctrl-C) before every image was classified; nothing was written.")
def predict(run_dir, images, top, batch_size, device, weights, output, tta, as_json) -> None:
    """Classify IMAGES (files, folders, or sources: wds:DIR, parquet:PATH, hf:NAME, a URL) end to end with the
    backbone and head of RUN_DIR."""
    from ..runs.inference import predict as run

    if output and Path(output).suffix.lower() not in (".csv", ".json"):  # refused before any image is read
        raise click.BadParameter(f"must end in .csv or .json, got {output!r}.", param_hint="--output")
    if output:  # its folder too
        from ..runs.outputs import check_output_file

        check_output_file(output, overwrite=True, suffixes=(".csv", ".json"))
    preds = run(run_dir, list(images), top=top, batch_size=batch_size, device=device, weights=weights, tta=tta)
    if output:
        _write_predictions(preds, output)
    if as_json:
        echo_json({"predictions": preds})
        return
    for p in preds:
        if p["label"] is None:
            click.echo(f"{p['path']}: skipped ({p['error']})")
        else:
            others = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in p["top"][1:])
            click.echo(f"{p['path']}: {p['label']} {p['probability']:.3f}" + (f"  ({others})" if others else ""))


def _write_predictions(preds: list[dict], output: str) -> None:
    """``preds`` as JSON or CSV (by the suffix, checked before predicting), written atomically."""
    import csv
    import io

    from ..common.files import write_json, write_text

    if Path(output).suffix.lower() == ".json":
        write_json(output, {"predictions": preds})
        return
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["path", "label", "probability", "top"])
    for p in preds:
        w.writerow([p["path"], p["label"], p["probability"],
                    ";".join(f"{t['label']}:{t['probability']:.6f}" for t in p["top"])])
    write_text(output, buf.getvalue())


@click.command()
@click.argument("run_dir", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Backbone weights file.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (refused without it).")
@click.option("--json", "as_json", is_flag=True, help='Print {"program", "classes", "preprocess", ...}.')
@fail_cleanly
def export(run_dir, out, weights, overwrite, as_json) -> None:
    """Export backbone + head of RUN_DIR as one torch.export program OUT (.pt2): normalised images -> logits.
    The classes and preprocessing travel inside it (featcache.load_export reads both). OUT must end in
    .pt2; an existing file is replaced only with --overwrite."""
    from ..runs.inference import EXPORT_META, export as run, load_export

    path = run(run_dir, out, weights=weights, overwrite=overwrite)
    meta = load_export(path).meta
    if as_json:
        echo_json({"program": str(path), **meta})
        return
    pp = meta["preprocess"]
    click.echo(f"wrote {path}: normalised images (batch, 3, {pp['crop']}, {pp['crop']}) -> logits")
    click.echo(f"  classes:    {len(meta['classes'])} ({', '.join(meta['classes'])})")
    click.echo(f"  preprocess: resize {pp['resize']} ({pp['interpolation']}), centre crop {pp['crop']}, "
               f"mean {pp['mean']}, std {pp['std']}")
    click.echo(f"  load with featcache.load_export(path) (checks the input size; .meta holds the above), or "
               f"torch.export.load(path, extra_files={{'{EXPORT_META}': ''}}).module()")


@click.command()
@click.argument("source")
@click.option("-b", "--backbone", default=DEFAULT_BACKBONE, show_default=True, help="Backbone spec.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Local weights file.")
@click.option("--freeze-until", default=None, help="Stage B: B and everything before it stay frozen.")
@click.option("--train", "train", multiple=True, help="Train modules matching this pattern (repeatable), e.g. 'layer4*'.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", "num_workers", type=int, default=None,
              help="Decoding worker processes [default: none on a CPU; on a GPU this process's share of the "
                   "usable CPUs, at most 8].")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Autocast precision; auto: bf16 on GPUs and CPUs with native bf16, fp16 on older GPUs, else fp32.")
@click.option("--input-size", type=int, default=None, help="Override the crop size (px).")
@click.option("--val-fraction", type=float, default=None,
              help="Carve a stratified, seeded val split out of train when the source has none.")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of --val-fraction.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None, help="Run folder.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in -o, as a whole (refused without it).")
@click.option("--runs-dir", type=click.Path(file_okay=False), default="runs", show_default=True)
@click.option("--json", "as_json", is_flag=True, help='Print {"run", "metrics", "per_epoch", "seconds"}.')
@fail_cleanly(interrupted="Stopped (Ctrl-C) before training finished; no run was written (an existing one is "
                          "unchanged).")
def finetune(source, backbone, weights, freeze_until, train, epochs, lr, batch_size, seed, device, num_workers,
             precision, input_size, val_fraction, split_seed, output, overwrite, runs_dir, as_json):
    """Fine-tune the layers after a freeze boundary on raw images, the classic way (the reference
    that 'fit-head --head tail' on cached boundary activations is measured against)."""
    from ..runs.finetuning import FinetuneConfig, finetune as run

    config = FinetuneConfig(backbone=backbone, weights=weights, freeze_until=freeze_until, train=tuple(train),
                            epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device,
                            num_workers=num_workers, precision=precision, input_size=input_size, output=output,
                            runs_dir=runs_dir, overwrite=overwrite, val_fraction=val_fraction,
                            split_seed=split_seed)
    res = run(source, config, progress=None if as_json else (lambda msg: click.echo(msg, err=True)))
    if as_json:
        echo_json(res.to_dict())
        return
    from ..metrics.scores import format_metrics_table

    print_metrics(res.metrics, format_metrics_table)
    click.echo(f"run saved to {res.run} ({res.seconds:.1f} s)")
