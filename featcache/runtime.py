"""Process-wide settings for fast CPU inference.

glibc's malloc hands large freed blocks back to the operating system (``munmap``, heap trimming) and,
with its default dynamic thresholds, may do so for a network's activation buffers after every layer:
the next forward pass then page-faults and zeroes the same memory again. Whether a process lands in
that state depends on its allocation history, and on the 2-core test machine it made the CPU forward
pass of EfficientNet-Lite0 1.5x slower in some processes than in others (72 vs 111 img/s,
BENCHMARKS.md). :func:`tune_allocator` fixes the thresholds so freed buffers are reused.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

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
