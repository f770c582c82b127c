"""The ``hf`` kind: a Hugging Face ``DatasetDict`` saved with ``save_to_disk``, or a hub data set
(needs ``datasets``: ``featcache[data]``).

``hf:PATH_OR_NAME[:CONFIG]``: a folder ``load_from_disk`` reads (offline), else a hub name
``load_dataset`` fetches into Hugging Face's own cache (online users). The image column is the one
with the ``Image`` feature, the label column the ``ClassLabel`` one (its names are the class names),
or given: ``#image=COL&label=COL``. Splits ``train``, ``validation`` (or ``val``/``valid``) and
``test`` become train, val and test. Arrow stays memory-mapped: images are read undecoded, one row
at a time. Ids are ``SPLIT/INDEX``; a sample's ``(size, mtime)`` is its split's row count and a
stamp of the split's own fingerprint, so a changed data set is a changed source.
"""

from __future__ import annotations

import logging
import os

from ..errors import SourceError
from .base import SOURCES, SampleFault, SampleRef, Source, content_hash, split_options, stamp

log = logging.getLogger(__name__)

#: Hugging Face split names -> featcache's.
SPLITS = {"train": "train", "validation": "val", "val": "val", "valid": "val", "test": "test"}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise SourceError("hf: sources need the datasets package: pip install 'featcache[data]'.") from None
    return datasets


class HfSource(Source):
    """A Hugging Face ``DatasetDict``: ``SPLIT/INDEX`` samples of its image and class-label columns."""

    kind = "hf"
    splits_from = "the DatasetDict's splits (train, validation, test)"

    def __init__(self, spec: str) -> None:
        ds_lib = _datasets()
        target, options = split_options(str(spec), ("image", "label"))
        name, config = target, None
        if not os.path.exists(target) and ":" in target:
            name, config = target.rsplit(":", 1)
        local = os.path.exists(name)
        if local:
            name = os.path.abspath(name)
        super().__init__(spec=name + (f":{config}" if config else "") +
                         (f"#{str(spec).partition('#')[2]}" if options else ""))
        try:
            loaded = ds_lib.load_from_disk(name) if local else ds_lib.load_dataset(name, config)
        except FileNotFoundError as e:
            raise SourceError(f"'{name}' is neither a data set saved with save_to_disk nor one on the hub "
                              f"({str(e).splitlines()[0][:200]}). Check the path or name.") from None
        except Exception as e:  # the hub's and datasets' own errors: no network, a bad config name
            raise SourceError(f"Cannot open Hugging Face data set '{target}': {str(e).splitlines()[0][:200]}.") from None
        if isinstance(loaded, ds_lib.Dataset):
            loaded = {"train": loaded}
        self._sets = {}
        for hf_split, ds in loaded.items():
            split = SPLITS.get(hf_split)
            if split is None or split in self._sets:
                log.warning("Split '%s' of '%s' is not read (featcache reads train, validation and test).",
                            hf_split, target)
                continue
            self._sets[split] = ds
        if not self._sets:
            raise SourceError(f"Hugging Face data set '{target}' has none of the splits train, validation, test.")
        first = next(iter(self._sets.values()))
        self.image_column, self.label_column = self._columns(ds_lib, first.features, options, target)
        label_feature = first.features[self.label_column]
        if isinstance(label_feature, ds_lib.ClassLabel):
            self.classes = list(label_feature.names)
        self._fingerprints = {}
        for split in ("train", "val", "test"):
            if split not in self._sets:
                continue
            ds = self._sets[split]
            values = ds.data.column(self.label_column).to_pylist()
            if ds._indices is not None:
                values = [values[j] for j in ds._indices.column(0).to_pylist()]
            if not isinstance(label_feature, ds_lib.ClassLabel):
                self.classes = self.classes or [str(i) for i in range(max((v for v in values if v is not None),
                                                                          default=-1) + 1)]
            self._fingerprints[split] = stamp(ds._fingerprint, len(ds))
            self.splits[split] = [SampleRef(f"{split}/{i}", -1 if v is None or v < 0 else int(v), (split, i))
                                  for i, v in enumerate(values)]

    @staticmethod
    def _columns(ds_lib, features, options: dict, target: str) -> tuple[str, str]:
        image = options.get("image") or next((k for k, f in features.items() if isinstance(f, ds_lib.Image)), None)
        label = options.get("label") or next((k for k, f in features.items() if isinstance(f, ds_lib.ClassLabel)),
                                             None)
        for col, what, opt in ((image, "Image", "image"), (label, "ClassLabel", "label")):
            if col is None or col not in features:
                raise SourceError(f"Hugging Face data set '{target}' has no {what} column"
                                  f"{f' {col!r}' if col else ''} among {', '.join(features)}. Name it with #{opt}=COL.")
        return image, label

    @classmethod
    def exists(cls, path: str) -> bool:
        return True  # a hub name is known only once opened

    def describe(self) -> dict:
        return {**super().describe(), "image_column": self.image_column, "label_column": self.label_column}

    def read(self, ref: SampleRef) -> tuple[bytes, str]:
        split, i = ref.key
        if ref.label < 0:
            raise SampleFault("no label (the label column is empty for this row)")
        ds = self._sets[split]
        row = i if ds._indices is None else ds._indices.column(0)[i].as_py()
        value = ds.data.column(self.image_column)[row].as_py()
        if isinstance(value, dict):
            data = value.get("bytes")
            if data is None and value.get("path"):
                with open(value["path"], "rb") as f:
                    data = f.read()
        else:
            data = value
        if data is None:
            raise SampleFault("no image (the image column is empty for this row)")
        data = bytes(data)
        return data, content_hash(data)

    def stat(self, ref: SampleRef) -> tuple[int, int]:
        return (len(self.splits[ref.key[0]]), self._fingerprints[ref.key[0]])


SOURCES.register("hf", HfSource, description="Hugging Face DatasetDict saved with save_to_disk, or a hub name "
                                              "(featcache[data])")
