"""Fine-tuning on raw images: the classic reference for the cached-activation tail.

:func:`finetune` trains a pretrained backbone with part of it frozen, decoding and augmenting
every image at every epoch, the way transfer learning is usually done. It is what
:class:`featcache.heads.tail.TailHead` replaces by training the same tail on cached activations, and the
baseline it is measured against (accuracy and time).

What trains is chosen by exactly one of two options:

- ``freeze_until="layer3"``: that module and everything before it (in ``named_modules`` order)
  are frozen, everything after it trains;
- ``train=("layer4*", "fc*")``: the modules whose names match one of the ``fnmatch`` patterns
  train (with everything inside them), the rest is frozen.

The final classifier is always replaced by a new one for the source's classes, and always trains.
Frozen modules are a fixed feature extractor: they stay in eval mode while training (BatchNorm
keeps its running statistics, dropout and stochastic depth are off), as when their activations
are cached.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..backbones import DEFAULT_BACKBONE, Backbone, load_backbone, seeded_init
from ..common.devices import (PRECISIONS, autocast, default_workers, prefetch_for_shm, resolve_device, resolve_precision,
                      shm_free_bytes)
from ..errors import ConfigError
from ..common.files import write_bytes, write_json
from .outputs import RunFolder, claim_folder
from ..extraction.loading import collate, worker_init
from ..metrics.scores import split_metrics

from ..backbones.preprocess import Augment, DecodeError, Preprocess, augmented_views, decode, load_image
from ..common.validation import check_adamw, check_choice, check_int
from ..common.runtime import tune_allocator
from ..sources import SampleRef, Source, open_source
from ..heads.training import adamw, cosine_lr, param_groups

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
RUN_JSON = "run.json"
METRICS_JSON = "metrics.json"


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of a fine-tuning run on raw images.

    Exactly one of ``freeze_until`` (a module name) and ``train`` (``fnmatch`` patterns of module
    names) must be given; see :mod:`featcache.runs.finetuning`.
    """

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    freeze_until: str | None = None
    train: tuple[str, ...] = ()
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    #: Decoding processes; None: the extraction's default (none on a CPU, up to 8 per GPU).
    num_workers: int | None = None
    #: Autocast precision of the forward and backward pass: auto is bf16 on GPUs with native bf16,
    #: fp16 on older GPUs (with loss scaling); on a CPU bf16 where it has native bf16, else fp32.
    precision: str = "auto"
    input_size: int | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    output: str | None = None
    runs_dir: str = "runs"
    #: Replace an existing run in ``output`` (as a whole); without it a run folder is never overwritten.
    overwrite: bool = False
    #: Carve a stratified, seeded val split out of train when the source has none.
    val_fraction: float | None = None
    split_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("weights", "output", "runs_dir"):
            value = getattr(self, name)
            if value is not None and isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        if isinstance(self.train, str):
            object.__setattr__(self, "train", (self.train,))
        elif isinstance(self.train, (list, tuple)):
            object.__setattr__(self, "train", tuple(self.train))
        if isinstance(self.scale, list):
            object.__setattr__(self, "scale", tuple(self.scale))

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option."""
        if self.freeze_until is not None and self.train:
            raise ConfigError(
                "Pass only one of the 'freeze_until' and 'train' options: freeze_until=LAYER freezes "
                "LAYER and everything before it, train=PATTERNS trains the modules matching them. "
                f"Got freeze_until={self.freeze_until!r} and train={self.train!r}."
            )
        if self.freeze_until is None and not self.train:
            raise ConfigError(
                "Pass one of the 'freeze_until' and 'train' options: freeze_until=LAYER (what comes after "
                "it trains; e.g. 'layer3' of a ResNet, 'stage6' of efficientnet_lite0) or train=PATTERNS "
                "(e.g. ('layer4*', 'fc*') or ('stage7*', 'head*', 'classifier*')). Got neither."
            )
        if self.freeze_until is not None and (not isinstance(self.freeze_until, str) or not self.freeze_until):
            raise ConfigError(f"The 'freeze_until' option must be a layer name. Got {self.freeze_until!r}.")
        if not isinstance(self.train, tuple) or not all(isinstance(p, str) and p for p in self.train):
            raise ConfigError(
                f"The 'train' option must be module-name patterns such as ('layer4*', 'fc*'). "
                f"Got {self.train!r}."
            )
        check_adamw(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size)
        check_int("seed", self.seed, minimum=0)
        if self.num_workers is not None:
            check_int("num_workers", self.num_workers, minimum=0)
        check_choice("precision", self.precision, PRECISIONS)
        if self.input_size is not None:
            check_int("input_size", self.input_size, minimum=8)
        ok = (isinstance(self.scale, tuple) and len(self.scale) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.scale))
        if not ok or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(
                f"The 'scale' option must be two numbers 0 < low <= high <= 1 (the area fraction of "
                f"the random resized crop). Got {self.scale!r}."
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"], d["scale"] = list(self.train), list(self.scale)
        return d


@dataclass
class FinetuneResult:
    """What a fine-tuning run did.

    Attributes
    ----------
    run : str
        The run folder (``model.safetensors``, ``run.json``, ``metrics.json``).
    metrics : dict
        ``split_metrics`` per split other than ``train``, after the last epoch.
    per_epoch : list of dict
        ``{"epoch", "train_loss", "val_top1", "seconds"}`` per epoch (``val_top1`` None without
        a val split).
    seconds : float
    failures : list of dict
        ``{"split", "id", "reason"}`` of images that could not be read or decoded (skipped).
    """

    run: str
    metrics: dict
    per_epoch: list[dict]
    seconds: float
    failures: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"run": self.run, "metrics": self.metrics, "per_epoch": self.per_epoch,
                "seconds": round(self.seconds, 3), "failed": len(self.failures)}


# ----------------------------------------------------------------------------------------------
# What trains


def _descendants(names: list[str], roots: set[str]) -> set[str]:
    return {n for n in names if any(n == r or n.startswith(r + ".") for r in roots)}


def _trainable_modules(model: nn.Module, config: FinetuneConfig, bb: Backbone) -> set[str]:
    """Names of the modules that train (every module inside a trainable one included)."""
    names = [n for n, _ in model.named_modules() if n]
    if config.freeze_until is not None:
        b = config.freeze_until
        if b not in names:
            raise ConfigError(
                f"Layer '{b}' is not in {bb.name}. Run 'featcache layers {config.backbone}' to list "
                f"the layers; its stages are {', '.join(bb.stages) or 'not known'}."
            )
        if bb.classifier is not None and (bb.classifier == b or bb.classifier.startswith(b + ".")
                                          or names.index(bb.classifier) < names.index(b)):
            raise ConfigError(
                f"freeze_until={b!r} leaves nothing but the new classifier to train in {bb.name}. "
                f"Pick an earlier layer, e.g. one of {', '.join(bb.stages) or 'its stages'}."
            )
        # named_modules lists a module's subtree right after it, and ancestors before it.
        i = names.index(b)
        j = i + 1
        while j < len(names) and names[j].startswith(b + "."):
            j += 1
        trainable = set(names[j:])
    else:
        matched: set[str] = set()
        for pat in config.train:
            hits = {n for n in names if fnmatch.fnmatchcase(n, pat)}
            if not hits:
                raise ConfigError(
                    f"The 'train' pattern {pat!r} matches no module of {bb.name}. Run 'featcache "
                    f"layers {config.backbone}' to list the module names (e.g. 'layer4*', 'fc*')."
                )
            matched |= hits
        trainable = _descendants(names, matched)
    if bb.classifier is not None:
        trainable |= _descendants(names, {bb.classifier})
    return trainable


def _frozen_roots(model: nn.Module, trainable: set[str]) -> list[nn.Module]:
    """The largest modules with nothing trainable inside: they run in eval mode while training."""
    partly = {n for t in trainable for n in _ancestors(t)} | trainable
    roots: list[nn.Module] = []
    done: list[str] = []
    for n, m in model.named_modules():
        if not n or n in partly or any(n.startswith(d + ".") for d in done):
            continue
        roots.append(m)
        done.append(n)
    return roots


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _set_train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    model.train()
    for m in frozen:
        m.eval()


def _replace_classifier(model: nn.Module, name: str, n_classes: int, seed: int) -> None:
    old = model.get_submodule(name)
    parent_name, _, attr = name.rpartition(".")
    with seeded_init(seed):
        new = nn.Linear(old.in_features, n_classes, bias=old.bias is not None)
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _top_level(names: set[str]) -> list[str]:
    """Names in ``names`` whose parent is not in it, sorted."""
    return sorted(n for n in names if not any(a in names for a in _ancestors(n)))


# ----------------------------------------------------------------------------------------------
# Images


class _Images(torch.utils.data.Dataset):
    """Samples of one split as uint8 (3, crop, crop) arrays; failures as a reason string.

    With ``augment`` set, each image is a random resized crop + flip drawn from the image's
    content hash and ``augment.seed`` (the crops of cached views, ``extract --views``).
    """

    def __init__(self, src: Source, refs: list[SampleRef], pp: Preprocess) -> None:
        self.src, self.refs, self.pp = src, refs, pp
        self.augment: Augment | None = None

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        ref = self.refs[i]
        try:
            data, h = self.src.read(ref)
        except OSError as e:
            return i, None, None, f"cannot read file: {e.strerror or e}"
        try:
            if self.augment is None:
                return i, h, load_image(data, self.pp)[None], None
            return i, h, augmented_views(decode(data, self.pp), self.pp, self.augment, h)[:1], None
        except DecodeError as e:
            return i, h, None, str(e)


def _loader(ds: _Images, order: list[int], config: FinetuneConfig, device: torch.device) -> torch.utils.data.DataLoader:
    """Batches of ``ds`` in ``order``: decoding processes and pinned memory on a GPU, as in extraction."""
    workers = config.num_workers if config.num_workers is not None else default_workers(device)
    return torch.utils.data.DataLoader(
        ds, batch_size=config.batch_size, sampler=order, collate_fn=collate, num_workers=workers,
        worker_init_fn=worker_init if workers else None, pin_memory=device.type == "cuda",
        persistent_workers=False,
        # Sized to /dev/shm, as in extraction (a 64 MB Docker /dev/shm ends in a bus error otherwise).
        prefetch_factor=prefetch_for_shm(workers, config.batch_size * 3 * ds.pp.crop ** 2, free=shm_free_bytes())
        if workers else None,
    )


class _Normalize:
    def __init__(self, pp: Preprocess, device: torch.device) -> None:
        self.mean = torch.tensor(pp.mean, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(pp.std, device=device).view(1, 3, 1, 1) * 255)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.mean.device, non_blocking=True).float().sub_(self.mean).mul_(self.inv_std)


# ----------------------------------------------------------------------------------------------
# The run


def finetune(source: str | os.PathLike | Source, config: FinetuneConfig | None = None, *,
             progress: Callable[[str], None] | None = None, **options: Any) -> FinetuneResult:
    """Fine-tune a pretrained backbone on raw images, part of it frozen, and save the run.

    Parameters
    ----------
    source : path, spec or Source
        Anything :func:`featcache.sources.open_source` opens; needs a ``train`` split.
    config : FinetuneConfig, optional
        Keyword ``options`` override its fields (``freeze_until="layer3"``, ``epochs=2``).
    progress : callable, optional
        Called with one line of text per epoch.

    Returns
    -------
    FinetuneResult
        Run folder, metrics per split other than ``train`` after the last epoch, per-epoch train
        loss and val top-1, seconds.

    Raises
    ------
    ConfigError
        For a bad option: neither or both of ``freeze_until`` and ``train``, an unknown layer, a
        pattern matching nothing, a source without a train split.

    Notes
    -----
    Training images go through decode -> random resized crop (``scale``, ratio 3/4..4/3) and a
    horizontal flip, both drawn from ``seed``, the epoch and the image -> normalise; evaluation
    images through the backbone's deterministic resize and centre crop. AdamW with a cosine
    schedule trains only the trainable modules' parameters (no decay on biases and normalisation
    scales). Images that cannot be read or decoded are skipped and listed in ``run.json``.
    """
    t0 = time.perf_counter()
    tune_allocator()
    config = FinetuneConfig(**{**(config.to_dict() if config else {}), **options})
    config.validate()
    # An existing run is refused (and the folder locked) before any image is read.
    folder = RunFolder(config.output, overwrite=config.overwrite) if config.output else None
    try:
        return _run(source, config, folder, progress, t0)
    finally:
        if folder is not None:
            folder.release()


def _run(source, config: FinetuneConfig, folder: "RunFolder | None", progress, t0: float) -> FinetuneResult:
    src = open_source(source, val_fraction=config.val_fraction, split_seed=config.split_seed)
    if not src.splits.get("train"):
        raise ConfigError(
            f"Source '{src.spec}' has no train split (it has: {', '.join(src.splits) or 'none'}). "
            f"Put the images under train/ and val/, or open it with val_fraction."
        )
    if not any(refs for s, refs in src.splits.items() if s != "train"):
        logger.warning("Source '%s' has no split besides train: the fine-tuned network will not be scored. Pass "
                       "--val-fraction 0.2 to hold out a val split.", src.spec)
    job = _Job(src, config)
    if folder is not None:
        return _train(job, src, config, folder, progress, t0)
    folder = RunFolder(claim_folder(config.runs_dir, _run_name(job.bb)), claimed=True)
    try:
        return _train(job, src, config, folder, progress, t0)
    finally:
        folder.release()


def _train(job: "_Job", src: Source, config: FinetuneConfig, folder: RunFolder, progress, t0: float) -> FinetuneResult:
    per_epoch: list[dict] = []
    metrics: dict[str, dict] = {}
    devices = [job.device.index or 0] if job.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # Dropout and stochastic depth in the trainable part draw from the global generator.
        torch.manual_seed(config.seed)
        for epoch in range(1, config.epochs + 1):
            te = time.perf_counter()
            train_loss = job.train_epoch(epoch)
            last = epoch == config.epochs
            splits = [s for s in job.datasets if s != "train"] if last else [s for s in ("val",) if s in job.datasets]
            top1 = None
            for s in splits:
                y_s, p_s = job.evaluate(s)
                if s == "val" and len(y_s):
                    top1 = float(np.mean(p_s.argmax(1) == y_s))
                if last and len(y_s):
                    metrics[s] = split_metrics(y_s, p_s, list(src.classes))
            per_epoch.append({"epoch": epoch, "train_loss": train_loss, "val_top1": top1,
                              "seconds": time.perf_counter() - te})
            if progress is not None:
                progress(f"epoch {epoch}/{config.epochs}: train_loss "
                         f"{train_loss if train_loss is not None else float('nan'):.4f}"
                         + (f", val_top1 {top1:.4f}" if top1 is not None else ""))
    job.model.eval()
    seconds = time.perf_counter() - t0
    fails = [{"split": s, "id": i, "reason": r} for (s, i), r in job.failures.items()]
    with folder as tmp:
        _save(tmp, job.model, job.meta(fails), {"metrics": metrics, "per_epoch": per_epoch, "seconds": seconds})
    return FinetuneResult(str(folder.target), metrics, per_epoch, seconds, fails)


class _Job:
    """The network of one fine-tuning run, its data, optimiser and device; trains and evaluates."""

    def __init__(self, src: Source, config: FinetuneConfig) -> None:
        self.src, self.config = src, config
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        # fp16 needs loss scaling (its range is too small for small gradients); bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        bb = self.bb = load_backbone(config.backbone, weights=config.weights, input_size=config.input_size)
        if bb.classifier is None:
            raise ConfigError(
                f"{bb.name} has no final nn.Linear classifier to replace. Use a torchvision, timm or "
                f"efficientnet_lite0 backbone."
            )
        model = self.model = bb.model
        self.trainable = _trainable_modules(model, config, bb)
        self.n_classes = len(src.classes)
        _replace_classifier(model, bb.classifier, self.n_classes, config.seed)
        for name, p in model.named_parameters():
            p.requires_grad_(name.rpartition(".")[0] in self.trainable)
        self.frozen = _frozen_roots(model, self.trainable)
        model.to(self.device)
        self.opt = adamw(param_groups(model, float(config.weight_decay)), lr=float(config.lr), device=self.device)
        self.norm = _Normalize(bb.preprocess, self.device)
        self.datasets = {s: _Images(src, refs, bb.preprocess) for s, refs in src.splits.items() if refs}
        self.failures: dict[tuple[str, str], str] = {}
        self.has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for n, m in model.named_modules()
                          if n in self.trainable)
        self.rng = np.random.default_rng(config.seed)
        self.step = 0
        self.total = config.epochs * math.ceil(len(self.datasets["train"]) / config.batch_size)

    def note(self, split: str, bad) -> None:
        for i, reason in bad:
            key = (split, self.datasets[split].refs[i].id)
            if key not in self.failures:
                self.failures[key] = reason
                logger.warning("skipping %s: %s", key[1], reason)

    def train_epoch(self, epoch: int) -> float | None:
        """One epoch of random resized crops and flips; the mean training loss (None: no batch ran)."""
        config, device, model, train = self.config, self.device, self.model, self.datasets["train"]
        seed = int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0])
        train.augment = Augment(views=1, scale=tuple(config.scale), seed=seed)
        _set_train_mode(model, self.frozen)
        # Summed on the device: reading the loss each step would wait for the GPU every step.
        loss_sum, seen = torch.zeros((), dtype=torch.float64, device=device), 0
        for batch in _loader(train, self.rng.permutation(len(train)).tolist(), config, device):
            idx, x, bad = batch.rows, batch.x, batch.failed
            self.note("train", bad)
            self.step += 1
            if x is None or (len(idx) < 2 and self.has_bn):
                continue  # BatchNorm in train mode cannot normalise a single image
            y = torch.tensor([train.refs[i].label for i in idx], dtype=torch.long).to(device, non_blocking=True)
            for g in self.opt.param_groups:
                g["lr"] = cosine_lr(float(config.lr), self.step, self.total)
            with autocast(device, self.precision):
                loss = nn.functional.cross_entropy(model(self.norm(x)).float(), y)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            loss_sum += loss.detach() * len(idx)
            seen += len(idx)
        return float(loss_sum) / seen if seen else None

    def evaluate(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Labels and class probabilities of a split, through the deterministic resize and crop."""
        ds = self.datasets[split]
        ds.augment = None
        self.model.eval()
        ys, logits = [], []
        with torch.no_grad(), autocast(self.device, self.precision):
            for batch in _loader(ds, list(range(len(ds))), self.config, self.device):
                idx, x, bad = batch.rows, batch.x, batch.failed
                self.note(split, bad)
                if x is None:
                    continue
                logits.append(self.model(self.norm(x)).float())
                ys.append(np.array([ds.refs[i].label for i in idx], dtype=np.int64))
        if not logits:
            return np.zeros(0, np.int64), np.zeros((0, self.n_classes))
        z = torch.cat(logits).cpu().numpy().astype(np.float64)  # one copy to the host per evaluation
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return np.concatenate(ys), p / p.sum(axis=1, keepdims=True)

    def meta(self, fails: list[dict]) -> dict:
        model, bb = self.model, self.bb
        return {
            "format": "featcache-finetune", "version": 1,
            "config": self.config.to_dict(),
            "source": self.src.describe(),
            "classes": list(self.src.classes),
            "backbone": bb.name,
            "backbone_info": bb.describe(),
            "preprocess": bb.preprocess.to_dict(),
            "classifier": bb.classifier,
            "trainable_modules": _top_level(self.trainable),
            "parameters": {"frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad),
                           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)},
            "failures": fails,
            "device": str(self.device),
            "precision": self.precision,
        }


def _run_name(bb: Backbone) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in bb.name)
    return f"finetune-{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def _save(run: Path, model: nn.Module, meta: dict, metrics: dict) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes(run / MODEL_FILE, save(state, metadata={"format": "featcache-finetune"}))
    write_json(run / RUN_JSON, meta)
    write_json(run / METRICS_JSON, metrics)


__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]
