"""The ``npz`` kind: NumPy arrays in the MedMNIST layout (``{split}_images``, ``{split}_labels``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import SourceError
from .base import SOURCES, SPLIT_NAMES, SampleRef, Source, content_hash


class NpzSource(Source):
    """Arrays in the MedMNIST layout: ``{split}_images`` (N,H,W) or (N,H,W,3) and ``{split}_labels``."""

    kind = "npz"
    pre_decoded = True
    splits_from = "train_*/val_*/test_* keys"
    suffixes = (".npz",)

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


SOURCES.register("npz", NpzSource, description="NumPy .npz in the MedMNIST layout (train_images, train_labels, val_*, test_*)")
