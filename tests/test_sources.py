"""Unit tests of the data sources (featcache/sources/) on tiny data made in tmp_path.

Covers the image folder (flat and train/val/test layouts), the CSV manifest, the MedMNIST-style
.npz, the built-in digits, :func:`open_source` dispatch and ``--val-fraction``. Error texts are
asserted exactly where the CLI shows them (``Error: ...``).
"""

from __future__ import annotations

import os

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featcache.cli import main
from featcache.errors import ConfigError, FeatcacheError, SourceError
from featcache.sources import (
    IMAGE_EXTENSIONS,
    SOURCES,
    CsvSource,
    DigitsSource,
    ImageFolderSource,
    NpzSource,
    SampleRef,
    Source,
    content_hash,
    open_source,
)


def _img(path: Path, size=(8, 8), color=(200, 10, 10)) -> Path:
    """Write a tiny image; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP",
           ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}[path.suffix.lower()]
    Image.new("RGB", size, color).save(path, fmt)
    return path


def _ids(src: Source, split: str = "train") -> list[str]:
    return [r.id for r in src.splits[split]]


def _labels(src: Source, split: str = "train") -> list[int]:
    return [r.label for r in src.splits[split]]


def _class_folder(root: Path, per_class: dict[str, int]) -> Path:
    for cls, n in per_class.items():
        for i in range(n):
            _img(root / cls / f"{i:02d}.png", color=(i * 20 % 256, 0, 0))
    return root


# --- ImageFolderSource ---------------------------------------------------------------------

def test_folder_flat_layout_lists_classes_ids_and_keys(tmp_path):
    root = tmp_path / "data"
    _img(root / "dog" / "x.png")
    _img(root / "cat" / "b.png")
    _img(root / "cat" / "a.jpg")
    _img(root / "cat" / "c.JPEG")              # extensions are case-insensitive
    _img(root / "cat" / "deep" / "z.png")      # nested folders inside a class are walked
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "a.jpg.bak").write_bytes(b"x")
    (root / "cat" / "Thumbs.db").write_bytes(b"x")
    _img(root / "cat" / ".hidden.png")          # hidden files are ignored
    _img(root / ".git" / "objects.png")         # hidden folders are not classes
    _img(root / "stray.png")                    # files at the root belong to no class

    src = ImageFolderSource(root)

    assert src.kind == "folder"
    assert src.classes == ["cat", "dog"]
    assert list(src.splits) == ["train"]
    assert _ids(src) == ["cat/a.jpg", "cat/b.png", "cat/c.JPEG", "cat/deep/z.png", "dog/x.png"]
    assert _labels(src) == [0, 0, 0, 0, 1]
    assert [r.key for r in src.splits["train"]] == [str(root.resolve() / i) for i in _ids(src)]
    assert src.spec == str(root.resolve())
    assert src.describe() == {"kind": "folder", "spec": str(root.resolve())}
    assert len(src) == 5


def test_folder_samples_sorted_by_bytes_within_each_class(tmp_path):
    root = tmp_path / "data"
    for name in ("b2.png", "a.png", "b10.png", "B.png", "_u.png"):
        _img(root / "c" / name)
    src = ImageFolderSource(root)
    assert _ids(src) == ["c/B.png", "c/_u.png", "c/a.png", "c/b10.png", "c/b2.png"]


def test_folder_lists_every_documented_extension(tmp_path):
    root = tmp_path / "data"
    for i, ext in enumerate(IMAGE_EXTENSIONS):
        (root / "c").mkdir(parents=True, exist_ok=True)
        (root / "c" / f"{i:02d}{ext.upper() if i % 2 else ext}").write_bytes(b"listed, decoded later")
    src = ImageFolderSource(root)
    assert len(src.splits["train"]) == len(IMAGE_EXTENSIONS)


def test_folder_split_layout(tmp_path):
    root = tmp_path / "data"
    _img(root / "train" / "cat" / "1.png")
    _img(root / "train" / "cat" / "0.png")
    _img(root / "train" / "dog" / "0.png")
    _img(root / "val" / "cat" / "0.png")
    _img(root / "test" / "dog" / "0.png")
    _img(root / "test" / "bird" / "0.png")   # a class seen only in test still gets an index
    _img(root / "extra" / "cat" / "0.png")   # not a split name: ignored once split folders exist

    src = ImageFolderSource(root)

    assert src.classes == ["bird", "cat", "dog"]
    assert list(src.splits) == ["train", "val", "test"]
    assert _ids(src, "train") == ["train/cat/0.png", "train/cat/1.png", "train/dog/0.png"]
    assert _labels(src, "train") == [1, 1, 2]
    assert _ids(src, "val") == ["val/cat/0.png"]
    assert _labels(src, "val") == [1]
    assert _ids(src, "test") == ["test/bird/0.png", "test/dog/0.png"]
    assert _labels(src, "test") == [0, 2]
    assert len(src) == 6


def test_folder_split_layout_without_val(tmp_path):
    root = tmp_path / "data"
    _img(root / "train" / "a" / "0.png")
    _img(root / "test" / "a" / "0.png")
    src = ImageFolderSource(root)
    assert list(src.splits) == ["train", "test"]


def test_folder_missing(tmp_path):
    root = tmp_path / "nope"
    with pytest.raises(SourceError) as e:
        ImageFolderSource(root)
    assert str(e.value) == f"Image folder '{root}' does not exist. Pass a folder of class sub-folders."


def test_folder_without_class_folders(tmp_path):
    root = tmp_path / "flat"
    _img(root / "a.png")
    _img(root / ".hidden" / "b.png")
    with pytest.raises(SourceError) as e:
        ImageFolderSource(root)
    assert str(e.value) == (f"Image folder '{root}' has no class sub-folders. Expected ROOT/CLASS/IMAGE "
                            f"or ROOT/train/CLASS/IMAGE.")


def test_folder_without_images(tmp_path):
    root = tmp_path / "empty"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "readme.txt").write_text("x")
    with pytest.raises(SourceError) as e:
        ImageFolderSource(root)
    assert str(e.value) == f"Image folder '{root}' has no image files ({', '.join(IMAGE_EXTENSIONS)})."


def test_folder_relative_path(tmp_path, monkeypatch):
    _img(tmp_path / "data" / "cat" / "0.png")
    monkeypatch.chdir(tmp_path)
    src = ImageFolderSource("data")
    assert _ids(src) == ["cat/0.png"]


def test_folder_through_symlink(tmp_path):
    _img(tmp_path / "real" / "cat" / "0.png")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    src = ImageFolderSource(tmp_path / "link")
    assert _ids(src) == ["cat/0.png"]


def test_folder_ignores_hidden_subfolders(tmp_path):
    root = tmp_path / "data"
    _img(root / "cat" / "0.png")
    _img(root / "cat" / ".thumbnails" / "0.png")
    assert _ids(ImageFolderSource(root)) == ["cat/0.png"]


def _ants_and_bees(root: Path) -> Path:
    """ROOT/train/{ants,bees} (3 and 2 images) and ROOT/val/{ants,bees} (1 each)."""
    for split, counts in (("train", {"ants": 3, "bees": 2}), ("val", {"ants": 1, "bees": 1})):
        _class_folder(root / split, counts)
    return root


def test_folder_symlink_loop_to_the_split_folder_does_not_duplicate_a_class(tmp_path, caplog):
    """``ln -s .. DATA/train/bees/loop`` once added every ants image again as bees/loop/ants/*."""
    root = _ants_and_bees(tmp_path / "data")
    plain = ImageFolderSource(root)
    (root / "train" / "bees" / "loop").symlink_to("..", target_is_directory=True)
    src = open_source(str(root))
    assert src.splits == plain.splits
    assert Counter(_labels(src)) == {0: 3, 1: 2}
    assert src.notes == [{"split": "train", "id": "train/bees/loop",
                          "note": "folder skipped: a link to 'train', walked where it is (each real folder is walked "
                                  "once)"}]
    assert "1 note(s), recorded in the cache" in caplog.text and "train/train/bees/loop: folder skipped" in caplog.text


def test_folder_links_into_other_class_folders_are_walked_where_they_are(tmp_path):
    """Whatever the walking order, a folder reached through a link to (a folder inside) another class
    folder, or to the root, keeps its real class: ants/x -> bees/sub is walked as bees, once."""
    root = _ants_and_bees(tmp_path / "data")
    _img(root / "train" / "bees" / "sub" / "s.png")
    plain = ImageFolderSource(root)
    (root / "train" / "ants" / "x").symlink_to("../bees/sub", target_is_directory=True)
    (root / "train" / "ants" / "top").symlink_to(root, target_is_directory=True)
    (root / "train" / "bees" / "val-bees").symlink_to("../../val/bees", target_is_directory=True)
    (root / "train" / "aardvark").symlink_to("bees", target_is_directory=True)  # a class folder that is a link
    src = ImageFolderSource(root)
    assert src.splits == plain.splits
    assert "train/bees/sub/s.png" in _ids(src)
    assert [(n["split"], n["id"]) for n in src.notes] == [
        ("train", "train/ants/top"), ("train", "train/ants/x"), ("train", "train/bees/val-bees"),
        ("train", "train/aardvark")]
    assert src.notes[-1]["note"].startswith("folder skipped: a link to 'train/bees', walked where it is")


def test_folder_link_to_a_folder_outside_is_followed_once(tmp_path):
    root = _ants_and_bees(tmp_path / "data")
    _img(tmp_path / "elsewhere" / "e.png")
    (tmp_path / "elsewhere" / "back").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "train" / "ants" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "train" / "bees" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    src = ImageFolderSource(root)
    assert [i for i in _ids(src) if "more" in i] == ["train/ants/more/e.png"]
    assert [n["id"] for n in src.notes] == ["train/ants/more/back", "train/bees/more"]
    assert src.notes[1]["note"] == (f"folder skipped: '{tmp_path / 'elsewhere'}' was walked already (each real "
                                    f"folder is walked once)")


# --- CsvSource -----------------------------------------------------------------------------

def _manifest(tmp_path: Path, text: str, name: str = "manifest.csv") -> Path:
    m = tmp_path / "m" / name
    m.parent.mkdir(parents=True, exist_ok=True)
    m.write_text(text, encoding="utf-8")
    return m


def test_csv_path_label_split(tmp_path):
    _img(tmp_path / "m" / "img" / "a.png")
    _img(tmp_path / "m" / "img" / "b.png")
    _img(tmp_path / "m" / "img" / "d.png")
    _img(tmp_path / "other" / "c.png")
    m = _manifest(tmp_path, "path,label,split\n"
                            "img/d.png,dog,test\n"
                            "img/a.png,cat,train\n"
                            "../other/c.png,bird, val \n"
                            "img/b.png,cat,\n")
    src = CsvSource(m)
    assert src.kind == "csv"
    assert src.spec == str(m.resolve())
    assert src.classes == ["bird", "cat", "dog"]
    assert list(src.splits) == ["train", "val", "test"]  # fixed split order, whatever the CSV order
    assert src.splits["train"] == [
        SampleRef("img/a.png", 1, str(tmp_path / "m" / "img" / "a.png")),
        SampleRef("img/b.png", 1, str(tmp_path / "m" / "img" / "b.png")),  # empty split -> train
    ]
    assert src.splits["val"] == [SampleRef("../other/c.png", 0, str(tmp_path / "other" / "c.png"))]
    assert src.splits["test"] == [SampleRef("img/d.png", 2, str(tmp_path / "m" / "img" / "d.png"))]
    assert src.notes == []
    data, h = src.read(src.splits["val"][0])
    assert data == (tmp_path / "other" / "c.png").read_bytes()
    assert h == content_hash(data)


def test_csv_without_split_column_is_all_train_in_manifest_order(tmp_path):
    m = _manifest(tmp_path, "label,path\n1,z.png\n0,a.png\n1,m.png\n")
    src = CsvSource(m)
    assert list(src.splits) == ["train"]
    assert _ids(src) == ["z.png", "a.png", "m.png"]
    assert src.classes == ["0", "1"]
    assert _labels(src) == [1, 0, 1]


def test_csv_missing_files_stay_in_the_plan(tmp_path):
    m = _manifest(tmp_path, "path,label\nnot/there.png,a\n")
    src = CsvSource(m)
    assert _ids(src) == ["not/there.png"]


def test_csv_missing_header(tmp_path):
    m = _manifest(tmp_path, "img/a.png,cat\nimg/b.png,dog\n")
    with pytest.raises(SourceError) as e:
        CsvSource(m)
    assert str(e.value) == f"CSV manifest '{m}' needs a header row with columns path,label[,split]."


@pytest.mark.parametrize("text", ["", "path,label\n", "file,class\na.png,0\n"], ids=["empty", "header-only", "wrong-columns"])
def test_csv_bad_header_or_empty(tmp_path, text):
    m = _manifest(tmp_path, text)
    with pytest.raises(SourceError) as e:
        CsvSource(m)
    assert str(e.value) == f"CSV manifest '{m}' needs a header row with columns path,label[,split]."


def test_csv_unknown_split(tmp_path):
    m = _manifest(tmp_path, "path,label,split\na.png,0,train\nb.png,1,valid\n")
    with pytest.raises(SourceError) as e:
        CsvSource(m)
    assert str(e.value) == f"CSV manifest '{m}' line 3: split 'valid' is not one of train, val, test."


def test_csv_missing_manifest(tmp_path):
    with pytest.raises(SourceError) as e:
        CsvSource(tmp_path / "no.csv")
    assert str(e.value) == f"CSV manifest '{tmp_path / 'no.csv'}' does not exist."


def test_csv_short_row(tmp_path):
    m = _manifest(tmp_path, "path,label\nimg/a.png,cat\nimg/b.png\n")
    with pytest.raises(SourceError, match="line 3"):
        CsvSource(m)


@pytest.mark.parametrize("rows, error", [
    ("a.png,cat,train\nb.png,dog,train\n./a.png,dog,val\n",
     "lists './a.png' under two labels: line 2 'cat' (train), line 4 'dog' (val). Keep one row per image."),
    ("a.png,cat,train\nb.png,dog,train\na.png,cat,train\n",
     "lists 'a.png' twice in split 'train' (lines 2 and 4); it would count twice. Remove the repeated row."),
], ids=["two-labels", "twice-in-a-split"])
def test_csv_repeated_image_is_refused_naming_the_rows(tmp_path, rows, error):
    m = _manifest(tmp_path, "path,label,split\n" + rows)
    with pytest.raises(SourceError) as e:
        CsvSource(m)
    assert str(e.value) == f"CSV manifest '{m}' {error}"
    r = CliRunner().invoke(main, ["extract", str(m), "--json"])
    assert r.exit_code == 1 and error in r.output


def test_csv_image_in_two_splits_is_kept_warned_and_recorded(tmp_path, caplog):
    m = _manifest(tmp_path, "path,label,split\na.png,cat,train\nb.png,dog,train\na.png,cat,val\nc.png,dog,val\n")
    src = open_source(str(m))
    assert _ids(src, "train") == ["a.png", "b.png"] and _ids(src, "val") == ["a.png", "c.png"]
    assert src.notes == [{"split": "val", "id": "a.png",
                          "note": "also in split 'train' (lines 2 and 4): the same image in two splits, so scores on "
                                  "'val' are not on held-out images only"}]
    assert "Source '" in caplog.text and "1 note(s)" in caplog.text and "val/a.png: also in split 'train'" in caplog.text


def test_csv_with_utf8_bom(tmp_path):
    m = tmp_path / "bom.csv"
    m.write_text("path,label\na.png,cat\n", encoding="utf-8-sig")
    assert _ids(CsvSource(m)) == ["a.png"]


# --- NpzSource -----------------------------------------------------------------------------

def test_npz_grayscale_medmnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    tr = rng.integers(0, 256, (4, 6, 5), dtype=np.uint8)
    va = rng.integers(0, 256, (2, 6, 5), dtype=np.uint8)
    te = rng.integers(0, 256, (3, 6, 5), dtype=np.uint8)
    p = tmp_path / "pneumonia.npz"
    np.savez(p, test_images=te, test_labels=np.array([[10], [0], [2]]),
             train_images=tr, train_labels=np.array([[0], [2], [2], [10]], dtype=np.uint8),
             val_images=va, val_labels=np.array([[2], [0]], dtype=np.int32))
    src = NpzSource(p)
    assert src.kind == "npz"
    assert src.spec == str(p.resolve())
    assert src.classes == ["0", "2", "10"]  # numeric order, not string order
    assert list(src.splits) == ["train", "val", "test"]
    assert _ids(src, "train") == ["train/0", "train/1", "train/2", "train/3"]
    assert _labels(src, "train") == [0, 1, 1, 2]
    assert _labels(src, "val") == [1, 0]
    assert _ids(src, "test") == ["test/0", "test/1", "test/2"]
    assert _labels(src, "test") == [2, 0, 1]
    arr, h = src.read(src.splits["val"][1])
    assert arr.shape == (6, 5) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, va[1])
    assert h == content_hash(va[1])
    st = os.stat(src.spec)
    assert src.stat(src.splits["val"][1]) == (st.st_size, st.st_mtime_ns)  # the file's stat stands for each sample


def test_npz_rgb_with_flat_labels(tmp_path):
    imgs = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    p = tmp_path / "rgb.npz"
    np.savez(p, train_images=imgs, train_labels=np.array([1, 0]))
    src = NpzSource(p)
    assert list(src.splits) == ["train"]
    assert src.classes == ["0", "1"]
    assert _labels(src) == [1, 0]
    arr, _ = src.read(src.splits["train"][1])
    assert arr.shape == (4, 4, 3)
    np.testing.assert_array_equal(arr, imgs[1])


def test_npz_float_and_wide_int_images_are_converted(tmp_path):
    p = tmp_path / "f.npz"
    np.savez(p, train_images=np.array([[[0.0, 0.5], [1.0, 0.2]]], dtype=np.float32),
             train_labels=np.array([0]),
             val_images=np.array([[[0, 255], [7, 128]]], dtype=np.int64), val_labels=np.array([0]))
    src = NpzSource(p)
    arr, _ = src.read(src.splits["train"][0])
    assert arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, [[0, 128], [255, 51]])
    arr, _ = src.read(src.splits["val"][0])
    assert arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, [[0, 255], [7, 128]])


def test_npz_wrong_keys(tmp_path):
    p = tmp_path / "k.npz"
    np.savez(p, images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(SourceError) as e:
        NpzSource(p)
    assert str(e.value) == (f"npz file '{p}' has none of the keys train_images/train_labels, val_*, test_* "
                            f"(MedMNIST layout). It has: images, labels.")


def test_npz_only_images(tmp_path):
    p = tmp_path / "k.npz"
    np.savez(p, train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(SourceError) as e:
        NpzSource(p)
    assert str(e.value) == f"npz file '{p}' has only one of 'train_images' and 'train_labels'; both are needed."


@pytest.mark.parametrize("labels, got", [
    (np.array([0, 1, 0]), "int64 (3,)"),                 # length mismatch
    (np.array([[0, 1], [1, 0]]), "int64 (2, 2)"),        # one-hot, not (N,) or (N, 1)
    (np.array([0.0, 1.0]), "float64 (2,)"),               # not integers
    (np.array([True, False]), "bool (2,)"),
], ids=["length", "one-hot", "float", "bool"])
def test_npz_bad_labels(tmp_path, labels, got):
    p = tmp_path / "l.npz"
    np.savez(p, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=labels)
    with pytest.raises(SourceError) as e:
        NpzSource(p)
    assert str(e.value) == (f"npz file '{p}': 'train_labels' must be integers of shape (2,) or (2, 1). "
                            f"Got {got}.")


@pytest.mark.parametrize("images", [
    np.zeros((2, 4, 4, 4), np.uint8), np.zeros((2, 4), np.uint8), np.zeros((2, 3, 4, 4, 3), np.uint8),
], ids=["rgba", "2d", "5d"])
def test_npz_bad_image_shape(tmp_path, images):
    p = tmp_path / "s.npz"
    np.savez(p, train_images=images, train_labels=np.array([0, 1]))
    with pytest.raises(SourceError) as e:
        NpzSource(p)
    assert str(e.value) == (f"'{p}:train_images' must have shape (N, H, W) or (N, H, W, 3). "
                            f"Got {images.shape}.")


@pytest.mark.parametrize("images, dtype", [
    (np.full((2, 4, 4), -1, np.int16), "int16"),
    (np.full((2, 4, 4), 256, np.int32), "int32"),
    (np.full((2, 4, 4), 1.5, np.float32), "float32"),
    (np.zeros((2, 4, 4), np.complex64), "complex64"),
], ids=["negative", "over-255", "float-over-1", "complex"])
def test_npz_bad_image_dtype(tmp_path, images, dtype):
    p = tmp_path / "d.npz"
    np.savez(p, train_images=images, train_labels=np.array([0, 1]))
    with pytest.raises(SourceError) as e:
        NpzSource(p)
    assert str(e.value) == f"'{p}:train_images' must be uint8 (0-255) or float in [0, 1]. Got {dtype}."


UNPICKLED: list[str] = []


def _record_unpickle(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Tripwire:
    """Pickles into a call of _record_unpickle: loading it would leave a trace in UNPICKLED."""

    def __reduce__(self):
        return (_record_unpickle, ("unpickled",))


@pytest.mark.parametrize("which", ["images", "labels"])
def test_npz_object_arrays_are_refused_without_unpickling(tmp_path, which):
    UNPICKLED.clear()
    objs = np.empty(2, dtype=object)
    objs[0], objs[1] = _Tripwire(), _Tripwire()
    arrays = {"train_images": np.zeros((2, 4, 4), np.uint8), "train_labels": np.array([0, 1])}
    arrays[f"train_{which}"] = objs
    p = tmp_path / "o.npz"
    np.savez(p, **arrays)
    with pytest.raises(SourceError) as e:
        NpzSource(p)
    assert str(e.value).startswith(
        f"npz file '{p}': cannot read 'train_images'/'train_labels' without pickles (")
    assert UNPICKLED == []


def test_npz_not_an_npz(tmp_path):
    p = tmp_path / "text.npz"
    p.write_text("hello")
    with pytest.raises(SourceError) as e:
        NpzSource(p)
    assert str(e.value).startswith(f"'{p}' is not a readable .npz file without pickles (")


def test_npz_missing(tmp_path):
    with pytest.raises(SourceError) as e:
        NpzSource(tmp_path / "no.npz")
    assert str(e.value) == f"npz file '{tmp_path / 'no.npz'}' does not exist."


# --- DigitsSource --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return DigitsSource()


def test_digits_counts_and_classes(digits):
    assert digits.kind == "digits"
    assert digits.describe() == {"kind": "digits", "spec": "digits"}
    assert digits.classes == [str(i) for i in range(10)]
    assert list(digits.splits) == ["train", "val"]
    assert len(digits) == 1797
    assert len(digits.splits["train"]) == 1437
    assert len(digits.splits["val"]) == 360


def test_digits_split_is_stratified_disjoint_and_sorted(digits):
    from sklearn.datasets import load_digits

    target = load_digits().target
    tr = [int(r.id) for r in digits.splits["train"]]
    va = [int(r.id) for r in digits.splits["val"]]
    assert tr == sorted(tr) and va == sorted(va)
    assert sorted(tr + va) == list(range(1797))
    assert [r.label for r in digits.splits["val"]] == [int(target[i]) for i in va]
    total, in_val = Counter(target.tolist()), Counter(target[va].tolist())
    for c in range(10):
        assert abs(in_val[c] - 0.2 * total[c]) <= 1, (c, in_val[c], total[c])
    assert [r.id for r in DigitsSource().splits["val"]] == [r.id for r in digits.splits["val"]]


def test_digits_read_scales_to_uint8(digits):
    from sklearn.datasets import load_digits

    images = load_digits().images
    ref = digits.splits["val"][0]
    arr, h = digits.read(ref)
    assert arr.shape == (8, 8) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, np.round(images[int(ref.id)] * 255 / 16).astype(np.uint8))
    assert h == content_hash(arr)
    assert max(int(digits.read(r)[0].max()) for r in digits.splits["train"][:50]) == 255


# --- open_source ---------------------------------------------------------------------------

def test_registry_lists_the_kinds():
    assert SOURCES.names() == ["folder", "csv", "npz", "digits", "wds", "parquet", "hf"]


def test_open_source_dispatch(tmp_path):
    folder = tmp_path / "data"
    _img(folder / "cat" / "0.png")
    _img(tmp_path / "m" / "a.png")
    csv_path = _manifest(tmp_path, "path,label\na.png,x\n")
    txt_manifest = _manifest(tmp_path, "path,label\na.png,x\n", name="manifest.txt")
    npz_path = tmp_path / "arrays.NPZ"
    with open(npz_path, "wb") as f:
        np.savez(f, train_images=np.zeros((1, 4, 4), np.uint8), train_labels=np.array([3]))
    bin_path = tmp_path / "arrays.bin"
    bin_path.write_bytes(npz_path.read_bytes())

    assert type(open_source("digits")) is DigitsSource
    assert type(open_source(folder)) is ImageFolderSource
    assert type(open_source(str(folder))) is ImageFolderSource
    assert type(open_source(csv_path)) is CsvSource
    assert type(open_source(npz_path)) is NpzSource          # extension is case-insensitive
    assert type(open_source(f"folder:{folder}")) is ImageFolderSource
    assert type(open_source(f"csv:{txt_manifest}")) is CsvSource
    assert type(open_source(f"npz:{bin_path}")) is NpzSource
    assert open_source(f"npz:{bin_path}").classes == ["3"]
    src = ImageFolderSource(folder)
    assert open_source(src) is src


def test_open_source_folder_with_colon_in_its_name(tmp_path):
    folder = tmp_path / "run:1"
    _img(folder / "cat" / "0.png")
    assert _ids(open_source(str(folder))) == ["cat/0.png"]


@pytest.mark.parametrize("spec", ["nope", "bogus:thing", "data.h5"])
def test_open_source_unknown(tmp_path, spec):
    spec = str(tmp_path / spec) if spec != "bogus:thing" else spec
    with pytest.raises(SourceError) as e:
        open_source(spec)
    assert str(e.value) == (f"Source '{spec}' is not a folder, a .csv manifest, a .npz file or a built-in "
                            f"source. Check the path, or run 'featcache sources' to list the kinds.")


def test_open_source_missing_csv_and_npz_name_the_file(tmp_path):
    with pytest.raises(SourceError, match="^CSV manifest '.*no.csv' does not exist.$"):
        open_source(tmp_path / "no.csv")
    with pytest.raises(SourceError, match="^npz file '.*no.npz' does not exist.$"):
        open_source(tmp_path / "no.npz")


@pytest.mark.parametrize("spec", ["csv", "npz", "folder"])
def test_open_source_bare_kind_name(spec):
    with pytest.raises(SourceError):
        open_source(spec)


def test_cli_unknown_source_error(tmp_path):
    spec = str(tmp_path / "nope")
    res = CliRunner().invoke(main, ["extract", spec, "--backbone", "resnet18.none",
                                    "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 1
    assert res.output == (f"Error: Source '{spec}' is not a folder, a .csv manifest, a .npz file or a "
                          f"built-in source. Check the path, or run 'featcache sources' to list the kinds.\n")


def test_cli_sources_lists_kinds():
    res = CliRunner().invoke(main, ["sources"])
    assert res.exit_code == 0
    assert [line.split()[0] for line in res.output.splitlines()] == ["folder", "csv", "npz", "digits", "wds", "parquet",
                                                                        "hf"]


# --- --val-fraction ------------------------------------------------------------------------

def test_val_fraction_is_stratified_and_keeps_everything(tmp_path):
    root = _class_folder(tmp_path / "data", {"a": 10, "b": 5, "c": 5})
    before = _ids(ImageFolderSource(root))
    src = open_source(root, val_fraction=0.2, split_seed=0)
    assert list(src.splits) == ["train", "val"]
    tr, va = _ids(src, "train"), _ids(src, "val")
    assert len(tr) == 16 and len(va) == 4
    assert sorted(tr + va) == sorted(before)
    assert tr == [i for i in before if i in tr] and va == [i for i in before if i in va]  # source order kept
    assert Counter(i.split("/")[0] for i in va) == {"a": 2, "b": 1, "c": 1}
    assert src.split_policy == {"val_fraction": 0.2, "split_seed": 0}
    assert src.describe() == {"kind": "folder", "spec": str(root.resolve()), "val_fraction": 0.2, "split_seed": 0}


def test_val_fraction_is_seeded_and_reproducible(tmp_path):
    root = _class_folder(tmp_path / "data", {"a": 10, "b": 10})
    runs = {seed: _ids(open_source(root, val_fraction=0.3, split_seed=seed), "val") for seed in range(5)}
    assert _ids(open_source(root, val_fraction=0.3, split_seed=3), "val") == runs[3]
    assert len({tuple(v) for v in runs.values()}) > 1
    assert all(len(v) == 6 for v in runs.values())


def test_val_fraction_keeps_test_and_labels(tmp_path):
    root = tmp_path / "data"
    _class_folder(root / "train", {"a": 4, "b": 4})
    _img(root / "test" / "b" / "0.png")
    src = open_source(root, val_fraction=0.5)
    assert list(src.splits) == ["train", "val", "test"]
    assert _ids(src, "test") == ["test/b/0.png"]
    for split in ("train", "val"):
        for r in src.splits[split]:
            assert r.label == src.classes.index(r.id.split("/")[1])
    assert Counter(r.label for r in src.splits["val"]) == {0: 2, 1: 2}


def test_val_fraction_keeps_a_class_with_one_image_in_train(tmp_path, caplog):
    """In val, a class's only image is a class no head can learn. Seeds 1, 5 and 8 put it there
    when the split fell back to an unstratified one."""
    root = _class_folder(tmp_path / "data", {"a": 9, "b": 1})
    for seed in range(10):
        src = open_source(root, val_fraction=0.3, split_seed=seed)
        assert len(_ids(src, "train")) == 7 and len(_ids(src, "val")) == 3
        assert [i for i in _ids(src, "val") if i.startswith("b/")] == [], seed
    assert "val_fraction=0.3: 'b' has a single training image, kept in train (val has none of it)" in caplog.text


def test_val_fraction_on_npz_without_val(tmp_path):
    p = tmp_path / "a.npz"
    np.savez(p, train_images=np.zeros((10, 4, 4), np.uint8), train_labels=np.array([0, 1] * 5))
    src = open_source(p, val_fraction=0.4, split_seed=1)
    assert len(src.splits["train"]) == 6 and len(src.splits["val"]) == 4
    assert Counter(r.label for r in src.splits["val"]) == {0: 2, 1: 2}
    assert all(r.id.startswith("train/") for r in src.splits["val"])  # ids keep their origin


def test_val_fraction_when_val_exists(tmp_path):
    root = tmp_path / "data"
    _img(root / "train" / "a" / "0.png")
    _img(root / "val" / "a" / "0.png")
    with pytest.raises(ConfigError) as e:
        open_source(root, val_fraction=0.2)
    assert str(e.value) == f"Source '{root.resolve()}' already has a val split; drop the 'val_fraction' option."
    with pytest.raises(ConfigError) as e:
        open_source("digits", val_fraction=0.2)
    assert str(e.value) == "Source 'digits' already has a val split; drop the 'val_fraction' option."


@pytest.mark.parametrize("fraction", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan")])
def test_val_fraction_out_of_range(tmp_path, fraction):
    root = _class_folder(tmp_path / "data", {"a": 4})
    with pytest.raises(ConfigError) as e:
        open_source(root, val_fraction=fraction)
    assert str(e.value) == f"The 'val_fraction' option must be in (0, 1). Got {fraction!r}."


def test_cli_val_fraction_errors(tmp_path):
    root = _class_folder(tmp_path / "data", {"a": 4})
    args = ["--backbone", "resnet18.none", "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(main, ["extract", "digits", "--val-fraction", "0.2", *args])
    assert res.exit_code == 1
    assert res.output == "Error: Source 'digits' already has a val split; drop the --val-fraction option.\n"
    res = CliRunner().invoke(main, ["extract", str(root), "--val-fraction", "1.5", *args])
    assert res.exit_code == 1
    assert res.output == "Error: The --val-fraction option must be in (0, 1). Got 1.5.\n"


def test_val_fraction_without_train_split(tmp_path):
    m = _manifest(tmp_path, "path,label,split\na.png,x,test\nb.png,y,test\n")
    with pytest.raises(FeatcacheError):
        open_source(m, val_fraction=0.5)


@pytest.mark.parametrize("per_class, fraction", [({"a": 2, "b": 2, "c": 2}, 0.1), ({"a": 1}, 0.5)],
                         ids=["fewer-val-than-classes", "single-sample"])
def test_val_fraction_too_small_for_the_data(tmp_path, per_class, fraction):
    root = _class_folder(tmp_path / "data", per_class)
    with pytest.raises(ConfigError):
        open_source(root, val_fraction=fraction)


@pytest.mark.parametrize("shape", [(256, 256, 3), (256, 300, 3), (301, 256, 3), (224, 224, 3)])
def test_array_fast_path_crops_exactly_like_decode_resize_crop(shape):
    from featcache.backbones.preprocess import Preprocess, crop_array, decode, resize_crop

    pp = Preprocess(resize=256, crop=224)
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    fast = crop_array(arr, pp)
    slow = resize_crop(decode(arr, pp), pp)
    if shape[0] == 224:  # needs resizing up to 256: no fast path
        assert fast is None
    else:
        assert fast.flags.c_contiguous and np.array_equal(fast, slow)
    assert crop_array(arr[..., :1], pp) is None and crop_array(arr.astype(np.float32), pp) is None
