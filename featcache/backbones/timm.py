"""The timm family: ``timm:NAME[.TAG]`` (``pip install 'featcache[timm]'``); ``.none`` gives random
weights. Hub weights are identified only by building the model; preprocessing comes from timm's
``resolve_data_config``."""

from __future__ import annotations

from ..errors import BackboneError, ConfigError, WeightsUnavailableError
from .base import FAMILIES, Backbone, BackboneFamily, BackboneSpec, file_sha256, freeze, load_weights_into, seeded_init


class TimmFamily(BackboneFamily):
    prefix = "timm"
    syntax = "timm:NAME[.TAG]"
    description = "any timm model (pip install 'featcache[timm]')"

    def build(self, spec: BackboneSpec, *, download: bool = True) -> Backbone:
        from .preprocess import Preprocess

        try:
            import timm
            from timm.data import resolve_data_config
        except ImportError:
            raise BackboneError("timm is not installed. Run: pip install 'featcache[timm]'") from None
        from torch import nn

        arch, tag, weights_file = spec.arch, spec.tag, spec.weights
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
        return Backbone(name=f"timm:{full}" + (".none" if weights == "none" else ""), model=freeze(model),
                        preprocess=pp, weights=weights,
                        weights_sha256=file_sha256(weights_file) if weights_file else None,
                        stages=stages, classifier=classifier, family="timm",
                        prefix_tokens=int(getattr(model, "num_prefix_tokens", 0) or 0))


FAMILIES.register("timm", TimmFamily(), description=TimmFamily.description)
