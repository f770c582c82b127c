"""The ``linear`` head: multinomial logistic regression in torch, a whole C grid at once.

It reads ``X`` in memory or, for an ``h5py.Dataset``-like object or an array larger than
``max_memory`` bytes, in contiguous row chunks cast to float32 (float16 caches work).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from ..errors import ConfigError
from ..common.lazy import torch
from .training import cosine_lr, resolve_seed
from .params import CLASS_WEIGHT, COUNT, DEVICE, PATIENCE, POSITIVE, SEED_OR_NONE, OneOf
from .base import BaseHead, LinearHeadMixin, scores_to_proba
from .monitor import EpochTracker
from .sklearn_heads import LOGREG_GRID
from .solvers import DEFAULT_MAX_MEMORY, LinearProblem, Rows, adam_step, batched_lbfgs, class_weight_tensor, \
    grid_scores, resolve_device

#: C values of the ``linear`` head (the same as ``logreg``: the two heads share C's meaning).
LINEAR_GRID: tuple[float, ...] = LOGREG_GRID


class LinearHead(LinearHeadMixin, BaseHead):
    """Multinomial logistic regression trained with torch, a whole grid of C at once.

    Minimises ``mean cross-entropy + ||W||^2 / (2 C n)`` (the intercept is not penalised),
    which is scikit-learn's ``LogisticRegression(C=C)`` objective divided by ``n``: ``linear``
    and ``logreg`` fit the same model. Two classes use one weight vector, as scikit-learn does.
    With ``class_weight="balanced"`` each row's cross-entropy is weighted by its class weight
    (the weights sum to ``n``), again scikit-learn's objective divided by ``n``.

    Parameters
    ----------
    C : float, default=1.0
        Inverse L2 strength (scikit-learn's meaning).
    solver : {"lbfgs", "adamw"}, default="lbfgs"
        "lbfgs": full-batch L-BFGS, one independent run per grid point evaluated together.
        "adamw": mini-batch AdamW with a cosine learning-rate schedule (for data too big for
        many full passes).
    max_iter : int, default=1000
        L-BFGS iterations.
    tol : float, default=1e-6
        L-BFGS stops at this largest absolute gradient entry of the mean objective (tighter than
        scikit-learn's 1e-4, which leaves coefficients ~1e-2 from the optimum).
    lr : float, default=1e-3
        AdamW peak learning rate.
    batch_size : int, default=1024
        AdamW mini-batch rows.
    epochs : int, default=30
        AdamW passes over the data.
    device : str, default="auto"
        Torch device; "auto" uses CUDA when available.
    max_memory : int, default=2 GiB
        Bytes of float32 features held at once; bigger inputs and any ``h5py.Dataset``-like
        ``X`` are streamed in contiguous row chunks.
    random_state : int or None, default=0
        Seed of the AdamW shuffling (L-BFGS is deterministic).
    class_weight : {None, "balanced"}, default=None
        "balanced" weighs class c by ``n_samples / (n_classes * n_c)`` (scikit-learn's meaning).
    patience : int or None, default=None
        AdamW only: stop after this many epochs without a better eval score and keep the best
        epoch's weights (needs eval data, see :func:`~featcache.heads.monitor.training_monitor`).

    Attributes
    ----------
    classes_, coef_, intercept_, n_features_in_ : as for :class:`~featcache.heads.sklearn_heads.LogRegHead`
    n_iter_ : int
        L-BFGS iterations, or AdamW steps (up to the kept epoch).
    history_ : list of dict
        AdamW only: per epoch ``{"epoch", "loss"}`` plus the eval score when watched.

    Notes
    -----
    ``sweep_proba`` trains one (G, n_features, k) weight tensor: every step is one pass over
    the data for all G values of C, and each grid point follows its own L-BFGS (or AdamW)
    trajectory, so the result equals G separate fits.

    Training runs in float32. With a weak penalty (large C) the optimum is flat and float32
    rounding bounds how close L-BFGS gets to it: the probabilities agree with a float64
    ``logreg`` fit to about 1e-3, the coefficients less closely.
    """

    head_name = "linear"
    param = "C"
    default_grid = LINEAR_GRID
    grid_bounds = (1e-6, 1e6)
    _parameter_constraints = {
        "C": POSITIVE, "solver": [OneOf("lbfgs", "adamw")], "max_iter": COUNT, "tol": POSITIVE, "lr": POSITIVE,
        "batch_size": COUNT, "epochs": COUNT, "device": DEVICE, "max_memory": COUNT, "random_state": SEED_OR_NONE,
        "class_weight": CLASS_WEIGHT, "patience": PATIENCE,
    }
    streams = True
    thread_pool = "torch"

    def __init__(self, *, C: float = 1.0, solver: str = "lbfgs", max_iter: int = 1000, tol: float = 1e-6,
                 lr: float = 1e-3, batch_size: int = 1024, epochs: int = 30, device: str = "auto",
                 max_memory: int = DEFAULT_MAX_MEMORY, random_state: int | None = 0,
                 class_weight: str | None = None, patience: int | None = None) -> None:
        self._store_options(locals())

    def _check_combination(self) -> None:
        if self.patience is not None and self.solver != "adamw":
            raise ConfigError(
                f"The 'patience' option stops AdamW epochs; solver={self.solver!r} has none. "
                "Pass solver='adamw' or drop patience."
            )

    def _train(
        self, X: Any, y_idx: np.ndarray, n_classes: int, Cs: list[float]
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, EpochTracker | None]:
        device = resolve_device(self.device)
        rows = Rows(X, device=device, max_memory=self.max_memory)
        y = torch.as_tensor(y_idx, dtype=torch.long, device=device)
        cw = class_weight_tensor(y_idx, n_classes, self.class_weight, device)
        prob = LinearProblem(rows, y, n_classes, [float(c) for c in Cs], cw)
        if self.solver == "lbfgs":
            x0 = torch.zeros(prob.G, prob.P, dtype=torch.float32, device=device)
            history = int(min(10, max(3, (1 << 30) // max(1, 8 * prob.G * prob.P))))
            x, n_iter, unfinished = batched_lbfgs(
                prob.fg, x0, max_iter=self.max_iter, tol=float(self.tol), history=history
            )
            if unfinished.any():
                bad = [Cs[i] for i in np.flatnonzero(unfinished)]
                warnings.warn(
                    f"linear head: L-BFGS reached max_iter={self.max_iter} before converging for "
                    f"C={', '.join(f'{c:g}' for c in bad)}. Increase 'max_iter', lower C or "
                    "standardise the features.",
                    ConvergenceWarning,
                    stacklevel=3,
                )
            W, b = prob.unpack(x)
            return W, b, n_iter, None
        return self._train_adamw(prob, rows, y, n_classes)

    def _train_adamw(self, prob: LinearProblem, rows: Rows, y: torch.Tensor, n_classes: int):
        gen = torch.Generator().manual_seed(resolve_seed(self.random_state))
        W = torch.zeros(prob.G, prob.D, prob.k, device=rows.device)
        b = torch.zeros(prob.G, prob.k, device=rows.device)
        states = [(torch.zeros_like(p), torch.zeros_like(p)) for p in (W, b)]
        total = self.epochs * rows.n_batches(self.batch_size)
        tracker = EpochTracker(prob.G, self.epochs, self.patience)
        # The eval rows go to the device (and are checked) once, not every epoch.
        eval_rows = Rows(tracker.monitor.X_eval, device=rows.device, max_memory=self.max_memory) \
            if tracker.watching else None
        step = 0
        for epoch in range(self.epochs):
            losses = torch.zeros(prob.G, dtype=torch.float64, device=rows.device)
            for xb, yb in rows.batches(y, self.batch_size, gen):
                step += 1
                lr = cosine_lr(float(self.lr), step, total)
                loss, gW, gb = prob.loss_grad_sum(W, b, xb, yb)
                losses += loss
                gW = gW / xb.shape[0] + prob.inv_reg[:, None, None] * W
                adam_step(W, gW, states[0], step, lr)
                adam_step(b, gb / xb.shape[0], states[1], step, lr)

            def proba():
                scores = grid_scores(eval_rows, W, b, device=W.device, max_memory=self.max_memory)
                return [scores_to_proba(z) for z in scores]

            if tracker.end_epoch(epoch, (losses / rows.n).tolist(), proba,
                                 lambda g: (W[g].clone(), b[g].clone(), step)):
                break
        n_iter = np.full(prob.G, step)
        if self.patience is not None:
            for g in range(prob.G):
                W[g], b[g], n_iter[g] = tracker.restore(g)
        return W, b, n_iter, tracker

    def _adopt(self, W: torch.Tensor, b: torch.Tensor, n_iter: np.ndarray, g: int,
               tracker: EpochTracker | None, n_features: int) -> "LinearHead":
        """Take grid point ``g`` of a batched run as this head's fitted state."""
        self.coef_ = W[g].T.cpu().numpy().copy()
        self.intercept_ = b[g].cpu().numpy().copy()
        self.n_iter_ = int(n_iter[g])
        self.n_features_in_ = n_features
        if tracker is not None:
            tracker.attach(self, g)
        return self

    def _fit(self, X, y_idx, n_classes) -> None:
        W, b, n_iter, tracker = self._train(X, y_idx, n_classes, [float(self.C)])
        self._adopt(W, b, n_iter, 0, tracker, int(X.shape[1]))

    def _sweep(self, X, y_idx, n_classes, grid, X_eval) -> np.ndarray:
        W, b, _, _ = self._train(X, y_idx, n_classes, [float(c) for c in grid])
        scores = grid_scores(X_eval, W, b, device=W.device, max_memory=self.max_memory)
        return np.stack([scores_to_proba(s) for s in scores])

    def _sweep_fit(self, X, y_idx, n_classes, grid) -> list[BaseHead]:
        W, b, n_iter, tracker = self._train(X, y_idx, n_classes, [float(c) for c in grid])
        return [self.with_value(value)._adopt(W, b, n_iter, g, tracker, int(X.shape[1]))
                for g, value in enumerate(grid)]


__all__ = ["LINEAR_GRID", "LinearHead"]
