"""The extraction loop: source -> frozen backbone -> HDF5 cache, once.

Decoding runs in DataLoader worker processes and ships uint8 crops; the main process normalises
them on the device and runs the tapped backbone under ``torch.inference_mode()`` (autocast when
asked); a background thread writes each finished batch as an atomic chunk file, so disk I/O
overlaps compute and a crash loses at most the batches in flight. The final HDF5 file is then
assembled from the chunks (and from any previous cache of the same fingerprint) and renamed
into place.
"""

from __future__ import annotations

import errno
import json
import fcntl
import logging
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
import torchvision

from . import __version__
from .backbones import Backbone, load_backbone
from .errors import CacheError, CacheLockedError, ConfigError, ExtractionInterrupted, SourceError
from .preprocess import (JPEG_MAGIC, Augment, DecodeError, Encoded, augmented_views, crop_array, decode,
                         decode_on_device, encoded_jpeg, resize_crop)
from .registry import check_choice, check_int
from .runtime import tune_allocator
from .sources import Source, SampleRef, display_path, open_source
from .store import (FORMAT, HASH_DTYPE, SCHEMA_VERSION, CacheFingerprint, FeatureCache, PartialStore,
                    cache_file_name, check_lock_path, clear_stale_tmp, commit_file, feature_chunks, iter_runs,
                    open_cache, set_aside, set_text_attrs, shard_digest, write_failed, write_strings)
from .taps import TappedForward, fold_batchnorm_checked, list_layers

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: The split whose images get augmented views (``views > 0``).
VIEW_SPLIT = "train"
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

    def to_dict(self) -> dict:
        d = {"cache": self.cache, "splits": self.splits, "failed": self.failed,
             "cache_hit": self.cache_hit, "seconds": round(self.seconds, 3),
             "images_per_second": round(self.images_per_second, 2),
             "computed": self.computed, "reused": self.reused}
        if self.merged:
            d["merged"] = self.merged
        return d


ProgressFn = Callable[[int, int], None]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"The 'device' option must be auto, cpu, cuda, cuda:N or mps. Got {device!r}.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device '{device}' was asked for but CUDA is not available. Use --device cpu.")
    return dev


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 math (AVX512-BF16 or AMX). Elsewhere bf16 autocast is
    emulated and was measured 30x slower than fp32 (BENCHMARKS.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_batch_size(device: torch.device) -> int:
    return 8 if device.type == "cpu" else 64


def default_workers(src: Source, device: torch.device) -> int:
    """Decoding processes: none on a CPU, where the main process decodes each batch with a thread
    per core between forward passes (decode processes running beside the forward pass stall its
    threads: 64 vs 81 img/s end to end on 2 cores, BENCHMARKS.md); on a GPU up to 8; none for
    pre-decoded arrays."""
    if src.kind in ARRAY_KINDS or device.type == "cpu":
        return 0
    return min(8, os.cpu_count() or 1)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def _pooled_shape(shape: tuple[int, ...], how: str) -> tuple[int, ...]:
    if how == "none" or len(shape) <= 1:
        return tuple(shape)
    c = shape[0] if len(shape) == 3 else shape[-1]
    return (2 * c,) if how == "avgmax" else (c,)


# --- planning -------------------------------------------------------------------------------

@dataclass
class _Row:
    split: str
    index: int
    ref: SampleRef
    stat: tuple[int, int]
    hash: str | None = None


def _stat_key(id_: str, stat) -> tuple[str, int, int]:
    return (id_, int(stat[0]), int(stat[1]))


class _Donors:
    """Where already-computed features can be copied from: chunks of a partial run and the
    previous cache file of the same fingerprint. Indexed by content hash and by the size of the
    batch that computed the features (0: not recorded, by caches made before it was), and by
    (id, size, mtime) so unchanged files need no re-hashing. A loader returns
    ``(features per layer, views per layer or None)``.

    Features depend on the batch size in their last bits. Features computed under this run's
    ``--batch-size`` are reused only where they were computed in a batch of the size an
    uninterrupted run uses for them, so a run stays bit-identical to an uninterrupted one; those of
    runs with another ``--batch-size`` (or unrecorded) are reused as they are, to float rounding."""

    BLOCK = 4096

    def __init__(self, n_layers: int, batch_size: int = 0) -> None:
        self.n_layers = n_layers
        self.batch_size = batch_size
        #: Per donor: the --batch-size of the run that computed it (0: not recorded).
        self.batch_sizes: list[int] = []
        self.by_hash: dict[str, dict[int, tuple[int, int]]] = {}
        self.by_hash_views: dict[str, dict[int, tuple[int, int]]] = {}
        self.hash_by_stat: dict[tuple[str, int, int], str] = {}
        self.failed_by_stat: dict[tuple[str, int, int], str] = {}
        self.loaders: list[Callable[[], tuple[list[np.ndarray], list[np.ndarray] | None]]] = []

    def _index(self, d: int, hashes: list[str], offset: int, has_views: bool, batch_n) -> None:
        for j, h in enumerate(hashes):
            n = int(batch_n[j]) if batch_n is not None else 0
            self.by_hash.setdefault(h, {}).setdefault(n, (d, j + offset))
            if has_views:
                self.by_hash_views.setdefault(h, {}).setdefault(n, (d, j + offset))

    def add_partial(self, partial: PartialStore, seen: set[Path]) -> None:
        for path in partial.chunks():
            if path in seen:
                continue
            z = partial.verified_chunk(path, self.n_layers)
            if z is None:  # set aside; its batches are computed again (maybe into a chunk of this name)
                continue
            seen.add(path)
            with z:
                hashes = [h.decode() for h in z["hashes"]]
                has_views = "v0" in z.files
                batch_n = z["batch_n"]
                configured = int(z["batch_size"])
                for i, st, h in zip(z["ids"], z["stat"], hashes):
                    self.hash_by_stat[_stat_key(str(i), st)] = h
                for i, r, st in zip(z["failed_ids"], z["failed_reasons"], z["failed_stat"]):
                    self.failed_by_stat[_stat_key(str(i), st)] = str(r)
            d = len(self.loaders)
            self.loaders.append(lambda p=path: partial.read_chunk(p, self.n_layers))
            self.batch_sizes.append(configured)
            self._index(d, hashes, 0, has_views, batch_n)
        partial.warn_set_aside()

    def add_cache(self, cache: FeatureCache) -> None:
        for split in cache.splits:
            hashes = [h.decode() for h in cache.hashes(split)]
            for i, st, h in zip(cache.ids(split), cache.stat(split), hashes):
                self.hash_by_stat[_stat_key(i, st)] = h
            has_views = cache.has_views(split)
            batch_n = cache.batch_n(split)
            for start in range(0, len(hashes), self.BLOCK):
                end = min(start + self.BLOCK, len(hashes))
                d = len(self.loaders)
                self.loaders.append(lambda s=split, a=start, b=end, v=has_views: (
                    [cache.features(s, layer)[a:b] for layer in cache.layers],
                    [cache.views(s, layer)[a:b] for layer in cache.layers] if v else None))
                self.batch_sizes.append(int(cache.extract_config.get("batch_size") or 0))
                self._index(d, hashes[start:end], 0, has_views, None if batch_n is None else batch_n[start:end])
        for f in cache.failed:
            self.failed_by_stat[_stat_key(f["id"], f["stat"])] = f["reason"]

    def lookup(self, h: str | None, with_views: bool, batch_n: int) -> tuple[int, int, int] | None:
        """(donor, row, batch size to record) of features to reuse for a row that an uninterrupted
        run computes in a batch of ``batch_n`` images (the size recorded is 0 where it differs)."""
        found = (self.by_hash_views if with_views else self.by_hash).get(h) if h is not None else None
        if not found:
            return None
        if batch_n in found:
            return (*found[batch_n], batch_n)
        for n, (d, j) in found.items():
            if n == 0 or self.batch_sizes[d] != self.batch_size:
                return d, j, 0
        return None

    def __bool__(self) -> bool:
        return bool(self.by_hash or self.failed_by_stat)


def _plan(src: Source) -> dict[str, list[_Row]]:
    plan = {}
    for split, refs in src.splits.items():
        rows = []
        for i, ref in enumerate(refs):
            try:
                st = src.stat(ref)
            except OSError:
                st = (-1, -1)  # missing: recorded as failed when read
            rows.append(_Row(split, i, ref, st))
        plan[split] = rows
    return plan


def _is_hit(cache: FeatureCache, plan: dict[str, list[_Row]]) -> bool:
    """True when the cache holds exactly the planned samples, unchanged (no hashing needed)."""
    have = set()
    for split in cache.splits:
        for i, lab, st in zip(cache.ids(split), cache.labels(split), cache.stat(split)):
            have.add((split, i, int(lab), int(st[0]), int(st[1])))
    failed = {(f["split"], f["id"], f["stat"]) for f in cache.failed}
    n_have = len(have) + len(failed)
    n_plan = 0
    for split, rows in plan.items():
        for r in rows:
            n_plan += 1
            key = (split, r.ref.id, r.ref.label, int(r.stat[0]), int(r.stat[1]))
            if key not in have and (split, r.ref.id, tuple(int(v) for v in r.stat)) not in failed:
                return False
    return n_plan == n_have


# --- the decoding dataset -------------------------------------------------------------------

class _DecodeDataset(torch.utils.data.Dataset):
    """Reads and preprocesses one sample: (index, hash, uint8 crops (1 + views, 3, H, W), error).

    With ``threads > 1`` a batch is decoded by that many threads (PIL and hashlib release the
    GIL); used when the main process decodes, so decoding and the forward pass take turns on all
    cores instead of competing for them.
    """

    def __init__(self, src: Source, rows: list[_Row], pp, augment: Augment | None = None, threads: int = 1,
                 encoded_jpegs: bool = False) -> None:
        self.src, self.rows, self.pp = src, rows, pp
        self.augment = augment if augment is not None and augment.views else None
        self.threads = threads
        #: Hand JPEGs over undecoded (:class:`Encoded`) for :func:`decode_on_device`.
        self.encoded_jpegs = encoded_jpegs
        self._pool = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> list:
        if self.threads <= 1 or len(indices) <= 1:
            return [self[i] for i in indices]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="featcache-decode")
        return list(self._pool.map(self.__getitem__, indices))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __getstate__(self) -> dict:  # worker processes decode one sample at a time
        return {**self.__dict__, "_pool": None, "threads": 1}

    def __getitem__(self, i: int):
        row = self.rows[i]
        try:
            data, h = self.src.read(row.ref)
        except OSError as e:
            return i, None, None, f"cannot read file: {e.strerror or e}"
        views = self.augment is not None and row.split == VIEW_SPLIT
        if self.encoded_jpegs and isinstance(data, bytes) and data.startswith(JPEG_MAGIC):
            return i, h, encoded_jpeg(data, self.pp), None
        try:
            if isinstance(data, np.ndarray) and not views:
                crop = crop_array(data, self.pp)  # arrays already at size: no PIL round trip
                if crop is not None:
                    return i, h, crop[None], None
            img = decode(data, self.pp)
            crops = resize_crop(img, self.pp)[None]
            if views:
                crops = np.concatenate([crops, augmented_views(img, self.pp, self.augment, h)])
            return i, h, crops, None
        except DecodeError as e:
            return i, h, None, str(e)


def _collate(items):
    """Base crops first, then all augmented views: x is (B + B * views, 3, H, W). With undecoded
    JPEGs in the batch, x is the list of items for :func:`decode_on_device`."""
    ok = [(i, h, a) for i, h, a, _ in items if a is not None]
    bad = [(i, r) for i, _, a, r in items if a is None]
    x = None
    if any(isinstance(a, Encoded) for _, _, a in ok):
        x = [a for _, _, a in ok]
    elif ok:
        base = np.stack([a[0] for _, _, a in ok])
        extra = [a[1:] for _, _, a in ok if len(a) > 1]
        x = torch.from_numpy(np.concatenate([base, *extra]) if extra else base)
    return [i for i, _, _ in ok], [h for _, h, _ in ok], x, bad


def _worker_init(_):
    torch.set_num_threads(1)


# --- the background writer ------------------------------------------------------------------

class _Writer(threading.Thread):
    """Writes finished batches to chunk files in a background thread, so disk I/O overlaps compute.

    Batches are grouped: a chunk is written once ``every`` seconds have passed since the first
    batch it holds (0: each batch alone), when it reaches :attr:`MAX_BYTES`, and on close (an
    interrupt included). A kill -9 loses at most ``every`` seconds of work; a chunk per batch of 4
    cost 4% of CPU extraction time (``benchmarks/extraction.py``).
    """

    MAX_BYTES = 64 << 20

    def __init__(self, partial: PartialStore, every: float = 0.0) -> None:
        super().__init__(daemon=True, name="featcache-writer")
        self.partial = partial
        self.every = every
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.buffer: list[dict] = []
        self.buffer_bytes = 0
        self.buffer_since = 0.0
        #: Whether the buffered batches with features carry augmented views (None: no such batch yet).
        self.buffer_views: bool | None = None

    def run(self) -> None:
        while True:
            timeout = None
            if self.buffer:
                timeout = max(0.0, self.buffer_since + self.every - time.monotonic())
            try:
                item = self.q.get(timeout=timeout)
            except queue.Empty:
                self._flush()
                continue
            if item is None:
                self._flush()
                return
            if self.error is not None:
                continue
            # A chunk either has augmented views for every sample or for none (batches never mix
            # splits); a batch whose images all failed has no features and fits either kind.
            if item["features"]:
                if self.buffer_views is not None and self.buffer_views != _has_views(item):
                    self._flush()
                self.buffer_views = _has_views(item)
            if not self.buffer:
                self.buffer_since = time.monotonic()
            self.buffer.append(item)
            self.buffer_bytes += sum(a.nbytes for a in item["features"]) + sum(a.nbytes for a in item["views"])
            if self.buffer_bytes >= self.MAX_BYTES or time.monotonic() - self.buffer_since >= self.every:
                self._flush()

    def _flush(self) -> None:
        items, self.buffer, self.buffer_bytes, self.buffer_views = self.buffer, [], 0, None
        if not items or self.error is not None:
            return
        try:
            self.partial.write_chunk(**_concat_batches(items))
        except BaseException as e:  # disk full and friends: reported by the main thread
            self.error = e

    def put(self, item: dict) -> None:
        self.raise_error()
        self.q.put(item)

    def close(self) -> None:
        self.q.put(None)
        self.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            e = self.error
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise CacheError(
                    f"Disk full while writing '{self.partial.path}' ({e.strerror}). What was computed "
                    f"is kept there: free some space and run the same command again to resume."
                ) from None
            raise CacheError(f"Cannot write '{self.partial.path}': {e}") from e


def _has_views(item: dict) -> bool:
    return bool(item["views"])


def _concat_batches(items: list[dict]) -> dict:
    """One chunk's arrays from several batches' (see :meth:`PartialStore.write_chunk`)."""
    if len(items) == 1:
        return items[0]
    with_features = [it for it in items if it["features"]]
    out = {
        "hashes": np.concatenate([it["hashes"] for it in items]),
        "ids": [i for it in items for i in it["ids"]],
        "stat": np.concatenate([it["stat"] for it in items]),
        "failed_ids": [i for it in items for i in it["failed_ids"]],
        "failed_reasons": [r for it in items for r in it["failed_reasons"]],
        "failed_stat": np.concatenate([it["failed_stat"] for it in items]),
        "batch_n": np.concatenate([np.full(len(it["ids"]), len(it["ids"]), np.int32) for it in items]),
        "features": [], "views": [],
    }
    if with_features:
        n_layers = len(with_features[0]["features"])
        out["features"] = [np.concatenate([it["features"][li] for it in with_features]) for li in range(n_layers)]
        if with_features[0]["views"]:
            out["views"] = [np.concatenate([it["views"][li] for it in with_features]) for li in range(n_layers)]
    return out


class _Lock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise CacheLockedError(
                f"Another process is writing '{path.with_suffix('')}' (lock '{path}' is held). Wait for "
                f"it to finish; a finished cache is then reused."
            ) from None

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


# --- the main entry point -------------------------------------------------------------------

def prepare(source: str | os.PathLike | Source, config: ExtractConfig):
    """Open the source and backbone and work out layers, shapes, fingerprint and file name.

    Returns ``(source, backbone, layers, shapes, fingerprint, path, device, layer_order, config)``,
    the config with its automatic choices (precision) resolved.
    """
    config.validate()
    src = open_source(source, val_fraction=config.val_fraction, split_seed=config.split_seed)
    bb = load_backbone(config.backbone, weights=config.weights, input_size=config.input_size,
                       mean=config.mean, std=config.std)
    device = resolve_device(config.device)
    fold_bn = False
    if config.fold_bn:
        bb.model, fold_bn = fold_batchnorm_checked(bb.model, bb.preprocess.crop, copy=False)
    config = ExtractConfig(**{**config.to_dict(), "precision": resolve_precision(config.precision, device),
                              "batch_size": config.batch_size or default_batch_size(device)})
    infos = list_layers(bb, depth=None)
    known = {i.name: i for i in infos}
    layers = list(config.layers) or [bb.default_layer]
    if len(set(layers)) != len(layers):
        raise ConfigError(f"A layer is given twice in {layers}.")
    for name in layers:
        if name not in known:
            raise ConfigError(
                f"Layer '{name}' is not in {bb.name}. Run 'featcache layers {config.backbone}' to list the layers."
            )
    shapes = [_pooled_shape(known[n].shape, config.pool) for n in layers]
    fp = CacheFingerprint(
        backbone=bb.describe(), layers=tuple(layers), pool=config.pool, preprocess=bb.preprocess.to_dict(),
        precision=config.precision, dtype=config.dtype, channels_last=config.channels_last,
        device_type=device.type, source=src.describe(),
        augment=config.augment.to_dict() if config.views else None,
        fold_bn=fold_bn, compile=config.compile, decode="torchvision" if config.decode_on_device else "pil",
        versions={"featcache": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__},
    )
    path = Path(config.output) if config.output else Path(config.cache_dir) / cache_file_name(fp)
    return src, bb, layers, shapes, fp, path, device, [i.name for i in infos], config


def plan_cache(source: str | os.PathLike | Source, config: ExtractConfig | None = None, **options) -> dict:
    """What an extraction would write, without running it (``extract --dry-run``).

    Returns
    -------
    dict
        ``cache`` path, ``exists``, sample counts per split, and per layer its ``shape``,
        ``bytes_per_image`` and ``total_bytes`` (augmented views included).
    """
    config = ExtractConfig(**{**(config.to_dict() if config else {}), **options})
    src, bb, layers, shapes, fp, path, device, order, config = prepare(source, config)
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
    src, bb, layers, shapes, fp, path, device, order, config = prepare(source, config)
    plan = _plan(src)
    if config.shard is not None:
        from .shards import plan_hash, restrict_plan, shard_path

        final = path
        hit = _assembled_hit(final, fp, plan, t0)
        if hit is not None:  # already assembled from shards of this plan: a cache hit for every shard
            return hit
        stamp = {"plan_hash": plan_hash(plan, fp.hash, config.batch_size, config.shard[1])}
        plan = restrict_plan(plan, config.batch_size, *config.shard)
        path = shard_path(final, *config.shard)
        _set_aside_untrusted_shard(path, fp)
        siblings = _sibling_caches(final, fp, config.shard)
        try:
            result = _extract_plan(src, bb, layers, shapes, fp, path, device, order, config, plan, progress, t0,
                                   stamp=stamp, more_donors=siblings)
        finally:
            for c in siblings:
                c.close()
        if not config.defer_merge:
            result.merged = _merge_if_complete(final, config)
        return result
    return _extract_plan(src, bb, layers, shapes, fp, path, device, order, config, plan, progress, t0)


def _assembled_hit(final: Path, fp: CacheFingerprint, plan, t0: float) -> ExtractResult | None:
    """The assembled cache, when it holds exactly the planned samples and still presents the shard
    files it was assembled from; else None (it is assembled again once the shards are done)."""
    if not final.exists():
        return None
    try:
        c = open_cache(final)
    except CacheError as e:
        log.info("'%s' is not used as it is: %s", final, e)
        return None
    with c:
        if c.fingerprint == fp.to_dict() and _is_hit(c, plan):
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
    check_lock_path(lock_path)
    try:
        lock = _Lock(lock_path)
    except CacheLockedError:
        return None  # another shard is assembling it
    try:
        if not shards_ready(final, n):
            return None
        merge_shards(final, n, copy=config.merge)
    finally:
        lock.release()
    return str(final)


def _extract_plan(src, bb, layers, shapes, fp, path: Path, device, order, config: ExtractConfig, plan,
                  progress, t0: float, stamp: dict | None = None, more_donors: list[FeatureCache] = ()
                  ) -> ExtractResult:
    if path.exists():
        cache = open_cache(path)
        if cache.fingerprint != fp.to_dict():
            cache.close()
            raise CacheError(
                f"'{path}' holds features of another fingerprint (backbone, layers, preprocessing, "
                f"versions or source differ). Choose another --output or delete that file."
            )
        if _is_hit(cache, plan) and all(cache.text_attr(k) == v for k, v in (stamp or {}).items()):
            if config.on_error == "fail" and cache.failed:
                f = cache.failed[0]
                cache.close()
                raise SourceError(
                    f"Cannot use '{f['split']}/{f['id']}': {f['reason']} (recorded by an earlier run). "
                    f"Use --on-error skip to skip and record such files."
                )
            res = ExtractResult(str(path), {s: cache.n(s) for s in cache.splits}, len(cache.failed), True,
                                time.perf_counter() - t0, 0.0, 0, sum(cache.n(s) for s in cache.splits),
                                [{k: f[k] for k in ("split", "id", "reason")} for f in cache.failed])
            cache.close()
            return res
    else:
        cache = None

    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    check_lock_path(lock_path)
    lock = _Lock(lock_path)
    try:
        clear_stale_tmp(path.with_name(path.name + ".tmp"))  # an assembly killed before its rename
        partial = PartialStore(path.with_name(path.name + ".partial"), fp.hash, batch_size=config.batch_size)
        donors = _Donors(len(layers), config.batch_size)
        seen_chunks: set[Path] = set()
        for c in ([cache] if cache is not None else []) + list(more_donors):
            donors.add_cache(c)
        donors.add_partial(partial, seen_chunks)
        todo = _rows_to_compute(src, plan, donors, retry_failed=config.on_error == "fail", views=config.views,
                                batch_size=config.batch_size)
        n_reused = sum(len(r) for r in plan.values()) - len(todo)
        t_compute = time.perf_counter()
        _compute(src, bb, layers, config, device, order, todo, partial, progress)
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
    result.images_per_second = len(todo) / compute_seconds if compute_seconds > 0 and todo else 0.0
    return result


def _rows_to_compute(src: Source, plan: dict[str, list[_Row]], donors: _Donors, *,
                     retry_failed: bool = False, views: int = 0, batch_size: int = 1) -> list[_Row]:
    """Rows to run through the network: every row of each block (a batch of an uninterrupted run)
    where one row has no features computed in a batch of that block's size. Features depend on the
    batch size in their last bits, so reusing them only at equal sizes keeps every run bit-identical
    to an uninterrupted extraction of the current source."""
    todo = []
    for block in _blocks(plan, batch_size).values():
        live, retry = [], []
        for r in block:
            key = _stat_key(r.ref.id, r.stat)
            if key in donors.failed_by_stat:
                if retry_failed:  # --on-error fail: read it again so the run stops at it
                    retry.append(r)
                continue
            r.hash = donors.hash_by_stat.get(key)
            if r.hash is None and donors and r.stat[0] >= 0:
                # A new or changed file while features exist: its content may already be cached.
                try:
                    r.hash = src.read(r.ref)[1]
                except OSError:
                    r.hash = None
            live.append(r)
        if retry or any(donors.lookup(r.hash, views and r.split == VIEW_SPLIT, len(live)) is None for r in live):
            todo.extend(sorted(live + retry, key=lambda r: r.index))
    return todo


def _block_key(r: _Row, batch_size: int) -> tuple[str, int]:
    return (r.split, r.index // batch_size)


def _blocks(plan: dict[str, list[_Row]], batch_size: int) -> dict[tuple[str, int], list[_Row]]:
    """The plan's rows by the batch an uninterrupted run computes them in."""
    out: dict[tuple[str, int], list[_Row]] = {}
    for rows in plan.values():
        for r in rows:
            out.setdefault(_block_key(r, batch_size), []).append(r)
    return out


def _batches(todo: list[_Row], batch_size: int) -> list[list[int]]:
    """Batches aligned to fixed blocks of each split's plan, so a resumed run computes the same
    batches as an uninterrupted one (batch composition can change float results)."""
    groups: dict[tuple[str, int], list[int]] = {}
    for i, r in enumerate(todo):
        groups.setdefault(_block_key(r, batch_size), []).append(i)
    return list(groups.values())


def _compute(src, bb: Backbone, layers, config: ExtractConfig, device, order, todo, partial: PartialStore,
             progress: ProgressFn | None) -> None:
    if not todo:
        return
    tune_allocator()
    if config.threads:
        torch.set_num_threads(config.threads)
    forward = TappedForward(bb, layers, config.pool, device=device, precision=config.precision,
                            channels_last=config.channels_last, order=order, compile=config.compile)
    pp = bb.preprocess
    workers = config.num_workers if config.num_workers is not None else default_workers(src, device)
    # Decoding in the main process: a thread per forward thread (files only; arrays need little work).
    decode_threads = 1 if workers or src.kind in ARRAY_KINDS else torch.get_num_threads()
    dataset = _DecodeDataset(src, todo, pp, config.augment, threads=decode_threads,
                             encoded_jpegs=config.decode_on_device)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_batches(todo, config.batch_size), num_workers=workers,
        collate_fn=_collate, pin_memory=device.type == "cuda", worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
    )
    np_dtype = np.dtype(config.dtype)
    writer = _Writer(partial, config.checkpoint_every)
    writer.start()
    done = 0
    try:
        with torch.inference_mode():
            for idx, hashes, x, bad in loader:
                if isinstance(x, list):  # undecoded JPEGs: decode on the device
                    crops, failed = decode_on_device(x, pp, device)
                    for k, reason in failed:
                        bad.append((idx[k], reason))
                    keep = [k for k, c in enumerate(crops) if c is not None]
                    idx, hashes = [idx[k] for k in keep], [hashes[k] for k in keep]
                    x = torch.stack([crops[k] for k in keep]) if keep else None
                failed_ids, failed_reasons = [], []
                for i, reason in bad:
                    row = todo[i]
                    if config.on_error == "fail":
                        raise SourceError(
                            f"Cannot use '{display_path(str(row.ref.key))}': {reason}. Use --on-error skip "
                            f"to skip and record such files."
                        )
                    log.warning("skipping %s: %s", row.ref.id, reason)
                    failed_ids.append(row.ref.id)
                    failed_reasons.append(reason)
                feats, views = [], []
                if x is not None:
                    out = forward(x)
                    b = len(idx)
                    for name in layers:
                        f = out[name].float().cpu().numpy().astype(np_dtype)
                        if not np.isfinite(f).all():
                            raise CacheError(
                                f"Layer '{name}' gave values that are not finite in {config.dtype} "
                                f"(overflow or NaN). Use --dtype float32 or --precision fp32."
                            )
                        feats.append(np.ascontiguousarray(f[:b]))
                        if len(f) > b:  # augmented views follow the base crops, image by image
                            views.append(np.ascontiguousarray(f[b:].reshape(b, -1, *f.shape[1:])))
                writer.put({
                    "hashes": np.asarray(hashes, dtype=HASH_DTYPE), "features": feats, "views": views,
                    "ids": [todo[i].ref.id for i in idx],
                    "stat": np.asarray([todo[i].stat for i in idx], dtype=np.int64).reshape(-1, 2),
                    "failed_ids": failed_ids, "failed_reasons": failed_reasons,
                    "failed_stat": np.asarray([todo[i].stat for i, _ in bad], dtype=np.int64).reshape(-1, 2),
                })
                done += len(idx) + len(bad)
                if progress:
                    progress(done, len(todo))
    except KeyboardInterrupt:
        del loader
        writer.close()
        raise ExtractionInterrupted(
            f"Stopped after {done} of {len(todo)} images; they are kept in '{partial.path}'. "
            f"Run the same command again to resume."
        ) from None
    finally:
        forward.remove()
        dataset.close()
        if writer.is_alive():
            writer.close()


def _assemble(path: Path, fp: CacheFingerprint, src: Source, plan, layers, shapes, config: ExtractConfig,
              donors: _Donors, timings: dict, stamp: dict | None = None) -> ExtractResult:
    tmp = path.with_name(path.name + ".tmp")
    np_dtype = np.dtype(config.dtype)
    splits_out: dict[str, int] = {}
    failures: list[dict] = []
    # Where each surviving row comes from: donor -> [(split, dst_row, src_index)].
    sources: dict[int, list[tuple[str, int, int]]] = {}
    per_split: dict[str, list[_Row]] = {}
    batch_ns: dict[str, list[int]] = {}
    # Each row's batch in an uninterrupted run: the rows of its block that can be read.
    size = {k: sum(_stat_key(r.ref.id, r.stat) not in donors.failed_by_stat for r in block)
            for k, block in _blocks(plan, config.batch_size).items()}
    for split, rows in plan.items():
        ok = []
        for r in rows:
            key = _stat_key(r.ref.id, r.stat)
            h = r.hash or donors.hash_by_stat.get(key)
            found = donors.lookup(h, config.views > 0 and split == VIEW_SPLIT, size[_block_key(r, config.batch_size)])
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
    with h5py.File(tmp, "w", track_order=True) as h:
        set_text_attrs(h, format=FORMAT, schema_version=SCHEMA_VERSION, fingerprint=fp.to_json(),
                       fingerprint_hash=fp.hash, classes=_json(src.classes), layers=_json(layers),
                       timings=_json(timings),
                       extract_config=_json({**config.to_dict(),
                                             "weights": os.path.abspath(config.weights) if config.weights else None}),
                       created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if config.shard is not None:
            set_text_attrs(h, shard=_json(list(config.shard)), **(stamp or {}))
        dsets: dict[tuple, h5py.Dataset] = {}
        for split, ok in per_split.items():
            g = h.create_group(split)
            n = len(ok)
            splits_out[split] = n
            for li, (name, shape) in enumerate(zip(layers, shapes)):
                dsets[(split, li)] = g.create_dataset(
                    f"features/{name}", shape=(n, *shape), dtype=np_dtype, track_times=False,
                    chunks=feature_chunks(shape, np_dtype.itemsize, n) if n else None)
                if config.views and split == VIEW_SPLIT:
                    vshape = (config.views, *shape)
                    dsets[(split, li, "views")] = g.create_dataset(
                        f"views/{name}", shape=(n, *vshape), dtype=np_dtype, track_times=False,
                        chunks=feature_chunks(vshape, np_dtype.itemsize, n) if n else None)
            g.create_dataset("labels", data=np.asarray([r.ref.label for r in ok], dtype=np.int64), track_times=False)
            write_strings(g, "ids", [r.ref.id for r in ok])
            g.create_dataset("hashes", data=np.asarray([r.hash for r in ok], dtype=HASH_DTYPE), track_times=False)
            g.create_dataset("stat", data=np.asarray([r.stat for r in ok], dtype=np.int64).reshape(-1, 2),
                             track_times=False)
            g.create_dataset("batch_n", data=np.asarray(batch_ns.get(split, []), dtype=np.int32), track_times=False)
        for d, targets in sources.items():
            arrays, view_arrays = donors.loaders[d]()
            by_split: dict[str, list[tuple[int, int]]] = {}
            for split, dst, j in targets:
                by_split.setdefault(split, []).append((dst, j))
            for split, pairs in by_split.items():
                pairs.sort()
                dst = np.array([p[0] for p in pairs])
                src_idx = np.array([p[1] for p in pairs])
                for li in range(len(layers)):
                    block = arrays[li][src_idx]
                    vblock = view_arrays[li][src_idx] if (split, li, "views") in dsets else None
                    for a, b, da, db in iter_runs(dst):
                        dsets[(split, li)][da:db] = block[a:b]
                        if vblock is not None:
                            dsets[(split, li, "views")][da:db] = vblock[a:b]
        write_failed(h, failures)
        if stamp:  # what the assembled cache checks this shard file by
            set_text_attrs(h, digest=shard_digest(h))
    commit_file(tmp, path)
    return ExtractResult(str(path), splits_out, len(failures), False, 0.0, 0.0,
                         failures=[{k: v for k, v in f.items() if k in ("split", "id", "reason")} for f in failures])


def _json(obj) -> str:
    return json.dumps(obj)
