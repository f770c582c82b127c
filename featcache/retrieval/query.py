"""``search``: the nearest indexed rows of query images (embedded exactly as the index's cache was)
or of rows already in that cache (by id)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import BackboneError, CacheError, ConfigError, SourceError
from ..sources import IMAGE_EXTENSIONS, FileSource, SampleRef, Source, display_path, open_source
from ..store.cache import open_cache
from ..common.validation import check_int
from .index import FeatureIndex, load_index

log = logging.getLogger(__name__)

#: Fingerprint fields a query's features must share with the index's: anything else changes the
#: vectors, so neighbours would be meaningless.
SAME = ("backbone", "preprocess", "pool", "fold_bn", "dtype", "compile", "decode")


class QueryFiles(FileSource):
    """Image files (given, or found under folders) as one ``query`` split."""

    kind = "files"

    def __init__(self, paths: list[str]) -> None:
        files = []
        for p in map(Path, paths):
            if p.is_dir():
                files += [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                          and not f.name.startswith(".")]
            elif p.is_file():
                files.append(p)
            else:
                raise SourceError(f"Query '{p}' does not exist. Pass image files, a folder or a source spec.")
        if not files:
            raise SourceError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, paths))}.")
        super().__init__(spec=",".join(display_path(str(p)) for p in paths), classes=["query"])
        self.root = Path(".")
        self.splits = {"query": [SampleRef(display_path(str(f)), 0, str(f)) for f in files]}


def query_source(query: str | os.PathLike | list) -> Source:
    """Image files and folders of images become :class:`QueryFiles`; any other spec (a ``.csv``
    manifest, a ``.npz`` file, ``digits``, ``KIND:PATH``) opens as a source, all its splits queried."""
    items = [os.fspath(q) for q in (query if isinstance(query, (list, tuple)) else [query])]
    if all(os.path.isdir(q) or (os.path.isfile(q) and q.lower().endswith(IMAGE_EXTENSIONS)) for q in items):
        return QueryFiles(items)
    if len(items) != 1:
        raise SourceError(f"Pass either image files and folders or one source spec as the query. Got {items}.")
    return open_source(items[0])


def embed_query(ix: FeatureIndex, query, *, device: str = "auto", weights: str | None = None,
                batch_size: int | None = None) -> tuple[list[str], np.ndarray]:
    """Names and features (n, ...) of query images, extracted with the index's backbone, weights,
    preprocessing, layer, pooling and dtype; refused when the rebuilt backbone differs."""
    from ..common.devices import resolve_device, runnable_precision
    from ..extraction.pipeline import extract

    fp, cfg = ix.meta["fingerprint"], ix.meta.get("extract_config") or {}
    precision, why = runnable_precision(fp["precision"], resolve_device(device))
    if why:
        log.warning("the index's features were extracted at %s; %s", fp["precision"], why)
    src = query_source(query)
    with tempfile.TemporaryDirectory(prefix="featcache-query-") as tmp:
        res = extract(src, backbone=cfg.get("backbone") or fp["backbone"]["name"],
                      weights=weights or cfg.get("weights"), layers=(ix.meta["layer"],), pool=fp["pool"],
                      dtype=fp["dtype"], precision=precision, channels_last=fp["channels_last"],
                      input_size=cfg.get("input_size"), mean=tuple(cfg["mean"]) if cfg.get("mean") else None,
                      std=tuple(cfg["std"]) if cfg.get("std") else None, fold_bn=bool(fp.get("fold_bn")),
                      compile=bool(fp.get("compile")), decode_on_device=fp.get("decode", "pil") != "pil",
                      device=device, batch_size=batch_size, cache_dir=tmp, num_workers=0)
        with open_cache(res.cache) as q:
            check_same_embedding(ix.meta["fingerprint"], q.fingerprint)
            names, feats = [], []
            for s in q.splits:
                names += q.ids(s)
                feats.append(q.load(s, ix.meta["layer"])[0])
            for f in q.failed:
                log.warning("query %s could not be read: %s", f["id"], f["reason"])
    return names, np.concatenate(feats) if feats else np.zeros((0, ix.meta["dim"]), np.float32)


def check_same_embedding(indexed: dict, query: dict) -> None:
    """Refuse query features made otherwise than the indexed ones (other weights, preprocessing, ...)."""
    for key in SAME:
        a, b = indexed.get(key), query.get(key)
        if a != b and not (key in ("compile", "decode", "fold_bn") and {a, b} <= {None, False, "pil"}):
            what = {"backbone": "backbone or its weights", "preprocess": "preprocessing"}.get(key, key)
            raise BackboneError(
                f"The query images were embedded with another {what} than the index ({key}: {_short(b)} vs the "
                f"index's {_short(a)}). Pass the weights file the index's cache was extracted with (the 'weights' "
                f"option), or re-extract the cache and rebuild the index."
            )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def rows_by_id(ix: FeatureIndex, ids: list[str]) -> np.ndarray:
    """Features (n, ...) of rows already in the index's cache, by id (any split)."""
    path = ix.meta["cache"]
    with open_cache(path) as c:
        if c.text_attr("fingerprint_hash") != ix.meta.get("fingerprint_hash"):
            raise CacheError(f"Cache '{path}' changed since index '{ix.path}' was built (its fingerprint differs). "
                             f"Rebuild the index with 'featcache index'.")
        where = {}
        for s in reversed(c.splits):  # the first split wins when an id is in several
            where.update({i: (s, r) for r, i in enumerate(c.ids(s))})
        missing = [i for i in ids if i not in where]
        if missing:
            more = f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConfigError(f"Id {missing[0]!r} is not in cache '{path}'{more}. Ids are the paths relative to the "
                              f"source (see 'featcache export-features').")
        layer = ix.meta["layer"]
        return np.stack([c.rows(*where[i], where[i][1] + 1, layer).features[layer][0] for i in ids]) \
            if ids else np.zeros((0, ix.meta["dim"]), np.float32)


def search(index: str | os.PathLike | FeatureIndex, query, *, k: int = 10, by_id: bool = False,
           device: str = "auto", weights: str | None = None, batch_size: int | None = None) -> list[dict]:
    """The ``k`` nearest indexed rows of each query.

    Parameters
    ----------
    index : path or FeatureIndex
        A folder written by :func:`~featcache.retrieval.index.build_index`.
    query : str, path or list of them
        Image files, folders of images or one source spec (embedded with the index's backbone,
        preprocessing and layer); with ``by_id``, ids of rows in the index's cache.
    k : int
    by_id : bool

    Returns
    -------
    list of dict
        Per query ``{"query", "neighbors": [{"rank", "id", "split", "label", "class", "score"}, ...]}``;
        ``score`` is the cosine similarity (metric cosine) or the squared L2 distance (metric l2).
    """
    check_int("k", k)
    ix = index if isinstance(index, FeatureIndex) else load_index(index)
    if by_id:
        names = [os.fspath(q) for q in (query if isinstance(query, (list, tuple)) else [query])]
        x = rows_by_id(ix, names)
    else:
        names, x = embed_query(ix, query, device=device, weights=weights, batch_size=batch_size)
    if not len(names):
        return []
    scores, pos = ix.search(x, k)
    out = []
    for name, sc, ps in zip(names, scores, pos):
        hits = [{"rank": r + 1, "id": ix.ids[p], "split": ix.splits[p], "label": int(ix.labels[p]),
                 "class": ix.classes[int(ix.labels[p])], "score": float(s)}
                for r, (s, p) in enumerate(zip(sc, ps)) if p >= 0]
        out.append({"query": name, "neighbors": hits})
    return out
