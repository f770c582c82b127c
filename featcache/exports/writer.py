"""``export_features``: a cache's vectors and row metadata out, split by split, in numbered parts of
a bounded number of rows, in a registered format (:data:`~featcache.exports.base.FORMATS`).

Streaming: rows are read from the store in blocks of about :data:`BLOCK_BYTES`, so memory does not
grow with the cache. Rerun-safe: each part is written atomically and recorded in the split's
``featcache-export.json`` as it finishes; a rerun with the same cache file (size and modification
time), layer, dtype, format and part size keeps the parts already written, and any other rerun starts the split afresh, removing the
parts of the previous export (also those of the other format).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import CacheError
from ..common.files import write_json
from ..store.cache import FeatureCache, open_cache
from ..common.validation import check_choice, check_int
from .base import FORMATS, META_COLUMNS, Block, Part, require
from .parquet import EMBEDDING_COLUMN

log = logging.getLogger(__name__)

MANIFEST = "featcache-export.json"
#: Rows per part by default: parts of about 256 MiB (embedding-reader reads a part's rows in pieces).
PART_BYTES = 256 << 20
#: Bytes of features read from the store at a time.
BLOCK_BYTES = 32 << 20
DTYPES = ("float16", "float32")
_PART_FILE = re.compile(r"^\d{4,}\.(npy|parquet)$")


def export_features(cache: str | os.PathLike | FeatureCache, out: str | os.PathLike, *, layer: str | None = None,
                    splits: list[str] | tuple[str, ...] | None = None, format: str = "npy",
                    dtype: str | None = None, part_rows: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """Write a cache's features and row metadata for other tools (embedding-reader, autofaiss, pandas).

    Parameters
    ----------
    cache : path or FeatureCache
    out : path
        Folder; each split goes to ``OUT/SPLIT/`` (``embeddings/NNNN.npy`` + ``metadata/NNNN.parquet``
        for ``npy``, ``embeddings/NNNN.parquet`` for ``parquet``).
    layer : str, optional
        Cached layer (default: the first). Spatial features are flattened to one vector per row.
    splits : list of str, optional
        Default: every split of the cache.
    format : {"npy", "parquet"}
    dtype : {"float16", "float32"}, optional
        Default: the cache's dtype.
    part_rows : int, optional
        Rows per part (default: parts of about 256 MiB).
    progress : callable(done, total), optional
        Called after each part with rows written (or kept) and rows to export.

    Returns
    -------
    dict
        ``{"out", "format", "layer", "dtype", "splits": {split: {"rows", "parts", "kept", "dim"}}}``.
    """
    check_choice("format", format, FORMATS.names())
    if dtype is not None:
        check_choice("dtype", dtype, DTYPES)
    if part_rows is not None:
        check_int("part_rows", part_rows)
    require("pyarrow", "export", "Exporting features")
    fmt = FORMATS.get(format)()
    own = not isinstance(cache, FeatureCache)
    c = open_cache(cache) if own else cache
    try:
        layer = c.resolve_layer(layer)
        splits = list(splits) if splits else list(c.splits)
        for s in splits:
            c.n(s)  # unknown split: the store's error names the splits there are
        out = Path(out)
        total, done = sum(c.n(s) for s in splits), 0
        report = {"out": str(out), "format": format, "layer": layer, "splits": {}}
        for split in splits:
            def tick(rows: int) -> None:
                nonlocal done
                done += rows
                if progress:
                    progress(done, total)

            report["splits"][split] = _export_split(c, out / split, fmt, split, layer, dtype, part_rows, tick)
        report["dtype"] = dtype or str(np.dtype(c.fingerprint.get("dtype", "float32")))
        return report
    finally:
        if own:
            c.close()


def _export_split(c: FeatureCache, split_dir: Path, fmt, split: str, layer: str, dtype: str | None,
                  part_rows: int | None, tick: Callable[[int], None]) -> dict:
    ds = c.features(split, layer)
    n, shape = int(ds.shape[0]), tuple(int(v) for v in ds.shape[1:])
    dim = int(np.prod(shape))
    out_dtype = np.dtype(dtype or ds.dtype)
    rows = part_rows or max(1, PART_BYTES // max(1, dim * out_dtype.itemsize))
    n_parts = -(-n // rows)
    width = max(4, len(str(max(n_parts - 1, 0))))
    key = {"cache_fingerprint_hash": c.text_attr("fingerprint_hash"), "layer": layer, "dtype": out_dtype.name,
           "format": fmt.name, "part_rows": rows, "rows": n, "cache_file": _file_identity(c.path)}
    split_dir.mkdir(parents=True, exist_ok=True)
    old = _read_manifest(split_dir)
    kept = {p["name"] for p in old.get("parts", [])} if old.get("key") == key else set()
    if not kept:
        _remove_parts(split_dir)
    manifest = {"format": "featcache-features-export", "version": 1, "key": key, "cache": str(c.path),
                "fingerprint": c.fingerprint, "classes": c.classes, "split": split, "shape": list(shape),
                "dim": dim, "layout": fmt.name, "folders": list(fmt.folders), "columns": _columns(fmt.name),
                "parts": [], "complete": False}
    block = max(1, BLOCK_BYTES // max(1, dim * ds.dtype.itemsize))
    for folder in fmt.folders:
        (split_dir / folder).mkdir(exist_ok=True)
    reused = 0
    for i in range(n_parts):
        start, stop = i * rows, min(n, (i + 1) * rows)
        name = f"{i:0{width}d}"
        if name in kept and all(f.is_file() for f in fmt.files(split_dir, name)):
            reused += 1
        else:
            part = Part(name, start, stop, dim, out_dtype, split, tuple(c.classes), c.fingerprint.get("source", {}),
                        _reader(c, split, layer, start, stop, block, dim, out_dtype))
            fmt.write_part(split_dir, part)
        manifest["parts"].append({"name": name, "start": start, "rows": stop - start})
        write_json(split_dir / MANIFEST, manifest)
        tick(stop - start)
    manifest["complete"] = True
    write_json(split_dir / MANIFEST, manifest)
    if reused:
        log.info("%s: kept %d of %d parts from the previous export", split, reused, n_parts)
    return {"rows": n, "parts": n_parts, "kept": reused, "dim": dim, "dtype": out_dtype.name, "dir": str(split_dir)}


def _reader(c: FeatureCache, split: str, layer: str, start: int, stop: int, block: int, dim: int,
            dtype: np.dtype) -> Callable[[], Iterator[Block]]:
    def read() -> Iterator[Block]:
        for s in range(start, stop, block):
            r = c.rows(split, s, min(stop, s + block), layer)
            x = r.features[layer].reshape(len(r.labels), dim)
            yield Block(x.astype(dtype, copy=False), r.labels, r.ids, s)

    return read


def _file_identity(path: Path) -> list[int]:
    """Size and modification time of the cache file: a cache is replaced, never rewritten in place,
    so a re-extraction (other images under the same fingerprint) is another export."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _columns(fmt: str) -> list[str]:
    return ([EMBEDDING_COLUMN] if fmt == "parquet" else []) + list(META_COLUMNS)


def _read_manifest(split_dir: Path) -> dict:
    try:
        d = json.loads((split_dir / MANIFEST).read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _remove_parts(split_dir: Path) -> None:
    """The parts of a previous export (of any format): only files named like parts are touched."""
    for folder in ("embeddings", "metadata"):
        d = split_dir / folder
        if not d.is_dir():
            continue
        for f in d.iterdir():
            if f.is_file() and _PART_FILE.match(f.name):
                f.unlink()
        if not any(d.iterdir()):
            d.rmdir()
    (split_dir / MANIFEST).unlink(missing_ok=True)


def read_manifest(split_dir: str | os.PathLike) -> dict:
    """The manifest of an exported split (raises :class:`CacheError` when absent or unfinished)."""
    d = _read_manifest(Path(split_dir))
    if not d:
        raise CacheError(f"'{split_dir}' holds no featcache export ({MANIFEST} is missing). "
                         f"Run 'featcache export-features'.")
    if not d.get("complete"):
        raise CacheError(f"The export in '{split_dir}' is unfinished. Run the same 'featcache export-features' "
                         f"command again to complete it.")
    return d


