"""Files featcache writes outside the HDF5 store: atomic, durable, strict JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from featcache.common import files


def test_atomic_write_replaces_whole_and_syncs_the_folder(tmp_path, monkeypatch):
    synced = []
    real = files.fsync_dir
    monkeypatch.setattr(files, "fsync_dir", lambda p: synced.append(str(p)) or real(p))
    target = tmp_path / "a.json"
    target.write_text("old")
    files.write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    assert synced == [str(tmp_path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        files.atomic_write(target, boom)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_json_is_strict_and_numpy_aware(tmp_path):
    obj = {"nan": float("nan"), "inf": -math.inf, "f": np.float32(0.5), "i": np.int64(3), "a": np.arange(2),
           "t": (1, 2), 4: "key"}
    text = files.dumps(obj)
    assert json.loads(text) == {"nan": None, "inf": None, "f": 0.5, "i": 3, "a": [0, 1], "t": [1, 2], "4": "key"}
