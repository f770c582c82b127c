"""GPU throughput (issue 6): bare forward and `featcache extract` on one CUDA device.

resnet50 with random weights (no network needed), random tensors and a synthetic JPEG folder written
here; fp32 vs bf16, NCHW vs channels_last, eager vs torch.compile. Prints one JSON line per
measurement and a Markdown table. Sized for well under 5 minutes on an H100/H200.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featcache import extract, load_backbone

OUT = Path(os.environ.get("OUT", "/tmp/featcache-gpu"))


def bare(model, batch: int, precision: str, channels_last: bool, steps: int = 30) -> float:
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for _ in range(5):
            model(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            model(x)
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def jpeg_folder(n: int = 3000) -> Path:
    root = OUT / "jpegs" / "train"
    rng = np.random.default_rng(0)
    for c in range(4):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n // 4):
            p = d / f"{i:05d}.jpg"
            if not p.exists():
                arr = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
                Image.fromarray(arr).resize((500, 375)).save(p, quality=90)
    return root.parent


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("No CUDA device: this benchmark is for a GPU machine.")
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    bb = load_backbone("resnet50.none")
    model = bb.model.cuda()
    for precision in ("fp32", "bf16"):
        for cl in (False, True):
            m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            rows.append({"what": "bare forward", "precision": precision, "channels_last": cl, "compile": False,
                         "img_s": bare(m, 256, precision, cl)})
            print(json.dumps(rows[-1]), flush=True)
    try:
        compiled = torch.compile(model.to(memory_format=torch.channels_last))
        rows.append({"what": "bare forward", "precision": "bf16", "channels_last": True, "compile": True,
                     "img_s": bare(compiled, 256, "bf16", True)})
        print(json.dumps(rows[-1]), flush=True)
    except Exception as e:  # no compiler toolchain on the machine
        rows.append({"what": "bare forward", "compile": True, "error": str(e)[:200]})
    data = jpeg_folder()
    workers = min(16, os.cpu_count() or 1)
    for precision in ("fp32", "bf16"):
        cache = OUT / f"cache-{precision}"
        shutil.rmtree(cache, ignore_errors=True)
        t = time.perf_counter()
        r = extract(str(data), backbone="resnet50.none", precision=precision, batch_size=256, num_workers=workers,
                    cache_dir=str(cache), device="cuda")
        rows.append({"what": "featcache extract (JPEG folder)", "precision": precision, "channels_last": True,
                     "workers": workers, "img_s": r.images_per_second, "end_to_end_img_s": r.computed / (time.perf_counter() - t)})
        print(json.dumps(rows[-1]), flush=True)
    t = time.perf_counter()
    from featcache.extract import _DecodeDataset, _collate, _plan
    from featcache.sources import open_source

    src = open_source(str(data))
    plan_rows = [r for rs in _plan(src).values() for r in rs]
    loader = torch.utils.data.DataLoader(_DecodeDataset(src, plan_rows, bb.preprocess), batch_size=256,
                                         num_workers=workers, collate_fn=_collate)
    for _ in loader:
        pass
    rows.append({"what": "decode + preprocess alone", "workers": workers, "img_s": len(plan_rows) / (time.perf_counter() - t)})
    print(json.dumps(rows[-1]), flush=True)
    print(f"\n{torch.cuda.get_device_name(0)}\n")
    print("| what | precision | channels_last | compile | img/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r.get('precision', '-')} | {r.get('channels_last', '-')} | {r.get('compile', '-')} | "
              f"{r.get('img_s', float('nan')):.0f} |")
    (OUT / "gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
