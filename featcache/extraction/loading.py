"""Loading: source rows -> decoded uint8 batches on the extraction device.

The planned rows of a source (:func:`plan_rows`), the batches they are computed in
(:func:`batches`), the dataset that reads and preprocesses one sample (:class:`DecodeDataset`,
used in DataLoader worker processes or with a thread pool in the main process), its
:func:`collate`, and :class:`DeviceDecoded`, which decodes JPEGs on the device one batch ahead of
the forward pass. Extraction, fine-tuning and the benchmarks share them.
"""

from __future__ import annotations

import bisect
import queue
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..backbones.preprocess import (JPEG_MAGIC, Augment, DecodeError, Encoded, augmented_views, crop_array, decode,
                         decode_on_device, encoded_jpeg, resize_crop)
from ..sources import SampleFault, SampleRef, Source

#: The split whose images get augmented views (``views > 0``).
VIEW_SPLIT = "train"
#: Reads of a remote source in flight ahead of the forward pass (:class:`ReadAhead`).
READ_AHEAD = 8


class Row:
    """One planned sample: its split, position in the split, reference, (size, mtime) and content hash
    (``checked``: hashed from the content now, not taken from an earlier run by its size and mtime),
    and ``start``, the position where its unit of the source begins (a tar shard, a row group:
    :meth:`Source.unit_starts`; 0 for a source without units), where batches start anew.

    Slotted, with size and mtime held apart (``stat`` makes the pair when asked): a plan holds one
    per sample, and a tuple each cost 56 bytes more."""

    __slots__ = ("split", "index", "ref", "size", "mtime", "hash", "checked", "start")

    def __init__(self, split: str, index: int, ref: SampleRef, stat: tuple[int, int], hash: str | None = None,
                 checked: bool = False, start: int = 0) -> None:
        self.split, self.index, self.ref = split, index, ref
        self.size, self.mtime = stat
        self.hash, self.checked, self.start = hash, checked, start

    @property
    def stat(self) -> tuple[int, int]:
        return (self.size, self.mtime)

    def __repr__(self) -> str:
        return f"Row({self.split!r}, {self.index}, {self.ref!r}, {self.stat}, hash={self.hash!r})"


def plan_rows(src: Source, ranges: dict[str, tuple[int, int]] | None = None, *,
              contents: bool = False) -> dict[str, list[Row]]:
    """Rows to extract, with each file's (size, mtime), and with ``contents`` the hash of its content
    (``extract --verify``: None where it cannot be read). ``ranges`` restricts each split to rows
    [a, b) before any file is looked at (a shard stats only its own share)."""
    plan = {}
    for split, refs in src.splits.items():
        a, b = ranges[split] if ranges is not None else (0, len(refs))
        starts = src.unit_starts(split)
        rows = []
        for i in range(a, b):
            ref = refs[i]
            start = starts[bisect.bisect_right(starts, i) - 1] if len(starts) > 1 else 0
            try:
                st = src.stat(ref)
            except OSError:
                st = (-1, -1)  # missing: recorded as failed when read
            row = Row(split, i, ref, st, checked=contents, start=start)
            if contents and st[0] >= 0:
                try:
                    row.hash = src.read(ref)[1]
                except OSError:
                    pass
            rows.append(row)
        plan[split] = rows
    return plan


def block_key(row: Row, batch_size: int) -> tuple[str, int, int]:
    """The batch of an uninterrupted run that computes ``row``: blocks of ``batch_size`` rows of its
    split, started anew at each unit of the source (so a share of whole units, listed alone,
    computes the batches a whole run does)."""
    return (row.split, row.start, (row.index - row.start) // batch_size)


def batches(todo: list[Row], batch_size: int) -> list[list[int]]:
    """Batches aligned to fixed blocks of each split's plan, so a resumed run computes the same
    batches as an uninterrupted one (batch composition can change float results)."""
    groups: dict[tuple[str, int], list[int]] = {}
    for i, r in enumerate(todo):
        groups.setdefault(block_key(r, batch_size), []).append(i)
    return list(groups.values())


class ReadAhead:
    """Reads ``refs`` ahead of the loader, at most ``depth`` at a time in a thread pool: while the
    backbone runs on one batch, the reads of the next ones are in flight (remote sources, whose reads
    wait on the network). :meth:`get` returns what ``read`` returns or raises what it raises; reads
    are started in order from the last position asked for, and at most ``depth`` are started and not
    yet collected (so at most ``depth`` samples are held)."""

    def __init__(self, read, refs: list[SampleRef], depth: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.read, self.refs, self.depth = read, refs, depth
        self.pool = ThreadPoolExecutor(depth, thread_name_prefix="featcache-read")
        self.futures: dict[int, Any] = {}
        self.next = 0
        self.lock = threading.Lock()

    def get(self, i: int):
        with self.lock:
            future = self.futures.pop(i, None)
            if future is None:
                self.next = max(self.next, i + 1)
            while self.next < len(self.refs) and len(self.futures) < self.depth:
                self.futures[self.next] = self.pool.submit(self.read, self.refs[self.next])
                self.next += 1
        return self.read(self.refs[i]) if future is None else future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class DecodeDataset(torch.utils.data.Dataset):
    """Reads and preprocesses one sample: (index, hash, uint8 crops (1 + views, 3, H, W), error).

    With ``threads > 1`` a batch is decoded by that many threads (PIL and hashlib release the
    GIL); used when the main process decodes, so decoding and the forward pass take turns on all
    cores instead of competing for them.
    """

    def __init__(self, src: Source, rows: list[Row], pp, augment: Augment | None = None, threads: int = 1,
                 encoded_jpegs: bool = False) -> None:
        self.src, self.rows, self.pp = src, rows, pp
        self.augment = augment if augment is not None and augment.views else None
        self.threads = threads
        #: Hand JPEGs over undecoded (:class:`Encoded`) for :func:`decode_on_device`.
        self.encoded_jpegs = encoded_jpegs
        self._pool = None
        self._ahead: ReadAhead | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> list:
        if self.src.remote_reads and self._ahead is None:
            if torch.utils.data.get_worker_info() is None:  # the main process reads every row: ahead of all
                self._ahead = ReadAhead(self.src.read, [r.ref for r in self.rows], READ_AHEAD)
            else:  # a worker process, which knows only this batch of its rows: they are read at once
                ahead = ReadAhead(self.src.read, [self.rows[i].ref for i in indices], READ_AHEAD)
                try:
                    return [self._load(i, lambda k=k: ahead.get(k)) for k, i in enumerate(indices)]
                finally:
                    ahead.close()
        if self.threads <= 1 or len(indices) <= 1:
            return [self[i] for i in indices]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="featcache-decode")
        return list(self._pool.map(self.__getitem__, indices))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    def __getstate__(self) -> dict:  # worker processes decode one sample at a time
        return {**self.__dict__, "_pool": None, "_ahead": None, "threads": 1}

    def __getitem__(self, i: int):
        return self._load(i, lambda: self._ahead.get(i) if self._ahead is not None else self.src.read(self.rows[i].ref))

    def _load(self, i: int, read):
        """Item ``i``, its sample read by calling ``read``."""
        row = self.rows[i]
        try:
            data, h = read()
        except SampleFault as e:
            return i, None, None, str(e)
        except OSError as e:
            return i, None, None, f"cannot read file: {e.strerror or e}"
        views = self.augment is not None and row.split == VIEW_SPLIT
        if self.encoded_jpegs and isinstance(data, bytes) and data.startswith(JPEG_MAGIC):
            return i, h, encoded_jpeg(data, self.pp), None
        try:
            if isinstance(data, np.ndarray) and not views:
                crop = crop_array(data, self.pp)  # arrays already at size: no PIL round trip
                if crop is not None:
                    return i, h, crop[None], None
            img = decode(data, self.pp)
            crops = resize_crop(img, self.pp)[None]
            if views:
                crops = np.concatenate([crops, augmented_views(img, self.pp, self.augment, h)])
            return i, h, crops, None
        except DecodeError as e:
            return i, h, None, str(e)


@dataclass
class Batch:
    """One loaded batch.

    ``rows`` are the positions (in the dataset's rows) of the images that decoded and ``hashes``
    their content hashes; ``x`` their crops, base crops first, then all augmented views ((B + B *
    views, 3, H, W) uint8), or the list of undecoded JPEGs for :func:`decode_on_device`, or None
    when nothing decoded; ``failed`` holds (position, reason) of the images that did not.
    """

    rows: list[int]
    hashes: list
    x: Any
    failed: list[tuple[int, str]]

    def pin_memory(self) -> "Batch":
        """Called by ``DataLoader(pin_memory=True)``: the crops in page-locked memory."""
        if isinstance(self.x, torch.Tensor):
            self.x = self.x.pin_memory()
        return self


def collate(items) -> Batch:
    """The :class:`Batch` of ``(position, hash, crops, failure reason)`` items."""
    ok = [(i, h, a) for i, h, a, _ in items if a is not None]
    bad = [(i, r) for i, _, a, r in items if a is None]
    x = None
    if any(isinstance(a, Encoded) for _, _, a in ok):
        x = [a for _, _, a in ok]
    elif ok:
        base = np.stack([a[0] for _, _, a in ok])
        extra = [a[1:] for _, _, a in ok if len(a) > 1]
        x = torch.from_numpy(np.concatenate([base, *extra]) if extra else base)
    return Batch([i for i, _, _ in ok], [h for _, h, _ in ok], x, bad)


def worker_init(_):
    torch.set_num_threads(1)


class DeviceDecoded:
    """Batches of the loader with their JPEGs decoded on ``device`` (``decode_on_device``).

    With ``background``, a thread decodes batch k+1 on a side CUDA stream while the main thread
    runs the forward pass of batch k (torchvision's nvJPEG decoder synchronises its stream, so
    decoding in the main loop would stall the forward pass). Yields the loader's
    :class:`Batch` es with ``x`` a uint8 tensor on ``device`` (or None).
    """

    DEPTH = 2

    def __init__(self, loader, pp, device: torch.device, *, background: bool) -> None:
        self.loader, self.pp, self.device, self.background = loader, pp, device, background
        self.cuda = device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=self.DEPTH)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _decode(self, batch: Batch) -> Batch:
        if not isinstance(batch.x, list):
            return batch
        crops, failed = decode_on_device(batch.x, self.pp, self.device)
        bad = list(batch.failed) + [(batch.rows[k], reason) for k, reason in failed]
        keep = [k for k, c in enumerate(crops) if c is not None]
        x = torch.stack([crops[k] for k in keep]) if keep else None
        return Batch([batch.rows[k] for k in keep], [batch.hashes[k] for k in keep], x, bad)

    def _run(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.cuda else None
        try:
            with torch.inference_mode():
                for batch in self.loader:
                    if self._stop.is_set():
                        return
                    if stream is not None:
                        with torch.cuda.stream(stream):
                            out = self._decode(batch)
                        event = torch.cuda.Event()
                        event.record(stream)
                    else:
                        out, event = self._decode(batch), None
                    self._put(("batch", out, event))
            self._put(("end", None, None))
        except BaseException as e:  # handed to the main thread
            self._put(("error", e, None))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        if not self.background:
            for batch in self.loader:
                yield self._decode(batch)
            return
        self._thread = threading.Thread(target=self._run, daemon=True, name="featcache-device-decode")
        self._thread.start()
        while True:
            kind, value, event = self._queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
                if value.x is not None:  # made on the side stream, used on this one
                    value.x.record_stream(torch.cuda.current_stream(self.device))
            yield value

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=10)
            self._thread = None


def close_batches(batches) -> None:
    """Stop the decoding thread of a :class:`DeviceDecoded` (a plain loader needs nothing)."""
    if isinstance(batches, DeviceDecoded):
        batches.close()
