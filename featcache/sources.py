"""Data sources: where images and labels come from.

A source lists its samples per split, in a fixed (sorted) order, and loads one sample at a time
as a PIL image. Sources are registered by kind (``folder``, ``csv``, ``npz``, ``digits``);
:func:`open_source` picks the kind from a spec string.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ConfigError, SourceError
from .registry import Registry

logger = logging.getLogger(__name__)

SOURCES: Registry[Callable[..., "Source"]] = Registry("source", "featcache sources")

#: Splits featcache recognises as folder names, in the order they are written.
SPLIT_NAMES = ("train", "val", "test")
#: File extensions an image folder lists (case-insensitive). Other files are ignored, as in
#: torchvision's ImageFolder; a listed file that does not decode is skipped and recorded.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm")


@dataclass(frozen=True)
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

    kind = "source"

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


class FileSource(Source):
    """A source of image files under a root folder."""

    root: Path

    def read(self, ref: SampleRef) -> tuple[bytes, str]:
        with open(ref.key, "rb") as f:
            data = f.read()
        return data, content_hash(data)

    def stat(self, ref: SampleRef) -> tuple[int, int]:
        st = os.stat(ref.key)
        return (st.st_size, st.st_mtime_ns)


def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted, following no symlinked folders twice."""
    out: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop: walk each real folder once
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.lower().endswith(IMAGE_EXTENSIONS) and not fn.startswith("."):
                p = Path(dirpath) / fn
                if p.is_file():
                    out.append(p)
    out.sort(key=lambda p: os.fsencode(p))
    return out


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files a folder source reads under ``folder`` (hidden files and folders skipped,
    each real folder once); ``predict`` expands a folder with the same rule."""
    return _list_images(Path(folder))


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_name(dirname: str) -> str:
    """Folder name as a class name that is always valid UTF-8."""
    return display_path(dirname)


@SOURCES.register("folder", description="folder of class sub-folders, optionally under train/ val/ test/")
class ImageFolderSource(FileSource):
    """Images in class sub-folders, ``ROOT/CLASS/*.jpg`` or ``ROOT/SPLIT/CLASS/*.jpg``."""

    kind = "folder"

    def __init__(self, root: str | os.PathLike) -> None:
        if not Path(root).is_dir():
            raise SourceError(f"Image folder '{root}' does not exist. Pass a folder of class sub-folders.")
        root = Path(root).resolve()
        super().__init__(spec=str(root))
        self.root = root
        split_dirs = [s for s in SPLIT_NAMES if (root / s).is_dir()]
        layout = {s: root / s for s in split_dirs} if split_dirs else {"train": root}
        self.classes = sorted({_class_name(c) for d in layout.values() for c in _class_dirs(d)})
        if not self.classes:
            raise SourceError(
                f"Image folder '{root}' has no class sub-folders. Expected ROOT/CLASS/IMAGE "
                f"or ROOT/train/CLASS/IMAGE."
            )
        index = {c: i for i, c in enumerate(self.classes)}
        for split, d in layout.items():
            refs = []
            for c in _class_dirs(d):
                for p in _list_images(d / c):
                    refs.append(SampleRef(display_path(str(p.relative_to(self.root))), index[_class_name(c)], str(p)))
            self.splits[split] = refs
        if not any(self.splits.values()):
            raise SourceError(f"Image folder '{root}' has no image files ({', '.join(IMAGE_EXTENSIONS)}).")


@SOURCES.register("csv", description="CSV manifest with columns path,label[,split]; paths relative to the CSV")
class CsvSource(FileSource):
    """A CSV manifest ``path,label[,split]`` with a header row; paths relative to the CSV file."""

    kind = "csv"

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not path.is_file():
            raise SourceError(f"CSV manifest '{path}' does not exist.")
        super().__init__(spec=str(path.resolve()))
        self.root = path.resolve().parent
        rows = _csv_rows(path)
        if not rows or not {"path", "label"} <= set(rows[0]):
            raise SourceError(
                f"CSV manifest '{path}' needs a header row with columns path,label[,split]."
            )
        for n, r in enumerate(rows, start=2):
            if not r.get("path") or r.get("label") in (None, ""):
                raise SourceError(f"CSV manifest '{path}' line {n}: needs a path and a label.")
        self.classes = sorted({r["label"] for r in rows})
        index = {c: i for i, c in enumerate(self.classes)}
        by_split: dict[str, list[SampleRef]] = {}
        for n, r in enumerate(rows, start=2):
            split = (r.get("split") or "train").strip()
            if split not in SPLIT_NAMES:
                raise SourceError(
                    f"CSV manifest '{path}' line {n}: split '{split}' is not one of {', '.join(SPLIT_NAMES)}."
                )
            p = (self.root / r["path"]).resolve()
            by_split.setdefault(split, []).append(SampleRef(r["path"], index[r["label"]], str(p)))
        # Missing files stay in the plan: extraction records them as failed with their path.
        self.splits = {s: by_split[s] for s in SPLIT_NAMES if s in by_split}


def _csv_rows(path: Path) -> list[dict]:
    """The rows of a UTF-8 CSV file with a header; bytes that are not UTF-8 or a malformed CSV are
    a :class:`SourceError` naming the line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise SourceError(
            f"CSV manifest '{path}' is not UTF-8: byte 0x{raw[e.start]:02x} on line {line} cannot be decoded. "
            f"Save the file as UTF-8 (e.g. 'iconv -f latin1 -t utf-8 OLD > NEW')."
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return list(reader)
    except csv.Error as e:
        raise SourceError(f"CSV manifest '{path}' line {reader.line_num}: {e}. Fix the file.") from None


@SOURCES.register("npz", description="NumPy .npz in the MedMNIST layout (train_images, train_labels, val_*, test_*)")
class NpzSource(Source):
    """Arrays in the MedMNIST layout: ``{split}_images`` (N,H,W) or (N,H,W,3) and ``{split}_labels``."""

    kind = "npz"

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not path.is_file():
            raise SourceError(f"npz file '{path}' does not exist.")
        super().__init__(spec=str(path.resolve()))
        try:
            data = np.load(path, allow_pickle=False)
            keys = set(data.files)
        except Exception as e:  # zipfile/ValueError: not an npz, or object arrays
            raise SourceError(f"'{path}' is not a readable .npz file without pickles ({e}).") from None
        self._stat = os.stat(path)
        self._arrays: dict[str, np.ndarray] = {}
        labels_all = []
        for split in SPLIT_NAMES:
            ik, lk = f"{split}_images", f"{split}_labels"
            if ik not in keys and lk not in keys:
                continue
            if ik not in keys or lk not in keys:
                raise SourceError(f"npz file '{path}' has only one of '{ik}' and '{lk}'; both are needed.")
            try:
                images, labels = _npz_member(path, ik, data), data[lk]
            except ValueError as e:
                raise SourceError(f"npz file '{path}': cannot read '{ik}'/'{lk}' without pickles ({e}).") from None
            images = _check_images(images, f"{path}:{ik}")
            labels = np.asarray(labels)
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
                raise SourceError(
                    f"npz file '{path}': '{lk}' must be integers of shape ({images.shape[0]},) or "
                    f"({images.shape[0]}, 1). Got {labels.dtype} {labels.shape}."
                )
            self._arrays[split] = images
            labels_all.append((split, labels))
        if not labels_all:
            raise SourceError(
                f"npz file '{path}' has none of the keys train_images/train_labels, val_*, test_* "
                f"(MedMNIST layout). It has: {', '.join(sorted(keys)) or 'nothing'}."
            )
        values = sorted({int(v) for _, lab in labels_all for v in np.unique(lab)})
        self.classes = [str(v) for v in values]
        index = {v: i for i, v in enumerate(values)}
        for split, lab in labels_all:
            self.splits[split] = [SampleRef(f"{split}/{i}", index[int(v)], (split, i)) for i, v in enumerate(lab)]

    def read(self, ref: SampleRef) -> tuple[np.ndarray, str]:
        split, i = ref.key
        arr = np.asarray(self._arrays[split][i])
        return arr, content_hash(arr)

    def stat(self, ref: SampleRef) -> tuple[int, int]:
        # Array samples change only when the file does: its size and mtime stand for every sample.
        return (self._stat.st_size, self._stat.st_mtime_ns)


def _npz_member(path: Path, key: str, data) -> np.ndarray:
    """An array of an .npz, memory-mapped when it is stored uncompressed (np.savez), so a large
    file is not read into memory; compressed members (np.savez_compressed) are read whole."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return data[key]
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            f.seek(info.header_offset + 30 + name_len + extra_len)
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    if dtype.hasobject:
        raise ValueError("object arrays need pickles")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
    ok_shape = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))
    if not ok_shape:
        raise SourceError(
            f"'{where}' must have shape (N, H, W) or (N, H, W, 3). Got {images.shape}."
        )
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating) and images.size and 0 <= images.min() and images.max() <= 1:
            images = np.round(images * 255).astype(np.uint8)
        elif np.issubdtype(images.dtype, np.integer) and images.size and 0 <= images.min() and images.max() <= 255:
            images = images.astype(np.uint8)
        else:
            raise SourceError(
                f"'{where}' must be uint8 (0-255) or float in [0, 1]. Got {images.dtype}."
            )
    return images


@SOURCES.register("digits", description="scikit-learn's 8x8 handwritten digits (1797 real images, built in)",
                  builtin=True)
class DigitsSource(Source):
    """scikit-learn's handwritten digits, scaled to uint8, split 80/20 train/val (stratified, seed 0)."""

    kind = "digits"

    def __init__(self, spec: str = "digits") -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        super().__init__(spec="digits")
        d = load_digits()
        self._images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
        self.classes = [str(i) for i in range(10)]
        idx = np.arange(len(d.target))
        tr, va = train_test_split(idx, test_size=0.2, stratify=d.target, random_state=0)
        for split, rows in (("train", np.sort(tr)), ("val", np.sort(va))):
            self.splits[split] = [SampleRef(str(i), int(d.target[i]), int(i)) for i in rows]

    def read(self, ref: SampleRef) -> tuple[np.ndarray, str]:
        arr = self._images[ref.key]
        return arr, content_hash(arr)


def open_source(spec: str | os.PathLike | Source, *, val_fraction: float | None = None,
                split_seed: int = 0) -> Source:
    """Open a source from a spec.

    ``digits`` is the built-in data set; ``KIND:PATH`` names the kind; otherwise a ``.csv`` file is
    a manifest, a ``.npz`` file holds arrays, and a folder is an image folder.

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
        spec = str(spec)
        kind, _, rest = spec.partition(":")
        if spec in SOURCES and SOURCES.entry(spec).extra.get("builtin"):
            src = SOURCES.get(spec)()
        elif rest and kind in SOURCES and len(kind) > 1:
            src = SOURCES.get(kind)(rest)
        elif spec.lower().endswith(".csv"):
            src = CsvSource(spec)
        elif spec.lower().endswith(".npz"):
            src = NpzSource(spec)
        elif os.path.isdir(spec):
            src = ImageFolderSource(spec)
        else:
            raise _unknown_source(spec)
    if val_fraction is not None:
        _split_val(src, val_fraction, split_seed)
    if opened:
        _warn_about_classes(src)
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
    kind, _, rest = spec.partition(":")
    if spec in SOURCES and SOURCES.entry(spec).extra.get("builtin"):
        return
    path = rest if rest and kind in SOURCES and len(kind) > 1 else spec
    if path is spec and not spec.lower().endswith((".csv", ".npz")) and not os.path.isdir(spec):
        raise _unknown_source(spec)
    if not os.path.exists(path):
        raise SourceError(f"Source '{spec}': '{path}' does not exist. Check the path.")


def _warn_about_classes(src: Source) -> None:
    """A class without samples, or a split of one class, extracts fine but cannot train or score a
    head: say so before the forward passes rather than at fit time."""
    seen: set[int] = set()
    for split, refs in src.splits.items():
        labels = {r.label for r in refs}
        seen |= labels
        if len(labels) == 1 and len(src.classes) > 1:
            logger.warning("Split '%s' of source '%s' holds only class '%s'; a head needs at least 2 classes to train "
                           "and scores on one class say little.", split, src.spec, src.classes[next(iter(labels))])
    empty = [c for i, c in enumerate(src.classes) if i not in seen]
    if empty:
        logger.warning("Source '%s' has no samples of class(es) %s. Add images for them or remove their folders.",
                       src.spec, ", ".join(f"'{c}'" for c in empty))
    if len(src.classes) == 1:
        logger.warning("Source '%s' has a single class ('%s'); a head needs at least 2 classes to train.",
                       src.spec, src.classes[0])


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
