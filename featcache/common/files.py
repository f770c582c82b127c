"""Writing files that a crash cannot leave half-written, and strict JSON.

Every file featcache writes outside the HDF5 store (run folders, reports, plots, exports, bench
records) goes through :func:`atomic_write`: written to a temporary name beside the target, flushed
to disk, renamed over it, and the folder synced, so a reader sees the old file or the new one, and
a power loss cannot leave a name pointing at missing data.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


#: errnos of a write that found no room: disk or quota full, file size limit.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def reserve(path: str | os.PathLike, nbytes: int) -> None:
    """Check that a file of ``nbytes`` fits at ``path`` by allocating it (``posix_fallocate``),
    then remove it. Raises ``OSError`` (errno in :data:`DISK_FULL`) when it does not; a file
    system that cannot allocate ahead is let through. Used before writing an HDF5 file, whose
    library crashes the process when a write fails half-way instead of raising."""
    if not hasattr(os, "posix_fallocate"):  # macOS
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, max(1, int(nbytes)))
        except OSError as e:
            if e.errno not in DISK_FULL:
                return
            raise
    finally:
        os.close(fd)
        Path(path).unlink(missing_ok=True)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_mode(*, folder: bool = False) -> int:
    """The permissions ``open`` or ``mkdir`` would give a new file or folder under the current
    umask (0644 / 0755 under the usual 022). Temporary names are made private (0600 / 0700): what
    is renamed into place gets these instead, as the caches do."""
    return (0o777 if folder else 0o666) & ~_umask()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, for every thread, meanwhile)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, make it durable and move it
    into place. On any error the temporary file is removed and the old ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_mode())
    finally:
        os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def clean_json(obj: Any) -> Any:
    """A JSON-able copy: NaN and inf (metrics of degenerate splits) as None, numpy scalars and
    arrays as Python numbers and lists, tuples as lists."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean_json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """Strict JSON (no NaN) of :func:`clean_json` of ``obj``."""
    return json.dumps(clean_json(obj), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """``obj`` as strict JSON in ``path``, atomically."""
    text = dumps(obj, indent=indent) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` in ``path``, atomically. Serialise to bytes first and write them here: a full disk
    is then an ``OSError`` of Python's own write (safetensors' and torch's writers fail otherwise)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` in ``path`` (UTF-8), atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
