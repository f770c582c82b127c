"""What every trained head and fine-tuning share: seeds, the optimiser and its schedule."""

from __future__ import annotations

import math

import numpy as np

from ..common.lazy import nn, torch


def resolve_seed(value: int | None) -> int:
    """``value``, or a fresh random seed when it is None."""
    return int(value) if value is not None else int(np.random.SeedSequence().entropy % (2**63))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weights decayed, biases and normalisation scales (1-D) not, the usual
    fine-tuning recipe."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def adamw(groups: list[dict], *, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where torch has a fused kernel for ``device`` (several times faster on CPU)."""
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError):  # older torch: no fused CPU kernel
            pass
    return torch.optim.AdamW(groups, lr=lr)


def cosine_lr(lr: float, step: int, total: int) -> float:
    """The learning rate of 1-based ``step`` of ``total`` on a cosine schedule from ``lr`` to 0."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / max(1, total)))
