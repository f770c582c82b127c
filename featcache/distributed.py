"""Extraction under ``torchrun``: every rank extracts its share into a shard file, rank 0 assembles.

    torchrun --nproc-per-node 4 -m featcache extract SOURCE ...

Each rank runs on ``cuda:LOCAL_RANK`` (NCCL) when CUDA is there, else on the CPU (gloo) with
``cores / local ranks`` threads. Shards are ordinary crash-safe extractions: rerunning the same
command resumes only the unfinished ones. Rank 0 sees the progress of all ranks (it counts their
finished chunk files), and reports per-rank throughput.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .extract import ExtractConfig, ExtractResult, extract, prepare
from .errors import CacheError, FeatcacheError
from .shards import merge_shards, shard_path, shards_need_merge


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when launched by torchrun with more than one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ["RANK"]) if world > 1 else 0
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        return None
    return (rank, world, local) if world > 1 else None


def extract_distributed(source, config: ExtractConfig, *, progress=None) -> dict:
    """Extract share RANK of WORLD_SIZE, wait for every rank, assemble on rank 0.

    Returns (on every rank) ``{"cache", "rank", "world_size", "ranks": [{"rank", "computed",
    "seconds", "images_per_second"}], "images_per_second", "seconds", "splits", "failed", "cache_hit"}``.
    """
    env = torchrun_env()
    if env is None:
        raise RuntimeError("extract_distributed() needs torchrun (WORLD_SIZE > 1).")
    rank, world, local = env
    cuda = torch.cuda.is_available() and config.device in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(local)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    threads = config.threads or max(1, (os.cpu_count() or 1) // local_world)
    config = ExtractConfig(**{**config.to_dict(), "shard": (rank, world), "defer_merge": True, "threads": threads,
                              "device": f"cuda:{local}" if cuda else ("cpu" if config.device == "auto" else config.device)})
    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=6))
    try:
        prepared = prepare(source, ExtractConfig(**{**config.to_dict(), "shard": None}))
        final, batch = prepared[5], prepared[-1].batch_size
        watch = _AllRanksProgress(final, world, batch, rank, progress) if progress else None
        t0 = time.perf_counter()
        res: ExtractResult = extract(source, config, progress=watch)
        mine = {"rank": rank, "computed": res.computed, "seconds": time.perf_counter() - t0,
                "images_per_second": res.images_per_second}
        stats: list = [None] * world
        dist.all_gather_object(stats, mine)  # also the barrier: every shard is finished here
        _assemble_on_rank_0(final, world, rank, copy=config.merge)
    finally:
        if started_here:
            dist.destroy_process_group()
    total = sum(s["computed"] for s in stats)
    seconds = max(s["seconds"] for s in stats)
    from .store import open_cache

    with open_cache(final) as c:
        splits, failed = {s: c.n(s) for s in c.splits}, len(c.failed)
    return {"cache": str(final), "rank": rank, "world_size": world, "ranks": stats, "splits": splits,
            "failed": failed, "cache_hit": all(s["computed"] == 0 for s in stats), "seconds": round(seconds, 3),
            "images_per_second": round(total / seconds, 2) if seconds > 0 and total else 0.0}


def _assemble_on_rank_0(final: Path, world: int, rank: int, *, copy: bool) -> None:
    """Rank 0 assembles the cache when it is missing or presents earlier shard files (the source
    changed); every rank then raises rank 0's error, if any, instead of waiting for it."""
    error = [None]
    if rank == 0 and shards_need_merge(final, world):
        try:
            merge_shards(final, world, copy=copy)
        except FeatcacheError as e:
            error = [str(e)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise CacheError(error[0])


class _AllRanksProgress:
    """Rank 0's progress over all ranks: its own count plus the other ranks' finished chunk files."""

    def __init__(self, final: Path, world: int, batch_size: int, rank: int, fn) -> None:
        self.final, self.world, self.batch, self.rank, self.fn = final, world, batch_size, rank, fn
        self.others = [shard_path(final, i, world).with_name(shard_path(final, i, world).name + ".partial")
                       for i in range(world) if i != rank]

    def __call__(self, done: int, total: int) -> None:
        if self.rank != 0:
            return
        extra = sum(len(list(p.glob("c-*.npz"))) * self.batch for p in self.others if p.is_dir())
        self.fn(min(done + extra, total * self.world), total * self.world)
