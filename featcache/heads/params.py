"""Head options declared once, as scikit-learn declares estimator parameters.

A head's ``__init__`` signature is its list of options and their defaults (read as scikit-learn's
``BaseEstimator._get_param_names`` reads it); one ``_parameter_constraints`` table per head says
which values each option takes (as ``sklearn/utils/_param_validation.py`` does)::

    _parameter_constraints = {"C": POSITIVE, "solver": [OneOf("lbfgs", "adamw")], "device": DEVICE}

Each entry is a list of constraints, any one of which a value may satisfy: a :class:`Constraint`,
``None`` (the value None) or a type (an instance of it). :func:`validate_options` checks values
against a table and :func:`describe_options` lists a head's options (default, allowed values in
words, the help line of the head's numpydoc ``Parameters`` section) for ``featcache heads``. The
constraints several heads share are defined here once.
"""

from __future__ import annotations

import inspect
import math
import re
from numbers import Integral, Real
from typing import Any, Callable, Mapping, Sequence

from ..errors import ConfigError
from ..common.validation import CLASS_WEIGHT_CHOICES, DEVICE_TYPES, PRECISIONS


class Constraint:
    """A set of allowed values, and how to say it in words (``str(constraint)``)."""

    def is_satisfied_by(self, value: Any) -> bool:
        raise NotImplementedError

    def __str__(self) -> str:
        raise NotImplementedError


class _IsNone(Constraint):
    def is_satisfied_by(self, value: Any) -> bool:
        return value is None

    def __str__(self) -> str:
        return "None"


class InstanceOf(Constraint):
    """Any instance of ``type_`` (bool is no int here)."""

    def __init__(self, type_: type) -> None:
        self.type = type_

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, self.type) and not (isinstance(value, bool) and self.type is not bool)

    def __str__(self) -> str:
        return f"an instance of {self.type.__name__}" if self.type is not str else "a string"


class Interval(Constraint):
    """Numbers of ``type_`` (``Integral`` or ``Real``) between ``left`` and ``right`` (None: no
    bound); ``closed`` is "left", "right", "both" or "neither". Reals must be finite."""

    def __init__(self, type_: type, left: float | None, right: float | None, *, closed: str) -> None:
        if type_ not in (Integral, Real) or closed not in ("left", "right", "both", "neither"):
            raise TypeError(f"Interval takes Integral or Real and closed='left'|'right'|'both'|'neither'; "
                            f"got {type_!r}, {closed!r}.")
        self.type, self.left, self.right, self.closed = type_, left, right, closed

    def is_satisfied_by(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, self.type):
            return False
        if not math.isfinite(value):
            return False
        lo_ok = self.left is None or (value >= self.left if self.closed in ("left", "both") else value > self.left)
        hi_ok = self.right is None or (value <= self.right if self.closed in ("right", "both") else value < self.right)
        return lo_ok and hi_ok

    def __str__(self) -> str:
        what = "an int" if self.type is Integral else "a finite number"
        if self.right is None:
            return what if self.left is None else f"{what} {'>=' if self.closed in ('left', 'both') else '>'} " \
                f"{self.left:g}"
        if self.left is None:
            return f"{what} {'<=' if self.closed in ('right', 'both') else '<'} {self.right:g}"
        lo = "[" if self.closed in ("left", "both") else "("
        hi = "]" if self.closed in ("right", "both") else ")"
        return f"{what} in {lo}{self.left:g}, {self.right:g}{hi}"


class OneOf(Constraint):
    """One of the listed values (scikit-learn's ``StrOptions``, in order, any hashable values)."""

    def __init__(self, *values: Any) -> None:
        self.values = values

    def is_satisfied_by(self, value: Any) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)

    def __str__(self) -> str:
        words = [repr(v) for v in self.values]
        return words[0] if len(words) == 1 else f"one of {', '.join(words)}"


class Satisfies(Constraint):
    """Values for which ``test(value)`` is true, described by ``words`` (for spellings a table of
    values cannot list: a device, a spec, an augmentation recipe)."""

    def __init__(self, test: Callable[[Any], bool], words: str) -> None:
        self.test, self.words = test, words

    def is_satisfied_by(self, value: Any) -> bool:
        return bool(self.test(value))

    def __str__(self) -> str:
        return self.words


def make_constraint(constraint: Any) -> Constraint:
    """A table entry as a :class:`Constraint`: None, a type or a Constraint."""
    if constraint is None:
        return _IsNone()
    if isinstance(constraint, Constraint):
        return constraint
    if isinstance(constraint, type):
        return InstanceOf(constraint)
    raise TypeError(f"Unknown option constraint {constraint!r}: pass None, a type or a Constraint.")


def describe(constraints: Sequence[Any]) -> str:
    """The allowed values in words: "None or an int >= 1"."""
    words = [str(make_constraint(c)) for c in constraints]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def validate_options(owner: str, constraints: Mapping[str, Sequence[Any]], values: Mapping[str, Any]) -> None:
    """Check each of ``values`` against its entry of ``constraints``.

    Parameters
    ----------
    owner : str
        Who has the options, as errors name it ("the 'logreg' head").
    constraints : mapping of str to list
        An option's allowed values (any one entry satisfied is enough).
    values : mapping of str to object
        The options' values (``get_params(deep=False)``).

    Raises
    ------
    ConfigError
        Naming the option, the owner, the allowed values and the value given.
    """
    for name, value in values.items():
        allowed = constraints[name]
        if not any(make_constraint(c).is_satisfied_by(value) for c in allowed):
            raise ConfigError(f"The '{name}' option of {owner} must be {describe(allowed)}. Got {value!r}.")


# ----------------------------------------------------------------------------------------------
# What the heads list


def signature_defaults(cls: type) -> dict[str, Any]:
    """``__init__``'s options and defaults in signature order (no ``*args``, as scikit-learn)."""
    init = cls.__init__
    if init is object.__init__:
        return {}
    out = {}
    for p in list(inspect.signature(init).parameters.values())[1:]:
        if p.kind == p.VAR_POSITIONAL:
            raise TypeError(f"{cls.__name__}.__init__ takes *{p.name}: head options must be named, as scikit-learn "
                            f"estimators' parameters are.")
        if p.kind != p.VAR_KEYWORD:
            out[p.name] = None if p.default is p.empty else p.default
    return out


def _docstring_help(cls: type) -> dict[str, str]:
    """The first sentence of each entry of the class docstring's numpydoc ``Parameters`` section."""
    lines = inspect.cleandoc(cls.__dict__.get("__doc__") or "").splitlines()
    out: dict[str, str] = {}
    try:
        start = next(i for i in range(len(lines) - 1) if lines[i] == "Parameters" and set(lines[i + 1]) == {"-"})
    except StopIteration:
        return out
    name = None
    for i in range(start + 2, len(lines)):
        line = lines[i]
        if i + 1 < len(lines) and lines[i + 1] and set(lines[i + 1]) == {"-"}:
            break  # the next section
        head = re.match(r"^(\w+) :", line)
        if head:
            name = head.group(1)
            out[name] = ""
        elif name and line.strip():
            out[name] = f"{out[name]} {line.strip()}".strip()
        elif name:
            name = None
    def plain(text: str) -> str:  # reST markup out (``x``, :func:`~a.b.c`), then the first sentence
        text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`]+)`", r"\1", text.replace("``", ""))
        return re.split(r"(?<!e\.g)(?<!i\.e)\.(?:\s|$)", text)[0]

    return {k: plain(v) for k, v in out.items()}


def describe_options(cls: type, constraints: Mapping[str, Sequence[Any]]) -> dict[str, dict[str, Any]]:
    """Each option of ``cls`` (signature order): ``{"default", "constraint", "help"}``, plus
    ``"required": True`` where the default is no allowed value (the option must be given).

    Raises
    ------
    TypeError
        When ``constraints`` and the ``__init__`` signature name different options.
    """
    defaults = signature_defaults(cls)
    if set(defaults) != set(constraints):
        raise TypeError(
            f"{cls.__name__}._parameter_constraints covers {sorted(constraints)} but __init__ takes "
            f"{sorted(defaults)}: give each option one entry.")
    helps = _docstring_help(cls)
    out = {}
    for name, default in defaults.items():
        allowed = constraints[name]
        out[name] = {"default": default, "constraint": describe(allowed), "help": helps.get(name, "")}
        if not any(make_constraint(c).is_satisfied_by(default) for c in allowed):
            out[name]["required"] = True
    return out


# ----------------------------------------------------------------------------------------------
# Constraints shared by several heads

#: A finite number > 0 (penalties, learning rates, temperatures, tolerances).
POSITIVE = [Interval(Real, 0, None, closed="neither")]
#: A finite number >= 0 (weight decays).
NON_NEGATIVE = [Interval(Real, 0, None, closed="left")]
#: An int >= 1 (iterations, epochs, rows, units; bytes of ``max_memory``).
COUNT = [Interval(Integral, 1, None, closed="left")]
#: A seed: an int >= 0.
SEED = [Interval(Integral, 0, None, closed="left")]
#: A seed or None (fresh randomness).
SEED_OR_NONE = [None, *SEED]
#: A torch device, checked without importing torch; whether it exists is checked when used.
DEVICE = [Satisfies(lambda v: isinstance(v, str) and re.fullmatch(rf"auto|({'|'.join(DEVICE_TYPES)})(:\d+)?", v)
                    is not None, "'auto', 'cpu', 'cuda' or 'cuda:N'")]
#: scikit-learn's ``class_weight``: None or "balanced".
CLASS_WEIGHT = [OneOf(*CLASS_WEIGHT_CHOICES)]
#: Epochs without a better eval score before training stops; None trains every epoch.
PATIENCE = [None, *COUNT]
#: Autocast precision of training.
PRECISION = [OneOf(*PRECISIONS)]


__all__ = ["CLASS_WEIGHT", "COUNT", "DEVICE", "NON_NEGATIVE", "PATIENCE", "POSITIVE", "PRECISION", "SEED",
           "SEED_OR_NONE", "Constraint", "InstanceOf", "Interval", "OneOf", "Satisfies", "describe",
           "describe_options", "make_constraint", "signature_defaults", "validate_options"]
