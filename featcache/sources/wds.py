"""The ``wds`` kind: webdataset tar shards, local, at any fsspec URL, or from ``pipe:CMD``.

``wds:DIR`` reads ``DIR/train/*.tar``, ``DIR/val/*.tar``, ``DIR/test/*.tar`` where those folders
exist, else ``DIR/*.tar`` as train; ``wds:PATTERN`` (a brace pattern ``shard-{000..127}.tar`` or a
glob) is one split, train. A sample is the members sharing a key (webdataset's convention: the
member name up to the first dot of its base name); its image is the first of ``jpg, jpeg, png,
webp`` present, its label the integer in ``cls``. A file name with dots of its own leaves an extension of
several parts (``KEY.a.b.jpg``): as webdataset's decoders do, its last part names it (``jpg``), and the
label is ``cls`` or the ``a.b.cls`` beside it. Options ride in the spec after ``#``:
``image=png`` (the image member), ``label=json:FIELD`` (the label from the ``json`` member),
``classes=FILE`` (class names one per line; default ``classes.txt`` beside the shards, else the
integers).

A tar shard is a unit (:attr:`share_unit`): a sharded run (``--shard I/N``, torchrun) takes whole
shards and lists and reads only its own (every label is read where no ``classes.txt`` names the
classes), and a batch starts anew at each shard, so the share computes exactly the batches of an
unsharded run. (Features therefore equal a folder's bit for bit where shard sizes are multiples of
the batch size; elsewhere the last batch of a shard is smaller and its features may differ from a
folder's in the last bits.) Samples are listed when first asked for, not when the source is opened.

Why not webdataset's own pipeline: it streams samples in one pass, while featcache plans every
sample up front so a rerun computes exactly the missing batches, bit-identical to an uninterrupted
run. So each shard is indexed from its tar headers (member offsets and sizes, a 512-byte read per
member, plus the tiny label members) and an image is read at its offset. A remote shard is fetched
once into a local copy (:mod:`.remote`). Ids are ``SHARD/KEY`` (``SHARD``: the file name without
``.tar``); a sample's ``(size, mtime)`` is its image member's size and its shard's mtime (remote:
etag), so a changed shard is re-read and unchanged ones are not.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import re
import tarfile
from array import array
from pathlib import Path

from ..errors import SourceError
from . import remote
from .base import SOURCES, SPLIT_NAMES, SampleFault, SampleRef, content_hash, split_options, stamp
from .units import UnitSource

#: The image member of a sample: the first of these present (``#image=EXT`` to change).
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def _expand(pattern: str) -> list[str]:
    if "{" not in pattern:
        return [pattern]
    try:
        from braceexpand import braceexpand
    except ImportError:
        raise SourceError(f"Brace pattern '{pattern}' needs braceexpand: pip install 'featcache[data]'.") from None
    return list(braceexpand(pattern))


class WdsSource(UnitSource):
    """webdataset tar shards: ``SHARD/KEY`` samples, the image and ``cls`` members of each key."""

    kind = "wds"
    share_unit = "tar shard"
    splits_from = "train/ val/ test/ sub-folders of shards (else all train; a pattern is train)"

    def __init__(self, spec: str) -> None:
        path, options = split_options(str(spec), ("image", "label", "classes"))
        self.image_keys = tuple(options["image"].split(",")) if "image" in options else IMAGE_KEYS
        label = options.get("label", "cls")
        if label != "cls" and not label.startswith("json:"):
            raise SourceError(f"Source option label={label} must be 'cls' or 'json:FIELD'.")
        self.label_field = label[5:] if label.startswith("json:") else None
        self.remote = remote.is_remote(path)
        if not self.remote:
            path = str(Path(path).expanduser().resolve()) if Path(path).exists() else path
        super().__init__(spec=path + (f"#{str(spec).partition('#')[2]}" if options else ""))
        try:
            layout, base = self._layout(path)
        except SampleFault as e:  # a listing that failed after its retries
            raise SourceError(f"Cannot list the shards of 'wds:{path}': {e}. Check the URL.") from None
        if not any(layout.values()):
            raise SourceError(f"No tar shards found for 'wds:{path}'. Give a folder of *.tar (or of train/ val/ "
                              f"test/ folders of *.tar), a brace pattern or a glob.")
        self.classes_given = self._class_names(options.get("classes"), base)
        self.classes = list(self.classes_given or [])
        #: Shard URLs or paths per split; :meth:`restrict` keeps some of them before any is read.
        self.layout = layout
        #: Per shard read: (local path, stamp); index in the key of each sample.
        self.shards: list[tuple[str, int]] = []
        #: (shard, offset, size) of each listed sample's image member, flat: a sample's key is its position.
        self._where = array("q")
        self._start_units(list_now=self.classes_given is None)  # no class names: the integers up to the top label

    def units(self) -> dict[str, list[str]] | None:
        if self.split_policy:  # a val split carved out of train is made of no shards
            return None
        return {split: [_identity(u, self.remote) for u in urls] for split, urls in self.layout.items()}

    def _keep(self, keep: dict[str, list[int]]) -> None:
        self.layout = {s: [urls[j] for j in keep.get(s, [])] for s, urls in self.layout.items()}

    def _list_units(self) -> tuple[dict[str, list[SampleRef]], dict[str, list[int]]]:
        fetched = self._localise([u for urls in self.layout.values() for u in urls])
        labels: list[int] = []
        splits: dict[str, list[SampleRef]] = {}
        starts: dict[str, list[int]] = {}
        for split, urls in self.layout.items():
            refs: list[SampleRef] = []
            starts[split] = []
            for url in urls:
                starts[split].append(len(refs))
                refs.extend(self._index(url, *fetched[url], labels))
            splits[split] = refs
        top = max(labels, default=-1)
        if self.classes_given is not None:
            if top >= len(self.classes_given):
                raise SourceError(f"'wds:{self.spec}' has label {top} but only {len(self.classes_given)} class names. "
                                  f"Fix classes.txt (one name per line, line index = cls).")
        else:
            self.classes = [str(i) for i in range(top + 1)]
        return splits, starts

    @classmethod
    def exists(cls, path: str) -> bool:
        path = split_options(path, ("image", "label", "classes"))[0]
        return remote.is_remote(path) or os.path.isdir(path) or any(os.path.exists(p) for p in _local_matches(path))

    def describe(self) -> dict:
        return {**super().describe(), "image_keys": list(self.image_keys), "label": self.label_field or "cls"}

    # --- listing ---------------------------------------------------------------------------

    def _layout(self, path: str) -> tuple[dict[str, list[str]], str | None]:
        """Shard URLs or paths per split, and the folder ``classes.txt`` is looked for in."""
        if self.remote:
            if path.startswith("pipe:") or "{" in path:
                return {"train": _expand(path)}, None if path.startswith("pipe:") else path.rsplit("/", 1)[0]
            if any(c in path for c in "*?["):
                return {"train": remote.glob(path)}, path.rsplit("/", 1)[0]
            root = path.rstrip("/")
            by_split = {s: _remote_glob(f"{root}/{s}/*.tar") for s in SPLIT_NAMES}
            by_split = {s: v for s, v in by_split.items() if v}
            return (by_split or {"train": remote.glob(f"{root}/*.tar")}), root
        if os.path.isdir(path):
            by_split = {s: sorted(globlib.glob(os.path.join(path, s, "*.tar"))) for s in SPLIT_NAMES
                        if os.path.isdir(os.path.join(path, s))}
            return (by_split or {"train": sorted(globlib.glob(os.path.join(path, "*.tar")))}), path
        return {"train": _local_matches(path)}, os.path.dirname(path) or "."

    def _class_names(self, given: str | None, base: str | None) -> list[str] | None:
        where = given or (f"{base}/classes.txt" if base else None)
        if where is None:
            return None
        try:
            text = remote.fetch(where).decode("utf-8") if remote.is_remote(where) else \
                Path(where).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            if given:
                raise SourceError(f"Class names file '{given}' cannot be read ({e}).") from None
            return None
        return [line.strip() for line in text.splitlines() if line.strip()]

    def _localise(self, urls: list[str]) -> dict[str, tuple[str | None, int, str | None]]:
        """Per shard: (local path or None, stamp, fault reason or None). Remote shards are fetched
        in a bounded pool."""
        out: dict[str, tuple[str | None, int, str | None]] = {}
        if not self.remote:
            for u in urls:
                try:
                    st = os.stat(u)
                    out[u] = (u, st.st_mtime_ns, None)
                except OSError as e:
                    out[u] = (None, stamp(u, "missing"), f"cannot read shard: {e.strerror or e}")
            return out
        infos = {}
        for u in urls:
            try:
                infos[u] = remote.info(u)["stamp"]
            except SampleFault as e:
                out[u] = (None, stamp(u, str(e)), str(e))
        todo = [u for u in urls if u in infos]
        for u, got in zip(todo, remote.local_copies([(u, infos[u]) for u in todo])):
            out[u] = (None, stamp(u, str(got)), str(got)) if isinstance(got, SampleFault) else (str(got[0]), got[1], None)
        return out

    def _index(self, url: str, local: str | None, shard_stamp: int, fault: str | None,
               labels: list[int]) -> list[SampleRef]:
        name = url.rstrip("/").split("/")[-1]
        name = name[:-4] if name.endswith(".tar") else name
        if fault is not None:  # the shard is one failed row, recorded with its reason
            return [SampleRef(f"{name}/", -1, ("fault", fault, shard_stamp))]
        k = len(self.shards)
        self.shards.append((local, shard_stamp))
        size = os.path.getsize(local)
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            tf = tarfile.open(local, "r:")
        except (tarfile.TarError, OSError) as e:
            return [SampleRef(f"{name}/", -1, ("fault", f"truncated or damaged tar shard: {e}", shard_stamp))]
        cut = None
        with tf:
            try:
                for m in tf:
                    match = _MEMBER.match(m.name)
                    if m.isfile() and match:
                        samples.setdefault(match.group(1), {})[match.group(2).lower()] = m
                tf.fileobj.seek(tf.offset)
                end = tf.fileobj.read(1024)
                if len(end) < 1024 or end.strip(b"\0"):  # tarfile stops quietly at a cut header
                    cut = f"truncated tar: the shard ends inside a header after {len(samples)} samples"
            except (tarfile.TarError, OSError) as e:  # a member's data cut short: its sample is a fault below
                cut = None if str(e) == "unexpected end of data" else f"truncated or damaged tar shard: {e}"
            refs = [self._sample(f"{name}/{key}", members, k, size, shard_stamp, tf, labels)
                    for key, members in samples.items()]
        if cut is not None:  # an empty tar is no fault: it has no samples
            refs.append(SampleRef(f"{name}/", -1, ("fault", cut, shard_stamp)))
        return refs

    def _sample(self, id_: str, members: dict, k: int, size: int, shard_stamp: int, tf, labels: list[int]) -> SampleRef:
        def fault(reason: str) -> SampleRef:
            return SampleRef(id_, -1, ("fault", reason, shard_stamp))

        found = _field(members, self.image_keys)
        if isinstance(found, str):
            return fault(found)
        if found is None:
            return fault(f"no image member ({', '.join(self.image_keys)}) in this sample")
        image_ext, image = found
        if image.offset_data + image.size > size:
            return fault(f"truncated tar: member '{image.name}' ends past the end of the shard")
        # The label beside the image: 'cls', else 'X.cls' where the image is 'X.jpg'.
        wanted = "json" if self.label_field else "cls"
        prefix = image_ext.rsplit(".", 1)[0] if "." in image_ext else None
        member = members.get(wanted) or (members.get(f"{prefix}.{wanted}") if prefix else None)
        if member is None or member.offset_data + member.size > size:
            return fault("no label (" + (f"json field '{self.label_field}'" if self.label_field else "cls member") + ")")
        raw = tf.extractfile(member).read()
        try:
            value = json.loads(raw)[self.label_field] if self.label_field else raw.decode().strip()
            if isinstance(value, str) and self.classes_given and value in self.classes_given:
                label = self.classes_given.index(value)
            else:
                label = int(value)
            if label < 0:
                raise ValueError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return fault(f"label {raw[:40]!r} is not a class index")
        labels.append(label)
        # One int per sample: its (shard, offset, size) live in a flat array (a tuple each took 120 bytes).
        self._where.extend((k, image.offset_data, image.size))
        return SampleRef(id_, label, len(self._where) // 3 - 1)

    # --- reading ---------------------------------------------------------------------------

    def read(self, ref: SampleRef) -> tuple[bytes, str]:
        if isinstance(ref.key, tuple):  # ("fault", reason, shard stamp)
            raise SampleFault(ref.key[1])
        k, offset, size = self._where[3 * ref.key:3 * ref.key + 3]
        fd = os.open(self.shards[k][0], os.O_RDONLY)
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        if len(data) != size:
            raise SampleFault(f"truncated tar: {size - len(data)} bytes of '{ref.id}' missing")
        return data, content_hash(data)

    def stat(self, ref: SampleRef) -> tuple[int, int]:
        if isinstance(ref.key, tuple):
            return (0, ref.key[2])
        return (self._where[3 * ref.key + 2], self.shards[self._where[3 * ref.key]][1])


def _field(members: dict, names: tuple[str, ...]):
    """(extension, member) of the first of ``names`` in a sample's ``members`` (extension -> member).

    webdataset's key is the member name up to the first dot of its base name, so a file name with
    dots of its own (``F.pergan.28(f).jpg`` under key ``000201_F``) leaves an extension of several
    parts (``pergan.28(f).jpg``); webdataset's decoders go by its last part, and so does this: an
    exact extension first, else the one extension ending in ``.NAME``. Several such: a reason.
    """
    for name in names:
        if name in members:
            return name, members[name]
        dotted = [e for e in members if e.endswith("." + name)]
        if len(dotted) == 1:
            return dotted[0], members[dotted[0]]
        if dotted:
            return (f"several image members ({', '.join(sorted(dotted))}); name one with --image-key "
                    f"(image=EXT in the spec)")
    return None


def _identity(url: str, is_remote: bool) -> str:
    """What names a shard in a sharded run's plan: its URL, and for a local file its size and mtime
    (a remote one is not asked: every rank would ask for every shard)."""
    if is_remote:
        return url
    try:
        st = os.stat(url)
    except OSError:
        return f"{url}\x1fmissing"
    return f"{url}\x1f{st.st_size}\x1f{st.st_mtime_ns}"


def _remote_glob(pattern: str) -> list[str]:
    try:
        return remote.glob(pattern)
    except SampleFault:  # no such folder
        return []


def _local_matches(pattern: str) -> list[str]:
    out = []
    for p in _expand(pattern):
        out.extend(sorted(globlib.glob(p)) if any(c in p for c in "*?[") else [p])  # a missing shard: a fault
    return out


SOURCES.register("wds", WdsSource, description="webdataset tar shards: wds:DIR, wds:PATTERN or wds:URL "
                                                "(featcache[data] for URLs and brace patterns)")
