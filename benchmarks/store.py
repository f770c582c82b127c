"""The HDF5 store (issue 6 items 5-6).

- Reading a whole cache into memory vs ``numpy.fromfile`` of the same bytes, for chunk shapes and
  compressions (none, lzf, gzip): the default is chosen from these numbers.
- Growth: extraction time and peak memory for 1k, 10k and 100k samples (a small model at 16 px from
  an npz source, each size in its own process).
- Checksums (issue 26 item 2): reading a cache's features whole with HDF5's per-chunk fletcher32
  checksum (what featcache writes) vs the same chunks without it; a cache hit and ``info --verify``
  read the whole file once this way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import h5py
import numpy as np

from featcache.store.cache import CHUNK_BYTES

from .common import WORK, Row, median_time


def _write(path, X, *, chunks, compression, fletcher32=False):
    with h5py.File(path, "w") as h:
        h.create_dataset("x", data=X, chunks=chunks, compression=compression, fletcher32=fletcher32)


def _read_whole(path):
    with h5py.File(path, "r") as h:
        ds = h["x"]
        out = np.empty(ds.shape, ds.dtype)
        ds.read_direct(out)


def _features(n: int, d: int) -> np.ndarray:
    # Real features are post-ReLU/SiLU activations: many small values, some zeros.
    rng = np.random.default_rng(0)
    return np.maximum(rng.normal(0.2, 1.0, (n, d)), 0).astype(np.float16)


def checksum_read_cost(n: int = 40000, d: int = 1280) -> Row:
    """Read time without checksums / with fletcher32, same ~1 MB chunks (1.0: checksums are free)."""
    WORK.mkdir(parents=True, exist_ok=True)
    X = _features(n, d)
    chunks = (min(n, CHUNK_BYTES // (d * 2)), d)
    times = {}
    for f32 in (False, True):
        path = WORK / f"checksum-{f32}.h5"
        _write(path, X, chunks=chunks, compression=None, fletcher32=f32)
        times[f32], _ = median_time(lambda p=path: _read_whole(p), repeat=7, warmup=1)
        path.unlink()
    ratio = times[False] / times[True]
    return Row(f"read {n}x{d} float16 into memory: no checksum / fletcher32 per ~1 MB chunk", ratio,
               ">= 0.8 (checksums cost at most a fifth of a read)", ratio >= 0.8,
               f"{X.nbytes / times[True] / 1e9:.2f} GB/s with fletcher32 vs {X.nbytes / times[False] / 1e9:.2f} GB/s "
               f"without (warm page cache); a cache hit and 'info --verify' read the whole file once")


def read_vs_fromfile(n: int = 40000, d: int = 1280) -> list[Row]:
    WORK.mkdir(parents=True, exist_ok=True)
    X = _features(n, d)
    raw = WORK / "raw.bin"
    X.tofile(raw)
    t_raw, _ = median_time(lambda: np.fromfile(raw, dtype=np.float16), repeat=5, warmup=1)
    rows = []
    rows_per_chunk = CHUNK_BYTES // (d * 2)
    settings = [("default: ~1 MB chunks, no compression", (rows_per_chunk, d), None),
                ("64 KB chunks", (max(1, 65536 // (d * 2)), d), None),
                ("contiguous", None, None),
                ("~1 MB chunks, lzf", (rows_per_chunk, d), "lzf"),
                ("~1 MB chunks, gzip", (rows_per_chunk, d), "gzip")]
    for name, chunks, comp in settings:
        path = WORK / "store.h5"
        t = time.perf_counter()
        _write(path, X, chunks=chunks, compression=comp)
        t_write = time.perf_counter() - t
        t_read, _ = median_time(lambda: _read_whole(path), repeat=5, warmup=1)
        ratio = t_raw / t_read
        size = path.stat().st_size / X.nbytes
        rows.append(Row(f"read {n}x{d} float16 into memory, {name} / np.fromfile", ratio,
                        ">= 0.8 (default)" if chunks == (rows_per_chunk, d) and comp is None else "-",
                        ratio >= 0.8 if chunks == (rows_per_chunk, d) and comp is None else True,
                        f"{X.nbytes / t_read / 1e9:.2f} GB/s vs {X.nbytes / t_raw / 1e9:.2f} GB/s raw (warm page "
                        f"cache); file {size:.2f}x the raw bytes; write {t_write:.2f} s"))
    return rows


_GROWTH = """
import json, resource, sys, time
import numpy as np
from featcache import extract
n = int(sys.argv[1])
rng = np.random.default_rng(0)
path = sys.argv[2] + f"/growth-{n}.npz"
np.savez(path, train_images=rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8), train_labels=rng.integers(0, 10, n))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
r = extract(path, backbone="benchmarks.models:tiny_cnn", input_size=16, batch_size=256, cache_dir=sys.argv[2] + f"/growth-cache-{n}")
dt = time.perf_counter() - t
print(json.dumps({"n": n, "seconds": dt, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "start_mb": base / 1024}))
"""


def growth() -> Row:
    import shutil

    out = {}
    for n in (1000, 10000, 100000):
        d = WORK / "growth"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        res = subprocess.run([sys.executable, "-c", _GROWTH, str(n), str(d)], capture_output=True, text=True,
                             check=True)
        out[n] = json.loads(res.stdout.strip().splitlines()[-1])
    per = {n: out[n]["seconds"] / n * 1e6 for n in out}
    linear = per[100000] / per[10000]
    mem = out[100000]["peak_mb"] - out[1000]["peak_mb"]
    detail = "; ".join(f"{n}: {o['seconds']:.1f} s ({per[n]:.0f} us/sample), peak RSS {o['peak_mb']:.0f} MB"
                       for n, o in out.items())
    return Row("growth 1k -> 10k -> 100k samples (tiny CNN, 16 px, npz): time per sample at 100k / at 10k",
               linear, "~1 (linear), peak memory flat", linear < 1.3 and mem < 200,
               f"{detail}; peak RSS grows {mem:.0f} MB from 1k to 100k")


def run() -> list[Row]:
    return [*read_vs_fromfile(), checksum_read_cost(), growth()]
