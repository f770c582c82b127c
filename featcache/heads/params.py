"""Head options declared once: each head's ``parameters`` table maps every ``__init__`` argument
(read from the signature, as scikit-learn's ``_get_param_names`` does) to an :class:`Option`: its
check and its help line. :class:`~featcache.heads.base.BaseHead` checks the table against the
signature when the class is made, validates from it (``_check_params``) and derives ``options``
(what ``featcache heads`` prints) from it. The options several heads share are defined here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from ..errors import ConfigError
from ..common.validation import (CLASS_WEIGHT_HELP, PATIENCE_HELP, PRECISIONS, check_choice, check_class_weight,
                          check_device, check_int, check_memory, check_number, check_patience, check_seed)


@dataclass(frozen=True)
class Option:
    """One option of a head: the help line ``featcache heads`` shows, and the check of a value
    (``check(name, value)`` raises :class:`~featcache.errors.ConfigError`; None: any value)."""

    help: str
    check: Callable[[str, Any], Any] | None = None

    def validate(self, name: str, value: Any) -> None:
        if self.check is not None:
            self.check(name, value)


def _value_only(check: Callable[[Any], Any]) -> Callable[[str, Any], Any]:
    return lambda _name, value: check(value)


def choice(*choices: str) -> Callable[[str, Any], Any]:
    return partial(check_choice, choices=choices)


def optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """``check`` unless the value is None."""
    return lambda name, value: None if value is None else check(name, value)


def fraction(name: str, value: Any) -> float:
    """A number in [0, 1)."""
    v = check_number(name, value, strict=False)
    if v >= 1.0:
        raise ConfigError(f"The '{name}' option must be in [0, 1). Got {value!r}.")
    return v


positive = check_number
non_negative = partial(check_number, strict=False)
integer = check_int

DEVICE = Option("torch device: auto, cpu, cuda, cuda:N", _value_only(check_device))
MAX_MEMORY = Option("bytes of features held at once; larger inputs are streamed in chunks", _value_only(check_memory))
CLASS_WEIGHT = Option(CLASS_WEIGHT_HELP, _value_only(check_class_weight))
PATIENCE = Option(PATIENCE_HELP, _value_only(check_patience))
LR = Option("AdamW peak learning rate (cosine schedule)", positive)
PRECISION = Option("autocast precision of training: fp32, auto, bf16, fp16", choice(*PRECISIONS))


def seed(help: str) -> Option:
    """A ``random_state``: None or an int >= 0."""
    return Option(help, _value_only(check_seed))


__all__ = ["CLASS_WEIGHT", "DEVICE", "LR", "MAX_MEMORY", "Option", "PATIENCE", "PRECISION", "choice", "fraction",
           "integer", "non_negative", "optional", "positive", "seed"]
