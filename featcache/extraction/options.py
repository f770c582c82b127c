"""The options of an extraction, declared once.

Each field of :class:`ExtractConfig` carries, in its metadata, everything said about it elsewhere:
its command-line flags, help and kind (``featcache extract`` and every command that extracts build
their options from it, :func:`featcache.cli.extraction.extraction_options`), its allowed values or
minimum (:meth:`ExtractConfig.validate` checks them), and whether it settles the backbone's own
facts in a cache fingerprint (:data:`BACKBONE_FACTS`). The ``[extract]`` table of a benchmark TOML
takes the field names. Importing this module imports no torch (``featcache extract --help``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from ..backbones.base import DEFAULT_BACKBONE, POOLS
from ..common.validation import PRECISIONS, check_choice, check_int
from ..errors import ConfigError

DTYPES = ("float16", "float32")
ON_ERROR = ("skip", "fail")

#: Where an option is offered: by every command that extracts, by ``extract`` alone, or by none
#: (set by the library, e.g. torchrun's rank 0 deferring the merge).
SHARED, EXTRACT_ONLY = "shared", "extract"


def option(default: Any, *flags: str, help: str = "", kind: str = "value", type: Any = None,
           choices: tuple[str, ...] | None = None, minimum: int | None = None, show_default: bool = False,
           metavar: str | None = None, scope: str | None = SHARED, facts: bool = False):
    """A field of :class:`ExtractConfig` with its command-line form and its check.

    ``kind``: ``value`` (``--flag VALUE``), ``switch`` (``--flag/--no-flag``), ``flag`` (present
    or not), ``multiple`` (repeatable, a tuple) or ``floats`` (``0.5,0.5,0.5``). ``facts``: the
    option, with the library versions, settles the backbone's own facts in a fingerprint."""
    meta = {"flags": flags, "help": help, "kind": kind, "type": type, "choices": choices, "minimum": minimum,
            "show_default": show_default, "metavar": metavar, "scope": scope if flags else None, "facts": facts}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ExtractConfig:
    """Options of one extraction. Fields that change feature values go in the fingerprint."""

    backbone: str = option(
        DEFAULT_BACKBONE, "-b", "--backbone", show_default=True, facts=True,
        help="Backbone spec: NAME[.TAG] (torchvision), efficientnet_lite0, timm:NAME, hf:NAME_OR_PATH, "
             "torchscript:FILE or package.module:factory. See 'featcache backbones'.")
    weights: str | None = option(
        None, "--weights", type="file", help="Local weights file (state dict or .safetensors) instead of downloading.")
    layers: tuple[str, ...] = option(
        (), "-l", "--layer", kind="multiple", facts=True,
        help="Layer to tap (repeatable; all from one forward pass). Default: pre_logits, the pooled input of the "
             "classifier (output for hf: models); 'all': every stage (block.N for hf:) and that pooled layer. "
             "See 'featcache layers BACKBONE'.")
    pool: str = option(
        "avg", "--pool", choices=POOLS, show_default=True,
        help="Reduce spatial maps or tokens; none keeps them. Token models: cls (class token), mean (patch "
             "tokens), cls+mean (both).")
    dtype: str = option("float16", "--dtype", choices=DTYPES, show_default=True, help="Storage type of the features.")
    precision: str = option(
        "auto", "--precision", choices=PRECISIONS, show_default=True,
        help="Compute precision (autocast): auto is bf16 on GPUs with native bf16 (Ampere and later) and on CPUs "
             "with AVX512-BF16/AMX, fp16 on older GPUs, else fp32. Recorded in the fingerprint.")
    channels_last: bool = option(True, "--channels-last/--no-channels-last", kind="switch", show_default=True,
                                 help="Run convolutions in channels_last memory format.")
    #: None: 8 on a CPU (small batches stay in cache: EfficientNet-Lite0 ran 115, 122, 123 and 90
    #: img/s at 4, 8, 16 and 32 on the 2-core test machine; resnet50 and resnet18 peaked at 8,
    #: BENCHMARKS.md), 64 on a GPU.
    batch_size: int | None = option(
        None, "--batch-size", type=int, minimum=1,
        help="Images per forward pass (default: 8 on a CPU, where small batches ran up to 3x faster than 64, "
             "64 on a GPU).")
    num_workers: int | None = option(
        None, "--workers", type=int, minimum=0,
        help="Decoding worker processes (default on a CPU: 0, the main process decodes each batch with a thread "
             "per core between forward passes; on a GPU this process's share of the CPUs it may run on, at most 8).")
    threads: int | None = option(None, "--threads", type=int, minimum=1, help="Torch threads for the forward pass.")
    device: str = option("auto", "--device", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
    cache_dir: str = option("cache", "--cache-dir", type="dir", show_default=True, help="Folder of cache files.")
    output: str | None = option(
        None, "-o", "--output", type="file", scope=EXTRACT_ONLY,
        help="Write the cache to this file instead of a fingerprint-named file in --cache-dir.")
    val_fraction: float | None = option(
        None, "--val-fraction", type=float,
        help="Carve a stratified, seeded val split out of train when the source has none.")
    split_seed: int = option(0, "--split-seed", type=int, show_default=True, help="Seed of --val-fraction.")
    on_error: str = option("skip", "--on-error", choices=ON_ERROR, show_default=True,
                           help="Unreadable images: skip and record them, or stop at the first.")
    input_size: int | None = option(None, "--input-size", type=int, minimum=8, facts=True,
                                    help="Override the crop size (px).")
    mean: tuple[float, ...] | None = option(None, "--mean", kind="floats", facts=True,
                                            help="Override the normalisation mean, e.g. 0.5,0.5,0.5.")
    std: tuple[float, ...] | None = option(None, "--std", kind="floats", facts=True,
                                           help="Override the normalisation std, e.g. 0.5,0.5,0.5.")
    views: int = option(0, "--views", type=int, minimum=0, show_default=True,
                        help="Also store K augmented views (random resized crop + flip) of each training image.")
    view_seed: int = option(0, "--view-seed", type=int, show_default=True, help="Seed of the augmented views.")
    #: Fold eval-mode BatchNorm into the preceding convolutions (checked against the unfolded
    #: model; 25% of EfficientNet-Lite0's CPU time was BatchNorm). Recorded in the fingerprint.
    fold_bn: bool = option(True, "--fold-bn/--no-fold-bn", kind="switch", show_default=True, facts=True,
                           help="Fold BatchNorm into the preceding convolutions (checked against the unfolded model).")
    #: Extract share I of N of every split (``(I, N)``) into a shard file beside the cache.
    shard: tuple[int, int] | None = option(
        None, "--shard", metavar="I/N", scope=EXTRACT_ONLY,
        help="Extract share I of N of every split into a shard file (SLURM arrays, shell loops); the last shard "
             "to finish assembles the cache. Under torchrun the ranks are the shards.")
    #: With shards: assemble a self-contained copy instead of virtual datasets over the shard files.
    merge: bool = option(False, "--merge", kind="flag", scope=EXTRACT_ONLY,
                         help="With shards: assemble one self-contained file (copy) instead of virtual datasets "
                              "over the shards.")
    #: With shards: leave assembling to the caller (torchrun's rank 0 after a barrier).
    defer_merge: bool = option(False)
    #: Seconds between chunk files of finished batches: a kill -9 loses at most this much work
    #: (0: a chunk per batch). Does not change feature values.
    checkpoint_every: float = option(
        10.0, "--checkpoint-every", type=float, show_default=True, metavar="SECONDS",
        help="Write finished batches to disk at least this often; a crash loses at most this much work "
             "(0: after every batch).")
    #: Run the tapped network through torch.compile (1.23x steady state on the 2-core CPU for
    #: EfficientNet-Lite0 after a 19 s compilation, BENCHMARKS.md). Recorded in the fingerprint.
    compile: bool = option(
        False, "--compile", kind="flag",
        help="Run the network through torch.compile: faster for long runs (1.23x for efficientnet_lite0 on a "
             "CPU) after a one-off compilation (~20 s). Recorded in the fingerprint.")
    #: Decode JPEGs with torchvision.io.decode_jpeg on the extraction device (nvJPEG on CUDA) and
    #: resize there; loader workers only read files. Recorded in the fingerprint.
    decode_on_device: bool = option(
        False, "--decode-on-device", kind="flag",
        help="Decode JPEGs with torchvision.io.decode_jpeg on the extraction device (nvJPEG on a GPU) instead of "
             "PIL in worker processes. Recorded in the fingerprint.")
    #: Hash every file's content, not only that of files whose (size, mtime) changed since the cache
    #: was made, and compute again the features of those whose content differs. Does not change
    #: feature values.
    verify: bool = option(
        False, "--verify", kind="flag", scope=EXTRACT_ONLY,
        help="Read and hash every file, not only those whose size or mtime changed since the cache was made, "
             "and compute again the features of files whose content differs.")

    def __post_init__(self) -> None:
        for name in ("cache_dir", "output", "weights"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, os.fspath(value))
        if isinstance(self.layers, (list, str)):
            object.__setattr__(self, "layers", (self.layers,) if isinstance(self.layers, str) else tuple(self.layers))
        if isinstance(self.shard, str):  # "I/N", as the command line gives it
            from .shards import parse_shard

            object.__setattr__(self, "shard", parse_shard(self.shard))

    def validate(self) -> None:
        """Check every option against its declaration, and the combinations."""
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta.get("choices"):
                check_choice(f.name, value, meta["choices"])
            elif meta.get("minimum") is not None and (value is not None or f.default is not None):
                check_int(f.name, value, minimum=meta["minimum"])
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
    def augment(self):
        from ..backbones.preprocess import Augment

        return Augment(views=self.views, seed=self.view_seed)

    def backbone_facts(self) -> dict:
        """The options that settle the backbone's own facts, as a cache records them (JSON form)."""
        return {f.name: _json_form(getattr(self, f.name)) for f in fields(self) if f.metadata.get("facts")}

    def to_dict(self) -> dict:
        return asdict(self)


def _json_form(value):
    return list(value) if isinstance(value, tuple) else value


#: The names of the options that settle the backbone's own facts in a fingerprint.
BACKBONE_FACTS = tuple(f.name for f in fields(ExtractConfig) if f.metadata.get("facts"))


def cli_fields(scope: str = SHARED) -> list:
    """The fields offered on the command line in ``scope`` (``extract`` adds its own to the shared)."""
    scopes = {SHARED} if scope == SHARED else {SHARED, EXTRACT_ONLY}
    return [f for f in fields(ExtractConfig) if f.metadata.get("scope") in scopes]


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
