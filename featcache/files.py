"""Writing files that a crash cannot leave half-written, and strict JSON.

Every file featcache writes outside the HDF5 store (run folders, reports, plots, exports, bench
records) goes through :func:`atomic_write`: written to a temporary name beside the target, flushed
to disk, renamed over it, and the folder synced, so a reader sees the old file or the new one, and
a power loss cannot leave a name pointing at missing data.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, make it durable and move it
    into place. On any error the temporary file is removed and the old ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` in ``path`` (UTF-8), atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
