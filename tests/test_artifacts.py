"""Heads are saved as safetensors + JSON and loaded back without ever unpickling anything."""

from __future__ import annotations

import builtins
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from sklearn.datasets import make_classification

from featcache.runs.artifacts import load_head, save_head
from featcache.errors import ConfigError, HeadError
from featcache.heads import HEADS, make_head

FAST = {
    "mlp": {"hidden": 16, "epochs": 3, "device": "cpu"},
    "linear": {"device": "cpu"},
    "knn": {"k": 5, "device": "cpu"},
}


@pytest.fixture(scope="module")
def data():
    X, y = make_classification(
        160, 8, n_informative=5, n_classes=3, n_clusters_per_class=1, random_state=0
    )
    labels = np.array([10, 20, 30])[y]
    return X[:120].astype(np.float32), labels[:120], X[120:].astype(np.float32)


@pytest.fixture()
def saved(tmp_path, data):
    """A run dir holding a valid saved logreg head."""
    X, y, _ = data
    head = make_head("logreg", C=0.5).fit(X, y)
    save_head(tmp_path, head, head_name="logreg", meta={"best": {"C": 0.5}})
    return tmp_path, head


class _Payload:
    """Unpickling this creates the marker file (it calls open(marker, 'w'))."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _pickle_bomb(marker) -> bytes:
    return pickle.dumps(_Payload(marker), protocol=4)


def test_the_payload_used_below_is_live(tmp_path):
    marker = tmp_path / "proof"
    pickle.loads(_pickle_bomb(marker)).close()
    assert marker.exists(), (
        "the crafted pickle must really run code, or the tests below prove nothing"
    )


@pytest.mark.parametrize("name", [n for n in HEADS.names() if HEADS.entry(n).extra["inputs"] == "features"])
def test_round_trip_predicts_identically(tmp_path, data, name):
    X, y, X_new = data
    head = make_head(name, **FAST.get(name, {})).fit(X, y)
    save_head(tmp_path, head, head_name=name, meta={"cache": "abc123", "score": np.float32(0.5)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.json", "head.safetensors"]
    loaded, meta = load_head(tmp_path)
    assert type(loaded) is type(head)
    np.testing.assert_array_equal(loaded.predict_proba(X_new), head.predict_proba(X_new))
    np.testing.assert_array_equal(loaded.predict(X_new), head.predict(X_new))
    assert loaded.predict(X_new).dtype == head.classes_.dtype
    assert meta == {
        "format": "featcache-head",
        "version": 1,
        "head": name,
        "cache": "abc123",
        "score": 0.5,
    }
    # The file keeps each array's dtype.
    arrays, _ = head.get_state()
    on_disk = load_file(str(tmp_path / "head.safetensors"))
    assert {k: v.dtype for k, v in on_disk.items()} == {k: v.dtype for k, v in arrays.items()}


def test_head_json_layout(saved):
    run_dir, head = saved
    doc = json.loads((run_dir / "head.json").read_text())
    assert doc["format"] == "featcache-head" and doc["version"] == 1 and doc["head"] == "logreg"
    assert doc["best"] == {"C": 0.5}
    assert doc["state"]["classes"] == [10, 20, 30]
    assert doc["state"]["params"]["C"] == 0.5


def test_string_labels_survive(tmp_path, data):
    X, y, X_new = data
    names = np.array(["ant", "bee", "cow"])[(y // 10) - 1]
    head = make_head("ncm").fit(X, names)
    save_head(tmp_path, head, head_name="ncm", meta={})
    loaded, _ = load_head(tmp_path)
    assert loaded.classes_.tolist() == ["ant", "bee", "cow"]
    np.testing.assert_array_equal(loaded.predict(X_new), head.predict(X_new))


def test_save_rejects_bad_calls(tmp_path, data):
    X, y, _ = data
    head = make_head("ridge").fit(X, y)
    with pytest.raises(
        HeadError, match=r"head_name is 'logreg' \(LogRegHead\) but the head is a RidgeHead"
    ):
        save_head(tmp_path, head, head_name="logreg", meta={})
    with pytest.raises(ConfigError, match="Unknown head 'nope'"):
        save_head(tmp_path, head, head_name="nope", meta={})
    with pytest.raises(ConfigError, match="meta must not set 'state'"):
        save_head(tmp_path, head, head_name="ridge", meta={"state": 1})
    with pytest.raises(HeadError, match="cannot be written as JSON"):
        save_head(tmp_path, head, head_name="ridge", meta={"x": float("nan")})
    with pytest.raises(HeadError, match="not fitted yet"):
        save_head(tmp_path, make_head("ridge"), head_name="ridge", meta={})
    assert list(tmp_path.iterdir()) == [], "failed saves leave no files behind"


def test_load_never_calls_a_pickle_based_loader(saved, monkeypatch):
    run_dir, head = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("load_head must not use a pickle-capable loader")

    for module, attr in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (np, "load"),
        (torch, "load"),
    ]:
        monkeypatch.setattr(module, attr, forbidden)
    loaded, _ = load_head(run_dir)
    np.testing.assert_array_equal(loaded.coef_, head.coef_)


def test_pickle_disguised_as_safetensors_is_refused(saved):
    run_dir, _ = saved
    marker = run_dir.parent / f"{run_dir.name}-pwned"
    (run_dir / "head.safetensors").write_bytes(_pickle_bomb(marker))
    with pytest.raises(HeadError) as err:
        load_head(run_dir)
    assert "head.safetensors is not a safetensors file" in str(err.value)
    assert "featcache only loads safetensors" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["head.pkl", "head.npz", "head.pt", "HEAD.Joblib"])
def test_pickle_capable_file_beside_a_valid_head_is_refused(saved, name):
    run_dir, _ = saved
    marker = run_dir.parent / f"{run_dir.name}-pwned"
    if name.endswith(".npz"):
        np.savez(run_dir / name, state=np.array([_Payload(marker)], dtype=object))
    else:
        (run_dir / name).write_bytes(_pickle_bomb(marker))
    with pytest.raises(HeadError) as err:
        load_head(run_dir)
    assert f"holds {name}: a pickle-capable file featcache never writes and never loads" in str(
        err.value
    )
    assert "Delete it" in str(err.value)
    assert not marker.exists()


def test_missing_files(tmp_path, saved):
    with pytest.raises(HeadError, match="does not exist. Fit a head first"):
        load_head(tmp_path / "nowhere")
    run_dir, _ = saved
    (run_dir / "head.safetensors").unlink()
    with pytest.raises(
        HeadError, match=r"head.safetensors is missing: .* holds no complete saved head"
    ):
        load_head(run_dir)
    (run_dir / "head.json").unlink()
    with pytest.raises(HeadError, match=r"head.json is missing"):
        load_head(run_dir)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2, 3]", "must hold a JSON object; got a list"),
        ('{"format": "other"}', "is not a featcache head"),
        ('{"format": "featcache-head", "version": true}', "has no integer 'version'"),
        (
            '{"format": "featcache-head", "version": 2}',
            "has format version 2; this featcache reads version 1",
        ),
        (
            '{"format": "featcache-head", "version": 1, "head": "xgboost", "state": {}}',
            "names the head 'xgboost', which is not registered. Run 'featcache heads'",
        ),
        (
            '{"format": "featcache-head", "version": 1, "head": "logreg", "state": []}',
            "lacks its 'state' object",
        ),
        (
            '{"format": "featcache-head", "version": 1, "head": "logreg", "state": {"params": NaN}}',
            "is not valid JSON",
        ),
    ],
)
def test_malformed_json_is_refused(saved, text, message):
    run_dir, _ = saved
    (run_dir / "head.json").write_text(text)
    with pytest.raises(HeadError, match="head.json") as err:
        load_head(run_dir)
    assert message in str(err.value)


def _edit_state(run_dir, edit):
    path = run_dir / "head.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(head="ridge"), "do not describe a fitted 'ridge' head"),
        (
            lambda d: d["state"]["params"].update(C=-1),
            "The saved options are invalid: The 'C' option",
        ),
        (
            lambda d: d["state"]["params"].update(shell="rm -rf /"),
            "unknown LogRegHead option(s) shell",
        ),
        (lambda d: d["state"].update(classes=[1, 2]), "'coef_' has shape (3, 8); expected (1, 8)"),
        (lambda d: d["state"].update(classes_dtype="V8"), "not a supported label type"),
        (lambda d: d["state"].update(n_features_in=9), "'coef_' has shape (3, 8); expected (3, 9)"),
    ],
)
def test_state_that_does_not_match_is_refused(saved, edit, message):
    run_dir, _ = saved
    _edit_state(run_dir, edit)
    with pytest.raises(HeadError) as err:
        load_head(run_dir)
    assert message in str(err.value)


def test_safetensors_header_that_lies_is_refused(saved):
    run_dir, _ = saved
    path = run_dir / "head.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    # Claim a bigger shape than the data holds, keeping the header length.
    header["coef_"]["shape"] = [3, 9]
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    with pytest.raises(HeadError, match="header entry for 'coef_' does not match the data"):
        load_head(run_dir)
    # A header length beyond the end of the file.
    path.write_bytes(struct.pack("<Q", 10**6) + raw[8:])
    with pytest.raises(HeadError, match="is not a safetensors file"):
        load_head(run_dir)
    # Truncated data.
    path.write_bytes(raw[:-4])
    with pytest.raises(HeadError, match="does not match the data"):
        load_head(run_dir)


def test_foreign_or_extra_arrays_are_refused(saved):
    run_dir, head = saved
    path = run_dir / "head.safetensors"
    arrays = {"coef_": head.coef_, "intercept_": head.intercept_}
    save_file(arrays, str(path))  # no featcache metadata
    with pytest.raises(HeadError, match="was not written by featcache"):
        load_head(run_dir)
    save_file({**arrays, "extra": np.zeros(3)}, str(path), metadata={"format": "featcache-head"})
    with pytest.raises(HeadError, match="unexpected array\\(s\\) extra"):
        load_head(run_dir)
    save_file({"coef_": head.coef_}, str(path), metadata={"format": "featcache-head"})
    with pytest.raises(HeadError, match="lacks the array 'intercept_'"):
        load_head(run_dir)
    save_file(
        {**arrays, "coef_": head.coef_.astype(np.int64)},
        str(path),
        metadata={"format": "featcache-head"},
    )
    with pytest.raises(HeadError, match="'coef_' has dtype int64"):
        load_head(run_dir)


def test_tail_head_round_trips_through_save_and_load(tmp_path):
    """The tail head (activation inputs) saves and loads like the feature heads."""
    from featcache.heads import make_head

    rng = np.random.default_rng(0)
    X = rng.normal(size=(24, 256, 2, 2)).astype(np.float32)
    y = np.arange(24) % 3
    head = make_head("tail", backbone="resnet18.none", input_size=32, boundary="layer3", epochs=1, batch_size=8,
                     device="cpu").fit(X, y)
    save_head(tmp_path, head, head_name="tail", meta={})
    loaded, _ = load_head(tmp_path)
    np.testing.assert_allclose(loaded.predict_proba(X), head.predict_proba(X), atol=1e-6)


# --- exported programs carry their classes and preprocessing ----------------------------------

def _tiny_run(tmp_path):
    from click.testing import CliRunner

    from conftest import make_image_folder
    from featcache.cli import main

    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    tiny = ["--backbone", "resnet18.none", "--input-size", "32", "--workers", "0", "--dtype", "float32"]
    r = CliRunner().invoke(main, ["extract", str(folder), *tiny, "--cache-dir", str(tmp_path / "c"), "--json"])
    cache = json.loads(r.output)["cache"]
    r = CliRunner().invoke(main, ["fit-head", cache, "--head", "ncm", "-o", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    return tmp_path / "run"


def test_export_carries_classes_and_preprocessing_with_clean_inner_names(tmp_path):
    import zipfile

    from click.testing import CliRunner

    from featcache import load_export
    from featcache.cli import main

    run = _tiny_run(tmp_path)
    r = CliRunner().invoke(main, ["export", str(run), str(tmp_path / "model.pt2")])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == f"wrote {tmp_path / 'model.pt2'}: normalised images (batch, 3, 32, 32) -> logits"
    assert lines[1] == "  classes:    2 (cat, dog)"
    assert lines[2].startswith("  preprocess: resize 37 (bilinear), centre crop 32, mean [0.485, 0.456, 0.406]")
    names = zipfile.ZipFile(tmp_path / "model.pt2").namelist()
    # Serialised in memory (a full disk is then Python's error, not torch's abort): torch names the
    # inner folder of a buffer 'archive'.
    assert all(n.startswith("archive/") for n in names) and "archive/extra/featcache.json" in names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    model = load_export(tmp_path / "model.pt2")
    assert model.classes == ["cat", "dog"] and model.meta["preprocess"]["crop"] == 32
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 2)
    with pytest.raises(ConfigError, match=r"takes normalised images of shape \(batch, 3, 32, 32\); got \(1, 3, 64, 64\)"):
        model(torch.zeros(1, 3, 64, 64))
    extra = {"featcache.json": ""}
    torch.export.load(str(tmp_path / "model.pt2"), extra_files=extra)
    assert json.loads(extra["featcache.json"])["classes"] == ["cat", "dog"]
    r = CliRunner().invoke(main, ["export", str(run), str(tmp_path / "m2.pt2"), "--json"])
    out = json.loads(r.output)
    assert out["program"] == str(tmp_path / "m2.pt2") and out["classes"] == ["cat", "dog"]
    assert {"resize", "crop", "interpolation", "mean", "std"} <= set(out["preprocess"])


def test_export_refuses_other_suffixes_existing_files_and_unwritable_paths_before_any_work(tmp_path, monkeypatch):
    import importlib

    from click.testing import CliRunner

    from featcache.cli import main

    run = _tiny_run(tmp_path)
    (cache,) = (tmp_path / "c").glob("*.h5")
    before = cache.read_bytes()
    predict = importlib.import_module("featcache.runs.inference")
    real_load_run = predict.load_run
    monkeypatch.setattr(predict, "load_run", lambda *a: pytest.fail("work started before the output was checked"))

    def refused(out, *extra):
        r = CliRunner().invoke(main, ["export", str(run), str(out), *extra, "--json"])
        assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.output, r.output
        return json.loads(r.stdout)

    assert refused(cache) == {"error": f"The output file must end in .pt2. Got '{cache}'.", "type": "ConfigError"}
    assert refused(tmp_path / "model") == {"error": f"The output file must end in .pt2. Got '{tmp_path / 'model'}'.",
                                           "type": "ConfigError"}
    assert cache.read_bytes() == before
    (tmp_path / "m.pt2").write_bytes(b"an earlier export")
    assert refused(tmp_path / "m.pt2") == {"error": f"'{tmp_path / 'm.pt2'}' already exists. Pass --overwrite to "
                                                    f"replace it, or choose another file name.", "type": "OutputError"}
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert refused(blocker / "m.pt2") == {"error": f"'{blocker}' is not a folder, so nothing can be written in "
                                                   f"'{blocker}'. Choose another output path.", "type": "OutputError"}
    assert refused(tmp_path / "no" / "m.pt2")["error"].startswith(f"Folder '{tmp_path / 'no'}' does not exist.")
    assert (tmp_path / "m.pt2").read_bytes() == b"an earlier export"
    monkeypatch.setattr(predict, "load_run", real_load_run)
    r = CliRunner().invoke(main, ["export", str(run), str(tmp_path / "m.pt2"), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert predict.load_export(tmp_path / "m.pt2").classes == ["cat", "dog"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "c", "imgs", "m.pt2", "run"]


def test_the_exported_decoding_steps_reproduce_the_preprocessing_where_plain_pil_does_not(tmp_path):
    """A JPEG twice the resize size or more is decoded in draft mode (DCT scaling): following the
    metadata's steps with PIL gives the pixels predict and extraction use; plain PIL decoding
    (no draft) gives other pixels, and other probabilities."""
    from PIL import Image

    from featcache import load_export
    from featcache.runs.inference import export
    from featcache.backbones.preprocess import Preprocess, load_image

    run = _tiny_run(tmp_path)
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 300, 3), dtype=np.uint8)).save(big, quality=90)
    model = load_export(export(run, tmp_path / "m.pt2"))
    meta, pp = model.meta, model.meta["preprocess"]
    assert pp["draft"] is True and "img.draft('RGB'" in meta["decode"][0] and "Image.draft" in meta["decode"][0]

    def by_the_steps(draft: bool) -> np.ndarray:
        img = Image.open(big)
        w, h = img.size
        s = 2 * pp["resize"] / min(w, h)
        if draft and s < 1:
            img.draft("RGB", (int(w * s), int(h * s)))
        img = img.convert("RGB")
        w, h = img.size
        nw, nh = (pp["resize"], int(pp["resize"] * h / w)) if w <= h else (int(pp["resize"] * w / h), pp["resize"])
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = int(round((nw - pp["crop"]) / 2.0)), int(round((nh - pp["crop"]) / 2.0))
        return np.asarray(img.crop((left, top, left + pp["crop"], top + pp["crop"])), dtype=np.uint8).transpose(2, 0, 1)

    def proba(crop: np.ndarray) -> np.ndarray:
        x = (crop.astype(np.float32) / 255 - np.asarray(pp["mean"], np.float32)[:, None, None]) \
            / np.asarray(pp["std"], np.float32)[:, None, None]
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(x[None].copy())), 1)[0].numpy()

    used = load_image(big.read_bytes(), Preprocess(**{**pp, "mean": tuple(pp["mean"]), "std": tuple(pp["std"])}))
    np.testing.assert_array_equal(by_the_steps(draft=True), used)
    plain = by_the_steps(draft=False)
    assert (plain != used).mean() > 0.5
    assert not np.array_equal(proba(plain), proba(used))
