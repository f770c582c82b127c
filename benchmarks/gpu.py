"""GPU throughput (issue 6): bare forward and `featcache extract` on one CUDA device.

resnet50 with random weights (no network needed), random tensors and a synthetic JPEG folder written
here. Cheap measurements first, compilation last; every row is appended to ``$OUT/gpu.json`` as soon
as it is measured, so a run cut short keeps what it has. Sized for under 5 minutes on an H100/H200.

Rows:
- bare forward at featcache's GPU batch: fp32/bf16 x NCHW/channels_last, then torch.compile;
- decode + resize + crop alone in worker processes (PIL);
- ``featcache extract`` of the JPEG folder with its defaults (bf16, channels_last, workers), against the
  GPU ceiling min(R_forward, R_decode); then with ``--decode-on-device`` (nvJPEG) and ``--compile``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from featcache import extract, load_backbone
from featcache.extract import _DecodeDataset, _collate, _plan, default_batch_size, default_workers
from featcache.sources import open_source

OUT = Path(os.environ.get("OUT", "/tmp/featcache-gpu"))
BACKBONE = "resnet50.none"
#: FEATCACHE_GPU_SMOKE=1 runs the whole script on the CPU with a few images (a check that it runs).
SMOKE = os.environ.get("FEATCACHE_GPU_SMOKE") == "1"
DEVICE = torch.device("cpu" if SMOKE else "cuda")
N_IMAGES = 16 if SMOKE else 4096
ROWS: list[dict] = []


def record(**row) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    (OUT / "gpu.json").write_text(json.dumps({"device": _device_name(), "rows": ROWS}, indent=2))


def _device_name() -> str:
    return "CPU (smoke run)" if SMOKE else torch.cuda.get_device_name(0)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def bare(model, batch: int, precision: str, channels_last: bool, steps: int = 2 if SMOKE else 40) -> float:
    x = torch.randn(batch, 3, 224, 224, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for _ in range(1 if SMOKE else 5):
            model(x)
        _sync()
        t = time.perf_counter()
        for _ in range(steps):
            model(x)
        _sync()
    return batch * steps / (time.perf_counter() - t)


def _write_jpegs(args) -> None:
    d, start, stop = args
    from PIL import Image

    rng = np.random.default_rng(start)
    for i in range(start, stop):
        p = Path(d) / f"class{i % 4}" / f"{i:05d}.jpg"
        if not p.exists():
            small = rng.integers(0, 255, (47, 63, 3), dtype=np.uint8)  # smooth enough to compress like a photo
            Image.fromarray(small).resize((500, 375), Image.BILINEAR).save(p, quality=90)


def jpeg_folder(n: int = N_IMAGES) -> Path:
    root = OUT / "jpegs" / "train"
    for c in range(4):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    step = 256
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_jpegs, [(str(root), s, min(n, s + step)) for s in range(0, n, step)]))
    return root.parent


def timed_extract(data: Path, tag: str, **options) -> dict:
    cache = OUT / f"cache-{tag}"
    shutil.rmtree(cache, ignore_errors=True)
    marks = []
    t0 = time.perf_counter()
    r = extract(str(data), backbone=BACKBONE, cache_dir=str(cache), device=DEVICE.type,
                progress=lambda done, total: marks.append((time.perf_counter() - t0, done)), **options)
    wall = time.perf_counter() - t0
    (t1, d1), (t2, d2) = marks[0], marks[-1]
    steady = (d2 - d1) / (t2 - t1) if t2 > t1 else float("nan")
    shutil.rmtree(cache, ignore_errors=True)
    return {"end_to_end_img_s": r.computed / wall, "steady_img_s": steady, "first_batch_s": t1, "wall_s": wall}


def main() -> None:
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("No CUDA device: this benchmark is for a GPU machine (FEATCACHE_GPU_SMOKE=1 runs it on the CPU).")
    OUT.mkdir(parents=True, exist_ok=True)
    device = DEVICE
    batch = 4 if SMOKE else default_batch_size(device)
    bb = load_backbone(BACKBONE)
    model = bb.model.to(device).eval()
    fwd = {}
    for precision in ("fp32", "bf16"):
        for cl in (False, True):
            m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            fwd[(precision, cl)] = bare(m, batch, precision, cl)
            record(what="bare forward", batch=batch, precision=precision, channels_last=cl, compile=False,
                   img_s=round(fwd[(precision, cl)], 1))
    data = jpeg_folder()
    src = open_source(str(data))
    workers = default_workers(src, device)
    rows = [r for rs in _plan(src).values() for r in rs]
    t = time.perf_counter()
    workers = workers or 1
    loader = torch.utils.data.DataLoader(_DecodeDataset(src, rows, bb.preprocess), batch_size=batch,
                                         num_workers=workers, collate_fn=_collate, prefetch_factor=4)
    for _ in loader:
        pass
    r_decode = len(rows) / (time.perf_counter() - t)
    record(what="decode + resize + crop alone (PIL)", workers=workers, img_s=round(r_decode, 1))
    ceiling = min(fwd[("bf16", True)], r_decode)
    binds = "forward" if fwd[("bf16", True)] < r_decode else "decode"
    for tag, opts in (("default", {}), ("decode-on-device", {"decode_on_device": True}),
                      ("fp32", {"precision": "fp32"})):
        res = timed_extract(data, tag, batch_size=batch, **opts)
        record(what=f"featcache extract ({tag})", workers=workers, n=len(rows),
               ceiling_img_s=round(ceiling, 1), binds=binds,
               ratio_to_ceiling=round(res["end_to_end_img_s"] / ceiling, 3),
               **{k: round(v, 2) for k, v in res.items()})
    try:
        compiled = torch.compile(model.to(memory_format=torch.channels_last))
        t = time.perf_counter()
        rate = bare(compiled, batch, "bf16", True)
        record(what="bare forward", batch=batch, precision="bf16", channels_last=True, compile=True,
               img_s=round(rate, 1), compile_and_run_s=round(time.perf_counter() - t, 1))
        res = timed_extract(data, "compile", batch_size=batch, compile=True)
        record(what="featcache extract (--compile)", workers=workers, n=len(rows),
               **{k: round(v, 2) for k, v in res.items()})
    except Exception as e:  # no compiler toolchain on the machine
        record(what="torch.compile", error=str(e)[:300])
    print(f"\n{_device_name()}\n")
    print("| what | settings | img/s |\n|---|---|---|")
    for r in ROWS:
        rate = r.get("img_s", r.get("end_to_end_img_s", float("nan")))
        settings = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("what", "img_s", "end_to_end_img_s"))
        print(f"| {r['what']} | {settings} | {rate} |")


if __name__ == "__main__":
    main()
