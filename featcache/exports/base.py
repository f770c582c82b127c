"""What every export format shares: the registry of formats, the metadata columns of each row,
and the part a format writes.

A format is one module with one class registered in :data:`FORMATS`; the class says which files
a part is made of (:meth:`ExportFormat.files`) and writes them (:meth:`ExportFormat.write_part`),
each through :func:`featcache.common.files.atomic_write`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import ConfigError
from ..common.registry import Registry

FORMATS: Registry[type["ExportFormat"]] = Registry("export format", "featcache export-features --help")

#: Metadata columns of every exported row, in order.
META_COLUMNS = ("id", "label", "class", "split", "path", "row")


def require(module: str, extra: str, what: str):
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the '{module.split('.')[0]}' package, which is not installed. "
                          f"Install it with: pip install 'featcache[{extra}]'.") from None


def source_path(source: dict, sample_id: str) -> str:
    """Where a cached row came from: the file under a folder or CSV source, else the source's key
    (``split/index`` of an array source)."""
    spec = str(source.get("spec", ""))
    if source.get("kind") == "folder":
        return os.path.join(spec, sample_id)
    if source.get("kind") == "csv":
        return os.path.join(os.path.dirname(spec), sample_id)
    return sample_id


@dataclass(frozen=True)
class Block:
    """Consecutive rows of one part: vectors (rows, dim) in the export dtype and their metadata."""

    vectors: np.ndarray
    labels: np.ndarray
    ids: list[str]
    start: int

    def without_vectors(self) -> "Block":
        """The metadata only (what a part keeps while its vectors stream to disk)."""
        # Not a zero-row view: a view would keep the whole block's vectors alive.
        return Block(np.empty((0, *self.vectors.shape[1:]), self.vectors.dtype), self.labels, self.ids, self.start)


@dataclass(frozen=True)
class Part:
    """Rows ``[start, stop)`` of a split, written as one numbered part (``0000``, ``0001``, ...)."""

    name: str
    start: int
    stop: int
    dim: int
    dtype: np.dtype
    split: str
    classes: tuple[str, ...]
    source: dict
    read: Callable[[], Iterator[Block]]

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def metadata(self, blocks: list[Block]):
        """The metadata columns of ``blocks`` as a pyarrow table."""
        pa = require("pyarrow", "export", "Exporting features")
        labels = np.concatenate([b.labels for b in blocks]) if blocks else np.zeros(0, np.int64)
        ids = [i for b in blocks for i in b.ids]
        return pa.table({
            "id": pa.array(ids, pa.string()),
            "label": pa.array(labels, pa.int64()),
            "class": pa.array([self.classes[i] for i in labels], pa.string()),
            "split": pa.array([self.split] * len(ids), pa.string()),
            "path": pa.array([source_path(self.source, i) for i in ids], pa.string()),
            "row": pa.array(np.concatenate([np.arange(b.start, b.start + len(b.ids)) for b in blocks]
                                           or [np.zeros(0, np.int64)]), pa.int64()),
        })


class ExportFormat:
    """One export layout. Subclasses set ``name`` and implement :meth:`files` and :meth:`write_part`."""

    name = "format"
    #: Folders (under the split's folder) the format writes into.
    folders: tuple[str, ...] = ()

    def files(self, split_dir: Path, part: str) -> list[Path]:
        """The files part ``part`` consists of."""
        raise NotImplementedError

    def write_part(self, split_dir: Path, part: Part) -> None:
        """Write ``part`` (reading its blocks once, in order), each file atomically."""
        raise NotImplementedError


def format_names() -> list[str]:
    return FORMATS.names()
