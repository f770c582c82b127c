"""The numerical machinery of the torch heads: row access to features in memory or on disk,
batched L-BFGS and AdamW steps, the stacked linear problem, and grid scoring.

The heads train a whole grid of their swept parameter at once (the DINOv2 linear-eval trick):
the weights of the G grid points are stacked in one tensor of shape (G, ...), every step makes one
pass over the data for all of them with a single matrix product, and the grid points never
interact. torch is imported on first use (:mod:`featcache.common.lazy`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import HeadError
from ..common.lazy import torch
from ..common.validation import check_device
from .inputs import class_weights

logger = logging.getLogger(__name__)

#: Default bound on the feature bytes (as float32) held in memory at once: 2 GiB.
DEFAULT_MAX_MEMORY = 2 * 1024**3
#: Bound on the elements of one (G, rows, classes) logits block.
BLOCK_ELEMENTS = 1 << 24


def resolve_device(device: str) -> torch.device:
    """The torch device of a head: "auto" picks CUDA when available, else the CPU (never MPS: the
    heads' L-BFGS runs in float64, which MPS lacks); other spellings as
    :func:`featcache.common.devices.resolve_device`, which checks CUDA and the GPU index."""
    check_device(device)
    from ..common import devices

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return devices.resolve_device(device)


class Rows:
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


def adam_step(
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


def _direction(g: torch.Tensor, S: list, Yh: list, R: list, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS search directions by the two-loop recursion, per function (rho = 0 marks a skipped
    pair); steepest descent where that is not a descent direction. Returns (d, g.d in float64)."""
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
    return d, torch.where(bad, -(g * g).sum(1).double(), gd)


def _line_search(evaluate, x, f, g, d, gd, t, accepted, max_ls: int):
    """Backtracking along ``d`` from step ``t`` for every function not yet ``accepted``.

    Returns the new points, values and gradients, and which functions found an acceptable step.
    """
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
    return x_new, f_new, g_new, accepted


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
        d, gd = _direction(g, S, Yh, R, gamma)
        d = d * active[:, None]
        t = torch.where(
            has_pair,
            torch.ones_like(gd),
            torch.clamp(1.0 / g.abs().sum(1).double().clamp_min(1e-30), max=1.0),
        )

        x_new, f_new, g_new, accepted = _line_search(evaluate, x, f, g, d, gd, t, ~active, max_ls)
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


class LinearProblem:
    """Mean cross-entropy + ``||W||^2 / (2 C n)`` for G stacked linear heads.

    Two classes use one output column (the score of class 1 against a fixed 0), exactly
    scikit-learn's binary logistic regression; more classes use one column per class. With
    per-class weights ``cw`` the loss of a row of class c is multiplied by ``cw[c]``
    (``sum_i cw[y_i] * ce_i / n``): scikit-learn's ``class_weight`` objective divided by ``C n``.
    """

    def __init__(
        self,
        rows: Rows,
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
        self.block_rows = max(1, BLOCK_ELEMENTS // (self.G * (self.k + 1)))

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


def grid_scores(
    X: Any, W: torch.Tensor, b: torch.Tensor, *, device: torch.device, max_memory: int
) -> np.ndarray:
    """Scores (G, n, k) of G stacked linear heads on ``X`` (or its :class:`Rows`), in one pass over it."""
    rows = X if isinstance(X, Rows) else Rows(X, device=device, max_memory=max_memory)
    G, D, k = W.shape
    Wcat = W.permute(1, 0, 2).reshape(D, G * k)
    out = []
    with torch.no_grad():
        for _, xc in rows.chunks():
            z = (xc @ Wcat).view(-1, G, k).permute(1, 0, 2) + b[:, None, :]
            out.append(z.cpu().numpy())
    return np.concatenate(out, axis=1)


def class_weight_tensor(
    y_idx: np.ndarray, n_classes: int, class_weight: str | None, device: torch.device
) -> torch.Tensor | None:
    """Per-class weights (n_classes,) float32 on ``device``, or None."""
    cw = class_weights(y_idx, n_classes, class_weight)
    return None if cw is None else torch.tensor(cw, dtype=torch.float32, device=device)


def mlp_grid_proba(X: Any, params: list[torch.Tensor], device: torch.device, max_memory: int) -> list[np.ndarray]:
    """Eval probabilities of G stacked MLPs (no dropout), one pass over ``X`` (or its :class:`Rows`),
    in row blocks."""
    W1, b1, W2, b2 = (p.detach() for p in params)
    rows = X if isinstance(X, Rows) else Rows(X, device=device, max_memory=max_memory)
    block = max(1, BLOCK_ELEMENTS // max(1, W1.shape[0] * W1.shape[2]))
    out = []
    with torch.no_grad():
        for _, xc in rows.chunks():
            for s in range(0, xc.shape[0], block):
                h = torch.relu(torch.einsum("nd,gdh->gnh", xc[s : s + block], W1) + b1[:, None, :])
                out.append(torch.softmax(torch.bmm(h, W2) + b2[:, None, :], dim=2).double().cpu().numpy())
    return list(np.concatenate(out, axis=1))
