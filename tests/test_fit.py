"""fit-head orchestration: sweeps, k-fold, few-shot, artifacts, evaluate, predict, export, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import make_image_folder
from featcache import extract, open_cache
from featcache.cli import main
from featcache.errors import CacheError, ConfigError, HeadError
from featcache.heads import layersets
from featcache.runs.fit import fit_head, parse_grid
from featcache.runs.saved import evaluate, load_run
from featcache.heads import HEADS
from featcache.runs.inference import export, predict


@pytest.fixture(scope="module")
def folder_cache(tmp_path_factory):
    """A 3-class folder (train/val/test) extracted once with a random resnet18 at 32 px."""
    root = tmp_path_factory.mktemp("fit")
    folder = make_image_folder(root / "imgs", classes=("a", "b", "c"), per_class=8, splits=("train", "val", "test"))
    res = extract(str(folder), backbone="resnet18.none", input_size=32, num_workers=0,
                  cache_dir=str(root / "cache"), dtype="float32")
    return folder, res.cache


def test_parse_grid():
    assert parse_grid("0.1,1,10") == (0.1, 1.0, 10.0)
    g = parse_grid("logspace:-2:2:5")
    assert len(g) == 5 and g[0] == pytest.approx(0.01) and g[-1] == pytest.approx(100)
    with pytest.raises(ConfigError, match="The grid must be comma-separated numbers"):
        parse_grid("a,b")


@pytest.mark.parametrize("head", ["logreg", "ridge", "linear", "knn", "ncm", "svm"])
def test_every_head_fits_from_the_cache(folder_cache, tmp_path, head):
    _, cache = folder_cache
    res = fit_head(cache, head=head, output=str(tmp_path / "run"))
    assert set(res.metrics) == {"val", "test"}  # every split but train
    m = res.metrics["val"]
    assert m["top1"] > 0.9  # colours separate the classes
    assert set(m) >= {"top1", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss", "per_class_recall",
                      "confusion_matrix"}
    assert "top5" not in m  # 3 classes
    assert set(m["per_class_recall"]) == {"a", "b", "c"}
    run = Path(res.run)
    assert {p.name for p in run.iterdir()} >= {"head.json", "head.safetensors", "transform.safetensors",
                                               "run.json", "metrics.json", "sweep.csv"}
    assert not [p for p in run.iterdir() if p.suffix in (".pkl", ".npz", ".pt")]
    if res.best["param"]:
        assert res.best["scored_on"] == "val"
        assert len(res.sweep) == len(open(run / "sweep.csv").read().splitlines()) - 1
    loaded = load_run(run)
    with open_cache(cache) as c:
        X, y = c.load("test")
    assert np.mean(loaded.predict_proba(X).argmax(1) == y) == pytest.approx(res.metrics["test"]["top1"])


def test_sweep_picks_the_best_eval_score_and_never_test(folder_cache, tmp_path):
    _, cache = folder_cache
    res = fit_head(cache, head="logreg", grid=(1e-6, 1.0), output=str(tmp_path / "r"))
    tops = {row["value"]: row["top1"] for row in res.sweep}
    assert res.best["score"] == max(tops.values())
    with pytest.raises(ConfigError, match="never chooses on the test split"):
        fit_head(cache, head="logreg", eval_split="test", output=str(tmp_path / "r2"))


def test_sweep_refuses_to_tune_on_its_training_split(folder_cache, tmp_path):
    """Scoring the sweep on the rows it trains on picks the least regularised value with a perfect
    score: refused, in the library and on the command line (one line, no run folder)."""
    _, cache = folder_cache
    msg = ("The sweep would be scored on 'train', the split it trains on: every value scores its own training "
           "rows. Pass eval_split=val (or another held-out split), or eval_split=none for k-fold cv on 'train'.")
    with pytest.raises(ConfigError) as e:
        fit_head(cache, head="logreg", eval_split="train", output=str(tmp_path / "r"))
    assert str(e.value) == msg
    r = CliRunner().invoke(main, ["fit-head", cache, "--head", "logreg", "--eval-split", "train",
                                  "-o", str(tmp_path / "r2")])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == "Error: " + msg.replace("eval_split=", "--eval-split ")
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()


def test_kfold_when_there_is_no_eval_split(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=10, splits=("",))
    res = extract(str(folder), backbone="resnet18.none", input_size=32, num_workers=0,
                  cache_dir=str(tmp_path / "c"), dtype="float32")
    fit = fit_head(res.cache, head="ridge", output=str(tmp_path / "r"))
    assert fit.best["scored_on"] == "5-fold cv on train"
    assert fit.metrics == {}  # no split besides train to report on


def test_few_shot_reports_mean_and_std_over_seeds(folder_cache, tmp_path):
    _, cache = folder_cache
    res = fit_head(cache, head="ncm", shots=2, seeds=3, output=str(tmp_path / "r"))
    fs = res.few_shot
    assert (fs["shots"], fs["seeds"], len(fs["per_seed"])) == (2, 3, 3)
    tops = [p["metrics"]["val"]["top1"] for p in fs["per_seed"]]
    assert fs["summary"]["val"]["top1"]["mean"] == pytest.approx(np.mean(tops))
    assert fs["summary"]["val"]["top1"]["std"] == pytest.approx(np.std(tops))


def test_normalisation_and_pca_fitted_on_train_only(folder_cache, tmp_path):
    _, cache = folder_cache
    res = fit_head(cache, head="logreg", normalize="standard", pca=5, output=str(tmp_path / "r"))
    run = load_run(res.run)
    with open_cache(cache) as c:
        Xtr = c.load("train")[0]
    np.testing.assert_allclose(run.transform.mean_, Xtr.mean(0), rtol=1e-4, atol=1e-5)
    assert run.transform.components_.shape == (5, 512)


def test_streams_from_hdf5_when_over_max_memory(folder_cache, tmp_path):
    _, cache = folder_cache
    mem = fit_head(cache, head="linear", grid=(1.0,), output=str(tmp_path / "a"))
    streamed = fit_head(cache, head="linear", grid=(1.0,), max_memory=1000, output=str(tmp_path / "b"))
    assert abs(mem.metrics["val"]["top1"] - streamed.metrics["val"]["top1"]) <= 1 / 24 + 1e-9
    with pytest.raises(ConfigError, match="more than the 'max_memory' option"):
        fit_head(cache, head="logreg", max_memory=1000, output=str(tmp_path / "c"))


def test_evaluate_on_another_cache_and_refuse_a_mismatch(folder_cache, tmp_path):
    folder, cache = folder_cache
    res = fit_head(cache, head="logreg", output=str(tmp_path / "r"))
    other = extract(str(folder), backbone="resnet18.none", input_size=32, num_workers=0,
                    cache_dir=str(tmp_path / "c2"), dtype="float16")  # same backbone, other dtype
    m = evaluate(res.run, other.cache)
    assert m["test"]["top1"] == pytest.approx(res.metrics["test"]["top1"], abs=1 / 24)
    wrong = extract(str(folder), backbone="resnet18.none", input_size=40, num_workers=0,
                    cache_dir=str(tmp_path / "c3"), dtype="float32")
    with pytest.raises(CacheError, match="its preprocess differs"):
        evaluate(res.run, wrong.cache)


def test_predict_and_export_agree(folder_cache, tmp_path):
    folder, cache = folder_cache
    res = fit_head(cache, head="linear", output=str(tmp_path / "r"))
    preds = predict(res.run, [folder / "test"], top=2)
    assert len(preds) == 24
    assert all(p["label"] in ("a", "b", "c") and len(p["top"]) == 2 for p in preds)
    assert np.mean([p["label"] == Path(p["path"]).parent.name for p in preds]) == pytest.approx(
        res.metrics["test"]["top1"], abs=1 / 24)
    out = export(res.run, tmp_path / "model.pt2")
    module = torch.export.load(str(out)).module()
    from featcache.backbones import load_backbone
    from featcache.backbones.preprocess import load_image

    bb = load_backbone("resnet18.none", input_size=32)
    files = sorted((folder / "test").rglob("*.*"))[:5]
    x = torch.stack([torch.from_numpy(load_image(f.read_bytes(), bb.preprocess)) for f in files]).float() / 255
    x = (x - torch.tensor(bb.preprocess.mean).view(1, 3, 1, 1)) / torch.tensor(bb.preprocess.std).view(1, 3, 1, 1)
    proba = torch.softmax(module(x), 1).detach().numpy()
    by_path = {p["path"]: p for p in predict(res.run, files, top=3)}
    for f, row in zip(files, proba):
        p = by_path[str(f)]
        expected = {t["label"]: t["probability"] for t in p["top"]}
        np.testing.assert_allclose([row[["a", "b", "c"].index(k)] for k in expected], list(expected.values()),
                                   atol=2e-3)


def test_predict_skips_unreadable_files(folder_cache, tmp_path):
    _, cache = folder_cache
    res = fit_head(cache, head="ncm", output=str(tmp_path / "r"))
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    preds = predict(res.run, [bad])
    assert preds[0]["label"] is None and "not an image file" in preds[0]["error"]


def test_cli_fit_head_json_predict_export_evaluate(folder_cache, tmp_path):
    folder, cache = folder_cache
    runner = CliRunner()
    r = runner.invoke(main, ["fit-head", cache, "--head", "linear", "--C", "0.1,1,10", "--no-extend-grid",
                             "-o", str(tmp_path / "run"), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert set(out) == {"run", "head", "best", "metrics", "seconds", "warnings"}
    assert out["best"]["param"] == "C" and out["best"]["value"] in (0.1, 1.0, 10.0)
    r = runner.invoke(main, ["fit-head", cache, "--head", "logreg", "-o", str(tmp_path / "run2")])
    assert r.exit_code == 0 and "logreg: best C=" in r.output and "val" in r.output and "test" in r.output
    r = runner.invoke(main, ["predict", str(tmp_path / "run"), str(folder / "val" / "a"), "--json"])
    preds = json.loads(r.output)["predictions"]
    assert len(preds) == 8 and set(preds[0]) >= {"path", "label", "probability", "top"}
    r = runner.invoke(main, ["predict", str(tmp_path / "run"), str(folder / "val" / "a"), "-o", str(tmp_path / "p.csv")])
    assert r.exit_code == 0 and (tmp_path / "p.csv").read_text().startswith("path,label,probability,top")
    r = runner.invoke(main, ["predict", str(tmp_path / "run"), str(folder / "val" / "a"), "--top", "1",
                             "-o", str(tmp_path / "p.json")])
    saved = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert r.exit_code == 0 and [q["label"] for q in saved] == [q["label"] for q in preds]
    assert all(len(q["top"]) == 1 for q in saved)
    r = runner.invoke(main, ["predict", str(tmp_path / "run"), str(tmp_path / "no-such-images"), "-o",
                             str(tmp_path / "p.txt")])  # the suffix is refused before any image is looked at
    assert r.exit_code == 2 and "must end in .csv or .json" in r.output and not (tmp_path / "p.txt").exists()
    r = runner.invoke(main, ["export", str(tmp_path / "run"), str(tmp_path / "m.pt2")])
    assert r.exit_code == 0 and (tmp_path / "m.pt2").is_file()
    r = runner.invoke(main, ["evaluate", str(tmp_path / "run"), cache, "--json"])
    assert json.loads(r.output)["metrics"]["val"]["top1"] == pytest.approx(out["metrics"]["val"]["top1"])
    r = runner.invoke(main, ["fit-head", cache, "--head", "logreg", "--opt", "alpha=1"])
    assert r.exit_code == 1
    assert r.output.startswith("Error: Unknown option 'alpha' for head 'logreg'. Valid options: C, max_iter, tol")
    r = runner.invoke(main, ["fit-head", cache, "--head", "nohead"])
    assert r.output == "Error: Unknown head 'nohead'. Run 'featcache heads' to list them.\n"
    r = runner.invoke(main, ["heads"])
    for name in ("logreg", "ridge", "linear", "mlp", "knn", "ncm", "svm"):
        assert name in r.output


def test_run_with_tampered_json_is_refused(folder_cache, tmp_path):
    _, cache = folder_cache
    res = fit_head(cache, head="ncm", output=str(tmp_path / "r"))
    (Path(res.run) / "run.json").write_text("[1, 2]")
    with pytest.raises(HeadError, match="is not a featcache run file"):
        load_run(res.run)


def test_large_float16_cache_streams_through_linear(tmp_path):
    """An on-disk cache is read in chunks by the linear head when it exceeds --max-memory."""
    from featcache.store.cache import CacheFingerprint, FORMAT, SCHEMA_VERSION

    rng = np.random.default_rng(0)
    n, d = 6000, 64
    centers = rng.normal(size=(3, d))
    path = tmp_path / "big.h5"
    fp = CacheFingerprint(backbone={"name": "synthetic"}, layers=("f",), pool="avg", preprocess={}, precision="fp32",
                          dtype="float16", channels_last=False, device_type="cpu", source={"kind": "synthetic"})
    with h5py.File(path, "w") as h:
        h.attrs.update(format=FORMAT, schema_version=SCHEMA_VERSION, fingerprint=fp.to_json(),
                       classes=json.dumps(["x", "y", "z"]), layers=json.dumps(["f"]), timings="{}")
        for split, m in (("train", n), ("val", 600)):
            y = rng.integers(0, 3, m)
            X = (centers[y] + rng.normal(scale=2.0, size=(m, d))).astype(np.float16)
            g = h.create_group(split)
            g.create_dataset("features/f", data=X, chunks=(min(m, 1024), d))
            g.create_dataset("labels", data=y)
            g.create_dataset("ids", data=np.array([str(i) for i in range(m)], dtype=object), dtype=h5py.string_dtype())
            g.create_dataset("hashes", data=np.zeros(m, "S32"))
            g.create_dataset("stat", data=np.zeros((m, 2), np.int64))
    res = fit_head(path, head="linear", grid=(0.01, 1.0), max_memory=100_000, output=str(tmp_path / "r"))
    assert res.metrics["val"]["top1"] > 0.9


@pytest.mark.real
def test_real_logreg_reaches_093(real_cache, tmp_path):
    res = fit_head(real_cache.cache, head="logreg", output=str(tmp_path / "r"))
    assert res.metrics["val"]["top1"] >= 0.93
    lin = fit_head(real_cache.cache, head="linear", output=str(tmp_path / "l"))
    assert abs(lin.metrics["val"]["top1"] - res.metrics["val"]["top1"]) <= 0.01 + 1e-9


def test_tail_head_from_boundary_activations_predicts_and_exports(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=6)
    # fp32: the exported program must equal predict, which runs at the cache's precision.
    res = extract(str(folder), backbone="resnet18.none", input_size=32, num_workers=0, precision="fp32",
                  cache_dir=str(tmp_path / "c"), layers=("layer3",), pool="none", dtype="float32", views=2)
    with pytest.raises(ConfigError, match="pool='none'"):
        pooled = extract(str(folder), backbone="resnet18.none", input_size=32, num_workers=0, precision="fp32",
                         cache_dir=str(tmp_path / "c"), layers=("layer3",))
        fit_head(pooled.cache, head="tail", output=str(tmp_path / "bad"))
    fit = fit_head(res.cache, head="tail", head_options={"epochs": 2, "batch_size": 8}, output=str(tmp_path / "r"))
    assert fit.metrics["val"]["n"] == 12
    run = load_run(fit.run)
    plain = extract(str(folder), backbone="resnet18.none", input_size=32, num_workers=0, precision="fp32",
                    cache_dir=str(tmp_path / "plain"), layers=("layer3",), pool="none", dtype="float32")
    no_views = load_run(fit_head(plain.cache, head="tail", head_options={"epochs": 2, "batch_size": 8},
                                 output=str(tmp_path / "r0")).run)
    with open_cache(plain.cache) as c:
        Xv = c.load("val")[0]
    assert not np.allclose(run.predict_proba(Xv), no_views.predict_proba(Xv))  # the views were trained on
    preds = predict(fit.run, [folder / "val"], top=2)
    with open_cache(res.cache) as c:
        X, y = c.load("val")
    np.testing.assert_allclose([p["probability"] for p in preds], run.predict_proba(X).max(1), atol=1e-5)
    module = torch.export.load(str(export(fit.run, tmp_path / "tail.pt2"))).module()
    from featcache.backbones import load_backbone
    from featcache.backbones.preprocess import load_image

    bb = load_backbone("resnet18.none", input_size=32)
    files = sorted((folder / "val").rglob("*.*"))[:4]
    x = torch.stack([torch.from_numpy(load_image(f.read_bytes(), bb.preprocess)) for f in files]).float() / 255
    x = (x - torch.tensor(bb.preprocess.mean).view(1, 3, 1, 1)) / torch.tensor(bb.preprocess.std).view(1, 3, 1, 1)
    by_path = {p["path"]: p["probability"] for p in preds}
    got = torch.softmax(module(x), 1).max(1).values.detach().numpy()
    np.testing.assert_allclose(got, [by_path[str(f)] for f in files], atol=1e-4)


# --------------------------------------------------------------------------------------------
# Issue 15: what fit-head reports is true of what it saves


def _digits_npz(path: Path, *, per_class: dict[int, int] | None = None, n_val: int = 10, n_test: int = 6,
                classes=range(10)) -> Path:
    """scikit-learn digits (8x8 grey) as a MedMNIST-style npz: hard enough for a random resnet18
    that the regularisation matters. ``per_class`` caps the training rows of some classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * 255 / 16).astype(np.uint8)
    out = {}
    for split, lo, hi in (("train", 0, None), ("val", None, n_val), ("test", None, n_test)):
        rows = []
        for c in classes:
            idx = np.flatnonzero(d.target == c)
            if split == "train":
                idx = idx[n_val + n_test:][: (per_class or {}).get(c, 20)]
            elif split == "val":
                idx = idx[:n_val]
            else:
                idx = idx[n_val:n_val + n_test]
            rows.extend(idx.tolist())
        out[f"{split}_images"] = images[rows]
        out[f"{split}_labels"] = d.target[rows].astype(np.int64)
    np.savez(path, **out)
    return path


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    npz = _digits_npz(root / "digits.npz")
    return extract(str(npz), backbone="resnet18.none", input_size=32, num_workers=0, cache_dir=str(root / "c"),
                   dtype="float32").cache


@pytest.fixture(scope="module")
def digits_activations(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits-act")
    npz = _digits_npz(root / "digits.npz", per_class={c: 4 for c in range(10)}, n_val=4, n_test=2, classes=range(4))
    return extract(str(npz), backbone="resnet18.none", input_size=32, num_workers=0, cache_dir=str(root / "c"),
                   layers=("layer3",), pool="none", dtype="float32").cache


@pytest.mark.parametrize("head", HEADS.names())
def test_reported_eval_score_is_the_saved_models(digits_cache, digits_activations, tmp_path, head):
    """best.score (what the CLI, metrics.json, the report and bench records show) is the score of
    the saved head on the eval split, for every head; the sweep row of the chosen value agrees."""
    cache = digits_activations if head == "tail" else digits_cache
    opts = {"epochs": 1, "batch_size": 8} if head == "tail" else {}
    res = fit_head(cache, head=head, head_options=opts, output=str(tmp_path / "r"))
    run = load_run(res.run)
    with open_cache(cache) as c:
        X, y = c.load("val")
    saved = float(np.mean(run.predict_proba(X).argmax(1) == y))
    assert res.best["scored_on"] == "val" and res.best["select_by"] == "top1"
    assert res.best["score"] == saved == res.metrics["val"]["top1"]
    if res.sweep:
        row = next(r for r in res.sweep if r["value"] == res.best["value"])
        assert row["top1"] == saved
    stored = json.loads((Path(res.run) / "metrics.json").read_text())["best"]
    assert stored["score"] == saved


@pytest.fixture(scope="module")
def odd_npz(tmp_path_factory):
    """4 digit classes: train 30 / 10 / 6 / 0 rows (imbalanced, one short of 10 shots, one only in
    val and test), val 4 and test 2 per class."""
    root = tmp_path_factory.mktemp("odd")
    return _digits_npz(root / "odd.npz", per_class={0: 30, 1: 10, 2: 6, 3: 0}, n_val=4, n_test=2, classes=range(4))


@pytest.fixture(scope="module")
def odd_cache(odd_npz):
    return extract(str(odd_npz), backbone="resnet18.none", input_size=32, num_workers=0,
                   cache_dir=str(odd_npz.parent / "c"), dtype="float32").cache


def test_eval_split_none_means_kfold_on_train(digits_cache, tmp_path):
    res = fit_head(digits_cache, head="ridge", eval_split="none", output=str(tmp_path / "r"))
    assert res.best["scored_on"] == "5-fold cv on train"
    r = CliRunner().invoke(main, ["fit-head", digits_cache, "--head", "ridge", "--eval-split", "none",
                                  "-o", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "on 5-fold cv on train)" in r.output


def test_a_class_only_in_val_and_test_is_named_not_a_traceback(odd_cache, tmp_path):
    for head in ("logreg", "ridge", "knn"):
        res = fit_head(odd_cache, head=head, output=str(tmp_path / head))
        assert any(w.startswith("Class '3' has no rows in the 'train' split but has rows in val: 4, test: 2.")
                   for w in res.warnings)
        # Its rows are scored, as errors: no head can predict a class it never saw.
        assert res.metrics["val"]["n"] == 16 and res.metrics["val"]["per_class_recall"]["3"] == 0.0
        assert res.best["score"] == res.metrics["val"]["top1"] <= 0.75
    r = CliRunner().invoke(main, ["fit-head", odd_cache, "--head", "ridge", "-o", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert "Warning: Class '3' has no rows in the 'train' split" in r.output


def test_few_shot_names_the_classes_short_of_k(odd_cache, tmp_path):
    res = fit_head(odd_cache, head="ncm", shots=10, output=str(tmp_path / "r"))
    assert res.few_shot["short_classes"] == {"2": 6}
    msg = ("shots=10: class '2' has only 6 training rows; those classes use all of them, so the run is not "
           "10-shot for them. Pass shots=6 for a true 6-shot run.")
    assert msg in res.warnings
    assert msg in json.loads((Path(res.run) / "metrics.json").read_text())["warnings"]
    r = CliRunner().invoke(main, ["fit-head", odd_cache, "--head", "ncm", "--shots", "10", "-o", str(tmp_path / "c")])
    flags = msg.replace("shots=10", "--shots 10").replace("shots=6", "--shots 6")
    assert r.exit_code == 0 and f"Warning: {flags}" in r.output


def test_pca_records_the_components_it_kept(odd_cache, tmp_path):
    res = fit_head(odd_cache, head="logreg", pca=5000, output=str(tmp_path / "r"))
    assert res.best["pca_components"] == 46
    assert any(w.startswith("pca=5000: the training split has 46 rows of 512 features, so PCA keeps 46 "
                            "components") for w in res.warnings)
    meta = json.loads((Path(res.run) / "run.json").read_text())["transform"]
    assert (meta["pca"], meta["pca_components"]) == (5000, 46)
    assert load_run(res.run).transform.components_.shape == (46, 512)
    r = CliRunner().invoke(main, ["fit-head", odd_cache, "--pca", "5000", "-o", str(tmp_path / "c")])
    assert r.exit_code == 0 and "Warning: --pca 5000: the training split has 46 rows" in r.output


def test_imbalance_is_named_with_the_options_that_answer_it(odd_cache, tmp_path):
    res = fit_head(odd_cache, head="ncm", select_by="top1", output=str(tmp_path / "r"))
    warning = ("The training split is imbalanced: class '0' has 30 rows, '2' 6 (5.0x). Top-1 favours the large "
               "classes; consider class_weight=balanced select_by=balanced_accuracy.")
    assert warning in res.warnings
    r = CliRunner().invoke(main, ["fit-head", odd_cache, "--head", "ncm", "--select-by", "top1", "--json",
                                  "-o", str(tmp_path / "c")])
    assert any("consider --class-weight balanced --select-by balanced_accuracy." in w
               for w in json.loads(r.stdout)["warnings"])
    ok = fit_head(odd_cache, head="logreg", class_weight="balanced", select_by="balanced_accuracy",
                  output=str(tmp_path / "b"))
    assert not any("imbalanced" in w for w in ok.warnings)
    assert ok.best["select_by"] == "balanced_accuracy"
    assert ok.best["score"] == pytest.approx(ok.metrics["val"]["balanced_accuracy"])
    adapted = fit_head(odd_cache, head="ncm", output=str(tmp_path / "d"))  # selects by balanced accuracy itself
    assert not any("imbalanced" in w for w in adapted.warnings) and adapted.best["select_by"] == "balanced_accuracy"
    with pytest.raises(ConfigError, match="The 'select_by' option must be one of top1, balanced_accuracy"):
        fit_head(odd_cache, head="logreg", select_by="f1", output=str(tmp_path / "x"))


@pytest.mark.parametrize("head", [n for n in HEADS.names() if "class_weight" in HEADS.entry(n).extra["options"]])
def test_every_trained_head_takes_balanced_weights(odd_npz, odd_cache, tmp_path, head):
    cache, opts = odd_cache, {}
    if head == "tail":
        cache = extract(str(odd_npz), backbone="resnet18.none", input_size=32, num_workers=0, layers=("layer3",),
                        pool="none", cache_dir=str(odd_npz.parent / "act"), dtype="float32").cache
        opts = {"epochs": 1, "batch_size": 16}
    r = CliRunner().invoke(main, ["fit-head", cache, "--head", head, "--class-weight", "balanced", "--select-by",
                                  "balanced_accuracy", "--json", "-o", str(tmp_path / "r"),
                                  *[f"--opt={k}={v}" for k, v in opts.items()]])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["best"]["select_by"] == "balanced_accuracy"
    assert out["best"]["score"] == pytest.approx(out["metrics"]["val"]["balanced_accuracy"])


def test_a_best_value_at_an_end_extends_the_grid(digits_cache, tmp_path):
    # C = 1e-4, 1e-3 is far too strong a penalty: the best sits at the top end until the grid grows.
    res = fit_head(digits_cache, head="logreg", grid=(1e-4, 1e-3), output=str(tmp_path / "r"))
    values = [r["value"] for r in res.sweep]
    assert res.best["grid_extended"] and values == sorted(values)
    assert values[:2] == [1e-4, 1e-3] and values[2:] == res.best["grid_extended"]
    assert res.best["grid_extended"][0] == pytest.approx(1e-2)
    assert res.best["at_bound"] or min(values) < res.best["value"] < max(values)
    csv = (Path(res.run) / "sweep.csv").read_text().splitlines()
    assert csv[0] == "C,top1,log_loss" and len(csv) == len(values) + 1
    # A strong ridge penalty extends downwards.
    ridge = fit_head(digits_cache, head="ridge", grid=(1e7, 1e8), output=str(tmp_path / "ridge"))
    assert ridge.best["grid_extended"][0] == pytest.approx(1e6)
    fixed = fit_head(digits_cache, head="logreg", grid=(1e-4, 1e-3), extend_grid=False, output=str(tmp_path / "f"))
    assert fixed.best["grid_extended"] == [] and [r["value"] for r in fixed.sweep] == [1e-4, 1e-3]
    r = CliRunner().invoke(main, ["fit-head", digits_cache, "--head", "logreg", "--C", "1e-4,1e-3",
                                  "-o", str(tmp_path / "cli")])
    assert r.exit_code == 0 and "logreg: the best C sat at an end of the grid; extended by 0.01" in r.output


def test_grid_extension_stops_at_its_bounds():
    from featcache.heads import KNNHead, LogRegHead, MLPHead, NCMHead

    assert LogRegHead.next_grid_value([1e4, 1e5], 1e5, 100) == pytest.approx(1e6)
    assert LogRegHead.next_grid_value([1e5, 1e6], 1e6, 100) is None  # grid_bounds = (1e-6, 1e6)
    assert LogRegHead.next_grid_value([1e-6, 1e-5], 1e-6, 100) is None
    assert LogRegHead.next_grid_value([0.1, 1, 10], 1, 100) is None  # interior
    assert MLPHead.next_grid_value([0.0, 1e-4], 0.0, 100) is None  # nothing below no decay
    assert KNNHead.next_grid_value([1, 5, 20], 20, 150) == 150  # k grows to the training rows, no further
    assert KNNHead.next_grid_value([1, 5, 150], 150, 150) is None
    assert KNNHead.grid_values([1, 5, 200], 150) == [1, 5]
    assert NCMHead.grid_values((None,), 150) == [None] and NCMHead.next_grid_value([None], None, 150) is None


def test_one_thread_pool_at_a_time_and_restored():
    from threadpoolctl import threadpool_info

    from featcache.common.runtime import SMALL_WORK, head_threads

    before = torch.get_num_threads()
    blas_before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    with head_threads("numpy", SMALL_WORK["numpy"] - 1) as used:
        assert used == {"backend": "numpy", "threads": 1}
        assert torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    with head_threads("torch", SMALL_WORK["torch"], threads=2) as used:
        assert used == {"backend": "torch", "threads": 2} and torch.get_num_threads() == 2
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
        with head_threads("torch", 10) as inner:  # a head's own fit inside fit-head keeps fit-head's choice
            assert inner == used and torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == blas_before


def test_small_fits_run_single_threaded_whatever_the_machine(folder_cache, tmp_path):
    _, cache = folder_cache
    for head, pool in (("logreg", "numpy"), ("linear", "torch")):
        res = fit_head(cache, head=head, output=str(tmp_path / head))
        assert res.best["threads"] == {"backend": pool, "threads": 1}


@pytest.mark.parametrize("head, opts", [("mlp", {"epochs": 6}), ("linear", {"solver": "adamw", "epochs": 6}),
                                        ("tail", {"epochs": 3, "batch_size": 8})])
def test_training_by_epochs_keeps_its_history_and_the_best_epoch(digits_cache, digits_activations, tmp_path,
                                                                 head, opts):
    cache = digits_activations if head == "tail" else digits_cache
    seen = []
    res = fit_head(cache, head=head, head_options={**opts, "patience": 1}, grid=None, output=str(tmp_path / "r"),
                   progress=seen.append)
    history = json.loads((Path(res.run) / "metrics.json").read_text())["history"]
    assert 1 <= len(history) <= opts["epochs"]
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    assert all(set(h) == {"epoch", "loss", "top1"} for h in history)
    best_epoch = res.best["best_epoch"]
    kept = history[best_epoch - 1]["top1"]
    assert kept == max(h["top1"] for h in history)
    assert abs(res.best["score"] - kept) <= 1 / res.metrics["val"]["n"] + 1e-9  # the kept epoch is the saved head
    if len(history) < opts["epochs"]:
        assert len(history) == best_epoch + 1  # stopped one epoch after the best
    assert seen and set(seen[0]) == {"epoch", "epochs", "loss", "metric", "score"}
    assert seen[0]["epochs"] == opts["epochs"] and seen[0]["metric"] == "top1"


def test_cli_patience_and_the_epoch_bar(digits_cache, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["fit-head", digits_cache, "--head", "mlp", "--epochs", "3", "--patience", "2",
                             "--C", "1e-4", "-o", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "epoch" in r.output and "loss=" in r.output and "top1=" in r.output  # the tqdm bar (stderr)
    r = runner.invoke(main, ["fit-head", digits_cache, "--head", "logreg", "--patience", "2"])
    assert (r.exit_code, r.output) == (1, "Error: --patience does not apply to head 'logreg'. Drop --patience.\n")
    r = runner.invoke(main, ["fit-head", digits_cache, "--head", "mlp", "--epochs", "2", "--patience", "1",
                             "--eval-split", "none", "-o", str(tmp_path / "k")])
    assert r.exit_code == 1
    assert r.output.startswith("Error: The --patience option (1) stops on an eval score, and there is no eval data.")
    r = runner.invoke(main, ["fit-head", digits_cache, "--head", "linear", "--patience", "1", "-o", str(tmp_path / "l")])
    assert r.output.startswith("Error: The --patience option stops AdamW epochs; solver='lbfgs' has none.")


def test_layers_swept_with_the_regularisation(digits_cache, tmp_path):
    npz = Path(digits_cache).parent.parent / "digits.npz"
    cache = extract(str(npz), backbone="resnet18.none", input_size=32, num_workers=0, layers=("layer2", "layer4"),
                    cache_dir=str(tmp_path / "c"), dtype="float32").cache
    res = fit_head(cache, head="ridge", layer="all", output=str(tmp_path / "r"))
    table = {r["layer"]: r for r in res.best["layers"]}
    assert list(table) == ["layer2", "layer4", "layer2+layer4"]  # the two layers, then the adjacent run
    assert res.best["layer"] == max(table, key=lambda k: (table[k]["score"], -table[k]["log_loss"]))
    assert res.best["score"] == table[res.best["layer"]]["score"] == res.metrics["val"]["top1"]
    assert {r["layer"] for r in res.sweep} == set(table)
    run = load_run(res.run)
    assert run.meta["layer"] == res.best["layer"]
    with open_cache(cache) as c:
        X, y = layersets.load(c, "val", res.best["layer"])
        width = layersets.load(c, "train", res.best["layer"])[0].shape[1]
    assert run.transform.mean_.shape == (width,)  # standardised on the chosen layer alone
    assert float(np.mean(run.predict_proba(X).argmax(1) == y)) == res.best["score"]
    csv = (Path(res.run) / "sweep.csv").read_text().splitlines()
    assert csv[0] == "layer,alpha,top1,log_loss" and len(csv) == len(res.sweep) + 1
    same = fit_head(cache, head="ridge", layer="layer4,layer2,layer2+layer4", output=str(tmp_path / "r2"))
    assert same.best["layer"] == res.best["layer"]
    r = CliRunner().invoke(main, ["fit-head", cache, "--head", "ridge", "--layer", "all", "-o", str(tmp_path / "cli")])
    assert r.exit_code == 0 and f"ridge: best alpha={res.best['value']:g} on layer {res.best['layer']}" in r.output
    with pytest.raises(CacheError, match="Layer 'layer9' is not in cache"):
        fit_head(cache, head="ridge", layer="layer2,layer9", output=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="sweeps layers for feature heads without shots"):
        fit_head(cache, head="ridge", layer="all", shots=5, output=str(tmp_path / "y"))


@pytest.mark.parametrize("head", [n for n in HEADS.names() if "class_weight" not in HEADS.entry(n).extra["options"]])
def test_heads_without_class_weights_select_by_balanced_accuracy_and_refuse_weights(odd_cache, tmp_path, head):
    runner = CliRunner()
    r = runner.invoke(main, ["fit-head", odd_cache, "--head", head, "--select-by", "balanced_accuracy", "--json",
                             "-o", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["best"]["score"] == pytest.approx(out["metrics"]["val"]["balanced_accuracy"])
    r = runner.invoke(main, ["fit-head", odd_cache, "--head", head, "--class-weight", "balanced"])
    assert r.exit_code == 1
    assert r.output == f"Error: Head '{head}' has no class_weight option; drop the --class-weight option.\n"


def test_heads_of_dense_products_take_every_core_from_a_smaller_problem():
    from featcache.heads import NCMHead, RidgeHead
    from featcache.common.runtime import head_threads

    work, cores = 1 << 20, torch.get_num_threads()  # under the numpy pool's default threshold, over ridge's
    with head_threads("numpy", work) as default:
        assert default["threads"] == 1
    for cls in (RidgeHead, NCMHead):
        with head_threads(cls.thread_pool, work, parallel_work=cls.parallel_work) as used:
            assert used["threads"] == cores


@pytest.mark.real
def test_extract_and_fit_every_layer_of_the_real_data(real_data, lite0_available, tmp_path):
    """The issue's path: extract --layer all, then fit-head --layer all --json (layer x C table)."""
    runner = CliRunner()
    r = runner.invoke(main, ["extract", str(real_data), "--layer", "all", "--cache-dir", str(tmp_path / "c"), "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["fit-head", json.loads(r.stdout)["cache"], "--layer", "all", "--json",
                             "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    best = json.loads(r.stdout)["best"]
    table = {row["layer"]: row for row in best["layers"]}
    singles = [f"stage{i}" for i in range(1, 8)] + ["pre_logits"]
    assert list(table) == singles + layersets.adjacent_runs(singles)
    assert best["score"] == max(row["score"] for row in table.values()) == table[best["layer"]]["score"]
    assert best["value"] == table[best["layer"]]["value"] and "grid_extended" in best and "at_bound" in best
    assert best["score"] >= 0.93


def test_head_options_are_checked_before_the_cache_is_opened(tmp_path):
    missing = str(tmp_path / "no-such-cache.h5")  # the option error comes first: nothing is read
    with pytest.raises(ConfigError, match="Unknown option 'epochs' for head 'logreg'. Valid options: C,"):
        fit_head(missing, head="logreg", head_options={"epochs": 3}, output=str(tmp_path / "r"))
    with pytest.raises(ConfigError, match="Head 'knn' has no class_weight option"):
        fit_head(missing, head="knn", class_weight="balanced", output=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()
