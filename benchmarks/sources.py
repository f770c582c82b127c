"""Data where it lives (issue 22): the same images as a folder, as 8 tar shards per split, as parquet,
as a saved Hugging Face data set and as tar shards served by a local HTTP server.

- Each kind's end-to-end extraction rate over the folder's, in one run (the folder is extracted before
  and after the others; its rate is the mean): targets tar >= 1.0, parquet >= 1.0, HF >= 0.95,
  HTTP >= 0.9, each with features identical to the folder's (max difference 0).
- Memory: 100,000 tiny (16 px) samples in shards, peak RSS of an extraction at 100k minus at 10k
  <= 100 MB (each in a fresh process).

The data: the hymenoptera JPEGs re-encoded at four JPEG qualities each (4 x 398 = 1,592 images).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from featcache import extract, open_cache

from .common import WORK, Row, require_real_data

BACKBONE = "efficientnet_lite0"
QUALITIES = (95, 90, 85, 80)
TARGETS = {"tar shards": 1.0, "parquet": 1.0, "hf saved": 0.95, "http shards": 0.9}


def reencoded_folder(out: Path) -> Path:
    """Every hymenoptera JPEG re-encoded at :data:`QUALITIES`, in the same split/class layout."""
    from PIL import Image

    if out.is_dir():
        return out
    real = require_real_data()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for p in sorted(real.rglob("*.jpg")):
        rel = p.relative_to(real)
        img = Image.open(p).convert("RGB")
        (tmp / rel.parent).mkdir(parents=True, exist_ok=True)
        for q in QUALITIES:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=q)
            (tmp / rel.parent / f"{p.stem}_q{q}.jpg").write_bytes(buf.getvalue())
    tmp.rename(out)
    return out


def _features(cache: str) -> dict:
    with open_cache(cache) as c:
        return {s: (c.labels(s), c.features(s)[()]) for s in c.splits} | {"classes": c.classes}


def _max_diff(a: dict, b: dict) -> float:
    if a["classes"] != b["classes"] or set(a) != set(b):
        return float("inf")
    worst = 0.0
    for s in set(a) - {"classes"}:
        if not np.array_equal(a[s][0], b[s][0]) or a[s][1].shape != b[s][1].shape:
            return float("inf")
        worst = max(worst, float(np.abs(a[s][1].astype(np.float64) - b[s][1].astype(np.float64)).max(initial=0)))
    return worst


def _timed(spec: str, tag: str, **options) -> tuple[float, str]:
    d = WORK / "sources" / f"cache-{tag}"
    shutil.rmtree(d, ignore_errors=True)
    t = time.perf_counter()
    r = extract(spec, **{"backbone": BACKBONE, "cache_dir": str(d), **options})
    return r.computed / (time.perf_counter() - t), r.cache


def kinds_vs_folder(folder: Path, **options) -> list[Row]:
    """Each kind's extraction rate over the folder's, with the max feature difference."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from data_kinds import FlakyServer, write_hf, write_parquet, write_wds

    base = WORK / "sources"
    made = {"tar shards": base / "wds", "parquet": base / "parquet", "hf saved": base / "hf"}
    # A batch never spans two tar shards: shards of a multiple of 64 samples (the GPU batch size, 8 times the
    # CPU one) batch as the folder does, so their features can equal the folder's bit for bit.
    for path, write in zip(made.values(), (lambda f, o: write_wds(f, o, shards=8, multiple=64),
                                                 lambda f, o: write_parquet(f, o, row_group_size=256), write_hf)):
        shutil.rmtree(path, ignore_errors=True)
        write(folder, path)
    before, ref = _timed(str(folder), "folder-1", **options)
    rates, diffs = {}, {}
    for name, path in made.items():
        kind = {"tar shards": "wds", "parquet": "parquet", "hf saved": "hf"}[name]
        rates[name], cache = _timed(f"{kind}:{path}", name.replace(" ", "-"), **options)
        diffs[name] = _max_diff(_features(cache), _features(ref))
    shutil.rmtree(base / "data-cache", ignore_errors=True)
    os.environ["FEATCACHE_DATA_CACHE"] = str(base / "data-cache")
    last = len(list((made["tar shards"] / "train").glob("shard-*.tar"))) - 1  # 8 shards of the 1,592 images
    with FlakyServer(made["tar shards"]) as srv:
        rates["http shards"], cache = _timed(f"wds:{srv.url}/train/shard-{{000..{last:03d}}}.tar"
                                             f"#classes={srv.url}/classes.txt", "http", **options)
    ref_train = _features(ref)
    diffs["http shards"] = _max_diff(_features(cache), {"classes": ref_train["classes"], "train": ref_train["train"]})
    after, _ = _timed(str(folder), "folder-2", **options)
    folder_rate = (before + after) / 2
    rows = []
    for name, rate in rates.items():
        ratio = rate / folder_rate
        ok = ratio >= TARGETS[name] and diffs[name] == 0
        rows.append(Row(f"extract {name} / the same images as a folder", ratio, f">= {TARGETS[name]}, max diff 0", ok,
                        f"{rate:.1f} vs {folder_rate:.1f} img/s (folder before {before:.1f}, after {after:.1f}); "
                        f"max feature difference {diffs[name]:g}; {BACKBONE}, defaults"))
    return rows


_PEAK = """
import json, resource, sys
from featcache import extract
r = extract(sys.argv[1], backbone="resnet18.none", input_size=16, cache_dir=sys.argv[2], dtype="float16")
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "n": sum(r.splits.values())}))
"""


def tiny_shards(out: Path, n: int, per_shard: int = 5000) -> Path:
    """``n`` 16 px PNG samples in shards of ``per_shard``, 2 classes."""
    import tarfile

    from PIL import Image

    if (out / "done").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(0, n, per_shard):
        with tarfile.open(out / f"shard-{k // per_shard:05d}.tar", "w") as tf:
            for i in range(k, min(n, k + per_shard)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
                for name, data in ((f"{i:07d}.png", buf.getvalue()), (f"{i:07d}.cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    (out / "done").write_text("")
    return out


def memory_flat(small: int = 10_000, large: int = 100_000) -> Row:
    peaks = {}
    for n in (small, large):
        shards = tiny_shards(WORK / "sources" / f"tiny-{n}", n)
        cache = WORK / "sources" / f"tiny-cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        out = subprocess.run([sys.executable, "-c", _PEAK, f"wds:{shards}", str(cache)], capture_output=True,
                             text=True, check=True)
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_kb"] / 1024
    grow = peaks[large] - peaks[small]
    return Row(f"peak RSS of extracting {large:,} tiny shard samples minus {small:,}", grow, "<= 100 MB",
               grow <= 100, f"{peaks[small]:.0f} MB at {small:,}, {peaks[large]:.0f} MB at {large:,} "
                            f"(resnet18.none at 16 px, fresh processes)")


def run() -> list[Row]:
    folder = reencoded_folder(WORK / "sources" / "hymenoptera-x4")
    return kinds_vs_folder(folder) + [memory_flat()]
