"""Heads from the cache (issue 3, issue 6 items 3-4, issue 15 P2).

- Every registered feature head through fit-head with the default (coordinated) thread pools vs
  the fastest of one thread and every core for its pool: the default should be the fastest, and
  the chosen value and accuracy must not change with the thread count.
- A 13-point C sweep with the `linear` head (all grid points at once) vs 13 sequential scikit-learn
  LogisticRegression fits on the same cached features.
- fit-head (sweep included) from the cache vs training the same linear head for 10 epochs with the
  frozen backbone run every epoch (the usual tutorial loop).
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import torch

from featcache import extract, load_backbone, open_cache
from featcache.runs.fit import fit_head
from featcache.heads import make_head

from .common import WORK, Row, median_time, require_real_data

GRID = tuple(np.logspace(-4, 4, 13))


def _cache(source: str, name: str) -> str:
    return extract(source, backbone="efficientnet_lite0", cache_dir=str(WORK / name)).cache


def sweep_vs_sequential(source: str = "digits") -> Row:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    cache = _cache(source, "sweep-cache")
    with open_cache(cache) as c:
        Xtr, ytr = c.load("train")
        Xva, yva = c.load("val")
    sc = StandardScaler().fit(Xtr)
    Xtr, Xva = sc.transform(Xtr).astype(np.float32), sc.transform(Xva).astype(np.float32)
    accs = {}

    def sequential():
        accs["sk"] = [LogisticRegression(C=C, max_iter=1000, tol=1e-6).fit(Xtr, ytr).score(Xva, yva) for C in GRID]

    def grid():
        proba = make_head("linear").sweep_proba(Xtr, ytr, list(GRID), Xva)
        accs["lin"] = [float(np.mean(p.argmax(1) == yva)) for p in proba]

    t_seq, _ = median_time(sequential, repeat=3)
    t_grid, _ = median_time(grid, repeat=3)
    ratio = t_seq / t_grid
    diff = abs(max(accs["sk"]) - max(accs["lin"]))
    return Row(f"13-point C sweep: `linear` (grid at once) vs 13 sequential LogisticRegression, {source} "
               f"({Xtr.shape[0]}x{Xtr.shape[1]}, {len(np.unique(ytr))} classes)", ratio, ">= 5x, best val acc within 0.5 pt",
               ratio >= 5 and diff <= 0.005 + 1e-9,
               f"{t_seq:.2f} s vs {t_grid:.2f} s; best val accuracy {max(accs['sk']):.4f} vs {max(accs['lin']):.4f}")


def probe_vs_frozen_epochs(epochs: int = 10) -> Row:
    """fit-head linear from the cache (13-point sweep included) vs the tutorial loop that runs the
    frozen backbone every epoch for the same linear head."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    data = require_real_data()
    cache = _cache(str(data), "probe-cache")
    out = WORK / "probe-run"

    def from_cache():
        shutil.rmtree(out, ignore_errors=True)
        return fit_head(cache, head="linear", output=str(out))

    t_cache, _ = median_time(from_cache, repeat=3)
    res = from_cache()
    acc_cache = res.metrics["val"]["top1"]

    bb = load_backbone("efficientnet_lite0")
    pp = bb.preprocess
    tf = T.Compose([T.Resize(pp.resize, interpolation=T.InterpolationMode(pp.interpolation)), T.CenterCrop(pp.crop),
                    T.ToTensor(), T.Normalize(pp.mean, pp.std)])
    import copy

    backbone = copy.deepcopy(bb.model)
    backbone.classifier = torch.nn.Identity()
    train = torch.utils.data.DataLoader(ImageFolder(str(data / "train"), transform=tf), batch_size=32, shuffle=True,
                                        num_workers=0, generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(ImageFolder(str(data / "val"), transform=tf), batch_size=32, num_workers=0)
    torch.manual_seed(0)
    head = torch.nn.Linear(1280, 2)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    t = time.perf_counter()
    for _ in range(epochs):
        for x, y in train:
            with torch.no_grad():
                f = backbone(x)
            loss = torch.nn.functional.cross_entropy(head(f), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    t_loop = time.perf_counter() - t
    correct = 0
    with torch.no_grad():
        for x, y in val:
            correct += int((head(backbone(x)).argmax(1) == y).sum())
    acc_loop = correct / len(val.dataset)
    ratio = t_loop / t_cache
    return Row(f"fit-head linear from the cache (13-point sweep) vs {epochs} epochs with the frozen backbone run "
               f"every epoch, hymenoptera", ratio, ">= 20x at equal accuracy", ratio >= 20 and acc_cache >= acc_loop - 0.01,
               f"{t_cache:.2f} s (median of 3) vs {t_loop:.1f} s (1 run); val accuracy {acc_cache:.4f} vs {acc_loop:.4f}")


def threads_per_head(source: str = "digits", heads: tuple[str, ...] | None = None, repeat: int = 3,
                     cache: str | None = None) -> list[Row]:
    """One row per head: fit-head with the default thread pools vs its fastest thread setting."""
    from featcache.heads import HEADS

    cache = cache or _cache(source, "threads-cache")
    heads = heads or tuple(n for n in HEADS.names() if HEADS.entry(n).extra["inputs"] == "features")
    cores = torch.get_num_threads()
    rows = []
    for head in heads:
        times, results = {}, {}
        for label, threads in (("default", None), ("1 thread", 1), (f"{cores} threads", cores)):
            out = WORK / f"threads-{head}"

            def fit(threads=threads):
                shutil.rmtree(out, ignore_errors=True)
                return fit_head(cache, head=head, threads=threads, output=str(out))

            times[label], _ = median_time(fit, repeat=repeat)
            res = fit()
            results[label] = (res.best["value"], res.metrics["val"]["top1"], res.best["threads"]["threads"])
        best = min((k for k in times if k != "default"), key=times.get)
        ratio = times["default"] / times[best]
        same = len({r[:2] for r in results.values()}) == 1
        rows.append(Row(
            f"fit-head {head} on {source}: default thread pools vs the fastest setting ({best})", ratio,
            "<= 1.2, same value and accuracy", ratio <= 1.2 and same,
            "; ".join(f"{k}: {times[k]:.2f} s ({results[k][2]} used), {results[k][0]}, top-1 {results[k][1]:.4f}"
                      for k in times)))
    return rows


#: svm is left out of the thread lines: liblinear is single-threaded, threads do not apply to it.
THREAD_HEADS = ("logreg", "ridge", "linear", "mlp", "knn", "ncm")


def run() -> list[Row]:
    return [*threads_per_head("digits", THREAD_HEADS), sweep_vs_sequential("digits"), sweep_vs_sequential(str(require_real_data())),
            probe_vs_frozen_epochs()]
