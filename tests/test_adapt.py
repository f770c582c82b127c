"""fit-head's adaptive defaults: class weights and selection on imbalanced data, the layer sweep on a
small cache of several layers; each said in one line and recorded in ``best.adapted``; explicit
options and balanced or large data keep the plain defaults. And extraction's: a plain ``extract`` of
a small data set taps every stage, so that the plain ``fit-head`` can sweep them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from featcache import extract
from featcache.runs.adapt import adapt_defaults, imbalance
from featcache.cli import main
from featcache.runs.fit import FitConfig, fit_head
from featcache.store.cache import open_cache


def _npz(path, counts: dict[int, int], n_eval: int = 6):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * 255 / 16).astype(np.uint8)
    out = {}
    for split in ("train", "val", "test"):
        rows = []
        for c, n in counts.items():
            idx = np.flatnonzero(d.target == c)
            rows += (idx[2 * n_eval:2 * n_eval + n] if split == "train" else
                     idx[:n_eval] if split == "val" else idx[n_eval:2 * n_eval]).tolist()
        out[f"{split}_images"], out[f"{split}_labels"] = images[rows], d.target[rows].astype(np.int64)
    np.savez(path, **out)
    return path


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """Digits 1 and 7, 36 : 12 training rows (3x), two layers of a random resnet18."""
    root = tmp_path_factory.mktemp("skewed")
    return extract(str(_npz(root / "s.npz", {1: 36, 7: 12})), backbone="resnet18.none", input_size=32,
                   num_workers=0, layers=("layer3", "layer4"), cache_dir=str(root / "c"), dtype="float32").cache


@pytest.fixture(scope="module")
def even(tmp_path_factory):
    root = tmp_path_factory.mktemp("even")
    return extract(str(_npz(root / "e.npz", {1: 20, 7: 20})), backbone="resnet18.none", input_size=32,
                   num_workers=0, cache_dir=str(root / "c"), dtype="float32").cache


def test_imbalance_ratio():
    assert imbalance(np.array([0, 0, 0, 1]), 3) == 3.0  # the absent class is not counted
    assert imbalance(np.array([0, 1]), 2) == 1.0


def test_imbalanced_small_cache_adapts_and_says_so(skewed, tmp_path):
    res = fit_head(skewed, output=str(tmp_path / "r"))
    lines = res.best["adapted"]
    assert [line.split(":")[0] for line in lines] == ["class_weight=balanced", "select_by=balanced_accuracy",
                                                      "layer sweep"]
    assert "(3.0x between its largest and smallest class)" in lines[0]
    assert res.best["select_by"] == "balanced_accuracy"
    assert res.best["score"] == pytest.approx(res.metrics["val"]["balanced_accuracy"])
    assert [r["layer"] for r in res.best["layers"]] == ["layer3", "layer4"]  # single layers, not their joins
    saved = json.loads((tmp_path / "r" / "run.json").read_text())
    assert saved["config"]["class_weight"] == "balanced" and saved["best"]["adapted"] == lines
    # The fitted head is the class-weighted one: the same as asking for it.
    asked = fit_head(skewed, class_weight="balanced", select_by="balanced_accuracy", layer="layer3,layer4",
                     output=str(tmp_path / "a"))
    assert asked.best["layer"] == res.best["layer"] and asked.best["value"] == res.best["value"]
    assert "adapted" not in asked.best
    assert not any("imbalanced" in w for w in res.warnings)


def test_explicit_options_and_no_adapt_keep_the_plain_path(skewed, tmp_path):
    res = fit_head(skewed, class_weight="none", select_by="top1", layer="layer4", output=str(tmp_path / "a"))
    assert "adapted" not in res.best and res.best["select_by"] == "top1"
    assert any("imbalanced" in w for w in res.warnings)  # the plain path still warns
    plain = fit_head(skewed, adapt=False, output=str(tmp_path / "b"))
    assert "adapted" not in plain.best and plain.best["select_by"] == "top1"
    assert json.loads((tmp_path / "b" / "run.json").read_text())["layer"] == "layer3"  # the first layer
    r = CliRunner().invoke(main, ["fit-head", skewed, "--layer", "layer4", "--json", "-o", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert [line.split(":")[0] for line in json.loads(r.stdout)["best"]["adapted"]] == [
        "class_weight=balanced", "select_by=balanced_accuracy"]
    r = CliRunner().invoke(main, ["fit-head", skewed, "--layer", "layer4", "-o", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert "Adapted: --class-weight balanced: the training split is imbalanced" in r.output
    assert "pass --class-weight none for equal weights." in r.output


def test_balanced_data_keeps_the_defaults(even, tmp_path):
    res = fit_head(even, output=str(tmp_path / "r"))
    assert "adapted" not in res.best and res.best["select_by"] == "top1"


def test_large_or_shot_fits_keep_the_first_layer(skewed, monkeypatch):
    with open_cache(skewed) as c:
        assert adapt_defaults(c, FitConfig(), "val")[0].layer == "layer3,layer4"
        monkeypatch.setattr("featcache.runs.adapt.SMALL_ROWS", 47)  # 48 training rows: a "large" split
        config, lines = adapt_defaults(c, FitConfig(), "val")
        assert config.layer is None and config.class_weight == "balanced"
        config, lines = adapt_defaults(c, FitConfig(shots=2), "val")
        assert config.layer is None and not any(line.startswith("layer") for line in lines)
        config, lines = adapt_defaults(c, FitConfig(head="tail"), "val")
        assert config.layer is None


def test_extraction_taps_every_stage_of_a_small_data_set_only_without_layers(small_data_default):
    from featcache.backbones import load_backbone
    from featcache.backbones.taps import SMALL_IMAGES, default_layers

    bb = load_backbone("resnet18.none", input_size=32)
    stages = ["layer1", "layer2", "layer3", "layer4", "pre_logits"]
    assert default_layers(bb, (), 100, "avg") == stages
    assert default_layers(bb, (), SMALL_IMAGES + 1, "avg") == ["pre_logits"]  # large: the pooled layer
    assert default_layers(bb, (), 100, "none") == ["pre_logits"]  # maps of every stage would be large
    assert default_layers(bb, ("layer3",), 100, "avg") == ["layer3"]  # given: as given
    assert default_layers(bb, ("all",), SMALL_IMAGES + 1, "avg") == ["all"]


def test_plain_extract_and_fit_head_of_a_small_set_sweep_every_stage(small_data_default, tmp_path):
    npz = _npz(tmp_path / "d.npz", {1: 12, 7: 12})
    options = dict(backbone="resnet18.none", input_size=32, num_workers=0, cache_dir=str(tmp_path / "c"),
                   dtype="float32")
    plain = extract(str(npz), **options)
    with open_cache(plain.cache) as c:
        assert c.layers == ["layer1", "layer2", "layer3", "layer4", "pre_logits"]
        assert c.resolve_layer(None) == "pre_logits"  # what a plain extract read before, still the default
    every = extract(str(npz), layers=("all",), **options)
    assert every.cache == plain.cache and every.cache_hit  # one fingerprint: the same file
    one = extract(str(npz), layers=("pre_logits",), **options)
    assert one.cache != plain.cache
    res = fit_head(plain.cache, output=str(tmp_path / "r"))
    assert [r["layer"] for r in res.best["layers"]] == ["layer1", "layer2", "layer3", "layer4", "pre_logits"]
    assert res.best["adapted"][-1].startswith("layer sweep: 24 training rows and 5 cached layers")
    assert "adapted" not in fit_head(plain.cache, adapt=False, output=str(tmp_path / "n")).best
    assert json.loads((tmp_path / "n" / "run.json").read_text())["layer"] == "pre_logits"
