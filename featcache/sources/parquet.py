"""The ``parquet`` kind: images in a column of parquet files (needs pyarrow: ``featcache[data]``).

``parquet:PATH`` is one file (train), or a folder with ``train/ val/ test/`` sub-folders of
``*.parquet`` (else its ``*.parquet`` are all train). The image column holds bytes (raw binary, or
Hugging Face's ``{bytes, path}`` struct) or a path (relative to the parquet file) or URL; the label
column integers (class indices; names from ``#classes=FILE`` or the integers) or strings (sorted, they
are the class names). Columns are found by type and name, or given: ``#image=COL&label=COL``.

Ids are ``FILE/ROW`` (the file name without ``.parquet``, the row in that file). A row group is a
unit (:attr:`share_unit`): a sharded run takes whole row groups, and a batch starts anew at each one.
Only the footers are read when the source is opened, and the label column when its samples are
first listed (of every row group, unless ``#classes=FILE`` names the classes: then of the row groups
kept); an image is read with its row group (the last few row groups read are kept
per process), so memory is flat in the number of rows. A sample's ``(size, mtime)`` is its row
group's byte size and a stamp of the file's footer, size and mtime: a rewritten file is re-read.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import SourceError
from . import remote
from .base import SOURCES, SPLIT_NAMES, SampleFault, SampleRef, content_hash, split_options, stamp
from .units import UnitSource

IMAGE_NAMES = ("image", "img", "jpg", "png", "image_bytes", "path", "image_path", "file", "filename", "url")
LABEL_NAMES = ("label", "labels", "cls", "class", "target", "y")
#: Row groups of image data kept per process.
KEEP = 4


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise SourceError("parquet sources need pyarrow: pip install 'featcache[data]'.") from None
    return pyarrow


def footer_stamp(path: str) -> int:
    """A stamp of a parquet file's footer (its schema, row groups, sizes and statistics), size and mtime."""
    st = os.stat(path)
    with open(path, "rb") as f:
        f.seek(max(0, st.st_size - 8))
        tail = f.read(8)
        n = int.from_bytes(tail[:4], "little") if tail[4:] == b"PAR1" else 0
        f.seek(max(0, st.st_size - 8 - n))
        footer = f.read(n)
    return stamp(footer.hex(), st.st_size, st.st_mtime_ns)


class ParquetSource(UnitSource):
    """Parquet files with an image column and a label column: ``FILE/ROW`` samples."""

    kind = "parquet"
    share_unit = "row group"
    splits_from = "train/ val/ test/ sub-folders of *.parquet (else all train)"
    suffixes = (".parquet",)

    def __init__(self, spec: str) -> None:
        pa = _pyarrow()
        path, options = split_options(str(spec), ("image", "label", "classes"))
        if not os.path.exists(path):
            raise SourceError(f"Parquet source '{path}' does not exist. Give a .parquet file or a folder of them.")
        path = str(Path(path).resolve())
        super().__init__(spec=path + (f"#{str(spec).partition('#')[2]}" if options else ""))
        self.options = options
        if os.path.isfile(path):
            layout = {"train": [path]}
        else:
            by_split = {s: sorted(str(p) for p in Path(path, s).glob("*.parquet")) for s in SPLIT_NAMES
                        if Path(path, s).is_dir()}
            layout = by_split or {"train": sorted(str(p) for p in Path(path).glob("*.parquet"))}
        if not any(layout.values()):
            raise SourceError(f"Parquet folder '{path}' has no *.parquet files (nor train/ val/ test/ folders of them).")
        #: Per file: (path, stamp, image column, row group starts, label column, row group byte sizes).
        self.files: list[tuple[str, int, str, list[int], str, list[int]]] = []
        #: Per split, its units: (file, row group) in order; :meth:`restrict` keeps some before any is read.
        self.groups: dict[str, list[tuple[int, int]]] = {}
        for split, paths in layout.items():
            self.groups[split] = []
            for p in paths:
                k = len(self.files)
                try:
                    meta = pa.parquet.ParquetFile(p).metadata  # the footer only
                    image, label = self._columns(meta.schema.to_arrow_schema(), p)
                except (OSError, pa.ArrowException) as e:
                    raise SourceError(f"Parquet file '{p}' cannot be read ({e}).") from None
                starts, total = [], 0
                for g in range(meta.num_row_groups):
                    starts.append(total)
                    total += meta.row_group(g).num_rows
                sizes = [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
                self.files.append((p, footer_stamp(p), image, starts, label, sizes))
                self.groups[split].extend((k, g) for g in range(meta.num_row_groups))
        given = options.get("classes")
        self.classes_given = [ln.strip() for ln in Path(given).read_text(encoding="utf-8").splitlines()
                              if ln.strip()] if given else None
        self.classes = list(self.classes_given or [])
        self._lock = threading.Lock()
        self._groups: OrderedDict = OrderedDict()
        self._start_units(list_now=given is None)  # class names from the labels: every label is read

    def units(self) -> dict[str, list[str]] | None:
        if self.split_policy:  # a val split carved out of train is made of no row groups
            return None
        return {split: [f"{Path(self.files[k][0]).name}#{g}\x1f{self.files[k][1]}" for k, g in groups]
                for split, groups in self.groups.items()}

    def _keep(self, keep: dict[str, list[int]]) -> None:
        self.groups = {s: [groups[j] for j in keep.get(s, [])] for s, groups in self.groups.items()}

    def _list_units(self) -> tuple[dict[str, list[SampleRef]], dict[str, list[int]]]:
        pa = _pyarrow()
        found: dict[str, list[tuple[int, int, list]]] = {}
        opened: dict[int, object] = {}
        for split, groups in self.groups.items():
            found[split] = []
            for k, g in groups:
                path, _, _, _, label, _ = self.files[k]
                try:
                    pf = opened.get(k) or opened.setdefault(k, pa.parquet.ParquetFile(path))
                    values = pf.read_row_group(g, columns=[label]).column(0).to_pylist()
                except (OSError, pa.ArrowException) as e:
                    raise SourceError(f"Parquet file '{path}' cannot be read ({e}).") from None
                found[split].append((k, g, values))
        every = [v for units in found.values() for _, _, vals in units for v in vals if v is not None]
        kinds = {type(v) for v in every}
        if not kinds <= {int, bool} and kinds != {str}:
            raise SourceError(f"The label column of '{self.spec}' must hold integers or strings. Got "
                              f"{', '.join(sorted(t.__name__ for t in kinds))}. Name it with #label=COL.")
        if self.classes_given is not None:
            self.classes = list(self.classes_given)
        elif kinds == {str}:
            self.classes = sorted(set(every))
        else:
            self.classes = [str(i) for i in range(max(every, default=-1) + 1)]
        index = {c: i for i, c in enumerate(self.classes)}
        top = max((v for v in every if not isinstance(v, str)), default=-1)
        unknown = sorted({v for v in every if isinstance(v, str) and v not in index})
        if top >= len(self.classes) or unknown:
            raise SourceError(f"Parquet source '{self.spec}' has label {unknown[0] if unknown else top!r} but only "
                              f"{len(self.classes)} class names {self.classes[:5]}. Fix the class names file.")
        splits: dict[str, list[SampleRef]] = {}
        starts: dict[str, list[int]] = {}
        for split, units in found.items():
            refs: list[SampleRef] = []
            starts[split] = []
            for k, g, values in units:
                starts[split].append(len(refs))
                name, first, size = Path(self.files[k][0]).stem, self.files[k][3][g], self.files[k][5][g]
                refs.extend(SampleRef(f"{name}/{first + i}", -1 if v is None else index[v] if isinstance(v, str)
                                      else int(v), (k, g, i, size)) for i, v in enumerate(values))
            splits[split] = refs
        return splits, starts

    def _columns(self, schema, path: str) -> tuple[str, str]:
        pa = _pyarrow()
        names = schema.names
        image, label = self.options.get("image"), self.options.get("label")
        for given, what in ((image, "image"), (label, "label")):
            if given is not None and given not in names:
                raise SourceError(f"Parquet file '{path}' has no column '{given}' ({what}). It has: {', '.join(names)}.")
        if image is None:
            def holds_image(f) -> bool:
                t = f.type
                return (pa.types.is_binary(t) or pa.types.is_large_binary(t)
                        or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0))

            image = next((f.name for f in schema if holds_image(f)), None) or next(
                (n for n in IMAGE_NAMES if n in names and pa.types.is_string(schema.field(n).type)), None)
        if label is None:
            label = next((n for n in LABEL_NAMES if n in names), None)
        if image is None or label is None:
            raise SourceError(f"Parquet file '{path}': no {'image' if image is None else 'label'} column found among "
                              f"{', '.join(names)}. Name it with #image=COL or #label=COL.")
        return image, label

    def __getstate__(self) -> dict:  # worker processes keep their own row groups
        return {**self.__dict__, "_lock": None, "_groups": OrderedDict()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _group(self, k: int, g: int):
        with self._lock:
            hit = self._groups.get((k, g))
            if hit is not None:
                self._groups.move_to_end((k, g))
                return hit
            pa = _pyarrow()
            path, _, image = self.files[k][:3]
            column = pa.parquet.ParquetFile(path).read_row_group(g, columns=[image]).column(0)
            self._groups[(k, g)] = column
            while len(self._groups) > KEEP:
                self._groups.popitem(last=False)
            return column

    def read(self, ref: SampleRef) -> tuple[bytes, str]:
        k, g, row, _ = ref.key
        if ref.label < 0:
            raise SampleFault("no label (the label column is empty for this row)")
        value = self._group(k, g)[row].as_py()
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str):
            if remote.is_remote(value):
                data = remote.fetch(value)
            else:
                with open(Path(self.files[k][0]).parent / value, "rb") as f:
                    data = f.read()
        elif value is None:
            raise SampleFault("no image (the image column is empty for this row)")
        else:
            data = bytes(value)
        return data, content_hash(data)

    def stat(self, ref: SampleRef) -> tuple[int, int]:
        return (ref.key[3], self.files[ref.key[0]][1])


SOURCES.register("parquet", ParquetSource, description="parquet files with an image column (bytes or paths) and a "
                                                        "label column (featcache[data])")
