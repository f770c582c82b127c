"""The HDF5 feature cache: schema, fingerprint and validated reader (the writer is in
:mod:`featcache.store.writer`, the partial store of an unfinished extraction in
:mod:`featcache.extraction.partial`).

Final file (readable with plain h5py; see the README for the schema)::

    /                      attrs: format, schema_version, fingerprint (JSON), fingerprint_hash,
                                  classes (JSON), layers (JSON), timings (JSON), created,
                                  checksums ("fletcher32": every non-empty dataset has a checksum per
                                  chunk; absent in caches made before), notes (JSON)
    /<split>/features/<layer>   (N, D) or (N, C, H, W), float16/float32, chunked along N
    /<split>/labels             (N,) int64
    /<split>/ids                (N,) UTF-8 strings (path relative to the source, or split/index)
    /<split>/hashes             (N,) 32-char hex SHA-256 (first 128 bits) of the sample's bytes
    /<split>/stat               (N, 2) int64 (size, mtime_ns) of the file when it was read
    /<split>/batch_n            (N,) int32 images in the forward pass that computed the row
    /train/views/<layer>        (N, K, ...) features of K augmented views (``--views K`` only)
    /failed/{split,ids,reasons,stat}   samples that could not be read, and why

While extraction runs, finished batches go to ``<final>.partial/`` as one ``.npz`` per batch,
each written to a temporary name and renamed into place (then the folder fsynced), so a crash
loses at most the batches in flight. A chunk is named by the SHA-256 of its bytes and verified
before it is reused; damaged or foreign partial state is renamed to ``*.damaged``. The final
file is assembled into ``<final>.tmp`` and renamed: nothing is ever half-written under the
final name.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheDamagedError, CacheError
from ..sources import CONTENT_HASH

log = logging.getLogger(__name__)

FORMAT = "featcache"
#: Names of the backbones' pooled layers (``featcache.backbones`` PRE_LOGITS and OUTPUT, not imported:
#: the store does not import torch): the default layer of a cache whose last layer is one of them.
POOLED_LAYERS = ("pre_logits", "output")
SCHEMA_VERSION = 1
#: The file name suffix of every cache file (shard files included).
SUFFIX = ".h5"
HASH_DTYPE = "S32"
#: Target bytes per HDF5 chunk along N (see BENCHMARKS.md for how it was chosen).
CHUNK_BYTES = 1 << 20
#: The checksum every dataset of a cache carries per chunk (HDF5's fletcher32 filter: reading a
#: damaged chunk fails), recorded in the ``checksums`` attribute.
CHECKSUMS = "fletcher32"
#: Bytes read at a time when a whole cache is verified.
VERIFY_BYTES = 64 << 20


@dataclass(frozen=True)
class CacheFingerprint:
    """Everything that changes a feature value. Two extractions with equal fingerprints are
    interchangeable; a cache is only ever reused under an equal fingerprint."""

    backbone: dict
    layers: tuple[str, ...]
    pool: str
    preprocess: dict
    precision: str
    dtype: str
    channels_last: bool
    device_type: str
    source: dict
    augment: dict | None = None
    fold_bn: bool = False
    versions: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    #: torch.compile fuses operations: features differ from eager ones by float rounding.
    compile: bool = False
    #: Who decodes JPEGs: PIL in loader workers, or torchvision on the extraction device.
    decode: str = "pil"
    #: The algorithm of the per-sample content hashes (incremental runs, augmented-view seeds).
    content_hash: str = CONTENT_HASH

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        # Absent when at their defaults, so caches made before these fields keep their fingerprints.
        if not self.compile:
            del d["compile"]
        if self.decode == "pil":
            del d["decode"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
    return keep.strip("-.")[:40] or "x"


def cache_file_name(fp: CacheFingerprint) -> str:
    src = fp.source.get("spec", "source")
    return f"{_slug(fp.backbone['name'])}__{_slug(Path(src).name)}__{fp.hash}{SUFFIX}"


def feature_chunks(shape: tuple[int, ...], itemsize: int, n: int) -> tuple[int, ...]:
    row = int(np.prod(shape)) * itemsize
    rows = max(1, min(n, CHUNK_BYTES // max(row, 1)))
    return (rows, *shape)


# --- reading ------------------------------------------------------------------------------


@dataclass
class SplitData:
    """One split held in memory."""

    features: dict[str, np.ndarray]
    labels: np.ndarray
    ids: list[str]


class FeatureCache:
    """Read access to a finished cache file. Use :func:`open_cache`.

    Every structural fact is checked on open, so a truncated or hand-edited file gives a
    :class:`CacheError` naming the problem rather than a wrong answer later.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise CacheError(f"'{self.path}' is a folder, not a cache file. Run 'featcache ls --cache-dir "
                             f"{self.path}' to list the caches in it.")
        if not self.path.is_file():
            raise CacheError(f"Cache file '{self.path}' does not exist. Run 'featcache ls' to list caches.")
        try:
            self._h5 = h5py.File(self.path, "r", locking=False)
        except OSError as e:
            raise CacheError(f"'{self.path}' is not a readable HDF5 file ({e}). Re-extract it.") from None
        self._verified: dict | None = None
        try:
            self._validate()
        except CacheError:
            self._h5.close()
            raise
        except Exception as e:  # anything h5py or json raise on a damaged file
            self._h5.close()
            raise damaged(self.path, e) from None

    def _attr_json(self, key: str, kind: type):
        raw = self._h5.attrs.get(key)
        if isinstance(raw, (bytes, np.bytes_)):
            raw = _text(raw)
        if not isinstance(raw, str):
            raise CacheError(f"Cache file '{self.path}' has no valid '{key}' attribute. Re-extract it.")
        value = json.loads(raw)
        if not isinstance(value, kind):
            raise CacheError(f"Cache file '{self.path}': attribute '{key}' is not a {kind.__name__}.")
        return value

    def _validate(self) -> None:
        h = self._h5
        fmt = h.attrs.get("format")
        if fmt not in (FORMAT, FORMAT.encode()):
            raise CacheError(f"'{self.path}' is not a featcache cache (no format attribute). Re-extract it.")
        version = h.attrs.get("schema_version")
        if not isinstance(version, (int, np.integer)) or int(version) != SCHEMA_VERSION:
            raise CacheError(
                f"Cache file '{self.path}' has schema version {version!r}; this featcache reads "
                f"{SCHEMA_VERSION}. Re-extract it."
            )
        self.fingerprint: dict = self._attr_json("fingerprint", dict)
        self.classes: list[str] = self._attr_json("classes", list)
        self.layers: list[str] = self._attr_json("layers", list)
        self.timings: dict = self._attr_json("timings", dict)
        #: (I, N) for a shard file of a sharded extraction, else None.
        shard = self._attr_json("shard", list) if "shard" in self._h5.attrs else None
        self.shard: tuple[int, int] | None = tuple(shard) if shard else None
        #: What the source listing skipped or found odd, each {"split", "id", "note"} (absent in older caches).
        self.notes: list = self._attr_json("notes", list) if "notes" in self._h5.attrs else []
        if not all(isinstance(n, dict) and all(isinstance(v, str) for v in n.values()) for n in self.notes):
            raise CacheError(f"Cache file '{self.path}': its notes attribute must be a list of objects of strings.")
        #: The options of the extraction (provenance, e.g. a weights file path); not fingerprinted.
        self.extract_config: dict = self._attr_json("extract_config", dict) if "extract_config" in self._h5.attrs else {}
        if not self.layers or not all(isinstance(x, str) for x in self.layers):
            raise CacheError(f"Cache file '{self.path}': its layers attribute must be a non-empty list of names.")
        if not all(isinstance(x, str) for x in self.classes):
            raise CacheError(f"Cache file '{self.path}': its classes attribute must be a list of names.")
        if list(self.fingerprint.get("layers", [])) != self.layers:
            raise CacheError(f"Cache file '{self.path}': its layers disagree with its fingerprint.")
        self.splits: list[str] = [k for k in h.keys() if k != "failed"]
        self._check_virtual_sources()
        for split in self.splits:
            self._validate_split(split)
        if "failed" in h:
            self._validate_failed()

    def _validate_split(self, split: str) -> None:
        """The datasets of one split: present, of one length, of the right kinds and storage."""
        g = self._h5[split]
        want_dtype = self.fingerprint.get("dtype")
        if not isinstance(g, h5py.Group):
            raise CacheError(f"Cache file '{self.path}': '{split}' is not a split group.")
        for key in ("labels", "ids", "hashes", "stat"):
            if not isinstance(g.get(key), h5py.Dataset):
                raise CacheError(f"Cache file '{self.path}': split '{split}' has no '{key}'.")
        n = g["labels"].shape[0] if g["labels"].ndim == 1 else -1
        if n < 0 or g["ids"].shape != (n,) or g["hashes"].shape != (n,) or g["stat"].shape != (n, 2):
            raise CacheError(f"Cache file '{self.path}': split '{split}' has datasets of different lengths.")
        _check_kind(self.path, f"{split}/labels", g["labels"], "i")
        _check_kind(self.path, f"{split}/stat", g["stat"], "i")
        _check_kind(self.path, f"{split}/hashes", g["hashes"], "S")
        if "batch_n" in g:
            if not isinstance(g["batch_n"], h5py.Dataset) or g["batch_n"].shape != (n,):
                raise CacheError(f"Cache file '{self.path}': '{split}/batch_n' must have one value per row.")
            _check_kind(self.path, f"{split}/batch_n", g["batch_n"], "i")
        if h5py.check_string_dtype(g["ids"].dtype) is None:
            raise CacheError(f"Cache file '{self.path}': '{split}/ids' must hold strings.")
        for layer in self.layers:
            ds = g.get(f"features/{layer}")
            if not isinstance(ds, h5py.Dataset) or ds.ndim < 2 or ds.shape[:1] != (n,):
                raise CacheError(
                    f"Cache file '{self.path}': split '{split}' lacks features for layer '{layer}' "
                    f"with {n} rows."
                )
            if ds.dtype.kind != "f" or (want_dtype and ds.dtype != np.dtype(want_dtype)):
                raise CacheError(f"Cache file '{self.path}': features of '{layer}' are {ds.dtype}, its "
                                 f"fingerprint says {want_dtype}.")
            _check_storage(self.path, f"{split}/features/{layer}", ds)
            vs = g.get(f"views/{layer}")
            if vs is not None:
                k = (self.fingerprint.get("augment") or {}).get("views")
                if not isinstance(vs, h5py.Dataset) or vs.shape[:2] != (n, k) or vs.shape[2:] != ds.shape[1:] \
                        or vs.dtype != ds.dtype:
                    raise CacheError(f"Cache file '{self.path}': views of '{layer}' in split '{split}' do not "
                                     f"match its features and fingerprint.")
                _check_storage(self.path, f"{split}/views/{layer}", vs)
        if n:
            with self._guard(f"{split}/labels"):
                lab = g["labels"][()]
            if lab.min() < 0 or lab.max() >= len(self.classes):
                raise CacheError(f"Cache file '{self.path}': split '{split}' has labels outside its classes.")

    def _validate_failed(self) -> None:
        """The record of samples that could not be read."""
        g = self._h5["failed"]
        keys = ("split", "ids", "reasons", "stat", "labels")
        if not isinstance(g, h5py.Group) or not all(isinstance(g.get(k), h5py.Dataset) for k in keys):
            raise CacheError(f"Cache file '{self.path}': its 'failed' group lacks one of {', '.join(keys)}.")
        m = g["ids"].shape[0] if g["ids"].ndim == 1 else -1
        if m < 0 or any(g[k].shape[:1] != (m,) for k in keys) or g["stat"].shape != (m, 2):
            raise CacheError(f"Cache file '{self.path}': its 'failed' datasets have different lengths.")
        for k in ("split", "ids", "reasons"):
            if h5py.check_string_dtype(g[k].dtype) is None:
                raise CacheError(f"Cache file '{self.path}': 'failed/{k}' must hold strings.")
        _check_kind(self.path, "failed/stat", g["stat"], "i")
        _check_kind(self.path, "failed/labels", g["labels"], "i")

    @contextlib.contextmanager
    def _guard(self, what: str = "", errors: tuple = (OSError, ValueError, TypeError, KeyError, IndexError,
                                                        RuntimeError)):
        """Reading data the validation did not touch: damage (a chunk failing its checksum
        included) surfaces as a :class:`CacheDamagedError`."""
        try:
            yield
        except CacheError:
            raise
        except errors as e:
            raise damaged(self.path, e, what) from None

    def text_attr(self, key: str) -> str | None:
        """A string attribute of the file (None when absent)."""
        return _text(self._h5.attrs[key]) if key in self._h5.attrs else None

    def _check_virtual_sources(self) -> None:
        """A cache assembled from shards reads their files: a missing one would read as fill values,
        and one rewritten since (another plan: the source changed) would give other images' features
        under these ids. Each shard file's digest must be the one recorded at assembly."""
        names = json.loads(_text(self._h5.attrs.get("shards", "[]")) or "[]")
        if not isinstance(names, list):
            raise CacheError(f"Cache file '{self.path}': its 'shards' attribute is not a list.")
        missing = [n for n in names if not isinstance(n, str) or not (self.path.parent / n).is_file()]
        if missing:
            raise CacheError(
                f"Cache file '{self.path}' presents shard files that are missing: {', '.join(map(str, missing))}. "
                f"Keep the shard files beside it, or assemble a self-contained copy with 'featcache merge --copy'."
            )
        if not names:
            return
        digests = json.loads(_text(self._h5.attrs.get("shard_digests", "null")) or "null")
        if not isinstance(digests, list) or len(digests) != len(names):
            raise CacheError(f"Cache file '{self.path}' does not record the digests of its shard files (made by "
                             f"an older featcache). Re-run the same extraction for every shard (each --shard I/N, "
                             f"or the same torchrun command) to re-assemble it.")
        changed = [n for n, want in zip(names, digests) if read_text_attr(self.path.parent / n, "digest") != want]
        if changed:
            raise CacheError(
                f"Cache file '{self.path}' presents shard files that changed after it was assembled: "
                f"{', '.join(changed)}. Re-run the same extraction for every shard (each --shard I/N, or the "
                f"same torchrun command) to re-assemble it."
            )

    def digest(self) -> str:
        """The content digest of the open file (:func:`shard_digest`)."""
        return shard_digest(self._h5)

    # context manager
    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def resolve_layer(self, layer: str | None) -> str:
        """``layer`` checked against the cached layers (None: the pooled layer of a cache of several
        layers that ends with it, as a default extraction of a small data set does; else the first)."""
        if layer is None:
            return self.layers[-1] if self.layers[-1] in POOLED_LAYERS else self.layers[0]
        if layer not in self.layers:
            raise CacheError(
                f"Layer '{layer}' is not in cache '{self.path.name}'. It has: {', '.join(self.layers)}."
            )
        return layer

    def _split(self, split: str) -> h5py.Group:
        if split not in self.splits:
            raise CacheError(
                f"Split '{split}' is not in cache '{self.path.name}'. It has: {', '.join(self.splits)}."
            )
        return self._h5[split]

    def features(self, split: str, layer: str | None = None) -> "CheckedDataset":
        """The on-disk dataset (N, ...) of one layer; slice it to read (damage raises
        :class:`CacheDamagedError`)."""
        name = f"features/{self.resolve_layer(layer)}"
        return CheckedDataset(self._split(split)[name], self, f"{split}/{name}")

    def labels(self, split: str) -> np.ndarray:
        with self._guard(f"{split}/labels"):
            return self._split(split)["labels"][()].astype(np.int64)

    def ids(self, split: str) -> list[str]:
        with self._guard(f"{split}/ids"):
            return list(self._split(split)["ids"].asstr("utf-8")[()])

    def hashes(self, split: str) -> np.ndarray:
        with self._guard(f"{split}/hashes"):
            return self._split(split)["hashes"][()]

    def stat(self, split: str) -> np.ndarray:
        with self._guard(f"{split}/stat"):
            return self._split(split)["stat"][()]

    def batch_n(self, split: str) -> np.ndarray | None:
        """Per row, how many images the forward pass that computed it held (None: not recorded)."""
        g = self._split(split)
        if "batch_n" not in g:
            return None
        with self._guard(f"{split}/batch_n"):
            return g["batch_n"][()]

    def has_views(self, split: str) -> bool:
        return f"views/{self.layers[0]}" in self._split(split)

    def views(self, split: str, layer: str | None = None) -> "CheckedDataset":
        """Augmented-view features (N, views, ...) of one layer (``extract --views K``)."""
        g = self._split(split)
        name = f"views/{self.resolve_layer(layer)}"
        if name not in g:
            raise CacheError(f"Split '{split}' of cache '{self.path.name}' has no augmented views. "
                             f"Extract with views=K (featcache extract --views K).")
        return CheckedDataset(g[name], self, f"{split}/{name}")

    def n(self, split: str) -> int:
        return int(self._split(split)["labels"].shape[0])

    def rows(self, split: str, start: int, stop: int, layer: str | None = None) -> SplitData:
        """Rows ``[start, stop)`` of one split, features as stored: readers that stream a split in
        bounded blocks (exports, indexes) hold one block, never the whole split."""
        g, name = self._split(split), self.resolve_layer(layer)
        with self._guard():
            return SplitData({name: g[f"features/{name}"][start:stop]}, g["labels"][start:stop].astype(np.int64),
                             list(g["ids"].asstr("utf-8")[start:stop]))

    def load(self, split: str, layer: str | None = None, *, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Read one split into memory: features (N, ...) as ``dtype`` and labels (N,)."""
        ds = self.features(split, layer)
        out = np.empty(ds.shape, dtype=ds.dtype)
        if ds.shape[0]:
            ds.read_direct(out)
        return out.astype(dtype, copy=False), self.labels(split)

    @property
    def checksums(self) -> str | None:
        """How the data is checksummed (``"fletcher32"`` per chunk), or None for a cache made before
        featcache checksummed its data: damaged bytes there cannot be told from features."""
        value = self.text_attr("checksums")
        return value if value and value != "none" else None

    def verify(self) -> dict:
        """Read every dataset of the file whole, so that every chunk's checksum is checked.

        Returns ``{"checksums", "datasets", "bytes"}``; raises :class:`CacheDamagedError` naming the
        first dataset that fails. Reading is all it costs (see the store benchmark).
        """
        if self._verified is not None:
            return self._verified
        count = nbytes = 0
        names: list[str] = []
        self._h5.visit(lambda name: names.append(name) if isinstance(self._h5[name], h5py.Dataset) else None)
        for name in names:
            ds = self._h5[name]
            rows = max(1, VERIFY_BYTES // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:]))))
            with self._guard(name):
                for a in range(0, ds.shape[0] if ds.ndim else 1, rows):
                    nbytes += ds[a:a + rows].nbytes if ds.ndim else np.asarray(ds[()]).nbytes
            count += 1
        self._verified = {"checksums": self.checksums or "none", "datasets": count, "bytes": nbytes}
        return self._verified

    @property
    def verified(self) -> bool:
        """Whether :meth:`verify` read the whole file intact."""
        return self._verified is not None

    def readable(self, split: str, start: int, stop: int) -> bool:
        """True when the features (and views) of rows [start, stop) of ``split`` read intact."""
        try:
            for layer in self.layers:
                self.features(split, layer)[start:stop]
                if self.has_views(split):
                    self.views(split, layer)[start:stop]
        except CacheDamagedError:
            return False
        return True

    @functools.cached_property
    def failed(self) -> list[dict]:
        """The samples the extraction could not read, read once (the file is open read-only and
        replaced, never rewritten, by a later run)."""
        if "failed" not in self._h5:
            return []
        g = self._h5["failed"]
        with self._guard("failed"):
            splits, ids, reasons = (g[k].asstr("utf-8")[()] for k in ("split", "ids", "reasons"))
            stat = g["stat"][()]
            labels = g["labels"][()]
        return [{"split": s, "id": i, "reason": r, "stat": tuple(int(v) for v in st), "label": int(lab)}
                for s, i, r, st, lab in zip(splits, ids, reasons, stat, labels)]

    def info(self) -> dict:
        """A JSON-able summary: fingerprint, splits with shapes, failures."""
        return {
            "cache": str(self.path),
            "fingerprint_hash": _text(self._h5.attrs.get("fingerprint_hash", "")),
            "checksums": self.checksums or "none",
            "fingerprint": self.fingerprint,
            "classes": self.classes,
            "layers": self.layers,
            "splits": {
                s: {"n": self.n(s), "features": {l: {"shape": list(self.features(s, l).shape),
                                                     "dtype": str(self.features(s, l).dtype)}
                                                 for l in self.layers}}
                for s in self.splits
            },
            "failed": [{k: v for k, v in f.items() if k in ("split", "id", "reason")} for f in self.failed],
            "notes": self.notes,
            "timings": self.timings,
            "bytes": self.path.stat().st_size,
        }


class CheckedDataset:
    """A cache's on-disk dataset that reads like an ``h5py.Dataset`` (slicing, ``read_direct``,
    ``shape``, ``dtype``, ``chunks``) and turns a failed read (a chunk failing its checksum, a
    damaged file) into a :class:`CacheDamagedError` naming the cache and the fix."""

    def __init__(self, ds: h5py.Dataset, cache: FeatureCache, name: str) -> None:
        self._ds, self._cache, self.name = ds, cache, name

    #: What a failed read raises in h5py (a bad index is the caller's error, and stays one).
    READ_ERRORS = (OSError, RuntimeError)

    def __getattr__(self, key: str):
        if key.startswith("_"):
            raise AttributeError(key)
        return getattr(self._ds, key)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, key):
        with self._cache._guard(self.name, self.READ_ERRORS):
            return self._ds[key]

    def __array__(self, dtype=None, copy=None):
        out = self[()]
        return out if dtype is None else out.astype(dtype)

    def read_direct(self, dest: np.ndarray, *args, **kwargs) -> None:
        with self._cache._guard(self.name, self.READ_ERRORS):
            self._ds.read_direct(dest, *args, **kwargs)


def damaged(path: Path, e: BaseException, what: str = "") -> CacheDamagedError:
    """The error of a cache whose data cannot be read as written (a checksum mismatch included);
    its ``detail`` says where and what failed, without the fix."""
    where = f" in '{what}'" if what else ""
    err = CacheDamagedError(f"Cache file '{path}' is damaged{where} ({type(e).__name__}: {e}): its data fails its "
                            f"checksum or cannot be read, and is never used. Run the same 'featcache extract' command "
                            f"again: it computes the damaged rows again and replaces the file.")
    err.detail = f"'{path}' is damaged{where} ({type(e).__name__}: {e})"
    return err


def read_text_attr(path: Path, key: str) -> str | None:
    """One string attribute of an HDF5 file, or None when the file or attribute cannot be read."""
    try:
        with h5py.File(path, "r", locking=False) as h:
            return _text(h.attrs[key]) if key in h.attrs else None
    except (OSError, ValueError, KeyError):
        return None


def shard_digest(h: h5py.File) -> str:
    """What a shard file covers and holds: its fingerprint, plan and share, and per split its ids,
    labels, content hashes and stat, and its failed samples (SHA-256, first 128 bits)."""
    d = hashlib.sha256()
    for key in ("fingerprint_hash", "plan_hash", "shard"):
        d.update(f"{key}={_text(h.attrs.get(key, ''))}\n".encode())
    groups = [(split, ("ids", "labels", "hashes", "stat")) for split in sorted(k for k in h.keys() if k != "failed")]
    for name, keys in groups + ([("failed", ("split", "ids", "reasons"))] if "failed" in h else []):
        for key in keys:
            a = np.ascontiguousarray(h[name][key][()])
            d.update(f"{name}/{key}:{a.dtype.str}:{a.shape}\n".encode())
            d.update(a.tobytes())
    return d.hexdigest()[:32]


def _text(value) -> str:
    return bytes(value).decode("utf-8", errors="replace") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _check_kind(path: Path, name: str, ds: h5py.Dataset, kind: str) -> None:
    if ds.dtype.kind not in ((kind, "u") if kind == "i" else (kind,)):
        raise CacheError(f"Cache file '{path}': '{name}' has dtype {ds.dtype}, expected "
                         f"{ {'i': 'integers', 'S': 'fixed-length bytes'}[kind] }.")


def _check_storage(path: Path, name: str, ds: h5py.Dataset) -> None:
    """Refuse data kept in external raw files (a hostile cache could point at any file) and
    filters this HDF5 cannot decode."""
    plist = ds.id.get_create_plist()
    if plist.get_external_count() > 0:
        raise CacheError(f"Cache file '{path}': '{name}' keeps its data in an external file; featcache "
                         f"caches never do. Re-extract it.")
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if not h5py.h5z.filter_avail(code):
            raise CacheError(f"Cache file '{path}': '{name}' needs HDF5 filter {code}, which is not available.")


def open_cache(path: str | os.PathLike) -> FeatureCache:
    """Open a finished cache file for reading (validated; raises :class:`CacheError`)."""
    return FeatureCache(path)


def cache_files(cache_dir: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """The cache files in a folder (shard files included), sorted; ``pattern`` narrows the part of
    the name before the suffix."""
    return sorted(Path(cache_dir).glob(pattern + SUFFIX))


def list_caches(cache_dir: str | os.PathLike = "cache") -> list[dict]:
    """Caches in a folder: path, size, modification date, backbone, source, splits.

    A cache assembled from shard files (virtual datasets) lists them under ``shards`` and counts
    their bytes as its own; those shard files are not listed again as caches of their own.
    """
    out, presented = [], set()
    for p in cache_files(cache_dir):
        st = p.stat()
        row = {"cache": str(p), "bytes": st.st_size, "modified": st.st_mtime}
        try:
            with open_cache(p) as c:
                row.update(backbone=c.fingerprint["backbone"]["name"], source=c.fingerprint["source"].get("spec"),
                           layers=c.layers, splits={s: c.n(s) for s in c.splits})
                shards = json.loads(_text(c._h5.attrs.get("shards", "[]")) or "[]")
        except CacheError as e:
            row["error"] = str(e)
            shards = []
        if shards:
            row["shards"] = shards
            row["bytes"] += sum((p.parent / n).stat().st_size for n in shards if (p.parent / n).is_file())
            presented.update(shards)
        out.append(row)
    return [r for r in out if Path(r["cache"]).name not in presented]
