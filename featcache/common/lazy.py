"""torch, imported when first used.

``from ..lazy import torch`` binds a stand-in whose first attribute access imports the real
module, so that importing featcache, listing heads or fitting a scikit-learn head does not pay
for torch (1-2 s). Code that subclasses ``torch.nn.Module`` at import time imports torch itself
and is imported only where it is needed (:mod:`featcache.heads.modules`).
"""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """A module imported on first attribute access (``torch.zeros`` imports torch)."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


torch: Any = LazyModule("torch")
nn: Any = LazyModule("torch.nn")
