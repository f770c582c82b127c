"""``fit-head --train-views``: the cached augmented views as extra training rows of a head of vectors,
grouped with their image so that k-fold never scores an image on a fold that trained on its views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import make_image_folder
from featcache import extract, open_cache
from featcache.heads import layersets
from featcache.errors import ConfigError
from featcache.runs.fit import fit_head
from featcache.heads import HEADS
from featcache.runs.saved import load_run


@pytest.fixture(scope="module")
def viewed(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    folder = make_image_folder(root / "imgs", classes=("a", "b"), per_class=8, splits=("train", "val"))
    return extract(str(folder), backbone="resnet18.none", input_size=32, num_workers=0, views=2,
                   layers=("layer3", "layer4"), cache_dir=str(root / "cache"), dtype="float32").cache


def test_views_are_training_rows_of_a_layer_set(viewed, tmp_path):
    res = fit_head(viewed, head="logreg", layer="layer3+layer4", train_views=True, output=str(tmp_path / "r"))
    with open_cache(viewed) as c:
        X = layersets.load(c, "train", "layer3+layer4")[0]
        V = layersets.load_views(c, "train", "layer3+layer4")
    assert V.shape[:2] == (16, 2)
    rows = np.concatenate([X, V.reshape(32, -1)])
    # The transform was fitted on the 48 rows (images and their views), not on the 16 images alone.
    np.testing.assert_allclose(load_run(res.run).transform.mean_, rows.mean(0), rtol=1e-4, atol=1e-5)
    plain = fit_head(viewed, head="logreg", layer="layer3+layer4", output=str(tmp_path / "p"))
    assert not np.allclose(load_run(plain.run).transform.mean_, rows.mean(0), rtol=1e-4, atol=1e-5)


def test_kfold_keeps_an_image_and_its_views_in_one_fold(viewed, tmp_path, monkeypatch):
    from sklearn.model_selection import StratifiedGroupKFold

    folds = []
    split = StratifiedGroupKFold.split

    def spy(self, X, y=None, groups=None):
        for tr, va in split(self, X, y, groups):
            folds.append((set(groups[tr]), set(groups[va]), va))
            yield tr, va

    monkeypatch.setattr(StratifiedGroupKFold, "split", spy)
    scored = []
    head = HEADS.get("ridge")  # the class
    real = head.sweep_proba

    def count(self, X, y, values, X_eval):
        scored.append(len(X_eval))
        return real(self, X, y, values, X_eval)

    monkeypatch.setattr(head, "sweep_proba", count)
    res = fit_head(viewed, head="ridge", layer="layer4", train_views=True, eval_split="none",
                   output=str(tmp_path / "k"))
    assert res.best["scored_on"] == "5-fold cv on train" and len(folds) == 5
    assert all(not (tr & va) for tr, va, _ in folds)  # no image on both sides of a fold
    # Each pass over the folds (one per grid extension) scores every image once, and no view.
    assert len(scored) % 5 == 0 and {sum(scored[i:i + 5]) for i in range(0, len(scored), 5)} == {16}


def test_train_views_refused_with_a_reason(viewed, tmp_path):
    folder = tmp_path / "imgs"
    make_image_folder(folder, classes=("a", "b"), per_class=4, splits=("train", "val"))
    none = extract(str(folder), backbone="resnet18.none", input_size=32, num_workers=0,
                   cache_dir=str(tmp_path / "c"), dtype="float32").cache
    with pytest.raises(ConfigError, match="has no augmented views. Extract with views=K"):
        fit_head(none, train_views=True, output=str(tmp_path / "a"))


def test_predict_tta_averages_the_image_and_the_very_views_extract_cached(viewed, tmp_path):
    from featcache.runs.inference import predict

    res = fit_head(viewed, head="logreg", layer="layer3+layer4", train_views=True, output=str(tmp_path / "r"))
    run = load_run(res.run)
    with open_cache(viewed) as c:
        X = layersets.load(c, "train", run.meta["layer"])[0]
        V = layersets.load_views(c, "train", run.meta["layer"])
        ids = c.ids("train")
    folder = Path(viewed).parent.parent / "imgs"
    files = sorted((folder / "train").rglob("*.*"))[:6]
    preds = {p["path"]: p for p in predict(res.run, files, top=2, tta=2)}
    for f in files:
        i = next(j for j, rid in enumerate(ids) if str(f).endswith(rid))
        expected = (run.predict_proba(X[i:i + 1]) + run.predict_proba(V[i]).sum(0, keepdims=True))[0] / 3
        got = {t["label"]: t["probability"] for t in preds[str(f)]["top"]}
        np.testing.assert_allclose([got[k] for k in ("a", "b")], expected, atol=1e-4)
        assert not np.allclose(V[i], X[i])  # the views are other inputs than the image itself
    with pytest.raises(ConfigError, match="The 'tta' option must be an int >= 0"):
        predict(res.run, files, tta=-1)
