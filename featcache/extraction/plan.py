"""What an extraction is, worked out once before it computes: its options (:class:`ExtractConfig`),
the backbone, layers, shapes, fingerprint and file name (:func:`prepare` -> :class:`Prepared`), and
what it would write (:func:`plan_cache`). :mod:`featcache.extraction.pipeline` runs a :class:`Prepared`."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..backbones import ALL_LAYERS, POOLS, Backbone, library_versions, load_backbone
from ..common.devices import PRECISIONS, resolve_device, resolve_precision, runnable_precision
from ..errors import ConfigError
from .loading import VIEW_SPLIT
from ..backbones.preprocess import Augment
from ..sources import Source, open_source
from ..store.cache import CacheFingerprint, cache_file_name
from ..backbones.taps import default_layers, fold_batchnorm_checked, list_layers
from ..common.validation import check_choice, check_int

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
ON_ERROR = ("skip", "fail")


@dataclass(frozen=True)
class ExtractConfig:
    """Options of one extraction. Fields that change feature values go in the fingerprint."""

    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    layers: tuple[str, ...] = ()
    pool: str = "avg"
    dtype: str = "float16"
    precision: str = "auto"
    channels_last: bool = True
    #: None: 8 on a CPU (small batches stay in cache: EfficientNet-Lite0 ran 115, 122, 123 and 90
    #: img/s at 4, 8, 16 and 32 on the 2-core test machine; resnet50 and resnet18 peaked at 8,
    #: BENCHMARKS.md), 64 on a GPU.
    batch_size: int | None = None
    num_workers: int | None = None
    threads: int | None = None
    device: str = "auto"
    cache_dir: str = "cache"
    output: str | None = None
    val_fraction: float | None = None
    split_seed: int = 0
    on_error: str = "skip"
    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    views: int = 0
    view_seed: int = 0
    #: Fold eval-mode BatchNorm into the preceding convolutions (checked against the unfolded
    #: model; 25% of EfficientNet-Lite0's CPU time was BatchNorm). Recorded in the fingerprint.
    fold_bn: bool = True
    #: Extract share I of N of every split (``(I, N)``) into a shard file beside the cache.
    shard: tuple[int, int] | None = None
    #: With shards: assemble a self-contained copy instead of virtual datasets over the shard files.
    merge: bool = False
    #: With shards: leave assembling to the caller (torchrun's rank 0 after a barrier).
    defer_merge: bool = False
    #: Seconds between chunk files of finished batches: a kill -9 loses at most this much work
    #: (0: a chunk per batch). Does not change feature values.
    checkpoint_every: float = 10.0
    #: Run the tapped network through torch.compile (1.23x steady state on the 2-core CPU for
    #: EfficientNet-Lite0 after a 19 s compilation, BENCHMARKS.md). Recorded in the fingerprint.
    compile: bool = False
    #: Decode JPEGs with torchvision.io.decode_jpeg on the extraction device (nvJPEG on CUDA) and
    #: resize there; loader workers only read files. Recorded in the fingerprint.
    decode_on_device: bool = False
    #: Hash every file's content, not only that of files whose (size, mtime) changed since the cache
    #: was made, and compute again the features of those whose content differs. Does not change
    #: feature values.
    verify: bool = False

    def __post_init__(self) -> None:
        for name in ("cache_dir", "output", "weights"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, os.fspath(value))

    def validate(self) -> None:
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size)
        if self.num_workers is not None:
            check_int("num_workers", self.num_workers, minimum=0)
        if self.threads is not None:
            check_int("threads", self.threads)
        check_choice("pool", self.pool, POOLS)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("on_error", self.on_error, ON_ERROR)
        if self.input_size is not None:
            check_int("input_size", self.input_size, minimum=8)
        check_int("views", self.views, minimum=0)
        if self.decode_on_device and self.views:
            raise ConfigError("Augmented views (--views) are made with PIL; they cannot be combined with "
                              "--decode-on-device. Drop one of the two.")
        if not isinstance(self.checkpoint_every, (int, float)) or not 0 <= self.checkpoint_every < float("inf"):
            raise ConfigError(f"The 'checkpoint_every' option must be a number of seconds >= 0. "
                              f"Got {self.checkpoint_every!r}.")
        if self.shard is not None:
            i, n = self.shard
            if not (isinstance(i, int) and isinstance(n, int) and 0 <= i < n):
                raise ConfigError(f"The 'shard' option must be I/N with 0 <= I < N. Got {self.shard!r}.")

    @property
    def augment(self) -> Augment:
        return Augment(views=self.views, seed=self.view_seed)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExtractResult:
    """What an extraction did (``featcache extract --json`` prints :meth:`to_dict`)."""

    cache: str
    splits: dict[str, int]
    failed: int
    cache_hit: bool
    seconds: float
    images_per_second: float
    computed: int = 0
    reused: int = 0
    failures: list[dict] = field(default_factory=list)
    #: With shards: the cache this run assembled from all finished shards, if it did.
    merged: str | None = None
    #: Seconds of decoding and forward passes: ``images_per_second`` is ``computed / compute_seconds``
    #: (``seconds`` adds opening the source and backbone and writing the cache).
    compute_seconds: float = 0.0
    #: What the source listing skipped or found odd (:attr:`Source.notes`), also recorded in the cache.
    notes: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {"cache": self.cache, "splits": self.splits, "failed": self.failed,
             "cache_hit": self.cache_hit, "seconds": round(self.seconds, 3),
             "compute_seconds": round(self.compute_seconds, 3),
             "images_per_second": round(self.images_per_second, 2),
             "computed": self.computed, "reused": self.reused}
        if self.merged:
            d["merged"] = self.merged
        if self.notes:
            d["notes"] = self.notes
        return d


ProgressFn = Callable[[int, int], None]


def default_batch_size(device: torch.device) -> int:
    return 8 if device.type == "cpu" else 64


def pooled_shape(shape: tuple[int, ...], how: str) -> tuple[int, ...]:
    if how == "none" or len(shape) <= 1:
        return tuple(shape)
    c = shape[0] if len(shape) == 3 else shape[-1]
    return (2 * c,) if how in ("avgmax", "cls+mean") else (c,)


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


def prepare(source: str | os.PathLike | Source, config: ExtractConfig) -> Prepared:
    """Open the source and backbone and work out layers, shapes, fingerprint and file name."""
    config.validate()
    return prepare_source(open_source(source, val_fraction=config.val_fraction, split_seed=config.split_seed), config)


def resolved_config(config: ExtractConfig, device: torch.device) -> ExtractConfig:
    """``config`` with its automatic choices for ``device`` made (precision, batch size)."""
    return ExtractConfig(**{**config.to_dict(), "precision": resolve_precision(config.precision, device),
                            "batch_size": config.batch_size or default_batch_size(device)})


def fingerprint(backbone: dict, layers: list[str], preprocess: dict, fold_bn: bool, src: Source,
                 config: ExtractConfig, device: torch.device) -> CacheFingerprint:
    """The fingerprint of an extraction: the backbone's own facts (identity, preprocessing, layers,
    whether BatchNorm folded), then what the options, the source and this machine decide."""
    return CacheFingerprint(
        backbone=backbone, layers=tuple(layers), pool=config.pool, preprocess=preprocess,
        precision=config.precision, dtype=config.dtype, channels_last=config.channels_last,
        device_type=device.type, source=src.describe(),
        augment=config.augment.to_dict() if config.views else None,
        fold_bn=fold_bn, compile=config.compile, decode="torchvision" if config.decode_on_device else "pil",
        versions=library_versions(),
    )


def prepare_source(src: Source, config: ExtractConfig) -> Prepared:
    bb = load_backbone(config.backbone, weights=config.weights, input_size=config.input_size,
                       mean=config.mean, std=config.std)
    device = resolve_device(config.device)
    fold_bn = False
    if config.fold_bn:
        bb.model, fold_bn = fold_batchnorm_checked(bb.model, bb.preprocess.crop, copy=False)
    _, slow = runnable_precision(config.precision, device)
    if slow:  # asked for explicitly: kept (it is in the fingerprint), but the user should know
        log.warning("precision=%s on %s is slow: %s. precision='auto' picks the fast one.", config.precision,
                    device, slow.split(";")[0])
    config = resolved_config(config, device)
    infos = list_layers(bb, depth=None)
    known = {i.name: i for i in infos}
    layers = default_layers(bb, config.layers, len(src), config.pool)
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
    fp = fingerprint(bb.describe(), layers, bb.preprocess.to_dict(), fold_bn, src, config, device)
    path = Path(config.output) if config.output else Path(config.cache_dir) / cache_file_name(fp)
    return Prepared(src, bb, layers, shapes, fp, path, device, [i.name for i in infos], config)


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
