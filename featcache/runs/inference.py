"""End to end on new images: backbone + saved head (``predict``), and one exported module (``export``)."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..backbones import Backbone, load_backbone
from ..errors import BackboneError, ConfigError, SourceError
from ..common.devices import resolve_device, runnable_precision
from ..heads import layersets
from ..common.files import write_bytes
from .outputs import check_output_file, reporting
from .saved import Run, load_run
from ..backbones.preprocess import Augment, DecodeError, augmented_views, decode, resize_crop
from ..sources import SOURCES, content_hash, display_path, image_files, open_source
from ..sources.remote import is_remote
from ..common.validation import check_int
from ..backbones.taps import HostCopy, TappedForward

log = logging.getLogger(__name__)


def _backbone_for(run: Run, weights: str | None = None) -> Backbone:
    """Rebuild the backbone a run's features came from, and check it is the same one."""
    fp = run.meta["fingerprint"]
    cfg = run.meta.get("extract_config") or {}
    spec = cfg.get("backbone") or fp["backbone"]["name"]
    pp = fp["preprocess"]
    bb = load_backbone(spec, weights=weights or cfg.get("weights"), input_size=cfg.get("input_size"),
                       mean=tuple(cfg["mean"]) if cfg.get("mean") else None,
                       std=tuple(cfg["std"]) if cfg.get("std") else None)
    if fp.get("fold_bn"):  # the features were computed with BatchNorm folded: do the same
        from ..backbones.taps import fold_batchnorm_checked

        bb.model, _ = fold_batchnorm_checked(bb.model, bb.preprocess.crop, copy=False)
    if bb.describe() != fp["backbone"] or bb.preprocess.to_dict() != pp:
        raise BackboneError(
            f"The backbone rebuilt for this run ({bb.name}) differs from the one its features came from "
            f"({fp['backbone']['name']}, weights sha256 {fp['backbone'].get('weights_sha256')}). Pass the "
            f"original weights file (the 'weights' option)."
        )
    return bb


def expand_paths(paths: list[str | os.PathLike]) -> list[tuple[str, Callable[[], bytes | np.ndarray]]]:
    """(name, read) of each image: files as given; folders expanded to the image files a folder
    source reads (hidden files and folders skipped, as ``extract`` skips them), recursively and
    sorted; a source spec (``wds:DIR``, ``parquet:PATH``, ``hf:NAME``, a URL) to its samples, split
    by split, named ``SPLIT/ID``."""
    out: list[tuple[str, Callable]] = []
    for p in paths:
        kind, _, rest = str(p).partition(":")
        if (rest and len(kind) > 1 and kind in SOURCES) or is_remote(str(p)):
            src = open_source(str(p))
            out.extend((f"{split}/{r.id}", lambda r=r, src=src: src.read(r)[0])
                       for split, refs in src.splits.items() for r in refs)
            continue
        p = Path(p)
        if p.is_dir():
            out.extend((str(f), lambda f=f: f.read_bytes()) for f in image_files(p))
        elif p.exists():
            out.append((str(p), p.read_bytes))
        else:
            raise SourceError(f"'{p}' does not exist. Pass image files, folders or a source (wds:DIR, ...).")
    return out


class _Pipeline:
    """The run's backbone, tapped at its layer, with the extraction's own forward path."""

    def __init__(self, run: Run, bb: Backbone, device: torch.device) -> None:
        fp = run.meta["fingerprint"]
        self.layer = run.meta["layer"]
        self.members = layersets.members(self.layer)
        #: The cache's precision where this device runs it natively (bf16 recorded on a GPU runs
        #: in fp32 on a CPU without native bf16: 18-30x faster, features differ by rounding only).
        self.precision, why = runnable_precision(fp["precision"], device)
        if why:
            log.warning("features of this run were extracted at %s; on %s %s", fp["precision"], device, why)
        self.forward = TappedForward(bb, self.members, fp["pool"], device=device, precision=self.precision,
                                     channels_last=fp["channels_last"])
        # Rounded to the cache's dtype, as the head saw its training features.
        self.host = HostCopy(self.members, fp["dtype"], device)

    def features(self, batch_uint8: np.ndarray) -> np.ndarray:
        out = self.forward(torch.from_numpy(batch_uint8))
        feats, _ = self.host.finish(self.host.start(out, len(batch_uint8)))
        return layersets.join(feats) if len(feats) > 1 else feats[0].astype(np.float32)


def _tta_augment(run: Run, tta: int) -> Augment | None:
    """The augmentation of test-time views: the cache's own (``extract --views``) when it had one,
    so that view k of an image is the very crop the head trained on, else the default crops."""
    if isinstance(tta, bool) or not isinstance(tta, int) or tta < 0:
        raise ConfigError(f"The 'tta' option must be an int >= 0 (views per image). Got {tta!r}.")
    if tta == 0:
        return None
    cached = dict(run.meta["fingerprint"].get("augment") or {})
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in cached.items() if k in ("scale", "ratio", "flip", "seed")}
    return Augment(views=tta, **fields)


def predict(run_dir: str | os.PathLike, paths: list[str | os.PathLike], *, top: int = 5, batch_size: int = 32,
            device: str = "auto", weights: str | None = None, tta: int = 0) -> list[dict]:
    """Classify image files with a saved run: the run's backbone, layer, transform and head.

    With ``tta=K`` each image's probabilities are the mean over the image and K augmented views
    (random-resized crops and flips, seeded by the image's content as ``extract --views`` does).

    Returns
    -------
    list of dict
        One per file: ``{"path", "label", "probability", "top": [{"label", "probability"}, ...]}``;
        a file that cannot be read has ``"label": None`` and an ``"error"``.
    """
    if top < 1:
        raise ConfigError(f"The 'top' option must be an int >= 1. Got {top!r}.")
    check_int("batch_size", batch_size)
    run = load_run(run_dir)
    aug = _tta_augment(run, tta)
    bb = _backbone_for(run, weights)
    pipe = _Pipeline(run, bb, resolve_device(device))
    files = expand_paths(paths)
    results: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        arrays, views, ok = [], [], []
        for f, read in chunk:
            try:
                data = read()
                img = decode(data, bb.preprocess)
                arrays.append(resize_crop(img, bb.preprocess))
                if aug is not None:
                    views.append(augmented_views(img, bb.preprocess, aug, content_hash(data)))
                ok.append(f)
            except (OSError, DecodeError) as e:
                results.append({"path": display_path(f), "label": None, "probability": None, "top": [],
                                "error": str(e)})
        if not arrays:
            continue
        proba = run.predict_proba(pipe.features(np.stack(arrays)))
        if aug is not None:
            v = np.concatenate(views)  # image by image, K views each
            pv = run.predict_proba(pipe.features(v)).reshape(len(arrays), aug.views, -1)
            proba = (proba + pv.sum(1)) / (1 + aug.views)
        for f, p in zip(ok, proba):
            order = np.argsort(-p)[:top]
            tops = [{"label": run.classes[i], "probability": float(p[i])} for i in order]
            results.append({"path": display_path(f), "label": tops[0]["label"],
                            "probability": tops[0]["probability"], "top": tops})
    order = {display_path(f): i for i, (f, _) in enumerate(files)}
    results.sort(key=lambda r: order[r["path"]])
    return results


class ExportedModel(nn.Module):
    """Backbone (cut after the tapped layer) + pooling + feature transform + head, from a normalised
    image tensor (B, 3, H, W) to logits (B, n_classes); softmax of the logits is ``predict``'s
    probabilities."""

    def __init__(self, run: Run, bb: Backbone) -> None:
        super().__init__()
        self.features = layersets.truncated_model(bb, run.meta["layer"], run.meta["fingerprint"]["pool"])
        # The tail head reads the spatial activations themselves: no flattening transform.
        self.transform = nn.Identity() if run.transform.identity else run.transform.to_torch()
        self.head = run.head.to_torch()
        n = len(run.classes)
        index = torch.as_tensor(np.asarray(run.head.classes_, dtype=np.int64))
        self.register_buffer("index", index)
        self.n_classes = n
        #: The run's calibration temperature: softmax(scores / T) is predict's calibrated probabilities.
        self.temperature = float(run.temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.head(self.transform(self.features(x)))
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if scores.shape[1] == self.n_classes:
            return scores
        # Classes absent from training get -inf logits (probability 0, as in predict).
        out = torch.full((scores.shape[0], self.n_classes), float("-inf"), dtype=scores.dtype, device=scores.device)
        return out.index_copy(1, self.index, scores)


#: Name of the JSON entry inside the ``.pt2`` archive (``extra/``) with classes and preprocessing.
EXPORT_META = "featcache.json"


def decode_steps(pp) -> list[str]:
    """How ``predict`` (and extraction) turns an image file into the program's input, step by step
    in plain PIL terms: without the JPEG draft-mode step a plain PIL pipeline gives other pixels,
    and probabilities far from ``predict``'s."""
    steps = []
    if pp.draft:
        steps.append(f"JPEG files only: before decoding, img.draft('RGB', (int(w * s), int(h * s))) with "
                     f"s = 2 * {pp.resize} / min(w, h), only when s < 1 (PIL Image.draft: DCT-domain downscaling "
                     f"to 1/2, 1/4 or 1/8, part of the preprocessing)")
    steps.append("img.load()")
    if pp.exif_transpose:
        steps.append("PIL.ImageOps.exif_transpose(img)")
    steps += ["convert to RGB (16-bit images scaled to 8 bits)",
              f"resize the shorter side to {pp.resize} with {pp.interpolation} (the longer side int(resize * "
              f"long / short), as torchvision's Resize)",
              f"centre crop {pp.crop} x {pp.crop} (left = round((w - {pp.crop}) / 2), top likewise)",
              f"to float, / 255, minus mean {list(pp.mean)}, divided by std {list(pp.std)}, as (3, H, W)",
              "or in Python: featcache.backbones.preprocess.load_image(file_bytes, featcache.backbones.preprocess.Preprocess("
              "**meta['preprocess'])) gives the uint8 crop before the normalisation"]
    return steps


def export_meta(run: Run, bb: Backbone) -> dict:
    """What a user of an exported program needs besides the program: class names, in logit order,
    the preprocessing (resize, crop, interpolation, mean, std, JPEG draft mode) its inputs must
    have had, and the decoding steps (:func:`decode_steps`) that reproduce it."""
    return {"format": "featcache-export", "version": 1, "classes": list(run.classes),
            "preprocess": bb.preprocess.to_dict(), "decode": decode_steps(bb.preprocess),
            "input_shape": ["batch", 3, bb.preprocess.crop, bb.preprocess.crop],
            "backbone": bb.name, "layer": run.meta["layer"], "head": run.meta.get("config", {}).get("head"),
            "output": "logits over classes; softmax gives predict's probabilities"}


class ExportedClassifier(nn.Module):
    """An exported program with its metadata: checks the input size, then returns logits."""

    def __init__(self, module: nn.Module, meta: dict) -> None:
        super().__init__()
        self.module, self.meta = module, meta
        self.classes: list[str] = meta["classes"]
        self.crop: int = meta["preprocess"]["crop"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.crop, self.crop):
            raise ConfigError(
                f"The exported model takes normalised images of shape (batch, 3, {self.crop}, {self.crop}); got "
                f"{tuple(x.shape)}. Resize to {self.meta['preprocess']['resize']} px, centre-crop to {self.crop} px "
                f"and normalise with the mean and std in its metadata."
            )
        return self.module(x)


def load_export(path: str | os.PathLike) -> ExportedClassifier:
    """Load a program written by :func:`export` with its classes and preprocessing (``.meta``)."""
    extra = {EXPORT_META: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
        meta = json.loads(extra[EXPORT_META])
    except (OSError, RuntimeError, ValueError) as e:
        raise ConfigError(f"'{path}' is not a program written by 'featcache export' ({e}). Export the run again.") \
            from None
    return ExportedClassifier(program.module(), meta)


def export(run_dir: str | os.PathLike, out: str | os.PathLike, *, weights: str | None = None,
           overwrite: bool = False) -> Path:
    """Write one self-contained ``torch.export`` program (``.pt2``): normalised images -> logits.

    The archive carries ``extra/featcache.json`` (:func:`export_meta`: class names and
    preprocessing). Load both with :func:`load_export`, or the program alone with
    ``torch.export.load(path).module()``. ``out`` must end in ``.pt2``, lie in an existing folder
    and, unless ``overwrite``, not exist yet (checked before anything is computed); it is written
    atomically.
    """
    out = check_output_file(out, overwrite=overwrite, suffixes=(".pt2",))
    run = load_run(run_dir)
    bb = _backbone_for(run, weights)
    model = ExportedModel(run, bb).eval()
    size = bb.preprocess.crop
    example = torch.randn(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}}, strict=False)
    except Exception as e:
        raise BackboneError(f"torch.export cannot export this backbone + head ({type(e).__name__}: {e}).") from None
    # Serialised in memory, then written by Python: torch's own file writer aborts the process on a
    # full disk, where Python's write raises an error that names the file.
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={EXPORT_META: json.dumps(export_meta(run, bb), indent=2)})
    kept = "the file there is unchanged" if out.exists() else "nothing was written there"
    with reporting(out, kept=kept):
        write_bytes(out, buffer.getvalue())
    return out
