"""Backbones: registry, weights tags and files, offline errors, timm, TorchScript, factories, layers."""

from __future__ import annotations

import pytest
import torch

from featcache import extract, load_backbone, open_cache
from featcache.backbones import BACKBONES, PRE_LOGITS, list_backbones
from featcache.errors import BackboneError, ConfigError, WeightsUnavailableError
from featcache.common.registry import Registry
from featcache.backbones.taps import list_layers


def test_registry_rejects_duplicates_and_names_the_list_command():
    reg = Registry("thing", "featcache things")
    reg.register("a", 1)
    with pytest.raises(ConfigError, match="A thing named 'a' is already registered."):
        reg.register("a", 2)
    with pytest.raises(ConfigError, match="Unknown thing 'b'. Run 'featcache things' to list them."):
        reg.get("b")


def test_every_torchvision_classifier_is_registered():
    import torchvision.models as tvm

    names = {b["name"] for b in list_backbones()}
    assert set(tvm.list_models(module=tvm)) <= names
    assert "efficientnet_lite0" in names


@pytest.mark.parametrize("arch,width", [("resnet18", 512), ("mobilenet_v3_small", 1024), ("efficientnet_b0", 1280),
                                        ("convnext_tiny", 768), ("regnet_y_400mf", 440), ("vit_b_16", 768)])
def test_torchvision_backbones_build_with_declared_width(arch, width):
    bb = load_backbone(f"{arch}.none", input_size=224 if arch.startswith("vit") else 64)
    infos = {i.name: i for i in list_layers(bb, depth=1)}
    assert infos[PRE_LOGITS].shape == (width,)
    assert bb.stages and all(infos[s].stage for s in bb.stages if s in infos)


def test_resnet_layers_json_shape_and_stage_flags():
    bb = load_backbone("resnet50.none", input_size=224)
    infos = list_layers(bb, depth=1)
    names = [i.name for i in infos]
    assert names.index("layer1") < names.index("layer3") < names.index("layer4") < names.index(PRE_LOGITS)
    layer3 = next(i for i in infos if i.name == "layer3")
    assert layer3.to_dict() == {"name": "layer3", "shape": [1024, 14, 14], "stage": True}
    assert [i.name for i in infos if i.stage] == ["layer1", "layer2", "layer3", "layer4"]


def test_weights_tags_and_preprocessing_come_from_the_weights(monkeypatch):
    import torchvision.models as tvm

    calls = []
    monkeypatch.setattr(tvm.ResNet50_Weights, "get_state_dict",
                        lambda self, *a, **k: calls.append(self.name) or tvm.resnet50().state_dict())
    bb = load_backbone("resnet50.IMAGENET1K_V2")
    assert calls == ["IMAGENET1K_V2"]
    assert (bb.preprocess.resize, bb.preprocess.crop, bb.preprocess.interpolation) == (232, 224, "bilinear")
    assert bb.name == "resnet50.IMAGENET1K_V2"
    bb = load_backbone("resnet50.DEFAULT")
    assert calls[-1] == "IMAGENET1K_V2"
    bb = load_backbone("resnet50.none")
    assert (bb.preprocess.resize, bb.preprocess.crop, bb.weights) == (256, 224, "none")
    with pytest.raises(ConfigError, match="'V9' is not a weights tag of resnet50. Tags: DEFAULT, none, IMAGENET1K_V1"):
        load_backbone("resnet50.V9")


def test_offline_weights_error_says_how_to_pass_a_file(monkeypatch):
    import urllib.error

    import torchvision.models as tvm

    def offline(self, *a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvm.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(WeightsUnavailableError, match=r"Cannot fetch the weights resnet18.IMAGENET1K_V1 .*--weights FILE"):
        load_backbone("resnet18.IMAGENET1K_V1")


def test_local_weights_file_is_loaded_and_hashed(tmp_path, image_folder):
    from safetensors.torch import save_file

    import torchvision.models as tvm

    torch.manual_seed(3)
    model = tvm.resnet18()
    pt, st = tmp_path / "r18.pt", tmp_path / "r18.safetensors"
    torch.save({"state_dict": model.state_dict()}, pt)
    save_file(model.state_dict(), str(st))
    for path in (st, pt):
        bb = load_backbone("resnet18", weights=path)
        assert bb.weights == "file" and len(bb.weights_sha256) == 64
        torch.testing.assert_close(bb.model.fc.weight, model.fc.weight)
    with pytest.raises(BackboneError, match="does not fit resnet34"):
        load_backbone("resnet34", weights=pt)
    res = extract(str(image_folder), backbone="resnet18", weights=str(pt), input_size=32, num_workers=0,
                  cache_dir=str(tmp_path / "c"))
    with open_cache(res.cache) as c:
        assert c.fingerprint["backbone"]["weights_sha256"] == bb.weights_sha256


def test_weights_file_with_pickled_code_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(WeightsUnavailableError, match="Cannot read weights file"):
        load_backbone("resnet18", weights=path)
    assert not marker.exists()


def test_timm_backbone_offline_with_its_own_preprocessing(tmp_path, image_folder):
    pytest.importorskip("timm")
    bb = load_backbone("timm:resnet18.none")
    assert bb.family == "timm" and bb.weights == "none"
    assert bb.classifier == "fc"
    res = extract(str(image_folder), backbone="timm:resnet18.none", input_size=32, num_workers=0,
                  cache_dir=str(tmp_path / "c"))
    with open_cache(res.cache) as c:
        assert c.features("train").shape == (12, 512)


def test_torchscript_and_factory_backbones(tmp_path, image_folder):
    from toy_models import small_cnn

    ts = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(small_cnn()), str(ts))
    res = extract(str(image_folder), backbone=f"torchscript:{ts}", input_size=32, mean=(0.5,) * 3,
                  std=(0.5,) * 3, num_workers=0, cache_dir=str(tmp_path / "c"))
    with open_cache(res.cache) as c:
        assert c.layers == ["output"]
        assert c.features("train").shape == (12, 5)
        assert c.fingerprint["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    res = extract(str(image_folder), backbone="toy_models:small_cnn", input_size=32, num_workers=0,
                  cache_dir=str(tmp_path / "c"), layers=("pre_logits", "2"))
    with open_cache(res.cache) as c:
        assert c.features("train", "pre_logits").shape == (12, 16)
        assert c.features("train", "2").shape == (12, 16)
    with pytest.raises(BackboneError, match="Cannot import the factory 'nope_pkg:make'"):
        load_backbone("nope_pkg:make")


def test_efficientnet_lite0_stages_and_default(lite0_available):
    bb = load_backbone("efficientnet_lite0")
    assert bb.stages == tuple(f"stage{i}" for i in range(1, 8))
    assert (bb.preprocess.mean, bb.preprocess.std) == ((0.5,) * 3, (0.5,) * 3)
    infos = {i.name: i for i in list_layers(bb, depth=1)}
    assert infos[PRE_LOGITS].shape == (1280,)
    assert infos["stage6"].shape == (192, 7, 7)
    assert BACKBONES.entry("efficientnet_lite0").description
