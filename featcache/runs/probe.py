"""Which layers to freeze? Tap every stage in one forward pass, fit the same head on each, and
recommend the freeze boundary from the accuracy-by-depth curve."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dataclasses import replace

from ..backbones import PRE_LOGITS, load_backbone
from ..errors import ConfigError
from ..common.files import write_json
from ..extraction.pipeline import extract
from ..extraction.options import ExtractConfig
from .fit import FitConfig, check_options, fit_head
from ..metrics.intervals import paired_difference
from .saved import load_predictions
from ..sources import open_source
from ..store.cache import open_cache

LAYERS_JSON = "layers.json"
#: Accuracy within this many points of the best counts as "as good": prefer the deeper boundary
#: (more of the network frozen, which is cheaper and needs fewer labels).
TOLERANCE = 0.005


def recommend(layers: list[dict], *, tolerance: float = TOLERANCE, rows: dict | None = None) -> dict:
    """Freeze boundary from an accuracy-by-depth curve.

    Parameters
    ----------
    layers : list of dict
        In forward order, each with ``name`` and ``top1`` (a fraction); the last one is the
        network's final features (``pre_logits``).
    tolerance : float
        A fraction of accuracy, like ``top1`` (0.005 = 0.5 points).
    rows : dict, optional
        ``{layer name: (y, pred)}``, each layer's labels and predicted classes on the same rows of
        the split it was scored on: the recommended layer is then compared, paired, with the next
        layer (:func:`featcache.metrics.intervals.paired_difference`).

    Returns
    -------
    dict
        ``freeze_until`` (the deepest layer whose accuracy is within ``tolerance`` of the best: the
        features up to it transfer as-is), ``fine_tune`` (the stages after it, which the task needs
        its own version of), ``strategy`` (``linear-probe`` when nothing needs fine-tuning, else
        ``partial-fine-tune``), ``probe_layer`` (the layer a linear probe should read: the final
        features when they are within ``tolerance`` of the best, else ``freeze_until``),
        ``best_layer``, ``best_top1``, ``last_top1``, ``gap_points`` (best minus final, in points),
        ``tolerance`` and a ``reason`` whose every number is one of these. With ``rows``, also
        ``vs_next`` (None for the last layer): ``layer``, ``diff`` (recommended minus next, a
        fraction), ``diff_ci``, ``p_value``, ``distinguishable``; when the two are not
        distinguishable at 95%, the reason says so.
    """
    if not layers:
        raise ConfigError("recommend() needs at least one layer with a 'top1' score.")
    best = max(layers, key=lambda r: r["top1"])
    good = [i for i, r in enumerate(layers) if r["top1"] >= best["top1"] - tolerance]
    k = max(good)
    freeze = layers[k]
    fine_tune = [r["name"] for r in layers[k + 1:] if r["name"] != PRE_LOGITS]
    last = layers[-1]
    gap = (best["top1"] - last["top1"]) * 100
    if k == len(layers) - 1:
        strategy, probe = "linear-probe", last["name"]
        reason = (f"The final features ({last['name']}, top-1 {last['top1']:.3f}) are within {tolerance * 100:.1f} "
                  f"points of the best layer ({best['name']}, {best['top1']:.3f}; {gap:.1f} points apart): the "
                  f"pretrained network transfers as-is. Freeze everything and train a linear head.")
    elif not fine_tune:
        # Only the pooled final features come after the boundary: nothing to fine-tune, but the
        # probe should read the boundary, not the final features, which lose accuracy.
        strategy, probe = "linear-probe", freeze["name"]
        reason = (f"{freeze['name']} (top-1 {freeze['top1']:.3f}) beats the final features ({last['name']}, "
                  f"{last['top1']:.3f}) by {(freeze['top1'] - last['top1']) * 100:.1f} points, more than the "
                  f"tolerance of {tolerance * 100:.1f}, and no stage after it is left to fine-tune. Freeze "
                  f"everything and train a linear head on {freeze['name']} (fit-head --layer {freeze['name']}).")
    else:
        strategy, probe = "partial-fine-tune", freeze["name"]
        reason = (f"{freeze['name']} (top-1 {freeze['top1']:.3f}) beats the final features ({last['name']}, "
                  f"{last['top1']:.3f}) by {(freeze['top1'] - last['top1']) * 100:.1f} points, more than the "
                  f"tolerance of {tolerance * 100:.1f}: the layers after it are specific to the pretraining task. "
                  f"Freeze up to {freeze['name']} and fine-tune {', '.join(fine_tune)} with a new classifier.")
    out = {"freeze_until": freeze["name"], "fine_tune": fine_tune, "strategy": strategy, "probe_layer": probe,
           "best_layer": best["name"], "best_top1": best["top1"], "last_top1": last["top1"],
           "gap_points": gap, "tolerance": tolerance, "reason": reason}
    if rows is not None:
        out["vs_next"] = None
        nxt = layers[k + 1] if k + 1 < len(layers) else None
        if nxt is not None and freeze["name"] in rows and nxt["name"] in rows:
            (y, pred), (_, pred_next) = rows[freeze["name"]], rows[nxt["name"]]
            c = paired_difference(y, pred == y, pred_next == y)
            out["vs_next"] = {"layer": nxt["name"], "diff": c["diff"], "diff_ci": c["diff_ci"], "p_value": c["p_value"],
                              "distinguishable": c["distinguishable"]}
            if not c["distinguishable"]:
                out["reason"] += (f" On these {len(y)} images, {freeze['name']} is not distinguishably better than the "
                                  f"next layer, {nxt['name']} (top-1 {nxt['top1']:.3f}; McNemar p {c['p_value']:.2f}): "
                                  f"the split cannot tell them apart, so a larger split may move the boundary.")
    return out


@dataclass
class LayerProbeResult:
    out_dir: str
    backbone: str
    source: str
    head: str
    layers: list[dict]
    recommendation: dict
    cache: str
    plot: str | None

    def to_dict(self) -> dict:
        return {"out_dir": self.out_dir, "backbone": self.backbone, "source": self.source, "head": self.head,
                "cache": self.cache, "layers": self.layers, "recommendation": self.recommendation,
                "plot": self.plot}


def probe_layers(backbone: str, source: str, *, out_dir: str | os.PathLike = "layers-out", head: str = "logreg",
                 extract_config: ExtractConfig | None = None, fit_config: FitConfig | None = None,
                 progress=None, tolerance: float = TOLERANCE) -> LayerProbeResult:
    """Fit ``head`` on every stage of ``backbone`` (all tapped in one forward pass) and recommend
    where to freeze. Writes ``layers.json`` and ``layers.png`` to ``out_dir``."""
    ex = extract_config or ExtractConfig()
    fit_config = fit_config or FitConfig()
    check_options(replace(fit_config, head=head))
    if ex.pool == "none":
        raise ConfigError("probe-layers fits one head per layer on pooled features; pool=none keeps whole maps. "
                          "Pass pool=avg, max or avgmax.")
    # Checked before the forward passes: the layers are scored on a split other than train.
    src = open_source(source, val_fraction=ex.val_fraction, split_seed=ex.split_seed)
    if not set(src.splits) - {fit_config.train_split}:
        raise ConfigError(f"Source '{source}' has no split besides {fit_config.train_split} to score layers on. Pass "
                          f"val_fraction=0.2 to carve one out, or add a val/ folder.")
    ex = replace(ex, val_fraction=None)  # carved into src above; its split policy stays in the fingerprint
    bb = load_backbone(backbone, weights=ex.weights, input_size=ex.input_size, mean=ex.mean, std=ex.std)
    if not bb.stages:
        raise ConfigError(
            f"{bb.name} has no known stages to probe. Pass stages explicitly with 'featcache bench --layer ...'."
        )
    taps = list(bb.stage_layers)
    res = extract(src, ex, backbone=backbone, layers=tuple(taps), pool=ex.pool, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_cache(res.cache) as c:
        dims = {layer: int(c.features(c.splits[0], layer).shape[1]) for layer in taps}
    rows, predictions = [], {}
    for i, layer in enumerate(taps):
        # The folder belongs to this probe: a re-run replaces its per-layer runs with layers.json.
        fit = fit_head(res.cache, fit_config, head=head, layer=layer, output=str(out / "runs" / f"{i:02d}-{layer}"),
                       overwrite=True)
        split = "val" if "val" in fit.metrics else next(iter(fit.metrics))
        m = fit.metrics[split]
        rows.append({"name": layer, "depth": i, "top1": m["top1"], "top1_ci": m.get("top1_ci"), "n": m["n"],
                     "balanced_accuracy": m["balanced_accuracy"], "macro_f1": m["macro_f1"],
                     "log_loss": m["log_loss"], "split": split, "best": fit.best, "fit_seconds": fit.seconds,
                     "dim": dims[layer]})
        saved = load_predictions(fit.run).get(split)
        if saved is not None:
            predictions[layer] = (saved["y"], saved["pred"])
    rec = recommend(rows, tolerance=tolerance, rows=predictions)
    from ..reports import plots

    plot = plots.layer_curve(rows, out / "layers.png", recommendation=rec)
    doc = {"backbone": backbone, "source": source, "head": head, "cache": res.cache, "layers": rows,
           "recommendation": rec}
    write_json(out / LAYERS_JSON, doc)
    return LayerProbeResult(str(out), backbone, source, head, rows, rec, res.cache, str(plot))
