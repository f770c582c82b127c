"""The images of an image folder written as webdataset shards, parquet files and a saved Hugging Face
DatasetDict, in the folder's order (tests and ``python -m benchmarks sources`` share them), and a
bounded local HTTP server that can drop a connection or answer 503 before it serves."""

from __future__ import annotations

import http.server
import io
import os
import tarfile
import threading
from pathlib import Path

from featcache.sources import ImageFolderSource


def folder_samples(folder: Path) -> tuple[list[str], dict[str, list[tuple[str, bytes, int]]]]:
    """Class names and, per split, (name, file bytes, label) in the folder source's order."""
    src = ImageFolderSource(folder)
    out = {}
    for split, refs in src.splits.items():
        out[split] = [(Path(r.key).name, Path(r.key).read_bytes(), r.label) for r in refs]
    return src.classes, out


def write_wds(folder: Path, out: Path, *, shards: int = 2, classes_txt: bool = True, multiple: int = 1) -> Path:
    """``out/SPLIT/shard-K.tar`` with ``KEY.jpg|png`` and ``KEY.cls`` members, and ``out/classes.txt``:
    ``shards`` shards per split, of a number of samples rounded up to a ``multiple`` (fewer shards
    where that leaves nothing for the last: a batch starts anew at each shard, so shards of a
    multiple of the batch size batch as the folder does)."""
    classes, splits = folder_samples(folder)
    for split, samples in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        per = -(-len(samples) // shards)
        per = -(-per // multiple) * multiple
        for k in range(-(-len(samples) // per) if samples else shards):
            with tarfile.open(out / split / f"shard-{k:03d}.tar", "w") as tf:
                for j, (name, data, label) in enumerate(samples[k * per:(k + 1) * per]):
                    stem, ext = name.rsplit(".", 1)
                    key = f"{k * per + j:06d}_{stem}"
                    add_member(tf, f"{key}.{ext.lower()}", data)
                    add_member(tf, f"{key}.cls", str(label).encode())
    if classes_txt:
        (out / "classes.txt").write_text("\n".join(classes) + "\n")
    return out


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def write_parquet(folder: Path, out: Path, *, row_group_size: int = 3, labels_as_names: bool = True) -> Path:
    """``out/SPLIT/part-0.parquet`` with an ``image`` (bytes) and a ``label`` (class name) column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    classes, splits = folder_samples(folder)
    for split, samples in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        table = pa.table({"image": [d for _, d, _ in samples],
                          "label": [classes[lab] if labels_as_names else lab for _, _, lab in samples]})
        pq.write_table(table, out / split / "part-0.parquet", row_group_size=row_group_size)
    return out


def write_hf(folder: Path, out: Path) -> Path:
    """A DatasetDict (``train``, ``validation``) with an ``Image`` and a ``ClassLabel`` column, saved to disk."""
    from datasets import ClassLabel, Dataset, DatasetDict, Image

    classes, splits = folder_samples(folder)
    names = {"train": "train", "val": "validation", "test": "test"}
    dd = DatasetDict({names[split]: Dataset.from_dict({"image": [{"bytes": d, "path": None} for _, d, _ in samples],
                                                       "label": [lab for _, _, lab in samples]})
                      .cast_column("image", Image()).cast_column("label", ClassLabel(names=classes))
                      for split, samples in splits.items()})
    dd.save_to_disk(str(out))
    return out


class FlakyServer:
    """A bounded ``http.server`` on 127.0.0.1 serving ``root`` in a thread. ``faults`` maps a URL
    path to a list of what its next requests get: ``503`` or ``"drop"`` (half the body, then the
    connection closed); ``"hang"`` sleeps past any timeout. ``gate=K`` holds each GET of a file until
    K are in flight together (or 5 s passed: then no longer), so ``most`` (the most GETs in flight at once)
    shows whether a client reads concurrently. Use as a context manager."""

    def __init__(self, root: Path, faults: dict[str, list] | None = None, gate: int = 0) -> None:
        self.root, self.faults = Path(root), {k: list(v) for k, v in (faults or {}).items()}
        self.requests: list[str] = []
        self.active = self.most = 0
        self.lock = threading.Lock()
        self.gate = threading.Barrier(gate, timeout=5) if gate else None
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(server.root), **kw)

            def log_message(self, *a):
                pass

            def do_GET(self):
                with server.lock:
                    server.active += 1
                    server.most = max(server.most, server.active)
                try:
                    if server.gate is not None and Path(self.path).suffix:  # files, not folder listings
                        try:
                            server.gate.wait()
                        except threading.BrokenBarrierError:
                            pass
                    self._get()
                finally:
                    with server.lock:
                        server.active -= 1

            def _get(self):
                server.requests.append(self.path)
                todo = server.faults.get(self.path)
                fault = todo.pop(0) if todo else None
                if fault == 503:
                    self.send_error(503)
                    return
                if fault in ("drop", "hang"):
                    path = server.root / self.path.lstrip("/")
                    data = path.read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if fault == "hang":
                        server.stop.wait(10)
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                super().do_GET()

            def do_HEAD(self):
                server.requests.append("HEAD " + self.path)
                super().do_HEAD()

        self.stop = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "FlakyServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def fetch_env(monkeypatch, tmp_path: Path, *, timeout: float = 5, retries: int = 3) -> None:
    """Fetch settings for tests: short timeout, tiny backoff, local copies under ``tmp_path``."""
    monkeypatch.setenv("FEATCACHE_FETCH_TIMEOUT", str(timeout))
    monkeypatch.setenv("FEATCACHE_FETCH_RETRIES", str(retries))
    monkeypatch.setenv("FEATCACHE_FETCH_BACKOFF", "0.01")
    monkeypatch.setenv("FEATCACHE_DATA_CACHE", str(tmp_path / "data-cache"))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
