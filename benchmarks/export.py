"""Features out (issue 23): export, FAISS index and search, leaks.

- Export 1,000,000 x 768 float16 (a synthetic cache) to the npy layout against ``np.save`` of the same
  array from memory (target ratio >= 0.8 with the parquet metadata), and its peak memory against a
  tenth of the rows (independent of the row count).
- Index 1,000,000 x 768 (clustered synthetic vectors) with the size rule's approximate index (forced:
  the rule picks exact Flat up to 1M rows) and 1,000 queries: recall@10 against exact search
  (>= 0.95), build seconds, queries per second, index bytes.
- ``find_leaks`` on 100,000 x 1,280 (under 60 s), and the near-duplicate threshold measurement on the
  real images: cosine of copies re-encoded at quality 70, resized to 80% and flipped with their
  original, against the most similar distinct pair; every injected copy (those three and byte-identical
  ones) must be found.
"""

from __future__ import annotations

import io
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from featcache.store.writer import CacheWriter
from featcache.store.cache import CacheFingerprint

from .common import WORK, Row, require_real_data


def synthetic_cache(path: Path, n: int, dim: int, *, dtype: str = "float16", seed: int = 0, clusters: int = 0,
                    val: int = 0, block: int = 65536) -> Path:
    """A featcache cache of ``n`` random train rows (and ``val`` rows), written block by block."""
    fp = CacheFingerprint(backbone={"name": "synthetic"}, layers=("x",), pool="avg", preprocess={}, precision="fp32",
                          dtype=dtype, channels_last=False, device_type="cpu", source={"kind": "synthetic", "spec": ""})
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (clusters, dim)).astype(np.float32) if clusters else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with CacheWriter(path, fingerprint=fp.to_json(), fingerprint_hash=fp.hash, classes=json.dumps(["a", "b"]),
                     layers=json.dumps(["x"]), timings="{}") as w:
        for split, rows in (("train", n), ("val", val)):
            if split == "val" and not rows:
                continue
            w.add_split(split, labels=np.arange(rows) % 2, ids=[f"{split}/{i}" for i in range(rows)],
                        hashes=[f"{split}{i:030d}"[:32].encode() for i in range(rows)], stat=np.zeros((rows, 2)))
            w.add_features(split, "x", (rows, dim), dtype)
            for s in range(0, rows, block):
                m = min(block, rows - s)
                x = rng.normal(0, 1, (m, dim)).astype(np.float32)
                if centres is not None:
                    x = centres[rng.integers(0, clusters, m)] + 0.5 * x
                w.write_rows(split, "x", s, x.astype(dtype))
    return path


def _peak_export(cache: Path, out: Path) -> float:
    """Peak RSS (MB) of a fresh process exporting ``cache``."""
    code = ("import resource, sys; from featcache.exports import export_features; "
            f"export_features({str(cache)!r}, {str(out)!r}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def export_speed(n: int = 1_000_000, dim: int = 768) -> list[Row]:
    from featcache.exports import export_features

    cache = synthetic_cache(WORK / "export" / "big.h5", n, dim)
    small = synthetic_cache(WORK / "export" / "small.h5", n // 10, dim)
    out = WORK / "export" / "out"
    shutil.rmtree(out, ignore_errors=True)
    with __import__("h5py").File(cache, "r") as h:
        x = h["train/features/x"][()]
    t = time.perf_counter()
    np.save(WORK / "export" / "plain.npy", x)
    t_save = time.perf_counter() - t
    del x
    t = time.perf_counter()
    export_features(cache, out)
    t_export = time.perf_counter() - t
    ratio = t_save / t_export
    peak_big = _peak_export(cache, WORK / "export" / "out-big")
    peak_small = _peak_export(small, WORK / "export" / "out-small")
    return [Row(f"export {n}x{dim} float16 (npy + parquet metadata) / np.save from memory", ratio, ">= 0.8",
                ratio >= 0.8, f"export {t_export:.1f} s, np.save {t_save:.1f} s"),
            Row(f"export peak memory, {n} rows / {n // 10} rows", peak_big / peak_small, "<= 1.2",
                peak_big / peak_small <= 1.2, f"{peak_big:.0f} MB vs {peak_small:.0f} MB")]


def index_recall(n: int = 1_000_000, dim: int = 768, queries: int = 1000) -> list[Row]:
    import faiss

    from featcache.retrieval import build_index, choose_index_factory, load_index

    cache = synthetic_cache(WORK / "index" / "big.h5", n, dim, dtype="float32", clusters=4096, val=queries, seed=1)
    factory = choose_index_factory(n, dim, exact_max_rows=0)  # the rule's choice above EXACT_MAX_ROWS
    t = time.perf_counter()
    build_index(cache, WORK / "index" / "approx", index_factory=factory)
    t_build = time.perf_counter() - t
    build_index(cache, WORK / "index" / "exact", index_factory="Flat")
    from featcache.store.cache import open_cache

    with open_cache(cache) as c:
        q = c.load("val", "x")[0]
    approx = load_index(WORK / "index" / "approx")
    from featcache.retrieval.index import default_search_params

    faiss.ParameterSpace().set_index_parameters(approx.index, default_search_params(factory))
    exact = load_index(WORK / "index" / "exact")
    t = time.perf_counter()
    _, got = approx.search(q, 10)
    qps = len(q) / (time.perf_counter() - t)
    _, want = exact.search(q, 10)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)]))
    size = (WORK / "index" / "approx" / "index.faiss").stat().st_size
    return [Row(f"index {n}x{dim} {factory}: recall@10 vs exact, {queries} queries", recall, ">= 0.95",
                recall >= 0.95, f"build {t_build:.0f} s, {qps:.0f} queries/s, {size / 1e6:.0f} MB")]


def knn_crossover(sizes=(20_000, 100_000, 400_000, 1_000_000), dim: int = 768, queries: int = 1000) -> list[Row]:
    """The knn head's search on the CPU, torch blocks against the FAISS index, by training rows:
    where the ratio passes 1 is where ``KNN_INDEX_ROWS`` belongs (also for memory: the torch path
    holds a batch_size x n_train block)."""
    import featcache.heads.neighbors as neighbors
    from featcache.heads import make_head

    rows, default = [], neighbors.KNN_INDEX_ROWS
    rng = np.random.default_rng(3)
    for n in sizes:
        X = rng.normal(0, 1, (n, dim)).astype(np.float32)
        y = rng.integers(0, 10, n)
        q = rng.normal(0, 1, (queries, dim)).astype(np.float32)
        times = {}
        for name, limit in (("torch", 1 << 62), ("faiss", 0)):
            neighbors.KNN_INDEX_ROWS = limit
            head = make_head("knn", k=20, device="cpu").fit(X, y)
            t = time.perf_counter()
            head.predict_proba(q)  # the first call builds the index: counted
            times[name] = time.perf_counter() - t
        ratio = times["torch"] / times["faiss"]
        rows.append(Row(f"knn head, {n}x{dim} train rows, {queries} queries: torch / faiss seconds", ratio,
                        f">= 1 where n >= KNN_INDEX_ROWS ({default})", (ratio >= 1) == (n >= default),
                        f"torch {times['torch']:.2f} s, faiss {times['faiss']:.2f} s"))
    neighbors.KNN_INDEX_ROWS = default
    return rows


def leaks_speed(n: int = 100_000, dim: int = 1280) -> list[Row]:
    from featcache.retrieval import find_leaks

    cache = synthetic_cache(WORK / "leaks" / "big.h5", n - n // 10, dim, val=n // 10, seed=2)
    t = time.perf_counter()
    find_leaks(cache)
    s = time.perf_counter() - t
    return [Row(f"leaks on {n}x{dim} float16 (train {n - n // 10}, val {n // 10}): 60 s / seconds", 60 / s,
                ">= 1 (under 60 s)", s <= 60, f"{s:.1f} s")]


TRANSFORMS = ("exact", "reencode-q70", "resize-80", "flip")


def _copy(data: bytes, kind: str) -> bytes:
    from PIL import Image, ImageOps

    if kind == "exact":
        return data
    im = Image.open(io.BytesIO(data)).convert("RGB")
    if kind == "resize-80":
        im = im.resize((max(1, im.width * 4 // 5), max(1, im.height * 4 // 5)), Image.BICUBIC)
    elif kind == "flip":
        im = ImageOps.mirror(im)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=70 if kind == "reencode-q70" else 90)
    return buf.getvalue()


def injected_copies(data: Path, out: Path, *, every: int = 4) -> tuple[Path, dict[str, str]]:
    """The real data's train split as train, and as val copies of every ``every``-th train image
    under other names (one transform each, in turn) plus the real val images. Returns the folder and
    {val copy id: train id}."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(data / "train", out / "train")
    shutil.copytree(data / "val", out / "val")
    truth = {}
    for i, f in enumerate(sorted((out / "train").rglob("*.jpg"))[::every]):
        kind = TRANSFORMS[i % len(TRANSFORMS)]
        rel = f.relative_to(out / "train")
        dest = out / "val" / rel.parent / f"copy{i:04d}-{kind}.jpg"
        dest.write_bytes(_copy(f.read_bytes(), kind))
        truth[str(dest.relative_to(out))] = str(f.relative_to(out))
    return out, truth


def threshold_measurement(backbone: str = "efficientnet_lite0") -> list[Row]:
    from featcache import extract, open_cache
    from featcache.retrieval import find_leaks
    from featcache.retrieval.leaks import normalised

    folder, truth = injected_copies(require_real_data(), WORK / "leaks" / "injected")
    res = extract(str(folder), backbone=backbone, cache_dir=str(WORK / "leaks" / "cache"), dtype="float32",
                  precision="fp32")
    with open_cache(res.cache) as c:
        ids = {s: c.ids(s) for s in c.splits}
        f = {s: normalised(c.load(s)[0]) for s in c.splits}
    where = {("train", i): r for r, i in enumerate(ids["train"])}
    copies = {i: r for r, i in enumerate(ids["val"])}
    by_kind: dict[str, list[float]] = {k: [] for k in TRANSFORMS}
    for copy, orig in truth.items():
        cos = float(f["val"][copies[copy]] @ f["train"][where[("train", orig)]])
        by_kind[next(k for k in TRANSFORMS if k in copy)].append(cos)
    sims = f["train"] @ f["train"].T
    np.fill_diagonal(sims, -1)
    distinct = float(sims.max())
    rep = find_leaks(res.cache)
    found = {(p["a"]["id"], p["b"]["id"]) for p in rep.near} | {
        (r["id"], q["id"]) for g in rep.exact for r in g["rows"] for q in g["rows"]}
    missed = [k for k, v in truth.items() if (k, v) not in found]
    lows = {k: min(v) for k, v in by_kind.items() if v}
    detail = (", ".join(f"{k} min {v:.3f}" for k, v in lows.items())
              + f"; most similar distinct train pair {distinct:.3f}")
    return [Row(f"{backbone}: injected copies found by leaks at its default threshold ({rep.threshold:g})",
                1 - len(missed) / len(truth), "1.00 (all found)", not missed, detail + f"; missed {missed[:5]}")]


def run() -> list[Row]:
    return threshold_measurement() + leaks_speed() + export_speed() + index_recall() + knn_crossover()
