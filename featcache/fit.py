"""Fitting heads from a cache: sweep the regularisation grid, refit the best, score, save.

The sweep chooses on the eval split (``val`` by default), or by stratified k-fold on the training
split when there is none; never on ``test``. Metrics are reported for every split other than the
training split.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.base import clone

from .artifacts import load_head, save_head
from .errors import CacheError, ConfigError, HeadError
from .heads import HEADS, make_head
from .metrics import classification_metrics
from .registry import check_int
from .store import FeatureCache, open_cache
from .transform import FeatureTransform

RUN_JSON = "run.json"
METRICS_JSON = "metrics.json"
SWEEP_CSV = "sweep.csv"
TRANSFORM = "transform.safetensors"
#: Heads that read the training features chunk by chunk from HDF5 when they exceed max_memory.
STREAMING_HEADS = ("linear", "mlp", "ridge", "ncm", "tail")


@dataclass(frozen=True)
class FitConfig:
    """Options of ``featcache fit-head``."""

    head: str = "logreg"
    layer: str | None = None
    train_split: str = "train"
    #: Split the sweep is scored on; None: val when present; "none": k-fold on the training split.
    eval_split: str | None = None
    normalize: str = "standard"
    pca: int | None = None
    grid: tuple[float, ...] | None = None
    class_weight: str | None = None
    seed: int = 0
    refit_on_trainval: bool = False
    shots: int | None = None
    seeds: int = 1
    #: Folds of the k-fold sweep when there is no eval split; None: 5. Refused when an eval split exists.
    cv: int | None = None
    max_memory: int = 2 << 30
    head_options: dict = field(default_factory=dict)
    output: str | None = None
    runs_dir: str = "runs"
    #: Replace an existing run in ``output``; without it a run folder is never overwritten.
    overwrite: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid) if self.grid is not None else None
        return d


@dataclass
class FitResult:
    run: str
    head: str
    best: dict
    metrics: dict
    sweep: list[dict]
    seconds: float
    few_shot: dict | None = None

    def to_dict(self) -> dict:
        d = {"run": self.run, "head": self.head, "best": self.best, "metrics": self.metrics,
             "seconds": round(self.seconds, 3)}
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
    if config.seeds != 1 and config.shots is None:
        raise ConfigError(f"--seeds {config.seeds} applies to few-shot fits only. Add --shots K or drop --seeds.")


def _few_shot_indices(y: np.ndarray, shots: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        out.append(rng.choice(idx, size=min(shots, len(idx)), replace=False))
    return np.sort(np.concatenate(out))


def _top1(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    return float(np.mean(classes[proba.argmax(1)] == y))


class _Data:
    """Train / eval features of one layer, transformed, in memory or streamed."""

    def __init__(self, cache: FeatureCache, layer: str, config: FitConfig) -> None:
        self.cache, self.layer, self.config = cache, layer, config

    def raw(self, split: str):
        ds = self.cache.features(split, self.layer)
        nbytes = int(np.prod(ds.shape)) * 4
        if nbytes <= self.config.max_memory:
            X = self.cache.load(split, self.layer)[0]
            # Feature heads see vectors; the tail head reads the activation maps as they are.
            return X if HEADS.entry(self.config.head).extra["inputs"] == "activations" else X.reshape(len(X), -1)
        if self.config.head not in STREAMING_HEADS:
            raise ConfigError(
                f"Split '{split}' of layer '{self.layer}' needs {nbytes / 2**30:.1f} GiB as float32, more than "
                f"--max-memory ({self.config.max_memory / 2**30:.1f} GiB). Use --head linear (streams from "
                f"HDF5) or raise --max-memory."
            )
        return ds


def _sweep_scores(head, param, grid, X, y, X_eval, y_eval, classes) -> tuple[list[float], list[float]]:
    proba = head.sweep_proba(X, y, grid, X_eval)
    top1 = [_top1(y_eval, p, classes) for p in proba]
    eps = 1e-15
    idx = np.searchsorted(classes, y_eval)
    ll = [float(-np.mean(np.log(np.clip(p[np.arange(len(idx)), idx], eps, 1)))) for p in proba]
    return top1, ll


def _subset(X, idx):
    if isinstance(X, np.ndarray):
        return X[idx]
    return np.asarray(X[np.sort(idx)], dtype=np.float32)


def _fit_once(cache: FeatureCache, config: FitConfig, layer: str, train_idx: np.ndarray | None,
              eval_split: str | None, seed: int):
    """Sweep, pick, refit. Returns (head, transform, best, sweep rows)."""
    data = _Data(cache, layer, config)
    X_raw = data.raw(config.train_split)
    y = cache.labels(config.train_split)
    entry = HEADS.entry(config.head)
    options = dict(config.head_options)
    fit_kwargs = {}
    if entry.extra["inputs"] == "activations":
        config, options, fit_kwargs = _activation_head_setup(cache, layer, config, options, train_idx)
    if train_idx is not None:
        X_raw, y = _subset(X_raw, train_idx), y[train_idx]
    transform = FeatureTransform(config.normalize, config.pca).fit(X_raw)
    if transform.identity and entry.extra["inputs"] == "activations":
        X = X_raw  # activation maps keep their shape (read lazily when on disk)
    else:
        X = transform.transform(X_raw) if isinstance(X_raw, np.ndarray) else transform.lazy(X_raw)
    param = entry.extra["param"]
    if config.class_weight:
        if "class_weight" not in entry.extra["options"]:
            raise ConfigError(f"Head '{config.head}' has no class_weight option; drop --class-weight.")
        options["class_weight"] = config.class_weight
    if "random_state" in entry.extra["options"]:
        options.setdefault("random_state", seed)
    head = make_head(config.head, **options)
    grid = list(config.grid) if config.grid is not None else list(entry.extra["default_grid"])
    if param is None:
        grid = [None]
    if param == "k":
        grid = sorted({int(k) for k in grid if int(k) <= len(y)}) or [1]
    present = np.unique(y)
    if len(present) < 2:
        raise HeadError(f"The training split has only {len(present)} class(es); a head needs at least 2.")
    sweep: list[dict] = []
    if len(grid) > 1:
        if eval_split is not None:
            X_eval_raw = data.raw(eval_split)
            y_eval = cache.labels(eval_split)
            X_eval = transform.transform(X_eval_raw) if isinstance(X_eval_raw, np.ndarray) else transform.lazy(X_eval_raw)
            top1, ll = _sweep_scores(head, param, grid, X, y, X_eval, y_eval, present)
            scored_on = eval_split
        else:
            from sklearn.model_selection import StratifiedKFold

            if not isinstance(X, np.ndarray):
                raise ConfigError("k-fold sweeps need the features in memory; give an eval split or raise --max-memory.")
            folds = min(config.cv or 5, int(np.bincount(y).max(initial=0)), int(np.min(np.bincount(y)[present])))
            if folds < 2:
                raise HeadError("Too few samples per class for a k-fold sweep; add a val split or pass one --C value.")
            skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            scores = []
            for tr, va in skf.split(X, y):
                t1, l1 = _sweep_scores(clone(head), param, grid, X[tr], y[tr], X[va], y[va], np.unique(y[tr]))
                scores.append((t1, l1))
            top1 = list(np.mean([s[0] for s in scores], axis=0))
            ll = list(np.mean([s[1] for s in scores], axis=0))
            scored_on = f"{folds}-fold cv on {config.train_split}"
        sweep = [{"value": v, "top1": float(t), "log_loss": float(l)} for v, t, l in zip(grid, top1, ll)]
        # Highest eval accuracy; among ties, the best calibrated (lowest log-loss).
        best_i = min(range(len(grid)), key=lambda i: (-top1[i], ll[i]))
        best = {"param": param, "value": grid[best_i], "score": float(top1[best_i]), "scored_on": scored_on}
    else:
        best = {"param": param, "value": grid[0], "score": None, "scored_on": None}
    final = clone(head)
    if param is not None:
        final.set_params(**{param: best["value"]})
    if config.refit_on_trainval:
        if eval_split is None or not isinstance(X, np.ndarray):
            raise ConfigError("--refit-on-trainval needs an eval split and features in memory.")
        X_eval_raw = data.raw(eval_split)
        transform = FeatureTransform(config.normalize, config.pca).fit(np.concatenate([X_raw, X_eval_raw]))
        X = transform.transform(np.concatenate([X_raw, X_eval_raw]))
        y = np.concatenate([y, cache.labels(eval_split)])
    final.fit(X, y, **fit_kwargs)
    return final, transform, best, sweep


def _activation_head_setup(cache: FeatureCache, layer: str, config: FitConfig, options: dict, train_idx):
    """The tail head rebuilds the network after ``layer`` from the cache's own backbone, trains on
    raw (unnormalised) activations, and samples the cached augmented views when there are any."""
    fp, ex = cache.fingerprint, cache.extract_config
    if fp.get("pool") != "none":
        raise ConfigError(
            f"--head {config.head} trains the network after '{layer}' on its spatial activations; this cache "
            f"pooled them ({fp.get('pool')}). Extract with --layer {layer} --pool none."
        )
    if config.pca is not None:
        raise ConfigError(f"--head {config.head} reads raw activations; drop --pca.")
    config = FitConfig(**{**config.to_dict(), "normalize": "none", "grid": None})
    options = {"backbone": ex.get("backbone") or fp["backbone"]["name"], "weights": ex.get("weights"),
               "input_size": ex.get("input_size"), "boundary": layer, **options}
    fit_kwargs = {}
    if cache.has_views(config.train_split):
        views = cache.views(config.train_split, layer)
        fit_kwargs["views"] = views if train_idx is None else views[np.sort(train_idx)]
    return config, options, fit_kwargs


def _score_splits(cache, layer, config, head, transform, skip: tuple[str, ...]) -> dict:
    metrics = {}
    for split in cache.splits:
        if split in skip or cache.n(split) == 0:
            continue
        X, y = cache.load(split, layer)
        proba_head = head.predict_proba(transform.transform(X.reshape(len(X), -1)))
        proba = np.zeros((len(X), len(cache.classes)), dtype=np.float64)
        proba[:, head.classes_] = proba_head
        metrics[split] = split_metrics(y, proba, cache.classes)
    return metrics


def split_metrics(y: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict:
    """Metrics of label indices ``y`` against probabilities over all classes, keyed by class name."""
    m = classification_metrics(y, proba, np.arange(len(class_names)))
    m["per_class_recall"] = {class_names[int(k)]: v for k, v in m["per_class_recall"].items()}
    m["classes"] = list(class_names)
    return m


def fit_head(cache: str | os.PathLike | FeatureCache, config: FitConfig | None = None, *,
             progress: Callable[[str], None] | None = None, **options) -> FitResult:
    """Fit a head on a cache, sweeping its regularisation grid, and save the run.

    Parameters
    ----------
    cache : path or FeatureCache
    config : FitConfig, optional
        Keyword ``options`` override its fields (``head="linear"``, ``grid=(0.1, 1)``).

    Returns
    -------
    FitResult
        Run folder, the chosen grid value, metrics per split, the sweep table, seconds.
    """
    t0 = time.perf_counter()
    config = FitConfig(**{**(config.to_dict() if config else {}), **options})
    if config.grid is not None:
        config = FitConfig(**{**config.to_dict(), "grid": tuple(config.grid)})
    check_int("seeds", config.seeds)
    if config.cv is not None:
        check_int("cv", config.cv, minimum=2)
    if config.shots is not None:
        check_int("shots", config.shots)
    check_options(config)
    if config.output and not config.overwrite and (Path(config.output) / RUN_JSON).exists():
        raise ConfigError(f"'{config.output}' already holds a run. Pass --overwrite to replace it, or choose "
                          f"another -o folder.")
    own = not isinstance(cache, FeatureCache)
    c = open_cache(cache) if own else cache
    try:
        layer = c._layer(config.layer)
        if config.train_split not in c.splits:
            raise ConfigError(f"Split '{config.train_split}' is not in the cache. It has: {', '.join(c.splits)}.")
        # "none": sweep by k-fold on the training split even when there is a val split.
        eval_split = None if config.eval_split == "none" else config.eval_split
        if config.eval_split is None and "val" in c.splits and config.train_split != "val":
            eval_split = "val"
        if eval_split is not None and eval_split not in c.splits:
            raise ConfigError(f"Split '{eval_split}' is not in the cache. It has: {', '.join(c.splits)}.")
        if eval_split == "test":
            raise ConfigError("The sweep never chooses on the test split. Pass --eval-split val or none.")
        if config.cv is not None and eval_split is not None:
            raise ConfigError(f"--cv applies only without an eval split; this sweep is scored on '{eval_split}'. "
                              f"Drop --cv, or pass --eval-split none to sweep by k-fold on {config.train_split}.")
        # After --refit-on-trainval the eval split is training data: its scores are not held out.
        skip = (config.train_split, eval_split) if config.refit_on_trainval else (config.train_split,)
        few_shot = None
        if config.shots:
            y_all = c.labels(config.train_split)
            per_seed = []
            first = None
            for s in range(config.seeds):
                idx = _few_shot_indices(y_all, config.shots, config.seed + s)
                head, transform, best, sweep = _fit_once(c, config, layer, idx, eval_split, config.seed + s)
                m = _score_splits(c, layer, config, head, transform, skip)
                per_seed.append({"seed": config.seed + s, "best": best, "metrics": m})
                if first is None:
                    first = (head, transform, best, sweep, m)
            head, transform, best, sweep, metrics = first
            few_shot = {"shots": config.shots, "seeds": config.seeds, "summary": _summarize(per_seed),
                        "per_seed": per_seed}
        else:
            head, transform, best, sweep = _fit_once(c, config, layer, None, eval_split, config.seed)
            metrics = _score_splits(c, layer, config, head, transform, skip)
        run = Path(config.output) if config.output else Path(config.runs_dir) / _run_name(config, c)
        seconds = time.perf_counter() - t0
        meta = {"cache": str(c.path), "layer": layer, "classes": c.classes, "fingerprint": c.fingerprint,
                "extract_config": c.extract_config, "config": config.to_dict(), "best": best}
        _save_run(run, head, transform, meta, metrics, sweep, few_shot, seconds)
        return FitResult(str(run), config.head, best, metrics, sweep, seconds, few_shot)
    finally:
        if own:
            c.close()


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


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default, allow_nan=False))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-able: {type(o).__name__}")


def _clean(obj):
    """Replace NaN/inf (from metrics of degenerate splits) with None so the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def _save_run(run: Path, head, transform: FeatureTransform, meta: dict, metrics: dict, sweep: list[dict],
              few_shot, seconds: float) -> None:
    run.mkdir(parents=True, exist_ok=True)
    save_head(run, head, head_name=meta["config"]["head"], meta={})
    arrays, tmeta = transform.get_state()
    tmp = run / (TRANSFORM + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()} or {"_empty": np.zeros(0, np.float32)}, str(tmp))
    os.replace(tmp, run / TRANSFORM)
    _atomic_json(run / RUN_JSON, _clean({**meta, "transform": tmeta, "format": "featcache-run", "version": 1}))
    _atomic_json(run / METRICS_JSON, _clean({"metrics": metrics, "sweep": sweep, "best": meta["best"],
                                             "few_shot": few_shot, "seconds": seconds}))
    with open(run / SWEEP_CSV, "w") as f:
        f.write(f"{meta['best']['param']},top1,log_loss\n")
        for r in sweep:
            f.write(f"{r['value']},{r['top1']:.6f},{r['log_loss']:.6f}\n")


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
        """Probabilities over all the run's classes, shape (n_samples, n_classes)."""
        p = self.head.predict_proba(self.transform.transform(features.reshape(len(features), -1)))
        out = np.zeros((len(features), len(self.classes)), dtype=np.float64)
        out[:, self.head.classes_] = p
        return out


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
    if run.meta["layer"] not in cache.layers:
        raise CacheError(f"Cache '{cache.path.name}' has no layer '{run.meta['layer']}', which the run's head reads.")
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
            X, y = c.load(split, run.meta["layer"])
            y = to_run[y]
            out[split] = split_metrics(y, run.predict_proba(X), run.classes)
            present = set(y.tolist())
            out[split]["absent_classes"] = [name for i, name in enumerate(run.classes) if i not in present]
    return out
