"""The ``folder`` kind: images in class sub-folders, ``ROOT/CLASS/*.jpg`` or ``ROOT/SPLIT/CLASS/*.jpg``."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SourceError
from .base import IMAGE_EXTENSIONS, SOURCES, SPLIT_NAMES, FileSource, SampleRef, display_path


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


class ImageFolderSource(FileSource):
    """Images in class sub-folders, ``ROOT/CLASS/*.jpg`` or ``ROOT/SPLIT/CLASS/*.jpg``."""

    kind = "folder"
    splits_from = "train/ val/ test/ sub-folders (else all train)"

    @classmethod
    def detect(cls, spec: str) -> bool:
        return os.path.isdir(spec)

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


SOURCES.register("folder", ImageFolderSource, description="folder of class sub-folders, optionally under train/ val/ test/")
