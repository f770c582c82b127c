"""The ``folder`` kind: images in class sub-folders, ``ROOT/CLASS/*.jpg`` or ``ROOT/SPLIT/CLASS/*.jpg``."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SourceError
from . import remote
from .base import IMAGE_EXTENSIONS, SOURCES, SPLIT_NAMES, SampleFault, SampleRef, display_path
from .files import FileSource, remote_images


class _Walk:
    """Lists the images of a folder source so that each real folder is walked once, where it is.

    Class folders that are not links are walked in place. A link to a folder inside one of them, or
    to one of their ancestors (the root, a split folder), is not followed: those images belong to
    the class folder they really live in (``ln -s .. train/bees/loop`` would add every other class
    of the split to ``bees``). Links to folders elsewhere are followed, each real folder once. Every
    folder left out is recorded in ``notes`` with the reason.
    """

    def __init__(self, root: Path, class_dirs: list[Path]) -> None:
        self.root = root
        self.homes = [os.path.realpath(d) for d in class_dirs if not d.is_symlink()]
        self.seen: set[tuple[int, int]] = set()
        self.notes: list[dict] = []

    def _walked_in_place(self, real: str) -> bool:
        return any(real == h or real.startswith(h + os.sep) or h.startswith(real + os.sep) for h in self.homes)

    def _skip(self, split: str, path: Path, why: str) -> None:
        self.notes.append({"split": split, "id": display_path(str(path.relative_to(self.root))),
                           "note": f"folder skipped: {why} (each real folder is walked once)"})

    def _target(self, real: str) -> str:
        inside = real == str(self.root) or real.startswith(str(self.root) + os.sep)
        return display_path(os.path.relpath(real, self.root) if inside else real)

    def images(self, split: str, folder: Path) -> list[Path] | None:
        """Image files under ``folder``, recursively, sorted (None: the folder itself is skipped)."""
        out: list[Path] = []
        real = os.path.realpath(folder)
        if folder.is_symlink() and self._walked_in_place(real):
            self._skip(split, folder, f"a link to '{self._target(real)}', walked where it is")
            return None
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in self.seen:  # reached again through a link (a loop outside the classes)
                self._skip(split, Path(dirpath), f"'{self._target(os.path.realpath(dirpath))}' was walked already")
                dirnames[:] = []
                continue
            self.seen.add((st.st_dev, st.st_ino))
            keep = []
            for d in sorted(d for d in dirnames if not d.startswith(".")):
                sub = Path(dirpath) / d
                target = os.path.realpath(sub)
                if sub.is_symlink() and self._walked_in_place(target):
                    self._skip(split, sub, f"a link to '{self._target(target)}', walked where it is")
                else:
                    keep.append(d)
            dirnames[:] = keep
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
    folder = Path(folder).resolve()
    return _Walk(folder, []).images("", folder) or []


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_name(dirname: str) -> str:
    """Folder name as a class name that is always valid UTF-8."""
    return display_path(dirname)


class ImageFolderSource(FileSource):
    """Images in class sub-folders, ``ROOT/CLASS/*.jpg`` or ``ROOT/SPLIT/CLASS/*.jpg``."""

    kind = "folder"
    splits_from = "train/ val/ test/ sub-folders (else all train)"

    @classmethod
    def detect(cls, spec: str) -> bool:
        return os.path.isdir(spec) or (remote.is_remote(spec) and spec.endswith("/"))

    @classmethod
    def exists(cls, path: str) -> bool:
        return remote.is_remote(path) or os.path.exists(path)

    def __init__(self, root: str | os.PathLike) -> None:
        if remote.is_remote(str(root)):
            self._open_remote(str(root))
            return
        if not Path(root).is_dir():
            raise SourceError(f"Image folder '{root}' does not exist. Pass a folder of class sub-folders.")
        root = Path(root).resolve()
        super().__init__(spec=str(root))
        self.root = root
        split_dirs = [s for s in SPLIT_NAMES if (root / s).is_dir()]
        layout = {s: root / s for s in split_dirs} if split_dirs else {"train": root}
        names = {split: _class_dirs(d) for split, d in layout.items()}
        walk = _Walk(root, [d / c for split, d in layout.items() for c in names[split]])
        # Class folders that are links are walked last: one pointing at a real class folder is skipped
        # (None), and is no class of its own.
        found = {split: {c: walk.images(split, d / c) for c in sorted(names[split], key=lambda c: (d / c).is_symlink())}
                 for split, d in layout.items()}
        self.notes = walk.notes
        self.classes = sorted({_class_name(c) for split in found for c, files in found[split].items() if files is not None})
        if not self.classes:
            raise SourceError(
                f"Image folder '{root}' has no class sub-folders. Expected ROOT/CLASS/IMAGE "
                f"or ROOT/train/CLASS/IMAGE."
            )
        index = {c: i for i, c in enumerate(self.classes)}
        for split in layout:
            self.splits[split] = [SampleRef(display_path(str(p.relative_to(self.root))), index[_class_name(c)], str(p))
                                  for c in names[split] for p in found[split][c] or []]
        if not any(self.splits.values()):
            raise SourceError(f"Image folder '{root}' has no image files ({', '.join(IMAGE_EXTENSIONS)}).")

    def _open_remote(self, root: str) -> None:
        """A folder on remote storage (``s3://bucket/prefix/``), listed through fsspec: the same layout,
        ids (paths relative to the folder) and order as a local one; keys are URLs."""
        root = root.rstrip("/") + "/"
        super().__init__(spec=root)
        self.root = root
        try:
            files = remote_images(root)
        except SampleFault as e:
            raise SourceError(f"Cannot list image folder '{root}': {e}. Check the URL.") from None
        in_splits = [f for f in files if f[0][0] in SPLIT_NAMES and len(f[0]) >= 3]
        by_split: dict[str, list[tuple[str, str, str]]] = {}
        for parts, url in in_splits or [f for f in files if len(f[0]) >= 2]:
            split, rest = (parts[0], parts[1:]) if in_splits else ("train", parts)
            by_split.setdefault(split, []).append((rest[0], "/".join(parts), url))
        self.classes = sorted({c for found in by_split.values() for c, _, _ in found})
        if not self.classes:
            raise SourceError(f"Image folder '{root}' has no class sub-folders of images "
                              f"({', '.join(IMAGE_EXTENSIONS)}). Expected ROOT/CLASS/IMAGE or ROOT/train/CLASS/IMAGE.")
        index = {c: i for i, c in enumerate(self.classes)}
        self.splits = {s: [SampleRef(rel, index[c], url) for c, rel, url in sorted(by_split[s])]
                       for s in SPLIT_NAMES if s in by_split}


SOURCES.register("folder", ImageFolderSource, description="folder of class sub-folders, optionally under train/ val/ test/")
