"""Cached activation maps for the tail head: checked, read in mini-batches (with their cached
augmented views) and augmented on the fly (:class:`MapAugment`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import HeadError
from ..common.lazy import nn, torch
from .inputs import from_tensor, is_dataset_like
from .params import Satisfies, validate_options


# ----------------------------------------------------------------------------------------------
# Reading activations


def check_activations(X: Any, what: str) -> Any:
    """An ndarray or dataset-like of shape (n, ...) holding numbers; torch tensors converted."""
    X = from_tensor(X)
    if not is_dataset_like(X):
        try:
            X = np.asarray(X)
        except (TypeError, ValueError) as exc:
            raise HeadError(f"{what} cannot be read as a numeric array ({exc}).") from None
    dtype = np.dtype(X.dtype)
    if dtype.kind not in "fiu":
        raise HeadError(
            f"{what} must hold numbers; got dtype {dtype}. Pass the float16/float32 activations "
            f"of the boundary layer (featcache extract --pool none)."
        )
    if len(X.shape) < 2 or X.shape[0] < 1:
        raise HeadError(
            f"{what} must have shape (n_samples, C, H, W) (or flattened (n_samples, C*H*W)) with "
            f"at least one row; got shape {tuple(X.shape)}."
        )
    return X


#: Datasets (h5py) of at most this many bytes, in their stored dtype, are read into memory once
#: at the start of a fit: a per-batch fancy read of a few rows from HDF5 cost 30-80 ms per batch
#: of 32 on hymenoptera's stage5/stage6 views (a fifth of a training step), reading all of them 0.1 s.
IN_MEMORY_BYTES = 1 << 30


def in_memory(X: Any) -> Any:
    """``X`` itself when it is an ndarray or too large, else all of it read into an ndarray."""
    if isinstance(X, np.ndarray):
        return X
    nbytes = int(np.prod(X.shape)) * np.dtype(X.dtype).itemsize
    if nbytes > IN_MEMORY_BYTES:
        return X
    out = np.empty(tuple(X.shape), dtype=X.dtype)
    if hasattr(X, "read_direct"):
        if out.size:
            X.read_direct(out)
    else:
        out[...] = np.asarray(X[0:int(X.shape[0])])
    return out


def take_rows(X: Any, idx: np.ndarray) -> np.ndarray:
    """``X[idx]`` for sorted unique ``idx`` (h5py reads a fancy index only in increasing order)."""
    if isinstance(X, np.ndarray):
        return X[idx]
    return np.asarray(X[idx])


def read_batch(X: Any, views: Any, idx: np.ndarray, which: np.ndarray | None) -> np.ndarray:
    """Rows ``idx`` (sorted), taking view ``which[j]`` of row ``idx[j]`` (0: ``X`` itself)."""
    if views is None or which is None or not which.any():
        return take_rows(X, idx)
    viewed = which > 0
    if isinstance(views, np.ndarray):
        picked = views[idx[viewed], which[viewed] - 1]
    else:  # one read of every view of the rows (a chunk holds them all), then the pick
        picked = np.asarray(views[idx[viewed]])[np.arange(int(viewed.sum())), which[viewed] - 1]
    out = np.empty((len(idx), *picked.shape[1:]), dtype=np.result_type(picked.dtype, X.dtype))
    out[viewed] = picked
    if not viewed.all():
        out[~viewed] = take_rows(X, idx[~viewed])
    return out


def all_finite(X: Any) -> bool:
    """Whether an in-memory array holds no NaN or infinity, checked in blocks (no full-size temporary)."""
    step = max(1, (64 << 20) // max(1, int(np.prod(X.shape[1:]))))
    return all(np.isfinite(X[s:s + step]).all() for s in range(0, int(X.shape[0]), step))


NOT_FINITE = "X (or views) contains NaN or infinity. Check the activations (re-extract the cache) or drop those rows."


def minibatches(perm: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Mini-batches of ``perm``; a trailing batch of one row joins the previous one
    (BatchNorm in train mode cannot normalise a single row)."""
    out = [perm[s:s + batch_size] for s in range(0, len(perm), batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2] = np.concatenate([out[-2], out.pop()])
    return out



def tail_logits(tail: nn.Module, X: Any, shape: tuple[int, ...], device: torch.device, batch_size: int) -> np.ndarray:
    """Logits (n, n_classes) float32 of ``tail`` (in whatever mode it is) on rows of ``X``."""
    out = []
    with torch.inference_mode():
        for s in range(0, int(X.shape[0]), batch_size):
            # A copy: a tail that starts with an in-place op (mobilenet's Hardswish after
            # 'classifier.0') would otherwise write into the caller's float32 array.
            xb = torch.from_numpy(np.array(X[s:s + batch_size], dtype=np.float32)).to(device)
            out.append(tail(xb.reshape(xb.shape[0], *shape)).float().cpu().numpy())
    return np.concatenate(out, axis=0)


# ----------------------------------------------------------------------------------------------
# Augmenting cached activation maps

#: The parts an ``augment`` option may join with "+", in the order they are applied.
AUGMENTS = ("flip", "shift", "crop", "mixup")
#: crop: the kept area of the grid, as a fraction, and the log-range of its aspect ratio (a
#: random resized crop of the activation grid, resampled bilinearly back to its size).
CROP_AREA = (0.35, 1.0)
CROP_LOG_RATIO = (float(np.log(3 / 4)), float(np.log(4 / 3)))
#: mixup: the Beta(alpha, alpha) of the mixing weight.
MIXUP_ALPHA = 0.2


def _augment_parts(value: Any) -> tuple[str, ...] | None:
    """The parts of an ``augment`` value in :data:`AUGMENTS` order; None when it is no recipe."""
    if value is None or value == "none":
        return ()
    parts = value.split("+") if isinstance(value, str) else None
    if not parts or any(p not in AUGMENTS for p in parts) or len(set(parts)) != len(parts):
        return None
    return tuple(p for p in AUGMENTS if p in parts)


#: The values of an ``augment`` option, as a constraint of :mod:`featcache.heads.params`.
AUGMENT = [Satisfies(lambda v: _augment_parts(v) is not None,
                     f"'none' or parts of {', '.join(AUGMENTS)} joined by '+' (e.g. 'flip+crop'), each at most once")]


def parse_augment(value: Any) -> tuple[str, ...]:
    """The parts of an ``augment`` option (``None`` and ``"none"``: none), in :data:`AUGMENTS` order.

    Raises
    ------
    ConfigError
        Naming the 'augment' option, for anything but "none" or a "+"-joined set of the parts.
    """
    validate_options("the 'tail' head", {"augment": AUGMENT}, {"augment": value})
    return _augment_parts(value)


class MapAugment:
    """Cheap augmentation of a batch of cached (B, C, H, W) activation maps, drawn from ``rng``.

    flip mirrors a row's grid left-right with probability 1/2; shift pads the grid with zeros by
    ``max(1, W // 8)`` cells and crops it back at a random offset (integer translation); crop takes a
    random resized crop of the grid (:data:`CROP_AREA`, :data:`CROP_LOG_RATIO`) and resamples it to
    the grid's size; mixup blends the batch with a permutation of itself (:data:`MIXUP_ALPHA`), and
    the loss is blended with the same weight. The flip of a map is not the map of the flipped image
    (kernels are not symmetric): what each part is worth was measured (README, the tail head;
    benchmarks/tail.py).
    """

    def __init__(self, parts: tuple[str, ...], rng: np.random.Generator) -> None:
        self.parts, self.rng = parts, rng

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None, float]:
        """(augmented maps, the mixup partner of each row or None, the mixup weight of ``x``)."""
        B, H, W = x.shape[0], x.shape[-2], x.shape[-1]
        rng = self.rng
        if "flip" in self.parts and "crop" not in self.parts:
            flip = rng.random(B) < 0.5
            if flip.any():
                rows = torch.from_numpy(np.flatnonzero(flip)).to(x.device)
                x = x.clone()
                x[rows] = x[rows].flip(-1)
        if "shift" in self.parts:
            pad = max(1, W // 8)
            dy, dx = rng.integers(0, 2 * pad + 1, size=(2, B))
            padded = nn.functional.pad(x, (pad, pad, pad, pad))
            rows = torch.from_numpy(dy[:, None] + np.arange(H)).to(x.device)  # (B, H)
            cols = torch.from_numpy(dx[:, None] + np.arange(W)).to(x.device)  # (B, W)
            batch = torch.arange(B, device=x.device)[:, None, None]
            # One gather for the batch: (B, H, W, C) -> (B, C, H, W).
            x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
        if "crop" in self.parts:
            area = rng.uniform(*CROP_AREA, size=B)
            ratio = np.exp(rng.uniform(*CROP_LOG_RATIO, size=B))
            w, h = np.minimum(1.0, np.sqrt(area * ratio)), np.minimum(1.0, np.sqrt(area / ratio))
            cx, cy = rng.uniform(-1, 1, size=B) * (1 - w), rng.uniform(-1, 1, size=B) * (1 - h)
            sign = np.where(rng.random(B) < 0.5, -1.0, 1.0) if "flip" in self.parts else np.ones(B)
            theta = np.zeros((B, 2, 3), dtype=np.float32)
            theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
            grid = nn.functional.affine_grid(torch.from_numpy(theta).to(x.device), list(x.shape), align_corners=False)
            x = nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if "mixup" in self.parts:
            lam = float(rng.beta(MIXUP_ALPHA, MIXUP_ALPHA))
            partner = rng.permutation(B)
            x = lam * x + (1.0 - lam) * x[torch.from_numpy(partner).to(x.device)]
            return x, partner, lam
        return x, None, 1.0
