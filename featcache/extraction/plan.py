"""What an extraction is, worked out once before it computes: its options (:class:`ExtractConfig`),
the backbone, layers, shapes, fingerprint and file name (:func:`prepare` -> :class:`Prepared`), and
what it would write (:func:`plan_cache`). :mod:`featcache.extraction.pipeline` runs a :class:`Prepared`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..backbones import ALL_LAYERS, Backbone, BackboneSpec, library_versions, load_backbone, parse_backbone_spec
from ..backbones.taps import default_layers, fold_batchnorm_checked, list_layers, pooled_shape
from ..common.devices import default_batch_size, resolve_compute  # noqa: F401  (default_batch_size: re-exported)
from ..errors import ConfigError
from ..sources import Source, open_source
from ..store.cache import CacheFingerprint, cache_file_name
from .loading import VIEW_SPLIT
from .options import ExtractConfig, ExtractResult, ProgressFn  # noqa: F401  (ExtractResult, ProgressFn: re-exported)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything an extraction works out before it computes: built once, passed on."""

    source: Source
    backbone: Backbone
    layers: list[str]
    #: Per layer, the shape of one sample's features (after pooling).
    shapes: list[tuple[int, ...]]
    fingerprint: CacheFingerprint
    #: The final cache file (a sharded run writes its shard file beside it).
    path: Path
    device: torch.device
    #: Every tap point in forward order (where the tapped network may stop).
    order: list[str]
    #: The options with their automatic choices (precision, batch size) resolved.
    config: ExtractConfig


@dataclass(frozen=True)
class Job:
    """An extraction as its options decide it, before any network is built: the opened source,
    the backbone spec parsed once, the device, and the options with this machine's choices made
    (precision, batch size). The cache-hit test (:func:`featcache.extraction.reuse.find_hit`) and
    :func:`build` both start from it."""

    source: Source
    spec: BackboneSpec
    device: torch.device
    config: ExtractConfig


def open_job(source: str | os.PathLike | Source, config: ExtractConfig) -> Job:
    """Check the options, open the source, parse the backbone spec and make the machine's choices."""
    config.validate()
    src = open_source(source, val_fraction=config.val_fraction, split_seed=config.split_seed)
    spec = parse_backbone_spec(config.backbone, config.weights)
    device, precision, batch_size = resolve_compute(config.device, config.precision, config.batch_size)
    return Job(src, spec, device, replace(config, precision=precision, batch_size=batch_size))


def fingerprint(backbone: dict, layers: list[str], preprocess: dict, fold_bn: bool, job: Job) -> CacheFingerprint:
    """The fingerprint of an extraction, derived here only: the backbone's own facts (identity,
    preprocessing, layers, whether BatchNorm folded), then what the options, the source and this
    machine decide."""
    config = job.config
    return CacheFingerprint(
        backbone=backbone, layers=tuple(layers), pool=config.pool, preprocess=preprocess,
        precision=config.precision, dtype=config.dtype, channels_last=config.channels_last,
        device_type=job.device.type, source=job.source.describe(),
        augment=config.augment.to_dict() if config.views else None,
        fold_bn=fold_bn, compile=config.compile, decode="torchvision" if config.decode_on_device else "pil",
        versions=library_versions(),
    )


def build(job: Job) -> Prepared:
    """Build the backbone of ``job`` and work out its layers, shapes, fingerprint and file name."""
    config = job.config
    bb = load_backbone(job.spec, input_size=config.input_size, mean=config.mean, std=config.std)
    fold_bn = False
    if config.fold_bn:
        bb.model, fold_bn = fold_batchnorm_checked(bb.model, bb.preprocess.crop, copy=False)
    infos = list_layers(bb, depth=None)
    known = {i.name: i for i in infos}
    # A sharded run taps the pooled layer unless told otherwise: counting the samples would list every
    # shard of a streaming source on every rank, and all ranks must choose alike.
    n_images = None if config.shard is not None or config.layers else len(job.source)
    layers = default_layers(bb, config.layers, n_images, config.pool)
    if ALL_LAYERS in layers:
        if layers != [ALL_LAYERS]:
            raise ConfigError(f"'{ALL_LAYERS}' taps every stage and the pooled layer; give it alone, not with {layers}.")
        if not bb.stages:
            raise ConfigError(f"{bb.name} has no known stages for layers=('{ALL_LAYERS}',). Name the layers "
                              f"(featcache layers {config.backbone} lists them).")
        layers = list(bb.stage_layers)
    if len(set(layers)) != len(layers):
        raise ConfigError(f"A layer is given twice in {layers}.")
    for name in layers:
        if name not in known:
            raise ConfigError(
                f"Layer '{name}' is not in {bb.name}. Run 'featcache layers {config.backbone}' to list the layers."
            )
    shapes = [pooled_shape(known[n].shape, config.pool) for n in layers]
    fp = fingerprint(bb.describe(), layers, bb.preprocess.to_dict(), fold_bn, job)
    path = Path(config.output) if config.output else Path(config.cache_dir) / cache_file_name(fp)
    return Prepared(job.source, bb, layers, shapes, fp, path, job.device, [i.name for i in infos], config)


def prepare(source: str | os.PathLike | Source, config: ExtractConfig) -> Prepared:
    """Open the source and backbone and work out layers, shapes, fingerprint and file name."""
    return build(open_job(source, config))


def plan_cache(source: str | os.PathLike | Source, config: ExtractConfig | None = None, **options) -> dict:
    """What an extraction would write, without running it (``extract --dry-run``).

    Returns
    -------
    dict
        ``cache`` path, ``exists``, sample counts per split, and per layer its ``shape``,
        ``bytes_per_image`` and ``total_bytes`` (augmented views included).
    """
    config = ExtractConfig(**{**(config.to_dict() if config else {}), **options})
    p = prepare(source, config)
    src, bb, layers, shapes, path, device, config = p.source, p.backbone, p.layers, p.shapes, p.path, p.device, p.config
    itemsize = np.dtype(config.dtype).itemsize
    counts = {s: len(r) for s, r in src.splits.items()}
    n_vectors = sum(counts.values()) + config.views * counts.get(VIEW_SPLIT, 0)
    rows = []
    for name, shape in zip(layers, shapes):
        per = int(np.prod(shape)) * itemsize
        rows.append({"layer": name, "shape": list(shape), "bytes_per_image": per, "total_bytes": per * n_vectors})
    return {"cache": str(path), "exists": path.exists(), "backbone": bb.name, "splits": counts,
            "views": config.views, "dtype": config.dtype, "precision": config.precision, "device": str(device),
            "layers": rows, "total_bytes": sum(r["total_bytes"] for r in rows)}
