"""GPU throughput of ``featcache extract`` against the ceilings it can reach, on one CUDA device.

Run ``bash benchmarks/gpu.sh`` on the GPU machine (featcache from the source tree, nothing
installed, no network). Every extraction row is compared with what bounds it, measured in the
same run:

- from pre-decoded arrays (npz): the bare forward of the same model (BatchNorm folded the same
  way, channels_last, the same precision, the same batch), target >= 0.9;
- from JPEG files decoded by PIL in worker processes: min(bare bf16 forward, decode alone), target
  >= 0.9;
- from JPEG files decoded on the GPU (``--decode-on-device``, nvJPEG): the bare forward; target
  >= 5,000 img/s for resnet50 on an H200.

Each rate is reported twice: **steady** (images per second after the first 20% of the images,
start-up excluded) and **end to end** (images / wall time of the whole ``extract`` call, start-up,
worker start and HDF5 assembly included), each the median of ``RUNS`` runs over ``N`` images.
fp32 rows say whether TF32 is on. Rows are appended to ``$OUT/gpu.json`` as they are measured (a
run cut short keeps what it has) and a Markdown table goes to ``$OUT/gpu.md``; images and caches
live in ``$FEATCACHE_GPU_SCRATCH`` (default: a folder under /tmp), never in ``$OUT``.

``FEATCACHE_GPU_SMOKE=1`` runs every row on the CPU with a small model and a few images: a check
that the script runs, not a measurement.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from featcache import extract
from featcache.common.devices import default_workers
from featcache.extraction.plan import ExtractConfig, default_batch_size, prepare
from featcache.extraction.loading import DecodeDataset, batches, collate, plan_rows
from featcache.sources import open_source
from featcache.backbones.taps import TappedForward

SMOKE = os.environ.get("FEATCACHE_GPU_SMOKE") == "1"
OUT = Path(os.environ.get("OUT") or "/tmp/featcache-gpu")
SCRATCH = Path(os.environ.get("FEATCACHE_GPU_SCRATCH") or Path(tempfile.gettempdir()) / "featcache-gpu-scratch")
DEVICE = torch.device("cpu" if SMOKE else "cuda")
N = int(os.environ.get("FEATCACHE_GPU_IMAGES", 24 if SMOKE else 10_000))
RUNS = 1 if SMOKE else 3
#: Seconds after which the remaining rows are skipped (recorded as such), so that the script ends
#: inside its 8-minute slot with what it measured.
BUDGET = float(os.environ.get("FEATCACHE_GPU_BUDGET", 1e9 if SMOKE else 420))
#: (backbone, options): random weights, the architecture and compute are what count here.
MODELS = ([("resnet18.none", {"input_size": 32})] if SMOKE else
          [("resnet50.none", {}), ("efficientnet_lite0.none", {}), ("vit_b_16.none", {})])
#: FEATCACHE_GPU_MODELS=vit_b_16.none,... keeps only those rows (a second call finishing the table);
#: FEATCACHE_GPU_SWEEP=0 leaves out the defaults sweep.
if os.environ.get("FEATCACHE_GPU_MODELS"):
    MODELS = [m for m in MODELS if m[0] in os.environ["FEATCACHE_GPU_MODELS"].split(",")]
SWEEP = os.environ.get("FEATCACHE_GPU_SWEEP", "1") == "1"
T0 = time.perf_counter()
ROWS: list[dict] = []


def _device_name() -> str:
    return "CPU (smoke run, not a measurement)" if SMOKE else torch.cuda.get_device_name(DEVICE)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _tf32() -> bool:
    return DEVICE.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def record(**row) -> dict:
    row = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    meta = {"device": _device_name(), "torch": torch.__version__, "images": N, "runs": RUNS,
            "date": time.strftime("%Y-%m-%d"), "cpus": len(os.sched_getaffinity(0))}
    (OUT / "gpu.json").write_text(json.dumps({**meta, "rows": ROWS}, indent=2))
    return row


def out_of_time(what: str) -> bool:
    if time.perf_counter() - T0 < BUDGET:
        return False
    record(what=what, skipped=f"time budget of {BUDGET:.0f} s spent")
    return True


# --- data ------------------------------------------------------------------------------------

def _write_jpegs(args) -> None:
    root, start, stop = args
    from PIL import Image

    rng = np.random.default_rng(start)
    for i in range(start, stop):
        path = Path(root) / f"class{i % 4}" / f"{i:06d}.jpg"
        if path.exists():
            continue
        w = int(rng.integers(400, 1200))
        h = int(w * rng.choice([0.75, 0.667, 1.0, 1.333]))
        small = rng.integers(0, 255, (max(8, h // 8), max(8, w // 8), 3), dtype=np.uint8)  # photo-like smoothness
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        img.save(path, quality=int(rng.integers(80, 95)), progressive=i % 5 == 0)  # a fifth progressive


def jpeg_folder(n: int) -> Path:
    root = SCRATCH / f"jpegs-{n}" / "train"
    for c in range(4):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    step = 250
    with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(_write_jpegs, [(str(root), s, min(n, s + step)) for s in range(0, n, step)]))
    return root.parent


def array_npz(n: int, size: int) -> Path:
    """Pre-decoded RGB arrays of ``size`` x ``size`` (at the resize size featcache only crops them)."""
    path = SCRATCH / f"arrays-{n}-{size}.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
        labels = (np.arange(n) % 4).astype(np.int64)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, train_images=images, train_labels=labels)
        os.replace(tmp, path)
    return path


# --- measurements ----------------------------------------------------------------------------

def bare_forward(spec: str, options: dict, precision: str, batch: int, source: str, cudnn_benchmark: bool = True
                 ) -> float:
    """Steady img/s of the model extraction runs (folded, channels_last, tapped, normalised on the
    device) on uint8 batches already on the device: the ceiling of the extraction rows. cuDNN
    autotuning is set explicitly (extraction turns it on), so no row inherits it from the one before."""
    torch.backends.cudnn.benchmark = cudnn_benchmark
    p = prepare(source, ExtractConfig(backbone=spec, precision=precision, device=str(DEVICE), batch_size=batch,
                                      **options))
    crop = p.backbone.preprocess.crop
    forward = TappedForward(p.backbone, p.layers, "avg", device=DEVICE, precision=p.config.precision,
                            channels_last=True, order=p.order)
    x = torch.randint(0, 255, (batch, 3, crop, crop), dtype=torch.uint8, device=DEVICE)
    steps = 2 if SMOKE else 30
    rates = []
    with torch.inference_mode():
        for _ in range(2 if SMOKE else 10):  # warm-up (cuDNN autotuning included)
            forward(x)
        for _ in range(RUNS):
            _sync()
            t = time.perf_counter()
            for _ in range(steps):
                forward(x)
            _sync()
            rates.append(batch * steps / (time.perf_counter() - t))
    forward.remove()
    return statistics.median(rates)


def decode_alone(data: Path, batch: int, workers: int | None = None) -> tuple[float, int]:
    """Steady img/s of PIL decode + resize + crop in worker processes (default: as many as
    extraction starts), no forward."""
    src = open_source(str(data))
    pp = prepare(str(data), ExtractConfig(backbone=MODELS[0][0], device=str(DEVICE), **MODELS[0][1])).backbone.preprocess
    workers = workers or default_workers(DEVICE) or 1
    rows = [r for rs in plan_rows(src).values() for r in rs]
    loader = torch.utils.data.DataLoader(DecodeDataset(src, rows, pp), batch_sampler=batches(rows, batch),
                                         num_workers=workers, collate_fn=collate, prefetch_factor=4)
    marks = []
    t0 = time.perf_counter()
    done = 0
    for batch in loader:
        idx = batch.rows
        done += len(idx)
        marks.append((time.perf_counter() - t0, done))
    return _steady(marks, len(rows)), workers


def _steady(marks: list[tuple[float, int]], n: int) -> float:
    after = [m for m in marks if m[1] >= 0.2 * n] or marks
    (t1, d1), (t2, d2) = after[0], marks[-1]
    return (d2 - d1) / (t2 - t1) if t2 > t1 else float("nan")


def timed_extract(data: Path, spec: str, options: dict, runs: int = RUNS, **extra) -> dict:
    """Medians over ``runs`` fresh extractions (a new cache folder each: never a cache hit)."""
    steady, e2e, startup = [], [], []
    for run in range(runs):
        cache = SCRATCH / f"cache-{run}"
        shutil.rmtree(cache, ignore_errors=True)
        marks = []
        t0 = time.perf_counter()
        r = extract(str(data), backbone=spec, cache_dir=str(cache), device=str(DEVICE), checkpoint_every=60,
                    progress=lambda done, total: marks.append((time.perf_counter() - t0, done)), **options, **extra)
        wall = time.perf_counter() - t0
        shutil.rmtree(cache, ignore_errors=True)
        steady.append(_steady(marks, r.computed))
        e2e.append(r.computed / wall)
        startup.append(marks[0][0] if marks else float("nan"))
    return {"steady_img_s": statistics.median(steady), "end_to_end_img_s": statistics.median(e2e),
            "first_batch_s": statistics.median(startup), "runs": runs, "n": N}


def extraction_rows(spec: str, options: dict, npz: Path, jpegs: Path, r_decode: float) -> None:
    batch = default_batch_size(DEVICE)
    fwd: dict[str, float] = {}
    for precision in ("bf16", "fp32"):
        if out_of_time(f"{spec} bare forward {precision}"):
            return
        fwd[precision] = bare_forward(spec, options, precision, batch, str(npz))
        record(what="bare forward", backbone=spec, precision=precision, batch=batch, steady_img_s=fwd[precision],
               tf32=_tf32() if precision == "fp32" else None)
    cases = [("arrays", npz, "bf16", {}), ("arrays", npz, "fp32", {}),
             ("jpeg, PIL workers", jpegs, "bf16", {}),
             ("jpeg, --decode-on-device", jpegs, "bf16", {"decode_on_device": True})]
    for kind, data, precision, extra in cases:
        if out_of_time(f"{spec} extract {kind} {precision}"):
            return
        res = timed_extract(data, spec, options, precision=precision, **extra)
        if kind == "jpeg, PIL workers":
            ceiling, bound = min(fwd["bf16"], r_decode), "min(forward bf16, decode)"
        else:
            ceiling, bound = fwd[precision], f"forward {precision}"
        record(what=f"extract {kind}", backbone=spec, precision=precision, batch=batch,
               tf32=_tf32() if precision == "fp32" else None, ceiling_img_s=ceiling, ceiling=bound,
               steady_ratio=res["steady_img_s"] / ceiling, end_to_end_ratio=res["end_to_end_img_s"] / ceiling, **res)


def compile_row(spec: str, options: dict, npz: Path) -> None:
    if out_of_time(f"{spec} extract arrays --compile"):
        return
    try:
        # One run: each extraction compiles its own graph (first_batch_s is the compilation).
        res = timed_extract(npz, spec, options, runs=1, precision="bf16", compile=True)
        record(what="extract arrays, --compile", backbone=spec, precision="bf16", **res)
    except Exception as e:  # no compiler toolchain on the machine: say so, keep the other rows
        record(what="extract arrays, --compile", backbone=spec, error=f"{type(e).__name__}: {str(e)[:300]}")


def defaults_rows(npz: Path, jpegs: Path) -> None:
    """What the GPU defaults are set from, on the first model: batch size and cuDNN autotuning of
    the bare forward, batch size of an extraction from arrays, and decode workers (the default
    against every usable CPU but one)."""
    spec, options = MODELS[0]
    base = default_batch_size(DEVICE)
    for batch, autotune in [(base, False), (2 * base, True), (4 * base, True)]:
        if out_of_time(f"{spec} bare forward bf16 batch {batch}"):
            return
        rate = bare_forward(spec, options, "bf16", batch, str(npz), cudnn_benchmark=autotune)
        record(what="bare forward (defaults sweep)", backbone=spec, precision="bf16", batch=batch,
               cudnn_benchmark=autotune, steady_img_s=rate)
    if out_of_time(f"{spec} extract arrays batch {4 * base}"):
        return
    res = timed_extract(npz, spec, options, runs=1, precision="bf16", batch_size=4 * base)
    record(what="extract arrays (defaults sweep)", backbone=spec, precision="bf16", batch=4 * base, **res)
    cpus = len(os.sched_getaffinity(0))
    default = default_workers(DEVICE) or 1
    if cpus - 1 > default and not out_of_time("decode alone, more workers"):
        rate, workers = decode_alone(jpegs, base, workers=cpus - 1)
        record(what="decode alone (defaults sweep)", workers=workers, steady_img_s=rate)
        if not out_of_time(f"{spec} extract jpeg, {cpus - 1} workers"):
            res = timed_extract(jpegs, spec, options, runs=1, precision="bf16", num_workers=cpus - 1)
            record(what=f"extract jpeg, PIL workers={cpus - 1} (defaults sweep)", backbone=spec, precision="bf16",
                   batch=base, **res)


def write_markdown() -> None:
    lines = [f"# featcache extract on {_device_name()}", "",
             f"{N} images per extraction row, medians of {RUNS} runs, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| what | backbone | precision | steady img/s | end-to-end img/s | ceiling | steady / ceiling | "
             "end-to-end / ceiling |", "|---|---|---|---|---|---|---|---|"]
    for r in ROWS:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['what']} | {r.get('backbone', '')} | | {r.get('skipped') or r.get('error')} | | | | |")
            continue
        ceiling = f"{r['ceiling_img_s']} ({r['ceiling']})" if "ceiling_img_s" in r else ""
        prec = r.get("precision", "") + (" (TF32 on)" if r.get("tf32") else "")
        if "batch" in r and "(defaults sweep)" in r["what"]:
            prec += f", batch {r['batch']}" + ("" if r.get("cudnn_benchmark", True) else ", cuDNN autotuning off")
        if "workers" in r:
            prec += f"{r['workers']} workers" if not prec else f", {r['workers']} workers"
        lines.append(f"| {r['what']} | {r.get('backbone', '')} | {prec} | {r.get('steady_img_s', '')} | "
                     f"{r.get('end_to_end_img_s', '')} | {ceiling} | {r.get('steady_ratio', '')} | "
                     f"{r.get('end_to_end_ratio', '')} |")
    (OUT / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("No CUDA device: this benchmark is for a GPU machine (FEATCACHE_GPU_SMOKE=1 runs it on the CPU).")
    OUT.mkdir(parents=True, exist_ok=True)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        jpegs = jpeg_folder(N)
        # Arrays at the backbone's resize size, so featcache only centre-crops them (the first GPU
        # run stored them at the crop size, which featcache upsamples with PIL like any image).
        sizes = {spec: prepare(str(jpegs), ExtractConfig(backbone=spec, device=str(DEVICE), **options)
                               ).backbone.preprocess.resize for spec, options in MODELS}
        npz = {spec: array_npz(N, size) for spec, size in sizes.items()}
        record(what="data", jpegs=N, npz_sizes=sorted(set(sizes.values())), seconds=time.perf_counter() - t)
        r_decode, workers = decode_alone(jpegs, default_batch_size(DEVICE))
        record(what="decode alone (PIL, worker processes)", workers=workers, steady_img_s=r_decode)
        first = MODELS[0][0]
        extraction_rows(first, MODELS[0][1], npz[first], jpegs, r_decode)
        if SWEEP:
            defaults_rows(npz[first], jpegs)
        for spec, options in MODELS[1:]:
            extraction_rows(spec, options, npz[spec], jpegs, r_decode)
        compile_row(MODELS[0][0], MODELS[0][1], npz[MODELS[0][0]])
    finally:
        write_markdown()
        if os.environ.get("FEATCACHE_GPU_KEEP_SCRATCH") != "1":
            shutil.rmtree(SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    main()
