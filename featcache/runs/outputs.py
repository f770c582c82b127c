"""Where commands put their results: run folders (``fit-head``, ``finetune``), bench folders and
single output files (``export``, ``predict -o``).

A run folder is written under a lock (``.<name>.lock`` beside it: a second writer gets
"Another process is writing ..."), into a private folder beside it (``.<name>.tmp-*``), and moved
into place only when complete: a crash, a full disk or Ctrl-C leaves no half-written run, and
``overwrite`` replaces an old run as a whole (none of its files stay beside the new ones). A run
folder is never replaced without ``overwrite``, and a name chosen for a new run is claimed with
``mkdir`` (atomic), so two writers never share one. Output files are checked (suffix, existing
file, folder) before any work starts.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..store.writer import _NO_LOCKING
from ..errors import ConfigError, FolderLockedError, OutputError
from ..common.files import DISK_FULL, default_mode, fsync_dir

log = logging.getLogger(__name__)

#: The file a run folder holds; a folder with it is a run (``fit-head`` and ``finetune`` write it).
RUN_MARKER = "run.json"


def write_error(path: str | os.PathLike, e: OSError, *, kept: str = "nothing was written there") -> OutputError:
    """The one-line error of a failed write of ``path``: disk full, or why the file system refused."""
    if e.errno in DISK_FULL:
        return OutputError(f"Disk full while writing '{path}' ({e.strerror}): {kept}. Free some space and run the "
                           f"same command again.")
    return OutputError(f"Cannot write '{path}': {e.strerror or e}. Choose a writable location.")


@contextmanager
def reporting(path: str | os.PathLike, *, kept: str = "nothing was written there") -> Iterator[None]:
    """Raise an :class:`OSError` of the block as :func:`write_error` (one line, no traceback)."""
    try:
        yield
    except OSError as e:
        raise write_error(path, e, kept=kept) from None


def check_folder(folder: str | os.PathLike, *, create: bool) -> None:
    """Refuse a result folder that cannot be written: a file in its way, or (``create`` False) a
    missing folder. Root passes any permission check, so a read-only folder is found on writing."""
    folder = Path(folder or ".")
    existing = folder
    while not (existing.exists() or existing.is_symlink()) and existing != existing.parent:
        existing = existing.parent
    if existing != folder and not create:
        raise OutputError(f"Folder '{folder}' does not exist. Create it first, or choose another output path.")
    if not existing.is_dir():
        raise OutputError(f"'{existing}' is not a folder, so nothing can be written in '{folder}'. Choose another "
                          f"output path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"Folder '{existing}' is not writable. Choose another output path.")


def check_output_file(path: str | os.PathLike, *, overwrite: bool, suffixes: tuple[str, ...]) -> Path:
    """Check an output file before any work: its suffix, that it is not there yet (unless
    ``overwrite``) and that its folder exists and is writable."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ConfigError(f"The output file must end in {' or '.join(suffixes)}. Got '{path}'.")
    if path.is_dir():
        raise OutputError(f"'{path}' is a folder. Pass a file name ending in {' or '.join(suffixes)}.")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError(f"'{path}' already exists. Pass overwrite=True to replace it, or choose another file name.")
    check_folder(path.parent, create=False)
    return path


def claim_folder(parent: str | os.PathLike, name: str) -> Path:
    """Create ``parent/name`` (or ``name-2``, ``name-3``, ... when taken) and return it: ``mkdir``
    is atomic, so two writers never get the same folder."""
    parent = Path(parent)
    with reporting(parent):
        parent.mkdir(parents=True, exist_ok=True)
        k = 1
        while True:
            path = parent / (name if k == 1 else f"{name}-{k}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                k += 1


def claim_numbered(parent: str | os.PathLike, rest: str, start: int) -> tuple[int, Path]:
    """The first number ``n >= start`` that no entry of ``parent`` starts with (``NNNNN-``), and the
    folder ``parent/NNNNN-rest``, created. Looking and creating happen under a short ``flock`` of
    ``parent``, so two writers never get the same number, whatever their ``rest``."""
    parent = Path(parent)
    with reporting(parent):
        parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # waits: another writer holds it for a moment only
            except OSError as e:
                if e.errno not in _NO_LOCKING:
                    raise
            n = start
            while any(parent.glob(f"{n:05d}-*")):
                n += 1
            path = parent / f"{n:05d}-{rest}"
            path.mkdir()
            return n, path
        finally:
            os.close(fd)


class FolderLock:
    """An exclusive ``flock`` on a folder itself (no lock file beside it) while it is written; a
    ``what`` ("run folder", "bench folder") names it in the error a second writer gets.

    A folder replaced while this waited for it (a run swapped into place) is locked again under
    its new identity. Where the file system has no working ``flock`` it goes on without, with one
    warning, as :class:`featcache.store.writer.CacheLock` does.
    """

    def __init__(self, folder: str | os.PathLike, what: str) -> None:
        self.fd: int | None = None
        folder = Path(folder)
        while True:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderLockedError(f"Another process is writing the {what} '{folder}'. Wait for it to finish, "
                                        f"or choose another output folder.") from None
            except OSError as e:
                os.close(fd)
                if e.errno not in _NO_LOCKING:
                    raise
                log.warning("file locking is not supported where '%s' lives (%s): going on without the lock; two "
                            "processes writing it at once would not be detected", folder, e.strerror or e)
                return
            try:
                now = os.stat(folder)
                same = (now.st_dev, now.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)
            folder.mkdir(parents=True, exist_ok=True)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class RunFolder:
    """Write a run folder whole or not at all.

    Construct it before the work (it takes the lock and refuses an existing run without
    ``overwrite``, or a folder of other files); ``with RunFolder(...) as tmp:`` write the files
    into ``tmp``; leaving the block moves ``tmp`` into place (an old run is replaced as a whole),
    an exception removes it. :meth:`release` gives up without writing (a failed fit). ``claimed``:
    the target is an empty folder made by :func:`claim_folder`, removed again when nothing is written.
    """

    def __init__(self, target: str | os.PathLike, *, overwrite: bool = False, claimed: bool = False) -> None:
        self.target = Path(target)
        self.overwrite, self.claimed = overwrite, claimed
        self.tmp: Path | None = None
        where = Path(os.path.abspath(self.target))
        self._parent, self._name = where.parent, where.name
        check_folder(self._parent, create=True)
        if self.target.is_symlink() or (self.target.exists() and not self.target.is_dir()):
            raise OutputError(f"'{self.target}' is not a folder. Choose another run folder.")
        with reporting(self.target):
            self._move_back()
            if not self.target.exists():  # made to be locked; removed again if nothing is written
                self.target.mkdir(parents=True)
                self.claimed = True
        try:
            self.lock = FolderLock(self.target, "run folder")
        except BaseException:
            if self.claimed:
                self.target.rmdir()
            raise
        try:
            self._recover()
            self._check()
        except BaseException:
            self.release()
            raise

    def _move_back(self) -> None:
        """An old run that a killed overwrite moved aside, with nothing in its place: move it back."""
        if self.target.exists() or self.target.is_symlink():
            return
        for old in sorted(self._parent.glob(f".{glob.escape(self._name)}.old-*/run")):
            try:
                os.rename(old, self.target)
            except OSError:
                return  # another writer made the folder meanwhile
            log.warning("moved back the run '%s' that an interrupted overwrite had set aside", self.target)
            return

    def _recover(self) -> None:
        """Under the lock: private folders of killed writers are removed."""
        name = glob.escape(self._name)
        for left in [*self._parent.glob(f".{name}.tmp-*"), *self._parent.glob(f".{name}.old-*")]:
            shutil.rmtree(left, ignore_errors=True)

    def _check(self) -> None:
        t = self.target
        if (t / RUN_MARKER).exists():
            if not self.overwrite:
                raise OutputError(f"'{t}' already holds a run. Pass overwrite=True to replace it, or choose another "
                                  f"output folder.")
        elif any(t.iterdir()):
            raise OutputError(f"'{t}' holds files but no featcache run ({RUN_MARKER}). Choose another output "
                              f"folder (a run folder is replaced whole).")

    def __enter__(self) -> Path:
        with reporting(self.target):
            self.tmp = Path(tempfile.mkdtemp(dir=self._parent, prefix=f".{self._name}.tmp-"))
            os.chmod(self.tmp, default_mode(folder=True))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                if isinstance(exc, OSError):
                    raise write_error(self.target, exc, kept=self._kept()) from None
                return
            try:
                self._commit()
            except OSError as e:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise write_error(self.target, e, kept=self._kept()) from None
        finally:
            self.release()

    def _kept(self) -> str:
        return "the run there is unchanged" if (self.target / RUN_MARKER).exists() else "no run was written"

    def _commit(self) -> None:
        fsync_dir(self.tmp)
        t = self.target
        if t.exists() and (t / RUN_MARKER).exists():  # overwrite (checked): swap, then drop the old run
            old = Path(tempfile.mkdtemp(dir=self._parent, prefix=f".{self._name}.old-"))
            os.replace(t, old / "run")
            try:
                os.rename(self.tmp, t)
            except OSError:
                os.replace(old / "run", t)  # the old run back in place
                raise
            fsync_dir(self._parent)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(self.tmp, t)  # onto nothing or an empty folder; a run written meanwhile is refused
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OutputError(f"'{t}' was filled by another writer meanwhile; the new run was dropped. Choose "
                                  f"another output folder.") from None
            raise
        fsync_dir(self._parent)

    def release(self) -> None:
        """Give up the folder (idempotent); an empty folder claimed for it and left empty is removed."""
        if self.claimed:
            try:
                self.target.rmdir()
            except OSError:
                pass  # the run is in it, or it is gone
            self.claimed = False
        self.lock.release()
