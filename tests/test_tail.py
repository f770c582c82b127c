"""Training the tail after a freeze boundary: cutting networks, TailHead, and the raw-image reference."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_arrays
from safetensors.numpy import save_file
from safetensors.torch import load_file
from sklearn.base import clone

from featcache.backbones import load_backbone
from featcache.common.devices import resolve_precision
from featcache.errors import BackboneError, ConfigError, HeadError
from featcache.runs.finetuning import FinetuneConfig, finetune
from featcache.backbones.cutting import boundary_shape, build_tail, prefix_model, working_boundaries
from featcache.heads import maps as maps_module
from featcache.heads.maps import MapAugment, parse_augment
from featcache.heads.tail import TailHead

from conftest import make_image_folder

SIZE = 32
#: A tail that trains in well under a second per epoch on two slow CPU cores. (Activations of a
#: randomly initialised MobileNet fade to ~0 after a few blocks, so the toy activations below are
#: synthetic, of the boundary's shape (96, 2, 2) at 64 px.)
TOY = dict(backbone="mobilenet_v3_small.none", input_size=64, boundary="features.11")
TOY_SHAPE = (96, 2, 2)


def _activations(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float16 activations whose class is the sign of the first 8 channels (a separable toy)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.standard_normal((n, *TOY_SHAPE)).astype(np.float32)
    X[:, :8] += np.where(y == 1, 1.0, -1.0)[:, None, None, None]
    return X.astype(np.float16), y


@pytest.fixture(scope="module")
def toy():
    """Train and held-out activations, and two augmented views of each training row."""
    X, y = _activations(48, 0)
    X_test, y_test = _activations(24, 1)
    noise = np.random.default_rng(2).standard_normal((48, 2, *TOY_SHAPE)).astype(np.float32)
    views = (X[:, None].astype(np.float32) + 0.3 * noise).astype(np.float16)
    return {"X": X, "y": y, "X_test": X_test, "y_test": y_test, "views": views}


def _head(**kw) -> TailHead:
    return TailHead(**{**TOY, "epochs": 4, "lr": 3e-3, "batch_size": 8, "device": "cpu", **kw})


# ----------------------------------------------------------------------------------------------
# Cutting the network


@pytest.mark.parametrize(
    "spec, boundary",
    [("resnet18.none", "layer3"), ("efficientnet_lite0.none", "stage5"),
     ("mobilenet_v3_small.none", "features.9")],
)
def test_tail_reproduces_logits(spec, boundary):
    bb = load_backbone(spec, input_size=SIZE)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    captured = []
    handle = bb.model.get_submodule(boundary).register_forward_hook(lambda m, i, o: captured.append(o.clone()))
    with torch.no_grad():
        logits = bb.model(x)
    handle.remove()
    tail = build_tail(bb, boundary)
    prefix = prefix_model(bb, boundary)
    assert not tail.training and not prefix.training
    with torch.no_grad():
        torch.testing.assert_close(tail(captured[0]), logits)
        torch.testing.assert_close(tail(prefix(x)), logits)
        torch.testing.assert_close(prefix(x), captured[0])
    assert boundary_shape(bb, boundary) == tuple(captured[0].shape[1:])
    # The tail is a trainable copy; the prefix shares the frozen backbone.
    tail_params = {id(p) for p in tail.parameters()}
    assert tail_params.isdisjoint(id(p) for p in bb.model.parameters())
    assert all(p.requires_grad for p in tail.parameters())
    assert not any(p.requires_grad for p in prefix.parameters())
    new = build_tail(bb, boundary, n_classes=3, seed=0)
    assert new(prefix(x)).shape == (3, 3)
    torch.testing.assert_close(new(prefix(x)), build_tail(bb, boundary, n_classes=3, seed=0)(prefix(x)))


def test_resnet_tail_flattens_before_fc():
    bb = load_backbone("resnet18.none", input_size=SIZE)
    tail = build_tail(bb, "layer3", n_classes=5)
    assert list(tail._modules) == ["layer4", "avgpool", "flatten", "fc"]
    assert isinstance(tail.flatten, torch.nn.Flatten)
    assert tail.fc.out_features == 5 and tail.fc.in_features == 512


def test_nested_boundaries_of_torchvision_features():
    bb = load_backbone("mobilenet_v3_small.none", input_size=SIZE)
    tail = build_tail(bb, "features.11")
    assert list(tail._modules) == ["features_12", "avgpool", "flatten", "classifier"]
    # Inside the classifier block the implicit flatten belongs to the prefix.
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(build_tail(bb, "classifier.0")(prefix_model(bb, "classifier.0")(x)),
                                   bb.model(x))


def test_non_chain_boundary_names_working_ones():
    bb = load_backbone("resnet18.none", input_size=SIZE)
    with pytest.raises(BackboneError) as e:
        build_tail(bb, "layer3.0.conv1")
    assert str(e.value) == (
        "Layer 'layer3.0.conv1' of resnet18.none is not a freeze boundary: the modules after it, run "
        "in order on its output, do not reproduce the model's output (a residual connection or a step "
        "inside forward() crosses it). Boundaries that work: layer1, layer2, layer3, layer4. Use one "
        "of them, e.g. 'layer3' (extract it with 'featcache extract SOURCE --backbone resnet18.none "
        "--layer layer3 --pool none')."
    )
    with pytest.raises(BackboneError, match="Boundaries that work: layer1, layer2, layer3, layer4"):
        prefix_model(bb, "layer2.1.relu")  # a ReLU called twice inside a block
    assert working_boundaries(bb) == ["layer1", "layer2", "layer3", "layer4"]


def test_boundary_errors():
    bb = load_backbone("resnet18.none", input_size=SIZE)
    with pytest.raises(BackboneError, match=r"Layer 'layer5' is not in resnet18.none. Run 'featcache layers"):
        build_tail(bb, "layer5")
    with pytest.raises(BackboneError, match="is at or after the classifier 'fc'"):
        build_tail(bb, "fc")


def test_tail_training_leaves_backbone_unchanged():
    bb = load_backbone("efficientnet_lite0.none", input_size=SIZE)
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    prefix = prefix_model(bb, "stage6")
    tail = build_tail(bb, "stage6", n_classes=2).train()
    opt = torch.optim.SGD(tail.parameters(), lr=0.1)
    with torch.no_grad():
        h = prefix(torch.randn(4, 3, SIZE, SIZE))
    torch.nn.functional.cross_entropy(tail(h), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    after = bb.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(tail.stage7[0].project.conv.weight, bb.model.stage7[0].project.conv.weight)


# ----------------------------------------------------------------------------------------------
# TailHead


def test_tail_head_learns_and_round_trips(toy, tmp_path):
    head = _head().fit(toy["X"], toy["y"])
    assert head.score(toy["X"], toy["y"]) >= 0.9
    assert head.score(toy["X_test"], toy["y_test"]) >= 0.9
    proba = head.predict_proba(toy["X_test"])
    assert proba.shape == (24, 2) and np.allclose(proba.sum(1), 1)
    assert head.input_shape_ == toy["X"].shape[1:] and head.n_features_in_ == int(np.prod(toy["X"].shape[1:]))

    # Every tail parameter trained, BatchNorm statistics included (train mode while fitting).
    bb = load_backbone(TOY["backbone"], input_size=TOY["input_size"])
    pretrained = build_tail(bb, TOY["boundary"], n_classes=2).state_dict()
    trained = head.tail_.state_dict()
    assert not torch.equal(trained["features_12.0.weight"], pretrained["features_12.0.weight"])
    assert not torch.equal(trained["features_12.1.running_mean"], pretrained["features_12.1.running_mean"])
    assert not head.tail_.training

    arrays, meta = head.get_state()
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert meta["boundary"] == "features.11" and meta["input_shape"] == list(toy["X"].shape[1:])
    assert meta["params"]["augment"] == "flip+crop" and meta["params"]["precision"] == "auto"
    save_file(arrays, str(tmp_path / "tail.safetensors"))
    again = TailHead.from_state(load_arrays(str(tmp_path / "tail.safetensors")), json.loads(json.dumps(meta)))
    np.testing.assert_array_equal(again.predict_proba(toy["X_test"]), proba)

    module = head.to_torch()
    assert not module.training
    with torch.no_grad():
        z = module(torch.from_numpy(toy["X_test"]).float())
    np.testing.assert_allclose(torch.softmax(z, 1).numpy(), proba, rtol=1e-5, atol=1e-6)

    # prefix + tail is a whole classifier on images.
    prefix = prefix_model(bb, TOY["boundary"])
    full = torch.nn.Sequential(prefix, module)
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(torch.softmax(full(x), 1).numpy(), head.predict_proba(prefix(x).numpy()),
                                   rtol=1e-5, atol=1e-6)


def test_tail_head_is_deterministic_and_reads_hdf5(toy, tmp_path):
    a = _head(epochs=2).fit(toy["X"], toy["y"])
    b = _head(epochs=2).fit(toy["X"], toy["y"])
    np.testing.assert_array_equal(a.predict_proba(toy["X_test"]), b.predict_proba(toy["X_test"]))
    with h5py.File(tmp_path / "acts.h5", "w") as f:
        f["X"] = toy["X"]
        f["X_test"] = toy["X_test"]
    with h5py.File(tmp_path / "acts.h5", "r") as f:
        c = _head(epochs=2).fit(f["X"], toy["y"])
        np.testing.assert_array_equal(c.predict_proba(f["X_test"]), a.predict_proba(toy["X_test"]))
    # Flattened rows (how fit-head stores features) are the same activations.
    flat = toy["X"].reshape(len(toy["X"]), -1)
    d = _head(epochs=2).fit(flat, toy["y"])
    np.testing.assert_array_equal(d.predict_proba(toy["X_test"].reshape(24, -1)), a.predict_proba(toy["X_test"]))


def test_tail_head_views_are_seeded(toy, tmp_path):
    views = toy["views"]
    a = _head(epochs=3).fit(toy["X"], toy["y"], views=views)
    b = _head(epochs=3).fit(toy["X"], toy["y"], views=views)
    other = _head(epochs=3, random_state=1).fit(toy["X"], toy["y"], views=views)
    assert a.view_schedule_.shape == (3, 48)
    assert set(np.unique(a.view_schedule_)) == {0, 1, 2}  # X is view 0, views[:, k-1] is view k
    np.testing.assert_array_equal(a.view_schedule_, b.view_schedule_)
    assert not np.array_equal(a.view_schedule_, other.view_schedule_)
    np.testing.assert_array_equal(a.predict_proba(toy["X_test"]), b.predict_proba(toy["X_test"]))
    plain = _head(epochs=3).fit(toy["X"], toy["y"])
    assert not np.array_equal(plain.predict_proba(toy["X_test"]), a.predict_proba(toy["X_test"]))
    assert not plain.view_schedule_.any()
    with h5py.File(tmp_path / "views.h5", "w") as f:
        f["X"], f["views"] = toy["X"], views
    with h5py.File(tmp_path / "views.h5", "r") as f:
        c = _head(epochs=3).fit(f["X"], toy["y"], views=f["views"])
    np.testing.assert_array_equal(c.predict_proba(toy["X_test"]), a.predict_proba(toy["X_test"]))


def test_tail_head_sweep_and_errors(toy):
    head = _head(epochs=1)
    proba = head.sweep_proba(toy["X"], toy["y"], (None,), toy["X_test"])
    assert proba.shape == (1, 24, 2)
    assert not hasattr(head, "classes_")
    assert TailHead.param is None and TailHead.default_grid == (None,)
    assert set(TailHead.options) == set(TailHead().get_params())
    with pytest.raises(ConfigError, match="has no parameter to sweep"):
        head.sweep_proba(toy["X"], toy["y"], (0.1,), toy["X_test"])
    with pytest.raises(ConfigError, match="The 'boundary' option of the 'tail' head must be the name of the layer"):
        TailHead(backbone="resnet18.none").fit(toy["X"], toy["y"])
    with pytest.raises(HeadError, match=r"X has rows of shape \(96, 2, 2\) but layer 'layer3'"):
        TailHead(backbone="resnet18.none", input_size=SIZE, boundary="layer3", device="cpu").fit(toy["X"], toy["y"])
    with pytest.raises(HeadError, match=r"views must have shape \(n_samples, K, \.\.\.\)"):
        _head().fit(toy["X"], toy["y"], views=toy["X"])
    with pytest.raises(HeadError, match="not fitted"):
        _head().predict(toy["X"])
    assert clone(head).get_params() == head.get_params()


def test_tail_head_streams_large_datasets_like_memory(toy, tmp_path, monkeypatch):
    """Datasets over IN_MEMORY_BYTES are read per batch; the fit is the same as from memory."""
    ref = _head(epochs=2).fit(toy["X"], toy["y"], views=toy["views"])
    with h5py.File(tmp_path / "acts.h5", "w") as f:
        f["X"], f["views"] = toy["X"], toy["views"]
        bad = toy["views"].copy()
        bad[5, 1, 0, 0, 0] = np.inf
        f["bad"] = bad
    monkeypatch.setattr(maps_module, "IN_MEMORY_BYTES", 0)
    with h5py.File(tmp_path / "acts.h5", "r") as f:
        streamed = _head(epochs=2).fit(f["X"], toy["y"], views=f["views"])
        np.testing.assert_array_equal(streamed.view_schedule_, ref.view_schedule_)
        np.testing.assert_array_equal(streamed.predict_proba(toy["X_test"]), ref.predict_proba(toy["X_test"]))
        with pytest.raises(HeadError, match="NaN or infinity"):
            _head(epochs=3).fit(f["X"], toy["y"], views=f["bad"])
    with pytest.raises(HeadError, match="NaN or infinity"):  # in memory: checked before training
        _head(epochs=1).fit(toy["X"], toy["y"], views=bad)


def test_map_augment_keeps_shapes_and_is_seeded():
    x = torch.randn(6, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    for spec in ("flip", "shift", "crop", "mixup", "flip+crop", "flip+shift+crop+mixup"):
        a, pa, la = MapAugment(parse_augment(spec), np.random.default_rng(3))(x)
        b, pb, lb = MapAugment(parse_augment(spec), np.random.default_rng(3))(x)
        assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, x), spec
        assert la == lb and (pa is None) == ("mixup" not in spec)
    # flip: every row is itself or its mirror image, both occur.
    a, _, _ = MapAugment(("flip",), np.random.default_rng(0))(x)
    mirrored = [torch.equal(a[i], x[i].flip(-1)) for i in range(6)]
    assert all(m or torch.equal(a[i], x[i]) for i, m in enumerate(mirrored)) and 0 < sum(mirrored) < 6
    # shift: an integer translation with zeros coming in; nothing else changes.
    a, _, _ = MapAugment(("shift",), np.random.default_rng(0))(x)
    for i in range(6):
        hits = [(dy, dx) for dy in range(-1, 2) for dx in range(-1, 2)
                if torch.equal(a[i], torch.nn.functional.pad(x[i], (1, 1, 1, 1))[:, 1 + dy:6 + dy, 1 + dx:8 + dx])]
        assert hits, i
    # mixup: a convex blend with a permutation of the batch.
    a, partner, lam = MapAugment(("mixup",), np.random.default_rng(0))(x)
    assert 0 <= lam <= 1 and sorted(partner) == list(range(6))
    torch.testing.assert_close(a, lam * x + (1 - lam) * x[torch.from_numpy(partner)])
    assert parse_augment(None) == parse_augment("none") == ()
    assert parse_augment("mixup+flip") == ("flip", "mixup")


def test_tail_head_augment_option(toy, tmp_path):
    for spec in ("flip+shift", "crop+mixup"):
        a = _head(epochs=2, augment=spec).fit(toy["X"], toy["y"])
        b = _head(epochs=2, augment=spec).fit(toy["X"], toy["y"])
        np.testing.assert_array_equal(a.predict_proba(toy["X_test"]), b.predict_proba(toy["X_test"]))
    plain = _head(epochs=2, augment="none").fit(toy["X"], toy["y"])
    other = _head(epochs=2, augment="crop+mixup", random_state=1).fit(toy["X"], toy["y"])
    assert not np.array_equal(plain.predict_proba(toy["X_test"]), a.predict_proba(toy["X_test"]))
    assert not np.array_equal(other.predict_proba(toy["X_test"]), a.predict_proba(toy["X_test"]))
    # Its own random stream: shuffling and view sampling do not move.
    views = _head(epochs=2, augment="flip").fit(toy["X"], toy["y"], views=toy["views"])
    np.testing.assert_array_equal(views.view_schedule_, _head(epochs=2, augment="none").fit(toy["X"], toy["y"], views=toy["views"])
                                  .view_schedule_)
    # Prediction never augments; the saved state is the tail's, the option a saved parameter.
    proba = a.predict_proba(toy["X_test"])
    np.testing.assert_array_equal(a.predict_proba(toy["X_test"]), proba)
    arrays, meta = a.get_state()
    assert meta["params"]["augment"] == "crop+mixup"
    assert set(arrays) == set(plain.get_state()[0])
    save_file(arrays, str(tmp_path / "tail.safetensors"))
    again = TailHead.from_state(load_arrays(str(tmp_path / "tail.safetensors")), json.loads(json.dumps(meta)))
    assert again.augment == "crop+mixup"
    np.testing.assert_array_equal(again.predict_proba(toy["X_test"]), proba)


@pytest.mark.parametrize("bad", ["rotate", "flip+flip", "", "flip+", 3, ["flip"]])
def test_tail_head_refuses_bad_augment(toy, bad):
    with pytest.raises(ConfigError) as e:
        _head(augment=bad).fit(toy["X"], toy["y"])
    assert str(e.value) == (
        "The 'augment' option of the 'tail' head must be 'none' or parts of flip, shift, crop, mixup joined by "
        "'+' (e.g. "
        f"'flip+crop'), each at most once. Got {bad!r}."
    )


def test_tail_head_precision_option(toy):
    a = _head(epochs=2, precision="bf16").fit(toy["X"], toy["y"])
    b = _head(epochs=2, precision="bf16").fit(toy["X"], toy["y"])
    assert a.precision_ == "bf16" == a.get_state()[1]["precision"]
    assert _head(epochs=1, precision="fp32").fit(toy["X"], toy["y"]).precision_ == "fp32"
    assert _head(epochs=1).fit(toy["X"], toy["y"]).precision_ == resolve_precision("auto", torch.device("cpu"))
    np.testing.assert_array_equal(a.predict_proba(toy["X_test"]), b.predict_proba(toy["X_test"]))
    assert a.get_state()[0]["tail.classifier.3.weight"].dtype == np.float32
    with pytest.raises(ConfigError) as e:
        _head(precision="half").fit(toy["X"], toy["y"])
    assert str(e.value) == ("The 'precision' option of the 'tail' head must be one of 'auto', 'fp32', 'bf16', "
                            "'fp16'. Got 'half'.")


def test_tail_head_augment_without_maps_keeps_mixup_only(caplog):
    X = np.random.default_rng(0).standard_normal((8, 1024)).astype(np.float32)
    y = np.arange(8) % 2
    spec = dict(backbone="mobilenet_v3_small.none", input_size=64, boundary="classifier.0", epochs=1, batch_size=4,
                device="cpu", precision="fp32")
    with caplog.at_level("WARNING", logger="featcache.heads.tail"):
        flip_mix = TailHead(augment="flip+mixup", **spec).fit(X, y)
    assert [r.getMessage() for r in caplog.records] == [
        "The 'augment' option's flip move(s) (C, H, W) maps; layer 'classifier.0' gives (1024,), so training "
        "goes without them."]
    mix = TailHead(augment="mixup", **spec).fit(X, y)
    np.testing.assert_array_equal(flip_mix.predict_proba(X), mix.predict_proba(X))
    assert not np.array_equal(mix.predict_proba(X), TailHead(augment="none", **spec).fit(X, y).predict_proba(X))
    # This tail starts with an in-place Hardswish: predicting must not write into the caller's array.
    np.testing.assert_array_equal(X, np.random.default_rng(0).standard_normal((8, 1024)).astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Fine-tuning on raw images


def _frozen_equal(state: dict, ref: dict, prefixes: tuple[str, ...]) -> list[str]:
    keys = [k for k in ref if k.startswith(prefixes)]
    assert keys
    return [k for k in keys if not torch.equal(state[k], ref[k])]


def test_finetune_freeze_until_end_to_end(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=5, size=(40, 36))
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not an image")
    lines = []
    res = finetune(str(root), backbone="resnet18.none", input_size=SIZE, freeze_until="layer3", epochs=2,
                   batch_size=4, device="cpu", output=str(tmp_path / "run"), progress=lines.append)
    run = tmp_path / "run"
    assert res.run == str(run)
    assert {p.name for p in run.iterdir()} == {"model.safetensors", "run.json", "metrics.json"}
    assert [r["epoch"] for r in res.per_epoch] == [1, 2]
    assert all(set(r) == {"epoch", "train_loss", "val_top1", "seconds"} for r in res.per_epoch)
    assert all(0 <= r["val_top1"] <= 1 for r in res.per_epoch)
    assert list(res.metrics) == ["val"] and res.metrics["val"]["n"] == 10
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2: train_loss ")
    assert res.failures == [{"split": "train", "id": "train/cat/broken.jpg",
                             "reason": "not an image file PIL can read"}]

    meta = json.loads((run / "run.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["backbone"] == "resnet18.none"
    assert meta["trainable_modules"] == ["avgpool", "fc", "layer4"]
    assert meta["config"]["freeze_until"] == "layer3"
    assert meta["parameters"]["trainable"] == sum(
        p.numel() for n, p in load_backbone("resnet18.none").model.named_parameters() if n.startswith("layer4")
    ) + 512 * 2 + 2
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["per_epoch"][1]["epoch"] == 2 and "val" in saved["metrics"]

    state = load_file(str(run / "model.safetensors"))
    ref = load_backbone("resnet18.none", input_size=SIZE).model.state_dict()
    # Frozen: weights and BatchNorm running statistics bit for bit; trained: changed.
    assert _frozen_equal(state, ref, ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")) == []
    assert not torch.equal(state["layer4.0.conv1.weight"], ref["layer4.0.conv1.weight"])
    assert not torch.equal(state["layer4.0.bn1.running_mean"], ref["layer4.0.bn1.running_mean"])
    assert state["fc.weight"].shape == (2, 512)


def test_finetune_train_patterns_keep_frozen_bn(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=4, size=(36, 36))
    res = finetune(str(root), FinetuneConfig(backbone="efficientnet_lite0.none", input_size=SIZE,
                                             train=("stage7*",), epochs=1, batch_size=4, device="cpu"),
                   output=str(tmp_path / "run"))
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["trainable_modules"] == ["classifier", "stage7"]
    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    ref = load_backbone("efficientnet_lite0.none", input_size=SIZE).model.state_dict()
    # 'head' comes after stage7 but is frozen: eval mode, running statistics untouched.
    assert _frozen_equal(state, ref, ("stem.", "stage1.", "stage6.", "head.")) == []
    assert not torch.equal(state["stage7.0.project.bn.running_var"], ref["stage7.0.project.bn.running_var"])
    assert res.per_epoch[0]["train_loss"] > 0


def test_finetune_config_errors(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=2)
    base = dict(backbone="resnet18.none", input_size=SIZE, device="cpu", output=str(tmp_path / "run"))
    with pytest.raises(ConfigError) as e:
        finetune(str(root), **base)
    assert str(e.value) == (
        "Pass one of the 'freeze_until' and 'train' options: freeze_until=LAYER (what comes after it trains; "
        "e.g. 'layer3' of a ResNet, 'stage6' of efficientnet_lite0) or train=PATTERNS (e.g. ('layer4*', 'fc*') "
        "or ('stage7*', 'head*', 'classifier*')). Got neither."
    )
    with pytest.raises(ConfigError) as e:
        finetune(str(root), freeze_until="layer3", train=("fc*",), **base)
    assert str(e.value) == (
        "Pass only one of the 'freeze_until' and 'train' options: freeze_until=LAYER freezes LAYER and "
        "everything before it, train=PATTERNS trains the modules matching them. Got "
        "freeze_until='layer3' and train=('fc*',)."
    )
    with pytest.raises(ConfigError, match=r"^Layer 'layer9' is not in resnet18.none. Run 'featcache layers"):
        finetune(str(root), freeze_until="layer9", **base)
    with pytest.raises(ConfigError, match=r"^The 'train' pattern 'head\*' matches no module of resnet18.none"):
        finetune(str(root), train="head*", **base)
    with pytest.raises(ConfigError, match="leaves nothing but the new classifier to train"):
        finetune(str(root), freeze_until="fc", **base)
    with pytest.raises(ConfigError, match=r"^The 'scale' option must be two numbers"):
        finetune(str(root), freeze_until="layer3", scale=(0.5, 0.1), **base)
    with pytest.raises(ConfigError, match=r"^The 'epochs' option must be an int >= 1. Got 0."):
        finetune(str(root), freeze_until="layer3", epochs=0, **base)
    assert not (tmp_path / "run").exists()


def test_finetune_refuses_an_existing_run_and_replaces_it_whole_with_overwrite(tmp_path, monkeypatch):
    import errno

    import featcache.runs.finetuning as ft
    from featcache.errors import OutputError

    root = make_image_folder(tmp_path / "images", per_class=2, size=(36, 36))
    run = tmp_path / "run"
    run.mkdir()
    old = {"run.json": '{"format": "featcache-run"}', "head.json": "{}", "head.safetensors": "x",
           "transform.safetensors": "x"}  # a fit-head run
    for name, text in old.items():
        (run / name).write_text(text)
    opts = dict(backbone="resnet18.none", input_size=SIZE, freeze_until="layer3", epochs=1, batch_size=4,
                device="cpu", output=str(run))
    with pytest.raises(OutputError) as e:
        finetune(str(root), **opts)
    assert str(e.value) == (f"'{run}' already holds a run. Pass overwrite=True to replace it, or choose another "
                            f"output folder.")
    real_save = ft._save

    def disk_full(folder, *a):  # the disk fills up half-way through writing the new run
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ft, "_save", disk_full)
    with pytest.raises(OutputError) as e:
        finetune(str(root), **opts, overwrite=True)
    assert str(e.value) == (f"Disk full while writing '{run}' (No space left on device): the run there is unchanged. "
                            f"Free some space and run the same command again.")
    assert {p.name: p.read_text() for p in run.iterdir()} == old
    monkeypatch.setattr(ft, "_save", real_save)
    res = finetune(str(root), **opts, overwrite=True)
    assert res.run == str(run)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json", "model.safetensors", "run.json"]
    assert json.loads((run / "run.json").read_text())["format"] == "featcache-finetune"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "run"]  # no private folder left beside it
