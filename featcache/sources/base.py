"""What every source kind shares: :class:`SampleRef`, the :class:`Source` contract with its
capabilities as class attributes, content hashes, and the :data:`SOURCES` registry."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..common.registry import Registry

#: Source kinds by name: ``featcache sources`` lists them in this order, and :func:`open_source`
#: asks their :meth:`Source.detect` in this order.
SOURCES: Registry[type["Source"]] = Registry("source", "featcache sources")

#: Splits featcache recognises as folder names, in the order they are written.
SPLIT_NAMES = ("train", "val", "test")
#: File extensions an image folder lists (case-insensitive). Other files are ignored, as in
#: torchvision's ImageFolder; a listed file that does not decode is skipped and recorded.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm")

#: :attr:`Source.access`: every sample listed up front and read by its key, in any order.
RANDOM_ACCESS = "random"
#: :attr:`Source.access`: samples come in one pass (tar shards, a remote data set).
STREAMING = "stream"

@dataclass(frozen=True, slots=True)
class SampleRef:
    """One sample of a source.

    ``key`` is what the source needs to load it (a path for files, an index for arrays);
    ``id`` is what the cache stores (a path relative to the source root, or ``split/index``).
    """

    id: str
    label: int
    key: Any


@dataclass
class Source:
    """Samples per split, class names, and a loader.

    Subclasses fill ``splits`` and ``classes`` and implement :meth:`read`.
    """

    spec: str
    classes: list[str] = field(default_factory=list)
    splits: dict[str, list[SampleRef]] = field(default_factory=dict)
    #: How a val split was carved out of train (``{"val_fraction", "split_seed"}``), if it was.
    split_policy: dict = field(default_factory=dict)
    #: What the listing skipped or found odd, each ``{"split", "id", "note"}`` (a folder reached
    #: again through a link, an image listed in two splits): logged when the source is opened,
    #: recorded in the cache and listed by ``featcache info``.
    notes: list[dict] = field(default_factory=list)

    kind: ClassVar[str] = "source"
    #: How samples are reached (:data:`RANDOM_ACCESS` or :data:`STREAMING`).
    access: ClassVar[str] = RANDOM_ACCESS
    #: True when :meth:`read` returns decoded uint8 arrays (little decoding work: extraction and
    #: fine-tuning use no worker processes or threads), False for encoded image bytes.
    pre_decoded: ClassVar[bool] = False
    #: True where :meth:`read` goes over the network (URLs): extraction keeps a bounded number of
    #: reads in flight ahead of the forward pass (a kind may make it a property of the instance).
    remote_reads: ClassVar[bool] = False
    #: Where the splits come from, for ``featcache sources`` (``folders``, ``column``, ...).
    splits_from: ClassVar[str] = ""
    #: A built-in data set: the spec is the kind's name alone (``digits``).
    builtin: ClassVar[bool] = False
    #: File suffixes a spec without ``KIND:`` is recognised by (:meth:`detect`).
    suffixes: ClassVar[tuple[str, ...]] = ()

    #: What a sharded run (``--shard I/N``, torchrun) splits the source by: "" for samples (each run
    #: lists every sample and takes batch-aligned rows of each split), or the units it is made of
    #: ("tar shard", "row group"): each run takes whole units (:meth:`units`, :meth:`restrict`)
    #: and lists and reads only its own. A batch never spans two units (:meth:`unit_starts`), so a
    #: share computes exactly the batches of an unsharded run.
    share_unit: ClassVar[str] = ""

    @property
    def listed(self) -> bool:
        """False while the samples are not listed yet (a kind that lists them when first asked)."""
        return True

    def units(self) -> dict[str, list[str]] | None:
        """Per split, what names each unit (its name, and size and mtime where cheap), in order, known
        without listing a sample; None where the source cannot be split by units (:attr:`share_unit`
        empty, or a val split carved out of train)."""
        return None

    def restrict(self, keep: dict[str, list[int]]) -> None:
        """Keep only units ``keep[split]`` (positions in :meth:`units`) of each split, listing none of
        the others: the same spec, classes and fingerprint, fewer samples."""
        raise NotImplementedError(f"{type(self).__name__} is not made of units (share_unit is empty).")

    def unit_starts(self, split: str) -> list[int]:
        """Positions in ``splits[split]`` where each unit's samples begin (a batch starts there)."""
        return [0]

    def describe(self) -> dict:
        """What identifies the source in a cache fingerprint (not its contents)."""
        return {"kind": self.kind, "spec": self.spec, **self.split_policy}

    def read(self, ref: SampleRef) -> tuple[bytes | np.ndarray, str]:
        """Return the raw sample (encoded bytes or a uint8 array) and its content hash."""
        raise NotImplementedError

    def stat(self, ref: SampleRef) -> tuple[int, int]:
        """(size, mtime_ns) used to skip re-hashing unchanged files; (0, 0) for arrays."""
        return (0, 0)

    def __len__(self) -> int:
        return sum(len(v) for v in self.splits.values())

    @classmethod
    def detect(cls, spec: str) -> bool:
        """True when a spec without ``KIND:`` names a source of this kind (default: by suffix)."""
        return bool(cls.suffixes) and spec.lower().endswith(cls.suffixes)

    @classmethod
    def exists(cls, path: str) -> bool:
        """True when the path a spec names is there to open (``check_source_spec``, without reading)."""
        return os.path.exists(path)

    @classmethod
    def describe_kind(cls) -> dict:
        """The kind's capabilities (``featcache sources --json``)."""
        return {"kind": cls.kind, "access": cls.access, "pre_decoded": cls.pre_decoded,
                "splits_from": cls.splits_from, "builtin": cls.builtin, "suffixes": list(cls.suffixes),
                "share_unit": cls.share_unit}


class SampleFault(OSError):
    """A listed sample that cannot be used (no label, a member past the end of a truncated tar, a
    shard that could not be fetched): :meth:`Source.read` raises it and extraction records the
    sample as failed with this message as its reason."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unusable sample"


def stamp(*parts) -> int:
    """A non-negative int63 standing for identifying text (an etag, a data set fingerprint, a parquet
    footer): what a sample's ``(size, mtime)`` pair holds where there is no mtime."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def split_options(spec: str, allowed: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """``PATH#key=value&key=value`` -> (PATH, options): a kind's options ride in its spec, so every
    command that takes a source takes them and they are in the fingerprint with the spec."""
    path, sep, tail = spec.partition("#")
    options: dict[str, str] = {}
    for item in tail.split("&") if sep else []:
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            from ..errors import SourceError

            raise SourceError(f"Source option '{item}' in '{spec}' is not one of "
                              f"{', '.join(k + '=...' for k in allowed)} (write PATH#key=value&key=value).")
        options[key] = value
    return path, options


def with_options(spec: str, **options: str | None) -> str:
    """``spec`` with ``options`` added after ``#`` (``None`` values left out): the command-line flags
    ``--image-key`` / ``--image-column`` (``image``), ``--label-key`` / ``--label-column``
    (``label``) and ``--classes`` (``classes``) are these spec options."""
    extra = "&".join(f"{k}={v}" for k, v in options.items() if v is not None)
    if not extra:
        return spec
    return f"{spec}&{extra}" if "#" in spec else f"{spec}#{extra}"


#: Recorded in cache fingerprints: caches keyed by another algorithm are not mixed with these.
CONTENT_HASH = "sha256-128"


def content_hash(data: bytes | np.ndarray) -> str:
    """SHA-256 of a sample's bytes (file bytes, or array bytes + shape), truncated to 128 bits, as
    32 hex characters. SHA-256 has hardware instructions on current x86 and ARM CPUs: it hashed a
    256 x 256 x 3 image in 0.13 ms against 0.25 ms for BLAKE2b, 3% of a CPU extraction step."""
    h = hashlib.sha256()
    if isinstance(data, np.ndarray):
        h.update(str((data.shape, data.dtype.str)).encode())
        h.update(memoryview(np.ascontiguousarray(data)).cast("B"))
    else:
        h.update(data)
    return h.hexdigest()[:32]


def display_path(path: str) -> str:
    """A file name that is always valid UTF-8 (undecodable bytes shown as \\xNN)."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")
