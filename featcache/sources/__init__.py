"""Data sources: where images and labels come from.

A source lists its samples per split, in a fixed (sorted) order, and loads one sample at a time.
Each kind is a module of this package that registers its class in :data:`SOURCES` (``folder``,
``csv``, ``npz``, ``digits``, ``wds``, ``parquet``, ``hf``); what a kind can do is a class attribute of the kind
(:class:`~featcache.sources.base.Source`: ``access``, ``pre_decoded``, ``splits_from``,
``builtin``, ``suffixes``, ``share_unit``, ``remote_reads``). :func:`open_source` picks the kind from a spec string through the
registry. Adding a kind: one module and one line below.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..errors import ConfigError, SourceError
from .base import (CONTENT_HASH, IMAGE_EXTENSIONS, RANDOM_ACCESS, SOURCES, SPLIT_NAMES, STREAMING, SampleFault,
                   SampleRef, Source, content_hash, display_path, split_options, stamp, with_options)
from .checks import warn_about_listing
from .files import FileSource

# The kinds, in the order ``featcache sources`` lists them and :func:`open_source` detects them.
from .folder import ImageFolderSource, image_files  # noqa: E402
from .manifest import CsvSource  # noqa: E402
from .npz import NpzSource  # noqa: E402
from .digits import DigitsSource  # noqa: E402
from .wds import WdsSource  # noqa: E402
from .parquet import ParquetSource  # noqa: E402
from .hf import HfSource  # noqa: E402

__all__ = ["CONTENT_HASH", "IMAGE_EXTENSIONS", "RANDOM_ACCESS", "SOURCES", "SPLIT_NAMES", "STREAMING", "CsvSource",
           "DigitsSource", "FileSource", "HfSource", "ImageFolderSource", "NpzSource", "ParquetSource", "SampleFault",
           "SampleRef", "Source", "WdsSource", "check_source_spec", "content_hash", "display_path", "image_files",
           "list_sources", "open_source", "source_kind", "with_options"]

logger = logging.getLogger(__name__)


def source_kind(spec: str | os.PathLike) -> tuple[type[Source], str | None]:
    """The kind of a spec and the path it names (None for a built-in data set), without opening it:
    a built-in kind's name, ``KIND:PATH``, or the first kind whose :meth:`Source.detect` claims it
    (a ``.csv`` manifest, a ``.npz`` file, a folder)."""
    spec = str(spec)
    kind, _, rest = spec.partition(":")
    if spec in SOURCES and SOURCES.get(spec).builtin:
        return SOURCES.get(spec), None
    if rest and kind in SOURCES and len(kind) > 1:
        return SOURCES.get(kind), rest
    for entry in SOURCES:
        if not entry.obj.builtin and entry.obj.detect(spec):
            return entry.obj, spec
    raise _unknown_source(spec)


def open_source(spec: str | os.PathLike | Source, *, val_fraction: float | None = None,
                split_seed: int = 0) -> Source:
    """Open a source from a spec.

    ``digits`` is the built-in data set; ``KIND:PATH`` names the kind (``wds:``, ``parquet:``,
    ``hf:``, ...); otherwise a ``.csv`` file is a manifest, a ``.npz`` file holds arrays, a
    ``.parquet`` file a parquet source, and a folder is an image folder.

    Parameters
    ----------
    val_fraction : float, optional
        When the source has no ``val`` split, move this fraction of ``train`` into a stratified,
        seeded ``val`` split.
    split_seed : int
        Seed of that split.
    """
    if isinstance(spec, Source):
        src = spec
        opened = False
    else:
        opened = True
        cls, path = source_kind(spec)
        src = cls() if path is None else cls(path)
    listed = src.listed  # a kind that lists its samples when first asked for warns then (units.UnitSource)
    if val_fraction is not None:
        _split_val(src, val_fraction, split_seed)
    if opened and listed:
        warn_about_listing(src)
    return src


def _unknown_source(spec: str) -> SourceError:
    return SourceError(
        f"Source '{spec}' is not a folder, a .csv manifest, a .npz file or a built-in source. "
        f"Check the path, or run 'featcache sources' to list the kinds."
    )


def check_source_spec(spec: str | os.PathLike) -> None:
    """Refuse a spec :func:`open_source` cannot resolve, or whose file or folder does not exist,
    without reading it (``bench`` checks every source before its first extraction)."""
    spec = str(spec)
    cls, path = source_kind(spec)
    if path is not None and not cls.exists(path):
        raise SourceError(f"Source '{spec}': '{path}' does not exist. Check the path.")


def list_sources() -> list[dict]:
    """The source kinds with their capabilities and a description (``featcache sources --json``)."""
    return [{**e.obj.describe_kind(), "description": e.description} for e in SOURCES]


def _split_val(src: Source, fraction: float, seed: int) -> None:
    if not 0 < fraction < 1:
        raise ConfigError(f"The 'val_fraction' option must be in (0, 1). Got {fraction!r}.")
    if "val" in src.splits:
        raise ConfigError(
            f"Source '{src.spec}' already has a val split; drop the 'val_fraction' option."
        )
    from sklearn.model_selection import train_test_split

    if not src.splits.get("train"):
        raise ConfigError(f"Source '{src.spec}' has no train split to carve val_fraction={fraction} out of.")
    train = src.splits["train"]
    labels = np.array([r.label for r in train])
    counts = np.bincount(labels)
    # A class's only image stays in train: in val it would be a class no head can learn.
    single = np.isin(labels, np.flatnonzero(counts == 1))
    if single.any():
        logger.warning("val_fraction=%s: %s ha%s a single training image, kept in train (val has none of it)",
                       fraction, ", ".join(f"'{src.classes[c]}'" for c in np.flatnonzero(counts == 1)),
                       "s" if (counts == 1).sum() == 1 else "ve")
    idx = np.flatnonzero(~single)
    try:
        tr, va = train_test_split(idx, test_size=fraction, stratify=labels[idx], random_state=seed)
        tr = np.concatenate([tr, np.flatnonzero(single)])
    except ValueError as e:
        raise ConfigError(
            f"val_fraction={fraction} cannot split {len(train)} training samples of {len(counts)} classes "
            f"({e}). Use a larger fraction or add a val split."
        ) from None
    src.splits = {"train": [train[i] for i in np.sort(tr)], "val": [train[i] for i in np.sort(va)],
                  **{k: v for k, v in src.splits.items() if k not in ("train", "val")}}
    src.split_policy = {"val_fraction": fraction, "split_seed": seed}
