"""Heads trained with torch: a linear probe and a one-hidden-layer MLP.

Both train a whole grid of their swept parameter at once (the DINOv2 linear-eval trick): the
weights of the G grid points are stacked in one tensor of shape (G, ...), every step makes one
pass over the data for all of them with a single matrix product, and the heads never interact.
A 13-point sweep therefore costs little more than one fit, on the CPU or on a GPU.

Both read ``X`` either in memory or, for an ``h5py.Dataset``-like object or an array larger
than ``max_memory`` bytes, in contiguous row chunks cast to float32 (float16 caches work).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from ..errors import ConfigError, HeadError
from .. import devices
from ..training import cosine_lr, resolve_seed
from ..registry import check_choice, check_int
from .base import (
    CLASS_WEIGHT_HELP,
    PATIENCE_HELP,
    BaseHead,
    EpochTracker,
    LinearHeadMixin,
    check_class_weight,
    check_number,
    check_patience,
    class_weights,
    scores_to_proba,
    softmax,
    state_array,
)
from .sklearn_heads import LOGREG_GRID

logger = logging.getLogger(__name__)

#: Default bound on the feature bytes (as float32) held in memory at once: 2 GiB.
DEFAULT_MAX_MEMORY = 2 * 1024**3
#: C values of the ``linear`` head (the same as ``logreg``: the two heads share C's meaning).
LINEAR_GRID: tuple[float, ...] = LOGREG_GRID
#: AdamW decoupled weight decays of the ``mlp`` head.
MLP_GRID: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: Bound on the elements of one (G, rows, classes) logits block.
_BLOCK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------------
# Shared plumbing


def check_device(device: Any) -> None:
    """Validate the spelling of a ``device`` option ("auto", "cpu", "cuda", "cuda:1", ...)."""
    if device == "auto":
        return
    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"The 'device' option must be 'auto', 'cpu', 'cuda' or 'cuda:N'. Got {device!r}."
        ) from None


def resolve_device(device: str) -> torch.device:
    """The torch device of a head: "auto" picks CUDA when available, else the CPU (never MPS: the
    heads' L-BFGS runs in float64, which MPS lacks); other spellings as
    :func:`featcache.devices.resolve_device`, which checks CUDA and the GPU index."""
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return devices.resolve_device(device)


def _check_seed(value: Any) -> None:
    if value is not None:
        check_int("random_state", value, minimum=0)


def _check_memory(value: Any) -> None:
    check_int("max_memory", value, minimum=1)


class _Rows:
    """Row access to features as float32 tensors on ``device``.

    An ndarray that fits in ``max_memory`` bytes (as float32) is moved to the device once;
    anything else (an ``h5py.Dataset``-like object, a bigger array) is read in contiguous chunks
    of at most ``max_memory`` bytes at every pass.
    """

    def __init__(self, X: Any, *, device: torch.device, max_memory: int) -> None:
        self.X = X
        self.n, self.d = int(X.shape[0]), int(X.shape[1])
        self.device = device
        row_bytes = 4 * self.d
        self.chunk_rows = max(1, min(self.n, max_memory // row_bytes))
        self.resident: torch.Tensor | None = None
        if isinstance(X, np.ndarray) and self.n * row_bytes <= max_memory:
            self.resident = self._load(0, self.n)
            self.chunk_rows = self.n
        else:
            logger.debug("streaming %d rows in chunks of %d", self.n, self.chunk_rows)

    def _load(self, start: int, stop: int) -> torch.Tensor:
        chunk = np.ascontiguousarray(self.X[start:stop])
        if chunk.dtype.kind not in "f":
            chunk = chunk.astype(np.float32)
        t = torch.from_numpy(chunk).to(self.device, dtype=torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise HeadError(
                f"X contains NaN or infinity (rows {start}:{stop}). "
                "Check the features (re-extract the cache) or drop those rows."
            )
        return t

    def starts(self) -> list[int]:
        return list(range(0, self.n, self.chunk_rows))

    def chunks(self, order: list[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, rows)``; ``order`` lists chunk starts (default: in order)."""
        if self.resident is not None:
            yield 0, self.resident
            return
        for start in order if order is not None else self.starts():
            yield start, self._load(start, min(self.n, start + self.chunk_rows))

    def n_batches(self, batch_size: int) -> int:
        return sum(
            math.ceil((min(self.n, s + self.chunk_rows) - s) / batch_size) for s in self.starts()
        )

    def batches(
        self, y: torch.Tensor, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One shuffled epoch: chunks in random order, rows shuffled within each chunk."""
        starts = self.starts()
        order = [starts[i] for i in torch.randperm(len(starts), generator=generator).tolist()]
        for start, x in self.chunks(order):
            perm = torch.randperm(x.shape[0], generator=generator).to(self.device)
            for s in range(0, x.shape[0], batch_size):
                idx = perm[s : s + batch_size]
                yield x[idx], y[start + idx]


def _adam_step(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    step: int,
    lr: float,
    decay: torch.Tensor | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """AdamW update of a stacked (G, ...) parameter with a per-head decoupled weight decay.

    Element-wise, so the G heads are G independent AdamW runs (torch.optim.AdamW's formula).
    """
    m, v = state
    with torch.no_grad():
        if decay is not None:
            p.mul_(1.0 - lr * decay.view(-1, *([1] * (p.dim() - 1))))
        m.mul_(betas[0]).add_(grad, alpha=1.0 - betas[0])
        v.mul_(betas[1]).addcmul_(grad, grad, value=1.0 - betas[1])
        denom = (v / (1.0 - betas[1] ** step)).sqrt_().add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1.0 - betas[0] ** step))


def batched_lbfgs(
    fg: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x0: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
    history: int = 10,
    max_ls: int = 25,
    ftol: float = 2.2e-9,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Minimise G independent smooth functions at once, one L-BFGS run per function.

    Each function keeps its own curvature pairs, step length and stopping test, so the result
    is that of G separate runs, while one call of ``fg`` evaluates all G functions (one pass
    over the data). Steps are accepted by Armijo's test (backtracking with quadratic
    interpolation) or, once decreases of ``f`` are lost in float32 rounding, by Hager and
    Zhang's approximate Wolfe test on the directional derivative. A function whose line search
    finds no acceptable step stops there.

    Parameters
    ----------
    fg : callable
        ``fg(x, idx)`` with ``x`` of shape (G', P), the points of functions ``idx`` (a long
        tensor, or None for all G), returns ``f`` of shape (G',) (float64) and the gradient of
        shape (G', P).
    x0 : Tensor of shape (G, P)
    max_iter : int
    tol : float
        A function stops when the largest absolute gradient entry is <= ``tol``.
    history : int, default=10
    max_ls : int, default=25
    ftol : float, default=2.2e-9
        A function also stops when its relative decrease falls below ``ftol`` (scipy's default).

    Returns
    -------
    x : Tensor of shape (G, P)
    n_iter : ndarray of shape (G,)
    hit_max_iter : ndarray of shape (G,), bool
        Functions still improving when ``max_iter`` ran out.
    """
    x = x0.clone()
    f, g = fg(x, None)
    G = x.shape[0]

    def evaluate(trial: torch.Tensor, need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Only the functions still searching are evaluated: converged grid points cost nothing.
        ft = torch.full((G,), float("inf"), dtype=torch.float64, device=trial.device)
        gt = torch.zeros_like(trial)
        idx = need.nonzero().flatten()
        if len(idx):
            fs, gs = fg(trial[idx], idx)
            ft[idx], gt[idx] = fs, gs
        return ft, gt

    dev = x.device
    active = g.abs().amax(1) > tol
    n_iter = torch.zeros(G, dtype=torch.long, device=dev)
    S: list[torch.Tensor] = []
    Yh: list[torch.Tensor] = []
    R: list[torch.Tensor] = []
    gamma = torch.ones(G, dtype=x.dtype, device=dev)
    has_pair = torch.zeros(G, dtype=torch.bool, device=dev)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        # Two-loop recursion, per function (rho = 0 marks a skipped pair).
        q = g.clone()
        alphas = []
        for s, yv, rho in zip(reversed(S), reversed(Yh), reversed(R)):
            a = rho * (s * q).sum(1)
            q -= a[:, None] * yv
            alphas.append(a)
        r = gamma[:, None] * q
        for (s, yv, rho), a in zip(zip(S, Yh, R), reversed(alphas)):
            b = rho * (yv * r).sum(1)
            r += s * (a - b)[:, None]
        d = -r
        gd = (g * d).sum(1).double()
        bad = ~(gd < 0)
        d = torch.where(bad[:, None], -g, d)
        gd = torch.where(bad, -(g * g).sum(1).double(), gd)
        d = d * active[:, None]
        t = torch.where(
            has_pair,
            torch.ones_like(gd),
            torch.clamp(1.0 / g.abs().sum(1).double().clamp_min(1e-30), max=1.0),
        )

        accepted = ~active
        x_new, f_new, g_new = x.clone(), f.clone(), g.clone()
        for _ in range(max_ls):
            trial = torch.where(accepted[:, None], x_new, x + t.to(x.dtype)[:, None] * d)
            ft, gt = evaluate(trial, ~accepted)
            armijo = ft <= f + 1e-4 * t * gd
            # Hager-Zhang's approximate Wolfe test: once f's decrease drowns in float32 rounding,
            # the directional derivative still tells a good step from a bad one.
            gtd = (gt * d).sum(1).double()
            approx = (gtd >= 0.9 * gd) & (gtd <= -0.8 * gd) & (ft <= f + 1e-6 * f.abs())
            ok = ~accepted & torch.isfinite(ft) & (armijo | approx)
            x_new = torch.where(ok[:, None], trial, x_new)
            f_new = torch.where(ok, ft, f_new)
            g_new = torch.where(ok[:, None], gt, g_new)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            t_quad = -gd * t * t / (2.0 * (ft - f - gd * t))
            t_next = torch.where(torch.isfinite(t_quad), t_quad, 0.5 * t)
            t_next = torch.minimum(torch.maximum(t_next, 0.1 * t), 0.5 * t)
            t = torch.where(accepted, t, t_next)
        stepped = active & accepted

        s = x_new - x
        yv = g_new - g
        sy = (s * yv).sum(1)
        yy = (yv * yv).sum(1)
        valid = stepped & (sy > 1e-10 * yy) & (yy > 0)
        rho = torch.where(
            valid, 1.0 / torch.where(valid, sy, torch.ones_like(sy)), torch.zeros_like(sy)
        )
        S.append(s * valid[:, None])
        Yh.append(yv * valid[:, None])
        R.append(rho)
        if len(S) > history:
            S.pop(0), Yh.pop(0), R.pop(0)
        gamma = torch.where(valid, sy / torch.where(valid, yy, torch.ones_like(yy)), gamma)
        has_pair = has_pair | valid

        decrease = f - f_new
        scale = torch.maximum(torch.maximum(f.abs(), f_new.abs()), torch.ones_like(f))
        x, f, g = x_new, f_new, g_new
        n_iter += stepped.long()
        done = stepped & ((g.abs().amax(1) <= tol) | (decrease <= ftol * scale))
        # A failed line search means no float32 decrease is left along the direction: stop.
        active = active & ~done & accepted
    return x, n_iter.cpu().numpy(), active.cpu().numpy()


# ----------------------------------------------------------------------------------------------
# The linear head


class _LinearProblem:
    """Mean cross-entropy + ``||W||^2 / (2 C n)`` for G stacked linear heads.

    Two classes use one output column (the score of class 1 against a fixed 0), exactly
    scikit-learn's binary logistic regression; more classes use one column per class. With
    per-class weights ``cw`` the loss of a row of class c is multiplied by ``cw[c]``
    (``sum_i cw[y_i] * ce_i / n``): scikit-learn's ``class_weight`` objective divided by ``C n``.
    """

    def __init__(
        self,
        rows: _Rows,
        y: torch.Tensor,
        n_classes: int,
        Cs: list[float],
        cw: torch.Tensor | None = None,
    ) -> None:
        self.rows, self.y, self.cw = rows, y, cw
        self.binary = n_classes == 2
        self.k = 1 if self.binary else n_classes
        self.G, self.D = len(Cs), rows.d
        self.P = self.D * self.k + self.k
        self.inv_reg = torch.tensor(
            [1.0 / (c * rows.n) for c in Cs], dtype=torch.float32, device=rows.device
        )
        self.block_rows = max(1, _BLOCK_ELEMENTS // (self.G * (self.k + 1)))

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        W = x[:, : self.D * self.k].view(x.shape[0], self.D, self.k)
        return W, x[:, self.D * self.k :]

    def logits(self, W: torch.Tensor, b: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        """Scores of shape (G, B, k): one (B, D) @ (D, G*k) product for all heads."""
        G = W.shape[0]
        Wcat = W.permute(1, 0, 2).reshape(self.D, G * self.k)
        return (xb @ Wcat).view(-1, G, self.k).permute(1, 0, 2) + b[:, None, :]

    def loss_grad_sum(
        self, W: torch.Tensor, b: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed cross-entropy (G,) float64 and its gradients (G, D, k), (G, k) over a block."""
        z = self.logits(W, b, xb)
        if self.binary:
            z = torch.cat([torch.zeros_like(z), z], dim=2)
        B = xb.shape[0]
        lse = torch.logsumexp(z, dim=2)
        true = z[:, torch.arange(B, device=z.device), yb]
        ce = lse - true
        p = torch.exp(z - lse[..., None])
        p[:, torch.arange(B, device=z.device), yb] -= 1.0
        if self.cw is not None:
            wb = self.cw[yb]
            ce = ce * wb
            p = p * wb[None, :, None]
        loss = ce.sum(1, dtype=torch.float64)
        if self.binary:
            p = p[..., 1:]
        G = W.shape[0]
        gW = (xb.T @ p.permute(1, 0, 2).reshape(B, G * self.k)).view(self.D, G, self.k)
        return loss, gW.permute(1, 0, 2), p.sum(1)

    def fg(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-batch objective (G',) and gradient (G', P), accumulated over row chunks, for the
        grid points ``idx`` (all when None; ``x`` holds just those rows)."""
        W, b = self.unpack(x)
        inv_reg = self.inv_reg if idx is None else self.inv_reg[idx]
        f = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        gW = torch.zeros_like(W)
        gb = torch.zeros_like(b)
        for start, xc in self.rows.chunks():
            for s in range(0, xc.shape[0], self.block_rows):
                xb = xc[s : s + self.block_rows]
                yb = self.y[start + s : start + s + xb.shape[0]]
                loss, dW, db = self.loss_grad_sum(W, b, xb, yb)
                f += loss
                gW += dW
                gb += db
        n = self.rows.n
        f = f / n + 0.5 * (inv_reg.double() * (W.double() ** 2).sum((1, 2)))
        gW = gW / n + inv_reg[:, None, None] * W
        return f, torch.cat([gW.reshape(x.shape[0], -1), gb / n], dim=1)


def _grid_scores(
    X: Any, W: torch.Tensor, b: torch.Tensor, *, device: torch.device, max_memory: int
) -> np.ndarray:
    """Scores (G, n, k) of G stacked linear heads on ``X``, in one pass over ``X``."""
    rows = _Rows(X, device=device, max_memory=max_memory)
    G, D, k = W.shape
    Wcat = W.permute(1, 0, 2).reshape(D, G * k)
    out = []
    with torch.no_grad():
        for _, xc in rows.chunks():
            z = (xc @ Wcat).view(-1, G, k).permute(1, 0, 2) + b[:, None, :]
            out.append(z.cpu().numpy())
    return np.concatenate(out, axis=1)


def _class_weight_tensor(
    y_idx: np.ndarray, n_classes: int, class_weight: str | None, device: torch.device
) -> torch.Tensor | None:
    """Per-class weights (n_classes,) float32 on ``device``, or None."""
    cw = class_weights(y_idx, n_classes, class_weight)
    return None if cw is None else torch.tensor(cw, dtype=torch.float32, device=device)


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
        epoch's weights (needs eval data, see :func:`~featcache.heads.base.training_monitor`).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    coef_ : ndarray of shape (1, n_features) for two classes, else (n_classes, n_features)
    intercept_ : ndarray of shape (1,) or (n_classes,)
    n_features_in_ : int
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

    param = "C"
    default_grid = LINEAR_GRID
    grid_bounds = (1e-6, 1e6)
    options = {
        "C": "inverse L2 strength (scikit-learn meaning); the swept parameter",
        "solver": "lbfgs (full batch) or adamw (mini-batch)",
        "max_iter": "L-BFGS iterations",
        "tol": "L-BFGS gradient tolerance",
        "lr": "AdamW peak learning rate (cosine schedule)",
        "batch_size": "AdamW mini-batch rows",
        "epochs": "AdamW passes over the data",
        "device": "torch device: auto, cpu, cuda, cuda:N",
        "max_memory": "bytes of features held at once; larger inputs are streamed in chunks",
        "random_state": "seed of the AdamW shuffling",
        "class_weight": CLASS_WEIGHT_HELP,
        "patience": PATIENCE_HELP,
    }
    streams = True
    thread_pool = "torch"

    def __init__(
        self,
        *,
        C: float = 1.0,
        solver: str = "lbfgs",
        max_iter: int = 1000,
        tol: float = 1e-6,
        lr: float = 1e-3,
        batch_size: int = 1024,
        epochs: int = 30,
        device: str = "auto",
        max_memory: int = DEFAULT_MAX_MEMORY,
        random_state: int | None = 0,
        class_weight: str | None = None,
        patience: int | None = None,
    ) -> None:
        self.C = C
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.lr = lr
        self.batch_size = batch_size
        self.epochs = epochs
        self.device = device
        self.max_memory = max_memory
        self.random_state = random_state
        self.class_weight = class_weight
        self.patience = patience

    def _check_params(self) -> None:
        check_number("C", self.C)
        check_choice("solver", self.solver, ("lbfgs", "adamw"))
        check_int("max_iter", self.max_iter)
        check_number("tol", self.tol)
        check_number("lr", self.lr)
        check_int("batch_size", self.batch_size)
        check_int("epochs", self.epochs)
        check_device(self.device)
        _check_memory(self.max_memory)
        _check_seed(self.random_state)
        check_class_weight(self.class_weight)
        check_patience(self.patience)
        if self.patience is not None and self.solver != "adamw":
            raise ConfigError(
                f"The 'patience' option stops AdamW epochs; solver={self.solver!r} has none. "
                "Pass solver='adamw' or drop patience."
            )

    def _train(
        self, X: Any, y_idx: np.ndarray, n_classes: int, Cs: list[float]
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, EpochTracker | None]:
        device = resolve_device(self.device)
        rows = _Rows(X, device=device, max_memory=self.max_memory)
        y = torch.as_tensor(y_idx, dtype=torch.long, device=device)
        cw = _class_weight_tensor(y_idx, n_classes, self.class_weight, device)
        prob = _LinearProblem(rows, y, n_classes, [float(c) for c in Cs], cw)
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

    def _train_adamw(self, prob: _LinearProblem, rows: _Rows, y: torch.Tensor, n_classes: int):
        gen = torch.Generator().manual_seed(resolve_seed(self.random_state))
        W = torch.zeros(prob.G, prob.D, prob.k, device=rows.device)
        b = torch.zeros(prob.G, prob.k, device=rows.device)
        states = [(torch.zeros_like(p), torch.zeros_like(p)) for p in (W, b)]
        total = self.epochs * rows.n_batches(self.batch_size)
        tracker = EpochTracker(prob.G, self.epochs, n_classes, self.patience)
        step = 0
        for epoch in range(self.epochs):
            losses = torch.zeros(prob.G, dtype=torch.float64, device=rows.device)
            for xb, yb in rows.batches(y, self.batch_size, gen):
                step += 1
                lr = cosine_lr(float(self.lr), step, total)
                loss, gW, gb = prob.loss_grad_sum(W, b, xb, yb)
                losses += loss
                gW = gW / xb.shape[0] + prob.inv_reg[:, None, None] * W
                _adam_step(W, gW, states[0], step, lr)
                _adam_step(b, gb / xb.shape[0], states[1], step, lr)

            def proba():
                scores = _grid_scores(tracker.monitor.X_eval, W, b, device=W.device, max_memory=self.max_memory)
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
        scores = _grid_scores(X_eval, W, b, device=W.device, max_memory=self.max_memory)
        return np.stack([scores_to_proba(s) for s in scores])

    def _sweep_fit(self, X, y_idx, n_classes, grid) -> list[BaseHead]:
        W, b, n_iter, tracker = self._train(X, y_idx, n_classes, [float(c) for c in grid])
        return [self._with_value(value)._adopt(W, b, n_iter, g, tracker, int(X.shape[1]))
                for g, value in enumerate(grid)]


# ----------------------------------------------------------------------------------------------
# The MLP head


def _mlp_grid_proba(X: Any, params: list[torch.Tensor], device: torch.device, max_memory: int) -> list[np.ndarray]:
    """Eval probabilities of G stacked MLPs (no dropout), one pass over ``X``, in row blocks."""
    W1, b1, W2, b2 = (p.detach() for p in params)
    rows = _Rows(X, device=device, max_memory=max_memory)
    block = max(1, _BLOCK_ELEMENTS // max(1, W1.shape[0] * W1.shape[2]))
    out = []
    with torch.no_grad():
        for _, xc in rows.chunks():
            for s in range(0, xc.shape[0], block):
                h = torch.relu(torch.einsum("nd,gdh->gnh", xc[s : s + block], W1) + b1[:, None, :])
                out.append(torch.softmax(torch.bmm(h, W2) + b2[:, None, :], dim=2).double().cpu().numpy())
    return list(np.concatenate(out, axis=1))


class _MLPModule(torch.nn.Module):
    """``Linear -> ReLU -> Linear`` (dropout is a training-time device, absent here)."""

    def __init__(self, W1: np.ndarray, b1: np.ndarray, W2: np.ndarray, b2: np.ndarray) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(W1.shape[0], W1.shape[1])
        self.out = torch.nn.Linear(W2.shape[0], W2.shape[1])
        with torch.no_grad():
            self.hidden.weight.copy_(torch.from_numpy(np.ascontiguousarray(W1.T)))
            self.hidden.bias.copy_(torch.from_numpy(b1))
            self.out.weight.copy_(torch.from_numpy(np.ascontiguousarray(W2.T)))
            self.out.bias.copy_(torch.from_numpy(b2))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x.to(self.hidden.weight.dtype))))


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
    batch_size : int, default=256
    device : str, default="auto"
    max_memory : int, default=2 GiB
        As for :class:`LinearHead`.
    random_state : int or None, default=0
        Seed of the initialisation, shuffling and dropout masks; CPU results are deterministic.
    class_weight : {None, "balanced"}, default=None
        "balanced" weighs the cross-entropy of a row of class c by
        ``n_samples / (n_classes * n_c)`` (scikit-learn's meaning); the batch loss stays the
        weighted sum divided by the batch size.

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

    param = "weight_decay"
    default_grid = MLP_GRID
    grid_bounds = (1e-6, 1e2)
    options = {
        "hidden": "hidden units",
        "dropout": "dropout rate on the hidden layer",
        "weight_decay": "AdamW decoupled weight decay; the swept parameter",
        "lr": "AdamW peak learning rate (cosine schedule)",
        "epochs": "passes over the data",
        "batch_size": "mini-batch rows",
        "device": "torch device: auto, cpu, cuda, cuda:N",
        "max_memory": "bytes of features held at once; larger inputs are streamed in chunks",
        "random_state": "seed of initialisation, shuffling and dropout",
        "class_weight": CLASS_WEIGHT_HELP,
        "patience": PATIENCE_HELP,
    }
    streams = True
    thread_pool = "torch"

    def __init__(
        self,
        *,
        hidden: int = 512,
        dropout: float = 0.5,
        weight_decay: float = 1e-4,
        lr: float = 1e-3,
        epochs: int = 30,
        batch_size: int = 256,
        device: str = "auto",
        max_memory: int = DEFAULT_MAX_MEMORY,
        random_state: int | None = 0,
        class_weight: str | None = None,
        patience: int | None = None,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.device = device
        self.max_memory = max_memory
        self.random_state = random_state
        self.class_weight = class_weight
        self.patience = patience

    def _check_params(self) -> None:
        check_int("hidden", self.hidden)
        dropout = check_number("dropout", self.dropout, strict=False)
        if dropout >= 1.0:
            raise ConfigError(f"The 'dropout' option must be in [0, 1). Got {self.dropout!r}.")
        check_number("weight_decay", self.weight_decay, strict=False)
        check_number("lr", self.lr)
        check_int("epochs", self.epochs)
        check_int("batch_size", self.batch_size)
        check_device(self.device)
        _check_memory(self.max_memory)
        _check_seed(self.random_state)
        check_class_weight(self.class_weight)
        check_patience(self.patience)

    def _train(self, X: Any, y_idx: np.ndarray, n_classes: int, decays: list[float]):
        device = resolve_device(self.device)
        rows = _Rows(X, device=device, max_memory=self.max_memory)
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
        cw = _class_weight_tensor(y_idx, n_classes, self.class_weight, device)
        states = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        p_drop = float(self.dropout)
        total = self.epochs * rows.n_batches(self.batch_size)
        tracker = EpochTracker(G, self.epochs, n_classes, self.patience)
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
                    _adam_step(p, gr, st, step, lr, wd)

            def proba():
                return _mlp_grid_proba(tracker.monitor.X_eval, params, device, self.max_memory)

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
        return [self._with_value(value)._adopt(params, g, tracker) for g, value in enumerate(grid)]

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
        return _MLPModule(W1, b1, W2, b2)


__all__ = [
    "DEFAULT_MAX_MEMORY",
    "LINEAR_GRID",
    "MLP_GRID",
    "LinearHead",
    "MLPHead",
    "batched_lbfgs",
]
