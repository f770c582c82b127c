"""The ``mlp`` head: one hidden layer (ReLU, dropout) trained with AdamW, a whole weight-decay
grid at once. Reads ``X`` in memory or in row chunks, like the ``linear`` head."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import numpy as np

from ..common.lazy import torch
from .training import cosine_lr, resolve_seed
from .params import CLASS_WEIGHT, COUNT, DEVICE, NON_NEGATIVE, PATIENCE, POSITIVE, SEED_OR_NONE, Interval
from .base import BaseHead, softmax, state_array
from .monitor import EpochTracker
from .solvers import DEFAULT_MAX_MEMORY, Rows, adam_step, class_weight_tensor, mlp_grid_proba, resolve_device

#: AdamW decoupled weight decays of the ``mlp`` head.
MLP_GRID: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


class MLPHead(BaseHead):
    """One hidden layer (ReLU, dropout) trained with AdamW, a whole weight-decay grid at once.

    Parameters
    ----------
    hidden : int, default=512
        Hidden units.
    dropout : float, default=0.5
        Dropout rate on the hidden layer during training.
    weight_decay : float, default=1e-4
        AdamW decoupled weight decay of both weight matrices (biases are not decayed).
    lr : float, default=1e-3
        AdamW peak learning rate (cosine schedule to 0).
    epochs : int, default=30
        AdamW passes over the data.
    batch_size : int, default=256
        Mini-batch rows.
    device : str, default="auto"
        Torch device; "auto" uses CUDA when available.
    max_memory : int, default=2 GiB
        Bytes of float32 features held at once; larger inputs are streamed in row chunks, as for
        :class:`LinearHead`.
    random_state : int or None, default=0
        Seed of the initialisation, shuffling and dropout masks; CPU results are deterministic.
    class_weight : {None, "balanced"}, default=None
        "balanced" weighs the cross-entropy of a row of class c by
        ``n_samples / (n_classes * n_c)`` (scikit-learn's meaning); the batch loss stays the
        weighted sum divided by the batch size.
    patience : int or None, default=None
        Stop after this many epochs without a better eval score and keep the best epoch's
        weights (needs eval data, see :func:`~featcache.heads.monitor.training_monitor`).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    coefs_ : list of ndarray, shapes (n_features, hidden) and (hidden, n_classes)
    intercepts_ : list of ndarray, shapes (hidden,) and (n_classes,)
    n_features_in_ : int

    Notes
    -----
    ``sweep_proba`` stacks the G grid points' weights and trains them together from the same
    initialisation, the same batches and the same dropout masks, so each grid point equals the
    single fit with that weight decay.
    """

    head_name = "mlp"
    param = "weight_decay"
    default_grid = MLP_GRID
    grid_bounds = (1e-6, 1e2)
    _parameter_constraints = {
        "hidden": COUNT, "dropout": [Interval(Real, 0, 1, closed="left")], "weight_decay": NON_NEGATIVE,
        "lr": POSITIVE, "epochs": COUNT, "batch_size": COUNT, "device": DEVICE, "max_memory": COUNT,
        "random_state": SEED_OR_NONE, "class_weight": CLASS_WEIGHT, "patience": PATIENCE,
    }
    streams = True
    thread_pool = "torch"

    def __init__(self, *, hidden: int = 512, dropout: float = 0.5, weight_decay: float = 1e-4, lr: float = 1e-3,
                 epochs: int = 30, batch_size: int = 256, device: str = "auto", max_memory: int = DEFAULT_MAX_MEMORY,
                 random_state: int | None = 0, class_weight: str | None = None, patience: int | None = None) -> None:
        self._store_options(locals())

    def _train(self, X: Any, y_idx: np.ndarray, n_classes: int, decays: list[float]):
        device = resolve_device(self.device)
        rows = Rows(X, device=device, max_memory=self.max_memory)
        y = torch.as_tensor(y_idx, dtype=torch.long, device=device)
        G, D, H, K = len(decays), rows.d, int(self.hidden), n_classes
        seed = resolve_seed(self.random_state)
        gen = torch.Generator().manual_seed(seed)
        mask_gen = torch.Generator(device=device).manual_seed(seed + 1)

        def uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
            # nn.Linear's default initialisation, drawn once and shared by the G heads.
            w = (torch.rand(shape, generator=gen) * 2.0 - 1.0) / math.sqrt(fan_in)
            return w.unsqueeze(0).repeat(G, *([1] * len(shape))).to(device).requires_grad_()

        W1, b1 = uniform((D, H), D), uniform((H,), D)
        W2, b2 = uniform((H, K), H), uniform((K,), H)
        params = [W1, b1, W2, b2]
        decay = torch.tensor(decays, dtype=torch.float32, device=device)
        cw = class_weight_tensor(y_idx, n_classes, self.class_weight, device)
        states = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        p_drop = float(self.dropout)
        total = self.epochs * rows.n_batches(self.batch_size)
        tracker = EpochTracker(G, self.epochs, self.patience)
        # The eval rows go to the device (and are checked) once, not every epoch.
        eval_rows = Rows(tracker.monitor.X_eval, device=device, max_memory=self.max_memory) \
            if tracker.watching else None
        step = 0
        for epoch in range(self.epochs):
            losses = torch.zeros(G, dtype=torch.float64, device=device)
            for xb, yb in rows.batches(y, self.batch_size, gen):
                step += 1
                lr = cosine_lr(float(self.lr), step, total)
                B = xb.shape[0]
                h = (xb @ W1.permute(1, 0, 2).reshape(D, G * H)).view(B, G, H).permute(1, 0, 2)
                h = torch.relu(h + b1[:, None, :])
                if p_drop > 0:
                    keep = torch.rand((B, H), generator=mask_gen, device=device) >= p_drop
                    h = h * (keep.to(h.dtype) / (1.0 - p_drop))
                z = torch.bmm(h, W2) + b2[:, None, :]
                per_head = torch.nn.functional.cross_entropy(
                    z.reshape(G * B, K), yb.repeat(G), weight=cw, reduction="none"
                ).view(G, B).sum(1)
                losses += per_head.detach().double()
                grads = torch.autograd.grad(per_head.sum() / B, params)
                for p, gr, st, wd in zip(params, grads, states, (decay, None, decay, None)):
                    adam_step(p, gr, st, step, lr, wd)

            def proba():
                return mlp_grid_proba(eval_rows, params, device, self.max_memory)

            if tracker.end_epoch(epoch, (losses / rows.n).tolist(), proba,
                                 lambda g: [p[g].detach().clone() for p in params]):
                break
        if self.patience is not None:
            with torch.no_grad():
                for g in range(G):
                    for p, kept in zip(params, tracker.restore(g)):
                        p[g] = kept
        return [p.detach() for p in params], tracker

    def _fit(self, X, y_idx, n_classes) -> None:
        params, tracker = self._train(X, y_idx, n_classes, [float(self.weight_decay)])
        self._adopt(params, 0, tracker)

    def _adopt(self, params: list[torch.Tensor], g: int, tracker: EpochTracker) -> "MLPHead":
        """Take grid point ``g`` of a batched run as this head's fitted state."""
        W1, b1, W2, b2 = (p[g].cpu().numpy().copy() for p in params)
        self.coefs_ = [W1, W2]
        self.intercepts_ = [b1, b2]
        self.n_features_in_ = int(W1.shape[0])
        tracker.attach(self, g)
        return self

    def _proba(self, X: np.ndarray) -> np.ndarray:
        X = X.astype(np.float32, copy=False)
        h = np.maximum(X @ self.coefs_[0] + self.intercepts_[0], 0.0)
        return softmax(h @ self.coefs_[1] + self.intercepts_[1])

    def _sweep_fit(self, X, y_idx, n_classes, grid) -> list[BaseHead]:
        params, tracker = self._train(X, y_idx, n_classes, [float(v) for v in grid])
        return [self.with_value(value)._adopt(params, g, tracker) for g, value in enumerate(grid)]

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {
            "coefs_0": self.coefs_[0],
            "coefs_1": self.coefs_[1],
            "intercepts_0": self.intercepts_[0],
            "intercepts_1": self.intercepts_[1],
        }

    def _load_state(self, arrays, meta, n_classes, n_features) -> None:
        H = int(self.hidden)
        self.coefs_ = [
            state_array(arrays, "coefs_0", (n_features, H)),
            state_array(arrays, "coefs_1", (H, n_classes)),
        ]
        self.intercepts_ = [
            state_array(arrays, "intercepts_0", (H,)),
            state_array(arrays, "intercepts_1", (n_classes,)),
        ]

    def to_torch(self) -> torch.nn.Module:
        """``Linear -> ReLU -> Linear`` in eval mode: ``softmax(module(x)) == predict_proba(x)``."""
        self._require_fitted()
        W1, W2 = (np.asarray(w, dtype=np.float32) for w in self.coefs_)
        b1, b2 = (np.asarray(b, dtype=np.float32) for b in self.intercepts_)
        from .modules import MLPModule

        return MLPModule(W1, b1, W2, b2)


__all__ = ["MLP_GRID", "MLPHead"]
