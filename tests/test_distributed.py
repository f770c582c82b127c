"""Sharded and torchrun extraction: shards equal a single-process run, in the same order."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TEST_DEVICE, make_image_folder
from featcache import extract, open_cache
from featcache.cli import main
from featcache.errors import CacheError, ConfigError, ExtractionInterrupted
from featcache.extraction.shards import merge_dir, merge_shards, parse_shard, shard_path, shard_range

OPTS = dict(backbone="resnet18.none", input_size=32, batch_size=4, num_workers=0, dtype="float32", device=TEST_DEVICE)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("dist") / "imgs", per_class=9)


@pytest.fixture(scope="module")
def single(folder, tmp_path_factory):
    return extract(str(folder), **OPTS, cache_dir=str(tmp_path_factory.mktemp("single"))).cache


def _same(a: str, b: str) -> None:
    with open_cache(a) as ca, open_cache(b) as cb:
        assert ca.splits == cb.splits
        for s in ca.splits:
            assert ca.ids(s) == cb.ids(s)
            assert np.array_equal(ca.labels(s), cb.labels(s))
            if TEST_DEVICE == "cpu":
                assert np.array_equal(ca.load(s)[0], cb.load(s)[0])
            else:  # differed in the last bits on an H200 (bf16; likely per-process cuDNN autotuning)
                np.testing.assert_allclose(ca.load(s)[0], cb.load(s)[0], rtol=2e-2, atol=2e-2)


def test_shard_ranges_cover_every_row_once_aligned_to_batches():
    for n_rows in (0, 1, 7, 18, 100):
        for n in (1, 2, 3, 5):
            ranges = [shard_range(n_rows, 4, i, n) for i in range(n)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n_rows
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all(r[0] % 4 == 0 for r in ranges)
    assert parse_shard("1/3") == (1, 3)
    with pytest.raises(ConfigError, match="must be I/N with 0 <= I < N"):
        parse_shard("3/3")


def test_shards_then_last_one_assembles_equal_to_single(folder, single, tmp_path):
    results = [extract(str(folder), **OPTS, cache_dir=str(tmp_path), shard=(i, 3)) for i in range(3)]
    assert [r.merged for r in results[:2]] == [None, None]
    final = results[2].merged
    assert final and Path(final).name == Path(single).name
    _same(final, single)
    with open_cache(final) as c:
        assert c.features("train").is_virtual
    # Rerunning any shard is now a cache hit.
    again = extract(str(folder), **OPTS, cache_dir=str(tmp_path), shard=(1, 3))
    assert again.cache_hit and again.cache == final


def test_merge_command_and_self_contained_copy(folder, single, tmp_path):
    for i in range(2):
        extract(str(folder), **OPTS, cache_dir=str(tmp_path), shard=(i, 2), defer_merge=True)
    assert not (tmp_path / Path(single).name).exists()
    r = CliRunner().invoke(main, ["merge", str(tmp_path), "--copy", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)
    assert row["status"] == "merged"
    assert not list(tmp_path.glob("*.shard-*.h5"))  # the copy is self-contained
    with open_cache(row["cache"]) as c:
        assert not c.features("train").is_virtual
    _same(row["cache"], single)


def test_killed_shard_resumes_and_missing_shard_is_reported(folder, single, tmp_path):
    seen = []

    def stop(done, total):
        seen.append(done)
        if len(seen) == 2:
            raise KeyboardInterrupt

    extract(str(folder), **OPTS, cache_dir=str(tmp_path), shard=(0, 2))
    with pytest.raises(ExtractionInterrupted):
        extract(str(folder), **OPTS, cache_dir=str(tmp_path), shard=(1, 2), progress=stop)
    final = tmp_path / Path(single).name
    with pytest.raises(CacheError, match=r"shard\(s\) .*00001-of-00002.h5 are not finished"):
        merge_shards(final, 2)
    res = extract(str(folder), **OPTS, cache_dir=str(tmp_path), shard=(1, 2))
    assert res.reused >= 4 and res.merged == str(final)
    _same(str(final), single)
    os.unlink(shard_path(final, 0, 2))
    with pytest.raises(CacheError, match="presents shard files that are missing"):
        open_cache(final)


def test_shards_of_another_fingerprint_are_refused(folder, tmp_path):
    extract(str(folder), **OPTS, cache_dir=str(tmp_path / "a"), shard=(0, 2), defer_merge=True)
    other = extract(str(folder), **{**OPTS, "dtype": "float16"}, cache_dir=str(tmp_path / "b"), shard=(1, 2),
                    defer_merge=True)
    a_final = Path(next(p for p in (tmp_path / "a").glob("*.shard-00000-of-00002.h5"))).name.split(".shard-")[0]
    shutil.copy(other.cache, tmp_path / "a" / f"{a_final}.shard-00001-of-00002.h5")
    with pytest.raises(CacheError, match="has another fingerprint"):
        merge_dir(tmp_path / "a")


def test_torchrun_two_gloo_ranks_equal_single(folder, single, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this Python")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", "29517", "-m", "featcache", "extract", str(folder),
           "-b", "resnet18.none", "--input-size", "32", "--batch-size", "4", "--workers", "0", "--dtype", "float32",
           "--device", TEST_DEVICE, "--cache-dir", str(tmp_path), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["world_size"] == 2 and len(res["ranks"]) == 2
    assert sum(r["computed"] for r in res["ranks"]) == 36
    _same(res["cache"], single)


def test_torchrun_ranks_of_a_shard_source_take_whole_tar_shards_and_equal_single(folder, tmp_path):
    from data_kinds import write_wds

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this Python")
    spec = f"wds:{write_wds(folder, tmp_path / 'shards', shards=3)}"  # 18 samples per split: shards of 6
    single_wds = extract(spec, **OPTS, cache_dir=str(tmp_path / "single")).cache
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", "29519", "-m", "featcache", "extract", spec,
           "-b", "resnet18.none", "--input-size", "32", "--batch-size", "4", "--workers", "0", "--dtype", "float32",
           "--device", TEST_DEVICE, "--cache-dir", str(tmp_path / "c"), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # rank 0 takes shard 0 of each split (6 + 6 samples), rank 1 shards 1 and 2 (12 + 12)
    assert sorted(r["computed"] for r in res["ranks"]) == [12, 24]
    _same(res["cache"], single_wds)
