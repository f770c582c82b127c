"""Checks of option values, written once: each names the option and the value it got.

Library code raises :class:`~featcache.errors.ConfigError` with the option's Python name
(``the 'lr' option``); the command line maps it to its flag (``--lr``).
"""

from __future__ import annotations

import numbers
import re
from typing import Any

import numpy as np

from ..errors import ConfigError


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Validate an integer option, naming it in the error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"The '{name}' option must be an int >= {minimum}. Got {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(
            f"The '{name}' option must be one of {', '.join(choices)}. Got {value!r}."
        )
    return value


def check_number(name: str, value: Any, *, low: float = 0.0, strict: bool = True) -> float:
    """Validate a real option (``> low`` when ``strict`` else ``>= low``), naming it in errors."""
    bad = isinstance(value, bool) or not isinstance(value, numbers.Real)
    if not bad:
        v = float(value)
        bad = not np.isfinite(v) or (v <= low if strict else v < low)
    if bad:
        op = ">" if strict else ">="
        raise ConfigError(
            f"The '{name}' option must be a finite number {op} {low:g}. Got {value!r}."
        )
    return float(value)


#: Values of the ``class_weight`` option of the heads that have one.
CLASS_WEIGHT_CHOICES: tuple[str | None, ...] = (None, "balanced")


def check_class_weight(value: Any) -> str | None:
    """Validate a ``class_weight`` option: None or "balanced" (scikit-learn's meaning)."""
    if value is None or (isinstance(value, str) and value == "balanced"):
        return value
    raise ConfigError(
        f"The 'class_weight' option must be one of None, 'balanced'. Got {value!r}."
    )


#: Values of a ``precision`` option: "auto" picks by device (see :mod:`featcache.common.devices`).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Device types a ``device`` option may name (torch's spelling; an index may follow: "cuda:1").
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "meta")


def check_device(device: Any) -> None:
    """Validate the spelling of a ``device`` option ("auto", "cpu", "cuda", "cuda:1", ...)
    without importing torch; whether the device exists is checked when it is used."""
    if device == "auto":
        return
    if not (isinstance(device, str) and re.fullmatch(rf"({'|'.join(DEVICE_TYPES)})(:\d+)?", device)):
        raise ConfigError(
            f"The 'device' option must be 'auto', 'cpu', 'cuda' or 'cuda:N'. Got {device!r}."
        )


def check_memory(value: Any) -> None:
    check_int("max_memory", value, minimum=1)


def check_adamw(*, epochs: Any, lr: Any, weight_decay: Any, batch_size: Any) -> None:
    """The options every AdamW training loop takes (mlp and tail heads, finetune)."""
    check_int("epochs", epochs)
    check_number("lr", lr)
    check_number("weight_decay", weight_decay, strict=False)
    check_int("batch_size", batch_size)
