"""The store is the one package that speaks HDF5 (issue 21): only it imports h5py, and its writer and
concatenation work in store terms (splits, layers, rows, file names)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

import featcache
from featcache import open_cache
from featcache.errors import CacheError
from featcache.store.cache import SUFFIX, CacheFingerprint, cache_file_name, cache_files
from featcache.store.merge import concat_caches
from featcache.store.writer import CacheWriter

PACKAGE = Path(featcache.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_store_imports_h5py():
    importers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "h5py" in _imports(p))
    assert importers and all(p.startswith("store/") for p in importers), importers


FP = CacheFingerprint(backbone={"name": "toy"}, layers=("a", "b"), pool="avg", preprocess={}, precision="fp32",
                      dtype="float32", channels_last=False, device_type="cpu", source={"kind": "toy", "spec": "toy"},
                      augment={"views": 2})


def _cache(path: Path, rows: dict[str, np.ndarray], *, views: int = 0, shard: int = 0) -> Path:
    """A cache of ``rows`` (split -> first feature column; rows placed out of order on purpose)."""
    with CacheWriter(path, fingerprint=FP.to_json(), fingerprint_hash=FP.hash, classes=json.dumps(["x", "y"]),
                     layers=json.dumps(["a", "b"]), timings=json.dumps({"shard": shard})) as w:
        for split, x in rows.items():
            n = len(x)
            w.add_split(split, labels=np.arange(n) % 2, ids=[f"{split}/{shard}/{i}" for i in range(n)],
                        hashes=[f"{shard}{split}{i}".ljust(32, "0").encode() for i in range(n)],
                        stat=np.zeros((n, 2)), batch_n=np.full(n, 4))
            for layer, width in (("a", 3), ("b", 2)):
                w.add_features(split, layer, (n, width), "float32")
                if views and split == "train":
                    w.add_features(split, layer, (n, views, width), "float32", views=True)
                feats = np.repeat(x[:, None], width, axis=1).astype(np.float32)
                order = np.concatenate([np.arange(1, n, 2), np.arange(0, n, 2)])  # two runs, then sorted
                for part in (order[: n // 2], order[n // 2:]):
                    part = np.sort(part)
                    vblock = np.repeat(feats[part][:, None], views, axis=1) + 1 if views and split == "train" \
                        else None
                    w.place_rows(split, layer, part, feats[part], views=vblock)
        w.add_failed([{"split": "train", "id": f"bad{shard}", "reason": "unreadable", "stat": (1, 2)}])
    return path


@pytest.mark.parametrize("virtual", [False, True])
def test_concat_caches_keeps_rows_in_order(tmp_path, virtual):
    parts = [_cache(tmp_path / f"p0{SUFFIX}", {"train": np.arange(5.0), "val": np.arange(2.0)}, views=2),
             _cache(tmp_path / f"p1{SUFFIX}", {"train": np.arange(10.0, 13.0)}, views=2, shard=1)]
    caches = [open_cache(p) for p in parts]
    try:
        out = concat_caches(tmp_path / f"all{SUFFIX}", caches, virtual=virtual, attrs={"note": "joined"})
    finally:
        for c in caches:
            c.close()
    with open_cache(out) as c:
        assert c.splits == ["train", "val"] and c.layers == ["a", "b"]
        assert c.load("train", "a")[0][:, 0].tolist() == [0, 1, 2, 3, 4, 10, 11, 12]
        assert c.load("train", "b")[0].shape == (8, 2)
        assert c.views("train", "a")[()].shape == (8, 2, 3)
        assert c.views("train", "b")[()][:, 1, 0].tolist() == [1, 2, 3, 4, 5, 11, 12, 13]
        assert c.ids("train")[4:6] == ["train/0/4", "train/1/0"]
        assert c.batch_n("train").tolist() == [4] * 8
        assert [f["id"] for f in c.failed] == ["bad0", "bad1"]
        assert c.text_attr("note") == "joined" and c.fingerprint == FP.to_dict()
        assert c.checksums == "fletcher32"
    if not virtual:  # self-contained: the parts are not needed to read it
        for p in parts:
            p.unlink()
        with open_cache(out) as c:
            assert c.verify()["datasets"] > 0


def test_concat_caches_presents_only_files_of_its_folder(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    part = _cache(tmp_path / "elsewhere" / f"p{SUFFIX}", {"train": np.arange(3.0)})
    with open_cache(part) as c:
        with pytest.raises(CacheError, match="presents only files in its own folder"):
            concat_caches(tmp_path / f"all{SUFFIX}", [c], virtual=True)
    with pytest.raises(CacheError, match="no cache files were given"):
        concat_caches(tmp_path / f"all{SUFFIX}", [])
    assert not (tmp_path / f"all{SUFFIX}").exists()


def test_cache_files_and_names_share_one_suffix(tmp_path):
    assert cache_file_name(FP).endswith(SUFFIX)
    (tmp_path / f"a{SUFFIX}").touch()
    (tmp_path / f"a{SUFFIX}.shard-00000-of-00002{SUFFIX}").touch()
    (tmp_path / "b.txt").touch()
    assert [p.name for p in cache_files(tmp_path)] == [f"a{SUFFIX}", f"a{SUFFIX}.shard-00000-of-00002{SUFFIX}"]
    assert [p.name for p in cache_files(tmp_path, "*.shard-*-of-*")] == [f"a{SUFFIX}.shard-00000-of-00002{SUFFIX}"]
