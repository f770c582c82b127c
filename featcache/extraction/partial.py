"""The partial store: finished batches of an unfinished extraction, verified before reuse.

While extraction runs, :class:`ChunkWriter` (a background thread) groups finished batches into
chunk files in ``<cache>.partial/``; :class:`PartialStore` writes each atomically, names it by
the SHA-256 of its bytes, and verifies every chunk before a resumed run trusts it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import CacheError
from ..common.files import fsync_dir
from ..store.writer import clear_stale_tmp, set_aside
from ..store.cache import HASH_DTYPE

log = logging.getLogger(__name__)

#: A chunk file's name carries the SHA-256 of its bytes: ``c-<64 hex>.npz``.
CHUNK_RE = re.compile(r"^c-(?P<sha>[0-9a-f]{64})\.npz$")
#: What every chunk and the meta file of a partial store say they are.
PARTIAL_FORMAT = "featcache-partial"
#: Arrays every chunk holds (besides ``f<i>``/``v<i>`` per layer), with their dtype kinds.
CHUNK_ARRAYS = {"hashes": "S", "ids": "U", "stat": "i", "failed_ids": "U", "failed_reasons": "U",
                "failed_stat": "i", "batch_n": "i", "batch_size": "i", "chunk_meta": "U"}


class DamagedPartError(CacheError):
    """A piece of partial state (chunk, meta, shard, lock, temporary file) cannot be trusted."""


class PartialStore:
    """Finished batches of an unfinished extraction, one atomically renamed ``.npz`` each.

    Each chunk holds ``hashes``, ``ids``, ``stat`` and ``batch_n`` (the size of the batch that
    computed them) of the samples that succeeded, ``f<i>`` (their features for layer ``i``),
    ``failed_ids``/``failed_reasons``/``failed_stat``, ``batch_size`` (the run's ``--batch-size``)
    and ``chunk_meta`` (JSON: format, fingerprint hash, featcache version). Its name carries the
    SHA-256 of its bytes. Nothing in the folder is trusted unverified: a chunk or ``meta.json``
    that is truncated, damaged, of another fingerprint or version, or not ours is renamed to
    ``*.damaged`` (see :attr:`set_aside_parts`) and its batches are computed again.
    """

    def __init__(self, path: Path, fingerprint_hash: str, *, batch_size: int = 0) -> None:
        from .. import __version__

        self.path = path
        #: The --batch-size of the run, recorded in each chunk (see ``batch_n``).
        self.batch_size = batch_size
        self.fingerprint_hash = fingerprint_hash
        self.meta = {"format": PARTIAL_FORMAT, "fingerprint_hash": fingerprint_hash, "featcache": __version__}
        #: (name, reason) of each piece set aside since the last :meth:`warn_set_aside`.
        self.set_aside_parts: list[tuple[str, str]] = []
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            self._set_aside(path, "not a folder")
        path.mkdir(parents=True, exist_ok=True)
        for tmp in path.glob("*.tmp"):  # a write killed before its rename: never finished
            clear_stale_tmp(tmp)
        meta = path / "meta.json"
        if meta.exists() or meta.is_symlink():
            reason = self._meta_problem(meta)
            if reason is None:
                return
            self._set_aside(meta, reason)
        tmp = path / "meta.json.tmp"
        with open(tmp, "w") as f:
            f.write(_sealed_json(self.meta))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, meta)
        fsync_dir(path)

    def _meta_problem(self, meta: Path) -> str | None:
        try:
            found = _unseal_json(meta.read_bytes())
        except (OSError, ValueError) as e:
            return str(e)
        if found.get("format") != PARTIAL_FORMAT:
            return "not a featcache partial store"
        if found != self.meta:
            return "of another fingerprint or featcache version"
        return None

    def _set_aside(self, path: Path, reason: str) -> None:
        set_aside(path)
        self.set_aside_parts.append((path.name, reason))

    def warn_set_aside(self) -> None:
        """One warning line naming every piece set aside since the last call."""
        if not self.set_aside_parts:
            return
        parts = [f"{name} ({reason})" for name, reason in self.set_aside_parts]
        if len(parts) > 6:
            parts = parts[:5] + [f"and {len(parts) - 5} more"]
        log.warning("Set aside damaged partial state in '%s' as *.damaged: %s; its batches are computed again.",
                    self.path, ", ".join(parts))
        self.set_aside_parts = []

    def chunks(self) -> list[Path]:
        return sorted(self.path.glob("c-*.npz"))

    def write_chunk(self, hashes: np.ndarray, features: list[np.ndarray], ids: list[str], stat: np.ndarray,
                    failed_ids: list[str], failed_reasons: list[str], failed_stat: np.ndarray,
                    views: list[np.ndarray] | None = None, batch_n: np.ndarray | None = None) -> Path:
        """Write a chunk; ``batch_n`` is the size of the batch that computed each row (default: all
        rows in one batch)."""
        if batch_n is None:
            batch_n = np.full(len(ids), len(ids))
        arrays = {"hashes": np.asarray(hashes, dtype=HASH_DTYPE),
                  "ids": np.asarray(ids, dtype=str), "stat": np.asarray(stat, dtype=np.int64).reshape(-1, 2),
                  "failed_ids": np.asarray(failed_ids, dtype=str),
                  "failed_reasons": np.asarray(failed_reasons, dtype=str),
                  "failed_stat": np.asarray(failed_stat, dtype=np.int64).reshape(-1, 2),
                  "batch_n": np.asarray(batch_n, np.int32),
                  "batch_size": np.asarray(self.batch_size, np.int64),
                  "chunk_meta": np.asarray(json.dumps(self.meta, sort_keys=True))}
        arrays.update({f"f{i}": f for i, f in enumerate(features)})
        arrays.update({f"v{i}": v for i, v in enumerate(views or [])})
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getbuffer()
        name = f"c-{hashlib.sha256(data).hexdigest()}.npz"
        tmp = self.path / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)
        fsync_dir(self.path)  # the rename itself survives a power cut
        return self.path / name

    def open_chunk(self, path: Path, n_layers: int) -> np.lib.npyio.NpzFile:
        """The verified arrays of a chunk; raises :class:`DamagedPartError` naming what is wrong."""
        m = CHUNK_RE.match(path.name)
        if not m:
            raise DamagedPartError("not a featcache chunk name")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DamagedPartError(f"unreadable: {e.strerror or e}") from None
        if not data:
            raise DamagedPartError("empty file")
        if hashlib.sha256(data).hexdigest() != m.group("sha"):
            raise DamagedPartError("checksum mismatch")
        try:
            z = np.load(io.BytesIO(data), allow_pickle=False)
            _check_chunk(z, self.meta, n_layers)
        except DamagedPartError:
            raise
        except Exception as e:  # a valid checksum over bytes we did not write: not ours
            raise DamagedPartError(f"not a featcache chunk ({type(e).__name__})") from None
        return z

    def verified_chunk(self, path: Path, n_layers: int) -> np.lib.npyio.NpzFile | None:
        """:meth:`open_chunk`, or None with the chunk set aside when it cannot be trusted."""
        try:
            return self.open_chunk(path, n_layers)
        except DamagedPartError as e:
            self._set_aside(path, str(e))
            return None

    def read_chunk(self, path: Path, n_layers: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Features per layer of a chunk, and its augmented views per layer (None without views)."""
        try:
            z = self.open_chunk(path, n_layers)
        except DamagedPartError as e:
            raise CacheError(f"Chunk '{path}' changed while the cache was assembled ({e}). Run the same "
                             f"command again: it is set aside and its batches computed again.") from None
        with z:
            feats = [z[f"f{i}"] for i in range(n_layers)]
            views = [z[f"v{i}"] for i in range(n_layers)] if "v0" in z.files else None
        return feats, views

    def remove(self) -> None:
        """Delete what this store wrote; pieces set aside as ``*.damaged`` stay (with the folder)."""
        for p in self.path.iterdir():
            if p.name == "meta.json" or CHUNK_RE.match(p.name) or p.name.endswith(".tmp"):
                p.unlink()
        if any(self.path.iterdir()):
            log.info("kept '%s': it holds partial state set aside as *.damaged", self.path)
            return
        self.path.rmdir()


def _sealed_json(obj: dict) -> str:
    """JSON with a SHA-256 of its own content, so a flipped byte cannot pass as another value."""
    body = json.dumps(obj, sort_keys=True)
    return json.dumps({**obj, "sha256": hashlib.sha256(body.encode()).hexdigest()}, sort_keys=True)


def _unseal_json(raw: bytes) -> dict:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("not valid JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("sha256"), str):
        raise ValueError("no checksum")
    want = obj.pop("sha256")
    if hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest() != want:
        raise ValueError("checksum mismatch")
    return obj


def _check_chunk(z, meta: dict, n_layers: int) -> None:
    for key, kind in CHUNK_ARRAYS.items():
        if key not in z.files:
            raise DamagedPartError(f"no '{key}' array")
        a = z[key]
        if a.dtype.kind not in ((kind, "u") if kind == "i" else (kind,)) and a.size:
            raise DamagedPartError(f"'{key}' has dtype {a.dtype}")
    if json.loads(str(z["chunk_meta"])) != meta:
        raise DamagedPartError("of another fingerprint or featcache version")
    n, m = len(z["ids"]), len(z["failed_ids"])
    if z["hashes"].shape != (n,) or z["stat"].shape != (n, 2) or z["batch_n"].shape != (n,) \
            or z["batch_size"].shape != () or z["failed_reasons"].shape != (m,) or z["failed_stat"].shape != (m, 2):
        raise DamagedPartError("arrays of different lengths")
    views = "v0" in z.files
    for i in range(n_layers if n else 0):
        for key in (f"f{i}", *([f"v{i}"] if views else [])):
            if key not in z.files or z[key].shape[:1] != (n,) or z[key].dtype.kind != "f":
                raise DamagedPartError(f"no features '{key}' of {n} rows")


class ChunkWriter(threading.Thread):
    """Writes finished batches to chunk files in a background thread, so disk I/O overlaps compute.

    Batches are grouped: a chunk is written once ``every`` seconds have passed since the first
    batch it holds (0: each batch alone), when it reaches :attr:`MAX_BYTES`, and on close (an
    interrupt included). A kill -9 loses at most ``every`` seconds of work; a chunk per batch of 4
    cost 4% of CPU extraction time (``benchmarks/extraction.py``).
    """

    MAX_BYTES = 64 << 20

    def __init__(self, partial: PartialStore, every: float = 0.0) -> None:
        super().__init__(daemon=True, name="featcache-writer")
        self.partial = partial
        self.every = every
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.buffer: list[dict] = []
        self.buffer_bytes = 0
        self.buffer_since = 0.0
        #: Whether the buffered batches with features carry augmented views (None: no such batch yet).
        self.buffer_views: bool | None = None

    def run(self) -> None:
        while True:
            timeout = None
            if self.buffer:
                timeout = max(0.0, self.buffer_since + self.every - time.monotonic())
            try:
                item = self.q.get(timeout=timeout)
            except queue.Empty:
                self._flush()
                continue
            if item is None:
                self._flush()
                return
            if self.error is not None:
                continue
            # A chunk either has augmented views for every sample or for none (batches never mix
            # splits); a batch whose images all failed has no features and fits either kind.
            if item["features"]:
                if self.buffer_views is not None and self.buffer_views != _has_views(item):
                    self._flush()
                self.buffer_views = _has_views(item)
            if not self.buffer:
                self.buffer_since = time.monotonic()
            self.buffer.append(item)
            self.buffer_bytes += sum(a.nbytes for a in item["features"]) + sum(a.nbytes for a in item["views"])
            if self.buffer_bytes >= self.MAX_BYTES or time.monotonic() - self.buffer_since >= self.every:
                self._flush()

    def _flush(self) -> None:
        items, self.buffer, self.buffer_bytes, self.buffer_views = self.buffer, [], 0, None
        if not items or self.error is not None:
            return
        try:
            self.partial.write_chunk(**_concat_batches(items))
        except BaseException as e:  # disk full and friends: reported by the main thread
            self.error = e

    def put(self, item: dict) -> None:
        self.raise_error()
        self.q.put(item)

    def close(self) -> None:
        self.q.put(None)
        self.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            e = self.error
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise CacheError(
                    f"Disk full while writing '{self.partial.path}' ({e.strerror}). What was computed "
                    f"is kept there: free some space and run the same command again to resume."
                ) from None
            raise CacheError(f"Cannot write '{self.partial.path}': {e}") from e


def _has_views(item: dict) -> bool:
    return bool(item["views"])


def _concat_batches(items: list[dict]) -> dict:
    """One chunk's arrays from several batches' (see :meth:`PartialStore.write_chunk`)."""
    if len(items) == 1:
        return items[0]
    with_features = [it for it in items if it["features"]]
    out = {
        "hashes": np.concatenate([it["hashes"] for it in items]),
        "ids": [i for it in items for i in it["ids"]],
        "stat": np.concatenate([it["stat"] for it in items]),
        "failed_ids": [i for it in items for i in it["failed_ids"]],
        "failed_reasons": [r for it in items for r in it["failed_reasons"]],
        "failed_stat": np.concatenate([it["failed_stat"] for it in items]),
        "batch_n": np.concatenate([np.full(len(it["ids"]), len(it["ids"]), np.int32) for it in items]),
        "features": [], "views": [],
    }
    if with_features:
        n_layers = len(with_features[0]["features"])
        out["features"] = [np.concatenate([it["features"][li] for it in with_features]) for li in range(n_layers)]
        if with_features[0]["views"]:
            out["views"] = [np.concatenate([it["views"][li] for it in with_features]) for li in range(n_layers)]
    return out
