"""Writing the HDF5 feature cache: the one writer of its datasets (:class:`CacheWriter`, used by
extraction, shard assembly and merge), the lock of a cache being written, and committing files
(temporary name, fsync, rename; damaged state set aside). The schema is described in
:mod:`featcache.store.cache`."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from ..errors import CacheLockedError
from ..common.files import fsync_dir, reserve
from .cache import CHECKSUMS, FORMAT, HASH_DTYPE, SCHEMA_VERSION, feature_chunks, shard_digest

log = logging.getLogger(__name__)


def commit_file(tmp: Path, final: Path) -> None:
    """Make a fully written temporary file durable and move it to its final name atomically."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


#: errnos of file systems without working ``flock`` (some Lustre and NFS mounts).
_NO_LOCKING = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


class CacheLock:
    """An exclusive ``flock`` on ``<cache>.lock`` while a cache is written.

    On a file system without working locks (``flock`` fails with ENOSYS/ENOLCK/EOPNOTSUPP, as on
    some Lustre and NFS mounts) the lock is skipped with one warning: every file is still written
    under a temporary name and renamed, so a crash leaves nothing half-written, but two processes
    writing the same cache at once are then not detected.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        check_lock_path(path)
        self.fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise CacheLockedError(
                f"Another process is writing '{path.with_suffix('')}' (lock '{path}' is held). Wait for "
                f"it to finish; a finished cache is then reused."
            ) from None
        except OSError as e:
            if e.errno not in _NO_LOCKING:
                os.close(self.fd)
                raise
            log.warning("file locking is not supported where '%s' lives (%s): going on without the lock; two "
                        "processes writing this cache at once would not be detected", path, e.strerror or e)
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def create_h5(path: Path) -> h5py.File:
    """A new HDF5 file to write a cache into. HDF5's own file locking is off: the file has a
    private temporary name under a :class:`CacheLock`, and that locking fails with ENOSYS on some
    Lustre/NFS mounts ("unable to lock file")."""
    return h5py.File(path, "w", track_order=True, locking=False)


class CacheWriter:
    """The one writer of the cache schema (see the module docstring): extraction, shard assembly
    and ``featcache merge`` all write through it.

    The file is written at ``<final>.tmp`` (a left-over one from a killed writer is cleared first);
    leaving the ``with`` block commits it (fsync, rename, folder fsync), an exception removes it.
    Call it only while holding the final file's :class:`CacheLock`. ``reserve_bytes``: the room the
    file needs, checked first (:func:`featcache.common.files.reserve`).
    """

    def __init__(self, final: Path, *, reserve_bytes: int = 0, **attrs) -> None:
        self.final = Path(final)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        clear_stale_tmp(self.tmp)
        if reserve_bytes:  # a full disk is an OSError here, not a crash of HDF5 half-way through
            reserve(self.tmp, reserve_bytes)
        self.h5 = create_h5(self.tmp)
        #: Feature datasets being filled, held open (their chunks reach the file when closed).
        self._filling: dict[tuple[str, str], h5py.Dataset] = {}
        set_text_attrs(self.h5, format=FORMAT, schema_version=SCHEMA_VERSION, checksums=CHECKSUMS,
                       created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **attrs)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.h5.close()
        self._filling.clear()
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        commit_file(self.tmp, self.final)

    def set_attrs(self, **attrs) -> None:
        """Root attributes: strings as fixed-length UTF-8, anything else as HDF5 stores it."""
        set_text_attrs(self.h5, **attrs)

    def add_split(self, split: str, *, labels, ids: list[str], hashes, stat, batch_n=None) -> None:
        """A split's per-sample arrays: labels, ids, content hashes, (size, mtime) and, where known,
        the size of the batch each sample's features were computed in."""
        g = self.h5.create_group(split)
        write_array(g, "labels", np.asarray(labels, dtype=np.int64))
        write_strings(g, "ids", ids)
        write_array(g, "hashes", np.asarray(hashes, dtype=HASH_DTYPE))
        write_array(g, "stat", np.asarray(stat, dtype=np.int64).reshape(-1, 2))
        if batch_n is not None:
            write_array(g, "batch_n", np.asarray(batch_n, dtype=np.int32))

    def add_features(self, split: str, layer: str, shape: tuple[int, ...], dtype, *, views: bool = False,
                     chunks: tuple[int, ...] | None = None) -> None:
        """An empty ``features/<layer>`` (or ``views/<layer>``) dataset of ``shape`` = (N, ...), chunked
        along N (about :data:`CHUNK_BYTES` a chunk unless ``chunks`` is given), each chunk with its
        checksum; fill it with :meth:`write_rows` or :meth:`place_rows`. It stays open until
        :meth:`finish_features` or the end of the file."""
        dtype = np.dtype(dtype)
        n = shape[0]
        if chunks is None and n:
            chunks = feature_chunks(tuple(shape[1:]), dtype.itemsize, n)
        name = _feature_name(layer, views)
        self._filling[(split, name)] = self.h5[split].create_dataset(
            name, shape=shape, dtype=dtype, chunks=chunks if n else None, fletcher32=bool(n), track_times=False)

    def finish_features(self, split: str, layer: str, *, views: bool = False) -> None:
        """Close a filled dataset now: its chunks are written to the file and its chunk cache freed
        (a writer of many datasets one after another holds one at a time)."""
        self._filling.pop((split, _feature_name(layer, views)), None)

    def _dataset(self, split: str, layer: str, views: bool) -> h5py.Dataset:
        name = _feature_name(layer, views)
        ds = self._filling.get((split, name))
        return self.h5[split][name] if ds is None else ds

    def write_rows(self, split: str, layer: str, start: int, block: np.ndarray, *, views: bool = False) -> None:
        """Rows ``[start, start + len(block))`` of a dataset made by :meth:`add_features`."""
        self._dataset(split, layer, views)[start:start + len(block)] = block

    def place_rows(self, split: str, layer: str, rows: np.ndarray, features: np.ndarray, *,
                   views: np.ndarray | None = None) -> None:
        """``features[k]`` (and ``views[k]``, where given) into row ``rows[k]`` of ``split``'s ``layer``,
        for sorted unique ``rows``: each contiguous run of rows is written as one slice."""
        fs = self._dataset(split, layer, False)
        vs = self._dataset(split, layer, True) if views is not None else None
        for a, b, da, db in iter_runs(np.asarray(rows)):
            fs[da:db] = features[a:b]
            if vs is not None:
                vs[da:db] = views[a:b]

    def add_virtual_features(self, split: str, layer: str, parts: list[tuple[str, int]], shape: tuple[int, ...],
                             dtype, *, views: bool = False) -> None:
        """``features/<layer>`` (or ``views/<layer>``) of ``shape`` = (N, ...) as a virtual dataset over
        the same dataset of other cache files, one after another: ``parts`` are (file name relative to
        this cache's folder, rows it holds). Data that cannot be read (a missing file) reads as NaN."""
        name = _feature_name(layer, views)
        layout = h5py.VirtualLayout(shape=tuple(shape), dtype=np.dtype(dtype))
        start = 0
        for file_name, n in parts:
            if n:
                layout[start:start + n] = h5py.VirtualSource(file_name, f"/{split}/{name}", shape=(n, *shape[1:]))
            start += n
        self.h5[split].create_virtual_dataset(name, layout, fillvalue=np.nan)

    def add_failed(self, failures: list[dict]) -> None:
        write_failed(self.h5, failures)

    def digest(self) -> str:
        """:func:`shard_digest` of what is written so far."""
        return shard_digest(self.h5)


def _feature_name(layer: str, views: bool) -> str:
    return f"{'views' if views else 'features'}/{layer}"


def cache_bytes(splits: dict[str, tuple[int, int, int]], n_failed: int) -> int:
    """About the size of a cache file, a little over: ``splits`` maps each split to (rows, bytes of
    one row's features and views over all layers, bytes of its longest id); ``n_failed`` samples are
    recorded as failed."""
    total = 1 << 20
    for rows, row_bytes, id_bytes in splits.values():
        total += rows * (row_bytes + 64 + id_bytes)
    return total + 256 * n_failed


def set_text_attrs(h5: h5py.File, **attrs) -> None:
    """String attributes as fixed-length UTF-8: nothing in a cache lives in HDF5's global heap,
    whose damage was seen to make HDF5 loop forever on read."""
    for key, value in attrs.items():
        if isinstance(value, str):
            h5.attrs.create(key, np.bytes_(value.encode("utf-8")))
        else:
            h5.attrs[key] = value


def write_array(group: h5py.Group, name: str, data: np.ndarray) -> h5py.Dataset:
    """A dataset holding ``data``, chunked with a checksum per chunk (HDF5's fletcher32 filter: a
    read of a damaged chunk fails) unless it is empty."""
    return group.create_dataset(name, data=data, fletcher32=data.size > 0, track_times=False)


def write_strings(group: h5py.Group, name: str, values) -> h5py.Dataset:
    """Fixed-length strings holding UTF-8 bytes (read back with ``.asstr("utf-8")``)."""
    encoded = [v.encode("utf-8") for v in values]
    width = max([1, *map(len, encoded)])
    return write_array(group, name, np.asarray(encoded, dtype=f"S{width}"))


def write_failed(h5: h5py.File, failures: list[dict]) -> None:
    """The ``/failed`` group: split, id, reason, (size, mtime) and label of each unreadable sample."""
    g = h5.create_group("failed")
    for key, name in (("split", "split"), ("id", "ids"), ("reason", "reasons")):
        write_strings(g, name, [f[key] for f in failures])
    write_array(g, "stat", np.asarray([f["stat"] for f in failures], dtype=np.int64).reshape(-1, 2))
    write_array(g, "labels", np.asarray([f.get("label", -1) for f in failures], dtype=np.int64))


def set_aside(path: Path) -> Path:
    """Rename damaged or foreign state to ``<name>.damaged`` (never deleted: a person may want it)."""
    target = path.with_name(path.name + ".damaged")
    k = 1
    while target.exists() or target.is_symlink():
        target = path.with_name(f"{path.name}.{k}.damaged")
        k += 1
    os.replace(path, target)
    fsync_dir(path.parent)
    return target


def clear_stale_tmp(tmp: Path) -> None:
    """A temporary file left by a killed writer is unfinished work: remove it (anything else under
    that name is set aside). Call it only while holding the lock of the file being written."""
    if tmp.is_symlink() or tmp.is_file():
        log.info("removing '%s' left by an interrupted run", tmp)
        tmp.unlink()
    elif tmp.exists():
        log.warning("set aside '%s' (not a file featcache writes) as '%s'", tmp, set_aside(tmp).name)


def check_lock_path(path: Path) -> None:
    """A lock file must be a plain file: a folder or a link there is set aside, so the lock works."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        log.warning("set aside '%s' (a lock file must be a plain file) as '%s'", path, set_aside(path).name)


def iter_runs(rows: np.ndarray) -> Iterator[tuple[int, int, int, int]]:
    """Split sorted destination rows into contiguous runs: (src_start, src_end, dst_start, dst_end)."""
    if len(rows) == 0:
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    for s, e in zip(starts, ends):
        yield int(s), int(e), int(rows[s]), int(rows[e - 1]) + 1
