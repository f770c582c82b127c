"""The same tests for every backbone family (timm tests/test_models.py style): extract every stage and
the pooled layer, a cache hit without building the network, predict and export from a fitted head, and
a fingerprint that is the same run after run. Hugging Face models are tiny random ones saved in the
test (tests/hf_models.py); nothing touches the network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import featcache.extraction.plan as plan_mod
from featcache import extract, open_cache
from featcache.backbones import (FAMILIES, list_families, load_backbone, parse_backbone_spec,
                                 weights_sha256_without_building)
from featcache.errors import ConfigError
from featcache.runs.fit import fit_head
from featcache.runs.inference import export, load_export, predict
from featcache.backbones.preprocess import load_image
from featcache.backbones.taps import list_layers

HF_KINDS = ("vit", "dinov2", "clip", "siglip", "convnext")
SPECS = ["resnet18.none", "efficientnet_lite0.none", "timm:resnet18.none", *(f"hf:{k}" for k in HF_KINDS)]


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory):
    pytest.importorskip("transformers")  # in the [test] extra: present in CI
    from hf_models import make

    root = tmp_path_factory.mktemp("hf")
    return {k: make(k, root / k) for k in HF_KINDS}


@pytest.fixture
def spec(request, hf_folders):
    s = request.param
    return f"hf:{hf_folders[s[3:]]}" if s.startswith("hf:") else s


def _options(tmp_path, **more):
    return dict(input_size=32, num_workers=0, batch_size=4, dtype="float32", precision="fp32", device="cpu",
                cache_dir=str(tmp_path / "cache"), **more)


@pytest.mark.parametrize("spec", SPECS, indirect=True)
def test_every_stage_and_the_pooled_layer_extract_with_their_listed_widths(spec, image_folder, tmp_path):
    bb = load_backbone(spec, input_size=32)
    widths = {i.name: i.shape[0] if len(i.shape) != 2 else i.shape[1] for i in list_layers(bb, depth=None)}
    res = extract(str(image_folder), backbone=spec, layers=("all",), **_options(tmp_path))
    with open_cache(res.cache) as c:
        assert c.layers == list(bb.stage_layers) and len(c.layers) >= 3
        for layer in c.layers:
            x = c.features("train", layer)
            assert x.shape == (12, widths[layer]) and np.isfinite(x).all()


@pytest.mark.parametrize("spec", SPECS, indirect=True)
def test_a_cache_hit_builds_no_network_where_the_family_can_tell(spec, image_folder, tmp_path, monkeypatch):
    family = FAMILIES.get(parse_backbone_spec(spec).family)
    first = extract(str(image_folder), backbone=spec, **_options(tmp_path))
    built, real = [], plan_mod.load_backbone
    monkeypatch.setattr(plan_mod, "load_backbone", lambda *a, **k: built.append(a) or real(*a, **k))
    again = extract(str(image_folder), backbone=spec, **_options(tmp_path))
    assert (again.cache_hit, again.cache) == (True, first.cache)
    assert len(built) == (0 if family.identity_without_building else 1)


@pytest.mark.parametrize("spec", SPECS, indirect=True)
def test_the_fingerprint_is_stable_and_its_weights_identity_known_without_building(spec, image_folder, tmp_path):
    a = extract(str(image_folder), backbone=spec, **_options(tmp_path / "a"))
    b = extract(str(image_folder), backbone=spec, **_options(tmp_path / "b"))
    with open_cache(a.cache) as ca, open_cache(b.cache) as cb:
        assert ca.fingerprint == cb.fingerprint
        np.testing.assert_array_equal(ca.features("train"), cb.features("train"))
        recorded = ca.fingerprint["backbone"]
    known, sha = weights_sha256_without_building(spec)
    assert known == FAMILIES.get(parse_backbone_spec(spec).family).identity_without_building
    if known:
        assert sha == recorded["weights_sha256"]


@pytest.mark.parametrize("spec", SPECS, indirect=True)
def test_predict_and_export_agree_on_every_family(spec, image_folder, tmp_path):
    res = extract(str(image_folder), backbone=spec, **_options(tmp_path))
    run = fit_head(res.cache, head="logreg", grid=(1.0,), output=str(tmp_path / "run")).run
    files = sorted((image_folder / "val").rglob("*.*"))[:4]
    preds = predict(run, files, top=2)
    assert [p["label"] in ("cat", "dog") for p in preds] == [True] * 4
    program = load_export(export(run, tmp_path / "model.pt2"))
    pp = load_backbone(spec, input_size=32).preprocess
    x = torch.stack([torch.from_numpy(load_image(f.read_bytes(), pp)) for f in files]).float() / 255
    x = (x - torch.tensor(pp.mean).view(1, 3, 1, 1)) / torch.tensor(pp.std).view(1, 3, 1, 1)
    proba = torch.softmax(program(x), 1).detach().numpy()
    np.testing.assert_allclose(proba.max(1), [p["probability"] for p in preds], atol=2e-3)


def test_backbones_json_lists_the_families_from_the_registry():
    from click.testing import CliRunner

    from featcache.cli import main

    r = CliRunner().invoke(main, ["backbones", "--json"])
    out = json.loads(r.output)
    assert [f["family"] for f in out["families"]] == [e.name for e in FAMILIES]
    assert {"hf", "timm", "torchvision", "efficientnet_lite"} <= {f["family"] for f in out["families"]}
    assert {"name": "resnet18", "family": "torchvision", "description": "torchvision"} in out["backbones"]
    assert out["families"] == list_families()
    text = CliRunner().invoke(main, ["backbones"]).output
    assert "hf:NAME_OR_PATH" in text and "timm:NAME[.TAG]" in text


def test_a_spec_is_parsed_once_into_a_frozen_object():
    s = parse_backbone_spec("resnet50.IMAGENET1K_V2")
    assert (s.family, s.arch, s.tag) == ("torchvision", "resnet50", "IMAGENET1K_V2")
    assert parse_backbone_spec("timm:vit_small_patch14_dinov2.lvd142m").family == "timm"
    assert parse_backbone_spec("hf:facebook/dinov2-small").arch == "facebook/dinov2-small"
    assert parse_backbone_spec("toy_models:small_cnn").family == "factory"
    with pytest.raises(AttributeError):
        s.tag = "none"
    with pytest.raises(ConfigError, match="Unknown backbone 'nonet'. Run 'featcache backbones' to list them."):
        parse_backbone_spec("nonet")
