"""Fitting heads from a cache: sweep the regularisation grid, refit the best, score, save.

The sweep chooses on the eval split (``val`` by default; ``"none"`` asks for k-fold), or by
stratified k-fold on the training split when there is none; never on ``test``. With an eval split
the saved head is the swept model that was selected (no refit), so ``best.score`` is the saved
head's score on that split. A best value at either end of the grid extends the grid a decade at a
time, up to the head's ``grid_bounds``. Metrics are reported for every split other than the training split.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from sklearn.base import clone

from ..heads import layersets
from .adapt import NO_WEIGHTS, adapt_defaults, check_labels
from .config import FitConfig
from ..metrics.calibration import apply_temperature, calibrate
from ..errors import ConfigError, HeadError
from ..heads import HEADS, make_head
from ..heads.base import BaseHead
from ..heads.monitor import training_monitor
from ..metrics.intervals import bootstrap_intervals
from ..metrics.scores import SELECT_BY, expand_proba, selection_scores, split_metrics
from .outputs import RunFolder, claim_folder
from ..retrieval.leaks import note_eval_leaks
from .saved import rows_digest, save_run
from ..common.runtime import head_threads
from ..store.cache import FeatureCache, open_cache
from ..heads.transform import FeatureTransform
from ..common.validation import check_choice, check_int, check_memory
from ..heads.view_rows import with_views

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    run: str
    head: str
    best: dict
    metrics: dict
    sweep: list[dict]
    seconds: float
    few_shot: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {"run": self.run, "head": self.head, "best": self.best, "metrics": self.metrics,
             "seconds": round(self.seconds, 3), "warnings": list(self.warnings)}
        if self.few_shot is not None:
            d["few_shot"] = self.few_shot
        return d


def parse_grid(text: str | None) -> tuple[float, ...] | None:
    """``"0.01,0.1,1"`` or ``"logspace:-4:4:13"`` -> a tuple of floats (None stays None)."""
    if text is None:
        return None
    if not text.strip():
        raise ConfigError("The grid (--C) is empty. Pass values, e.g. --C 0.01,0.1,1 or logspace:-4:4:13, or drop "
                          "--C for the head's own grid.")
    try:
        if text.startswith("logspace:"):
            lo, hi, n = text.split(":")[1:]
            return tuple(float(v) for v in np.logspace(float(lo), float(hi), int(n)))
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(
            f"The grid must be comma-separated numbers (0.01,0.1,1) or logspace:LO:HI:N. Got {text!r}."
        ) from None


def check_options(config: FitConfig) -> None:
    """Refuse options that do not apply to ``config.head`` or to this fit, before any feature is read.

    Raises
    ------
    ConfigError
        Naming the option and what to do instead.
    """
    entry = HEADS.entry(config.head)
    if config.grid is not None:
        if len(config.grid) == 0:
            parse_grid("")
        if entry.extra["param"] is None:
            raise ConfigError(f"--C does not apply to head '{config.head}': it sweeps no parameter. Drop --C.")
    valid = list(entry.extra["options"])
    for key in config.head_options:
        if key not in valid:
            raise ConfigError(f"Unknown option '{key}' for head '{config.head}'. Valid options: {', '.join(valid)}.")
    if config.class_weight and config.class_weight != NO_WEIGHTS and "class_weight" not in valid:
        raise ConfigError(f"Head '{config.head}' has no class_weight option; drop the 'class_weight' option.")
    if config.seeds != 1 and config.shots is None:
        raise ConfigError(f"seeds={config.seeds} applies to few-shot fits only. Add the 'shots' option or drop the "
                          f"'seeds' option.")


def _few_shot_indices(y: np.ndarray, shots: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        out.append(rng.choice(idx, size=min(shots, len(idx)), replace=False))
    return np.sort(np.concatenate(out))


class _Data:
    """Train / eval features of one layer, transformed, in memory or streamed."""

    def __init__(self, cache: FeatureCache, layer: str, config: FitConfig) -> None:
        self.cache, self.layer, self.config = cache, layer, config
        self.head = HEADS.get(config.head)

    def raw(self, split: str):
        if layersets.is_set(self.layer):
            nbytes = layersets.nbytes(self.cache, split, self.layer)
            if nbytes > self.config.max_memory:
                raise ConfigError(f"Split '{split}' of layer set '{self.layer}' needs {nbytes / 2**30:.1f} GiB as "
                                  f"float32, more than the 'max_memory' option allows; layer sets are read into "
                                  f"memory. Raise the 'max_memory' option or join fewer layers.")
            return layersets.load(self.cache, split, self.layer)[0]
        ds = self.cache.features(split, self.layer)
        nbytes = int(np.prod(ds.shape)) * 4
        if nbytes <= self.config.max_memory:
            X = self.cache.load(split, self.layer)[0]
            # Feature heads see vectors; heads of activations read the maps as they are.
            return X if self.head.inputs == "activations" else X.reshape(len(X), -1)
        if not self.head.streams:
            streaming = ", ".join(e.name for e in HEADS if e.obj.streams and e.obj.inputs == self.head.inputs)
            raise ConfigError(
                f"Split '{split}' of layer '{self.layer}' needs {nbytes / 2**30:.1f} GiB as float32, more than "
                f"the 'max_memory' option allows ({self.config.max_memory / 2**30:.1f} GiB). Use a head that "
                f"streams from HDF5 ({streaming}) or raise the 'max_memory' option."
            )
        return ds


def _subset(X, idx):
    if isinstance(X, np.ndarray):
        return X[idx]
    return np.asarray(X[np.sort(idx)], dtype=np.float32)


def _select(rows: dict, select_by: str):
    """The grid value of the best row: highest score (lowest for log-loss); ties, lowest log-loss."""
    sign = 1.0 if select_by == "log_loss" else -1.0
    return min(rows, key=lambda v: (sign * rows[v]["score"], rows[v]["log_loss"]))


@dataclass
class _Search:
    """A scored grid: results by value (scores and the fitted model, None for k-fold), the best
    value, the values added beyond the grid, and whether the best sits at the head's bound."""

    results: dict
    best: Any
    extended: list
    at_bound: bool


def _search(grid: list, evaluate: Callable[[list], list], head: BaseHead, config: FitConfig, n_train: int) -> _Search:
    """Score the grid; while the best value sits at an end, add the next decade (to the head's
    ``grid_bounds``)."""
    results = {}

    def add(values: list) -> None:
        for v, (scores, model) in zip(values, evaluate(values)):
            results[v] = {**scores, "score": scores[config.select_by], "model": model}

    add(grid)
    found = _Search(results, _select(results, config.select_by), [], False)
    if head.param is None or len(grid) < 2 or not config.extend_grid:
        return found
    while found.best in (min(results), max(results)):
        new = head.next_grid_value(list(results), found.best, n_train)
        if new is None:
            found.at_bound = True
            break
        add([new])
        found.extended.append(new)
        found.best = _select(results, config.select_by)
    if found.extended:
        logger.info("%s: best %s=%g sat at an end of the grid; extended it by %s%s", config.head, head.param,
                    found.best, ", ".join(f"{v:g}" for v in found.extended), " up to its limit" if found.at_bound else "")
    return found


@dataclass
class _Problem:
    """A head, its grid and its training data on one layer, ready to sweep."""

    config: FitConfig
    data: _Data
    X_raw: Any
    X: Any
    y: np.ndarray
    transform: FeatureTransform
    head: BaseHead
    grid: list
    fit_kwargs: dict
    n_classes: int
    #: With train_views: the image each training row comes from (views share their image's group).
    groups: np.ndarray | None = None

    def fit(self, values: list) -> list[BaseHead]:
        """The heads of ``values``, as the sweep fits them."""
        return self.head.sweep_fit(self.X, self.y, values, **self.fit_kwargs)

    def fit_one(self, value, X=None, y=None) -> BaseHead:
        return self.head.with_value(value).fit(
            self.X if X is None else X, self.y if y is None else y, **self.fit_kwargs)


def _problem(cache: FeatureCache, config: FitConfig, layer: str, train_idx: np.ndarray | None, seed: int,
             warn: Callable[[str], None]) -> _Problem:
    """Read and transform the training features, and build the head and its grid."""
    entry = HEADS.entry(config.head)
    # The head's checks of the cache first: a refusal must not wait for the features to be read.
    setup = entry.obj.from_cache(cache, layer, options=config.head_options, train_split=config.train_split,
                                 rows=train_idx, pca=config.pca)
    data = _Data(cache, layer, config)
    X_raw, y = data.raw(config.train_split), cache.labels(config.train_split)
    if setup.raw_features:
        config = replace(config, normalize="none")
    if train_idx is not None:
        X_raw, y = _subset(X_raw, train_idx), y[train_idx]
    groups = None
    if config.train_views:
        X_raw, y, groups = with_views(cache, config.head, config.train_split, layer, X_raw, y, train_idx)
    transform = FeatureTransform(config.normalize, config.pca, layersets.widths(cache, layer)).fit(X_raw)
    if config.pca is not None and transform.n_components_ < config.pca:
        warn(f"pca={config.pca}: the training split has {X_raw.shape[0]} rows of "
             f"{int(np.prod(X_raw.shape[1:]))} features, so PCA keeps {transform.n_components_} components "
             f"(at most min(rows, features)); the run records {transform.n_components_}. Pass pca="
             f"{transform.n_components_} or fewer.")
    if transform.identity and setup.raw_features:
        X = X_raw  # the head reads the features as cached (lazily when on disk)
    else:
        X = transform.transform(X_raw) if isinstance(X_raw, np.ndarray) else transform.lazy(X_raw)
    options = setup.options
    if config.class_weight:  # check_options made sure the head has the option
        options["class_weight"] = config.class_weight
    if "random_state" in entry.extra["options"]:
        options.setdefault("random_state", seed)
    head = make_head(config.head, **options)
    grid = head.grid_values(config.grid if config.grid is not None else head.default_grid, len(y))
    if len(np.unique(y)) < 2:
        raise HeadError(f"The training split has only {len(np.unique(y))} class(es); a head needs at least 2.")
    return _Problem(config, data, X_raw, X, y, transform, head, grid, setup.fit_kwargs, len(cache.classes), groups)



def _split_scorer(p: _Problem, eval_split: str, progress) -> Callable[[list], list]:
    """Fit each value on the training rows and score the fitted model itself on ``eval_split``."""
    X_eval_raw, y_eval = p.data.raw(eval_split), p.data.cache.labels(eval_split)
    X_eval = p.transform.transform(X_eval_raw) if isinstance(X_eval_raw, np.ndarray) else p.transform.lazy(X_eval_raw)
    select_by = p.config.select_by

    def evaluate(values: list) -> list[tuple[dict, Any]]:
        # Heads trained by epochs watch the eval split (history, patience, progress bar).
        with training_monitor(X_eval=X_eval, y_eval=y_eval, classes=np.unique(p.y), select_by=select_by,
                              callback=progress):
            heads = p.fit(values)
        # Score the fitted models themselves: the selected one is saved as it is.
        return [(selection_scores(y_eval, expand_proba(h.predict_proba(X_eval), h.classes_, p.n_classes),
                                  select_by), h) for h in heads]

    return evaluate


def _fold_scorer(p: _Problem, seed: int, progress) -> tuple[Callable[[list], list], str]:
    """Stratified k-fold on the training rows: mean scores per value (no model kept)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    X, y = p.X, p.y
    if not isinstance(X, np.ndarray):
        raise ConfigError("k-fold sweeps need the features in memory; give an eval split or raise the "
                          "'max_memory' option.")
    y_images = y if p.groups is None else y[:int(p.groups.max()) + 1]  # a view is not one more sample
    smallest = int(np.min(np.bincount(y_images)[np.unique(y_images)]))
    folds = min(p.config.cv or 5, smallest)
    if folds < 2:
        raise HeadError(f"Too few samples per class for a k-fold sweep (the smallest training class has "
                        f"{smallest}); add a val split or pass a grid of one value.")
    if p.groups is None:
        splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y))
    else:
        # An image and its views fall in the same fold; each fold is scored on its images, not their views.
        n_images = int(p.groups.max()) + 1
        splits = [(tr, va[va < n_images]) for tr, va in
                  StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y, p.groups)]

    def evaluate(values: list) -> list[tuple[dict, Any]]:
        per_fold = []
        for tr, va in splits:
            with training_monitor(callback=progress):
                proba = clone(p.head).sweep_proba(X[tr], y[tr], values, X[va])
            classes = np.unique(y[tr])
            per_fold.append([selection_scores(y[va], expand_proba(q, classes, p.n_classes), p.config.select_by)
                             for q in proba])
        return [({k: float(np.mean([f[i][k] for f in per_fold])) for k in per_fold[0][i]}, None)
                for i in range(len(values))]

    return evaluate, f"{folds}-fold cv on {p.config.train_split}"


@dataclass
class _Fitted:
    """The outcome of a sweep on one layer: the head to save, its transform, the choice, the table."""

    head: BaseHead
    transform: FeatureTransform
    best: dict
    sweep: list[dict]
    layer: str


def _fit_once(cache: FeatureCache, config: FitConfig, layer: str, train_idx: np.ndarray | None,
              eval_split: str | None, seed: int, warn: Callable[[str], None],
              progress: Callable[[dict], None] | None = None) -> _Fitted:
    """Sweep, pick, keep the selected model (or refit it for k-fold and refit_on_trainval)."""
    p = _problem(cache, config, layer, train_idx, seed, warn)
    param, transform = p.head.param, p.transform
    scorer, scored_on = None, None
    if eval_split is not None:
        scorer, scored_on = _split_scorer(p, eval_split, progress), eval_split
    elif len(p.grid) > 1:
        scorer, scored_on = _fold_scorer(p, seed, progress)
    with head_threads(p.head.thread_pool, int(np.prod(p.X.shape)), config.threads,
                      parallel_work=p.head.parallel_work) as threads:
        final = None
        if scorer is None:
            best = {"param": param, "value": p.grid[0], "score": None, "scored_on": None}
            sweep: list[dict] = []
        else:
            found = _search(p.grid, scorer, p.head, config, len(p.y))
            chosen = found.results[found.best]
            best = {"param": param, "value": found.best, "score": chosen["score"], "log_loss": chosen["log_loss"],
                    "select_by": config.select_by, "scored_on": scored_on, "grid_extended": found.extended,
                    "at_bound": found.at_bound}
            sweep = [{"value": v, "top1": r["top1"], "log_loss": r["log_loss"], "score": r["score"]}
                     for v, r in sorted(found.results.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))]
            final = chosen["model"]
        if config.refit_on_trainval:
            if eval_split is None or not isinstance(p.X, np.ndarray):
                raise ConfigError("The 'refit_on_trainval' option needs an eval split and features in memory.")
            X_both = np.concatenate([p.X_raw, p.data.raw(eval_split)])
            transform = FeatureTransform(p.config.normalize, config.pca, transform.blocks).fit(X_both)
            final = p.fit_one(best["value"], transform.transform(X_both),
                              np.concatenate([p.y, cache.labels(eval_split)]))
            best["refit"] = f"{config.train_split}+{eval_split}"
        elif final is None:  # no sweep, or k-fold (the folds' models are gone): fit on all of train
            with training_monitor(callback=progress):
                final = p.fit_one(best["value"])
    best["threads"] = threads
    if getattr(final, "history_", None) is not None and getattr(final, "patience", None) is not None:
        best["best_epoch"] = final.best_epoch_
    if transform.n_components_ is not None:
        best["pca_components"] = transform.n_components_
    return _Fitted(final, transform, best, sweep, layer)


def _proba(cache, fitted: _Fitted, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The saved head's probabilities over all classes on ``split`` (uncalibrated), and the labels."""
    X, y = layersets.load(cache, split, fitted.layer)
    proba = fitted.head.predict_proba(fitted.transform.transform(X.reshape(len(X), -1)))
    return expand_proba(proba, fitted.head.classes_, len(cache.classes)), y


def _score_splits(cache, fitted: _Fitted, skip: tuple[str, ...], eval_split: str | None = None) -> tuple[dict, dict]:
    """Metrics (with intervals) per scored split, and each split's labels and probabilities; with
    ``eval_split``, of the probabilities calibrated by a temperature fitted on it
    (``fitted.best["calibration"]``)."""
    splits = [s for s in cache.splits if s not in skip and cache.n(s) > 0]
    if eval_split is not None and eval_split in splits:
        fitted.best["calibration"] = calibrate(lambda s: _proba(cache, fitted, s), eval_split, splits)
    temperature = fitted.best.get("calibration", {}).get("temperature", 1.0)
    metrics, scored = {}, {}
    for split in splits:
        proba, y = _proba(cache, fitted, split)
        proba = apply_temperature(proba, temperature)
        metrics[split] = split_metrics(y, proba, cache.classes)
        scored[split] = (y, proba)
    return metrics, scored


def _checked(config: FitConfig | None, options: dict) -> FitConfig:
    """``config`` with ``options`` applied, every option checked before any feature is read."""
    config = FitConfig(**{**(config.to_dict() if config else {}), **options})
    if config.grid is not None:
        config = replace(config, grid=tuple(config.grid))
    check_int("seeds", config.seeds)
    if config.cv is not None:
        check_int("cv", config.cv, minimum=2)
    if config.select_by is not None:
        check_choice("select_by", config.select_by, SELECT_BY)
    check_memory(config.max_memory)
    if config.threads is not None:
        check_int("threads", config.threads)
    if config.shots is not None:
        check_int("shots", config.shots)
    check_options(config)
    if config.head_options.get("patience") is not None and config.refit_on_trainval:
        raise ConfigError("The 'patience' option picks an epoch on the eval split, which the 'refit_on_trainval' "
                          "option then trains on. Drop one of them.")
    return config


def _eval_split(cache: FeatureCache, config: FitConfig) -> str | None:
    """The split the sweep is scored on (None: k-fold on the training split)."""
    if config.train_split not in cache.splits:
        raise ConfigError(f"Split '{config.train_split}' is not in the cache. It has: {', '.join(cache.splits)}.")
    if cache.n(config.train_split) == 0:
        raise ConfigError(
            f"Split '{config.train_split}' of cache '{cache.path.name}' holds no images: nothing to fit on "
            f"({len(cache.failed)} unreadable file(s) were skipped; 'featcache info {cache.path}' lists them). "
            f"Extract a source with readable training images.")
    split = config.eval_split
    if split == "none":  # asked for k-fold on the training split, even when val exists
        split = None
    elif split is None and "val" in cache.splits and config.train_split != "val":
        split = "val"
    if split is not None and split not in cache.splits:
        raise ConfigError(f"Split '{split}' is not in the cache. It has: {', '.join(cache.splits)}.")
    if split == "test":
        raise ConfigError("The sweep never chooses on the test split. Pass eval_split=val or none.")
    if split is not None and split == config.train_split:
        raise ConfigError(f"The sweep would be scored on '{split}', the split it trains on: every value scores its "
                          f"own training rows. Pass eval_split=val (or another held-out split), or eval_split=none "
                          f"for k-fold cv on '{split}'.")
    if config.cv is not None and split is not None:
        raise ConfigError(f"The 'cv' option applies only without an eval split; this sweep is scored on '{split}'. "
                          f"Drop the 'cv' option, or pass eval_split=none to sweep by k-fold on {config.train_split}.")
    return split


def _few_shot(cache: FeatureCache, config: FitConfig, layer: str, eval_split: str | None, skip: tuple[str, ...],
              warn, progress) -> tuple[_Fitted, dict, dict]:
    """``config.seeds`` draws of ``config.shots`` training rows per class: the first draw's run, its
    metrics, and the summary over draws."""
    y_all = cache.labels(config.train_split)
    counts = np.bincount(y_all, minlength=len(cache.classes))
    short = {cache.classes[i]: int(n) for i, n in enumerate(counts) if 0 < n < config.shots}
    if short:
        k = min(short.values())
        warn(f"shots={config.shots}: " + ", ".join(f"class '{c}' has only {n}" for c, n in short.items())
             + f" training rows; those classes use all of them, so the run is not {config.shots}-shot for them. "
             f"Pass shots={k} for a true {k}-shot run.")
    per_seed, first, probas = [], None, {}
    for s in range(config.seeds):
        idx = _few_shot_indices(y_all, config.shots, config.seed + s)
        fitted = _fit_once(cache, config, layer, idx, eval_split, config.seed + s, warn, progress)
        m, scored = _score_splits(cache, fitted, skip)
        per_seed.append({"seed": config.seed + s, "best": fitted.best, "metrics": m})
        for split, (y, proba) in scored.items():
            probas.setdefault(split, (y, []))[1].append(proba)
        first = first or (fitted, m, scored)
    summary = _summarize(per_seed)
    for split, (y, sets) in probas.items():  # the interval of the mean over seeds, each resample shared
        for key, ci in bootstrap_intervals(y, sets).items():
            if key[:-3] in summary.get(split, {}):
                summary[split][key[:-3]]["ci"] = ci
    few_shot = {"shots": config.shots, "seeds": config.seeds, "short_classes": short,
                "summary": summary, "per_seed": per_seed}
    return first[0], (first[1], first[2]), few_shot


def fit_head(cache: str | os.PathLike | FeatureCache, config: FitConfig | None = None, *,
             progress: Callable[[dict], None] | None = None, **options) -> FitResult:
    """Fit a head on a cache, sweeping its regularisation grid, and save the run.

    Parameters
    ----------
    cache : path or FeatureCache
    config : FitConfig, optional
        Keyword ``options`` override its fields (``head="linear"``, ``grid=(0.1, 1)``).
    progress : callable, optional
        Heads trained by epochs (tail, mlp, linear with AdamW) call it after every epoch with
        ``{"epoch", "epochs", "loss", "metric", "score"}`` (score: the best eval score over the
        grid, None without an eval split). The per-epoch history of the saved head goes to
        ``metrics.json`` (``history``).

    Returns
    -------
    FitResult
        Run folder, the chosen grid value, metrics per split, the sweep table, seconds.
    """
    t0 = time.perf_counter()
    config = _checked(config, options)
    own = not isinstance(cache, FeatureCache)
    c = open_cache(cache) if own else cache
    try:
        # Locked (and an existing run refused) before the fit, written whole after it.
        folder = (RunFolder(config.output, overwrite=config.overwrite) if config.output else
                  RunFolder(claim_folder(config.runs_dir, _run_name(config, c)), claimed=True))
    except BaseException:
        if own:
            c.close()
        raise
    notes: list[str] = []

    def warn(message: str) -> None:
        if message not in notes:
            notes.append(message)
            logger.warning(message)

    try:
        eval_split = _eval_split(c, config)
        config, adapted = adapt_defaults(c, config, eval_split)
        for line in adapted:
            logger.info("adapted: %s", line)
        vectors = HEADS.get(config.head).inputs != "activations"
        layers = _layers(c, config.layer, joins=vectors and not config.shots)
        # After refit_on_trainval the eval split is training data: its scores are not held out.
        skip = (config.train_split, eval_split) if config.refit_on_trainval else (config.train_split,)
        check_labels(c, config, c.labels(config.train_split), warn)
        if not vectors and any(layersets.is_set(name) for name in layers):
            raise ConfigError(f"Head '{config.head}' reads one layer's activations; layer sets ({config.layer}) "
                              f"are for heads that take vectors. Pass one layer.")
        if len(layers) > 1 and (config.shots or not vectors):
            raise ConfigError(f"layer={config.layer} sweeps layers for feature heads without shots; "
                              f"pass one layer ({', '.join(layers)}).")
        few_shot = None
        if config.shots:
            fitted, (metrics, scored), few_shot = _few_shot(c, config, layers[0], eval_split, skip, warn, progress)
        else:
            fitted = (_sweep_layers(c, config, layers, eval_split, warn, progress) if len(layers) > 1 else
                      _fit_once(c, config, layers[0], None, eval_split, config.seed, warn, progress))
            metrics, scored = _score_splits(c, fitted, skip, eval_split)
        if adapted:
            fitted.best["adapted"] = adapted
        rows = {split: {"y": y, "pred": proba.argmax(axis=1), "digest": rows_digest(c.ids(split))}
                for split, (y, proba) in scored.items()}
        # A layer set is checked on its deepest layer.
        note_eval_leaks(c, layersets.members(fitted.layer)[-1], config.train_split, metrics, warn)
        seconds = time.perf_counter() - t0
        meta = {"cache": str(c.path), "layer": fitted.layer, "classes": c.classes, "fingerprint": c.fingerprint,
                "extract_config": c.extract_config, "config": config.to_dict(), "best": fitted.best}
        with folder as tmp:
            save_run(tmp, fitted.head, fitted.transform, meta, metrics, fitted.sweep, few_shot, seconds, notes,
                     getattr(fitted.head, "history_", None), rows)
        run = folder.target
        return FitResult(str(run), config.head, fitted.best, metrics, fitted.sweep, seconds, few_shot, list(notes))
    finally:
        folder.release()
        if own:
            c.close()


def _layers(cache: FeatureCache, spec: str | None, *, joins: bool = True) -> list[str]:
    """``None`` -> the first layer; "all" -> every cached layer and (``joins``) every run of 2-4
    adjacent layers; "a,b" -> those, each checked; "a+b" -> that layer set."""
    def one(name: str) -> str:
        return layersets.resolve(cache, name) if layersets.is_set(name) else cache.resolve_layer(name)

    if spec == "all":
        return list(cache.layers) + (layersets.adjacent_runs(cache.layers) if joins else [])
    if spec is not None and "," in spec:
        return [one(name.strip()) for name in spec.split(",") if name.strip()]
    return [cache.resolve_layer(spec) if spec is None else one(spec)]


def _sweep_layers(cache: FeatureCache, config: FitConfig, layers: list[str], eval_split: str | None, warn,
                  progress) -> _Fitted:
    """Layer x regularisation: each layer standardised on its own and swept, the best layer kept
    (its sweep rows and ``best["layers"]`` hold the whole table)."""
    kept, table, rows = None, [], []
    sign = 1.0 if config.select_by == "log_loss" else -1.0
    for layer in layers:
        fitted = _fit_once(cache, config, layer, None, eval_split, config.seed, warn, progress)
        best = fitted.best
        if best["score"] is None:
            raise ConfigError(f"layer={config.layer} selects the layer on a score, and head '{config.head}' "
                              f"swept nothing to score. Give an eval split or a grid of 2+ values.")
        table.append({"layer": layer, "value": best["value"], "score": best["score"], "log_loss": best["log_loss"]})
        rows += [{"layer": layer, **r} for r in fitted.sweep]
        key = (sign * best["score"], best["log_loss"])
        if kept is None or key < kept[0]:
            kept = (key, fitted)
    fitted = kept[1]
    logger.info("best layer %s (%s %.4f)", fitted.layer, config.select_by, fitted.best["score"])
    return _Fitted(fitted.head, fitted.transform, {**fitted.best, "layer": fitted.layer, "layers": table}, rows,
                   fitted.layer)


def _summarize(per_seed: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for split in per_seed[0]["metrics"]:
        keys = [k for k, v in per_seed[0]["metrics"][split].items() if isinstance(v, (int, float)) and k != "n"]
        out[split] = {}
        for k in keys:
            vals = [p["metrics"][split][k] for p in per_seed if p["metrics"][split].get(k) is not None]
            if vals:
                out[split][k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
    return out


def _run_name(config: FitConfig, cache: FeatureCache) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{config.head}-{cache.path.stem[-16:]}-{stamp}-{os.getpid()}"


