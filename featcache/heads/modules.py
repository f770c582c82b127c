"""The torch modules a run exports: its feature transform and its head (a head's ``to_torch``
gives ``softmax(module(x)) == predict_proba(x)``), and the k-NN vote the ``knn`` head shares with
its module (TorchScript compiles it with the module).

Imported where torch runs only, so that importing the heads does not import torch.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch


def knn_vote_proba(
    top_sims: torch.Tensor, top_labels: torch.Tensor, n_classes: int, temperature: float
) -> torch.Tensor:
    """DINO's weighted vote: class score = sum of ``exp(sim / T)`` over the neighbours of that class.

    Parameters
    ----------
    top_sims : Tensor of shape (B, k)
        Cosine similarities of the k nearest training rows, sorted in decreasing order.
    top_labels : Tensor of shape (B, k), int64
        Their class indices.

    Returns
    -------
    Tensor of shape (B, n_classes)
        The scores normalised to sum to 1 (the largest similarity is subtracted before ``exp``,
        which changes nothing after normalisation and never overflows).
    """
    w = torch.exp((top_sims - top_sims[:, :1]) / temperature)
    scores = torch.zeros(
        (top_sims.shape[0], n_classes), dtype=top_sims.dtype, device=top_sims.device
    ).scatter_add_(1, top_labels, w)
    return scores / scores.sum(dim=1, keepdim=True)


class LinearScores(torch.nn.Module):
    """Logits ``x @ weight.T + bias`` of a linear head (optionally on L2-normalised ``x``).

    With ``binary=True`` the single output column ``d`` is returned as ``[0, d]`` so that the
    softmax of the output is the head's ``predict_proba`` for two classes.

    Parameters
    ----------
    weight : ndarray of shape (n_outputs, n_features)
    bias : ndarray of shape (n_outputs,)
    binary : bool
    normalize : bool, default=False
    """

    def __init__(
        self, weight: np.ndarray, bias: np.ndarray, *, binary: bool, normalize: bool = False
    ) -> None:
        super().__init__()
        self.register_buffer("weight", torch.tensor(np.asarray(weight, dtype=np.float32)))
        self.register_buffer("bias", torch.tensor(np.asarray(bias, dtype=np.float32)))
        self.binary = bool(binary)
        self.normalize = bool(normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if self.normalize:
            x = torch.nn.functional.normalize(x, dim=1)
        z = torch.nn.functional.linear(x, self.weight, self.bias)
        if self.binary:
            z = torch.cat([torch.zeros_like(z), z], dim=1)
        return z


class MLPModule(torch.nn.Module):
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


class KNNModule(torch.nn.Module):
    """Cosine k-NN as a module: the normalised training bank and its labels are buffers.

    Emits ``log`` of the vote probabilities (clamped at the smallest float32 normal), so that
    ``softmax(module(x)) == predict_proba(x)``.
    """

    def __init__(
        self, bank: np.ndarray, labels: np.ndarray, n_classes: int, k: int, temperature: float
    ) -> None:
        super().__init__()
        self.register_buffer("bank", torch.tensor(np.asarray(bank, dtype=np.float32)))
        self.register_buffer("labels", torch.tensor(np.asarray(labels, dtype=np.int64)))
        self.n_classes = int(n_classes)
        self.k = int(k)
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(x.to(self.bank.dtype), dim=1)
        sims, idx = (x @ self.bank.T).topk(self.k, dim=1)
        p = knn_vote_proba(sims, self.labels[idx], self.n_classes, self.temperature)
        return torch.log(p.clamp_min(1.1754944e-38))


class TransformModule(torch.nn.Module):
    """A run's feature transform (normalisation, then PCA) as a module, from the saved state of a
    :class:`~featcache.heads.transform.FeatureTransform`: its ``normalize`` and its fitted arrays
    (``mean_``, ``scale_``, ``components_``, ``pca_mean_``; those absent are None)."""

    def __init__(self, normalize: str, arrays: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.normalize = normalize
        for name in ("mean_", "scale_", "components_", "pca_mean_"):
            v = arrays.get(name)
            self.register_buffer(name.rstrip("_"), torch.from_numpy(v) if v is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1).float()
        if self.normalize == "l2":
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        elif self.normalize == "standard":
            x = (x - self.mean) / self.scale
        if self.components is not None:
            x = (x - self.pca_mean) @ self.components.T
        return x
