"""Extraction against its ceilings (issue 2, issue 6 items 1-2).

- npz (pre-decoded) source vs a bare forward loop of the same model, batch, precision and threads.
- JPEG folder vs the combined ceiling 1 / (1/R_forward + 1/R_decode), R_decode = decode + preprocess
  alone on all cores.
- featcache defaults vs the loop most tutorials write (ImageFolder + transforms, fp32 NCHW,
  no workers), with the linear-probe accuracy of both feature sets.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import torch

from featcache import extract, load_backbone, open_cache
from featcache.extract import _DecodeDataset, _collate, _plan
from featcache.sources import open_source

from .common import WORK, Row, median_time, require_real_data

BACKBONE = "efficientnet_lite0"
#: featcache's default batch size on this device (4 on a CPU); the bare loop uses the same.
BATCH = __import__("featcache.extract", fromlist=["x"]).default_batch_size(torch.device("cpu"))


def _bare_forward_rate(n: int, *, channels_last: bool, batch: int = BATCH, repeat: int = 3) -> float:
    from featcache.taps import fold_batchnorm_checked

    bb = load_backbone(BACKBONE)
    model, _ = fold_batchnorm_checked(bb.model, bb.preprocess.crop)  # the same model featcache runs
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x = torch.randn(batch, 3, 224, 224)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    batches = -(-n // batch)

    def run():
        with torch.inference_mode():
            for _ in range(batches):
                model(x)

    with torch.inference_mode():
        model(x)
    t, _ = median_time(run, repeat=repeat)
    return batches * batch / t


def _decode_rate(source: str, workers: int, repeat: int = 3) -> float:
    src = open_source(source)
    bb = load_backbone(BACKBONE)
    rows = [r for rows in _plan(src).values() for r in rows]
    ds = _DecodeDataset(src, rows, bb.preprocess)

    def run():
        loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=workers, collate_fn=_collate,
                                             prefetch_factor=4 if workers else None)
        for _ in loader:
            pass

    t, _ = median_time(run, repeat=repeat)
    return len(rows) / t


def _extract_rate(source: str, repeat: int = 3, **options) -> tuple[float, float, str]:
    """Median images/s of a fresh extract(): (end to end, compute phase, cache path)."""
    n = [0]
    rates, walls = [], []
    path = ""
    for i in range(repeat):
        d = WORK / f"extract-{i}"
        shutil.rmtree(d, ignore_errors=True)
        t = time.perf_counter()
        r = extract(source, **{"backbone": BACKBONE, "cache_dir": str(d), "batch_size": BATCH, **options})
        walls.append(time.perf_counter() - t)
        rates.append(r.images_per_second)
        n[0] = r.computed
        path = r.cache
    return n[0] / float(np.median(walls)), float(np.median(rates)), path


def npz_vs_bare_forward(n: int = 256) -> Row:
    rng = np.random.default_rng(0)
    path = WORK / "bench.npz"
    WORK.mkdir(parents=True, exist_ok=True)
    np.savez(path, train_images=rng.integers(0, 255, (n, 256, 256, 3), dtype=np.uint8),
             train_labels=rng.integers(0, 2, n))
    r_bare = _bare_forward_rate(n, channels_last=True)
    r_end, r_compute, _ = _extract_rate(str(path), precision="fp32")
    ratio = r_end / r_bare
    return Row(f"extract from npz / bare forward loop (fp32, channels_last, batch {BATCH}, 2 threads)", ratio, ">= 0.95",
               ratio >= 0.95, f"{r_end:.1f} img/s end to end ({r_compute:.1f} in the compute phase) vs "
               f"{r_bare:.1f} img/s bare, {n} images 256 px")


def jpeg_vs_combined_ceiling() -> list[Row]:
    data = str(require_real_data())
    r_fwd = _bare_forward_rate(398, channels_last=True)
    r_dec = {w: _decode_rate(data, w) for w in (1, 2)}
    best_dec = max(r_dec.values())
    ceiling = 1 / (1 / r_fwd + 1 / best_dec)
    rows = []
    for workers in (1, 2):
        r_end, r_compute, _ = _extract_rate(data, num_workers=workers, precision="fp32")
        ratio = r_end / ceiling
        bind = "forward" if r_fwd < best_dec else "decode"
        rows.append(Row(f"extract JPEG folder ({workers} worker(s)) / combined ceiling", ratio, ">= 0.9",
                        ratio >= 0.9,
                        f"{r_end:.1f} img/s end to end ({r_compute:.1f} compute phase); ceiling {ceiling:.1f} = "
                        f"1/(1/{r_fwd:.1f} fwd + 1/{best_dec:.0f} decode); decode alone 1 worker "
                        f"{r_dec[1]:.0f}, 2 workers {r_dec[2]:.0f} img/s; {bind} binds"))
    return rows


def tutorial_loop_vs_defaults() -> Row:
    """The loop most tutorials write vs featcache defaults, same images, plus probe accuracy."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder


    data = require_real_data()
    bb = load_backbone(BACKBONE)
    pp = bb.preprocess
    tf = T.Compose([T.Resize(pp.resize, interpolation=T.InterpolationMode(pp.interpolation)), T.CenterCrop(pp.crop),
                    T.ToTensor(), T.Normalize(pp.mean, pp.std)])
    import copy

    model = copy.deepcopy(bb.model).to(memory_format=torch.contiguous_format)
    model.classifier = torch.nn.Identity()  # what tutorials do to get pre-logit features
    feats = {}

    def tutorial():
        for split in ("train", "val"):
            ds = ImageFolder(str(data / split), transform=tf)
            loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=0)
            out, ys = [], []
            with torch.no_grad():
                for x, y in loader:
                    out.append(model(x).numpy())
                    ys.append(y.numpy())
            feats[split] = (np.concatenate(out), np.concatenate(ys))

    t_tut, _ = median_time(tutorial, repeat=1)
    r_end, _, cache = _extract_rate(str(data), repeat=1, batch_size=None)
    t_fc = 398 / r_end
    ratio = t_tut / t_fc
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def best_probe(Xtr, ytr, Xva, yva):
        sc = StandardScaler().fit(Xtr)
        accs = [LogisticRegression(C=C, max_iter=2000).fit(sc.transform(Xtr), ytr).score(sc.transform(Xva), yva)
                for C in np.logspace(-4, 4, 13)]
        return max(accs)

    acc_tut = best_probe(*feats["train"], *feats["val"])
    with open_cache(cache) as c:
        acc_fc = best_probe(*c.load("train"), *c.load("val"))
    diff_images = abs(acc_tut - acc_fc) * 153
    return Row("featcache extract defaults vs tutorial loop (ImageFolder, fp32 NCHW, batch 32, no workers), hymenoptera",
               ratio, ">= 2.5x, probe within 1 image", ratio >= 2.5 and diff_images <= 1 + 1e-6,
               f"tutorial {t_tut:.1f} s, featcache {t_fc:.1f} s; best C-sweep probe val accuracy "
               f"{acc_tut:.4f} vs {acc_fc:.4f} ({diff_images:.0f} image(s) apart)")


def run() -> list[Row]:
    return [npz_vs_bare_forward(), *jpeg_vs_combined_ceiling(), tutorial_loop_vs_defaults()]
