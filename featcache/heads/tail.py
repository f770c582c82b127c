"""Training the tail of a network on cached activations at a freeze boundary.

Transfer learning that fine-tunes only the last stage(s) of a pretrained network spends almost
all of its time running the frozen part, whose output never changes. featcache caches that
output once (``featcache extract SOURCE --layer layer3 --pool none`` stores (N, C, H, W)
activations) and trains only what comes after it:

- :func:`~featcache.backbones.cutting.build_tail` (in :mod:`featcache.backbones.cutting`) cuts a
  backbone after a *boundary* module and returns the rest as an ``nn.Sequential`` with a new
  classifier; :func:`~featcache.backbones.cutting.prefix_model` is the frozen part, so that
  ``tail(prefix(x)) == model(x)``;
- :class:`TailHead` is a head (scikit-learn contract, like :mod:`featcache.heads`) whose ``fit``
  trains the tail on cached activations, optionally sampling cached augmented views.
"""

from __future__ import annotations

import copy
import logging
from numbers import Integral
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.base import clone

from ..backbones import DEFAULT_BACKBONE, Backbone, load_backbone
from ..backbones.cutting import assemble_tail, build_tail, cut_at
from ..errors import ConfigError, HeadError
from ..common.lazy import nn, torch
from ..common.runtime import head_threads
from .training import adamw, cosine_lr, param_groups, resolve_seed
from .base import BaseHead, CacheSetup, softmax
from .inputs import encode_labels
from .maps import (AUGMENT, NOT_FINITE, MapAugment, all_finite, check_activations, in_memory, minibatches,
                   parse_augment, read_batch, tail_logits)
from .monitor import EpochTracker
from .params import (CLASS_WEIGHT, COUNT, DEVICE, NON_NEGATIVE, PATIENCE, POSITIVE, PRECISION, SEED_OR_NONE,
                     Interval, Satisfies)
from .solvers import class_weight_tensor, resolve_device

logger = logging.getLogger(__name__)

#: Label smoothing of the tail's cross-entropy (0: none, as ``finetune``).
LABEL_SMOOTHING = 0.0


class _Step:
    """One optimisation step of a tail on a batch: the cosine learning rate, the augmentation of
    the maps (and mixup's blended loss), autocast and, for fp16, loss scaling (AdamW)."""

    def __init__(self, tail: nn.Module, lr: float, weight_decay: float, device: torch.device, precision: str,
                 augment: MapAugment | None, class_weight: torch.Tensor | None, *, total: int) -> None:
        from ..common.devices import autocast

        self.tail, self.lr, self.device, self.precision, self.augment = tail, lr, device, precision, augment
        self.cw, self.total, self.n, self.autocast = class_weight, total, 0, autocast
        self.opt = adamw(param_groups(tail, weight_decay), lr=lr, device=device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """Train on (xb, yb); the batch's mean loss, on the device."""
        self.n += 1
        for g in self.opt.param_groups:
            g["lr"] = cosine_lr(self.lr, self.n, self.total)
        partner, lam = None, 1.0
        if self.augment is not None:
            xb, partner, lam = self.augment(xb)
        with self.autocast(self.device, self.precision):
            out = self.tail(xb).float()
        loss = nn.functional.cross_entropy(out, yb, weight=self.cw, label_smoothing=LABEL_SMOOTHING)
        if partner is not None:
            other = nn.functional.cross_entropy(out, yb[torch.from_numpy(partner).to(self.device)], weight=self.cw,
                                                label_smoothing=LABEL_SMOOTHING)
            loss = lam * loss + (1.0 - lam) * other
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss.detach()


# ----------------------------------------------------------------------------------------------
# The head


def _named(value: Any) -> bool:
    return isinstance(value, str) and value != ""


class TailHead(BaseHead):
    """Train the network after a freeze boundary on cached activations of that boundary.

    The tail (e.g. ``layer4 -> avgpool -> fc`` of a ResNet for ``boundary="layer3"``) is built
    from the pretrained backbone with a new classifier, and every parameter in it is trained with
    AdamW (cosine schedule, no decay on biases and normalisation scales) and cross-entropy.
    BatchNorm layers of the tail are in train mode while fitting (they are being fine-tuned) and
    in eval mode when predicting. This is fine-tuning the last stage(s) with everything before
    frozen, at the cost of the tail only.

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        Spec of the backbone the activations were extracted with.
    weights : str, optional
        Its local weights file, as for extraction.
    input_size : int, optional
        The crop size of the extraction, as for extraction.
    boundary : str
        The layer whose activations ``X`` holds (``featcache extract --layer L --pool none``).
        Required.
    epochs : int, default=10
        Passes over the data.
    lr : float, default=1e-3
        AdamW peak learning rate (cosine schedule to 0).
    weight_decay : float, default=1e-4
        AdamW decoupled weight decay of weight matrices and convolution kernels.
    batch_size : int, default=32
        Mini-batch rows.
    random_state : int or None, default=0
        Seed of the new classifier, shuffling, view sampling and dropout; results on the CPU are
        deterministic.
    device : str, default="auto"
        Torch device; "auto" uses CUDA when available.
    class_weight : {None, "balanced"}, default=None
        "balanced" weighs the cross-entropy of a row of class c by ``n_samples / (n_classes *
        n_c)`` (scikit-learn's meaning); the batch loss is torch's weighted mean.
    patience : int or None, default=None
        Stop after this many epochs without a better eval score and keep the best epoch's
        weights (needs eval data, see :func:`featcache.heads.monitor.training_monitor`).
    augment : str or None, default="flip+crop"
        Augmentation of the cached maps while training, drawn from ``random_state``: "none"
        (or None), or parts of "flip", "shift", "crop", "mixup" joined by "+" (see
        :class:`MapAugment`); flip, shift and crop need (C, H, W) activations and are left out
        (with a warning) at a boundary without them. Prediction never augments. The default
        closed most of the gap to fine-tuning on raw images at a stage5 boundary and cost nothing
        at stage6 (benchmarks/tail.py, README).
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        Autocast precision of the training forward and backward pass (weights and the optimiser
        stay float32; eval scoring and prediction run in float32). "auto" is what extraction and
        finetune pick: bf16 on CPUs with native bf16 and on Ampere+ GPUs, fp16 (loss-scaled) on
        older GPUs, else fp32 (so, like extraction, the result depends on the CPU model unless
        it is set; on the CPU it is deterministic either way).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    tail_ : nn.Sequential
        The trained tail on the CPU, eval mode.
    input_shape_ : tuple of int
        Shape of one row of ``X``, e.g. (C, H, W).
    n_features_in_ : int
        ``prod(input_shape_)``.
    backbone_name_ : str
        Canonical name of the backbone.
    precision_ : str
        The training precision used ("auto" resolved).
    view_schedule_ : ndarray of shape (epochs, n_samples), int
        The view trained on per epoch and image (0: ``X``; ``k``: ``views[:, k - 1]``); all zeros
        without views.
    history_ : list of dict
        Per epoch ``{"epoch", "loss"}`` plus the eval score when watched.
    """

    head_name = "tail"
    param = None
    default_grid = (None,)
    _parameter_constraints = {
        "backbone": [Satisfies(_named, "a backbone spec (as extract --backbone)")], "weights": [None, str],
        "input_size": [None, Interval(Integral, 8, None, closed="left")],
        "boundary": [Satisfies(_named, "the name of the layer whose activations X holds, e.g. 'layer3' (featcache "
                                       "extract --layer layer3 --pool none)")],
        "epochs": COUNT, "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "batch_size": COUNT,
        "random_state": SEED_OR_NONE, "device": DEVICE, "class_weight": CLASS_WEIGHT, "patience": PATIENCE,
        "augment": AUGMENT, "precision": PRECISION,
    }
    inputs = "activations"
    streams = True
    thread_pool = "torch"

    @classmethod
    def from_cache(cls, cache: Any, layer: str, *, options: Mapping[str, Any], train_split: str,
                   rows: np.ndarray | None, pca: int | None) -> CacheSetup:
        """Rebuild the network after ``layer`` from the cache's own backbone, train on the raw
        (unnormalised) activations, and sample the cached augmented views when there are any."""
        fp, ex = cache.fingerprint, cache.extract_config
        if fp.get("pool") != "none":
            raise ConfigError(
                f"The tail head trains the network after '{layer}' on its spatial activations; this cache "
                f"pooled them ({fp.get('pool')}). Extract '{layer}' again without pooling (pool='none')."
            )
        if pca is not None:
            raise ConfigError("The tail head reads raw activations; drop the 'pca' option.")
        options = {"backbone": ex.get("backbone") or fp["backbone"]["name"], "weights": ex.get("weights"),
                   "input_size": ex.get("input_size"), "boundary": layer, **options}
        fit_kwargs = {}
        if cache.has_views(train_split):
            views = cache.views(train_split, layer)
            fit_kwargs["views"] = views if rows is None else views[np.sort(rows)]
        return CacheSetup(options, fit_kwargs, raw_features=True)

    def __init__(self, *, backbone: str = DEFAULT_BACKBONE, weights: str | None = None,
                 input_size: int | None = None, boundary: str | None = None, epochs: int = 10, lr: float = 1e-3,
                 weight_decay: float = 1e-4, batch_size: int = 32, random_state: int | None = 0, device: str = "auto",
                 class_weight: str | None = None, patience: int | None = None, augment: str | None = "flip+crop",
                 precision: str = "auto") -> None:
        self._store_options(locals())

    # -- checks ---------------------------------------------------------------------------------

    def _load_backbone(self) -> Backbone:
        return load_backbone(self.backbone, weights=self.weights, input_size=self.input_size)

    def _shape_of(self, X: Any, shape: tuple[int, ...], what: str) -> tuple[int, ...]:
        """``shape`` if rows of ``X`` have it or are it flattened; else a HeadError."""
        row = tuple(int(s) for s in X.shape[1:])
        if row == shape or (len(row) == 1 and row[0] == int(np.prod(shape))):
            return row
        raise HeadError(
            f"{what} has rows of shape {row} but layer '{self.boundary}' of {self.backbone} gives "
            f"{shape} at input size {self.input_size or 'default'}. Pass the activations of that "
            f"layer extracted with --pool none, with the same backbone and --input-size."
        )

    # -- fit ------------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any, views: Any = None) -> "TailHead":
        """Train the tail.

        Parameters
        ----------
        X : ndarray or h5py.Dataset of shape (n_samples, C, H, W)
            Activations of ``boundary`` (float16 or float32), or the same flattened to
            (n_samples, C*H*W). A dataset of at most ``IN_MEMORY_BYTES`` (1 GiB, in its own dtype)
            is read whole once; a larger one per mini-batch (sorted row lists).
        y : array-like of shape (n_samples,)
        views : ndarray or h5py.Dataset of shape (n_samples, K, C, H, W), optional
            Activations of K augmented views of each image (``extract --views K``). Each epoch
            every image contributes one of its K + 1 versions, drawn uniformly at random from
            ``random_state``: ``X`` itself counts as view 0, ``views[:, k - 1]`` as view k.

        Returns
        -------
        self
        """
        self._check_params()
        X = check_activations(X, "X")
        y_idx, classes = encode_labels(y, int(X.shape[0]))
        if views is not None:
            views = check_activations(views, "views")
            vs = tuple(int(s) for s in views.shape)
            if len(vs) != len(X.shape) + 1 or vs[0] != X.shape[0] or vs[2:] != tuple(X.shape[1:]) or vs[1] < 1:
                raise HeadError(
                    f"views must have shape (n_samples, K, ...) = ({X.shape[0]}, K, "
                    f"{', '.join(map(str, X.shape[1:]))}); got {vs}. Pass the views of the same "
                    f"split and layer as X."
                )
        # As BaseHead.fit: torch computes, BLAS holds one thread (a no-op inside fit-head's own choice).
        with head_threads(self.thread_pool, int(np.prod(X.shape)), parallel_work=self.parallel_work):
            self._fit(X, y_idx, len(classes), views)
        self.classes_ = classes
        return self

    def _fit(self, X: Any, y_idx: np.ndarray, n_classes: int, views: Any = None) -> None:
        device = resolve_device(self.device)
        seed = resolve_seed(self.random_state)
        parts = parse_augment(self.augment)
        bb = self._load_backbone()
        cut = cut_at(bb, self.boundary)
        self._shape_of(X, cut.boundary_shape, "X")
        spatial = [p for p in parts if p != "mixup"]
        if spatial and len(cut.boundary_shape) != 3:
            # The default asks for flips and crops; a boundary without maps trains without them.
            logger.warning("The 'augment' option's %s move(s) (C, H, W) maps; layer '%s' gives %s, so "
                           "training goes without them.", "+".join(spatial), self.boundary, cut.boundary_shape)
            parts = tuple(p for p in parts if p == "mixup")
        # Small datasets are read once; what stays on disk is checked batch by batch as it is read.
        X = in_memory(X)
        views = None if views is None else in_memory(views)
        streamed = not isinstance(X, np.ndarray) or (views is not None and not isinstance(views, np.ndarray))
        if not streamed and not (all_finite(X) and (views is None or all_finite(views))):
            raise HeadError(NOT_FINITE)
        tail = assemble_tail(bb, cut, n_classes, seed).to(device)
        n = int(X.shape[0])
        k_views = int(views.shape[1]) if views is not None else 0
        y_all = torch.as_tensor(y_idx, dtype=torch.long).to(device)
        cw = class_weight_tensor(y_idx, n_classes, self.class_weight, device)
        from ..common.devices import resolve_precision  # torch, imported when training

        precision = resolve_precision(self.precision, device)
        rng = np.random.default_rng(seed)
        # Its own stream: shuffling and view sampling are the same with and without augmentation.
        augment = MapAugment(parts, np.random.default_rng([seed, 1])) if parts else None
        schedule = np.zeros((self.epochs, n), dtype=np.int64)
        step = _Step(tail, float(self.lr), float(self.weight_decay), device, precision, augment, cw,
                     total=self.epochs * len(minibatches(np.arange(n), self.batch_size)))
        tracker = EpochTracker(1, self.epochs, self.patience)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # Dropout and stochastic depth inside the tail draw from the global generator.
            torch.manual_seed(seed)
            tail.train()
            for epoch in range(self.epochs):
                epoch_loss = 0.0
                perm = rng.permutation(n)
                if k_views:
                    schedule[epoch] = rng.integers(0, k_views + 1, size=n)
                for idx in minibatches(perm, self.batch_size):
                    idx = np.sort(idx)
                    xb = np.ascontiguousarray(read_batch(X, views, idx, schedule[epoch, idx] if k_views else None))
                    if streamed and not np.isfinite(xb).all():  # on the host: a device check would wait
                        raise HeadError(NOT_FINITE)
                    xb = torch.from_numpy(xb).to(device, dtype=torch.float32).reshape(len(idx), *cut.boundary_shape)
                    yb = y_all[torch.from_numpy(idx).to(device)]
                    epoch_loss += step(xb, yb) * len(idx)  # summed on the device: no wait per step

                def proba():
                    tail.eval()
                    try:
                        return [softmax(tail_logits(tail, tracker.monitor.X_eval, cut.boundary_shape, device,
                                                int(self.batch_size)))]
                    finally:
                        tail.train()

                if tracker.end_epoch(epoch, [float(epoch_loss) / n], proba,
                                     lambda g: {k: v.detach().clone() for k, v in tail.state_dict().items()}):
                    break
        if self.patience is not None:
            tail.load_state_dict(tracker.restore(0))
        self.tail_ = tail.cpu().eval()
        self.input_shape_ = tuple(int(s) for s in cut.boundary_shape)
        self.n_features_in_ = int(np.prod(self.input_shape_))
        self.backbone_name_ = bb.name
        self.view_schedule_ = schedule
        self.precision_ = precision
        tracker.attach(self, 0)

    # -- predict --------------------------------------------------------------------------------

    def predict_logits(self, X: Any) -> np.ndarray:
        """Logits of the tail, ndarray of shape (n_samples, n_classes), float32."""
        self._require_fitted()
        X = check_activations(X, "X")
        self._shape_of(X, self.input_shape_, "X")
        device = resolve_device(self.device)
        tail = self.tail_ if device.type == "cpu" else copy.deepcopy(self.tail_).to(device)
        tail.eval()
        return tail_logits(tail, X, self.input_shape_, device, int(self.batch_size))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities.

        Parameters
        ----------
        X : ndarray or h5py.Dataset of shape (n_samples, C, H, W), or flattened

        Returns
        -------
        ndarray of shape (n_samples, n_classes), float64
            ``softmax`` of the tail's logits, columns in ``classes_`` order.
        """
        return softmax(self.predict_logits(X))

    # -- sweep ----------------------------------------------------------------------------------

    def sweep_proba(self, X: Any, y: Any, grid: Sequence[Any], X_eval: Any, *,
                    views: Any = None) -> np.ndarray:
        """Fit once (the grid is ``(None,)``: nothing is swept) and score ``X_eval``.

        ``self`` is not modified.

        Returns
        -------
        ndarray of shape (len(grid), n_eval, n_classes), float64
        """
        self._check_params()
        grid = self._check_grid(grid)
        head = clone(self).fit(X, y, views=views)
        proba = head.predict_proba(X_eval)
        return np.stack([proba for _ in grid])

    def sweep_fit(self, X: Any, y: Any, grid: Sequence[Any], *, views: Any = None) -> list["TailHead"]:
        """One fit per grid value (the grid is ``(None,)``: nothing is swept). ``self`` is not
        modified."""
        self._check_params()
        return [clone(self).fit(X, y, views=views) for _ in self._check_grid(grid)]

    # -- state ----------------------------------------------------------------------------------

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {
            f"tail.{k}": v.detach().cpu().to(torch.float32).numpy()
            for k, v in self.tail_.state_dict().items()
        }

    def _state_meta(self) -> dict[str, Any]:
        return {
            "boundary": self.boundary,
            "precision": self.precision_,
            "input_shape": list(self.input_shape_),
            "backbone_name": self.backbone_name_,
        }

    def _load_state(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                    n_classes: int, n_features: int) -> None:
        shape = meta.get("input_shape")
        if (not isinstance(shape, list) or not shape
                or not all(isinstance(s, int) and s >= 1 for s in shape)
                or int(np.prod(shape)) != n_features):
            raise HeadError(
                f"The tail head state needs 'input_shape', the shape of one row of X with "
                f"{n_features} values; got {shape!r}. Re-fit and save the head."
            )
        bb = self._load_backbone()
        tail = build_tail(bb, self.boundary, n_classes, seed=resolve_seed(self.random_state))
        expected = tail.state_dict()
        missing = [k for k in expected if f"tail.{k}" not in arrays]
        unexpected = [k for k in arrays if not (k.startswith("tail.") and k[5:] in expected)]
        # 0-d buffers (BatchNorm's num_batches_tracked) come back as shape (1,) from safetensors.
        wrong = [k for k, v in expected.items()
                 if f"tail.{k}" in arrays and tuple(np.shape(arrays[f"tail.{k}"])) != tuple(v.shape)
                 and not (v.dim() == 0 and np.size(arrays[f"tail.{k}"]) == 1)]
        if missing or unexpected or wrong:
            raise HeadError(
                f"The saved tail does not fit layer '{self.boundary}' of {bb.name}: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}, other shape {wrong[:3]}. Re-fit and "
                f"save the head with this backbone."
            )
        state = {}
        for k, v in expected.items():
            arr = np.asarray(arrays[f"tail.{k}"])
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise HeadError(f"The saved array 'tail.{k}' contains NaN or infinity. Re-fit the head.")
            state[k] = torch.from_numpy(np.ascontiguousarray(arr).reshape(tuple(v.shape))).to(v.dtype)
        tail.load_state_dict(state, strict=True)
        self.tail_ = tail.eval()
        self.input_shape_ = tuple(shape)
        self.n_features_in_ = n_features
        self.backbone_name_ = bb.name
        self.view_schedule_ = np.zeros((0, 0), dtype=np.int64)
        self.precision_ = meta.get("precision", self.precision)

    def to_torch(self) -> nn.Module:
        """The trained tail: (B, C, H, W) float32 -> logits (B, n_classes), eval mode.

        ``torch.softmax(module(x), dim=1)`` equals ``predict_proba(x)``; ``nn.Sequential(
        prefix_model(backbone, boundary), module)`` maps normalised images to logits.
        """
        self._require_fitted()
        return copy.deepcopy(self.tail_).cpu().requires_grad_(False).eval()


__all__ = ["TailHead"]
