"""Where an extraction's time goes on a GPU, when it runs far below the bare forward.

``python -m benchmarks.gpu_profile`` (on the GPU machine, after ``benchmarks/gpu.sh`` found the gap;
``FEATCACHE_GPU_SMOKE=1`` runs it on the CPU, tiny). Each stage of the loop is timed alone, with one
part switched off at a time, and the main thread of one whole extraction is profiled (cProfile, top
functions by own time). Results: ``$OUT/profile.json`` and ``$OUT/profile.txt``.
"""

from __future__ import annotations

import cProfile
import hashlib
import io
import json
import os
import platform
import pstats
import shutil
import subprocess
import time

import numpy as np
import torch

from benchmarks import gpu
from featcache import extract
from featcache.extraction.loading import DecodeDataset, DeviceDecoded, batches, collate, plan_rows
from featcache.extraction.plan import ExtractConfig, default_batch_size, prepare
from featcache.sources import content_hash, open_source

N = int(os.environ.get("FEATCACHE_PROFILE_IMAGES", 64 if gpu.SMOKE else 3000))
SPEC, OPTIONS = gpu.MODELS[0]
RESULTS: dict = {}


def note(key: str, value) -> None:
    RESULTS[key] = value
    print(json.dumps({key: value}), flush=True)
    (gpu.OUT / "profile.json").write_text(json.dumps(RESULTS, indent=2))


def system() -> None:
    flags = ""
    try:
        flags = open("/proc/cpuinfo").read().split("flags", 2)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        pass
    data = os.urandom(150_528)
    t = time.perf_counter()
    for _ in range(200):
        hashlib.sha256(data).digest()
    sha = 200 * len(data) / (time.perf_counter() - t) / 1e6
    note("system", {"kernel": platform.release(), "cpus": len(os.sched_getaffinity(0)), "sha_ni": " sha_ni" in flags,
                    "avx512": " avx512f" in flags, "sha256_MB_s": round(sha), "torch_threads": torch.get_num_threads(),
                    "shm": shutil.disk_usage("/dev/shm").total if os.path.exists("/dev/shm") else None})


def rate(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return round(n / (time.perf_counter() - t), 1)


def loader_rates(npz, jpegs) -> None:
    device = gpu.DEVICE
    batch = default_batch_size(device)
    for name, data in (("arrays", npz), ("jpegs", jpegs)):
        src = open_source(str(data))
        pp = prepare(str(data), ExtractConfig(backbone=SPEC, device=str(device), **OPTIONS)).backbone.preprocess
        rows = [r for rs in plan_rows(src).values() for r in rs][:N]
        refs = [r.ref for r in rows]
        if name == "arrays":
            note("arrays: read (memmap) only", rate(lambda: [np.array(src._arrays[r.key[0]][r.key[1]])
                                                                for r in refs], len(refs)))
            note("arrays: read + hash", rate(lambda: [src.read(r) for r in refs], len(refs)))
        else:
            note("jpegs: read file + hash", rate(lambda: [src.read(r) for r in refs], len(refs)))
        if name == "arrays":
            ds = DecodeDataset(src, rows, pp, threads=8)
            loader = torch.utils.data.DataLoader(ds, batch_sampler=batches(rows, batch), num_workers=0,
                                                 collate_fn=collate, pin_memory=device.type == "cuda")
            note("arrays: loader alone, workers=0, 8 decode threads", rate(lambda: [b for b in loader], len(rows)))
            ds.close()
        else:
            device_decode_only(src, rows, pp, batch)
        for workers, pin, encoded in ((0, True, False), (0, False, False), (8, True, False), (8, True, True)):
            if name == "arrays" and encoded:
                continue
            if name == "jpegs" and workers == 0 and not gpu.SMOKE:
                continue  # PIL in one thread: known to be slow
            ds = DecodeDataset(src, rows, pp, threads=1, encoded_jpegs=encoded)
            loader = torch.utils.data.DataLoader(ds, batch_sampler=batches(rows, batch), num_workers=workers,
                                                 collate_fn=collate, pin_memory=pin and device.type == "cuda",
                                                 prefetch_factor=4 if workers else None)
            it = DeviceDecoded(loader, pp, device, background=device.type != "cpu") if encoded else loader
            note(f"{name}: loader alone, workers={workers}, pin={pin}, decode_on_device={encoded}",
                 rate(lambda: [b for b in it], len(rows)))
            ds.close()


def device_decode_only(src, rows, pp, batch: int) -> None:
    """nvJPEG alone: encoded batches already in memory, decoded (and resized) on the device."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from featcache.backbones.preprocess import decode_on_device, encoded_jpeg

    items = [encoded_jpeg(src.read(r.ref)[0], pp) for r in rows[: 10 * batch]]
    groups = [items[i:i + batch] for i in range(0, len(items), batch)]
    decode_on_device(groups[0], pp, gpu.DEVICE)

    def full():
        for g in groups:
            decode_on_device(g, pp, gpu.DEVICE)
        gpu._sync()

    def bare():
        for g in groups:
            decode_jpeg([torch.from_numpy(e.data.copy()) for e in g], mode=ImageReadMode.RGB, device=gpu.DEVICE)
        gpu._sync()

    note("jpegs: decode_on_device on in-memory batches (decode + resize + crop)", rate(full, len(items)))
    note("jpegs: torchvision decode_jpeg alone on in-memory batches", rate(bare, len(items)))


def profiled_extract(data, label: str, one_thread: bool = False, **extra) -> None:
    """One extraction under cProfile; ``one_thread``: samples read in one main-process thread, as
    before the first GPU run set :func:`featcache.common.devices.main_process_decode_threads`."""
    import importlib

    extract_module = importlib.import_module("featcache.common.devices")

    cache = gpu.SCRATCH / "profile-cache"
    shutil.rmtree(cache, ignore_errors=True)
    prof = cProfile.Profile()
    threads = extract_module.main_process_decode_threads
    if one_thread:
        extract_module.main_process_decode_threads = lambda *a, **k: 1
    t = time.perf_counter()
    prof.enable()
    try:
        r = extract(str(data), backbone=SPEC, cache_dir=str(cache), device=str(gpu.DEVICE), precision="bf16",
                    **OPTIONS, **extra)
    finally:
        prof.disable()
        extract_module.main_process_decode_threads = threads
    wall = time.perf_counter() - t
    note(f"extract {label}", {"img_s": round(r.computed / wall, 1), "compute_img_s": round(r.images_per_second, 1)})
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
    with open(gpu.OUT / "profile.txt", "a") as f:
        f.write(f"===== extract {label}: {r.computed} images, {wall:.1f} s\n{s.getvalue()}\n")
    shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    gpu.OUT.mkdir(parents=True, exist_ok=True)
    gpu.SCRATCH.mkdir(parents=True, exist_ok=True)
    (gpu.OUT / "profile.txt").write_text("")
    system()
    jpegs = gpu.jpeg_folder(N)
    crop = prepare(str(jpegs), ExtractConfig(backbone=SPEC, device=str(gpu.DEVICE), **OPTIONS)).backbone.preprocess.crop
    npz = gpu.array_npz(N, crop)
    loader_rates(npz, jpegs)
    profiled_extract(npz, "arrays, one decode thread (before)", one_thread=True)
    profiled_extract(npz, "arrays")
    profiled_extract(npz, "arrays, num_workers=8", num_workers=8)
    profiled_extract(jpegs, "jpegs, decode_on_device", decode_on_device=True)
    try:
        note("nvidia-smi", subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,utilization.gpu", "--format=csv"],
                                          capture_output=True, text=True).stdout)
    except OSError:
        pass


if __name__ == "__main__":
    main()
