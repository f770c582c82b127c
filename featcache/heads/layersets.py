"""Layer sets: several cached layers joined into one feature vector (``stage4+stage5+stage6``).

A layer set is named by its members joined with ``+``, in the cache's (forward) order. Its features
are the members' flattened features side by side; the run's transform standardises each column on
the training split and scales every member's block so that each member adds the same total variance
(a 1280-wide layer does not drown a 40-wide one): see :func:`block_scales`. ``fit-head --layer all``
also sweeps the contiguous runs of 2 to 4 adjacent layers (:func:`adjacent_runs`), DINOv2's
``n_last_blocks`` idea. Predict and export tap every member in one forward pass and join them the
same way, so a saved run reproduces its cached features exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import CacheError, ConfigError

if TYPE_CHECKING:
    import torch

    from ..backbones import Backbone

SEP = "+"
#: Lengths of the adjacent runs ``--layer all`` sweeps besides the single layers.
RUN_LENGTHS = (2, 3, 4)


def members(layer: str) -> list[str]:
    """The layers of ``layer`` (one name, or names joined with ``+``)."""
    return [name.strip() for name in layer.split(SEP)]


def is_set(layer: str | None) -> bool:
    return layer is not None and SEP in layer


def resolve(cache: Any, spec: str) -> str:
    """``spec`` checked against ``cache.layers``: each member cached, none twice, at least two;
    returned in the cache's order (``stage6+stage4`` -> ``stage4+stage6``)."""
    names = members(spec)
    if len(names) < 2 or any(not n for n in names):
        raise ConfigError(f"A layer set joins two or more cached layers with '+', e.g. stage5+stage6. Got {spec!r}.")
    if len(set(names)) != len(names):
        raise ConfigError(f"Layer set {spec!r} names a layer twice. Name each layer once.")
    for n in names:
        cache.resolve_layer(n)
    return SEP.join(sorted(names, key=list(cache.layers).index))


def adjacent_runs(layers: Sequence[str], lengths: Sequence[int] = RUN_LENGTHS) -> list[str]:
    """Every contiguous run of ``lengths`` adjacent ``layers``, as layer-set names."""
    layers = list(layers)
    return [SEP.join(layers[i:i + k]) for k in lengths for i in range(len(layers) - k + 1)]


def check_cached(cache: Any, layer: str) -> None:
    """Raise :class:`CacheError` when a member of ``layer`` is not in ``cache``."""
    missing = [n for n in members(layer) if n not in cache.layers]
    if missing:
        raise CacheError(f"Cache '{cache.path.name}' has no layer '{missing[0]}', which the run's head reads "
                         f"(it reads {layer}). It has: {', '.join(cache.layers)}.")


def widths(cache: Any, layer: str) -> tuple[int, ...] | None:
    """Flattened width of each member of a layer set (None for a single layer)."""
    if not is_set(layer):
        return None
    split = cache.splits[0]
    return tuple(int(np.prod(cache.features(split, n).shape[1:])) for n in members(layer))


def load(cache: Any, split: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """Features of ``split`` for a layer or a layer set (members flattened and joined), and labels."""
    if not is_set(layer):
        return cache.load(split, layer)
    parts = [cache.load(split, n)[0] for n in members(layer)]
    return join(parts), cache.labels(split)


def load_views(cache: Any, split: str, layer: str) -> np.ndarray:
    """Augmented-view features (n, views, width) of a layer or a layer set (``extract --views K``)."""
    parts = []
    for n in members(layer):
        v = cache.views(split, n)[()]
        parts.append(np.asarray(v, dtype=np.float32).reshape(v.shape[0], v.shape[1], -1))
    return np.concatenate(parts, axis=2)


def nbytes(cache: Any, split: str, layer: str) -> int:
    """Bytes of ``split`` of ``layer`` (all members) as float32."""
    return sum(int(np.prod(cache.features(split, n).shape)) * 4 for n in members(layer))


def join(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Per-member features (n, ...) -> one float32 array (n, sum of widths)."""
    return np.concatenate([np.asarray(p, dtype=np.float32).reshape(len(p), -1) for p in parts], axis=1)


def block_scales(block_widths: Sequence[int]) -> np.ndarray:
    """The factor each standardised column of a member block is multiplied by, one per column.

    A standardised block of width ``d`` adds variance ``d``; multiplying it by
    ``sqrt(D / (L * d))`` (``D`` the total width, ``L`` the members) makes every block add ``D / L``,
    and the whole vector keeps the total variance ``D`` of plain standardisation, so the heads'
    regularisation grids mean what they mean on one layer.
    """
    w = np.asarray(block_widths, dtype=np.float64)
    per_block = np.sqrt(w.sum() / (len(w) * w))
    return np.repeat(per_block, w.astype(np.int64)).astype(np.float32)


def tapped_features(out: dict, layer: str) -> "torch.Tensor":
    """The joined features of ``layer`` from a tap's ``{name: tensor}`` output (torch)."""
    import torch

    return torch.cat([out[n].flatten(1) for n in members(layer)], dim=1)


def truncated_model(backbone: "Backbone", layer: str, pool_how: str) -> "torch.nn.Module":
    """The backbone cut after the deepest member of ``layer``, returning the joined pooled
    features of every member (one traced module: export captures no hooks)."""
    from torch import nn

    from ..backbones.taps import GraphTap, truncated_model as single

    if not is_set(layer):
        return single(backbone, layer, pool_how)

    class _Joined(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tap = GraphTap(backbone, members(layer), pool_how)

        def forward(self, x):
            return tapped_features(self.tap(x), layer)

    return _Joined()
