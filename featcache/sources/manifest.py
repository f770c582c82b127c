"""The ``csv`` kind: a manifest ``path,label[,split]`` with a header row."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..errors import SourceError
from . import remote
from .base import SOURCES, SPLIT_NAMES, SampleFault, SampleRef
from .files import FileSource


class CsvSource(FileSource):
    """A CSV manifest ``path,label[,split]`` with a header row; paths relative to the CSV file. The
    manifest and its paths may be URLs (``s3://bucket/list.csv``; a path relative to it is a URL
    beside it), read through fsspec."""

    kind = "csv"
    splits_from = "the split column (else all train)"
    suffixes = (".csv",)

    @classmethod
    def exists(cls, path: str) -> bool:
        return remote.is_remote(path) or os.path.exists(path)

    def __init__(self, path: str | os.PathLike) -> None:
        if remote.is_remote(str(path)):
            url = str(path)
            try:
                raw = remote.fetch(url)
            except SampleFault as e:
                raise SourceError(f"CSV manifest '{url}' cannot be read: {e}. Check the URL.") from None
            super().__init__(spec=url)
            self.root = url.rsplit("/", 1)[0]
        else:
            path = Path(path)
            if not path.is_file():
                raise SourceError(f"CSV manifest '{path}' does not exist.")
            super().__init__(spec=str(path.resolve()))
            self.root = path.resolve().parent
            raw = path.read_bytes()
        rows = _csv_rows(path, raw)
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
        first: dict[str, tuple[int, str, str]] = {}  # image -> (line, split, label) where first listed
        for n, r in enumerate(rows, start=2):
            split = (r.get("split") or "train").strip()
            if split not in SPLIT_NAMES:
                raise SourceError(
                    f"CSV manifest '{path}' line {n}: split '{split}' is not one of {', '.join(SPLIT_NAMES)}."
                )
            p = r["path"] if "://" in r["path"] else self._beside(r["path"])  # URLs: fsspec
            if p in first:
                self._repeated(path, r, n, split, first[p])
            first.setdefault(p, (n, split, r["label"]))
            by_split.setdefault(split, []).append(SampleRef(r["path"], index[r["label"]], p))
        #: Some paths are URLs: reads go over the network (read ahead of the forward pass).
        self.urls = any("://" in r["path"] for r in rows)
        # Missing files stay in the plan: extraction records them as failed with their path.
        self.splits = {s: by_split[s] for s in SPLIT_NAMES if s in by_split}

    def _beside(self, rel: str) -> str:
        """A path of the manifest, relative to it: a local path, or a URL beside a remote manifest."""
        if isinstance(self.root, str):
            return f"{self.root}/{rel.lstrip('/')}"
        return str((self.root / rel).resolve())

    def _repeated(self, path: Path, row: dict, line: int, split: str, first: tuple[int, str, str]) -> None:
        """An image listed again at ``line``: under another label or twice in one split it is refused;
        in another split it is kept in both and recorded (its scores there are not held out)."""
        n0, split0, label0 = first
        if row["label"] != label0:
            raise SourceError(f"CSV manifest '{path}' lists '{row['path']}' under two labels: line {n0} '{label0}' "
                              f"({split0}), line {line} '{row['label']}' ({split}). Keep one row per image.")
        if split == split0:
            raise SourceError(f"CSV manifest '{path}' lists '{row['path']}' twice in split '{split}' (lines {n0} and "
                              f"{line}); it would count twice. Remove the repeated row.")
        self.notes.append({"split": split, "id": row["path"],
                           "note": f"also in split '{split0}' (lines {n0} and {line}): the same image in two splits, "
                                   f"so scores on '{split}' are not on held-out images only"})


SOURCES.register("csv", CsvSource, description="CSV manifest with columns path,label[,split]; paths relative to the CSV")


def _csv_rows(path, raw: bytes) -> list[dict]:
    """The rows of a UTF-8 CSV file (its bytes ``raw``) with a header; bytes that are not UTF-8 or a
    malformed CSV are a :class:`SourceError` naming the line."""
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
