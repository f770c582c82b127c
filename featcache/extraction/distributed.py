"""Extraction under ``torchrun``: every rank extracts its share into a shard file, rank 0 assembles.

    torchrun --nproc-per-node 4 -m featcache extract SOURCE ...

Each rank runs on ``cuda:(LOCAL_RANK % visible GPUs)`` (NCCL) when the device is ``auto`` with CUDA
present or any ``cuda*`` device, else on the CPU (gloo) with ``usable CPUs / local ranks`` threads.
Each rank builds the backbone once and looks only at its own share of the files. Shards are ordinary crash-safe extractions: rerunning the same
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

from ..common.devices import cpus_per_local_rank, distributed_backend, is_cuda, local_cuda_device
from ..errors import CacheError, FeatcacheError
from .pipeline import run_prepared
from .options import ExtractConfig, ExtractResult
from .plan import prepare
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
    device = rank_device(config.device, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = config.threads or cpus_per_local_rank()
    config = ExtractConfig(**{**config.to_dict(), "shard": (rank, world), "defer_merge": True, "threads": threads,
                              "device": str(device)})
    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group(distributed_backend(device), timeout=timedelta(hours=6))
    try:
        prepared = prepare(source, config)
        final = prepared.path
        watch = _AllRanksProgress(final, world, prepared.config.batch_size, rank, progress) if progress else None
        t0 = time.perf_counter()
        res: ExtractResult = run_prepared(prepared, progress=watch, gather=lambda own: _all_gather(own, world))
        del prepared  # the backbone: rank 0 assembles without it
        mine = {"rank": rank, "computed": res.computed, "seconds": time.perf_counter() - t0,
                "images_per_second": res.images_per_second}
        stats = _all_gather(mine, world)  # also the barrier: every shard is finished here
        _assemble_on_rank_0(final, world, rank, copy=config.merge)
    finally:
        if started_here:
            dist.destroy_process_group()
    total = sum(s["computed"] for s in stats)
    seconds = max(s["seconds"] for s in stats)
    from ..store.cache import open_cache

    with open_cache(final) as c:
        splits, failed = {s: c.n(s) for s in c.splits}, len(c.failed)
    return {"cache": str(final), "rank": rank, "world_size": world, "ranks": stats, "splits": splits,
            "failed": failed, "cache_hit": all(s["computed"] == 0 for s in stats), "seconds": round(seconds, 3),
            "images_per_second": round(total / seconds, 2) if seconds > 0 and total else 0.0}


def _all_gather(obj, world: int) -> list:
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


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


def rank_device(device: str, local_rank: int) -> torch.device:
    """The device of local rank ``local_rank`` for a ``device`` option: ``auto`` with CUDA present
    and every ``cuda``/``cuda:N`` spelling mean ``cuda:(local_rank % visible GPUs)``."""
    if is_cuda(device) or (device == "auto" and torch.cuda.is_available()):
        return local_cuda_device(local_rank)
    return torch.device("cpu" if device == "auto" else device)


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
