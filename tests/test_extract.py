"""Extraction: shapes, cache hits, fingerprints, resume after Ctrl-C and kill -9, incremental updates,
locking, and the logits check."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from click.testing import CliRunner
from conftest import make_image_folder
from featcache.cli import main
from featcache import extract, load_backbone, open_cache
from featcache.errors import CacheError, CacheLockedError, ConfigError, ExtractionInterrupted


def _features(path, split="train", layer=None):
    with open_cache(path) as c:
        return c.load(split, layer)[0], c.ids(split)


def test_digits_extraction_and_cache_hit(tiny):
    r1 = extract("digits", **tiny)
    assert r1.splits == {"train": 1437, "val": 360}
    assert (r1.cache_hit, r1.computed, r1.failed) == (False, 1797, 0)
    with open_cache(r1.cache) as c:
        assert c.layers == ["pre_logits"]
        assert c.features("train").shape == (1437, 512)
        assert c.features("train").dtype == np.float32
        assert c.classes == [str(i) for i in range(10)]
        assert set(np.unique(c.labels("val"))) == set(range(10))
        fp = c.fingerprint
        assert fp["backbone"]["name"] == "resnet18.none"
        assert fp["preprocess"]["crop"] == 32 and fp["precision"] == "fp32"
        assert set(fp["versions"]) == {"featcache", "torch", "torchvision"}
    r2 = extract("digits", **tiny)
    assert (r2.cache_hit, r2.computed, r2.cache) == (True, 0, r1.cache)


def test_fingerprint_change_never_reuses(tiny, image_folder):
    a = extract(str(image_folder), **tiny)
    b = extract(str(image_folder), **{**tiny, "pool": "max"})
    c = extract(str(image_folder), **{**tiny, "input_size": 48})
    assert len({a.cache, b.cache, c.cache}) == 3
    assert not b.cache_hit and not c.cache_hit
    with pytest.raises(CacheError, match="another fingerprint"):
        extract(str(image_folder), **{**tiny, "pool": "max", "output": a.cache})


def test_pre_logits_reproduce_model_logits(tiny, image_folder):
    """Features equal a plain torchvision transforms pipeline, and fc(features) = logits."""
    res = extract(str(image_folder), **tiny)
    feats, ids = _features(res.cache, "val")
    bb = load_backbone("resnet18.none", input_size=32)
    assert (bb.preprocess.resize, bb.preprocess.crop) == (37, 32)
    tf = T.Compose([T.Resize(37), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    x = torch.stack([tf(Image.open(image_folder / i).convert("RGB")) for i in ids])
    with torch.inference_mode():
        logits = bb.model(x)
        from_cache = bb.model.fc(torch.from_numpy(feats))
    torch.testing.assert_close(from_cache, logits, atol=1e-4, rtol=1e-4)


def test_several_layers_one_pass_and_pooling(tiny, image_folder):
    res = extract(str(image_folder), **{**tiny, "layers": ("layer2", "layer4", "pre_logits")})
    with open_cache(res.cache) as c:
        assert c.layers == ["layer2", "layer4", "pre_logits"]
        assert c.features("train", "layer2").shape == (12, 128)
        np.testing.assert_allclose(c.load("train", "layer4")[0], c.load("train", "pre_logits")[0], atol=1e-5)
    res = extract(str(image_folder), **{**tiny, "layers": ("layer3",), "pool": "none"})
    with open_cache(res.cache) as c:
        assert c.features("train", "layer3").shape == (12, 256, 2, 2)
    res = extract(str(image_folder), **{**tiny, "layers": ("layer3",), "pool": "avgmax"})
    with open_cache(res.cache) as c:
        assert c.features("train", "layer3").shape == (12, 512)


def test_network_is_cut_after_deepest_tap(tiny, image_folder):
    from featcache.backbones.taps import FeatureTap, list_layers

    bb = load_backbone("resnet18.none", input_size=32)
    calls = []
    bb.model.layer4.register_forward_hook(lambda *a: calls.append(1))
    order = [i.name for i in list_layers(bb, depth=None)]
    calls.clear()
    tap = FeatureTap(bb, ["layer2"], "avg", order=order)
    out = tap(torch.zeros(2, 3, 32, 32))
    assert out["layer2"].shape == (2, 128)
    assert calls == []


def test_bad_options_name_the_value(tiny, image_folder):
    with pytest.raises(ConfigError, match=r"The 'batch_size' option must be an int >= 1. Got 0."):
        extract(str(image_folder), **{**tiny, "batch_size": 0})
    with pytest.raises(ConfigError, match=r"Layer 'layer5' is not in resnet18.none. Run 'featcache layers resnet18.none'"):
        extract(str(image_folder), **{**tiny, "layers": ("layer5",)})
    with pytest.raises(ConfigError, match=r"Unknown backbone 'resnet999'. Run 'featcache backbones'"):
        extract(str(image_folder), **{**tiny, "backbone": "resnet999"})


def _interrupt_after(n_batches):
    seen = []

    def progress(done, total):
        seen.append(done)
        if len(seen) == n_batches:
            raise KeyboardInterrupt

    return progress


def test_ctrl_c_keeps_work_and_resume_is_exact(tiny, tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=10)
    ref = extract(str(folder), **{**tiny, "cache_dir": str(tmp_path / "ref")})
    with pytest.raises(ExtractionInterrupted, match="Run the same command again to resume"):
        extract(str(folder), **tiny, progress=_interrupt_after(3))
    partials = list(Path(tiny["cache_dir"]).glob("*.partial"))
    # Batches are grouped into chunk files every --checkpoint-every seconds; an interrupt writes the rest.
    assert len(partials) == 1 and len(list(partials[0].glob("c-*.npz"))) >= 1
    assert not list(Path(tiny["cache_dir"]).glob("*.h5"))  # nothing under a final name
    res = extract(str(folder), **tiny)
    assert res.reused >= 12 and res.computed == 40 - res.reused
    for split in ("train", "val"):
        a, ids_a = _features(ref.cache, split)
        b, ids_b = _features(res.cache, split)
        assert ids_a == ids_b
        assert np.array_equal(a, b)
    assert not list(Path(tiny["cache_dir"]).glob("*.partial"))


def _chunk_sizes(cache_dir) -> list[int]:
    sizes = []
    for p in Path(cache_dir).glob("*.partial/c-*.npz"):
        with np.load(p, allow_pickle=False) as z:
            sizes.append(len(z["ids"]) + len(z["failed_ids"]))
    return sorted(sizes)


@pytest.mark.parametrize("every, expected", [(0, [2, 2, 2, 2]), (3600, [8])])
def test_checkpoint_every_groups_batches_into_chunk_files(tiny, tmp_path, every, expected):
    """0: a chunk file per batch; a long interval: one chunk for everything computed before the
    interrupt, written by the interrupt itself; the resume reuses all of it. The interrupt comes
    in the progress report of batch 3, when batch 4 has been computed (its host copy is one batch
    behind): batch 4 is kept too."""
    folder = make_image_folder(tmp_path / "imgs", per_class=4)  # 16 images, batches of 2
    options = {**tiny, "batch_size": 2, "checkpoint_every": every}
    with pytest.raises(ExtractionInterrupted):
        extract(str(folder), **options, progress=_interrupt_after(3))
    assert _chunk_sizes(tiny["cache_dir"]) == expected
    res = extract(str(folder), **options)
    assert (res.reused, res.computed) == (8, 8)
    ref = extract(str(folder), **{**options, "cache_dir": str(tmp_path / "ref")})
    for split in ("train", "val"):
        assert np.array_equal(_features(ref.cache, split)[0], _features(res.cache, split)[0])


def test_checkpoint_chunks_never_mix_samples_with_and_without_views(tiny, tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    options = {**tiny, "batch_size": 2, "views": 2, "checkpoint_every": 3600}
    ref = extract(str(folder), **{**options, "checkpoint_every": 0, "cache_dir": str(tmp_path / "ref")})
    with pytest.raises(ExtractionInterrupted):
        # Interrupted in the report of 4 train batches + 2 val batches; the 3rd val batch, computed
        # by then, is kept too.
        extract(str(folder), **options, progress=_interrupt_after(6))
    chunks = sorted(Path(tiny["cache_dir"]).glob("*.partial/c-*.npz"))
    with_views = []
    for p in chunks:
        with np.load(p, allow_pickle=False) as z:
            with_views.append(("v0" in z.files, len(z["ids"])))
    assert sorted(with_views) == [(False, 6), (True, 8)]
    res = extract(str(folder), **options)
    assert res.reused == 14
    with open_cache(ref.cache) as a, open_cache(res.cache) as b:
        for split in ("train", "val"):
            assert np.array_equal(a.load(split)[0], b.load(split)[0])
        assert np.array_equal(a.views("train", a.layers[0])[:], b.views("train", b.layers[0])[:])


def test_checkpoint_every_must_be_seconds(tiny, image_folder):
    with pytest.raises(ConfigError, match=r"'checkpoint_every' option must be a number of seconds >= 0. Got -1"):
        extract(str(image_folder), **{**tiny, "checkpoint_every": -1})


_KILL_SCRIPT = """
import sys, time
from featcache import extract
def slow(done, total):
    time.sleep(0.15)
extract(sys.argv[1], backbone="resnet18.none", input_size=32, batch_size=2, num_workers=0,
        cache_dir=sys.argv[2], dtype="float32", progress=slow, checkpoint_every=0)
"""


@pytest.mark.parametrize("kill_after_chunks", [1, 5])
def test_kill_9_then_resume_equals_uninterrupted(tmp_path, kill_after_chunks):
    folder = make_image_folder(tmp_path / "imgs", per_class=8)
    cache_dir = tmp_path / "cache"
    ref = extract(str(folder), backbone="resnet18.none", input_size=32, batch_size=2, num_workers=0,
                  cache_dir=str(tmp_path / "ref"), dtype="float32")
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(folder), str(cache_dir)])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        chunks = list(cache_dir.glob("*.partial/c-*.npz"))
        if len(chunks) >= kill_after_chunks:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "extraction finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(cache_dir.glob("*.h5"))
    res = extract(str(folder), backbone="resnet18.none", input_size=32, batch_size=2, num_workers=0,
                  cache_dir=str(cache_dir), dtype="float32")
    assert res.reused >= kill_after_chunks * 2
    for split in ("train", "val"):
        a, ids_a = _features(ref.cache, split)
        b, ids_b = _features(res.cache, split)
        assert ids_a == ids_b and np.array_equal(a, b)


def test_incremental_extracts_only_new_images(tiny, tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4, splits=("",))
    first = extract(str(folder), **tiny)
    make_image_folder(tmp_path / "more", per_class=2, splits=("",), seed=7)
    for p in (tmp_path / "more").rglob("*.*"):
        target = folder / p.relative_to(tmp_path / "more")
        p.rename(target.with_name("new_" + target.name))
    res = extract(str(folder), **tiny)
    assert res.cache == first.cache
    # New images are computed with the rest of their batch (blocks of 4: [c0-c3] [nc0 nc1 d0 d1]
    # [d2 d3 nd0 nd1]), so the cache equals a fresh extraction bit for bit.
    assert (res.cache_hit, res.computed, res.reused) == (False, 8, 4)
    fresh = extract(str(folder), **{**tiny, "cache_dir": str(tmp_path / "fresh")})
    a, ids_a = _features(res.cache)
    b, ids_b = _features(fresh.cache)
    assert ids_a == ids_b
    assert np.array_equal(a, b)


def test_renamed_file_is_matched_by_content(tiny, tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4, splits=("",))
    extract(str(folder), **tiny)
    (folder / "cat" / "cat_000.jpg").rename(folder / "cat" / "cat_zzz.jpg")
    res = extract(str(folder), **tiny)
    assert (res.computed, res.reused) == (0, 8)
    assert "cat/cat_zzz.jpg" in _features(res.cache)[1]


def test_second_writer_gets_clear_error_and_readers_are_not_blocked(tiny, image_folder):
    done = extract(str(image_folder), **tiny)
    other = {**tiny, "pool": "max"}
    from featcache.extraction.plan import ExtractConfig, prepare

    path = prepare(str(image_folder), ExtractConfig(**other)).path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(CacheLockedError, match="Another process is writing"):
            extract(str(image_folder), **other)
        with open_cache(done.cache) as c:  # a finished cache of another fingerprint reads fine
            assert c.n("train") == 12
        with h5py.File(done.cache, "r") as h:  # and so does plain h5py
            assert h["train/features/pre_logits"].shape == (12, 512)
    finally:
        os.close(fd)


def test_float16_storage_is_default_and_close_to_float32(tiny, image_folder):
    r32 = extract(str(image_folder), **tiny)
    r16 = extract(str(image_folder), **{k: v for k, v in tiny.items() if k != "dtype"})
    with open_cache(r16.cache) as c:
        assert c.features("train").dtype == np.float16
    a, b = _features(r32.cache)[0], _features(r16.cache)[0]
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)


def test_bf16_precision_recorded_and_close(tiny, image_folder):
    r = extract(str(image_folder), **{**tiny, "precision": "bf16"})
    with open_cache(r.cache) as c:
        assert c.fingerprint["precision"] == "bf16"
        assert np.isfinite(c.load("train")[0]).all()


def test_npz_source_grayscale(tiny, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "med.npz"
    np.savez(path, train_images=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
             train_labels=rng.integers(0, 3, (10, 1)), test_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
             test_labels=rng.integers(0, 3, (4, 1)))
    r = extract(str(path), **tiny)
    assert r.splits == {"train": 10, "test": 4}
    assert extract(str(path), **tiny).cache_hit


def test_val_fraction_makes_a_val_split(tiny, tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=10, splits=("",))
    r = extract(str(folder), **tiny, val_fraction=0.2)
    assert r.splits == {"train": 16, "val": 4}
    with open_cache(r.cache) as c:
        assert c.fingerprint["source"]["val_fraction"] == 0.2


@pytest.mark.real
def test_real_hymenoptera_with_efficientnet_lite0(real_cache, real_data):
    """398 samples (245 train incl. one palette GIF, 153 val), width 1280, logits reproduced."""
    from featcache.backbones.preprocess import Preprocess, load_image

    assert real_cache.splits == {"train": 245, "val": 153}
    assert real_cache.failed == 0
    with open_cache(real_cache.cache) as c:
        assert c.features("train").shape == (245, 1280)
        assert "train/ants/imageNotFound.gif" in c.ids("train")
        X, _ = c.load("val")
        ids = c.ids("val")[:8]
    bb = load_backbone("efficientnet_lite0")
    pp: Preprocess = bb.preprocess
    x = torch.stack([torch.from_numpy(load_image((real_data / i).read_bytes(), pp)) for i in ids]).float()
    x = (x / 255 - 0.5) / 0.5
    with torch.inference_mode():
        logits = bb.model(x)
        from_cache = bb.model.classifier(torch.from_numpy(X[:8]))
    torch.testing.assert_close(from_cache, logits, atol=1e-3, rtol=1e-3)


def test_views_are_distinct_reproducible_and_train_only(tiny, tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    a = extract(str(folder), **tiny, views=3)
    b = extract(str(folder), **{**tiny, "cache_dir": str(tmp_path / "other")}, views=3)
    with open_cache(a.cache) as ca, open_cache(b.cache) as cb:
        va, vb = ca.views("train")[()], cb.views("train")[()]
        assert va.shape == (8, 3, 512)
        assert np.array_equal(va, vb)  # seeded by content: reproducible
        assert not np.allclose(va[:, 0], va[:, 1])  # distinct views
        assert not np.allclose(va[:, 0], ca.load("train")[0])  # and distinct from the deterministic crop
        assert not ca.has_views("val")
        assert ca.fingerprint["augment"]["views"] == 3
    c = extract(str(folder), **{**tiny, "cache_dir": str(tmp_path / "seed1")}, views=3, view_seed=1)
    with open_cache(c.cache) as cc:
        assert not np.allclose(cc.views("train")[()], va)


def test_views_survive_interrupt_and_resume(tiny, tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=6)
    ref = extract(str(folder), **{**tiny, "cache_dir": str(tmp_path / "ref")}, views=2)
    with pytest.raises(ExtractionInterrupted):
        extract(str(folder), **tiny, views=2, progress=_interrupt_after(2))
    res = extract(str(folder), **tiny, views=2)
    assert res.reused > 0
    with open_cache(ref.cache) as a, open_cache(res.cache) as b:
        assert np.array_equal(a.views("train")[()], b.views("train")[()])
        assert np.array_equal(a.load("val")[0], b.load("val")[0])


def test_dry_run_plans_bytes_without_extracting(tmp_path, image_folder):
    from featcache.extraction.plan import plan_cache

    plan = plan_cache(str(image_folder), backbone="resnet50.none", layers=("layer3",), pool="none",
                      cache_dir=str(tmp_path / "c"))
    (row,) = plan["layers"]
    assert row["shape"] == [1024, 14, 14]
    assert row["bytes_per_image"] == 1024 * 14 * 14 * 2  # float16
    assert row["total_bytes"] == row["bytes_per_image"] * 24
    assert not plan["exists"] and not (tmp_path / "c").exists()


def test_npz_is_memory_mapped_and_a_changed_file_is_not_a_hit(tiny, tmp_path):
    from featcache.sources import NpzSource

    rng = np.random.default_rng(1)
    path = tmp_path / "arr.npz"
    np.savez(path, train_images=rng.integers(0, 255, (6, 20, 20, 3), dtype=np.uint8), train_labels=np.arange(6) % 2)
    assert isinstance(NpzSource(path)._arrays["train"], np.memmap)
    first = extract(str(path), **tiny)
    before = _features(first.cache)[0]
    time.sleep(0.01)
    np.savez(path, train_images=rng.integers(0, 255, (6, 20, 20, 3), dtype=np.uint8), train_labels=np.arange(6) % 2)
    second = extract(str(path), **tiny)
    assert not second.cache_hit and second.computed == 6
    assert second.cache == first.cache
    assert not np.array_equal(before, _features(second.cache)[0])  # new content, new features


class _BnBeforeConv(torch.nn.Module):
    """Conv and BatchNorm are siblings in that order, but the forward runs the BatchNorm first:
    folding would change the output, so the check must refuse it."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_batchnorm_folding_in_place_is_undone_when_the_check_fails():
    from featcache.backbones.taps import fold_batchnorm_checked

    model = _BnBeforeConv().eval()
    weight = model.conv.weight.detach().clone()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    same, ok = fold_batchnorm_checked(model, 8, copy=False)
    assert not ok and same is model and isinstance(model.bn, torch.nn.BatchNorm2d)
    assert torch.equal(model.conv.weight, weight)
    assert torch.equal(model(x), before)

    bb = load_backbone("resnet18.none", input_size=32)
    x = torch.randn(1, 3, 32, 32)
    ref = bb.model(x)
    folded, ok = fold_batchnorm_checked(bb.model, 32, copy=False)
    assert ok and folded is bb.model  # no copy of the weights
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), ref, rtol=1e-3, atol=1e-4)


def test_batchnorm_folding_is_checked_recorded_and_close(tiny, image_folder):
    from featcache.backbones.taps import fold_batchnorm_checked

    bb = load_backbone("resnet18.none", input_size=32)
    folded, ok = fold_batchnorm_checked(bb.model, 32)
    assert ok and folded is not bb.model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.model.modules())  # the original is untouched
    on = extract(str(image_folder), **tiny)
    off = extract(str(image_folder), **tiny, fold_bn=False)
    assert on.cache != off.cache
    with open_cache(on.cache) as a, open_cache(off.cache) as b:
        assert a.fingerprint["fold_bn"] is True and b.fingerprint["fold_bn"] is False
        np.testing.assert_allclose(a.load("val")[0], b.load("val")[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layers", [["layer2", "pre_logits"], ["layer1", "output"], ["output"]])
def test_graph_tap_equals_the_hooked_tap(layers):
    """The torch.fx tap (for torch.compile and export) reads the same values as the hooks."""
    from featcache.backbones.taps import FeatureTap, GraphTap, list_layers

    bb = load_backbone("resnet18.none", input_size=32)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        graph = GraphTap(bb, layers, "avgmax")(x)
        tap = FeatureTap(bb, layers, "avgmax", order=[i.name for i in list_layers(bb, depth=None)])
        hooked = tap(x)
        tap.remove()
    assert list(graph) == layers
    for name in layers:
        assert torch.equal(graph[name], hooked[name])


def test_compile_extracts_close_to_eager_and_is_in_the_fingerprint(tmp_path, image_folder):
    """torch.compile (inductor; a short last batch is padded, not recompiled)."""
    options = dict(backbone="resnet18.none", input_size=32, num_workers=0, batch_size=5,
                   layers=("pre_logits", "layer3"), dtype="float32", cache_dir=str(tmp_path / "c"))
    eager = extract(str(image_folder), **options)
    compiled = extract(str(image_folder), **options, compile=True)  # 12 + 12 images: batches 5, 5, 2
    assert compiled.cache != eager.cache and compiled.computed == 24
    with open_cache(eager.cache) as a, open_cache(compiled.cache) as b:
        assert "compile" not in a.fingerprint and b.fingerprint["compile"] is True
        for split in ("train", "val"):
            for layer in ("pre_logits", "layer3"):
                np.testing.assert_allclose(a.load(split, layer)[0], b.load(split, layer)[0], rtol=1e-4, atol=1e-5)


def test_a_tapped_map_is_not_changed_by_a_later_in_place_op():
    """resnet's bn1 output goes through ReLU(inplace=True): with pool none and a deeper tap, the
    captured bn1 map must keep its negative values."""
    from featcache.backbones.taps import FeatureTap, list_layers

    bb = load_backbone("resnet18.none", input_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref = bb.model.bn1(bb.model.conv1(x))
        tap = FeatureTap(bb, ["bn1", "layer1"], "none", order=[i.name for i in list_layers(bb, depth=None)])
        out = tap(x)
        tap.remove()
    assert ref.min() < 0
    assert torch.equal(out["bn1"], ref)


def test_decode_on_device_matches_pil_crops_and_records_failures(tmp_path):
    """torchvision.io.decode_jpeg + antialiased resize on the device (here the CPU) against PIL, on
    JPEGs of several sizes, an EXIF-rotated one, a PNG (PIL in the loader) and a truncated JPEG."""
    import io

    from featcache.backbones.preprocess import Preprocess, decode, decode_on_device, encoded_jpeg, resize_crop

    pp = Preprocess(resize=40, crop=32, interpolation="bilinear")
    rng = np.random.default_rng(0)
    items, expected = [], []
    for size in ((64, 48), (48, 80), (40, 40), (30, 20)):
        base = np.kron(rng.integers(0, 255, (size[1] // 2, size[0] // 2, 3)), np.ones((2, 2, 1))).astype(np.uint8)
        buf = io.BytesIO()
        exif = Image.Exif()
        if size == (64, 48):
            exif[0x0112] = 6  # rotated: decoded images are 48 x 64
        Image.fromarray(base).save(buf, "JPEG", quality=95, exif=exif)
        items.append(encoded_jpeg(buf.getvalue(), pp))
        expected.append(resize_crop(decode(buf.getvalue(), pp), pp))
    png = resize_crop(Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)), pp)
    items.append(png[None])
    truncated = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)).save(truncated, "JPEG")
    items.append(encoded_jpeg(truncated.getvalue()[:200], pp))
    crops, failed = decode_on_device(items, pp, torch.device("cpu"))
    for got, want in zip(crops[:4], expected):
        assert got.shape == (3, 32, 32) and got.dtype == torch.uint8
        diff = np.abs(got.numpy().astype(int) - want.astype(int))
        assert diff.mean() < 1.5 and diff.max() <= 24, (diff.mean(), diff.max())
    assert torch.equal(crops[4], torch.from_numpy(png))
    assert crops[5] is None and [k for k, _ in failed] == [5]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_on_device_applies_every_exif_orientation_like_pil(orientation):
    """The device path reads the orientation itself (torchvision's CUDA decoder ignores it)."""
    import io

    from featcache.backbones.preprocess import Preprocess, decode, decode_on_device, encoded_jpeg, resize_crop

    pp = Preprocess(resize=24, crop=24, interpolation="bilinear")
    img = np.zeros((24, 40, 3), np.uint8)
    img[:12, :20] = (255, 0, 0)  # an asymmetric pattern: red top-left, green bottom
    img[12:, :] = (0, 255, 0)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(img).save(buf, "JPEG", quality=100, exif=exif)
    want = resize_crop(decode(buf.getvalue(), pp), pp)
    (got,), failed = decode_on_device([encoded_jpeg(buf.getvalue(), pp)], pp, torch.device("cpu"))
    assert not failed and got.shape == want.shape
    assert np.abs(got.numpy().astype(int) - want.astype(int)).mean() < 4


def test_extract_with_decode_on_device_is_close_and_fingerprinted(tiny, image_folder):
    a = extract(str(image_folder), **tiny)
    b = extract(str(image_folder), **tiny, decode_on_device=True)
    assert a.cache != b.cache and b.computed == 24
    with open_cache(a.cache) as ca, open_cache(b.cache) as cb:
        assert "decode" not in ca.fingerprint and cb.fingerprint["decode"] == "torchvision"
        assert ca.ids("val") == cb.ids("val")
        xa, xb = ca.load("val")[0], cb.load("val")[0]
        cos = (xa * xb).sum(1) / np.linalg.norm(xa, axis=1) / np.linalg.norm(xb, axis=1)
        assert cos.min() > 0.99
    with pytest.raises(ConfigError, match="cannot be combined with --decode-on-device"):
        extract(str(image_folder), **tiny, decode_on_device=True, views=2)


def test_tune_allocator_sets_glibc_thresholds_once(monkeypatch):
    import platform

    from featcache.common import runtime

    monkeypatch.setattr(runtime, "_tuned", None)
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert runtime.tune_allocator() is expected
    assert runtime.tune_allocator() is expected  # cached
    monkeypatch.setattr(runtime, "_tuned", None)
    monkeypatch.setenv("FEATCACHE_TUNE_MALLOC", "0")
    assert runtime.tune_allocator() is False


def test_writer_never_mixes_view_and_plain_batches_across_an_all_failed_batch(tmp_path):
    from featcache.extraction.partial import ChunkWriter, PartialStore

    def item(n, views, failed=0):
        feats = [np.ones((n, 3), np.float32)] if n else []
        return {"hashes": np.asarray([f"{views}{i}" for i in range(n)], dtype="S32"), "features": feats,
                "views": [np.ones((n, 2, 3), np.float32)] if views and n else [],
                "ids": [f"i{i}" for i in range(n)], "stat": np.zeros((n, 2), np.int64),
                "failed_ids": [f"f{i}" for i in range(failed)], "failed_reasons": ["bad"] * failed,
                "failed_stat": np.zeros((failed, 2), np.int64)}

    partial = PartialStore(tmp_path / "p.partial", "fp")
    writer = ChunkWriter(partial, every=3600)
    writer.start()
    for it in (item(2, True), item(0, False, failed=2), item(2, False), item(1, False)):
        writer.put(it)
    writer.close()
    kinds = []
    for p in partial.chunks():
        with np.load(p, allow_pickle=False) as z:
            kinds.append(("v0" in z.files, len(z["ids"]), len(z["failed_ids"])))
    assert sorted(kinds) == [(False, 3, 0), (True, 2, 2)]


def test_layer_all_taps_every_stage_and_pre_logits_in_one_cache(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    kw = dict(backbone="resnet18.none", input_size=32, num_workers=0, cache_dir=str(tmp_path / "c"))
    res = extract(str(folder), layers=("all",), **kw)
    with open_cache(res.cache) as c:
        assert c.layers == ["layer1", "layer2", "layer3", "layer4", "pre_logits"]
    assert extract(str(folder), layers=("all",), **kw).cache_hit  # the same expansion: the same cache
    with pytest.raises(ConfigError, match="give it alone"):
        extract(str(folder), layers=("all", "layer1"), **kw)
    r = CliRunner().invoke(main, ["extract", str(folder), "-b", "resnet18.none", "--input-size", "32", "--layer",
                                  "all", "--workers", "0", "--cache-dir", str(tmp_path / "c"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["cache"] == res.cache


# --- a file changed behind an unchanged (size, mtime): the fast path and --verify --------------

def _bmp_folder(root: Path) -> Path:
    """ROOT/{train,val}/{cat,dog}/*.bmp: uncompressed, so new pixels keep the file size."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                arr = rng.integers(0, 60, (24, 24, 3), dtype=np.uint8)
                arr[..., c] += 150
                Image.fromarray(arr).save(root / split / cls / f"{i}.bmp")
    return root


def test_extract_verify_computes_again_a_file_changed_behind_its_size_and_mtime(tiny, tmp_path):
    folder = _bmp_folder(tmp_path / "imgs")
    first = extract(str(folder), **tiny)
    target = folder / "val" / "cat" / "1.bmp"
    st = target.stat()
    Image.fromarray(np.full((24, 24, 3), 255, np.uint8)).save(target)  # other pixels, same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    # The documented fast path: unchanged (size, mtime) is taken as unchanged content.
    assert extract(str(folder), **tiny).cache_hit
    fresh = extract(str(folder), **{**tiny, "cache_dir": str(tmp_path / "fresh")})
    assert _features(fresh.cache, "val")[0].tobytes() != _features(first.cache, "val")[0].tobytes()
    out = CliRunner().invoke(main, ["extract", str(folder), "--verify", "--json", "-b", tiny["backbone"],
                                    "--input-size", "32", "--batch-size", "4", "--workers", "0", "--dtype", "float32",
                                    "--precision", "fp32", "--device", tiny["device"], "--cache-dir", tiny["cache_dir"]])
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    assert res["cache"] == first.cache and not res["cache_hit"]
    assert (res["computed"], res["reused"]) == (4, 12)  # the batch holding the changed file
    for split in ("train", "val"):
        assert _features(first.cache, split)[0].tobytes() == _features(fresh.cache, split)[0].tobytes()
    with open_cache(first.cache) as c, open_cache(fresh.cache) as f:
        assert (c.hashes("val") == f.hashes("val")).all()
    again = extract(str(folder), **tiny, verify=True)
    assert again.cache_hit and again.computed == 0
