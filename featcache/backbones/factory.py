"""The factory family: ``package.module:function``, a callable returning an ``nn.Module``. Its code may
change under the same name, so it is identified only by building it (the factory's source file
hash is recorded)."""

from __future__ import annotations

import importlib
import os
import re

from ..errors import BackboneError
from .base import (FAMILIES, Backbone, BackboneFamily, BackboneSpec, custom_preprocess, file_sha256, freeze,
                   last_linear, load_weights_into, module_stages)

PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class FactoryFamily(BackboneFamily):
    syntax = "package.module:factory"
    description = "a callable returning an nn.Module (--input-size/--mean/--std)"

    def claims(self, text: str) -> bool:
        return bool(PATTERN.match(text))

    def parse(self, text: str, weights: str | None) -> BackboneSpec:
        return BackboneSpec(text, self.name, text, None, weights)

    def build(self, spec: BackboneSpec, *, download: bool = True) -> Backbone:
        mod_name, _, fn_name = spec.arch.partition(":")
        try:
            module = importlib.import_module(mod_name)
            fn = getattr(module, fn_name)
        except (ImportError, AttributeError) as e:
            raise BackboneError(
                f"Cannot import the factory '{spec.arch}' ({e}). Use 'package.module:function' with the "
                f"package importable (on PYTHONPATH)."
            ) from None
        from torch import nn

        model = fn()
        if not isinstance(model, nn.Module):
            raise BackboneError(f"The factory '{spec.arch}' returned {type(model).__name__}, not an nn.Module.")
        if spec.weights:
            load_weights_into(model, spec.weights, spec.arch)
        src = getattr(module, "__file__", None)
        return Backbone(name=spec.arch, model=freeze(model), preprocess=custom_preprocess(),
                        weights="file" if spec.weights else "factory",
                        weights_sha256=file_sha256(spec.weights) if spec.weights else None,
                        stages=module_stages(model), classifier=last_linear(model), family="factory",
                        extra={"factory_source_sha256": file_sha256(src) if src and os.path.isfile(src) else None})


FAMILIES.register("factory", FactoryFamily(), description=FactoryFamily.description)
