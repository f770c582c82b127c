"""The fingerprints of caches made before the backbone registry became families: pinned, so existing
caches stay hits. The source and library versions are set to fixed values (they vary by machine);
everything the backbone and the options contribute is what extraction records today.

Those caches were made without ``layers``, which then meant the pooled layer alone; a small data set
now gets every stage without ``layers`` (:func:`featcache.backbones.taps.default_layers`), so the pins
name the pooled layer explicitly, and a large one (more than ``SMALL_IMAGES``) keeps the old hash."""

from __future__ import annotations

import pytest

from featcache.extraction.plan import ExtractConfig, prepare
from featcache.store.cache import CacheFingerprint

FIXED = {"source": {"kind": "folder", "spec": "/data/images"},
         "versions": {"featcache": "0", "torch": "0", "torchvision": "0"}}


def _pinned_hash(source, **options) -> tuple[str, dict]:
    p = prepare(source, ExtractConfig(num_workers=0, device="cpu", precision="fp32", **options))
    fp = CacheFingerprint(**{**p.fingerprint.__dict__, **FIXED})
    return fp.hash, p.fingerprint.backbone


@pytest.mark.parametrize("spec,options,pinned,backbone", [
    ("resnet18.none", {"layers": ("pre_logits",)}, "20a3a06fce5cfc25",
     {"name": "resnet18.none", "family": "torchvision", "weights": "none", "weights_sha256": None}),
    ("resnet18.none", {"layers": ("all",), "pool": "avgmax", "input_size": 64}, "b82e6dbf8213531c",
     {"name": "resnet18.none", "family": "torchvision", "weights": "none", "weights_sha256": None}),
    ("efficientnet_lite0.none", {"layers": ("pre_logits",)}, "991ccc3488486526",
     {"name": "efficientnet_lite0.none", "family": "efficientnet_lite", "weights": "none", "weights_sha256": None}),
    ("timm:resnet18.none", {"input_size": 64, "layers": ("pre_logits",)}, "831bcdc213cdd3af",
     {"name": "timm:resnet18.none", "family": "timm", "weights": "none", "weights_sha256": None}),
])
def test_fingerprints_of_existing_caches_are_unchanged(image_folder, spec, options, pinned, backbone):
    got, bb = _pinned_hash(image_folder, backbone=spec, **options)
    assert (got, bb) == (pinned, backbone)


def test_fingerprint_without_layers_on_a_large_data_set_is_unchanged(image_folder):
    # The suite's data sets count as large (conftest's one_layer_caches), as a user's > SMALL_IMAGES.
    assert _pinned_hash(image_folder, backbone="resnet18.none")[0] == "20a3a06fce5cfc25"


def test_a_small_data_set_without_layers_is_the_cache_of_every_stage(image_folder, small_data_default):
    """The same fingerprint, hence the same file: an ``extract --layer all`` cache is a hit."""
    assert _pinned_hash(image_folder, backbone="resnet18.none")[0] == \
        _pinned_hash(image_folder, backbone="resnet18.none", layers=("all",))[0]


def test_fingerprint_of_the_default_backbone_is_unchanged(image_folder, lite0_available):
    got, bb = _pinned_hash(image_folder, backbone="efficientnet_lite0", layers=("pre_logits",))
    assert (got, bb) == ("9fdd81802e34b739", {
        "name": "efficientnet_lite0", "family": "efficientnet_lite", "weights": "imagenet",
        "weights_sha256": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"})
