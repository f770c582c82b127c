"""The extraction loop: source -> frozen backbone -> HDF5 cache, once.

Decoding runs in DataLoader worker processes and ships uint8 crops; the main process normalises
them on the device and runs the tapped backbone under ``torch.inference_mode()`` (autocast when
asked); a background thread writes each finished batch as an atomic chunk file, so disk I/O
overlaps compute and a crash loses at most the batches in flight. The final HDF5 file is then
assembled from the chunks (and from any previous cache of the same fingerprint) and renamed
into place.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..backbones import Backbone
from ..store.writer import CacheLock, CacheWriter, cache_bytes, set_aside
from ..common.devices import cudnn_autotuning, decode_settings
from ..errors import CacheDamagedError, CacheError, CacheLockedError, ConfigError, ExtractionInterrupted, SourceError
from ..common.files import DISK_FULL
from .loading import (VIEW_SPLIT, DecodeDataset, DeviceDecoded, Row, batches, block_key, close_batches, collate, plan_rows,
                      worker_init)
from .partial import ChunkWriter, PartialStore
from .options import ExtractConfig, ExtractResult, ProgressFn
from .plan import Prepared, build, open_job
from .reuse import (Donors, blocks, find_hit, hit_result, intact, reused, is_hit_rows, listing_matches, rows_to_compute,
                    stat_key)
from ..common.runtime import tune_allocator
from ..sources import Source, display_path
from ..store.cache import HASH_DTYPE, CacheFingerprint, FeatureCache, open_cache
from ..backbones.taps import HostCopy, TappedForward

log = logging.getLogger(__name__)

# --- the main entry point -------------------------------------------------------------------

def extract(source: str | os.PathLike | Source, config: ExtractConfig | None = None, *,
            progress: ProgressFn | None = None, **options) -> ExtractResult:
    """Run a frozen backbone over a source once and write (or reuse) its feature cache.

    Parameters
    ----------
    source : str, path or Source
        ``digits``, an image folder, a ``.csv`` manifest, a ``.npz`` file, ``wds:``, ``parquet:`` or
        ``hf:`` data (see :func:`open_source`).
    config : ExtractConfig, optional
        Options; keyword ``options`` override its fields (``batch_size=64``).
    progress : callable(done, total), optional
        Called after each batch with images processed and images to process in this run.

    Returns
    -------
    ExtractResult
        Path of the cache, sample counts, failures, whether it was a cache hit, timings.
    """
    t0 = time.perf_counter()
    job = open_job(source, ExtractConfig(**{**(config.to_dict() if config else {}), **options}))
    result = find_hit(job, t0) or run_prepared(build(job), progress=progress, t0=t0)
    result.notes = list(job.source.notes)
    return result


def run_prepared(p: Prepared, *, progress: ProgressFn | None = None, t0: float | None = None,
                 gather: Callable[[str], list[str]] | None = None) -> ExtractResult:
    """Run an extraction :func:`~.plan.build` worked out (torchrun's ranks build the backbone once).

    ``gather``, for a sharded run under torchrun, exchanges the digests of every rank's share of
    the plan (its argument is this rank's), so each rank looks only at its own share of the files.
    """
    t0 = time.perf_counter() if t0 is None else t0
    if p.config.shard is None:
        return _extract_plan(p, p.path, plan_rows(p.source, contents=p.config.verify), progress, t0)
    return _extract_shard(p, progress, t0, gather)


def _extract_shard(p: Prepared, progress: ProgressFn | None, t0: float,
                   gather: Callable[[str], list[str]] | None) -> ExtractResult:
    """Share I of N into its shard file, then (unless deferred) assemble the cache if all are done.

    Every shard records the plan's hash, made of the digests of all N shares of the plan (ids,
    labels, sizes and mtimes in order), so shards cut from different versions of the source are
    never assembled together. An independent ``--shard`` job looks at every file to know them;
    torchrun's ranks each look at their own share and exchange the digests. A source made of units
    (tar shards, row groups) is cut by whole units, known by name without listing a sample: each
    run lists and reads only its own (:func:`~featcache.extraction.shards.take_unit_share`).
    """
    from .shards import plan_hash, shard_path, shard_range, share_digest, take_unit_share

    config, final, fp = p.config, p.path, p.fingerprint
    i, n = config.shard
    digests = take_unit_share(p.source, i, n)
    if digests is not None:  # whole tar shards / row groups: this share alone is listed and read
        plan = known = plan_rows(p.source, contents=config.verify)
    else:
        ranges = [{split: shard_range(len(refs), config.batch_size, j, n) for split, refs in p.source.splits.items()}
                  for j in range(n)]
        plan = plan_rows(p.source, ranges[i], contents=config.verify)
        if gather is not None:
            digests, known = gather(share_digest(plan)), plan
        else:
            shares = [plan if j == i else plan_rows(p.source, ranges[j]) for j in range(n)]
            digests = [share_digest(share) for share in shares]
            known = {split: [r for share in shares for r in share[split]] for split in plan}
    hit = _assembled_hit(final, p, known, t0)
    if hit is not None:  # already assembled from shards of this plan: a cache hit for every shard
        return hit
    stamp = {"plan_hash": plan_hash(digests, fp.hash, config.batch_size, n)}
    path = shard_path(final, i, n)
    _set_aside_untrusted_shard(path, fp)
    siblings = _sibling_caches(final, fp, config.shard)
    try:
        result = _extract_plan(p, path, plan, progress, t0, stamp=stamp, more_donors=siblings)
    finally:
        for c in siblings:
            c.close()
    if not config.defer_merge:
        result.merged = _merge_if_complete(final, config)
    return result


def _assembled_hit(final: Path, p: Prepared, plan: dict[str, list[Row]], t0: float) -> ExtractResult | None:
    """The assembled cache, when it holds exactly the source's samples, the planned rows unchanged,
    and still presents the shard files it was assembled from; else None (it is assembled again
    once the shards are done)."""
    fp = p.fingerprint
    if not final.exists():
        return None
    try:
        c = open_cache(final)
    except CacheError as e:
        log.info("'%s' is not used as it is: %s", final, e)
        return None
    with c:
        try:
            if c.fingerprint == fp.to_dict() and listing_matches(c, p.source) and is_hit_rows(c, plan) and intact(c):
                return reused(c, final, p.config, t0)
        except CacheDamagedError as e:
            log.info("'%s' is not used as it is: %s", final, e.detail)
    return None


def _sibling_caches(final: Path, fp: CacheFingerprint, shard: tuple[int, int]) -> list[FeatureCache]:
    """The other shard files and the assembled cache, where readable and of this fingerprint: after
    a source change, images that moved to this shard's share are copied from them, not recomputed."""
    from .shards import shard_path

    out = []
    for p in [shard_path(final, j, shard[1]) for j in range(shard[1]) if j != shard[0]] + [final]:
        try:
            c = open_cache(p) if p.is_file() else None
        except CacheError:
            continue
        if c is not None and c.fingerprint != fp.to_dict():
            c.close()
        elif c is not None:
            out.append(c)
    return out


def _set_aside_untrusted_shard(path: Path, fp: CacheFingerprint) -> None:
    """A shard file is partial state: one that is damaged or of another fingerprint is set aside
    (renamed to ``*.damaged``) and extracted again."""
    if not path.exists():
        return
    try:
        with open_cache(path) as c:
            if c.fingerprint == fp.to_dict():
                return
            reason = "of another fingerprint"
    except CacheError as e:
        reason = str(e)
    log.warning("Set aside shard file '%s' as '%s' (%s); its samples are extracted again.", path,
                set_aside(path).name, reason)


def _merge_if_complete(final: Path, config: ExtractConfig) -> str | None:
    """The last shard to finish assembles the cache (others find a shard missing or of another plan,
    or the lock held). A cache assembled from earlier shard files is assembled again."""
    from .shards import merge_shards, shards_ready

    n = config.shard[1]
    if not shards_ready(final, n):
        return None
    lock_path = final.with_name(final.name + ".lock")
    try:
        lock = CacheLock(lock_path)
    except CacheLockedError:
        return None  # another shard is assembling it
    try:
        if not shards_ready(final, n):
            return None
        merge_shards(final, n, copy=config.merge)
    finally:
        lock.release()
    return str(final)


def _extract_plan(p: Prepared, path: Path, plan: dict[str, list[Row]], progress: ProgressFn | None,
                  t0: float, stamp: dict | None = None, more_donors: list[FeatureCache] = ()) -> ExtractResult:
    src, layers, shapes, fp, config = p.source, p.layers, p.shapes, p.fingerprint, p.config
    cache = _open_previous(path, fp) if path.exists() else None
    if cache is not None:
        try:
            res = hit_result(cache, path, plan, config, t0, stamp)
        except SourceError:
            cache.close()
            raise
        except CacheDamagedError as e:  # its per-sample arrays: nothing in it can be placed
            cache.close()
            cache, res = _set_aside_damaged(path, e), None
        if res is not None:
            cache.close()
            return res

    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    lock = CacheLock(lock_path)
    try:
        partial = PartialStore(path.with_name(path.name + ".partial"), fp.hash, batch_size=config.batch_size)
        donors = Donors(len(layers), config.batch_size)
        seen_chunks: set[Path] = set()
        for c in ([cache] if cache is not None else []) + list(more_donors):
            donors.add_cache(c)
        donors.add_partial(partial, seen_chunks)
        todo = rows_to_compute(src, plan, donors, retry_failed=config.on_error == "fail", views=config.views,
                                batch_size=config.batch_size)
        n_reused = sum(len(r) for r in plan.values()) - len(todo)
        t_compute = time.perf_counter()
        _compute(src, p.backbone, layers, config, p.device, p.order, todo, partial, progress)
        compute_seconds = time.perf_counter() - t_compute
        donors.add_partial(partial, seen_chunks)
        result = _assemble(path, fp, src, plan, layers, shapes, config, donors,
                           timings={"compute_seconds": compute_seconds, "computed": len(todo)}, stamp=stamp)
        if cache is not None:
            cache.close()
        partial.remove()
    finally:
        lock.release()
    seconds = time.perf_counter() - t0
    result.seconds = seconds
    result.computed, result.reused = len(todo), n_reused
    result.compute_seconds = compute_seconds if todo else 0.0
    result.images_per_second = len(todo) / compute_seconds if compute_seconds > 0 and todo else 0.0
    return result


def _open_previous(path: Path, fp: CacheFingerprint) -> FeatureCache | None:
    """The cache already at ``path``, to reuse whole or in part. One of another fingerprint is an
    error; a damaged one (unreadable data) is set aside as ``*.damaged`` and extracted again."""
    try:
        cache = open_cache(path)
    except CacheDamagedError as e:
        return _set_aside_damaged(path, e)
    if cache.fingerprint != fp.to_dict():
        cache.close()
        raise CacheError(
            f"'{path}' holds features of another fingerprint (backbone, layers, preprocessing, "
            f"versions or source differ). Choose another --output or delete that file."
        )
    return cache


def _set_aside_damaged(path: Path, e: CacheDamagedError) -> None:
    log.warning("Set aside '%s' as '%s' (%s); it is extracted again.", path, set_aside(path).name, e.detail)


def _compute(src, bb: Backbone, layers, config: ExtractConfig, device, order, todo, partial: PartialStore,
             progress: ProgressFn | None) -> None:
    if not todo:
        return
    tune_allocator()
    if config.threads:
        torch.set_num_threads(config.threads)
    pp = bb.preprocess
    decoding = decode_settings(device, config.num_workers, pre_decoded=src.pre_decoded,
                               batch_bytes=config.batch_size * (1 + config.views) * 3 * pp.crop * pp.crop)
    # Input shapes are fixed for a whole run (one crop size, one batch size but the last), so cuDNN
    # may time its algorithms once and keep the fastest; the caller's setting is restored after.
    with cudnn_autotuning(device):
        _compute_batches(src, bb, layers, config, device, order, todo, partial, progress, decoding)


def _compute_batches(src, bb: Backbone, layers, config: ExtractConfig, device, order, todo, partial: PartialStore,
                     progress: ProgressFn | None, decoding: tuple[int, int, int | None]) -> None:
    forward = TappedForward(bb, layers, config.pool, device=device, precision=config.precision,
                            channels_last=config.channels_last, order=order, compile=config.compile)
    pp = bb.preprocess
    workers, decode_threads, prefetch = decoding
    dataset = DecodeDataset(src, todo, pp, config.augment, threads=decode_threads,
                             encoded_jpegs=config.decode_on_device)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches(todo, config.batch_size), num_workers=workers,
        collate_fn=collate, pin_memory=device.type == "cuda", worker_init_fn=worker_init if workers else None,
        prefetch_factor=prefetch,
    )
    loaded = DeviceDecoded(loader, pp, device, background=device.type != "cpu") if config.decode_on_device \
        else loader
    host = HostCopy(layers, config.dtype, device)
    writer = ChunkWriter(partial, config.checkpoint_every)
    writer.start()
    done = 0

    def finish(pending, report: bool = True) -> None:
        nonlocal done
        feats, views = host.finish(pending["copy"]) if pending["copy"] is not None else ([], [])
        item = pending["item"]
        item["features"], item["views"] = feats, views
        writer.put(item)
        done += pending["n"]
        if progress and report:
            progress(done, len(todo))

    pending = None
    try:
        with torch.inference_mode():
            for batch in loaded:
                idx, hashes, x, bad = batch.rows, batch.hashes, batch.x, batch.failed
                failed_ids, failed_reasons = _failures(bad, todo, config.on_error)
                # The device works on this batch while the previous one is copied to the host.
                copy = host.start(forward(x), len(idx)) if x is not None else None
                previous, pending = pending, {"copy": copy, "n": len(idx) + len(bad), "item": {
                    "hashes": np.asarray(hashes, dtype=HASH_DTYPE),
                    "ids": [todo[i].ref.id for i in idx],
                    "stat": np.asarray([todo[i].stat for i in idx], dtype=np.int64).reshape(-1, 2),
                    "failed_ids": failed_ids, "failed_reasons": failed_reasons,
                    "failed_stat": np.asarray([todo[i].stat for i, _ in bad], dtype=np.int64).reshape(-1, 2),
                }}
                if previous is not None:
                    finish(previous)
            if pending is not None:
                last, pending = pending, None
                finish(last)
    except (KeyboardInterrupt, RuntimeError) as e:
        if pending is not None:  # computed before the stop: keep it
            finish(pending, report=False)
        close_batches(loaded)
        writer.close()
        _raise_stopped(e, done, len(todo), partial.path)
    finally:
        forward.remove()
        close_batches(loaded)
        dataset.close()
        if writer.is_alive():
            writer.close()


def _failures(bad: list[tuple[int, str]], todo: list[Row], on_error: str) -> tuple[list[str], list[str]]:
    """Ids and reasons of a batch's unreadable samples (logged); with ``on_error="fail"`` the first stops the run."""
    ids, reasons = [], []
    for i, reason in bad:
        row = todo[i]
        if on_error == "fail":
            raise SourceError(f"Cannot use '{display_path(str(row.ref.key))}': {reason}. Use --on-error skip "
                              f"to skip and record such files.")
        log.warning("skipping %s: %s", row.ref.id, reason)
        ids.append(row.ref.id)
        reasons.append(reason)
    return ids, reasons


def _raise_stopped(e: BaseException, done: int, total: int, partial: Path):
    """The error for a run stopped by ``e`` after ``done`` images, all kept in ``partial``."""
    if isinstance(e, KeyboardInterrupt):
        raise ExtractionInterrupted(f"Stopped after {done} of {total} images; they are kept in '{partial}'. "
                                    f"Run the same command again to resume.") from None
    if "bus error" in str(e).lower() or "shared memory" in str(e).lower():
        raise ConfigError(
            f"Decoding processes ran out of shared memory (/dev/shm): {str(e).strip().rstrip('.')[:200]}. "
            f"Start the container with --shm-size 1g (or --ipc=host), or use fewer workers. The {done} "
            f"images finished are kept in '{partial}': run the same command again to resume."
        ) from None
    raise e


def _assemble(path: Path, fp: CacheFingerprint, src: Source, plan, layers, shapes, config: ExtractConfig,
              donors: Donors, timings: dict, stamp: dict | None = None) -> ExtractResult:
    splits_out: dict[str, int] = {}
    failures: list[dict] = []
    # Where each surviving row comes from: donor -> [(split, dst_row, src_index)].
    sources: dict[int, list[tuple[str, int, int]]] = {}
    per_split: dict[str, list[Row]] = {}
    batch_ns: dict[str, list[int]] = {}
    # Each row's batch in an uninterrupted run: the rows of its block that can be read.
    size = {k: sum(stat_key(r.ref.id, r.stat) not in donors.failed_by_stat for r in block)
            for k, block in blocks(plan, config.batch_size).items()}
    for split, rows in plan.items():
        ok = []
        for r in rows:
            key = stat_key(r.ref.id, r.stat)
            h = r.hash if r.checked else (r.hash or donors.hash_by_stat.get(key))
            found = donors.lookup(h, config.views > 0 and split == VIEW_SPLIT, size[block_key(r, config.batch_size)])
            if found is not None:
                r.hash = h
                d, j, n = found
                sources.setdefault(d, []).append((split, len(ok), j))
                batch_ns.setdefault(split, []).append(n)
                ok.append(r)
            else:
                reason = donors.failed_by_stat.get(key, "not extracted")
                failures.append({"split": split, "id": r.ref.id, "reason": reason, "stat": r.stat,
                                 "label": r.ref.label})
        per_split[split] = ok
    attrs = dict(fingerprint=fp.to_json(), fingerprint_hash=fp.hash, classes=_json(src.classes),
                 layers=_json(layers), timings=_json(timings), notes=_json(src.notes),
                 extract_config=_json({**config.to_dict(),
                                       "weights": os.path.abspath(config.weights) if config.weights else None}))
    if config.shard is not None:
        attrs.update(shard=_json(list(config.shard)), **(stamp or {}))
    try:
        w = CacheWriter(path, reserve_bytes=_file_bytes(per_split, shapes, config, failures), **attrs)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise CacheError(f"Disk full while assembling '{path}' ({e.strerror}). What was computed is kept in "
                         f"'{path}.partial': free some space and run the same command again to finish.") from None
    with w:
        for split, ok in per_split.items():
            n = splits_out[split] = len(ok)
            w.add_split(split, labels=[r.ref.label for r in ok], ids=[r.ref.id for r in ok],
                        hashes=[r.hash for r in ok], stat=[r.stat for r in ok], batch_n=batch_ns.get(split, []))
            for name, shape in zip(layers, shapes):
                w.add_features(split, name, (n, *shape), config.dtype)
                if config.views and split == VIEW_SPLIT:
                    w.add_features(split, name, (n, config.views, *shape), config.dtype, views=True)
        view_splits = {VIEW_SPLIT} if config.views else set()
        for d, targets in sources.items():
            _copy_donor(w, donors.loaders[d], targets, layers, view_splits)
        w.add_failed(failures)
        if stamp:  # what the assembled cache checks this shard file by
            w.set_attrs(digest=w.digest())
    return ExtractResult(str(path), splits_out, len(failures), False, 0.0, 0.0,
                         failures=[{k: v for k, v in f.items() if k in ("split", "id", "reason")} for f in failures])


def _file_bytes(per_split: dict[str, list[Row]], shapes, config: ExtractConfig, failures: list) -> int:
    """About the size of the assembled cache file (features, views and per-row arrays), a little over."""
    item = np.dtype(config.dtype).itemsize
    row = item * sum(int(np.prod(s)) for s in shapes)
    return cache_bytes({split: (len(rows), row * (1 + (config.views if split == VIEW_SPLIT else 0)),
                                max([0, *(len(r.ref.id.encode()) for r in rows)]))
                        for split, rows in per_split.items()}, len(failures))


def _copy_donor(w: CacheWriter, load, targets: list[tuple[str, int, int]], layers: list[str],
                view_splits: set[str]) -> None:
    """Copy one donor's features (and, in ``view_splits``, views) into the new file: ``targets`` are
    (split, row there, row in the donor)."""
    arrays, view_arrays = load()
    by_split: dict[str, list[tuple[int, int]]] = {}
    for split, dst, j in targets:
        by_split.setdefault(split, []).append((dst, j))
    for split, pairs in by_split.items():
        pairs.sort()
        dst = np.array([p[0] for p in pairs])
        src_idx = np.array([p[1] for p in pairs])
        for li, name in enumerate(layers):
            w.place_rows(split, name, dst, arrays[li][src_idx],
                         views=view_arrays[li][src_idx] if split in view_splits else None)


def _json(obj) -> str:
    return json.dumps(obj)
