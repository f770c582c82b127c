"""Damaged bytes in a finished cache are never used (issue 26 item 2).

Every dataset of a cache carries HDF5's per-chunk fletcher32 checksum. The tests damage a chunk at
the file level (its offset found through h5py's ``get_chunk_info``), then check that every reader
refuses it with a ``CacheError`` naming the cache and the fix, that ``info --verify`` finds it, and
that the same ``extract`` command computes the damaged rows again (not a cache hit), equal to the
intact cache. Old caches without checksums stay readable and say so; sharded caches (virtual
datasets over the shard files) are checked through their shards.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_image_folder
from featcache import extract, open_cache
from featcache.cli import main
from featcache.errors import CacheDamagedError, CacheError
from featcache.runs.fit import fit_head
from featcache.runs.saved import evaluate
from featcache.extraction.shards import shard_path

TINY = dict(backbone="resnet18.none", input_size=32, batch_size=4, num_workers=0, dtype="float16",
            precision="fp32", device="cpu")
FLAGS = ["-b", "resnet18.none", "--input-size", "32", "--batch-size", "4", "--workers", "0", "--precision", "fp32"]
FEATURES = "val/features/pre_logits"


def damage(path: Path, name: str, chunk: int = 0) -> None:
    """Overwrite bytes in the middle of one stored chunk of dataset ``name`` (at the file level:
    HDF5 is not asked), as a bad disk sector or a stray write would."""
    with h5py.File(path, "r") as h:
        info = h[name].id.get_chunk_info(chunk)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        old = f.read(8)
        f.seek(info.byte_offset + info.size // 2)
        f.write(bytes(b ^ 0x40 for b in old))


def _damaged_message(cache: str, where: str) -> str:
    return f"Cache file '{cache}' is damaged in '{where}'"


@pytest.fixture
def extracted(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    res = extract(str(folder), **TINY, cache_dir=str(tmp_path / "cache"))
    with open_cache(res.cache) as c:
        intact = {s: c.load(s)[0] for s in c.splits}
    return folder, res.cache, intact


def test_every_dataset_of_a_cache_has_a_checksum_per_chunk(extracted):
    _, cache, _ = extracted
    with h5py.File(cache, "r") as h:
        assert h.attrs["checksums"] == b"fletcher32"
        names = []
        h.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and o.size else None)
        assert {"train/features/pre_logits", FEATURES, "val/labels", "val/ids", "val/hashes", "val/stat",
                "val/batch_n"} <= set(names)
        assert all(h[n].fletcher32 for n in names), [n for n in names if not h[n].fletcher32]
    out = CliRunner().invoke(main, ["info", cache, "--verify"])
    assert out.exit_code == 0, out.output
    assert "  checksums:  fletcher32 per chunk; verified: " in out.output


def test_damaged_feature_bytes_are_refused_by_every_reader(extracted, tmp_path):
    _, cache, _ = extracted
    run = fit_head(cache, head="logreg", output=str(tmp_path / "run")).run
    damage(Path(cache), FEATURES)
    with open_cache(cache) as c:  # the structure is intact: opening works, reading the data does not
        c.load("train")
        with pytest.raises(CacheDamagedError) as e:
            c.load("val")
        with pytest.raises(CacheDamagedError):
            c.features("val")[0:2]
        with pytest.raises(CacheDamagedError):
            c.verify()
    msg = str(e.value)
    assert msg.startswith(_damaged_message(cache, FEATURES))
    assert msg.endswith("its data fails its checksum or cannot be read, and is never used. Run the same "
                        "'featcache extract' command again: it computes the damaged rows again and replaces the file.")
    with pytest.raises(CacheError, match="is damaged in 'val/features/pre_logits'"):
        fit_head(cache, head="logreg", output=str(tmp_path / "run2"))
    with pytest.raises(CacheError, match="is damaged in 'val/features/pre_logits'"):
        evaluate(run, cache)
    for args in (["fit-head", cache, "-o", str(tmp_path / "run3")], ["evaluate", run, cache],
                 ["info", cache, "--verify"]):
        out = CliRunner().invoke(main, args)
        assert out.exit_code == 1 and out.output.startswith("Error: " + _damaged_message(cache, FEATURES)), out.output
        assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1
        js = CliRunner().invoke(main, [*args, "--json"])
        assert js.exit_code == 1 and json.loads(js.stdout)["type"] == "CacheDamagedError"
    plain = CliRunner().invoke(main, ["info", cache])  # without --verify: the summary, and how to check
    assert plain.exit_code == 0 and "checksums:  fletcher32 per chunk (checked on every read" in plain.output


def test_extract_computes_damaged_rows_again_instead_of_a_cache_hit(extracted, caplog):
    folder, cache, intact = extracted
    damage(Path(cache), FEATURES)
    with caplog.at_level(logging.WARNING):
        again = extract(str(folder), **TINY, cache_dir=str(Path(cache).parent))
    assert again.cache == cache and not again.cache_hit
    assert (again.computed, again.reused) == (8, 8)  # val's one chunk; train is copied
    assert "is damaged in 'val/features/pre_logits'" in caplog.text and "not a cache hit" in caplog.text
    assert "8 row(s) of split 'val' fail their checksum; they are computed again" in caplog.text
    with open_cache(cache) as c:
        c.verify()
        for split, X in intact.items():
            assert c.load(split)[0].tobytes() == X.tobytes()
    assert extract(str(folder), **TINY, cache_dir=str(Path(cache).parent)).cache_hit


def test_only_the_batches_of_a_damaged_chunk_are_computed_again(tmp_path, monkeypatch):
    """With chunks of 2 rows, damage to rows 2-3 of val costs one batch of 4 (rows 0-3), not the split."""
    import featcache.store.writer

    monkeypatch.setattr(featcache.store.writer, "feature_chunks", lambda shape, itemsize, n: (2, *shape))
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    first = extract(str(folder), **TINY, cache_dir=str(tmp_path / "cache"))
    with open_cache(first.cache) as c:
        intact = c.load("val")[0]
    damage(Path(first.cache), FEATURES, chunk=1)
    again = extract(str(folder), **TINY, cache_dir=str(tmp_path / "cache"))
    assert (again.computed, again.reused) == (4, 12)
    with open_cache(first.cache) as c:
        assert c.load("val")[0].tobytes() == intact.tobytes()


def test_extract_cli_over_damaged_labels_sets_the_file_aside_and_extracts_again(extracted):
    folder, cache, intact = extracted
    damage(Path(cache), "val/labels")
    with pytest.raises(CacheDamagedError, match="is damaged"):
        open_cache(cache)
    out = CliRunner().invoke(main, ["extract", str(folder), *FLAGS, "--cache-dir", str(Path(cache).parent),
                                    "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    assert res["cache_hit"] is False and res["computed"] == 16
    assert Path(cache + ".damaged").is_file()
    with open_cache(cache) as c:
        assert c.load("val")[0].tobytes() == intact["val"].tobytes()


def _without_checksums(src: Path, dst: Path) -> None:
    """``src`` as a featcache made before checksums wrote it: the same datasets, unfiltered, and no
    ``checksums`` attribute."""
    with h5py.File(src, "r") as a, h5py.File(dst, "w", track_order=True) as b:
        for k, v in a.attrs.items():
            if k != "checksums":
                b.attrs[k] = v

        def copy(name, obj):
            if isinstance(obj, h5py.Dataset):
                b.create_dataset(name, data=obj[()], chunks=obj.chunks if obj.size and obj.ndim > 1 else None)
        a.visititems(copy)


def test_a_cache_made_before_checksums_stays_readable_and_says_so(extracted, tmp_path):
    folder, cache, intact = extracted
    old = tmp_path / "old.h5"
    _without_checksums(Path(cache), old)
    with open_cache(old) as c:
        assert c.checksums is None and c.info()["checksums"] == "none"
        assert c.load("val")[0].tobytes() == intact["val"].tobytes()
        assert c.verify()["checksums"] == "none"
    out = CliRunner().invoke(main, ["info", str(old)])
    assert out.exit_code == 0, out.output
    assert "  checksums:  none (made by a featcache before checksums: damaged bytes cannot be detected" in out.output
    assert extract(str(folder), **TINY, output=str(old)).cache_hit


def test_sharded_cache_refuses_a_damaged_shard_and_its_rerun_repairs_it(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    cache_dir = tmp_path / "cache"
    results = [extract(str(folder), **TINY, cache_dir=str(cache_dir), shard=(i, 2)) for i in range(2)]
    final = Path(results[1].merged)
    with open_cache(final) as c:
        intact = c.load("val")[0]
        assert c.checksums == "fletcher32"
    shard = shard_path(final, 1, 2)
    damage(shard, FEATURES)
    with open_cache(final) as c:  # a virtual dataset reads the shard's chunks, checksums included
        with pytest.raises(CacheDamagedError, match=f"Cache file '{final}' is damaged in '{FEATURES}'"):
            c.load("val")
    assert not extract(str(folder), **TINY, cache_dir=str(cache_dir), shard=(0, 2)).computed  # intact shard
    again = extract(str(folder), **TINY, cache_dir=str(cache_dir), shard=(1, 2))
    assert not again.cache_hit and again.computed == 4
    with open_cache(final) as c:
        c.verify()
        assert c.load("val")[0].tobytes() == intact.tobytes()


def test_merge_of_shards_without_checksums_does_not_claim_them(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=2)
    cache_dir = tmp_path / "cache"
    for i in range(2):
        extract(str(folder), **TINY, cache_dir=str(cache_dir), shard=(i, 2), defer_merge=True)
    paths = sorted(cache_dir.glob("*.shard-*.h5"))
    for p in paths:
        with h5py.File(p, "a") as h:
            del h.attrs["checksums"]
    out = CliRunner().invoke(main, ["merge", str(cache_dir)])
    assert out.exit_code == 0, out.output
    final = Path(str(paths[0]).split(".shard-")[0])
    with open_cache(final) as c:
        assert c.checksums is None
