"""Source kinds as registered classes: capabilities are class attributes, open_source and
check_source_spec dispatch through the registry, and a new kind is one class plus one registry line."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
from click.testing import CliRunner

from featcache import extract
from featcache.cli import main
from featcache.errors import SourceError
from featcache.sources import (RANDOM_ACCESS, SOURCES, DigitsSource, ImageFolderSource, NpzSource, SampleRef,
                               Source, check_source_spec, content_hash, list_sources, open_source, source_kind)


class StripesSource(Source):
    """A made-up kind: a text file whose lines are class names; sample i is a striped 16x16 image."""

    kind = "stripes"
    pre_decoded = True
    splits_from = "all train"
    suffixes = (".stripes",)

    def __init__(self, path: str) -> None:
        super().__init__(spec=str(path))
        names = open(path).read().split()
        self.classes = sorted(set(names))
        self.splits = {"train": [SampleRef(str(i), self.classes.index(n), i) for i, n in enumerate(names)]}

    def read(self, ref: SampleRef):
        arr = np.zeros((16, 16, 3), np.uint8)
        arr[:, ::2, ref.label] = 200 + ref.key
        return arr, content_hash(arr)


@pytest.fixture
def stripes(monkeypatch, tmp_path):
    monkeypatch.setattr(SOURCES, "_entries", dict(SOURCES._entries))  # registered for this test only
    SOURCES.register("stripes", StripesSource, description="striped test images")
    path = tmp_path / "data.stripes"
    path.write_text("a b a b a b\n")
    return path


def test_capabilities_are_class_attributes():
    assert (NpzSource.pre_decoded, DigitsSource.pre_decoded, ImageFolderSource.pre_decoded) == (True, True, False)
    assert DigitsSource.builtin and not NpzSource.builtin and NpzSource.access == RANDOM_ACCESS
    rows = {r["kind"]: r for r in list_sources()}
    assert list(rows) == ["folder", "csv", "npz", "digits", "wds", "parquet", "hf"]
    assert rows["npz"] == {"kind": "npz", "access": "random", "pre_decoded": True, "builtin": False,
                           "splits_from": "train_*/val_*/test_* keys", "suffixes": [".npz"], "share_unit": "",
                           "description": SOURCES.entry("npz").description}


def test_sources_json_lists_the_registry():
    r = CliRunner().invoke(main, ["sources", "--json"])
    assert r.exit_code == 0 and json.loads(r.output) == list_sources()


def test_a_new_kind_is_one_class_and_one_registry_line(stripes, tmp_path, monkeypatch):
    assert source_kind(stripes) == (StripesSource, str(stripes))
    assert source_kind(f"stripes:{stripes}") == (StripesSource, str(stripes))
    check_source_spec(stripes)
    with pytest.raises(SourceError, match="does not exist"):
        check_source_spec(tmp_path / "other.stripes")
    src = open_source(stripes)
    assert isinstance(src, StripesSource) and len(src) == 6
    extract_mod = importlib.import_module("featcache.common.devices")
    seen = []
    real = extract_mod.main_process_decode_threads
    monkeypatch.setattr(extract_mod, "main_process_decode_threads", lambda *a, **k: seen.append(k) or real(*a, **k))
    res = extract(str(stripes), backbone="resnet18.none", input_size=32, device="cpu", dtype="float32", num_workers=0,
                  precision="fp32", cache_dir=str(tmp_path / "c"))
    assert res.splits == {"train": 6}
    assert seen == [{"pre_decoded": True}]  # read from the kind's capability, not from a list of kind names
    assert "stripes" in CliRunner().invoke(main, ["sources"]).output
