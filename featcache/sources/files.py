"""What the kinds made of image files share (``folder``, ``csv``): :class:`FileSource`, whose
sample keys are local paths or fsspec URLs (``s3://``, ``gs://``, ``http(s)://``, ``memory://``),
read and stat'ed through :mod:`.remote` with its timeout and retries."""

from __future__ import annotations

import os

from . import remote
from .base import IMAGE_EXTENSIONS, SampleRef, Source, content_hash


class FileSource(Source):
    """A source of image files: each sample's key is a local path or a URL."""

    #: Where the files are: a local folder (a :class:`~pathlib.Path`) or a URL.
    root: object

    def read(self, ref: SampleRef) -> tuple[bytes, str]:
        if "://" in ref.key:  # a URL, fetched through fsspec
            data = remote.fetch(ref.key)
            return data, content_hash(data)
        with open(ref.key, "rb") as f:
            data = f.read()
        return data, content_hash(data)

    def stat(self, ref: SampleRef) -> tuple[int, int]:
        if "://" in ref.key:  # (size, a stamp of the etag or mtime), asked of the server
            found = remote.info(ref.key)
            return (found["size"], found["stamp"])
        st = os.stat(ref.key)
        return (st.st_size, st.st_mtime_ns)

    @property
    def remote_reads(self) -> bool:
        return getattr(self, "urls", False) or remote.is_remote(str(getattr(self, "root", "")))


def remote_images(root: str) -> list[tuple[list[str], str]]:
    """The image files under the folder URL ``root``, sorted: (the parts of each path relative to
    ``root``, its URL). Hidden files and folders are left out, as in a local folder."""
    found = remote.find(root)
    out = []
    for rel, url in found:
        parts = rel.split("/")
        if parts[-1].lower().endswith(IMAGE_EXTENSIONS) and not any(p.startswith(".") for p in parts):
            out.append((parts, url))
    return out
