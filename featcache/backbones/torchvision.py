"""The torchvision family: ``NAME[.TAG]``, any torchvision classification model; ``TAG`` is a
weights enum member (``resnet50.IMAGENET1K_V2``), ``DEFAULT``, or ``none``; a bare name means
``DEFAULT``. Weights are downloaded (checked by their hash) or read from ``--weights FILE``;
preprocessing comes from the weights (``Weights.transforms()``)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError, WeightsUnavailableError
from .base import (BACKBONES, FAMILIES, Backbone, BackboneFamily, BackboneSpec, file_sha256, freeze,
                   last_linear, load_weights_into, module_stages, seeded_init)

#: The classification models of ``torchvision.models.list_models(module=torchvision.models)``
#: (torchvision 0.29), listed here so that ``featcache backbones`` and a cache hit need not import
#: torchvision; a model another torchvision version adds is registered when it is first asked for
#: (:meth:`TorchvisionFamily.claims`), and a test checks this list against the installed torchvision.
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


def _weights_member(arch: str, tag: str | None):
    """The weights enum member of ``arch.tag`` (None for ``none``)."""
    import torchvision.models as tvm

    weights_enum = tvm.get_model_weights(arch)
    tag = tag or "DEFAULT"
    if tag.lower() == "none":
        return None
    try:
        return weights_enum[tag] if tag != "DEFAULT" else weights_enum.DEFAULT
    except KeyError:
        raise ConfigError(
            f"'{tag}' is not a weights tag of {arch}. Tags: "
            f"{', '.join(['DEFAULT', 'none', *weights_enum.__members__])}."
        ) from None


def weights_preprocess(w):
    """The preprocessing a torchvision weights member declares (ImageNet's for random weights)."""
    from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    if w is None:
        return Preprocess(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")
    t = w.transforms()
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
    return Preprocess(resize=int(resize), crop=int(crop), mean=tuple(t.mean), std=tuple(t.std),
                      interpolation=t.interpolation.value)


class TorchvisionFamily(BackboneFamily):
    syntax = "NAME[.TAG]"
    description = "a torchvision classification model; TAG: a weights tag, DEFAULT or none"
    identity_without_building = True

    def claims(self, text: str) -> bool:
        arch = text.partition(".")[0]
        if arch in BACKBONES:
            return BACKBONES.entry(arch).extra.get("family") == "torchvision"
        try:  # a model of a newer torchvision than TORCHVISION_MODELS lists
            import torchvision.models as tvm
        except ImportError:
            return False
        if arch in tvm.list_models(module=tvm):
            register(arch)
            return True
        return False

    def check(self, spec: BackboneSpec) -> None:
        BACKBONES.entry(spec.arch)

    def build(self, spec: BackboneSpec, *, download: bool = True) -> Backbone:
        import torchvision.models as tvm

        arch, tag, weights_file = spec.arch, spec.tag, spec.weights
        w = _weights_member(arch, tag)
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
        name = f"{arch}.{weights}" if weights != "file" else f"{arch}.{tag or 'DEFAULT'}"
        return Backbone(name=name, model=freeze(model), preprocess=weights_preprocess(w), weights=weights,
                        weights_sha256=sha, stages=module_stages(model), classifier=last_linear(model),
                        family="torchvision", prefix_tokens=1 if hasattr(model, "class_token") else 0)

    def weights_identity(self, spec: BackboneSpec) -> tuple[bool, str | None]:
        # A tag of the library (its weights are checked by their hash) or a file, hashed here.
        if spec.weights is None:
            return True, None
        return (True, file_sha256(spec.weights)) if os.path.isfile(spec.weights) else (False, None)


def register(arch: str) -> None:
    """Name ``arch`` as a torchvision backbone (``featcache backbones`` lists it)."""
    BACKBONES.register(arch, lambda tag, wf: FAMILY.build(BackboneSpec(arch, "torchvision", arch, tag, wf)),
                       description="torchvision", family="torchvision")


FAMILY = TorchvisionFamily()
for _arch in TORCHVISION_MODELS:
    register(_arch)

FAMILIES.register("torchvision", FAMILY, description=TorchvisionFamily.description)
