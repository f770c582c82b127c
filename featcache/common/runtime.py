"""Process-wide settings for fast CPU inference.

glibc's malloc hands large freed blocks back to the operating system (``munmap``, heap trimming) and,
with its default dynamic thresholds, may do so for a network's activation buffers after every layer:
the next forward pass then page-faults and zeroes the same memory again. Whether a process lands in
that state depends on its allocation history, and on the 2-core test machine it made the CPU forward
pass of EfficientNet-Lite0 1.5x slower in some processes than in others (72 vs 111 img/s,
BENCHMARKS.md). :func:`tune_allocator` fixes the thresholds so freed buffers are reused.

Heads fit with either numpy's BLAS or torch's OpenMP pool; with both loaded their threads fight
for the cores (logistic regression on digits 2x slower by default than with one BLAS thread, a
small torch head 40x). :func:`head_threads` gives one pool the cores at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import importlib
import logging
import os
import platform
import sys
from typing import Iterator

log = logging.getLogger(__name__)

# From <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

#: Blocks below this come from the heap (glibc's maximum on 64-bit), whose free top is kept up to
#: TRIM bytes and grown TOP_PAD bytes at a time.
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 256 << 20), (M_TOP_PAD, 64 << 20))

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Make glibc malloc keep freed activation buffers for reuse (once per process).

    A no-op elsewhere than Linux with glibc, and when ``FEATCACHE_TUNE_MALLOC=0``. Returns whether
    the settings are in effect. The cost is memory: up to 256 MB of freed heap stays with the process.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("FEATCACHE_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    log.info("malloc thresholds %s", "set" if _tuned else "not set")
    return _tuned


#: Below this many feature values (rows x features) a head's arithmetic is too small to share out
#: over threads: waking and spin-waiting a pool costs more than the work, and two pools (numpy's
#: OpenBLAS, torch's OpenMP) spinning side by side take the cores from each other. Measured on
#: digits (1,437 x 1,280 = 1.8M values, 2 cores): scikit-learn's logreg ran 10x slower on 2 BLAS
#: threads than on one, while the torch heads (linear, mlp, knn) ran 1.4-1.7x faster on 2.
SMALL_WORK = {"numpy": 1 << 22, "torch": 1 << 18}
_ACTIVE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("featcache_head_threads", default=None)


def _cores() -> int:
    """The cores this process may use (torch's setting once torch is loaded)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def head_threads(backend: str, work: int, threads: int | None = None, *,
                 parallel_work: int | None = None) -> Iterator[dict]:
    """Coordinate the thread pools while a head fits and predicts.

    Only the pool the head computes in may use more than one thread (``backend`` "numpy" for
    scikit-learn and numpy heads, "torch" for torch heads); the other is held at one thread so
    its idle workers never spin on the cores. The working pool gets ``threads`` threads, or,
    when None, one thread for problems under ``parallel_work`` feature values (default: the
    backend's :data:`SMALL_WORK`; there one thread is the fastest, and results then never depend on
    the machine's core count) and every core otherwise. Both pools are restored on exit. Nested
    calls keep the outermost setting. torch is imported only for the torch pool: a numpy head in a
    process without torch has no torch threads to hold.

    Yields
    ------
    dict
        ``{"backend", "threads"}``: what was used, for the run record.
    """
    outer = _ACTIVE.get()
    if outer is not None:  # an enclosing call (fit-head around a head's fit) already decided
        yield outer
        return
    from threadpoolctl import threadpool_limits

    torch = importlib.import_module("torch") if backend == "torch" else sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    if threads is None:
        # Every core: torch's thread count (one per physical core), or the CPUs this process may use.
        small = SMALL_WORK.get(backend, SMALL_WORK["numpy"]) if parallel_work is None else parallel_work
        threads = 1 if work < small else _cores()
    used = {"backend": backend, "threads": int(threads)}
    token = _ACTIVE.set(used)
    try:
        if torch is not None:
            torch.set_num_threads(threads if backend == "torch" else 1)
        with threadpool_limits(limits=threads if backend == "numpy" else 1, user_api="blas"):
            yield used
    finally:
        if torch is not None:
            torch.set_num_threads(before)
        _ACTIVE.reset(token)
