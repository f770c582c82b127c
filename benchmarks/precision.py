"""bf16 autocast against fp32 on this CPU, for the choice of ``--precision auto`` on a CPU.

The bare forward of the model extraction runs (BatchNorm folded, channels_last, tapped at
pre_logits, batch 8, all cores), bf16 and fp32 alternated in one process, medians of 5.
"""

from __future__ import annotations

import statistics
import time

import torch

from featcache.common.devices import cpu_has_fast_bf16
from featcache.extraction.plan import ExtractConfig, prepare
from featcache.common.runtime import tune_allocator
from featcache.backbones.taps import TappedForward

from .common import Row

BATCH, STEPS, RUNS = 8, 6, 5


def _rates(spec: str) -> dict[str, float]:
    forwards = {}
    for prec in ("fp32", "bf16"):  # a model each: taps are hooks on the model
        p = prepare("digits", ExtractConfig(backbone=spec, device="cpu", batch_size=BATCH))
        forwards[prec] = TappedForward(p.backbone, p.layers, "avg", device=torch.device("cpu"), precision=prec,
                                       order=p.order)
    crop = p.backbone.preprocess.crop
    x = torch.randint(0, 255, (BATCH, 3, crop, crop), dtype=torch.uint8)
    times: dict[str, list[float]] = {prec: [] for prec in forwards}
    for f in forwards.values():
        f(x)  # warm-up
    for _ in range(RUNS):
        for prec, f in forwards.items():
            t = time.perf_counter()
            for _ in range(STEPS):
                f(x)
            times[prec].append(time.perf_counter() - t)
    return {prec: BATCH * STEPS / statistics.median(ts) for prec, ts in times.items()}


def run() -> list[Row]:
    tune_allocator()
    native = "native bf16 (AVX512-BF16/AMX)" if cpu_has_fast_bf16() else "no native bf16"
    rows = []
    for spec in ("efficientnet_lite0", "resnet50.none"):
        r = _rates(spec)
        rows.append(Row(f"bare forward bf16 / fp32, {spec}, batch {BATCH}, this CPU ({native})", r["bf16"] / r["fp32"],
                        "report (auto: bf16 where native)", True,
                        f"{r['bf16']:.1f} vs {r['fp32']:.1f} img/s (medians of {RUNS})"))
    return rows
