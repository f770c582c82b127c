"""Data that lives elsewhere: fsspec URLs (``s3://``, ``gs://``, ``http(s)://``, ``hf://``) and
webdataset's ``pipe:CMD``, listed, stat'ed and fetched with a timeout, retried with backoff.

A remote tar shard is fetched whole, once, into a local copy named by its URL and identity (size
and etag or mtime), then read like a local one; a changed shard gets a new copy. Fetches of many
shards run in a bounded thread pool.

``FEATCACHE_FETCH_TIMEOUT`` (seconds, default 60), ``FEATCACHE_FETCH_RETRIES`` (default 4) and
``FEATCACHE_FETCH_BACKOFF`` (first wait in seconds, doubled each retry, default 1) tune fetching;
``FEATCACHE_DATA_CACHE`` is where local copies go (default ``~/.cache/featcache/data``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import SourceError
from .base import SampleFault, stamp

log = logging.getLogger(__name__)

#: Fetches of shards (and files) that run at once.
POOL = 8


def is_remote(path: str) -> bool:
    """True for an fsspec URL or a ``pipe:`` command (anything that is not a local path)."""
    return "://" in path and not path.startswith("file://") or path.startswith("pipe:")


def settings() -> tuple[float, int, float]:
    """(timeout seconds, retries, first backoff seconds) from the environment."""
    return (float(os.environ.get("FEATCACHE_FETCH_TIMEOUT", 60)), int(os.environ.get("FEATCACHE_FETCH_RETRIES", 4)),
            float(os.environ.get("FEATCACHE_FETCH_BACKOFF", 1.0)))


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for ``url``, with the fetch timeout set for HTTP."""
    try:
        import fsspec
    except ImportError:
        raise SourceError(f"Reading '{url}' needs fsspec: pip install 'featcache[data]'.") from None
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    kwargs: dict = {}
    if protocol in ("http", "https"):
        try:
            import aiohttp
        except ImportError:
            raise SourceError(f"Reading '{url}' needs aiohttp: pip install 'featcache[data]'.") from None
        kwargs["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=settings()[0])}
        kwargs["skip_instance_cache"] = True
    try:
        return fsspec.core.url_to_fs(url, **kwargs)
    except (ImportError, ValueError) as e:
        raise SourceError(f"Cannot read '{url}': {e}. Install the fsspec backend for that protocol.") from None


def info(url: str) -> dict:
    """``{"size", "stamp"}`` of a remote file (etag, else mtime, else size), with retries."""
    if url.startswith("pipe:"):  # nothing to ask but the output: it is read each run and named by its hash
        return {"size": -1, "stamp": None}
    fs, path = filesystem(url)
    found = _retrying(url, lambda: fs.info(path))
    tag = next((str(found[k]) for k in ("ETag", "etag", "Content-MD5", "Digest", "Last-Modified", "LastModified",
                                         "mtime", "updated") if found.get(k)), "")
    return {"size": int(found.get("size") or 0), "stamp": stamp(url, tag, found.get("size"))}


def glob(pattern: str) -> list[str]:
    """URLs matching a glob pattern (protocol kept), sorted."""
    fs, path = filesystem(pattern)
    protocol = pattern.split("://", 1)[0]
    found = _retrying(pattern, lambda: fs.glob(path))
    return sorted(u if "://" in u else f"{protocol}://{u}" for u in found)


def find(url: str) -> list[tuple[str, str]]:
    """Every file under the folder URL ``url``, sorted: (its path relative to ``url``, its URL)."""
    fs, path = filesystem(url)
    base = path.rstrip("/")
    found = _retrying(url, lambda: fs.find(base))
    root = url.rstrip("/")
    return sorted((p[len(base):].lstrip("/"), f"{root}/{p[len(base):].lstrip('/')}") for p in found
                  if p.startswith(base) and p[len(base):].lstrip("/"))


def fetch(url: str) -> bytes:
    """The whole file at ``url`` (or a ``pipe:`` command's output); a missing file, or a fetch
    that still fails after the retries, raises :class:`SampleFault` with the reason."""
    if url.startswith("pipe:"):
        timeout = settings()[0]
        try:
            done = subprocess.run(url[5:], shell=True, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise SampleFault(f"'{url}' took more than {timeout:g} s (FEATCACHE_FETCH_TIMEOUT)") from None
        if done.returncode != 0:
            raise SampleFault(f"'{url}' exited with status {done.returncode}: "
                              f"{done.stderr.decode(errors='replace').strip()[:200]}")
        return done.stdout
    fs, path = filesystem(url)
    data = _retrying(url, lambda: fs.cat_file(path))
    return bytes(data)


def _retrying(url: str, call):
    timeout, retries, backoff = settings()
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            return call()
        except FileNotFoundError:
            raise SampleFault(f"'{url}' was not found (404)") from None
        except SampleFault:
            raise
        except Exception as e:  # dropped connections, 5xx answers, timeouts: the library's own types
            last = e
            if attempt < retries:
                wait = backoff * 2 ** attempt
                log.info("Fetching '%s' failed (%s); retry %d of %d in %.1f s.", url, _reason(e), attempt + 1,
                         retries, wait)
                time.sleep(wait)
    raise SampleFault(f"'{url}' could not be fetched after {retries + 1} tries: {_reason(last)}")


def _reason(e: BaseException | None) -> str:
    if e is None:
        return "unknown"
    if isinstance(e, TimeoutError) or type(e).__name__ in ("TimeoutError", "ServerTimeoutError"):
        return f"timed out after {settings()[0]:g} s (FEATCACHE_FETCH_TIMEOUT)"
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


def data_cache() -> Path:
    return Path(os.environ.get("FEATCACHE_DATA_CACHE") or Path.home() / ".cache" / "featcache" / "data")


def local_copy(url: str, identity: int | None) -> tuple[Path, int]:
    """A local copy of the remote file ``url`` as it is now (``identity`` from :func:`info`; None:
    fetched each time and named by its content), and that identity; raises :class:`SampleFault`
    when it cannot be fetched."""
    from ..common.files import atomic_write

    data = None
    if identity is None:
        data = fetch(url)
        identity = stamp(hashlib.sha256(data).hexdigest())
    name = hashlib.sha256(f"{url}\x1f{identity}".encode()).hexdigest()[:32] + "-" + url.rstrip("/").split("/")[-1][-60:]
    path = data_cache() / name
    if path.is_file():
        return path, identity
    data = fetch(url) if data is None else data
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)
    return path, identity


def local_copies(items: list[tuple[str, int | None]]) -> list[tuple[Path, int] | SampleFault]:
    """:func:`local_copy` of each (url, identity), fetched :data:`POOL` at a time; a fault in place
    of a copy that could not be fetched."""
    def one(item):
        try:
            return local_copy(*item)
        except SampleFault as e:
            return e

    with ThreadPoolExecutor(min(POOL, max(1, len(items))), thread_name_prefix="featcache-fetch") as pool:
        return list(pool.map(one, items))
