"""The fault matrix: {kill -9, damaged chunk, damaged meta, stale temporary files, source changed
between runs, source changed between shards, disk full at the final assembly, a concurrent writer}
x {single process, --shard I/N, torchrun with 2 gloo ranks}.

Each cell puts a cache folder into a faulty state, then runs the same command(s) again. The run
must complete without a traceback, and what it writes must equal an uninterrupted extraction of
the current source: ids, labels and features bit for bit. Damaged partial state must be named in
one warning line and kept as ``*.damaged``.

The torchrun column has four cells, to stay within 3 minutes on 2 cores: kill -9, a flipped chunk,
images added between runs and between shards. Its faulty states are made in-process with
``--shard I/2``, whose files are the ranks' (same fingerprint, same shares), so each cell starts
torchrun once (twice for the kill).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import make_image_folder
from featcache import extract, open_cache
from featcache.cli import main
from featcache.store.writer import CacheLock
from featcache.errors import CacheError, CacheLockedError, ExtractionInterrupted
from featcache.extraction.shards import merge_dir
from featcache.extraction.partial import PartialStore
from test_extract import _interrupt_after
from test_reliability import Zygote, _assert_same_cache, zygote  # noqa: F401 (a fixture)

#: Options of every extraction here; FLAGS spell the same for the command line.
OPTS = dict(backbone="resnet18.none", input_size=32, batch_size=2, num_workers=0, dtype="float32",
            precision="fp32", device="cpu", checkpoint_every=0, fold_bn=False, threads=1)
FLAGS = ["-b", "resnet18.none", "--input-size", "32", "--batch-size", "2", "--workers", "0", "--dtype", "float32",
         "--precision", "fp32", "--device", "cpu", "--checkpoint-every", "0", "--no-fold-bn", "--threads", "1", "-q"]
TORCHRUN = Path(sys.executable).with_name("torchrun")
WARNING = "Set aside damaged partial state"


# --- the source and its changes -------------------------------------------------------------------

def _image(path: Path, seed: int) -> None:
    arr = np.random.default_rng(seed).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _added(folder: Path) -> None:  # 4 train images: the shard cuts move
    for k, c in enumerate(("cat", "dog")):
        for i in range(2):
            _image(folder / "train" / c / f"added_{i}.png", 100 + 2 * k + i)


def _removed(folder: Path) -> None:
    (folder / "train" / "cat" / "cat_001.png").unlink()
    (folder / "val" / "dog" / "dog_002.jpg").unlink()


def _modified(folder: Path) -> None:  # same names, other pixels
    _image(folder / "train" / "dog" / "dog_001.png", 200)
    _image(folder / "val" / "cat" / "cat_000.jpg", 201)


def _renamed(folder: Path) -> None:  # another order, and another class (label)
    os.replace(folder / "train" / "cat" / "cat_000.jpg", folder / "train" / "cat" / "zz_renamed.jpg")
    os.replace(folder / "val" / "dog" / "dog_001.png", folder / "val" / "cat" / "moved.png")


CHANGES = {"none": lambda folder: None, "added": _added, "removed": _removed, "modified": _modified,
           "renamed": _renamed}


def _folder(root: Path) -> Path:
    return make_image_folder(root, per_class=3)  # 12 images: 3 batches of 2 per split


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    """One thread per extraction (torchrun's ranks have one each too); other tests get theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """change name -> an uninterrupted single-process cache of the source after that change."""
    made: dict[str, str] = {}

    def get(change: str) -> str:
        if change not in made:
            root = tmp_path_factory.mktemp(f"ref-{change}")
            folder = _folder(root / "imgs")
            CHANGES[change](folder)
            made[change] = extract(str(folder), **OPTS, cache_dir=str(root / "cache")).cache
        return made[change]

    return get


# --- how each mode runs "the same command" ----------------------------------------------------------

def _cli(args: list[str]) -> str:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and r.exception is None, f"exit {r.exit_code}:\n{r.output}"
    return r.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(folder: Path, cache_dir: Path, *, start_only: bool = False):
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "featcache",
           "extract", str(folder), *FLAGS, "--cache-dir", str(cache_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if start_only:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    return log


def run_again(mode: str, folder: Path, cache_dir: Path, caplog) -> list[str]:
    """Run the mode's command(s) to the end; return the warning lines they logged. No traceback."""
    caplog.clear()
    if mode == "torchrun":
        log = _torchrun(folder, cache_dir)
        assert "Traceback" not in log, log[-3000:]
        return [line for line in log.splitlines() if line.startswith("WARNING")]
    shards = [["--shard", "0/2"], ["--shard", "1/2"]] if mode == "shard" else [[]]
    for extra in shards:
        _cli(["extract", str(folder), *FLAGS, "--cache-dir", str(cache_dir), *extra])
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def interrupted(mode: str, folder: Path, cache_dir: Path) -> Path:
    """Stop an extraction in the progress report of its 2nd batch (shard 1 of 2 outside single mode;
    shard 0 is finished first in --shard mode, left to rank 0 under torchrun): 3 chunk files, the
    3rd batch having been computed by then (host copies run one batch behind). Returns the partial
    folder."""
    if mode == "shard":
        extract(str(folder), **OPTS, cache_dir=str(cache_dir), shard=(0, 2))
    shard = None if mode == "single" else (1, 2)
    with pytest.raises(ExtractionInterrupted):
        extract(str(folder), **OPTS, cache_dir=str(cache_dir), shard=shard, progress=_interrupt_after(2))
    (partial,) = cache_dir.glob("*.partial")
    assert len(list(partial.glob("c-*.npz"))) == 3
    return partial


def finished(mode: str, folder: Path, cache_dir: Path) -> None:
    """An uninterrupted extraction (torchrun's files made by its two shards in-process)."""
    if mode == "single":
        extract(str(folder), **OPTS, cache_dir=str(cache_dir))
    else:
        for i in range(2):
            extract(str(folder), **OPTS, cache_dir=str(cache_dir), shard=(i, 2))


def final_cache(cache_dir: Path) -> Path:
    (final,) = [p for p in cache_dir.glob("*.h5") if ".shard-" not in p.name]
    return final


# --- the faults ----------------------------------------------------------------------------------------

def _flip(path: Path, n: int) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2 - n // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def _foreign_chunk(partial: Path, scratch: Path) -> Path:
    """A valid chunk of another extraction (another fingerprint), copied in under its own name."""
    other = PartialStore(scratch, "f" * 16)
    chunk = other.write_chunk(np.asarray(["0" * 32], "S32"), [np.ones((1, 512), np.float32)], ["train/cat/cat_000.jpg"],
                              np.zeros((1, 2), np.int64), [], [], np.zeros((0, 2), np.int64))
    return Path(shutil.copy(chunk, partial / chunk.name))


def damage_chunk(kind: str, partial: Path, scratch: Path) -> Path:
    """Damage one chunk file (or add a foreign one); returns the file that must be set aside."""
    chunk = sorted(partial.glob("c-*.npz"))[0]
    if kind == "truncate":
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    elif kind == "zero":
        chunk.write_bytes(b"")
    elif kind == "flip":
        _flip(chunk, 64)
    else:
        chunk = _foreign_chunk(partial, scratch)
    return chunk


def _assert_one_warning(warnings: list[str], names: list[str]) -> None:
    lines = [w for w in warnings if WARNING in w]
    assert len(lines) == 1, warnings
    assert all(name in lines[0] for name in names), lines[0]


def _kill_9(mode: str, folder: Path, cache_dir: Path, zygote: Zygote, moment: str | None = None) -> None:
    """Kill an extraction (shard 1 in --shard mode) at a moment drawn with a seed per mode: after 1
    or 2 chunk files, while assembling, or just before the rename to its final name (single:
    assembling, shard: 2 chunks). Torchrun's process group is killed once a rank wrote a chunk."""
    moment = moment or random.Random(f"kill-{mode}").choice(["chunks-1", "chunks-2", "assemble", "rename"])
    if mode == "torchrun":  # the ranks' process group, once the first chunk file is there
        proc = _torchrun(folder, cache_dir, start_only=True)
        deadline = time.monotonic() + 120
        while not list(cache_dir.glob("*.partial/c-*.npz")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no chunk file within 120 s"
            time.sleep(0.003)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert not [p for p in cache_dir.glob("*.h5") if ".shard-" not in p.name], "finished before the kill"
        return
    shard = None
    if mode == "shard":
        extract(str(folder), **OPTS, cache_dir=str(cache_dir), shard=(0, 2))
        shard = [1, 2]
    child = zygote.spawn(source=str(folder), options={**OPTS, "cache_dir": str(cache_dir), "shard": shard},
                         sleep=0.05, block_rename=True, block_assemble=moment == "assemble")
    deadline = time.monotonic() + 60
    want = int(moment.split("-")[1]) if moment.startswith("chunks") else None
    while not (child.blocked_at() or (want and len(list(cache_dir.glob("*.partial/c-*.npz"))) >= want)):
        assert not child.finished(), child.log
        assert time.monotonic() < deadline, f"no kill moment {moment} within 60 s:\n{child.log}"
        time.sleep(0.003)
    assert child.kill9() == -signal.SIGKILL, child.log


def _no_room(fd, offset, length):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- the matrix -----------------------------------------------------------------------------------------

FAULTS = ["kill-9", "chunk-truncate", "chunk-zero", "chunk-flip", "chunk-foreign", "meta-damaged", "stale-tmp",
          "run-added", "run-removed", "run-modified", "run-renamed", "shards-added", "shards-modified",
          "disk-full-assembly", "concurrent-writer"]
TORCHRUN_FAULTS = {"kill-9", "chunk-flip", "run-added", "shards-added"}
MODES = ["single", "shard", "torchrun"]
CELLS = [pytest.param(fault, mode, id=f"{fault}-{mode}",
                      marks=[pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")]
                      if mode == "torchrun" else [])
         for fault in FAULTS for mode in MODES if mode != "torchrun" or fault in TORCHRUN_FAULTS]


@pytest.mark.parametrize("fault, mode", CELLS)
def test_fault_matrix(fault, mode, tmp_path, reference, zygote, caplog, monkeypatch):  # noqa: F811 (zygote)
    caplog.set_level(logging.WARNING)
    folder = _folder(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    change = "none"
    set_aside: list[Path] = []
    if fault == "kill-9":
        _kill_9(mode, folder, cache_dir, zygote)
    elif fault.startswith("chunk-"):
        partial = interrupted(mode, folder, cache_dir)
        set_aside.append(damage_chunk(fault.split("-")[1], partial, tmp_path / "other.partial"))
    elif fault == "meta-damaged":
        partial = interrupted(mode, folder, cache_dir)
        _flip(partial / "meta.json", 8)
        set_aside.append(partial / "meta.json")
    elif fault == "stale-tmp":  # an assembly and a chunk write killed before their rename
        partial = interrupted(mode, folder, cache_dir)
        target = partial.with_name(partial.name[: -len(".partial")])
        final = target.with_name(target.name.split(".shard-")[0])
        for stale in {target, final}:
            stale.with_name(stale.name + ".tmp").write_bytes(b"\x89HDF\r\n half an assembly")
        (partial / f"c-{'0' * 64}.npz.tmp").write_bytes(b"PK\x03\x04 half a chunk")
    elif fault.startswith("run-"):
        change = fault.split("-")[1]
        finished(mode, folder, cache_dir)
        CHANGES[change](folder)
        if mode == "shard":  # one shard run again: the cache presents shards of two plans
            _cli(["extract", str(folder), *FLAGS, "--cache-dir", str(cache_dir), "--shard", "0/2"])
            with pytest.raises(CacheError, match="presents shard files that changed after it was assembled"):
                open_cache(final_cache(cache_dir))
    elif fault == "disk-full-assembly":  # the chunks fit, the assembled file does not: one error, chunks kept
        with monkeypatch.context() as m:
            m.setattr(os, "posix_fallocate", _no_room)
            with pytest.raises(CacheError, match=r"^Disk full while assembling '.*' \(No space left on device\)\. "
                                                 r"What was computed is kept in '.*\.partial'"):
                finished(mode, folder, cache_dir)
        assert list(cache_dir.glob("*.partial/c-*.npz"))
        assert {p.suffix for p in cache_dir.iterdir()} == {".lock", ".partial"}  # no .h5, no .tmp
    elif fault == "concurrent-writer":  # another process holds the lock: refused, nothing touched
        partial = interrupted(mode, folder, cache_dir)
        chunks = sorted(p.name for p in partial.iterdir())
        lock = CacheLock(partial.with_name(partial.name[: -len(".partial")] + ".lock"))
        try:
            with pytest.raises(CacheLockedError, match=r"^Another process is writing '"):
                extract(str(folder), **OPTS, cache_dir=str(cache_dir), shard=None if mode == "single" else (1, 2))
        finally:
            lock.release()
        assert sorted(p.name for p in partial.iterdir()) == chunks
    else:  # shards-*: the source changes between the shards of one run (single: between a stop and its resume)
        change = fault.split("-")[1]
        if mode == "single":
            interrupted(mode, folder, cache_dir)
        else:
            extract(str(folder), **OPTS, cache_dir=str(cache_dir), shard=(0, 2))
        CHANGES[change](folder)
        if mode == "shard":  # shard 1 on the new source: shards of two plans are never assembled
            _cli(["extract", str(folder), *FLAGS, "--cache-dir", str(cache_dir), "--shard", "1/2"])
            assert not [p for p in cache_dir.glob("*.h5") if ".shard-" not in p.name]
    warnings = run_again(mode, folder, cache_dir, caplog)
    if set_aside:
        _assert_one_warning(warnings, [p.name for p in set_aside])
        assert all(p.with_name(p.name + ".damaged").exists() for p in set_aside)
    else:
        assert not [w for w in warnings if WARNING in w], warnings
    assert not list(cache_dir.rglob("*.tmp")), "a temporary file was left behind"
    _assert_same_cache(final_cache(cache_dir), reference(change))


# --- beside the matrix ----------------------------------------------------------------------------------

def test_flipped_chunk_after_kill_9_gives_one_warning_line_and_a_bit_identical_cache(zygote, tmp_path,  # noqa: F811
                                                                                      reference):
    folder = _folder(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    _kill_9("single", folder, cache_dir, zygote, moment="chunks-3")
    chunk = sorted(cache_dir.glob("*.partial/c-*.npz"))[1]
    _flip(chunk, 64)
    child = zygote.spawn(cli=["extract", str(folder), *FLAGS, "--cache-dir", str(cache_dir)])
    assert child.wait() == 0, child.log
    assert "Traceback" not in child.log
    (line,) = [x for x in child.log.splitlines() if x.startswith("WARNING")]
    assert line.startswith(f"WARNING featcache.extraction.partial: {WARNING} in '{chunk.parent}' as *.damaged: ")
    assert line.endswith(f"{chunk.name} (checksum mismatch); its batches are computed again.")
    assert chunk.with_name(chunk.name + ".damaged").is_file()
    _assert_same_cache(final_cache(cache_dir), reference("none"))


def test_a_cache_whose_shard_files_changed_is_refused_by_every_reader_until_reassembled(tmp_path, reference):
    folder = _folder(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    finished("shard", folder, cache_dir)
    final = final_cache(cache_dir)
    _added(folder)
    for i in range(2):  # the shard files are rewritten behind the cache's back
        extract(str(folder), **OPTS, cache_dir=str(cache_dir), shard=(i, 2), defer_merge=True)
    message = (f"Cache file '{final}' presents shard files that changed after it was assembled: {final.name}.shard-"
               f"00000-of-00002.h5, {final.name}.shard-00001-of-00002.h5. Re-run the same extraction for every "
               f"shard (each --shard I/N, or the same torchrun command) to re-assemble it.")
    with pytest.raises(CacheError) as e:
        open_cache(final)
    assert str(e.value) == message
    for args in (["info", str(final)], ["fit-head", str(final), "--runs-dir", str(tmp_path / "runs")]):
        r = CliRunner().invoke(main, args)
        assert (r.exit_code, r.output.strip().splitlines()) == (1, [f"Error: {message}"])
    r = CliRunner().invoke(main, ["merge", str(cache_dir), "--json"])
    assert r.exit_code == 0 and '"status": "assembled"' in r.output, r.output
    _assert_same_cache(final, reference("added"))
    assert merge_dir(cache_dir)[0]["status"] == "exists"


def test_merge_refuses_shards_cut_from_different_versions_of_the_source(tmp_path):
    folder = _folder(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    extract(str(folder), **OPTS, cache_dir=str(cache_dir), shard=(0, 2))
    _removed(folder)
    res = extract(str(folder), **OPTS, cache_dir=str(cache_dir), shard=(1, 2))
    assert res.merged is None  # the last shard to finish does not assemble shards of two plans
    r = CliRunner().invoke(main, ["merge", str(cache_dir)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    (line,) = r.output.strip().splitlines()
    assert line.startswith("Error: The shards of '") and "were cut from different versions of the source" in line
    assert line.endswith("Re-run the same extraction for every shard on the current source.")


def test_lock_and_tmp_paths_that_are_not_files_are_set_aside(tmp_path, reference, caplog):
    folder = _folder(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    partial = interrupted("single", folder, cache_dir)
    final = partial.with_name(partial.name[: -len(".partial")])
    final.with_name(final.name + ".lock").unlink()
    for suffix in (".lock", ".tmp"):
        final.with_name(final.name + suffix).mkdir()
    extract(str(folder), **OPTS, cache_dir=str(cache_dir))
    for suffix in (".lock", ".tmp"):
        assert final.with_name(final.name + suffix + ".damaged").is_dir()
    assert stat.S_ISREG(final.with_name(final.name + ".lock").stat().st_mode)
    assert len([r for r in caplog.records if "set aside" in r.getMessage()]) == 2
    _assert_same_cache(final, reference("none"))


def test_partial_state_of_another_fingerprint_or_format_is_set_aside(tmp_path, caplog):
    store = PartialStore(tmp_path / "p.partial", "a" * 16)
    ours = store.write_chunk(np.asarray(["0" * 32], "S32"), [np.ones((1, 4), np.float32)], ["x"],
                             np.zeros((1, 2), np.int64), [], [], np.zeros((0, 2), np.int64))
    old_name = store.path / "c-0123456789abcdef0123456789abcdef.npz"  # featcache 0.1 named chunks by a uuid
    shutil.copy(ours, old_name)
    assert store.verified_chunk(ours, 1) is not None
    assert store.verified_chunk(old_name, 1) is None
    store.warn_set_aside()
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line.endswith(": c-0123456789abcdef0123456789abcdef.npz (not a featcache chunk name); its batches are "
                         "computed again.")
    other = PartialStore(tmp_path / "p.partial", "b" * 16)  # meta.json of fingerprint a: set aside
    assert other.verified_chunk(ours, 1) is None
    other.warn_set_aside()
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][1:]
    assert line.endswith(f"meta.json (of another fingerprint or featcache version), {ours.name} (of another "
                         f"fingerprint or featcache version); its batches are computed again.")
    assert sorted(p.name for p in other.path.iterdir()) == sorted(
        ["meta.json", "meta.json.damaged", old_name.name + ".damaged", ours.name + ".damaged"])
    other.remove()  # what was set aside stays
    assert sorted(p.name for p in other.path.iterdir()) == sorted(
        ["meta.json.damaged", old_name.name + ".damaged", ours.name + ".damaged"])


def test_renames_of_chunks_and_of_the_final_file_are_followed_by_a_folder_fsync(tmp_path, monkeypatch):
    """What a test can see of crash safety: each rename into place is followed by an fsync of its
    folder before anything else is renamed (that the disk honours fsync is not testable here)."""
    import featcache.store.writer as store
    import featcache.extraction.partial as partial

    events = []
    real_replace, real_fsync_dir = os.replace, store.fsync_dir
    monkeypatch.setattr(os, "replace", lambda a, b: (real_replace(a, b), events.append(("replace", Path(b))))[0])
    for module in (store, partial):  # the cache file's rename and the chunks' renames
        monkeypatch.setattr(module, "fsync_dir", lambda d: (real_fsync_dir(d), events.append(("fsync", Path(d))))[0])
    folder = _folder(tmp_path / "imgs")
    for i in range(2):
        extract(str(folder), **OPTS, cache_dir=str(tmp_path / "cache"), shard=(i, 2))
    renamed = [(k, e[1]) for k, e in enumerate(events) if e[0] == "replace"]
    assert {p.suffix for _, p in renamed} == {".npz", ".h5", ".json"}
    for k, path in renamed:
        assert events[k + 1] == ("fsync", path.parent), (path, events[k + 1])
    assert sum(p.name == final_cache(tmp_path / "cache").name for _, p in renamed) == 1


def test_features_of_another_batch_size_are_reused_and_recorded_as_such(tmp_path):
    """Only --batch-size changed: what was computed is reused (to float rounding where its batch
    had another size: batch_n 0), and only batches holding a new image are computed, whole."""
    folder = _folder(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    first = extract(str(folder), **OPTS, cache_dir=str(cache_dir))
    with open_cache(first.cache) as c:
        assert c.batch_n("train").tolist() == [2] * 6
    _added(folder)
    res = extract(str(folder), **{**OPTS, "batch_size": 4}, cache_dir=str(cache_dir))
    # train blocks of 4: [a0 a1 c0 c1] [c2 da0 da1 d0] computed, [d1 d2] reused; val reused
    assert (res.computed, res.reused) == (8, 8)
    fresh = extract(str(folder), **{**OPTS, "batch_size": 4}, cache_dir=str(tmp_path / "fresh"))
    with open_cache(res.cache) as a, open_cache(fresh.cache) as b:
        # a batch of 2 is a batch of 2 whatever --batch-size asked for: those rows are exact
        assert a.batch_n("train").tolist() == [4] * 8 + [2, 2] and a.batch_n("val").tolist() == [0] * 4 + [2, 2]
        for split in a.splits:
            assert a.ids(split) == b.ids(split)
            np.testing.assert_allclose(a.load(split)[0], b.load(split)[0], rtol=1e-5, atol=1e-5)


def test_a_sharded_rerun_with_on_error_fail_stops_at_a_recorded_failure(tmp_path):
    """The assembled cache of a sharded run is reused like any hit: on_error='fail' refuses the
    failures it records instead of passing them over."""
    from featcache.errors import SourceError

    folder = _folder(tmp_path / "imgs")
    (folder / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    cache = str(tmp_path / "cache")
    for i in range(2):
        extract(str(folder), **OPTS, cache_dir=cache, shard=(i, 2))
    with pytest.raises(SourceError, match="recorded by an earlier run"):
        extract(str(folder), **OPTS, cache_dir=cache, shard=(0, 2), on_error="fail")


def test_merge_assembles_a_self_contained_file(tmp_path):
    """--merge copies the shards' rows into the final file: it stays readable without them."""
    folder = _folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    for i in range(2):
        res = extract(str(folder), **OPTS, cache_dir=str(cache), shard=(i, 2), merge=True)
    final = res.merged  # the last shard assembles the final file
    with open_cache(final) as c:
        before = {s: c.load(s)[0] for s in c.splits}
    for shard in cache.glob("*.shard-*"):
        shard.unlink()
    with open_cache(final) as c:
        assert all(np.array_equal(c.load(s)[0], before[s]) for s in c.splits)


# --- the source kinds of issue 22 (wds:, parquet:, hf:) ------------------------------------------------

KIND_FAULTS = ["kill-9", "chunk-flip", "shards"]


@pytest.mark.parametrize("kind", ["wds", "parquet", "hf"])
@pytest.mark.parametrize("fault", KIND_FAULTS)
def test_fault_matrix_of_the_data_kinds(kind, fault, tmp_path, zygote, caplog):  # noqa: F811 (zygote)
    """kill -9 (single process), a flipped chunk after a stop, and --shard 0/2 + 1/2: each ends in
    the cache of an uninterrupted extraction of the same shards / parquet files / saved data set."""
    from data_kinds import write_hf, write_parquet, write_wds

    caplog.set_level(logging.WARNING)
    writer = {"wds": write_wds, "parquet": write_parquet, "hf": write_hf}[kind]
    spec = f"{kind}:{writer(_folder(tmp_path / 'imgs'), tmp_path / 'data')}"
    ref = extract(spec, **OPTS, cache_dir=str(tmp_path / "ref")).cache
    cache_dir = tmp_path / "cache"
    if fault == "kill-9":
        child = zygote.spawn(source=spec, options={**OPTS, "cache_dir": str(cache_dir)}, sleep=0.05, block_rename=True)
        deadline = time.monotonic() + 60
        while len(list(cache_dir.glob("*.partial/c-*.npz"))) < 2:
            assert not child.finished(), child.log
            assert time.monotonic() < deadline, child.log
            time.sleep(0.003)
        assert child.kill9() == -signal.SIGKILL, child.log
        extract(spec, **OPTS, cache_dir=str(cache_dir))
    elif fault == "chunk-flip":
        with pytest.raises(ExtractionInterrupted):
            extract(spec, **OPTS, cache_dir=str(cache_dir), progress=_interrupt_after(2))
        (partial,) = cache_dir.glob("*.partial")
        chunk = damage_chunk("flip", partial, tmp_path / "other.partial")
        extract(spec, **OPTS, cache_dir=str(cache_dir))
        _assert_one_warning([r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING], [chunk.name])
    else:
        for i in range(2):
            extract(spec, **OPTS, cache_dir=str(cache_dir), shard=(i, 2))
    _assert_same_cache(final_cache(cache_dir), ref)
