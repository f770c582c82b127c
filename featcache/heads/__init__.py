"""Classification heads fitted on cached features, registered by name.

>>> from featcache.heads import make_head
>>> head = make_head("logreg", C=0.1).fit(X_train, y_train)     # doctest: +SKIP
>>> head.predict_proba(X_test)                                    # doctest: +SKIP

Every head is a scikit-learn classifier with, in addition, ``sweep_proba`` (fit a whole grid of
its ``param`` quickly), ``sweep_fit`` (the same run, returning the fitted heads), ``get_state`` / ``from_state`` (pickle-free saving, see
:mod:`featcache.runs.artifacts`) and ``to_torch`` (a module whose softmax output is
``predict_proba``). ``featcache heads`` lists them.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..common.registry import Registry
from .base import BaseHead, HeadNotFittedError
from .neighbors import KNNHead, NCMHead
from .sklearn_heads import LogRegHead, RidgeHead, SVMHead
from .tail import TailHead
from .linear import LinearHead
from .mlp import MLPHead

HEADS: Registry[type[BaseHead]] = Registry("head", "featcache heads")


def _register(name: str, cls: type[BaseHead], description: str) -> None:
    HEADS.register(
        name,
        cls,
        description=description,
        options=dict(cls.options),
        param=cls.param,
        default_grid=tuple(cls.default_grid),
        inputs=cls.inputs,
    )


_register("logreg", LogRegHead, "multinomial logistic regression (scikit-learn, lbfgs)")
_register(
    "ridge",
    RidgeHead,
    "closed-form ridge classifier; the whole alpha grid from one eigendecomposition",
)
_register(
    "linear",
    LinearHead,
    "logistic regression in torch; the whole C grid trained at once, streams HDF5",
)
_register(
    "mlp",
    MLPHead,
    "one hidden layer, dropout, AdamW in torch; the weight-decay grid trained at once",
)
_register("knn", KNNHead, "cosine k-NN with temperature-weighted votes (DINO's k-NN eval)")
_register("ncm", NCMHead, "nearest class mean (cosine or euclidean)")
_register("svm", SVMHead, "linear SVM, squared hinge (scikit-learn LinearSVC)")


_register("tail", TailHead, "the pretrained network after the cached boundary layer (extract --layer B "
          "--pool none) with a new classifier, fine-tuned on the cached activations")


def make_head(name: str, **params: Any) -> BaseHead:
    """Build a registered head from its name and options.

    Parameters
    ----------
    name : str
        A registered head name (``featcache heads`` lists them).
    **params
        Options of that head (see ``list_heads()[i]["options"]``).

    Returns
    -------
    BaseHead
        An unfitted head.

    Raises
    ------
    ConfigError
        For an unknown head, an unknown option or a bad option value.
    """
    entry = HEADS.entry(name)
    valid = list(entry.extra["options"])
    for key in params:
        if key not in valid:
            raise ConfigError(
                f"Unknown option '{key}' for head '{name}'. Valid options: {', '.join(valid)}."
            )
    head = entry.obj(**params)
    head._check_params()
    return head


def list_heads() -> list[dict[str, Any]]:
    """The registered heads.

    Returns
    -------
    list of dict
        One ``{"name", "description", "param", "default_grid", "options"}`` per head;
        ``default_grid`` is a list, ``options`` maps each option to a one-line help.
    """
    return [
        {
            "name": e.name,
            "description": e.description,
            "param": e.extra["param"],
            "default_grid": list(e.extra["default_grid"]),
            "options": dict(e.extra["options"]),
            "inputs": e.extra["inputs"],
        }
        for e in HEADS
    ]


__all__ = [
    "HEADS",
    "BaseHead",
    "HeadNotFittedError",
    "KNNHead",
    "LinearHead",
    "LogRegHead",
    "MLPHead",
    "NCMHead",
    "RidgeHead",
    "SVMHead",
    "TailHead",
    "list_heads",
    "make_head",
]
