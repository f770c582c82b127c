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
from .base import BaseHead, HeadNotFittedError, to_jsonable
from .neighbors import KNNHead, NCMHead
from .sklearn_heads import LogRegHead, RidgeHead, SVMHead
from .tail import TailHead
from .linear import LinearHead
from .mlp import MLPHead

HEADS: Registry[type[BaseHead]] = Registry("head", "featcache heads")


def _register(cls: type[BaseHead], description: str) -> None:
    HEADS.register(
        cls.head_name,
        cls,
        description=description,
        options=cls.options,
        param=cls.param,
        default_grid=tuple(cls.default_grid),
        inputs=cls.inputs,
    )


_register(LogRegHead, "multinomial logistic regression (scikit-learn, lbfgs)")
_register(RidgeHead, "closed-form ridge classifier; the whole alpha grid from one eigendecomposition")
_register(LinearHead, "logistic regression in torch; the whole C grid trained at once, streams HDF5")
_register(MLPHead, "one hidden layer, dropout, AdamW in torch; the weight-decay grid trained at once")
_register(KNNHead, "cosine k-NN with temperature-weighted votes (DINO's k-NN eval)")
_register(NCMHead, "nearest class mean (cosine or euclidean)")
_register(SVMHead, "linear SVM, squared hinge (scikit-learn LinearSVC)")
_register(TailHead, "the pretrained network after the cached boundary layer (extract --layer B --pool none) "
          "with a new classifier, fine-tuned on the cached activations")


def make_head(name: str, **params: Any) -> BaseHead:
    """Build a registered head from its name and options.

    Parameters
    ----------
    name : str
        A registered head name (``featcache heads`` lists them).
    **params
        Options of that head (``list_heads()[i]["options"]`` lists them).

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
        One ``{"name", "description", "param", "default_grid", "options", "inputs"}`` per head,
        JSON-able; ``options`` maps each option, in ``__init__`` order, to ``{"default",
        "constraint", "help"}`` (the allowed values in words; ``"required": true`` where the default
        is none of them), all read from the head's one declaration (:mod:`featcache.heads.params`).
    """
    return [
        {
            "name": e.name,
            "description": e.description,
            "param": e.extra["param"],
            "default_grid": list(e.extra["default_grid"]),
            "options": to_jsonable(e.extra["options"]),
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
