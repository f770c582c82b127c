"""Sharded extraction: share I of N of every split, one crash-safe shard file each, and the cache
file that presents the shards as one data set per split (in place, or as a merged copy: the store
writes it, :func:`featcache.store.merge.concat_caches`).

A shard file is an ordinary featcache cache of its share of the samples, named
``<cache>.shard-00001-of-00004.h5`` beside the final cache, with the same fingerprint. Shares are
contiguous and aligned to whole batches, so each shard computes exactly the batches a single
process would, and the assembled cache equals a single-process run's: same order, same values.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..errors import CacheError, ConfigError
from ..sources import Source
from ..store.cache import SUFFIX, cache_files, open_cache, read_text_attr
from ..store.merge import concat_caches

_SUFFIX_RE = re.escape(SUFFIX)
SHARD_RE = re.compile(rf"^(?P<base>.+{_SUFFIX_RE})\.shard-(?P<i>\d{{5}})-of-(?P<n>\d{{5}}){_SUFFIX_RE}$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"The 'shard' option must be I/N with 0 <= I < N, e.g. 0/4. Got {text!r}.")
    return int(m.group(1)), int(m.group(2))


def shard_path(final: Path, i: int, n: int) -> Path:
    return final.with_name(f"{final.name}.shard-{i:05d}-of-{n:05d}{SUFFIX}")


def shard_range(n_rows: int, batch_size: int, i: int, n: int) -> tuple[int, int]:
    """Rows [start, end) of share ``i`` of ``n``: contiguous, aligned to whole batches."""
    blocks = -(-n_rows // batch_size)
    a, b = i * blocks // n, (i + 1) * blocks // n
    return min(a * batch_size, n_rows), min(b * batch_size, n_rows)


def take_unit_share(src: Source, i: int, n: int) -> list[str] | None:
    """Restrict ``src`` to share ``i`` of ``n`` of its units (whole tar shards, row groups:
    :attr:`Source.share_unit`), before any of its samples is listed, and return the digests of all
    ``n`` shares (what :func:`plan_hash` is made of: the units of each, by name and, where cheap, size
    and mtime). Each split's units are cut into ``n`` contiguous runs of about equal counts. None,
    and ``src`` untouched, for a source that is not made of units: its shares are row ranges.
    """
    units = src.units() if src.share_unit else None
    if units is None:
        return None
    shares = [{split: list(range(j * len(names) // n, (j + 1) * len(names) // n)) for split, names in units.items()}
              for j in range(n)]
    digests = [hashlib.sha256(json.dumps([[split, [units[split][k] for k in keep]] for split, keep in share.items()])
                              .encode()).hexdigest()[:32] for share in shares]
    src.restrict(shares[i])
    return digests


def shards_complete(final: Path, n: int) -> bool:
    return all(shard_path(final, i, n).is_file() for i in range(n))


def share_digest(plan: dict) -> str:
    """The digest of one share of a plan: every planned sample of it in order (split, id, label,
    size, mtime)."""
    d = hashlib.sha256()
    for split, rows in plan.items():
        d.update(json.dumps(split).encode())
        for r in rows:
            d.update(json.dumps([r.ref.id, r.ref.label, int(r.stat[0]), int(r.stat[1])]).encode())
    return d.hexdigest()[:32]


def plan_hash(share_digests: list[str], fingerprint_hash: str, batch_size: int, n: int) -> str:
    """What a set of shards is cut from: the fingerprint, the batch size and shard count (they place
    the cuts), and the digests of all ``n`` shares of the plan (:func:`share_digest`). Shards of one
    set must share it, or their union is not one version of the source."""
    return hashlib.sha256(json.dumps([fingerprint_hash, batch_size, n, list(share_digests)]).encode()).hexdigest()[:32]


def shards_need_merge(final: Path, n: int) -> bool:
    """True when ``final`` is missing, or was assembled from other shard files than those there now
    (a copy whose shards were extracted again included)."""
    if not final.exists():
        return True
    if not shards_complete(final, n):
        return False
    recorded = read_text_attr(final, "shard_digests")
    digests = [read_text_attr(shard_path(final, i, n), "digest") for i in range(n)]
    return recorded is None or json.loads(recorded) != digests


def shards_ready(final: Path, n: int) -> bool:
    """All ``n`` shards are finished, cut from one plan, and ``final`` does not present them yet."""
    if not shards_complete(final, n):
        return False
    plans = {read_text_attr(shard_path(final, i, n), "plan_hash") for i in range(n)}
    return len(plans) == 1 and None not in plans and shards_need_merge(final, n)


def merge_shards(final: Path, n: int, *, copy: bool = False) -> Path:
    """Write ``final`` from its ``n`` finished shard files.

    Small per-sample arrays (labels, ids, hashes, stat) are copied; features and views are
    presented in place from the shard files (relative names: keep the files together), or copied
    into one self-contained file with ``copy=True`` (:func:`~featcache.store.merge.concat_caches`).
    Shards of different fingerprints, shares or plans, and damaged ones, are refused.
    """
    paths = [shard_path(final, i, n) for i in range(n)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CacheError(f"Cannot assemble '{final.name}': shard(s) {', '.join(missing)} are not finished. "
                         f"Run the extraction of those shards (same command with --shard I/{n}).")
    caches = [open_cache(p) for p in paths]
    try:
        fp = caches[0].fingerprint
        for p, c in zip(paths, caches):
            if c.fingerprint != fp:
                raise CacheError(f"Shard '{p.name}' has another fingerprint than '{paths[0].name}'; it was made "
                                 f"with other options or versions. Re-extract it with the same command.")
            if c.shard != (paths.index(p), n):
                raise CacheError(f"'{p.name}' is not shard {paths.index(p)} of {n} (its shard attribute disagrees).")
            if c.text_attr("plan_hash") is None or c.text_attr("digest") is None:
                raise CacheError(f"Shard '{p.name}' does not record what it covers (made by an older featcache). "
                                 f"Re-run its extraction with the same command.")
            if c.digest() != c.text_attr("digest"):
                raise CacheError(f"Shard '{p.name}' does not hold what it recorded (damaged or edited). Delete it "
                                 f"and re-run its extraction with the same command.")
        plans = [c.text_attr("plan_hash") for c in caches]
        if len(set(plans)) > 1:
            raise CacheError(
                f"The shards of '{final.name}' were cut from different versions of the source or options ("
                + ", ".join(f"shard {i}: plan {h[:8]}" for i, h in enumerate(plans))
                + "). Re-run the same extraction for every shard on the current source."
            )
        concat_caches(final, caches, virtual=not copy,
                      attrs=dict(timings=json.dumps({"shards": [c.timings for c in caches]}),
                                 shards=json.dumps([] if copy else [p.name for p in paths]),
                                 shard_digests=json.dumps([] if copy else [c.text_attr("digest") for c in caches])))
    finally:
        for c in caches:
            c.close()
    if copy:
        for p in paths:
            p.unlink()
    return final


def find_shard_sets(cache_dir: str | os.PathLike) -> dict[Path, int]:
    """Shard sets in a folder: final cache path -> number of shards."""
    out: dict[Path, int] = {}
    for p in cache_files(cache_dir, "*.shard-*-of-*"):
        m = SHARD_RE.match(p.name)
        if m:
            final = p.with_name(m.group("base"))
            n = int(m.group("n"))
            if out.get(final, n) != n:
                raise CacheError(f"'{final.name}' has shards of different counts in {cache_dir}; delete the stale ones.")
            out[final] = n
    return out


def merge_dir(cache_dir: str | os.PathLike, *, copy: bool = False) -> list[dict]:
    """Assemble every complete shard set in a folder whose cache is missing or presents other shard
    files than those there now."""
    results = []
    for final, n in sorted(find_shard_sets(cache_dir).items()):
        if not copy and not shards_need_merge(final, n):
            results.append({"cache": str(final), "shards": n, "status": "exists"})
            continue
        merge_shards(final, n, copy=copy)
        results.append({"cache": str(final), "shards": n, "status": "merged" if copy else "assembled"})
    if not results:
        raise CacheError(f"No shard files (*.shard-I-of-N{SUFFIX}) in '{cache_dir}'. Extract with --shard I/N first.")
    return results


__all__ = ["merge_dir", "merge_shards", "parse_shard", "shard_path",
           "shard_range", "shards_complete", "shards_need_merge", "shards_ready", "plan_hash", "share_digest",
           "take_unit_share"]
