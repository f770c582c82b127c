"""Every torch path of featcache on the test device: the heads, the tail, finetune, fit-head and predict.

On the CPU (the default) these run like any other test. ``FEATCACHE_TEST_DEVICE=cuda`` runs them on a
GPU, where each result is also compared with the same computation on the CPU, so a path that gives
other numbers on CUDA (not only one that crashes there) fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.preprocessing import StandardScaler

from featcache.extraction.pipeline import extract
from featcache.runs.finetuning import finetune
from featcache.runs.fit import fit_head
from featcache.heads import make_head
from featcache.heads.tail import TailHead
from featcache.runs.inference import predict
from featcache.store.cache import open_cache

from conftest import make_image_folder


def _problem(n_classes: int = 3, n: int = 240, d: int = 16, seed: int = 0):
    X, y = make_classification(n_samples=n + 80, n_features=d, n_informative=8, n_redundant=0,
                               n_classes=n_classes, n_clusters_per_class=1, class_sep=2.0, random_state=seed)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    return X[:n], y[:n], X[n:], y[n:]


@pytest.mark.parametrize("solver", ["lbfgs", "adamw"])
def test_linear_head_on_the_device_matches_the_cpu(test_device, solver):
    Xtr, ytr, Xte, yte = _problem()
    kw = dict(C=0.5, solver=solver, epochs=6, batch_size=64, lr=5e-2)
    on = make_head("linear", device=test_device, **kw).fit(Xtr, ytr)
    cpu = make_head("linear", device="cpu", **kw).fit(Xtr, ytr)
    assert on.score(Xte, yte) > 0.8
    np.testing.assert_allclose(on.predict_proba(Xte), cpu.predict_proba(Xte), atol=5e-3)
    # Rows streamed in chunks (max_memory): the same optimum for L-BFGS (full-batch); AdamW's
    # minibatches are drawn per chunk, so only its accuracy is comparable.
    chunked = make_head("linear", device=test_device, max_memory=50 * 4 * Xtr.shape[1], **kw).fit(Xtr, ytr)
    if solver == "lbfgs":
        np.testing.assert_allclose(chunked.predict_proba(Xte), on.predict_proba(Xte), atol=5e-3)
    assert abs(chunked.score(Xte, yte) - on.score(Xte, yte)) <= 0.03


def test_linear_sweep_on_the_device_matches_separate_fits(test_device):
    Xtr, ytr, Xte, _ = _problem()
    Cs = [0.01, 1.0]
    swept = make_head("linear", device=test_device).sweep_proba(Xtr, ytr, Cs, Xte)
    for C, proba in zip(Cs, swept):
        single = make_head("linear", C=C, device=test_device).fit(Xtr, ytr)
        np.testing.assert_allclose(proba, single.predict_proba(Xte), atol=2e-3)


def test_mlp_and_knn_heads_on_the_device(test_device):
    Xtr, ytr, Xte, yte = _problem()
    mlp = make_head("mlp", device=test_device, epochs=30, random_state=0).fit(Xtr, ytr)
    assert mlp.score(Xte, yte) > 0.8
    proba = mlp.predict_proba(Xte)
    assert proba.shape == (len(Xte), 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    knn = make_head("knn", k=5, device=test_device).fit(Xtr, ytr)
    ref = make_head("knn", k=5, device="cpu").fit(Xtr, ytr)
    np.testing.assert_allclose(knn.predict_proba(Xte), ref.predict_proba(Xte), atol=1e-5)


def test_tail_head_on_the_device_learns_and_predicts_on_the_cpu(test_device):
    rng = np.random.default_rng(0)
    y = np.arange(48) % 2
    X = rng.standard_normal((48, 96, 2, 2)).astype(np.float32)
    X[:, :8] += np.where(y == 1, 1.0, -1.0)[:, None, None, None]
    head = TailHead(backbone="mobilenet_v3_small.none", input_size=64, boundary="features.11", epochs=4,
                    lr=3e-3, batch_size=8, device=test_device).fit(X.astype(np.float16), y)
    assert head.score(X.astype(np.float16), y) >= 0.9
    # The fitted module is handed back on the CPU: saving and predicting need no GPU.
    assert all(p.device.type == "cpu" for p in head.to_torch().parameters())


def test_extract_fit_predict_finetune_on_the_device(tmp_path, tiny, test_device):
    images = make_image_folder(tmp_path / "images", per_class=4)
    res = extract(str(images), **tiny)
    cache = open_cache(res.cache)
    ref = extract(str(images), **{**tiny, "device": "cpu", "cache_dir": str(tmp_path / "cpu-cache")})
    with open_cache(ref.cache) as cpu_cache:
        np.testing.assert_allclose(cache.features("train"), cpu_cache.features("train"), rtol=1e-3, atol=1e-3)
    cache.close()

    fit = fit_head(res.cache, head="linear", head_options={"device": test_device}, output=str(tmp_path / "run"))
    assert 0 <= fit.best["score"] <= 1
    out = predict(str(tmp_path / "run"), [str(images / "val")], device=test_device, batch_size=4)
    assert len(out) == 8 and all(0 <= r["top"][0]["probability"] <= 1 for r in out)

    tuned = finetune(str(images), backbone="resnet18.none", input_size=32, freeze_until="layer3", epochs=1,
                     batch_size=4, device=test_device, output=str(tmp_path / "ft"), precision="fp32")
    assert [r["epoch"] for r in tuned.per_epoch] == [1]
    assert torch.cuda.is_available() or test_device == "cpu"
