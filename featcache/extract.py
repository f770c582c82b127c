"""The extraction loop: source -> frozen backbone -> HDF5 cache, once.

Decoding runs in DataLoader worker processes and ships uint8 crops; the main process normalises
them on the device and runs the tapped backbone under ``torch.inference_mode()`` (autocast when
asked); a background thread writes each finished batch as an atomic chunk file, so disk I/O
overlaps compute and a crash loses at most the batches in flight. The final HDF5 file is then
assembled from the chunks (and from any previous cache of the same fingerprint) and renamed
into place.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from .backbones import ALL_LAYERS, Backbone, library_versions, load_backbone, weights_sha256_without_building
from .devices import (PRECISIONS, default_workers, prefetch_for_shm, resolve_device, resolve_precision,
                      runnable_precision, shm_free_bytes)
from .errors import CacheError, CacheLockedError, ConfigError, ExtractionInterrupted, FeatcacheError, SourceError
from .loading import (VIEW_SPLIT, DecodeDataset, DeviceDecoded, Row, batches, block_key, close_batches, collate,
                      plan_rows, worker_init)
from .partial import ChunkWriter, PartialStore
from .preprocess import Augment
from .validation import check_choice, check_int
from .reuse import Donors, blocks, is_hit, is_hit_rows, listing_matches, rows_to_compute, stat_key
from .runtime import tune_allocator
from .sources import Source, display_path, open_source
from .cache_writer import CacheLock, CacheWriter, iter_runs, set_aside
from .store import HASH_DTYPE, CacheFingerprint, FeatureCache, cache_file_name, open_cache, read_text_attr
from .taps import HostCopy, TappedForward, fold_batchnorm_checked, list_layers

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
ON_ERROR = ("skip", "fail")
#: Sources of pre-decoded arrays: little decoding work, so no worker processes or threads.
ARRAY_KINDS = ("npz", "digits")


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
        check_choice("pool", self.pool, ("avg", "max", "avgmax", "none"))
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

    def to_dict(self) -> dict:
        d = {"cache": self.cache, "splits": self.splits, "failed": self.failed,
             "cache_hit": self.cache_hit, "seconds": round(self.seconds, 3),
             "compute_seconds": round(self.compute_seconds, 3),
             "images_per_second": round(self.images_per_second, 2),
             "computed": self.computed, "reused": self.reused}
        if self.merged:
            d["merged"] = self.merged
        return d


ProgressFn = Callable[[int, int], None]


def default_batch_size(device: torch.device) -> int:
    return 8 if device.type == "cpu" else 64


def _pooled_shape(shape: tuple[int, ...], how: str) -> tuple[int, ...]:
    if how == "none" or len(shape) <= 1:
        return tuple(shape)
    c = shape[0] if len(shape) == 3 else shape[-1]
    return (2 * c,) if how == "avgmax" else (c,)


# --- the main entry point -------------------------------------------------------------------

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
    return _prepare(open_source(source, val_fraction=config.val_fraction, split_seed=config.split_seed), config)


def _resolved(config: ExtractConfig, device: torch.device) -> ExtractConfig:
    """``config`` with its automatic choices for ``device`` made (precision, batch size)."""
    return ExtractConfig(**{**config.to_dict(), "precision": resolve_precision(config.precision, device),
                            "batch_size": config.batch_size or default_batch_size(device)})


def _fingerprint(backbone: dict, layers: list[str], preprocess: dict, fold_bn: bool, src: Source,
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


def _prepare(src: Source, config: ExtractConfig) -> Prepared:
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
    config = _resolved(config, device)
    infos = list_layers(bb, depth=None)
    known = {i.name: i for i in infos}
    layers = list(config.layers) or [bb.default_layer]
    if ALL_LAYERS in layers:
        if layers != [ALL_LAYERS]:
            raise ConfigError(f"'{ALL_LAYERS}' taps every stage and pre_logits; give it alone, not with {layers}.")
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
    shapes = [_pooled_shape(known[n].shape, config.pool) for n in layers]
    fp = _fingerprint(bb.describe(), layers, bb.preprocess.to_dict(), fold_bn, src, config, device)
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


def extract(source: str | os.PathLike | Source, config: ExtractConfig | None = None, *,
            progress: ProgressFn | None = None, **options) -> ExtractResult:
    """Run a frozen backbone over a source once and write (or reuse) its feature cache.

    Parameters
    ----------
    source : str, path or Source
        ``digits``, an image folder, a ``.csv`` manifest or a ``.npz`` file (see :func:`open_source`).
    config : ExtractConfig, optional
        Options; keyword ``options`` override its fields (``batch_size=64``).
    progress : callable(done, total), optional
        Called after each batch with images processed and images to process in this run.

    Returns
    -------
    ExtractResult
        Path of the cache, sample counts, failures, whether it was a cache hit, timings.
    """
    t0 = time.perf_counter()
    config = ExtractConfig(**{**(config.to_dict() if config else {}), **options})
    config.validate()
    src = open_source(source, val_fraction=config.val_fraction, split_seed=config.split_seed)
    hit = _find_hit(src, config, t0)
    if hit is not None:
        return hit
    return run_prepared(_prepare(src, config), progress=progress, t0=t0)


#: The options that, with the library versions, settle the backbone's own facts in a fingerprint
#: (identity, preprocessing, layers, whether BatchNorm folded); every cache records them.
_BACKBONE_OPTIONS = ("backbone", "layers", "input_size", "mean", "std", "fold_bn")


def _find_hit(src: Source, config: ExtractConfig, t0: float) -> ExtractResult | None:
    """The cache this extraction would reuse, found without building the backbone; None when
    there is none or it cannot be told without the network (then :func:`prepare` builds it and
    decides, as it always did).

    A fingerprint is the backbone's own facts plus what the options, the source and this machine
    decide. The facts follow from the backbone options and the library versions, and a cache
    records both (``extract_config``, the fingerprint's versions and weights hash): a cache made
    with equal backbone options lends its facts, the fingerprint is rebuilt from them and
    everything else as :func:`prepare` would work it out, and the cache is a hit only if its
    fingerprint and file name are exactly those and it holds every planned file unchanged.
    """
    if config.shard is not None:  # shard files and their assembly keep their own checks
        return None
    try:
        known, weights_sha = weights_sha256_without_building(config.backbone, config.weights)
    except FeatcacheError:
        return None  # the builder will say what is wrong
    if not known:
        return None
    wanted = {k: v for k, v in _json_roundtrip(config.to_dict()).items() if k in _BACKBONE_OPTIONS}
    paths = [Path(config.output)] if config.output else sorted(Path(config.cache_dir).glob("*.h5"))
    resolved = None
    for path in paths:
        made_by = _json_attr(path, "extract_config")
        if (made_by is None or {k: made_by.get(k) for k in _BACKBONE_OPTIONS} != wanted
                or (made_by.get("weights") is None) != (config.weights is None)):
            continue
        recorded = _json_attr(path, "fingerprint")
        if recorded is None or recorded.get("backbone", {}).get("weights_sha256") != weights_sha:
            continue
        if resolved is None:
            device = resolve_device(config.device)
            resolved = device, _resolved(config, device)
        device, run_config = resolved
        try:
            fp = _fingerprint(recorded["backbone"], recorded["layers"], recorded["preprocess"],
                              recorded.get("fold_bn", False), src, run_config, device)
        except (KeyError, TypeError):
            continue
        if fp.to_dict() != recorded or (config.output is None and path.name != cache_file_name(fp)):
            continue
        try:
            cache = open_cache(path)
        except CacheError:
            return None  # the full run sets it aside or says what is wrong
        with cache:
            if cache.fingerprint == recorded:
                return _hit_result(cache, path, plan_rows(src), run_config, t0)
    return None


def _json_attr(path: Path, key: str) -> dict | None:
    text = read_text_attr(path, key)
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _json_roundtrip(obj):
    """``obj`` as it reads back from a JSON attribute (tuples become lists)."""
    return json.loads(json.dumps(obj))


def _hit_result(cache: FeatureCache, path: Path, plan: dict[str, list[Row]], config: ExtractConfig,
                t0: float, stamp: dict | None = None) -> ExtractResult | None:
    """The result of reusing ``cache`` whole, when it holds exactly the planned rows unchanged (and
    the shard ``stamp``); else None. With ``on_error='fail'``, a failure it records is an error."""
    if not (is_hit(cache, plan) and all(cache.text_attr(k) == v for k, v in (stamp or {}).items())):
        return None
    if config.on_error == "fail" and cache.failed:
        f = cache.failed[0]
        raise SourceError(
            f"Cannot use '{f['split']}/{f['id']}': {f['reason']} (recorded by an earlier run). "
            f"Use --on-error skip to skip and record such files."
        )
    return ExtractResult(str(path), {s: cache.n(s) for s in cache.splits}, len(cache.failed), True,
                         time.perf_counter() - t0, 0.0, 0, sum(cache.n(s) for s in cache.splits),
                         [{k: f[k] for k in ("split", "id", "reason")} for f in cache.failed])


def run_prepared(p: Prepared, *, progress: ProgressFn | None = None, t0: float | None = None,
                 gather: Callable[[str], list[str]] | None = None) -> ExtractResult:
    """Run an extraction :func:`prepare` worked out (torchrun's ranks build the backbone once).

    ``gather``, for a sharded run under torchrun, exchanges the digests of every rank's share of
    the plan (its argument is this rank's), so each rank looks only at its own share of the files.
    """
    t0 = time.perf_counter() if t0 is None else t0
    if p.config.shard is None:
        return _extract_plan(p, p.path, plan_rows(p.source), progress, t0)
    return _extract_shard(p, progress, t0, gather)


def _extract_shard(p: Prepared, progress: ProgressFn | None, t0: float,
                   gather: Callable[[str], list[str]] | None) -> ExtractResult:
    """Share I of N into its shard file, then (unless deferred) assemble the cache if all are done.

    Every shard records the plan's hash, made of the digests of all N shares of the plan (ids,
    labels, sizes and mtimes in order), so shards cut from different versions of the source are
    never assembled together. An independent ``--shard`` job looks at every file to know them;
    torchrun's ranks each look at their own share and exchange the digests.
    """
    from .shards import plan_hash, shard_path, shard_range, share_digest

    config, final, fp = p.config, p.path, p.fingerprint
    i, n = config.shard
    ranges = [{split: shard_range(len(refs), config.batch_size, j, n) for split, refs in p.source.splits.items()}
              for j in range(n)]
    plan = plan_rows(p.source, ranges[i])
    if gather is not None:
        digests, known = gather(share_digest(plan)), plan
    else:
        shares = [plan if j == i else plan_rows(p.source, ranges[j]) for j in range(n)]
        digests = [share_digest(share) for share in shares]
        known = {split: [r for share in shares for r in share[split]] for split in plan}
    hit = _assembled_hit(final, p, known, t0)
    if hit is not None:  # already assembled from shards of this plan: a cache hit for every shard
        return hit
    stamp = {"plan_hash": plan_hash(digests, fp.hash, config.batch_size, n)}
    path = shard_path(final, i, n)
    _set_aside_untrusted_shard(path, fp)
    siblings = _sibling_caches(final, fp, config.shard)
    try:
        result = _extract_plan(p, path, plan, progress, t0, stamp=stamp, more_donors=siblings)
    finally:
        for c in siblings:
            c.close()
    if not config.defer_merge:
        result.merged = _merge_if_complete(final, config)
    return result


def _assembled_hit(final: Path, p: Prepared, plan: dict[str, list[Row]], t0: float) -> ExtractResult | None:
    """The assembled cache, when it holds exactly the source's samples, the planned rows unchanged,
    and still presents the shard files it was assembled from; else None (it is assembled again
    once the shards are done)."""
    fp = p.fingerprint
    if not final.exists():
        return None
    try:
        c = open_cache(final)
    except CacheError as e:
        log.info("'%s' is not used as it is: %s", final, e)
        return None
    with c:
        if c.fingerprint == fp.to_dict() and listing_matches(c, p.source) and is_hit_rows(c, plan):
            return ExtractResult(str(final), {s: c.n(s) for s in c.splits}, len(c.failed), True,
                                 time.perf_counter() - t0, 0.0, 0, sum(c.n(s) for s in c.splits))
    return None


def _sibling_caches(final: Path, fp: CacheFingerprint, shard: tuple[int, int]) -> list[FeatureCache]:
    """The other shard files and the assembled cache, where readable and of this fingerprint: after
    a source change, images that moved to this shard's share are copied from them, not recomputed."""
    from .shards import shard_path

    out = []
    for p in [shard_path(final, j, shard[1]) for j in range(shard[1]) if j != shard[0]] + [final]:
        try:
            c = open_cache(p) if p.is_file() else None
        except CacheError:
            continue
        if c is not None and c.fingerprint != fp.to_dict():
            c.close()
        elif c is not None:
            out.append(c)
    return out


def _set_aside_untrusted_shard(path: Path, fp: CacheFingerprint) -> None:
    """A shard file is partial state: one that is damaged or of another fingerprint is set aside
    (renamed to ``*.damaged``) and extracted again."""
    if not path.exists():
        return
    try:
        with open_cache(path) as c:
            if c.fingerprint == fp.to_dict():
                return
            reason = "of another fingerprint"
    except CacheError as e:
        reason = str(e)
    log.warning("Set aside shard file '%s' as '%s' (%s); its samples are extracted again.", path,
                set_aside(path).name, reason)


def _merge_if_complete(final: Path, config: ExtractConfig) -> str | None:
    """The last shard to finish assembles the cache (others find a shard missing or of another plan,
    or the lock held). A cache assembled from earlier shard files is assembled again."""
    from .shards import merge_shards, shards_ready

    n = config.shard[1]
    if not shards_ready(final, n):
        return None
    lock_path = final.with_name(final.name + ".lock")
    try:
        lock = CacheLock(lock_path)
    except CacheLockedError:
        return None  # another shard is assembling it
    try:
        if not shards_ready(final, n):
            return None
        merge_shards(final, n, copy=config.merge)
    finally:
        lock.release()
    return str(final)


def _extract_plan(p: Prepared, path: Path, plan: dict[str, list[Row]], progress: ProgressFn | None,
                  t0: float, stamp: dict | None = None, more_donors: list[FeatureCache] = ()) -> ExtractResult:
    src, layers, shapes, fp, config = p.source, p.layers, p.shapes, p.fingerprint, p.config
    if path.exists():
        cache = open_cache(path)
        if cache.fingerprint != fp.to_dict():
            cache.close()
            raise CacheError(
                f"'{path}' holds features of another fingerprint (backbone, layers, preprocessing, "
                f"versions or source differ). Choose another --output or delete that file."
            )
        try:
            res = _hit_result(cache, path, plan, config, t0, stamp)
        except SourceError:
            cache.close()
            raise
        if res is not None:
            cache.close()
            return res
    else:
        cache = None

    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    lock = CacheLock(lock_path)
    try:
        partial = PartialStore(path.with_name(path.name + ".partial"), fp.hash, batch_size=config.batch_size)
        donors = Donors(len(layers), config.batch_size)
        seen_chunks: set[Path] = set()
        for c in ([cache] if cache is not None else []) + list(more_donors):
            donors.add_cache(c)
        donors.add_partial(partial, seen_chunks)
        todo = rows_to_compute(src, plan, donors, retry_failed=config.on_error == "fail", views=config.views,
                                batch_size=config.batch_size)
        n_reused = sum(len(r) for r in plan.values()) - len(todo)
        t_compute = time.perf_counter()
        _compute(src, p.backbone, layers, config, p.device, p.order, todo, partial, progress)
        compute_seconds = time.perf_counter() - t_compute
        donors.add_partial(partial, seen_chunks)
        result = _assemble(path, fp, src, plan, layers, shapes, config, donors,
                           timings={"compute_seconds": compute_seconds, "computed": len(todo)}, stamp=stamp)
        if cache is not None:
            cache.close()
        partial.remove()
    finally:
        lock.release()
    seconds = time.perf_counter() - t0
    result.seconds = seconds
    result.computed, result.reused = len(todo), n_reused
    result.compute_seconds = compute_seconds if todo else 0.0
    result.images_per_second = len(todo) / compute_seconds if compute_seconds > 0 and todo else 0.0
    return result


def _compute(src, bb: Backbone, layers, config: ExtractConfig, device, order, todo, partial: PartialStore,
             progress: ProgressFn | None) -> None:
    if not todo:
        return
    tune_allocator()
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cuda":
        # Input shapes are fixed for a whole run (one crop size, one batch size but the last), so
        # cuDNN may time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True
    forward = TappedForward(bb, layers, config.pool, device=device, precision=config.precision,
                            channels_last=config.channels_last, order=order, compile=config.compile)
    pp = bb.preprocess
    pre_decoded = src.kind in ARRAY_KINDS
    workers = config.num_workers if config.num_workers is not None else default_workers(device,
                                                                                       pre_decoded=pre_decoded)
    # Decoding in the main process: a thread per forward thread (files only; arrays need little work).
    decode_threads = 1 if workers or pre_decoded else torch.get_num_threads()
    dataset = DecodeDataset(src, todo, pp, config.augment, threads=decode_threads,
                             encoded_jpegs=config.decode_on_device)
    prefetch = None
    if workers:
        batch_bytes = config.batch_size * (1 + config.views) * 3 * pp.crop * pp.crop
        prefetch = prefetch_for_shm(workers, batch_bytes, free=shm_free_bytes())
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches(todo, config.batch_size), num_workers=workers,
        collate_fn=collate, pin_memory=device.type == "cuda", worker_init_fn=worker_init if workers else None,
        prefetch_factor=prefetch,
    )
    loaded = DeviceDecoded(loader, pp, device, background=device.type != "cpu") if config.decode_on_device \
        else loader
    host = HostCopy(layers, config.dtype, device)
    writer = ChunkWriter(partial, config.checkpoint_every)
    writer.start()
    done = 0

    def finish(pending, report: bool = True) -> None:
        nonlocal done
        feats, views = host.finish(pending["copy"]) if pending["copy"] is not None else ([], [])
        item = pending["item"]
        item["features"], item["views"] = feats, views
        writer.put(item)
        done += pending["n"]
        if progress and report:
            progress(done, len(todo))

    pending = None
    try:
        with torch.inference_mode():
            for batch in loaded:
                idx, hashes, x, bad = batch.rows, batch.hashes, batch.x, batch.failed
                failed_ids, failed_reasons = _failures(bad, todo, config.on_error)
                # The device works on this batch while the previous one is copied to the host.
                copy = host.start(forward(x), len(idx)) if x is not None else None
                previous, pending = pending, {"copy": copy, "n": len(idx) + len(bad), "item": {
                    "hashes": np.asarray(hashes, dtype=HASH_DTYPE),
                    "ids": [todo[i].ref.id for i in idx],
                    "stat": np.asarray([todo[i].stat for i in idx], dtype=np.int64).reshape(-1, 2),
                    "failed_ids": failed_ids, "failed_reasons": failed_reasons,
                    "failed_stat": np.asarray([todo[i].stat for i, _ in bad], dtype=np.int64).reshape(-1, 2),
                }}
                if previous is not None:
                    finish(previous)
            if pending is not None:
                last, pending = pending, None
                finish(last)
    except (KeyboardInterrupt, RuntimeError) as e:
        if pending is not None:  # computed before the stop: keep it
            finish(pending, report=False)
        close_batches(loaded)
        writer.close()
        _raise_stopped(e, done, len(todo), partial.path)
    finally:
        forward.remove()
        close_batches(loaded)
        dataset.close()
        if writer.is_alive():
            writer.close()


def _failures(bad: list[tuple[int, str]], todo: list[Row], on_error: str) -> tuple[list[str], list[str]]:
    """Ids and reasons of a batch's unreadable samples (logged); with ``on_error="fail"`` the first stops the run."""
    ids, reasons = [], []
    for i, reason in bad:
        row = todo[i]
        if on_error == "fail":
            raise SourceError(f"Cannot use '{display_path(str(row.ref.key))}': {reason}. Use --on-error skip "
                              f"to skip and record such files.")
        log.warning("skipping %s: %s", row.ref.id, reason)
        ids.append(row.ref.id)
        reasons.append(reason)
    return ids, reasons


def _raise_stopped(e: BaseException, done: int, total: int, partial: Path):
    """The error for a run stopped by ``e`` after ``done`` images, all kept in ``partial``."""
    if isinstance(e, KeyboardInterrupt):
        raise ExtractionInterrupted(f"Stopped after {done} of {total} images; they are kept in '{partial}'. "
                                    f"Run the same command again to resume.") from None
    if "bus error" in str(e).lower() or "shared memory" in str(e).lower():
        raise ConfigError(
            f"Decoding processes ran out of shared memory (/dev/shm): {str(e).strip().rstrip('.')[:200]}. "
            f"Start the container with --shm-size 1g (or --ipc=host), or use fewer workers. The {done} "
            f"images finished are kept in '{partial}': run the same command again to resume."
        ) from None
    raise e


def _assemble(path: Path, fp: CacheFingerprint, src: Source, plan, layers, shapes, config: ExtractConfig,
              donors: Donors, timings: dict, stamp: dict | None = None) -> ExtractResult:
    splits_out: dict[str, int] = {}
    failures: list[dict] = []
    # Where each surviving row comes from: donor -> [(split, dst_row, src_index)].
    sources: dict[int, list[tuple[str, int, int]]] = {}
    per_split: dict[str, list[Row]] = {}
    batch_ns: dict[str, list[int]] = {}
    # Each row's batch in an uninterrupted run: the rows of its block that can be read.
    size = {k: sum(stat_key(r.ref.id, r.stat) not in donors.failed_by_stat for r in block)
            for k, block in blocks(plan, config.batch_size).items()}
    for split, rows in plan.items():
        ok = []
        for r in rows:
            key = stat_key(r.ref.id, r.stat)
            h = r.hash or donors.hash_by_stat.get(key)
            found = donors.lookup(h, config.views > 0 and split == VIEW_SPLIT, size[block_key(r, config.batch_size)])
            if found is not None:
                r.hash = h
                d, j, n = found
                sources.setdefault(d, []).append((split, len(ok), j))
                batch_ns.setdefault(split, []).append(n)
                ok.append(r)
            else:
                reason = donors.failed_by_stat.get(key, "not extracted")
                failures.append({"split": split, "id": r.ref.id, "reason": reason, "stat": r.stat,
                                 "label": r.ref.label})
        per_split[split] = ok
    attrs = dict(fingerprint=fp.to_json(), fingerprint_hash=fp.hash, classes=_json(src.classes),
                 layers=_json(layers), timings=_json(timings),
                 extract_config=_json({**config.to_dict(),
                                       "weights": os.path.abspath(config.weights) if config.weights else None}))
    if config.shard is not None:
        attrs.update(shard=_json(list(config.shard)), **(stamp or {}))
    with CacheWriter(path, **attrs) as w:
        dsets: dict[tuple, h5py.Dataset] = {}
        for split, ok in per_split.items():
            n = splits_out[split] = len(ok)
            w.add_split(split, labels=[r.ref.label for r in ok], ids=[r.ref.id for r in ok],
                        hashes=[r.hash for r in ok], stat=[r.stat for r in ok], batch_n=batch_ns.get(split, []))
            for li, (name, shape) in enumerate(zip(layers, shapes)):
                dsets[(split, li)] = w.add_features(split, name, (n, *shape), config.dtype)
                if config.views and split == VIEW_SPLIT:
                    dsets[(split, li, "views")] = w.add_features(split, name, (n, config.views, *shape),
                                                                 config.dtype, views=True)
        for d, targets in sources.items():
            _copy_donor(donors.loaders[d], targets, dsets, len(layers))
        w.add_failed(failures)
        if stamp:  # what the assembled cache checks this shard file by
            w.set_attrs(digest=w.digest())
    return ExtractResult(str(path), splits_out, len(failures), False, 0.0, 0.0,
                         failures=[{k: v for k, v in f.items() if k in ("split", "id", "reason")} for f in failures])


def _copy_donor(load, targets: list[tuple[str, int, int]], dsets: dict, n_layers: int) -> None:
    """Copy one donor's features (and views) into the new file: ``targets`` are (split, row there,
    row in the donor); contiguous runs are written as slices."""
    arrays, view_arrays = load()
    by_split: dict[str, list[tuple[int, int]]] = {}
    for split, dst, j in targets:
        by_split.setdefault(split, []).append((dst, j))
    for split, pairs in by_split.items():
        pairs.sort()
        dst = np.array([p[0] for p in pairs])
        src_idx = np.array([p[1] for p in pairs])
        for li in range(n_layers):
            block = arrays[li][src_idx]
            vblock = view_arrays[li][src_idx] if (split, li, "views") in dsets else None
            for a, b, da, db in iter_runs(dst):
                dsets[(split, li)][da:db] = block[a:b]
                if vblock is not None:
                    dsets[(split, li, "views")][da:db] = vblock[a:b]


def _json(obj) -> str:
    return json.dumps(obj)
