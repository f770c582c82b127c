"""What ``fit-head`` does with the options it was not given: defaults that follow the data.

On small or imbalanced data the plain defaults (the cache's first layer, equal class weights,
selection by top-1) lose several points of accuracy and of ROC-AUC to the best frozen-feature path
(``python -m benchmarks accuracy``). :func:`adapt_defaults` fills the options left unset from the
cache and the training labels, each change said in one line that ``best["adapted"]`` records:

- an imbalanced training split (largest class over smallest > :data:`IMBALANCE_RATIO`):
  ``class_weight=balanced`` for the heads that take it, and selection by balanced accuracy;
- a cache with several layers and at most :data:`SMALL_ROWS` training rows, for a head of vectors
  without ``shots``: every cached layer swept on the eval split (a comma list of them all). A plain
  ``extract`` of a small data set caches every stage for this
  (:func:`featcache.backbones.taps.default_layers`). Joined
  runs of adjacent layers (``layer=all``) are not a default: on the benchmark's three proxies they
  tied or won on val but not on test.

Balanced data and large training splits keep the plain defaults. An option given explicitly is
never changed: ``class_weight="none"``, ``select_by="top1"`` or ``layer=NAME`` keep the plain path,
and ``adapt=False`` turns every adaptation off.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ..heads import HEADS

if TYPE_CHECKING:
    from .config import FitConfig
    from ..store.cache import FeatureCache

#: Largest over smallest training class above which the data counts as imbalanced.
IMBALANCE_RATIO = 1.5
#: Training rows up to which a cache of several layers has its layers (and their joins) swept.
SMALL_ROWS = 20_000
#: ``class_weight`` value that asks for equal class weights explicitly (never adapted).
NO_WEIGHTS = "none"


def imbalance(y: np.ndarray, n_classes: int) -> float:
    """Largest over smallest count among the classes present in ``y`` (1.0 for one class)."""
    counts = np.bincount(y, minlength=n_classes)
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def adapt_defaults(cache: "FeatureCache", config: "FitConfig",
                   eval_split: str | None) -> tuple["FitConfig", list[str]]:
    """``config`` with its unset options chosen for ``cache`` (the sweep scored on ``eval_split``,
    None for k-fold), and one line per choice.

    Returns
    -------
    (FitConfig, list of str)
        A config whose ``select_by`` and ``class_weight`` are concrete (``class_weight`` None or
        ``"balanced"``), and the adaptations made, in words.
    """
    entry = HEADS.entry(config.head)
    lines: list[str] = []
    changes: dict = {}
    weight = None if config.class_weight == NO_WEIGHTS else config.class_weight
    select_by = config.select_by
    if config.adapt:
        y = cache.labels(config.train_split)
        ratio = imbalance(y, len(cache.classes))
        if ratio > IMBALANCE_RATIO:
            if config.class_weight is None and "class_weight" in entry.extra["options"]:
                weight = "balanced"
                lines.append(f"class_weight=balanced: the training split is imbalanced ({ratio:.1f}x between its "
                             f"largest and smallest class); pass class_weight=none for equal weights.")
            if select_by is None:
                select_by = "balanced_accuracy"
                lines.append(f"select_by=balanced_accuracy: top-1 favours the large classes on an imbalanced "
                             f"split ({ratio:.1f}x); pass select_by=top1 to select on top-1.")
        vectors = entry.extra["inputs"] != "activations"
        # Layers are chosen on a score: an eval split, or a grid the k-fold sweep scores.
        scored = eval_split is not None or entry.obj.param is not None
        if (config.layer is None and len(cache.layers) > 1 and vectors and scored and not config.shots
                and len(y) <= SMALL_ROWS):
            changes["layer"] = ",".join(cache.layers)
            lines.append(f"layer sweep: {len(y)} training rows and {len(cache.layers)} cached layers; each layer is "
                         f"swept on the eval split (pass layer=all to add runs of adjacent layers, layer=NAME for "
                         f"one).")
    changes.update(class_weight=weight, select_by=select_by or "top1")
    return replace(config, **changes), lines


def check_labels(cache: "FeatureCache", config: "FitConfig", y_train: np.ndarray, warn) -> None:
    """Warn about classes that no head can learn (absent from train) and about imbalance."""
    counts = np.bincount(y_train, minlength=len(cache.classes))
    unseen: dict[str, list[str]] = {}
    for split in cache.splits:
        if split == config.train_split or cache.n(split) == 0:
            continue
        n_split = np.bincount(cache.labels(split), minlength=len(cache.classes))
        for i in np.flatnonzero((n_split > 0) & (counts == 0)):
            unseen.setdefault(cache.classes[i], []).append(f"{split}: {int(n_split[i])}")
    for name, where in unseen.items():
        warn(f"Class '{name}' has no rows in the '{config.train_split}' split but has rows in "
             f"{', '.join(where)}. No head can predict it, so those rows count as errors in every metric. "
             f"Add training images of '{name}' or remove its rows from the other splits.")
    present = counts[counts > 0]
    if len(present) >= 2 and present.max() > IMBALANCE_RATIO * present.min():
        big, small = int(np.argmax(np.where(counts > 0, counts, -1))), int(np.argmin(np.where(counts > 0, counts, np.inf)))
        weighable = "class_weight" in HEADS.entry(config.head).extra["options"]
        if (config.class_weight is None and weighable) or config.select_by == "top1":
            warn(f"The training split is imbalanced: class '{cache.classes[big]}' has {int(counts[big])} rows, "
                 f"'{cache.classes[small]}' {int(counts[small])} ({counts[big] / counts[small]:.1f}x). Top-1 "
                 f"favours the large classes; consider class_weight=balanced select_by=balanced_accuracy.")

