"""Reuse: which planned rows earlier runs already computed, and which must go through the network.

Features come from the chunks of an interrupted run and from the previous cache of the same
fingerprint (:class:`Donors`), found by content hash or, for unchanged files, by (id, size,
mtime); a cache is a hit when it holds exactly the planned rows unchanged.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..backbones import weights_sha256_without_building
from ..errors import CacheDamagedError, CacheError, FeatcacheError, SourceError
from .loading import VIEW_SPLIT, Row, block_key, plan_rows
from .partial import PartialStore
from .options import BACKBONE_FACTS, ExtractConfig, ExtractResult
from .plan import Job, fingerprint
from ..sources import Source
from ..store.cache import FeatureCache, cache_file_name, cache_files, open_cache, read_text_attr

log = logging.getLogger(__name__)

def stat_key(id_: str, stat) -> str:
    """What finds a sample's hash without reading it: its id, size and mtime, as one string (a tuple
    of a string and two ints took twice the memory per sample)."""
    return f"{id_}\x1f{int(stat[0])}\x1f{int(stat[1])}"


def _put(index: dict, h: str, n: int, where: tuple[int, int]) -> None:
    """``index[h]``: ``(n, donor, row)`` while one batch size is known for ``h``, else ``{n: (donor,
    row)}`` (a dict per sample took 180 bytes more); the first place found for each size is kept."""
    found = index.get(h)
    if found is None:
        index[h] = (n, *where)
    elif isinstance(found, tuple):
        if found[0] != n:
            index[h] = {found[0]: found[1:], n: where}
    else:
        found.setdefault(n, where)


def _places(found) -> dict[int, tuple[int, int]]:
    return {found[0]: found[1:]} if isinstance(found, tuple) else found


class Donors:
    """Where already-computed features can be copied from: chunks of a partial run and the
    previous cache file of the same fingerprint. Indexed by content hash and by the size of the
    batch that computed the features (0: not recorded, by caches made before it was), and by
    (id, size, mtime) so unchanged files need no re-hashing. A loader returns
    ``(features per layer, views per layer or None)``.

    Features depend on the batch size in their last bits. Features computed under this run's
    ``--batch-size`` are reused only where they were computed in a batch of the size an
    uninterrupted run uses for them, so a run stays bit-identical to an uninterrupted one; those of
    runs with another ``--batch-size`` (or unrecorded) are reused as they are, to float rounding."""

    BLOCK = 4096

    def __init__(self, n_layers: int, batch_size: int = 0) -> None:
        self.n_layers = n_layers
        self.batch_size = batch_size
        #: Per donor: the --batch-size of the run that computed it (0: not recorded).
        self.batch_sizes: list[int] = []
        #: Per content hash, where its features are by batch size (see :func:`_put`).
        self.by_hash: dict[str, tuple | dict[int, tuple[int, int]]] = {}
        self.by_hash_views: dict[str, tuple | dict[int, tuple[int, int]]] = {}
        self.hash_by_stat: dict[str, str] = {}
        self.failed_by_stat: dict[str, str] = {}
        self.loaders: list[Callable[[], tuple[list[np.ndarray], list[np.ndarray] | None]]] = []

    def _index(self, d: int, hashes: list[str], offset: int, has_views: bool, batch_n) -> None:
        for j, h in enumerate(hashes):
            n = int(batch_n[j]) if batch_n is not None else 0
            _put(self.by_hash, h, n, (d, j + offset))
            if has_views:
                _put(self.by_hash_views, h, n, (d, j + offset))

    def add_partial(self, partial: PartialStore, seen: set[Path]) -> None:
        for path in partial.chunks():
            if path in seen:
                continue
            z = partial.verified_chunk(path, self.n_layers)
            if z is None:  # set aside; its batches are computed again (maybe into a chunk of this name)
                continue
            seen.add(path)
            with z:
                hashes = [h.decode() for h in z["hashes"]]
                has_views = "v0" in z.files
                batch_n = z["batch_n"]
                configured = int(z["batch_size"])
                for i, st, h in zip(z["ids"], z["stat"], hashes):
                    self.hash_by_stat[stat_key(str(i), st)] = h
                for i, r, st in zip(z["failed_ids"], z["failed_reasons"], z["failed_stat"]):
                    self.failed_by_stat[stat_key(str(i), st)] = str(r)
            d = len(self.loaders)
            self.loaders.append(lambda p=path: partial.read_chunk(p, self.n_layers))
            self.batch_sizes.append(configured)
            self._index(d, hashes, 0, has_views, batch_n)
        partial.warn_set_aside()

    def add_cache(self, cache: FeatureCache) -> None:
        """Index a finished cache's rows. Unless the whole file verified, each block of rows is read
        once first: rows whose chunks fail their checksum are not indexed, so they are computed
        again (a damaged split's per-sample arrays leave out the whole split)."""
        for split in cache.splits:
            try:
                hashes = [h.decode() for h in cache.hashes(split)]
                ids, stat, batch_n = cache.ids(split), cache.stat(split), cache.batch_n(split)
            except CacheDamagedError as e:
                log.warning("%s: its split '%s' is computed again.", e.detail, split)
                continue
            damaged = 0
            for start, end in self._intact_blocks(cache, split, len(hashes)):
                if end < 0:
                    damaged += -end - start
                    continue
                for i, st, h in zip(ids[start:end], stat[start:end], hashes[start:end]):
                    self.hash_by_stat[stat_key(i, st)] = h
                d = len(self.loaders)
                self.loaders.append(lambda s=split, a=start, b=end, v=cache.has_views(split): (
                    [cache.features(s, layer)[a:b] for layer in cache.layers],
                    [cache.views(s, layer)[a:b] for layer in cache.layers] if v else None))
                self.batch_sizes.append(int(cache.extract_config.get("batch_size") or 0))
                self._index(d, hashes[start:end], 0, cache.has_views(split),
                            None if batch_n is None else batch_n[start:end])
            if damaged:
                log.warning("Cache file '%s': %d row(s) of split '%s' fail their checksum; they are computed again.",
                            cache.path, damaged, split)
        for f in cache.failed:
            self.failed_by_stat[stat_key(f["id"], f["stat"])] = f["reason"]

    def _intact_blocks(self, cache: FeatureCache, split: str, n: int):
        """(start, end) of blocks of rows to index; (start, -end) of rows that fail their checksum,
        found to the chunk when a block does not read."""
        for start in range(0, n, self.BLOCK):
            end = min(start + self.BLOCK, n)
            if cache.verified or cache.readable(split, start, end):
                yield start, end
                continue
            step = min(c.chunks[0] if c.chunks else end - start for c in
                       [cache.features(split, layer) for layer in cache.layers])
            for a in range(start, end, step):
                b = min(a + step, end)
                yield (a, b) if cache.readable(split, a, b) else (a, -b)

    def lookup(self, h: str | None, with_views: bool, batch_n: int) -> tuple[int, int, int] | None:
        """(donor, row, batch size to record) of features to reuse for a row that an uninterrupted
        run computes in a batch of ``batch_n`` images (the size recorded is 0 where it differs)."""
        found = (self.by_hash_views if with_views else self.by_hash).get(h) if h is not None else None
        if not found:
            return None
        found = _places(found)
        if batch_n in found:
            return (*found[batch_n], batch_n)
        for n, (d, j) in found.items():
            if n == 0 or self.batch_sizes[d] != self.batch_size:
                return d, j, 0
        return None

    def __bool__(self) -> bool:
        return bool(self.by_hash or self.failed_by_stat)


def listing_matches(cache: FeatureCache, src: Source) -> bool:
    """True when the cache holds (or records as failed) exactly the source's samples by id and
    label, split by split; needs no file access beyond the listing."""
    failed: dict[str, set] = {}
    for f in cache.failed:
        failed.setdefault(f["split"], set()).add((f["id"], f.get("label", -1)))
    for split, refs in src.splits.items():
        have = set(zip(cache.ids(split), cache.labels(split).tolist())) if split in cache.splits else set()
        if have | failed.get(split, set()) != {(r.id, r.label) for r in refs}:
            return False
    return set(cache.splits) <= set(src.splits)


def is_hit_rows(cache: FeatureCache, plan: dict[str, list[Row]]) -> bool:
    """True when every planned row is in the cache (or its failed list) with the same label and
    (size, mtime), and, for rows whose content was hashed (``extract --verify``), the same content."""
    have: dict[tuple, bytes] = {}
    for split in cache.splits:
        for i, lab, st, h in zip(cache.ids(split), cache.labels(split), cache.stat(split), cache.hashes(split)):
            have[(split, i, int(lab), int(st[0]), int(st[1]))] = h
    failed = {(f["split"], f["id"], f["stat"]) for f in cache.failed}

    def unchanged(split: str, r: Row) -> bool:
        h = have.get((split, r.ref.id, r.ref.label, int(r.stat[0]), int(r.stat[1])))
        if h is not None:
            return not r.checked or (r.hash is not None and h.decode() == r.hash)
        return (split, r.ref.id, tuple(int(v) for v in r.stat)) in failed

    return all(unchanged(split, r) for split, rows in plan.items() for r in rows)


def is_hit(cache: FeatureCache, plan: dict[str, list[Row]]) -> bool:
    """True when the cache holds exactly the planned samples, unchanged (no hashing needed)."""
    n_have = sum(cache.n(s) for s in cache.splits) + len(cache.failed)
    return n_have == sum(len(rows) for rows in plan.values()) and is_hit_rows(cache, plan)


def rows_to_compute(src: Source, plan: dict[str, list[Row]], donors: Donors, *,
                     retry_failed: bool = False, views: int = 0, batch_size: int = 1) -> list[Row]:
    """Rows to run through the network: every row of each block (a batch of an uninterrupted run)
    where one row has no features computed in a batch of that block's size. Features depend on the
    batch size in their last bits, so reusing them only at equal sizes keeps every run bit-identical
    to an uninterrupted extraction of the current source."""
    todo = []
    for block in blocks(plan, batch_size).values():
        live, retry = [], []
        for r in block:
            key = stat_key(r.ref.id, r.stat)
            if key in donors.failed_by_stat:
                if retry_failed:  # --on-error fail: read it again so the run stops at it
                    retry.append(r)
                continue
            if not r.checked:  # unchanged size and mtime: taken as unchanged content (no --verify)
                r.hash = donors.hash_by_stat.get(key)
            if r.hash is None and donors and r.stat[0] >= 0 and not r.checked:
                # A new or changed file while features exist: its content may already be cached.
                try:
                    r.hash = src.read(r.ref)[1]
                except OSError:
                    r.hash = None
            live.append(r)
        if retry or any(donors.lookup(r.hash, views and r.split == VIEW_SPLIT, len(live)) is None for r in live):
            todo.extend(sorted(live + retry, key=lambda r: r.index))
    return todo


def blocks(plan: dict[str, list[Row]], batch_size: int) -> dict[tuple[str, int], list[Row]]:
    """The plan's rows by the batch an uninterrupted run computes them in."""
    out: dict[tuple[str, int], list[Row]] = {}
    for rows in plan.values():
        for r in rows:
            out.setdefault(block_key(r, batch_size), []).append(r)
    return out


# --- reusing a whole cache --------------------------------------------------------------------


def find_hit(job: Job, t0: float) -> ExtractResult | None:
    """The cache this extraction would reuse, found without building the backbone; None when
    there is none or it cannot be told without the network (then :func:`~.plan.build` builds it
    and decides, as it always did).

    A fingerprint is the backbone's own facts plus what the options, the source and this machine
    decide. The facts follow from the backbone options (:data:`~.options.BACKBONE_FACTS`) and the
    library versions, and a cache records both (``extract_config``, the fingerprint's versions and
    weights hash): a cache made with equal backbone options lends its facts, the fingerprint is
    derived from them by :func:`~.plan.fingerprint` as for a built backbone, and the cache is a
    hit only if its fingerprint and file name are exactly those and it holds every planned file
    unchanged.
    """
    config = job.config
    if config.shard is not None:  # shard files and their assembly keep their own checks
        return None
    wanted = config.backbone_facts()
    paths = [Path(config.output)] if config.output else cache_files(config.cache_dir)
    weights = None
    for path in paths:
        made_by = json_attr(path, "extract_config")
        if (made_by is None or {k: made_by.get(k) for k in BACKBONE_FACTS} != wanted
                or (made_by.get("weights") is None) != (config.weights is None)):
            continue
        if weights is None:  # hashed only once a cache made with these options exists (a first run never)
            try:
                weights = weights_sha256_without_building(job.spec)
            except FeatcacheError:
                return None  # the builder will say what is wrong
        known, weights_sha = weights
        if not known:
            return None
        recorded = json_attr(path, "fingerprint")
        if recorded is None or recorded.get("backbone", {}).get("weights_sha256") != weights_sha:
            continue
        try:
            fp = fingerprint(recorded["backbone"], recorded["layers"], recorded["preprocess"],
                              recorded.get("fold_bn", False), job)
        except (KeyError, TypeError):
            continue
        if fp.to_dict() != recorded or (config.output is None and path.name != cache_file_name(fp)):
            continue
        try:
            cache = open_cache(path)
        except CacheError:
            return None  # the full run sets it aside or says what is wrong
        with cache:
            if cache.fingerprint == recorded:
                try:
                    return hit_result(cache, path, plan_rows(job.source, contents=config.verify), config, t0)
                except CacheDamagedError:
                    return None  # the full run sets it aside
    return None


def json_attr(path: Path, key: str) -> dict | None:
    text = read_text_attr(path, key)
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def json_roundtrip(obj):
    """``obj`` as it reads back from a JSON attribute (tuples become lists)."""
    return json.loads(json.dumps(obj))


def hit_result(cache: FeatureCache, path: Path, plan: dict[str, list[Row]], config: ExtractConfig,
                t0: float, stamp: dict | None = None) -> ExtractResult | None:
    """The result of reusing ``cache`` whole, when it holds exactly the planned rows unchanged (and
    the shard ``stamp``) and every chunk of it passes its checksum; else None. With
    ``on_error='fail'``, a failure it records is an error."""
    if not (is_hit(cache, plan) and all(cache.text_attr(k) == v for k, v in (stamp or {}).items())
            and intact(cache)):
        return None
    return reused(cache, path, config, t0)


def intact(cache: FeatureCache) -> bool:
    """True when every chunk of ``cache`` reads intact (:meth:`FeatureCache.verify`); else the damage
    is logged, and the run computes the damaged rows again."""
    try:
        cache.verify()
    except CacheDamagedError as e:
        log.warning("%s: not a cache hit; the rows that fail their checksum are computed again.", e.detail)
        return False
    return True


def reused(cache: FeatureCache, path: Path, config: ExtractConfig, t0: float) -> ExtractResult:
    """The result of reusing ``cache`` whole. With ``on_error='fail'``, a failure it records is an
    error."""
    if config.on_error == "fail" and cache.failed:
        f = cache.failed[0]
        raise SourceError(
            f"Cannot use '{f['split']}/{f['id']}': {f['reason']} (recorded by an earlier run). "
            f"Use --on-error skip to skip and record such files."
        )
    return ExtractResult(str(path), {s: cache.n(s) for s in cache.splits}, len(cache.failed), True,
                         time.perf_counter() - t0, 0.0, 0, sum(cache.n(s) for s in cache.splits),
                         [{k: f[k] for k in ("split", "id", "reason")} for f in cache.failed])
