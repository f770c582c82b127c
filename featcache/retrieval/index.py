"""A FAISS index of a cache's features, with the ids, labels and cache fingerprint beside it.

An index is a folder::

    INDEX/index.faiss    the FAISS index (row i of the index is row i of rows.parquet)
    INDEX/rows.parquet   split, row, id, label of each indexed vector
    INDEX/index.json     cache, fingerprint, extraction options, classes, layer, metric, factory,
                         search parameters (written last: an index without it is unfinished)

Which index: exact (``Flat``: ``IndexFlatIP`` for cosine, ``IndexFlatL2`` for l2) up to
:data:`EXACT_MAX_ROWS` rows; above, :func:`choose_index_factory`'s size rule, after autofaiss's
``get_optimal_index_keys_v2``: an IVF index with about 4 sqrt(n) lists (a power of two) and an HNSW
coarse quantizer, scalar-quantised (``SQ8``, 1 byte per dimension) up to 100M rows and product-
quantised (``PQ``) above. ``index_factory`` overrides the rule. Cosine is inner product on
L2-normalised vectors (queries normalised the same way).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CacheError, ConfigError
from ..exports.base import require
from ..common.files import atomic_write, write_json
from ..store.cache import FeatureCache, open_cache
from ..common.validation import check_choice, check_int

log = logging.getLogger(__name__)

METRICS = ("cosine", "l2")
#: Up to this many rows the index is exact (a flat scan of 1M x 768 float32 is 3 GB and answers a
#: query in tens of milliseconds on a multi-core CPU, so an approximation buys little below it).
EXACT_MAX_ROWS = 1_000_000
#: Above this, vectors are product-quantised instead of scalar-quantised (1 byte per dimension).
SQ_MAX_ROWS = 100_000_000
#: Rows of features read from the store at a time are about this many bytes.
BLOCK_BYTES = 64 << 20
#: Training vectors per IVF list (FAISS asks for 39 at least and warns below).
TRAIN_PER_LIST = 64
INDEX_FILE, ROWS_FILE, META_FILE = "index.faiss", "rows.parquet", "index.json"


def n_lists(n: int) -> int:
    """IVF lists for ``n`` vectors: the power of two nearest 4 sqrt(n) (autofaiss), at most n / 39
    so each list can be trained."""
    want = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return int(max(1, min(want, n // 39, 1 << 18)))


def choose_index_factory(n: int, dim: int, *, exact_max_rows: int = EXACT_MAX_ROWS) -> str:
    """The FAISS factory string the size rule picks for ``n`` vectors of ``dim`` dimensions."""
    if n <= exact_max_rows:
        return "Flat"
    lists = n_lists(n)
    if n <= SQ_MAX_ROWS:
        return f"IVF{lists}_HNSW32,SQ8"
    m = max(d for d in range(1, min(64, dim) + 1) if dim % d == 0)
    return f"IVF{lists}_HNSW32,PQ{m}x8"


def default_search_params(factory: str) -> str:
    """FAISS ``ParameterSpace`` settings for searching an index of ``factory``: IVF probes 1/32 of its
    lists (at least 16), HNSW explores 128 candidates."""
    params = []
    for token in factory.replace(",", "_").split("_"):
        if token.startswith("IVF") and token[3:].isdigit():
            lists = int(token[3:])
            params.append(f"nprobe={min(lists, max(16, lists // 32))}")
    if "HNSW" in factory:
        params.append("efSearch=128")
    return ",".join(params)


@dataclass
class FeatureIndex:
    """A loaded index folder: the FAISS index, its rows and its metadata (:func:`load_index`)."""

    path: Path
    index: object
    meta: dict
    splits: list[str]
    rows: np.ndarray
    ids: list[str]
    labels: np.ndarray

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and positions (n_queries, k) of the nearest indexed rows of ``x``; -1 where fewer."""
        x = prepare_vectors(x, self.meta["metric"])
        scores, pos = self.index.search(x, min(k, self.index.ntotal))
        return scores, pos


def prepare_vectors(x: np.ndarray, metric: str) -> np.ndarray:
    """Contiguous float32 (n, dim); L2-normalised for cosine (zero vectors stay zero)."""
    x = np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norms > 0, norms, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def build_index(cache: str | os.PathLike | FeatureCache, out: str | os.PathLike, *, layer: str | None = None,
                split: str = "train", metric: str = "cosine", index_factory: str | None = None,
                exact_max_rows: int = EXACT_MAX_ROWS, progress: Callable[[int, int], None] | None = None) -> dict:
    """Index one split of a cache (or ``split="all"``: every split) with FAISS.

    Parameters
    ----------
    cache : path or FeatureCache
    out : path
        The index folder (see the module docstring); an index already there is replaced.
    layer : str, optional
        Cached layer (default: the first); spatial features are flattened.
    split : str
        A split of the cache, or ``"all"``.
    metric : {"cosine", "l2"}
    index_factory : str, optional
        A FAISS factory string (``"Flat"``, ``"HNSW32"``, ``"IVF4096,PQ64x8"``); default: the size rule.
    exact_max_rows : int
        Up to this many rows the rule picks an exact index.

    Returns
    -------
    dict
        The index's ``index.json`` (path under ``"index"``).
    """
    faiss = require("faiss", "index", "Building an index")
    pa = require("pyarrow", "index", "Building an index")
    pq = require("pyarrow.parquet", "index", "Building an index")
    check_choice("metric", metric, METRICS)
    check_int("exact_max_rows", exact_max_rows, minimum=0)
    own = not isinstance(cache, FeatureCache)
    c = open_cache(cache) if own else cache
    try:
        layer = c.resolve_layer(layer)
        splits = list(c.splits) if split == "all" else [split]
        sizes = {s: c.n(s) for s in splits}
        n = sum(sizes.values())
        if n == 0:
            raise CacheError(f"Split '{split}' of cache '{c.path.name}' has no rows to index. Pick another split "
                             f"(the 'split' option) or 'all'.")
        shape = tuple(int(v) for v in c.features(splits[0], layer).shape[1:])
        dim = int(np.prod(shape))
        factory = index_factory or choose_index_factory(n, dim, exact_max_rows=exact_max_rows)
        index = _new_index(faiss, factory, dim, metric)
        if not index.is_trained:
            index.train(_training_sample(c, splits, layer, sizes, metric, factory))
        block = max(1, BLOCK_BYTES // max(1, dim * 4))
        done, ids, labels, which, rows = 0, [], [], [], []
        for s in splits:
            for start in range(0, sizes[s], block):
                r = c.rows(s, start, min(sizes[s], start + block), layer)
                index.add(prepare_vectors(r.features[layer], metric))
                ids += r.ids
                labels.append(r.labels)
                which += [s] * len(r.ids)
                rows.append(np.arange(start, start + len(r.ids), dtype=np.int64))
                done += len(r.ids)
                if progress:
                    progress(done, n)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / META_FILE).unlink(missing_ok=True)  # the folder is unfinished until index.json is back
        atomic_write(out / INDEX_FILE, lambda tmp: faiss.write_index(index, tmp))
        table = pa.table({"split": pa.array(which, pa.string()), "row": pa.array(np.concatenate(rows), pa.int64()),
                          "id": pa.array(ids, pa.string()), "label": pa.array(np.concatenate(labels), pa.int64())})
        atomic_write(out / ROWS_FILE, lambda tmp: pq.write_table(table, tmp))
        meta = {"format": "featcache-index", "version": 1, "cache": str(c.path),
                "fingerprint_hash": c.text_attr("fingerprint_hash"), "fingerprint": c.fingerprint,
                "extract_config": c.extract_config, "classes": c.classes, "layer": layer, "shape": list(shape),
                "dim": dim, "metric": metric, "index_factory": factory, "exact": factory == "Flat",
                "search_params": "" if index_factory else default_search_params(factory),
                "splits": sizes, "n": n, "bytes": (out / INDEX_FILE).stat().st_size}
        write_json(out / META_FILE, meta)
        return {"index": str(out), **meta}
    finally:
        if own:
            c.close()


def _new_index(faiss, factory: str, dim: int, metric: str):
    kind = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    try:
        return faiss.index_factory(dim, factory, kind)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConfigError(f"The 'index_factory' option {factory!r} is not a FAISS factory string FAISS can build for "
                          f"{dim} dimensions ({first}). Try 'Flat', 'HNSW32' or 'IVF1024,SQ8'.") from None


def _training_sample(c: FeatureCache, splits: list[str], layer: str, sizes: dict, metric: str,
                     factory: str) -> np.ndarray:
    """A seeded sample of rows (spread over the splits in proportion) to train the quantisers on."""
    n = sum(sizes.values())
    lists = max([int(t[3:]) for t in factory.replace(",", "_").split("_") if t.startswith("IVF") and t[3:].isdigit()]
                or [256])
    want = min(n, max(TRAIN_PER_LIST * lists, 10_000))
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(n, size=want, replace=False))
    parts, offset = [], 0
    for s in splits:
        mine = pick[(pick >= offset) & (pick < offset + sizes[s])] - offset
        offset += sizes[s]
        ds = c.features(s, layer)
        for i in range(0, len(mine), 4096):  # h5py reads increasing index lists
            parts.append(prepare_vectors(ds[mine[i:i + 4096]], metric))
    return np.concatenate(parts)


def memory_index(x: np.ndarray, *, metric: str = "cosine", exact_max_rows: int | None = None):
    """A FAISS index of the rows of ``x`` (n, dim), held in memory, by the same size rule as
    :func:`build_index` (exact up to ``exact_max_rows``, default :data:`EXACT_MAX_ROWS`), with its
    search parameters set; for cosine, ``x`` and the queries must be L2-normalised."""
    faiss = require("faiss", "index", "A FAISS index")
    x = prepare_vectors(x, "l2")  # float32, contiguous; normalised by the caller for cosine
    factory = choose_index_factory(len(x), x.shape[1],
                                   exact_max_rows=EXACT_MAX_ROWS if exact_max_rows is None else exact_max_rows)
    index = _new_index(faiss, factory, x.shape[1], metric)
    if not index.is_trained:
        lists = n_lists(len(x))
        sample = np.random.default_rng(0).choice(len(x), size=min(len(x), max(TRAIN_PER_LIST * lists, 10_000)),
                                                 replace=False)
        index.train(x[np.sort(sample)])
    index.add(x)
    if default_search_params(factory):
        faiss.ParameterSpace().set_index_parameters(index, default_search_params(factory))
    return index


def load_index(path: str | os.PathLike) -> FeatureIndex:
    """Open an index folder written by :func:`build_index`."""
    faiss = require("faiss", "index", "Searching an index")
    pq = require("pyarrow.parquet", "index", "Searching an index")
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CacheError(f"'{path}' is not a finished featcache index (no readable {META_FILE}). "
                         f"Build it with 'featcache index CACHE -o {path}'.") from None
    if not isinstance(meta, dict) or meta.get("format") != "featcache-index":
        raise CacheError(f"'{path / META_FILE}' is not a featcache index description. Rebuild the index.")
    try:
        index = faiss.read_index(str(path / INDEX_FILE))
        table = pq.read_table(path / ROWS_FILE)
    except (OSError, RuntimeError, ValueError) as e:
        raise CacheError(f"Index '{path}' is damaged ({type(e).__name__}). Rebuild it with 'featcache index'.") \
            from None
    if index.ntotal != meta.get("n") or table.num_rows != index.ntotal:
        raise CacheError(f"Index '{path}' holds {index.ntotal} vectors and {table.num_rows} rows; its {META_FILE} "
                         f"says {meta.get('n')}. Rebuild it with 'featcache index'.")
    if meta.get("search_params"):
        faiss.ParameterSpace().set_index_parameters(index, meta["search_params"])
    return FeatureIndex(path, index, meta, table.column("split").to_pylist(),
                        table.column("row").to_numpy(), table.column("id").to_pylist(),
                        table.column("label").to_numpy())
