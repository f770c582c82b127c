"""Concatenating cache files into one: the cache of a sharded extraction, made from its shard files
(:mod:`featcache.extraction.shards` decides which files and checks they belong together).

The per-sample arrays (labels, ids, hashes, stat, batch sizes) and the failed samples are copied;
features and views are either copied into one self-contained file or presented in place, as HDF5
virtual datasets that name the other files relative to the new one (keep the files together).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import CacheError
from .cache import FeatureCache
from .writer import CacheWriter

#: Root attributes of the first file that the concatenation carries over as they are stored.
KEPT_ATTRS = ("fingerprint", "fingerprint_hash", "classes", "layers", "extract_config", "notes")
#: Rows copied at a time.
COPY_ROWS = 4096


def concat_caches(final: str | Path, caches: Sequence[FeatureCache], *, virtual: bool = False,
                  attrs: dict | None = None) -> Path:
    """Write the cache ``final`` holding the rows of ``caches``, one after another, split by split.

    Parameters
    ----------
    final : path
        The file to write (through :class:`~featcache.store.writer.CacheWriter`: a temporary name,
        then renamed). Call it while holding its :class:`~featcache.store.writer.CacheLock`.
    caches : sequence of FeatureCache
        Open caches of one fingerprint, with the same layers (the caller checks that they belong
        together). Their splits are those of the first, then any new ones of the others in order.
        The fingerprint, classes, layers, extraction options and notes are those of the first.
    virtual : bool, default=False
        Present the features (and views) of ``caches`` in place instead of copying them: the files
        must stay in ``final``'s folder under their names. Such a file has checksums only if all of
        them do.
    attrs : dict, optional
        More root attributes of ``final`` (strings stored as UTF-8). ``timings`` defaults to
        ``{"parts": [timings of each cache]}``.

    Returns
    -------
    Path
        ``final``.
    """
    final = Path(final)
    if not caches:
        raise CacheError(f"Nothing to write into '{final.name}': no cache files were given.")
    if virtual:
        away = [c.path.name for c in caches if c.path.parent.resolve() != final.parent.resolve()]
        if away:
            raise CacheError(f"Cannot present {', '.join(away)} in '{final}': a cache presents only files in its "
                             f"own folder. Move them there, or copy their data (featcache merge --copy).")
    first = caches[0]
    kept = {k: first._h5.attrs[k] for k in KEPT_ATTRS if k in first._h5.attrs}
    splits = list(first.splits)
    for c in caches[1:]:
        splits += [s for s in c.splits if s not in splits]
    with CacheWriter(final, **kept) as w:
        if virtual and not all(c.checksums for c in caches):  # it presents their data as it is
            w.set_attrs(checksums="none")
        w.set_attrs(**{"timings": json.dumps({"parts": [c.timings for c in caches]}), **(attrs or {})})
        for split in splits:
            _concat_split(w, split, [c for c in caches if split in c.splits], first.layers, virtual=virtual)
        w.add_failed([x for c in caches for x in c.failed])
    return final


def _concat_split(w: CacheWriter, split: str, caches: list[FeatureCache], layers: list[str], *,
                  virtual: bool) -> None:
    """One split: per-sample arrays concatenated, features (and views) copied or presented in place."""
    batch_ns = [c.batch_n(split) for c in caches]
    w.add_split(split, labels=np.concatenate([c.labels(split) for c in caches]),
                ids=[i for c in caches for i in c.ids(split)],
                hashes=np.concatenate([c.hashes(split) for c in caches]),
                stat=np.concatenate([c.stat(split) for c in caches]).reshape(-1, 2),
                batch_n=np.concatenate(batch_ns) if all(b is not None for b in batch_ns) else None)
    total = sum(c.n(split) for c in caches)
    # A copied dataset is closed (its chunks written) once the next one is made: the order in which
    # featcache has always laid out a merged file's blocks.
    filled: tuple[str, bool] | None = None
    for views in ([False, True] if caches[0].has_views(split) else [False]):
        for layer in layers:
            dsets = [(c.views(split, layer) if views else c.features(split, layer)) for c in caches]
            shape = (total, *dsets[0].shape[1:])
            if virtual and total:
                w.add_virtual_features(split, layer, [(c.path.name, d.shape[0]) for c, d in zip(caches, dsets)],
                                       shape, dsets[0].dtype, views=views)
                continue
            w.add_features(split, layer, shape, dsets[0].dtype, views=views, chunks=dsets[0].chunks)
            if filled is not None:
                w.finish_features(split, filled[0], views=filled[1])
            filled = (layer, views)
            start = 0
            for d in dsets:
                for a in range(0, d.shape[0], COPY_ROWS):
                    w.write_rows(split, layer, start + a, d[a:a + COPY_ROWS], views=views)
                start += d.shape[0]
    if filled is not None:
        w.finish_features(split, filled[0], views=filled[1])


__all__ = ["concat_caches"]
