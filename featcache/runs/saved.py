"""Saved runs: the folder ``fit-head`` writes (head, feature transform, ``run.json``,
``metrics.json``, ``sweep.csv``), loading it back without pickle, and scoring it on another cache."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save

from .artifacts import load_head, save_head
from ..errors import CacheError, ConfigError, HeadError
from ..common.files import write_bytes, write_json, write_text
from ..heads import layersets
from ..metrics.calibration import apply_temperature, temperature_of
from ..metrics.scores import expand_proba, split_metrics
from ..store.cache import FeatureCache, open_cache
from ..heads.transform import FeatureTransform

RUN_JSON = "run.json"
METRICS_JSON = "metrics.json"
SWEEP_CSV = "sweep.csv"
TRANSFORM = "transform.safetensors"
#: Per scored split, each row's true and predicted class index: what paired comparisons of two runs read.
PREDICTIONS = "predictions.safetensors"


def rows_digest(ids: list[str]) -> str:
    """Names a split's rows, in order: two runs compare row by row only when their digests agree."""
    import hashlib

    return hashlib.sha256("\n".join(ids).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def save_predictions(run: Path, rows: dict[str, dict]) -> None:
    """``rows`` {split: {"y", "pred", "digest"}} to ``run/predictions.safetensors`` (atomically)."""
    tensors = {f"{split}/{k}": np.ascontiguousarray(r[k], dtype=np.int32) for split, r in rows.items()
               for k in ("y", "pred")}
    meta = {split: r["digest"] for split, r in rows.items()}
    if tensors:
        write_bytes(run / PREDICTIONS, save(tensors, metadata=meta))


def load_predictions(run_dir: str | os.PathLike) -> dict[str, dict]:
    """{split: {"y", "pred", "digest"}} of a run folder; {} when it has none (an older run) or it is unreadable."""
    path = Path(run_dir) / PREDICTIONS
    if not path.is_file():
        return {}
    try:
        from safetensors import safe_open

        arrays = load_file(str(path))
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
    except Exception:  # a damaged file costs the comparison, not the leaderboard
        return {}
    return {split: {"y": arrays[f"{split}/y"], "pred": arrays[f"{split}/pred"], "digest": digest}
            for split, digest in meta.items() if f"{split}/y" in arrays and f"{split}/pred" in arrays}


def save_run(run: Path, head, transform: FeatureTransform, meta: dict, metrics: dict, sweep: list[dict],
              few_shot, seconds: float, warnings: list[str], history: list[dict] | None = None,
              rows: dict[str, dict] | None = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    save_predictions(run, rows or {})
    save_head(run, head, head_name=meta["config"]["head"], meta={})
    arrays, tmeta = transform.get_state()
    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()} or {"_empty": np.zeros(0, np.float32)}
    write_bytes(run / TRANSFORM, save(tensors))
    write_json(run / RUN_JSON, {**meta, "transform": tmeta, "format": "featcache-run", "version": 1})
    write_json(run / METRICS_JSON, {"metrics": metrics, "sweep": sweep, "best": meta["best"], "few_shot": few_shot,
                                    "seconds": seconds, "warnings": warnings, "history": history})
    select_by = meta["best"].get("select_by", "top1")
    extra = select_by not in ("top1", "log_loss")
    by_layer = any("layer" in r for r in sweep)
    lines = [("layer," if by_layer else "") + f"{meta['best']['param']},top1,log_loss" + (f",{select_by}" if extra else "")]
    for r in sweep:
        lines.append((f"{r['layer']}," if by_layer else "") + f"{r['value']},{r['top1']:.6f},{r['log_loss']:.6f}"
                     + (f",{r['score']:.6f}" if extra else ""))
    write_text(run / SWEEP_CSV, "\n".join(lines) + "\n")


@dataclass
class Run:
    """A saved run: head, feature transform and metadata (``run.json``)."""

    path: Path
    head: Any
    transform: FeatureTransform
    meta: dict

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probabilities over all the run's classes, shape (n_samples, n_classes), calibrated by the
        run's temperature (:mod:`featcache.metrics.calibration`)."""
        p = self.head.predict_proba(self.transform.transform(features.reshape(len(features), -1)))
        return apply_temperature(expand_proba(p, self.head.classes_, len(self.classes)), self.temperature)

    @property
    def temperature(self) -> float:
        """The calibration temperature fitted on the eval split (1.0: none)."""
        return temperature_of(self.meta)


def load_run(run_dir: str | os.PathLike) -> Run:
    """Load a run folder written by :func:`fit_head` (no pickle anywhere)."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_JSON
    if not path.is_file():
        raise HeadError(f"'{run_dir}' is not a featcache run (no {RUN_JSON}). Pass the folder fit-head wrote.")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise HeadError(f"'{path}' is not valid JSON ({e}). Re-run fit-head.") from None
    if isinstance(meta, dict) and meta.get("format") == "featcache-finetune":
        raise HeadError(
            f"'{run_dir}' is a finetune run (a whole fine-tuned network), not a head fitted on cached features; "
            f"predict, export and evaluate use fit-head runs. 'featcache report {run_dir}' shows its scores; to "
            f"predict with frozen features, extract a cache and run 'featcache fit-head'.")
    if not isinstance(meta, dict) or meta.get("format") != "featcache-run":
        raise HeadError(f"'{path}' is not a featcache run file. Re-run fit-head.")
    for key, kind in (("classes", list), ("layer", str), ("fingerprint", dict), ("transform", dict)):
        if not isinstance(meta.get(key), kind):
            raise HeadError(f"'{path}' lacks a valid '{key}'. Re-run fit-head.")
    head, _ = load_head(run_dir)
    try:
        arrays = load_file(str(run_dir / TRANSFORM))
    except Exception as e:
        raise HeadError(f"Cannot read '{run_dir / TRANSFORM}' ({e}). Re-run fit-head.") from None
    arrays.pop("_empty", None)
    try:
        transform = FeatureTransform.from_state(arrays, meta["transform"])
    except ConfigError as e:
        raise HeadError(f"'{run_dir / TRANSFORM}': {e} Re-run fit-head.") from None
    return Run(run_dir, head, transform, meta)


#: Fingerprint fields that must agree for a head to be valid on another cache's features.
COMPATIBLE_KEYS = ("backbone", "preprocess", "pool")


def check_compatible(run: Run, cache: FeatureCache) -> None:
    fp = cache.fingerprint
    for key in COMPATIBLE_KEYS:
        if fp.get(key) != run.meta["fingerprint"].get(key):
            raise CacheError(
                f"Cache '{cache.path.name}' does not match the run's features: its {key} differs "
                f"({json.dumps(fp.get(key))} vs {json.dumps(run.meta['fingerprint'].get(key))}). Extract the "
                f"data with the same backbone, weights and preprocessing."
            )
    layersets.check_cached(cache, run.meta["layer"])
    extra = [c for c in cache.classes if c not in run.classes]
    if extra:
        raise CacheError(
            f"Cache '{cache.path.name}' has classes the run was not fitted on: {', '.join(extra[:5])}"
            f"{', ...' if len(extra) > 5 else ''}. A head only scores data of its own classes ({len(run.classes)}: "
            f"{', '.join(run.classes[:5])}{', ...' if len(run.classes) > 5 else ''})."
        )


def evaluate(run_dir: str | os.PathLike, cache: str | os.PathLike) -> dict:
    """Score a saved run on every split of another cache (refused if its features differ).

    The cache's classes may be a subset of the run's: its labels are mapped to the run's classes,
    and each split's metrics list the run classes it has no samples of in ``absent_classes``
    (balanced accuracy and macro F1 are over the classes present).
    """
    run = load_run(run_dir)
    with open_cache(cache) as c:
        check_compatible(run, c)
        to_run = np.array([run.classes.index(name) for name in c.classes], dtype=np.int64)
        out = {}
        for split in c.splits:
            if c.n(split) == 0:
                continue
            X, y = layersets.load(c, split, run.meta["layer"])
            y = to_run[y]
            out[split] = split_metrics(y, run.predict_proba(X), run.classes)
            present = set(y.tolist())
            out[split]["absent_classes"] = [name for i, name in enumerate(run.classes) if i not in present]
    return out
