"""Layer sets (``--layer stage4+stage5+stage6``): fitting, the concatenation sweep of ``--layer all``,
and predict / export / evaluate reproducing the joined, per-layer standardised features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_image_folder
from featcache import extract, open_cache
from featcache.heads import layersets
from featcache.cli import main
from featcache.errors import CacheError, ConfigError
from featcache.runs.fit import fit_head
from featcache.heads import HEADS
from featcache.runs.inference import export, predict
from featcache.runs.saved import evaluate, load_run

LAYERS = ("layer2", "layer3", "layer4")
VECTOR_HEADS = [n for n in HEADS.names() if HEADS.entry(n).extra["inputs"] != "activations"]


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """A 3-class folder (train/val/test) cached at three layers of a random resnet18 at 32 px."""
    root = tmp_path_factory.mktemp("sets")
    folder = make_image_folder(root / "imgs", classes=("a", "b", "c"), per_class=8, splits=("train", "val", "test"))
    res = extract(str(folder), backbone="resnet18.none", input_size=32, num_workers=0, layers=LAYERS,
                  cache_dir=str(root / "cache"), dtype="float32")
    return folder, res.cache


def test_adjacent_runs_and_block_scales():
    assert layersets.adjacent_runs(["a", "b", "c"]) == ["a+b", "b+c", "a+b+c"]
    assert layersets.adjacent_runs(["a"]) == []
    s = layersets.block_scales((4, 1))
    # Each standardised block adds the same variance (D / L = 2.5) and the total stays D = 5.
    assert np.allclose([np.sum(s[:4] ** 2), np.sum(s[4:] ** 2)], [2.5, 2.5])


@pytest.mark.parametrize("head", VECTOR_HEADS)
def test_every_vector_head_fits_a_layer_set(multi, tmp_path, head):
    _, cache = multi
    res = fit_head(cache, head=head, layer="layer4+layer3", output=str(tmp_path / "r"))
    run = load_run(res.run)
    assert run.meta["layer"] == "layer3+layer4"  # in the cache's order
    with open_cache(cache) as c:
        X, y = layersets.load(c, "test", run.meta["layer"])
        widths = [c.features("train", n).shape[1] for n in ("layer3", "layer4")]
        Xtr = layersets.load(c, "train", run.meta["layer"])[0]
    assert X.shape[1] == sum(widths) and run.transform.blocks == tuple(widths)
    assert float(np.mean(run.predict_proba(X).argmax(1) == y)) == pytest.approx(res.metrics["test"]["top1"])
    if head != "knn":
        sd = run.transform.transform(Xtr).std(0)
        live = Xtr.std(0) > 1e-6  # constant columns stay constant
        # Each layer standardised on its own, then weighted so that both blocks add the same variance.
        np.testing.assert_allclose(sd[live], layersets.block_scales(widths)[live], rtol=1e-3)


def test_all_sweeps_adjacent_runs_and_names_the_set(multi, tmp_path):
    _, cache = multi
    res = fit_head(cache, head="ridge", layer="all", output=str(tmp_path / "r"))
    table = {r["layer"]: r for r in res.best["layers"]}
    assert list(table) == [*LAYERS, "layer2+layer3", "layer3+layer4", "layer2+layer3+layer4"]
    assert res.best["layer"] == max(table, key=lambda k: (table[k]["score"], -table[k]["log_loss"]))
    assert load_run(res.run).meta["layer"] == res.best["layer"]
    only = fit_head(cache, head="ridge", layer="layer2,layer3+layer4", output=str(tmp_path / "r2"))
    assert [r["layer"] for r in only.best["layers"]] == ["layer2", "layer3+layer4"]


def test_predict_export_and_evaluate_reproduce_the_cached_layer_set(multi, tmp_path, monkeypatch):
    folder, cache = multi
    # A temperature is kept where it helps held out (test_calibration); here it is, so that predict and
    # export are seen to apply it too.
    helps = {"folds": 5, "log_loss": {"before": 1.0, "after": 0.5}, "ece": {"before": 0.2, "after": 0.1}}
    monkeypatch.setattr("featcache.metrics.calibration.fit_temperature", lambda p, y: 2.0)
    monkeypatch.setattr("featcache.metrics.calibration.held_out_check", lambda p, y: helps)
    res = fit_head(cache, head="logreg", layer="layer2+layer3+layer4", output=str(tmp_path / "r"))
    run = load_run(res.run)
    assert run.temperature == 2.0  # predict and export apply the calibration too
    files = sorted((folder / "test").rglob("*.*"))
    with open_cache(cache) as c:
        X, y = layersets.load(c, "test", run.meta["layer"])
        ids = c.ids("test")
    expected = run.predict_proba(X)
    by_path = {p["path"]: p for p in predict(res.run, files, top=3)}
    for i, rid in enumerate(ids):
        p = next(v for k, v in by_path.items() if k.endswith(rid) or rid.endswith(Path(k).name))
        got = {t["label"]: t["probability"] for t in p["top"]}
        np.testing.assert_allclose([got[k] for k in ("a", "b", "c")], expected[i], atol=1e-4)
    m = evaluate(res.run, cache)
    assert m["test"]["top1"] == pytest.approx(res.metrics["test"]["top1"])
    out = export(res.run, tmp_path / "model.pt2")
    module = torch.export.load(str(out)).module()
    from featcache.backbones import load_backbone
    from featcache.backbones.preprocess import load_image

    bb = load_backbone("resnet18.none", input_size=32)
    x = torch.stack([torch.from_numpy(load_image(f.read_bytes(), bb.preprocess)) for f in files[:4]]).float() / 255
    x = (x - torch.tensor(bb.preprocess.mean).view(1, 3, 1, 1)) / torch.tensor(bb.preprocess.std).view(1, 3, 1, 1)
    proba = torch.softmax(module(x), 1).detach().numpy()
    for f, row in zip(files[:4], proba):
        got = {t["label"]: t["probability"] for t in by_path[str(f)]["top"]}
        np.testing.assert_allclose(row, [got[k] for k in ("a", "b", "c")], atol=2e-3)


def test_layer_sets_refused_with_a_reason(multi, tmp_path):
    _, cache = multi
    with pytest.raises(ConfigError, match="names a layer twice"):
        fit_head(cache, layer="layer3+layer3", output=str(tmp_path / "a"))
    with pytest.raises(CacheError, match="Layer 'layer9' is not in cache"):
        fit_head(cache, layer="layer3+layer9", output=str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="standardised layer by layer; normalize='l2'"):
        fit_head(cache, layer="layer3+layer4", normalize="l2", output=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="layer sets are read into memory"):
        fit_head(cache, layer="layer3+layer4", max_memory=1000, output=str(tmp_path / "d"))
    r = CliRunner().invoke(main, ["fit-head", cache, "--layer", "layer3+layer4", "--json", "-o", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["best"]["param"] == "C"


def test_a_cache_without_a_member_is_refused(multi, tmp_path):
    folder, cache = multi
    res = fit_head(cache, head="ridge", layer="layer3+layer4", output=str(tmp_path / "r"))
    other = extract(str(folder), backbone="resnet18.none", input_size=32, num_workers=0, layers=("layer4",),
                    cache_dir=str(tmp_path / "c2"), dtype="float32").cache
    with pytest.raises(CacheError, match="has no layer 'layer3', which the run's head reads"):
        evaluate(res.run, other)
