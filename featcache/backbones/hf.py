"""The Hugging Face family: ``hf:NAME_OR_PATH``, a transformers ``AutoModel`` image model (ViT, DINOv2,
CLIP and SigLIP vision towers, ConvNeXt, ...) from a local ``save_pretrained`` folder (offline) or a
hub name (downloaded into Hugging Face's own cache, then read from there offline).
``pip install 'featcache[hf]'``.

- Preprocessing comes from the folder's ``preprocessor_config.json`` (size, crop, mean, std,
  resampling). featcache resizes the shorter side and centre-crops; a processor that squashes to a
  square (ViT's ``size: {height, width}``) is approximated by that crop.
- Layers: ``block.N`` is the hidden state after block N (``hidden_states[N + 1]``: a transformer
  layer's tokens, a ConvNeXt stage's map); ``output`` is the final token sequence after the
  model's last norm (a ConvNeXt's pooled output). ``--layer all`` taps every block and ``output``,
  which is also the default layer. Token outputs are reduced by ``--pool``: ``cls``, ``mean``
  (of the patch tokens), ``cls+mean`` (DINOv2's linear evaluation), or ``avg``/``max`` over all tokens.
- Identity: the ``weights_sha256`` recorded in the fingerprint hashes the weights files, the model
  config, the processor config and the transformers version, so a change to any of them is a
  cache miss; a local folder and a downloaded hub model are identified without building them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from ..errors import BackboneError, ConfigError, FeatcacheError, WeightsUnavailableError
from .base import FAMILIES, OUTPUT, Backbone, BackboneFamily, BackboneSpec, file_sha256, freeze, seeded_init

log = logging.getLogger(__name__)

CONFIG = "config.json"
PROCESSOR = "preprocessor_config.json"
#: Files of a ``save_pretrained`` folder that hold weights (safetensors, sharded or not, or
#: PyTorch pickles that transformers reads with ``weights_only=True``).
WEIGHTS_SUFFIXES = (".safetensors", ".bin")
#: PIL resampling codes in processor configs.
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
#: The files a hub download needs.
HUB_FILES = ["*.json", "*.safetensors"]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise BackboneError("transformers is not installed. Run: pip install 'featcache[hf]'") from None
    return transformers


def model_folder(spec: BackboneSpec, *, download: bool = True) -> Path:
    """The local folder of ``spec``: the folder itself, or the hub model's snapshot in Hugging Face's
    cache (downloaded when ``download`` and not there yet)."""
    if os.path.isdir(spec.arch):
        return Path(spec.arch).resolve()
    _refuse_missing_folder(spec)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        _transformers()
        raise
    try:
        return Path(snapshot_download(spec.arch, allow_patterns=HUB_FILES, local_files_only=not download))
    except Exception as e:  # offline, unknown repo, gated repo
        raise WeightsUnavailableError(
            f"Cannot fetch the Hugging Face model '{spec.arch}' ({type(e).__name__}: {e}). Without a network, "
            f"save it elsewhere with model.save_pretrained(FOLDER) and image_processor.save_pretrained(FOLDER), "
            f"copy FOLDER here and use 'hf:FOLDER'."
        ) from None


def _refuse_missing_folder(spec: BackboneSpec) -> None:
    """A spec that is a path (``/``, ``.`` or ``~`` first), not a hub name, must be a folder."""
    if spec.arch.startswith(("/", ".", "~")) and not os.path.isdir(spec.arch):
        raise BackboneError(f"Hugging Face model folder '{spec.arch}' does not exist. Pass a save_pretrained "
                            f"folder or a hub name such as 'hf:facebook/dinov2-small'.")


def _canonical_json_sha(path: Path) -> str | None:
    """SHA-256 of a JSON config as sorted JSON, without the version of transformers that wrote it."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise BackboneError(f"'{path}' is not valid JSON. Save the model again with save_pretrained.") from None
    if isinstance(data, dict):
        data.pop("transformers_version", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def folder_identity(folder: Path) -> dict:
    """What identifies a model folder: one hash over its weights files, its configs and the
    transformers version (``weights_sha256``), and the configs' own hashes."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHTS_SUFFIXES)
    if not files:
        raise WeightsUnavailableError(f"Hugging Face model folder '{folder}' has no weights file "
                                      f"(*.safetensors or *.bin). Save the model with save_pretrained.")
    config_sha = _canonical_json_sha(folder / CONFIG)
    if config_sha is None:
        raise BackboneError(f"Hugging Face model folder '{folder}' has no {CONFIG}. Save the model with save_pretrained.")
    processor_sha = _canonical_json_sha(folder / PROCESSOR)
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        version = None
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{file_sha256(p)}\n".encode())
    h.update(f"config:{config_sha}\nprocessor:{processor_sha}\ntransformers:{version}\n".encode())
    return {"weights_sha256": h.hexdigest(), "config_sha256": config_sha, "processor_sha256": processor_sha}


def processor_preprocess(folder: Path, image_size: int | None):
    """The :class:`~featcache.backbones.preprocess.Preprocess` a folder's image processor config declares
    (ImageNet's at the model's image size, with a warning, where it has none)."""
    from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    path = folder / PROCESSOR
    if not path.is_file():
        log.warning("%s has no %s: using ImageNet preprocessing at %s px. Save the image processor with "
                    "save_pretrained into the same folder.", folder, PROCESSOR, image_size or 224)
        crop = image_size or 224
        return Preprocess(resize=round(crop / 0.875), crop=crop, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    cfg = json.loads(path.read_text())

    def edge(value, key_order=("shortest_edge", "height", "width")) -> int | None:
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            return next((int(value[k]) for k in key_order if value.get(k)), None)
        return None

    size = edge(cfg.get("size")) or image_size or 224
    crop = edge(cfg.get("crop_size")) if cfg.get("do_center_crop") else None
    if crop is None and "crop_pct" in cfg and size < 384:  # ConvNeXt: shorter side to size / crop_pct
        resize, crop = round(size / float(cfg["crop_pct"])), size
    else:
        crop = crop or size
        resize = max(size, crop)
    resample = cfg.get("resample", 2)
    interpolation = RESAMPLE.get(resample, "bilinear") if isinstance(resample, int) else str(resample).lower()
    return Preprocess(resize=int(resize), crop=int(crop), mean=tuple(cfg.get("image_mean") or IMAGENET_MEAN),
                      std=tuple(cfg.get("image_std") or IMAGENET_STD), interpolation=interpolation)


def _blocks(model, config) -> list:
    """The model's blocks in forward order: the ModuleList of ``num_hidden_layers`` layers (or of
    the stages of a hierarchical model)."""
    from torch import nn

    n = getattr(config, "num_hidden_layers", None) or getattr(config, "num_stages", None) \
        or len(getattr(config, "depths", ()) or ())
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return list(m)
    return []


@lru_cache(maxsize=1)
def _wrapper_class():
    from torch import nn

    class HFImageModel(nn.Module):
        """A transformers image model as featcache taps it: normalised images in, the final token
        sequence (after the model's last norm) or pooled output out; its blocks are ``block.N``."""

        def __init__(self, model, blocks: list, *, post_norm: bool, kwargs: dict) -> None:
            super().__init__()
            self.block = nn.ModuleList(blocks)  # first, so these modules are named block.N
            self.model = model
            self.post_norm = post_norm
            self.kwargs = dict(kwargs)

        def forward(self, x):
            out = self.model(pixel_values=x, **self.kwargs)
            h = out.last_hidden_state
            if h.ndim != 3:  # a hierarchical model (ConvNeXt): its pooled, normed output
                return out.pooler_output
            return self.model.post_layernorm(h) if self.post_norm else h

    return HFImageModel


class HFFamily(BackboneFamily):
    prefix = "hf"
    syntax = "hf:NAME_OR_PATH"
    description = "a Hugging Face transformers image model: save_pretrained folder or hub name (featcache[hf])"
    identity_without_building = True

    def parse(self, text: str, weights: str | None) -> BackboneSpec:
        return BackboneSpec(text, self.name, text.removeprefix("hf:"), None, weights)

    def check(self, spec: BackboneSpec) -> None:
        if spec.weights is not None:
            raise ConfigError(f"hf: backbones read their weights from their folder; drop --weights "
                              f"{spec.weights!r} and pass the save_pretrained folder as 'hf:FOLDER'.")
        if not spec.arch:
            raise ConfigError("The 'hf:' backbone needs a folder or hub name, e.g. 'hf:facebook/dinov2-small'.")
        _refuse_missing_folder(spec)

    def build(self, spec: BackboneSpec, *, download: bool = True) -> Backbone:
        import inspect

        import torch

        transformers = _transformers()
        folder = model_folder(spec, download=download)
        identity = folder_identity(folder)
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # the library does not print
        try:
            with seeded_init():  # weights the folder lacks (a pooler) are initialised the same way each run
                model = transformers.AutoModel.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError) as e:
            raise BackboneError(f"transformers cannot load '{folder}' as an AutoModel ({type(e).__name__}: {e}).") \
                from None
        finally:
            if bars:
                transformers.utils.logging.enable_progress_bar()
        if hasattr(model, "vision_model") and hasattr(model, "text_model"):  # CLIP, SigLIP: the vision tower
            model = model.vision_model
        config = model.config
        image_size = getattr(config, "image_size", None)
        pp = processor_preprocess(folder, image_size if isinstance(image_size, int) else None)
        kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in \
            inspect.signature(model.forward).parameters else {}
        model.eval()
        with torch.inference_mode():
            out = model(pixel_values=torch.zeros(1, 3, pp.crop, pp.crop), output_hidden_states=True, **kwargs)
        h = out.last_hidden_state
        post_norm = bool(h.ndim == 3 and out.hidden_states and torch.equal(h, out.hidden_states[-1])
                         and hasattr(model, "post_layernorm"))
        prefix = 0
        patch = getattr(config, "patch_size", None)
        if h.ndim == 3 and isinstance(patch, int):
            prefix = max(0, h.shape[1] - (pp.crop // patch) ** 2)
        blocks = _blocks(model, config)
        wrapper = _wrapper_class()(model, blocks, post_norm=post_norm, kwargs=kwargs)
        name = spec.arch if not os.path.isdir(spec.arch) else Path(folder).name
        return Backbone(name=f"hf:{name}", model=freeze(wrapper), preprocess=pp, weights="pretrained",
                        weights_sha256=identity["weights_sha256"],
                        stages=tuple(f"block.{i}" for i in range(len(blocks))), family="hf",
                        extra={"config_sha256": identity["config_sha256"],
                               "processor_sha256": identity["processor_sha256"]},
                        pooled_layer=OUTPUT, prefix_tokens=prefix)

    def weights_identity(self, spec: BackboneSpec) -> tuple[bool, str | None]:
        try:
            folder = model_folder(spec, download=False)
            return True, folder_identity(folder)["weights_sha256"]
        except (FeatcacheError, OSError):  # not downloaded yet, or unreadable: building tells
            return False, None


FAMILIES.register("hf", HFFamily(), description=HFFamily.description)
