"""Cached partial fine-tuning vs the classic way (issue 5), on the real data set with
EfficientNet-Lite0: tail = stage6 + stage7 + head + a new classifier (frozen up to stage5).

(a) `finetune --freeze-until stage5` on raw images (augmented), (b) `fit-head --head tail` on cached
stage5 activations, without and with 4 cached augmented views, (c) the linear probe; same epochs.
Wall times include the extraction each cached variant needs.
"""

from __future__ import annotations

import shutil
import time

from featcache import extract
from featcache.runs.finetuning import finetune
from featcache.runs.fit import fit_head

from .common import WORK, Row, require_real_data

EPOCHS = 5
BOUNDARY = "stage5"


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run() -> list[Row]:
    data = str(require_real_data())
    root = WORK / "finetune"
    shutil.rmtree(root, ignore_errors=True)
    ref, t_ref = _timed(lambda: finetune(data, backbone="efficientnet_lite0", freeze_until=BOUNDARY, epochs=EPOCHS,
                                         output=str(root / "ref")))
    acc_ref = ref.metrics["val"]["top1"]
    rows = []
    for views in (0, 4):
        res, t_ext = _timed(lambda: extract(data, layers=(BOUNDARY,), pool="none", views=views,
                                            cache_dir=str(root / f"cache-{views}")))
        fit, t_fit = _timed(lambda: fit_head(res.cache, head="tail", head_options={"epochs": EPOCHS},
                                             output=str(root / f"tail-{views}")))
        acc = fit.metrics["val"]["top1"]
        total = t_ext + t_fit
        rows.append(Row(f"cached tail ({views} views) vs finetune of the same tail, {EPOCHS} epochs", t_ref / total,
                        ">= 5x at accuracy within 1 point", t_ref / total >= 5 and acc >= acc_ref - 0.01,
                        f"{total:.1f} s (extract {t_ext:.1f} + fit {t_fit:.1f}) vs {t_ref:.1f} s; val top-1 "
                        f"{acc:.4f} vs {acc_ref:.4f}; a re-fit from the cache costs {t_fit:.1f} s"))
    res, t_ext = _timed(lambda: extract(data, cache_dir=str(root / "cache-probe")))
    fit, t_fit = _timed(lambda: fit_head(res.cache, head="linear", output=str(root / "probe")))
    rows.append(Row("linear probe (13-point sweep) vs finetune of the tail", t_ref / (t_ext + t_fit), "-", True,
                    f"{t_ext + t_fit:.1f} s (extract {t_ext:.1f} + fit {t_fit:.1f}) vs {t_ref:.1f} s; val top-1 "
                    f"{fit.metrics['val']['top1']:.4f} vs {acc_ref:.4f}"))
    return rows
