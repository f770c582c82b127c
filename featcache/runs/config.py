"""The options of ``featcache fit-head`` (:class:`FitConfig`), in a module of their own: the fit, the
adaptive defaults (:mod:`featcache.runs.adapt`), the bench and the probe read them, and none of those
imports another to get them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class FitConfig:
    """Options of ``featcache fit-head``."""

    head: str = "logreg"
    layer: str | None = None
    train_split: str = "train"
    #: Sweep scored on: None = val when present; "none" = k-fold on train. Never test nor train itself.
    eval_split: str | None = None
    normalize: str = "standard"
    pca: int | None = None
    grid: tuple[float, ...] | None = None
    #: "balanced", or "none" for equal weights; None: balanced on an imbalanced training split.
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
    #: None: balanced_accuracy on an imbalanced training split, else top1 (see :mod:`featcache.runs.adapt`).
    select_by: str | None = None
    extend_grid: bool = True
    threads: int | None = None
    #: Replace an existing run in ``output``; without it a run folder is never overwritten.
    overwrite: bool = False
    #: Fill the options left unset (layer, class_weight, select_by) from the data; see :mod:`featcache.runs.adapt`.
    adapt: bool = True
    #: Train vector heads on the cached augmented views too (``extract --views K``): K extra rows per
    #: image, grouped with it so that k-fold never scores an image on a fold holding its views.
    train_views: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid) if self.grid is not None else None
        return d
