"""Feature preprocessing before a head: l2 / standard normalisation and PCA, fitted on train only.

Kept as plain arrays (saved without pickle) with a torch twin for export.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

NORMALIZE = ("none", "l2", "standard")
_CHUNK = 8192


class FeatureTransform:
    """``normalize`` ("none", "l2", "standard") then optional PCA to ``pca`` components.

    Fitted on the training split only. Works on in-memory arrays or on-disk datasets
    (statistics accumulated in chunks; PCA needs the data in memory).
    """

    def __init__(self, normalize: str = "none", pca: int | None = None,
                 blocks: tuple[int, ...] | None = None) -> None:
        if normalize not in NORMALIZE:
            raise ConfigError(f"The 'normalize' option must be one of {', '.join(NORMALIZE)}. Got {normalize!r}.")
        if blocks is not None and normalize != "standard":
            raise ConfigError(f"A layer set is standardised layer by layer; normalize={normalize!r} does not apply. "
                              f"Drop the 'normalize' option (or pass normalize=standard).")
        if pca is not None and (isinstance(pca, bool) or not isinstance(pca, int) or pca < 1):
            raise ConfigError(f"The 'pca' option must be an int >= 1. Got {pca!r}.")
        self.normalize = normalize
        self.pca = pca
        #: Widths of the joined layers of a layer set (each block weighted by
        #: :func:`featcache.heads.layersets.block_scales`); None for one layer.
        self.blocks = tuple(int(b) for b in blocks) if blocks is not None else None
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None
        self.components_: np.ndarray | None = None
        self.pca_mean_: np.ndarray | None = None

    @property
    def n_components_(self) -> int | None:
        """PCA components kept (``min(pca, n_rows, n_features)`` once fitted), or None."""
        return None if self.components_ is None else int(self.components_.shape[0])

    @property
    def identity(self) -> bool:
        return self.normalize == "none" and self.pca is None

    def _norm(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
        if self.normalize == "l2":
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        if self.normalize == "standard":
            return (x - self.mean_) / self.scale_
        return x

    def fit(self, X: Any) -> "FeatureTransform":
        n = X.shape[0]
        if self.normalize == "standard":
            s = s2 = None
            for a in range(0, n, _CHUNK):
                c = np.asarray(X[a:a + _CHUNK], dtype=np.float64).reshape(-1, int(np.prod(X.shape[1:])))
                s = c.sum(0) if s is None else s + c.sum(0)
                s2 = (c * c).sum(0) if s2 is None else s2 + (c * c).sum(0)
            mean = s / n
            var = np.maximum(s2 / n - mean * mean, 0)
            self.mean_ = mean.astype(np.float32)
            self.scale_ = np.where(var > 1e-12, np.sqrt(var), 1.0).astype(np.float32)
            if self.blocks is not None:
                from .layersets import block_scales

                if sum(self.blocks) != len(self.scale_):
                    raise ConfigError(f"The layer set's widths {self.blocks} do not add up to its {len(self.scale_)} "
                                      f"features.")
                # Folded into scale_: the saved transform, predict and export apply it unchanged.
                self.scale_ = (self.scale_ / block_scales(self.blocks)).astype(np.float32)
        if self.pca is not None:
            if not isinstance(X, np.ndarray):
                raise ConfigError("The 'pca' option needs the training features in memory; raise the 'max_memory' option.")
            Z = self._norm(X)
            # At most min(rows, features) directions exist; n_components_ records what is kept.
            k = min(self.pca, *Z.shape)
            self.pca_mean_ = Z.mean(0)
            _, _, vt = np.linalg.svd(Z - self.pca_mean_, full_matrices=False)
            self.components_ = vt[:k].astype(np.float32)
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Transform an array (or an on-disk dataset, read whole) to float32 (n, d')."""
        Z = self._norm(X[()] if not isinstance(X, np.ndarray) else X)
        if self.components_ is not None:
            Z = (Z - self.pca_mean_) @ self.components_.T
        return np.ascontiguousarray(Z, dtype=np.float32)

    def lazy(self, X: Any) -> "_LazyTransformed":
        """A view of an on-disk dataset that transforms the rows it is sliced for."""
        return _LazyTransformed(self, X)

    # saving ----------------------------------------------------------------------------
    def get_state(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {k: getattr(self, k) for k in ("mean_", "scale_", "components_", "pca_mean_")
                  if getattr(self, k) is not None}
        meta = {"normalize": self.normalize, "pca": self.pca, "pca_components": self.n_components_}
        if self.blocks is not None:
            meta["blocks"] = list(self.blocks)
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict) -> "FeatureTransform":
        t = cls(meta.get("normalize", "none"), meta.get("pca"), meta.get("blocks"))
        for k, v in arrays.items():
            if k not in ("mean_", "scale_", "components_", "pca_mean_"):
                raise ConfigError(f"Unknown transform array '{k}'.")
            setattr(t, k, np.asarray(v, dtype=np.float32))
        if t.normalize == "standard" and (t.mean_ is None or t.scale_ is None):
            raise ConfigError("A 'standard' transform needs mean_ and scale_ arrays.")
        if t.pca is not None and (t.components_ is None or t.pca_mean_ is None):
            raise ConfigError("A PCA transform needs components_ and pca_mean_ arrays.")
        return t

    def to_torch(self) -> "torch.nn.Module":
        """The transform as a module (:class:`~featcache.heads.modules.TransformModule`)."""
        from .modules import TransformModule

        return TransformModule(self.normalize, self.get_state()[0])


class _LazyTransformed:
    def __init__(self, t: FeatureTransform, X: Any) -> None:
        self.t, self.X = t, X
        self.shape = (X.shape[0], int(np.prod(X.shape[1:])))
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        return self.t._norm(self.X[idx])
