"""Cutting a network at a freeze boundary: the frozen prefix, and the tail that trains.

A boundary works only where the network is a plain chain there: the modules after it, run in
order on its output, must give the model's logits. :func:`build_tail` and :func:`prefix_model`
check this on a random input (``tail(prefix(x)) == model(x)``) and raise
:class:`~featcache.errors.BackboneError` naming the boundaries that do work.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from . import Backbone, seeded_init
from ..errors import BackboneError, ConfigError
from ..common.lazy import nn, torch
from ..common.validation import check_int

logger = logging.getLogger(__name__)

#: Rows of the random input of the chain check.
_CHECK_BATCH = 2



def _module(model: nn.Module, name: str) -> nn.Module:
    return model if name == "" else model.get_submodule(name)


def _check_boundary_name(backbone: Backbone, boundary: Any) -> str:
    if not isinstance(boundary, str) or not boundary:
        raise ConfigError(
            f"The 'boundary' option must be a layer name such as 'layer3'. Got {boundary!r}."
        )
    names = dict(backbone.model.named_modules())
    if boundary not in names:
        raise BackboneError(
            f"Layer '{boundary}' is not in {backbone.name}. Run 'featcache layers {backbone.name}' "
            f"to list the layers; its stages are {', '.join(backbone.stages) or 'not known'}."
        )
    return boundary


def _split(model: nn.Module, boundary: str) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """(prefix, tail) as lists of (dotted name, module) in ``named_children`` order.

    The prefix is every module before the boundary at each level of its path, then the boundary;
    the tail is the boundary's later siblings, then its parent's later siblings, up to the
    top-level children. Whether that order is the forward order is checked by the caller.
    """
    parts = boundary.split(".")
    prefix: list[tuple[str, nn.Module]] = []
    levels: list[list[tuple[str, nn.Module]]] = []
    parent, parent_name = model, ""
    for depth, part in enumerate(parts):
        children = list(parent.named_children())
        names = [n for n, _ in children]
        i = names.index(part)
        full = [(f"{parent_name}.{n}" if parent_name else n, m) for n, m in children]
        prefix.extend(full[:i])
        levels.append(full[i + 1:])
        if depth == len(parts) - 1:
            prefix.append(full[i])
        parent, parent_name = children[i][1], full[i][0]
    tail = [entry for level in reversed(levels) for entry in level]
    return prefix, tail


def _holds(outer: str, name: str) -> bool:
    """Whether module ``name`` is ``outer`` or inside it."""
    return name == outer or name.startswith(outer + ".")


def _entry_key(name: str, taken: set[str]) -> str:
    key = name.replace(".", "_")
    while key in taken:
        key += "_"
    taken.add(key)
    return key


@dataclass
class _Cut:
    """A verified cut: modules in order and where the implicit flatten goes."""

    prefix: list[tuple[str, nn.Module]]
    tail: list[tuple[str, nn.Module]]
    prefix_flatten: int | None  # index in ``prefix`` before which nn.Flatten(1) goes
    tail_flatten: int | None  # the same in ``tail``
    boundary_shape: tuple[int, ...]  # boundary output for one sample, e.g. (C, H, W)


def _random_input(backbone: Backbone) -> torch.Tensor:
    crop = backbone.preprocess.crop
    gen = torch.Generator().manual_seed(0)
    p = next(iter(backbone.model.parameters()), None)
    x = torch.randn(_CHECK_BATCH, 3, crop, crop, generator=gen)
    return x.to(p.device if p is not None else "cpu")


def _close(a: Any, b: torch.Tensor) -> bool:
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return False
    tol = 1e-4 * max(1.0, float(b.abs().max()))
    return bool(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=tol))


def _taps(backbone: Backbone, names: Sequence[str], x: torch.Tensor):
    """Run the model once; return its logits and, per name, the outputs of that module."""
    outs: dict[str, list[Any]] = {n: [] for n in names}
    handles = [
        _module(backbone.model, n).register_forward_hook(
            # A copy: an in-place op after the module (ReLU(inplace=True)) would change it.
            (lambda key: lambda _m, _i, o: outs[key].append(
                o.clone() if isinstance(o, torch.Tensor) else o))(n)
        )
        for n in names
    ]
    was_training = backbone.model.training
    backbone.model.eval()
    try:
        with torch.no_grad():
            logits = backbone.model(x)
    finally:
        for h in handles:
            h.remove()
        backbone.model.train(was_training)
    return logits, outs


def _try_cut(backbone: Backbone, boundary: str, x: torch.Tensor, logits: torch.Tensor,
             outs: list[Any]) -> _Cut | None:
    """The cut at ``boundary`` if prefix and tail reproduce the model on ``x``, else None."""
    if len(outs) != 1 or not isinstance(outs[0], torch.Tensor):
        return None  # a module called twice (a shared ReLU) or returning a tuple
    h = outs[0]
    prefix, tail = _split(backbone.model, boundary)
    clf = backbone.classifier
    if clf is not None and not any(_holds(n, clf) for n, _ in tail):
        return None  # at or after the classifier: nothing to train
    # The forward of ResNet, EfficientNet, MobileNet... flattens (torch.flatten(x, 1)) before the
    # block holding the classifier: the chain needs an explicit nn.Flatten(1) there.
    block = clf.split(".")[0] if clf is not None else None
    try:
        with torch.no_grad():
            p, prefix_flatten = _run(prefix, x, block)
            if not _close(p, h):
                return None
            z, tail_flatten = _run(tail, h, block if prefix_flatten is None else None)
    except Exception as exc:  # shape or type errors: the children are not a chain here
        logger.debug("boundary %s: the tail does not run (%s)", boundary, exc)
        return None
    if not _close(z, logits):
        return None
    return _Cut(prefix, tail, prefix_flatten, tail_flatten, tuple(h.shape[1:]))


def _run(entries: list[tuple[str, nn.Module]], z: torch.Tensor, block: str | None):
    """Run ``entries`` in order; flatten before the first entry in ``block`` if still >2-D.

    Returns the output and the index of the flatten (None if there was none).
    """
    where = None
    for i, (name, m) in enumerate(entries):
        if block is not None and where is None and _holds(block, name) and z.dim() > 2:
            where = i
            z = torch.flatten(z, 1)
        z = m(z)
    return z, where


def working_boundaries(backbone: Backbone) -> list[str]:
    """The stages of ``backbone`` after which the network is a plain chain.

    Each of ``backbone.stages`` is checked as :func:`build_tail` checks a boundary: on a random
    input at the backbone's crop size, the prefix up to it and the tail after it must reproduce
    the model's output.

    Returns
    -------
    list of str
        The stages that work as freeze boundaries, in forward order.
    """
    stages = [s for s in backbone.stages if s in dict(backbone.model.named_modules())]
    if not stages:
        return []
    x = _random_input(backbone)
    logits, outs = _taps(backbone, stages, x)
    return [s for s in stages if _try_cut(backbone, s, x, logits, outs[s]) is not None]


def cut_at(backbone: Backbone, boundary: str) -> _Cut:
    boundary = _check_boundary_name(backbone, boundary)
    clf = backbone.classifier
    if clf is not None and not any(_holds(n, clf) for n, _ in _split(backbone.model, boundary)[1]):
        raise BackboneError(
            f"Layer '{boundary}' of {backbone.name} is at or after the classifier '{clf}': there is "
            f"nothing after it to train. Pick an earlier boundary, e.g. one of "
            f"{', '.join(backbone.stages) or 'its stages'}, or fit a head on 'pre_logits' features."
        )
    x = _random_input(backbone)
    logits, outs = _taps(backbone, [boundary], x)
    cut = _try_cut(backbone, boundary, x, logits, outs[boundary])
    if cut is not None:
        return cut
    good = working_boundaries(backbone)
    pick = good[-2] if len(good) > 1 else good[-1] if good else ""
    where = (f"Boundaries that work: {', '.join(good)}. Use one of them, e.g. '{pick}' (extract it "
             f"with 'featcache extract SOURCE --backbone {backbone.name} --layer {pick} --pool none')."
             if good else
             f"None of its stages ({', '.join(backbone.stages) or 'none known'}) works either: train a "
             f"head on 'pre_logits' features (linear probe), or fine-tune on raw images "
             f"(featcache.runs.finetuning).")
    raise BackboneError(
        f"Layer '{boundary}' of {backbone.name} is not a freeze boundary: the modules after it, run "
        f"in order on its output, do not reproduce the model's output (a residual connection or a "
        f"step inside forward() crosses it). {where}"
    )


def build_tail(backbone: Backbone, boundary: str, n_classes: int | None = None, *,
               seed: int = 0) -> nn.Sequential:
    """The part of a backbone after ``boundary``, as a trainable ``nn.Sequential``.

    The tail holds the boundary's later siblings in its parent, then the later siblings of each
    ancestor up to the top-level children, with ``nn.Flatten(1)`` inserted before the classifier
    where the model's ``forward`` flattens implicitly (ResNet's ``torch.flatten(x, 1)``).
    Entries are named after the modules with dots replaced by underscores (``features_5``).

    Parameters
    ----------
    backbone : Backbone
        A loaded backbone (:func:`featcache.backbones.load_backbone`); it is not modified.
    boundary : str
        A module name: a top-level child (``layer3``, ``stage5``) or a nested one
        (``features.4``). Its output is the tail's input.
    n_classes : int, optional
        Replace the final classifier ``nn.Linear`` by a new ``nn.Linear(in_features, n_classes)``
        initialised from ``seed``. Without it the original classifier is kept.
    seed : int, default=0
        Seed of the new classifier's initialisation (the caller's random state is untouched).

    Returns
    -------
    nn.Sequential
        A copy (the backbone's modules are not shared) in eval mode with ``requires_grad`` on;
        maps the boundary's output, e.g. a tensor of shape (B, C, H, W), to logits (B, K).

    Raises
    ------
    BackboneError
        When ``boundary`` is not a module of the backbone, is at or after the classifier, or the
        network is not a plain chain there (checked on a random input at the crop size: the
        tail with the original classifier must reproduce the model's logits). The message
        lists the stages that do work.
    """
    if n_classes is not None:
        check_int("n_classes", n_classes)
    return assemble_tail(backbone, cut_at(backbone, boundary), n_classes, seed)


def _sequential(entries: list[tuple[str, nn.Module]], flatten_at: int | None) -> nn.Sequential:
    out: OrderedDict[str, nn.Module] = OrderedDict()
    taken: set[str] = set()
    for i, (name, m) in enumerate(entries):
        if i == flatten_at:
            out[_entry_key("flatten", taken)] = nn.Flatten(1)
        out[_entry_key(name, taken)] = m
    return nn.Sequential(out)


def assemble_tail(backbone: Backbone, cut: _Cut, n_classes: int | None, seed: int) -> nn.Sequential:
    """The tail of ``cut`` as an ``nn.Sequential``, with a new seeded classifier for ``n_classes``."""
    if n_classes is not None and backbone.classifier is None:
        raise BackboneError(
            f"{backbone.name} has no final nn.Linear classifier to replace. Use a backbone "
            f"with one (torchvision, timm, efficientnet_lite0), or n_classes=None."
        )
    memo: dict[int, Any] = {}
    tail = copy.deepcopy(_sequential(cut.tail, cut.tail_flatten), memo)
    if n_classes is not None:
        old = _module(backbone.model, backbone.classifier)
        new_old = memo[id(old)]
        path = next(n for n, m in tail.named_modules() if m is new_old)
        parent_name, _, attr = path.rpartition(".")
        w = old.weight
        with seeded_init(seed):
            new = nn.Linear(old.in_features, n_classes, bias=old.bias is not None)
        new = new.to(device=w.device, dtype=w.dtype)
        setattr(_module(tail, parent_name), attr, new)
    tail.requires_grad_(True)
    return tail.eval()


def prefix_model(backbone: Backbone, boundary: str) -> nn.Sequential:
    """The frozen part of a backbone up to and including ``boundary``.

    ``tail(prefix(x))`` equals ``backbone.model(x)`` for the tail of :func:`build_tail` with the
    original classifier: prefix + tail is the whole network, for prediction and export.

    Parameters
    ----------
    backbone : Backbone
    boundary : str
        As for :func:`build_tail`.

    Returns
    -------
    nn.Sequential
        Maps images (B, 3, crop, crop), normalised, to the boundary's output. It shares the
        backbone's (frozen) modules; eval mode, ``requires_grad`` off.

    Raises
    ------
    BackboneError
        As :func:`build_tail`.
    """
    cut = cut_at(backbone, boundary)
    return _sequential(cut.prefix, cut.prefix_flatten).requires_grad_(False).eval()


def boundary_shape(backbone: Backbone, boundary: str) -> tuple[int, ...]:
    """Shape of the boundary's output for one image at the backbone's crop size, e.g. (C, H, W).

    Raises
    ------
    BackboneError
        As :func:`build_tail`.
    """
    return cut_at(backbone, boundary).boundary_shape
