"""The cached tail at cache speed and fine-tune accuracy (issue 15), on the real data set with
EfficientNet-Lite0, for a stage5 and a stage6 freeze boundary.

    python -m benchmarks tail        # about 6-7 minutes on the 2-core test machine, alone

(a) Epoch overhead: a training epoch of the tail head under fit-head (batches read from the cache,
its default augmentation, the eval split scored after every epoch as fit-head does) against the
bare forward + backward + AdamW step of the same modules on random tensors of the same shape, at
the head's precision, side by side in one process; median of the epochs after the first over
REPEATS alternating runs, at stage5 (the larger tail). augment='none' is measured beside it.
(b) Tail vs finetune: `fit-head --head tail` with its default options (and with augment='none'
for reference) on a fresh `extract --layer B --pool none`, against `finetune --freeze-until B`,
EPOCHS epochs each, one seed; wall times include the extraction. To stay under 10 minutes this is
one seed per boundary: on this 153-image val split one image is 0.65 point and seeds move the
tail by up to 4 points at stage5, so the README gives the several-seed means and spreads.
"""

from __future__ import annotations

import shutil
import statistics
import time

import numpy as np
import torch

from featcache import extract
from featcache.backbones import load_backbone
from featcache.backbones.cutting import assemble_tail, cut_at
from featcache.common.devices import autocast, resolve_precision
from featcache.runs.finetuning import finetune
from featcache.runs.fit import fit_head
from featcache.heads.tail import TailHead
from featcache.common.runtime import head_threads
from featcache.store.cache import open_cache
from featcache.heads.training import adamw, param_groups

from .common import WORK, Row, require_real_data

EPOCHS = 5
BOUNDARIES = ("stage5", "stage6")
#: Epoch-overhead measurement: epochs per run (the first, with the set-up, is left out) and runs.
RATIO_EPOCHS = 3
REPEATS = 3
BATCH = 32


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _tail_epochs(cache: str, out: str, options: dict) -> list[float]:
    """Seconds of each epoch after the first of a fit-head tail fit (eval split watched)."""
    stamps = [time.perf_counter()]
    fit_head(cache, head="tail", head_options={"epochs": RATIO_EPOCHS, "batch_size": BATCH, **options},
             output=out, overwrite=True, progress=lambda _d: stamps.append(time.perf_counter()))
    return list(np.diff(stamps[1:]))


def _bare_epochs(boundary: str, shape: tuple[int, ...], n: int, precision: str) -> list[float]:
    """Seconds of each epoch after the first of forward + backward + AdamW step of the same tail on
    random tensors of the same shape and batch sizes, under the head's autocast precision."""
    bb = load_backbone("efficientnet_lite0")
    tail = assemble_tail(bb, cut_at(bb, boundary), 2, 0).train()
    cpu = torch.device("cpu")
    opt = adamw(param_groups(tail, 1e-4), lr=1e-3, device=cpu)
    gen = torch.Generator().manual_seed(0)
    sizes = [min(BATCH, n - s) for s in range(0, n, BATCH)]
    xs = [torch.randn(s, *shape, generator=gen) for s in sizes]
    ys = [torch.randint(0, 2, (s,), generator=gen) for s in sizes]
    times = []
    for _ in range(RATIO_EPOCHS):
        t = time.perf_counter()
        for xb, yb in zip(xs, ys):
            with autocast(cpu, precision):
                out = tail(xb).float()
            loss = torch.nn.functional.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t)
    return times[1:]


def _epoch_ratio(cache: str, boundary: str, root) -> Row:
    with open_cache(cache) as c:
        ds = c.features("train", boundary)
        shape, n = tuple(int(s) for s in ds.shape[1:]), int(ds.shape[0])
    precision = resolve_precision(TailHead().precision, torch.device("cpu"))
    head, plain, bare = [], [], []
    # fit-head sets the thread pools itself; the bare loop gets the same setting.
    with head_threads("torch", n * int(np.prod(shape))) as used:
        for _ in range(REPEATS):
            bare += _bare_epochs(boundary, shape, n, precision)
            head += _tail_epochs(cache, str(root / "ratio"), {})
            plain += _tail_epochs(cache, str(root / "ratio"), {"augment": "none"})
    h, p, b = statistics.median(head), statistics.median(plain), statistics.median(bare)
    return Row(f"tail epoch under fit-head (default options) vs bare fwd+bwd+step of the same modules, {boundary}",
               float(h / b), "<= 1.3x", bool(h / b <= 1.3),
               f"{h:.2f} s vs {b:.2f} s per epoch of {n} maps {shape}; with augment='none' {p:.2f} s ({p / b:.2f}x); "
               f"median of {len(head)} epochs each, {used['threads']} threads, {precision}, eval split scored every epoch")


def run() -> list[Row]:
    data = str(require_real_data())
    root = WORK / "tail"
    shutil.rmtree(root, ignore_errors=True)
    rows: list[Row] = []
    for boundary in BOUNDARIES:
        ref, t_ref = _timed(lambda: finetune(data, backbone="efficientnet_lite0", freeze_until=boundary,
                                             epochs=EPOCHS, output=str(root / f"finetune-{boundary}")))
        acc_ref = ref.metrics["val"]["top1"]
        res, t_ext = _timed(lambda: extract(data, layers=(boundary,), pool="none",
                                            cache_dir=str(root / f"cache-{boundary}")))
        for label, options in (("default options", {}), ("augment='none'", {"augment": "none"})):
            fit, t_fit = _timed(lambda: fit_head(res.cache, head="tail", head_options={"epochs": EPOCHS, **options},
                                                 output=str(root / f"tail-{boundary}-{len(rows)}")))
            acc, total = fit.metrics["val"]["top1"], t_ext + t_fit
            target = label == "default options"
            rows.append(Row(
                f"cached tail ({label}) vs finetune --freeze-until {boundary}, {EPOCHS} epochs", float(t_ref / total),
                "within 1 point at >= 5x less wall time" if target else "-",
                (t_ref / total >= 5 and acc >= acc_ref - 0.01) if target else True,
                f"{total:.1f} s (extract {t_ext:.1f} + fit {t_fit:.1f}) vs {t_ref:.1f} s; val top-1 {acc:.4f} "
                f"vs {acc_ref:.4f} ({100 * (acc - acc_ref):+.1f} points)"))
        if boundary == BOUNDARIES[0]:
            rows.insert(0, _epoch_ratio(res.cache, boundary, root))
    return rows
