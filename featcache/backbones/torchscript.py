"""The TorchScript family: ``torchscript:FILE``, or a path ending in ``.pt``/``.ts``/``.torchscript``/
``.jit`` that exists. The file is the identity (hashed without building); preprocessing is
ImageNet's at 224 px unless ``--input-size/--mean/--std`` say otherwise."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BackboneError
from .base import FAMILIES, Backbone, BackboneFamily, BackboneSpec, custom_preprocess, file_sha256, freeze

SUFFIXES = (".pt", ".ts", ".torchscript", ".jit")


class TorchScriptFamily(BackboneFamily):
    prefix = "torchscript"
    syntax = "torchscript:FILE"
    description = "a TorchScript file (--input-size/--mean/--std)"
    identity_without_building = True

    def claims(self, text: str) -> bool:
        return super().claims(text) or (text.endswith(SUFFIXES) and os.path.isfile(text))

    def parse(self, text: str, weights: str | None) -> BackboneSpec:
        return BackboneSpec(text, self.name, text.removeprefix("torchscript:"), None, weights)

    def build(self, spec: BackboneSpec, *, download: bool = True) -> Backbone:
        path = spec.arch
        if not os.path.isfile(path):
            raise BackboneError(f"TorchScript file '{path}' does not exist.")
        import torch

        try:
            model = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise BackboneError(f"Cannot load '{path}' as TorchScript ({e}). Save it with torch.jit.save.") from None
        return Backbone(name=f"torchscript:{Path(path).name}", model=freeze(model), preprocess=custom_preprocess(),
                        weights="file", weights_sha256=file_sha256(path), family="torchscript")

    def weights_identity(self, spec: BackboneSpec) -> tuple[bool, str | None]:
        return (True, file_sha256(spec.arch)) if os.path.isfile(spec.arch) else (False, None)


FAMILIES.register("torchscript", TorchScriptFamily(), description=TorchScriptFamily.description)
