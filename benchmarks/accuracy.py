"""The best frozen-feature accuracy on small, imbalanced, low-resolution data (issue 24).

    python -m benchmarks accuracy        # EfficientNet-Lite0 (real weights) on three proxies, CPU

Three proxies, built at run time under ``$FEATCACHE_BENCH_DIR/accuracy`` (default
``/tmp/featcache-bench``; nothing is copied into the repository) from what is on this machine, each
split 60/20/20 into train / val / test, stratified, seed 0 (a rerun reuses their caches):

- ``digits2``: scikit-learn digits (8x8 grey, upsampled by the backbone's resize to 224 px) 3 against
  8, with 8 subsampled to 1:3;
- ``digits3``: digits 3, 5 and 8 (the confusable ones), 5 and 8 subsampled to 1:3 of 3;
- ``hymenoptera28``: the real ants/bees set, downscaled to 28 px grayscale, bees subsampled to 1:3.

Each proxy is extracted once with ``--layer all`` (every stage and pre_logits in one pass), then
with no ``--layer``: on these small data sets a plain ``extract`` taps the same layers
(:func:`featcache.backbones.taps.default_layers`), so it has the same fingerprint and is a cache hit
on the same file (checked). On it, every path is selected on val and reported on val and test
(accuracy; balanced accuracy and ROC-AUC on test):

- ``plain``: the default path before issue 24 (pre_logits, no class weights, select by top-1);
- ``documented``: the documented best path before issue 24: every single layer swept, class_weight
  balanced, select by balanced accuracy;
- ``joins``: the same with the layer sets of ``--layer all`` (runs of 2-4 adjacent layers);
- ``default-1``: ``fit-head`` with no options on a one-layer cache (``extract --layer pre_logits``,
  what a plain ``extract`` wrote before it tapped every stage of a small data set): the same
  adaptations except the layer sweep, i.e. ``layer=pre_logits`` with the rest left unset;
- ``default``: ``extract`` and ``fit-head`` with no options (what the adaptive defaults choose:
  balanced class weights and selection, each single layer swept, the temperature kept only where
  the held-out check on val says it helps).

The test splits hold 49-61 images: one image moves test accuracy by 1.6-2 points.

The wall time of each fit is printed; on a loaded machine it is not a valid timing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from featcache import extract
from featcache.runs.fit import fit_head
from featcache.store.cache import open_cache

from .common import WORK, Row, require_real_data

BACKBONE = "efficientnet_lite0"
PATHS = {
    "plain": dict(layer="pre_logits", class_weight="none", select_by="top1"),
    "documented": dict(layer="singles", class_weight="balanced", select_by="balanced_accuracy"),
    "joins": dict(layer="all", class_weight="balanced", select_by="balanced_accuracy"),
    "default": {},
    "default-1": dict(layer="pre_logits"),
}


def _split(labels: np.ndarray, rng) -> dict[str, np.ndarray]:
    out = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a, b = int(round(0.6 * len(idx))), int(round(0.8 * len(idx)))
        out["train"] += idx[:a].tolist()
        out["val"] += idx[a:b].tolist()
        out["test"] += idx[b:].tolist()
    return {k: np.sort(np.asarray(v)) for k, v in out.items()}


def _npz(path: Path, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> Path:
    parts = _split(labels, np.random.default_rng(seed))
    np.savez(path, **{f"{s}_images": images[i] for s, i in parts.items()},
             **{f"{s}_labels": labels[i] for s, i in parts.items()})
    return path


def _subsample(images, labels, minority: list[int], ratio: int, seed: int = 0):
    """Keep 1/ratio of the largest class's count for each class in ``minority``."""
    rng = np.random.default_rng(seed)
    big = max(np.sum(labels == c) for c in np.unique(labels) if c not in minority)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep += (rng.choice(idx, size=big // ratio, replace=False) if c in minority else idx).tolist()
    keep = np.sort(np.asarray(keep))
    return images[keep], labels[keep]


def build_proxies(root: Path) -> dict[str, Path]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    digits = (d.images * 255 / 16).astype(np.uint8)
    out = {}
    sel = np.isin(d.target, [3, 8])
    y2 = (d.target[sel] == 8).astype(np.int64)
    out["digits2"] = _npz(root / "digits2.npz", *_subsample(digits[sel], y2, [1], 3))
    sel = np.isin(d.target, [3, 5, 8])
    y3 = np.searchsorted([3, 5, 8], d.target[sel]).astype(np.int64)
    out["digits3"] = _npz(root / "digits3.npz", *_subsample(digits[sel], y3, [1, 2], 3))
    real = require_real_data()
    images, labels = [], []
    for split in ("train", "val"):
        for ci, c in enumerate(("ants", "bees")):
            for f in sorted((real / split / c).iterdir()):
                im = Image.open(f).convert("L").resize((28, 28), Image.BICUBIC)
                images.append(np.asarray(im, dtype=np.uint8))
                labels.append(ci)
    out["hymenoptera28"] = _npz(root / "hymenoptera28.npz",
                                *_subsample(np.stack(images), np.asarray(labels, np.int64), [1], 3))
    return out


def _fit(cache: str, out: Path, options: dict) -> dict:
    options = dict(options)
    if options.get("layer") == "singles":
        with open_cache(cache) as c:
            options["layer"] = ",".join(c.layers)
    t = time.perf_counter()
    res = fit_head(cache, output=str(out), overwrite=True, **options)
    seconds = time.perf_counter() - t
    test = res.metrics["test"]
    layer = json.loads((Path(res.run) / "run.json").read_text())["layer"]
    return {"val": res.best.get("score"), "select_by": res.best.get("select_by"), "layer": layer,
            "val_top1": res.metrics["val"]["top1"],
            "test_top1": test["top1"], "test_bal": test["balanced_accuracy"], "test_auc": test["roc_auc"],
            "adapted": res.best.get("adapted", []), "calibration": res.best.get("calibration"),
            "seconds": seconds}


def _detail(r: dict) -> str:
    cal = r.get("calibration") or {}
    ece = cal.get("ece", {}).get("test")
    skipped = " (skipped: no held-out gain)" if cal.get("skipped") else ""
    return (f"val {r['select_by']} {r['val']:.4f}, acc {r['val_top1']:.4f}; "
            f"test acc {r['test_top1']:.4f} bal {r['test_bal']:.4f} auc {r['test_auc']:.4f}; layer {r['layer']}"
            + (f"; T {cal['temperature']:.3f}{skipped}, test ECE {ece['before']:.3f} -> {ece['after']:.3f}"
               if ece else "")
            + (f"; adapted: {' | '.join(r['adapted'])}" if r["adapted"] else "")
            + f"; {r['seconds']:.1f} s fit")


def run() -> list[Row]:
    rows: list[Row] = []
    root = WORK / "accuracy"
    root.mkdir(parents=True, exist_ok=True)
    for name, npz in build_proxies(root).items():
        cache = extract(str(npz), backbone=BACKBONE, layers=("all",), cache_dir=str(root / "c"),
                        num_workers=0).cache
        plain = extract(str(npz), backbone=BACKBONE, cache_dir=str(root / "c"), num_workers=0)
        if plain.cache != cache or not plain.cache_hit:
            raise RuntimeError(f"{name}: a plain extract wrote {plain.cache}, not the --layer all cache {cache}")
        results = {p: _fit(plain.cache if p == "default" else cache, root / f"{name}-{p}", o)
                   for p, o in PATHS.items()}
        with open_cache(cache) as c:
            counts = {s: np.bincount(c.labels(s)).tolist() for s in c.splits}
        print(f"{name}: class counts {counts}", flush=True)
        for p, r in results.items():
            print(f"  {p:11s} {_detail(r)}", flush=True)
            rows.append(Row(f"accuracy {name} {p}", r["test_top1"], "-", True, _detail(r)))
        best = max(results, key=lambda p: results[p]["val"] if results[p]["select_by"] == "balanced_accuracy"
                   else -1)
        for path, cache_kind in (("default", "plain extract"), ("default-1", "one-layer cache")):
            gap = 100 * (results[best]["test_top1"] - results[path]["test_top1"])
            target = path == "default"  # the one-layer cache is the reference a plain extract no longer writes
            rows.append(Row(f"accuracy {name}: no-option fit-head ({cache_kind}) vs best path on val ({best}), "
                            f"test points below", gap, "<= 1 point" if target else "-", gap <= 1.0 or not target,
                            f"{path} {results[path]['test_top1']:.4f} vs {best} {results[best]['test_top1']:.4f}"))
    return rows
