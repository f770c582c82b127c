"""Cached augmented views as extra training rows of a head of vectors (``fit-head --train-views``).

``extract --views K`` caches K augmented views of every training image; the tail head samples one per
epoch. The heads of vectors can take them all as K more rows per image instead. Each row keeps its
image's index as its group: the views stay in the training split (never in the eval split), and a
k-fold sweep puts an image and its views in the same fold and scores the fold on its images only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import layersets
from ..errors import ConfigError
from . import HEADS

if TYPE_CHECKING:
    from ..store.cache import FeatureCache


def with_views(cache: "FeatureCache", head: str, train_split: str, layer: str, X: Any, y: np.ndarray,
               rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training rows ``X`` (of ``train_split``, ``rows`` of it when not None) followed by their
    cached augmented views (K per image), their labels, and each row's image index (its group), for
    head ``head``."""
    if HEADS.get(head).inputs == "activations":
        raise ConfigError(f"Head '{head}' samples the cached views itself; drop the 'train_views' option.")
    if not cache.has_views(train_split):
        raise ConfigError(f"Split '{train_split}' of cache '{cache.path.name}' has no augmented views. "
                          f"Extract with views=K (featcache extract --views K), or drop the 'train_views' option.")
    if not isinstance(X, np.ndarray):
        raise ConfigError("The 'train_views' option needs the training features in memory; raise the "
                          "'max_memory' option.")
    V = layersets.load_views(cache, train_split, layer)
    if rows is not None:
        V = V[rows]
    n, k = V.shape[:2]
    X = np.concatenate([X.reshape(n, -1), V.reshape(n * k, -1)])
    groups = np.concatenate([np.arange(n), np.repeat(np.arange(n), k)])
    return X, np.concatenate([y, np.repeat(y, k)]), groups
