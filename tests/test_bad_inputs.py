"""The bad-input corpus: files a real image folder contains, and what featcache does with each.

Every file is made by the test in tmp_path (no binary fixtures). The documented behaviour is one of

* converted: ``preprocess.decode`` returns an RGB image of the right size (16-bit, CMYK, RGBA,
  palette with and without transparency, grayscale, EXIF-rotated, non-UTF-8 names);
* skipped and recorded: extraction leaves the file out, keeps every good image, and lists it
  under ``/failed`` with split, id and reason (truncated, empty, not an image, decompression bomb,
  a CSV row whose file is missing);
* a clear error with ``on_error="fail"``: a :class:`SourceError` naming the file, shown by the
  CLI as ``Error: ...`` with exit code 1.

One extraction of the whole corpus is shared by the module (resnet18 without weights at 32 px).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featcache.cli import main
from featcache.errors import SourceError
from featcache.extraction.pipeline import extract
from featcache.backbones.preprocess import DecodeError, Preprocess, decode, load_image
from featcache.sources import ImageFolderSource
from featcache.store.cache import open_cache

#: Tiny and fast: random weights, 32 px crops, no worker processes.
FAST = dict(backbone="resnet18.none", input_size=32, batch_size=4, num_workers=0)
PP = Preprocess()                       # resize 256, crop 224: no JPEG draft for these tiny files
PP32 = Preprocess(resize=37, crop=32)   # what FAST uses
FAIL_HINT = "Use --on-error skip to skip and record such files."
BOMB = "image too large (decompression-bomb limit): "
TRUNCATED = "corrupt or truncated image: "
NOT_IMAGE = "not an image file PIL can read"
ORIENTATION = 0x0112


# --- making the corpus ---------------------------------------------------------------------

def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def good_png(seed: int = 0, size: int = 24) -> bytes:
    return _encode(_noise(size, size, seed), "PNG")


def truncated_jpeg() -> bytes:
    data = _encode(_noise(32, 32), "JPEG", quality=95)
    return data[: len(data) // 2]


def truncated_png() -> bytes:
    data = _encode(_noise(32, 32), "PNG")
    return data[: len(data) // 2]


def gray16_png() -> bytes:
    """Mode I;16, left half 1000, right half 60000: far above 255, far below 65535."""
    arr = np.full((32, 32), 1000, dtype=np.uint16)
    arr[:, 16:] = 60000
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    return _encode(img, "PNG")


def cmyk_jpeg() -> bytes:
    return _encode(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def rgba_png() -> bytes:
    return _encode(Image.new("RGBA", (24, 16), (10, 200, 30, 128)), "PNG")


def _palette_image() -> Image.Image:
    """16x12, index 0 red (right), 1 green (left half), 2 blue (top-left 4x4)."""
    img = Image.new("P", (16, 12), 0)
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.paste(1, (0, 0, 8, 12))
    img.paste(2, (0, 0, 4, 4))
    return img


def palette_gif(transparency: int | None = None) -> bytes:
    kw = {} if transparency is None else {"transparency": transparency}
    return _encode(_palette_image(), "GIF", **kw)


def palette_png_bytes_transparency() -> bytes:
    # Per-index alpha in a tRNS chunk: the case PIL warns about when converted straight to RGB.
    return _encode(_palette_image(), "PNG", transparency=b"\x00\x80\xff")


def exif_rotated_jpeg(w: int = 40, h: int = 20, orientation: int = 6) -> bytes:
    """Stored w x h, left half red, right half blue, with an EXIF orientation tag."""
    img = Image.new("RGB", (w, h), (255, 0, 0))
    img.paste((0, 0, 255), (w // 2, 0, w, h))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return _encode(img, "JPEG", quality=95, exif=exif.tobytes())


def big_png(side: int) -> bytes:
    return _encode(Image.new("RGB", (side, side), (1, 2, 3)), "PNG")


def _write(path: Path | bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _non_utf8_names_supported(folder: Path) -> bool:
    probe = os.path.join(os.fsencode(folder), b"probe-\xe9")
    try:
        _write(probe, b"")
        os.remove(probe)
        return True
    except OSError:  # e.g. macOS APFS rejects names that are not valid UTF-8
        return False


NON_UTF8 = b"caf\xe9.jpg"  # Latin-1 e-acute: not valid UTF-8

#: Files that convert: name -> bytes.
CONVERTIBLE = {
    "cmyk.jpg": cmyk_jpeg,
    "exif6.jpg": exif_rotated_jpeg,
    "gray16.png": gray16_png,
    "gray8.png": lambda: _encode(Image.new("L", (24, 24), 77), "PNG"),
    "palette.gif": palette_gif,
    "palette_t.gif": lambda: palette_gif(transparency=0),
    "palette_t.png": palette_png_bytes_transparency,
    "rgba.png": rgba_png,
}
#: Files that are skipped: name -> (bytes, reason as a regex).
#: The corpus lowers PIL.Image.MAX_IMAGE_PIXELS to 1500: 64x64 is past 2x the limit
#: (DecompressionBombError), 48x48 between 1x and 2x (DecompressionBombWarning, made an error).
BAD = {
    "bomb.png": (lambda: big_png(64), re.escape(BOMB + "Image size (4096 pixels) exceeds limit of 3000") + ".*"),
    "bomb_warn.png": (lambda: big_png(48), re.escape(BOMB + "Image size (2304 pixels) exceeds limit of 1500") + ".*"),
    "empty.jpg": (lambda: b"", re.escape("empty file")),
    "text.jpg": (lambda: b"this is a text file, not a JPEG\n", re.escape(NOT_IMAGE)),
    "truncated.jpg": (truncated_jpeg, re.escape(TRUNCATED) + ".*truncated.*"),
}
CORPUS_PIXEL_LIMIT = 1500


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """ROOT/train/{bad,convert,good}, ROOT/val/{bad,good}, a symlink loop, a non-UTF-8 name."""
    root = tmp_path_factory.mktemp("corpus") / "photos"
    for d in ("train/bad", "train/convert/sub", "train/good", "val/bad", "val/good"):
        (root / d).mkdir(parents=True)
    for name, make in CONVERTIBLE.items():
        _write(root / "train" / "convert" / name, make())
    for name, (make, _) in BAD.items():
        _write(root / "train" / "bad" / name, make())
    for i, ext in enumerate(("png", "jpg", "bmp")):
        _noise(24, 24, seed=i).save(root / "train" / "good" / f"g{i}.{ext}")
    (root / "train" / "convert" / "notes.txt").write_text("not listed")
    (root / "train" / "convert" / "sub" / "loop").symlink_to("..", target_is_directory=True)
    non_utf8 = _non_utf8_names_supported(root)
    if non_utf8:
        _write(os.path.join(os.fsencode(root / "train" / "convert"), NON_UTF8), _encode(_noise(20, 20, 7), "JPEG"))
    for i in range(2):
        _write(root / "val" / "good" / f"v{i}.png", good_png(seed=10 + i))
    _write(root / "val" / "bad" / "empty.jpg", b"")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "MAX_IMAGE_PIXELS", CORPUS_PIXEL_LIMIT)
        result = extract(root, cache_dir=str(tmp_path_factory.mktemp("cache")), **FAST)
    return {"root": root, "result": result, "non_utf8": non_utf8}


def _expected_train_ids(non_utf8: bool) -> list[str]:
    convert = sorted(CONVERTIBLE, key=str.encode)
    if non_utf8:
        convert = ["caf\\xe9.jpg", *convert]
    return [f"train/convert/{n}" for n in convert] + ["train/good/g0.png", "train/good/g1.jpg", "train/good/g2.bmp"]


def _expected_failures() -> list[tuple[str, str, str]]:
    return [("train", f"train/bad/{n}", pattern) for n, (_, pattern) in BAD.items()] + [
        ("val", "val/bad/empty.jpg", "empty file")]


def _assert_failures_match(failures: list[dict]) -> None:
    expected = _expected_failures()
    assert [(f["split"], f["id"]) for f in failures] == [(s, i) for s, i, _ in expected]
    for f, (_, _, pattern) in zip(failures, expected):
        assert re.fullmatch(pattern, f["reason"]), (f["id"], f["reason"])


# --- converted: decode returns RGB of the right size ----------------------------------------

@pytest.mark.parametrize("name", sorted(CONVERTIBLE))
def test_convertible_files_decode_to_rgb(name):
    data = CONVERTIBLE[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning (palette transparency etc.) leaks out
        img = decode(data, PP)
    raw = Image.open(io.BytesIO(data))
    w, h = raw.size
    assert img.mode == "RGB"
    assert img.size == ((h, w) if name.startswith("exif") else (w, h))
    arr = load_image(data, PP32)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.uint8


def test_16bit_png_is_scaled_not_saturated():
    data = gray16_png()
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    arr = np.asarray(decode(data, PP))
    assert arr.shape == (32, 32, 3)
    # 1000 / 65535 * 255 -> 4 and 60000 / 65535 * 255 -> 233: scaled, not clipped at 255.
    assert (arr[:, :16] == 4).all()
    assert (arr[:, 16:] == 233).all()
    assert arr.max() < 255


def test_cmyk_jpeg_colours():
    img = decode(cmyk_jpeg(), PP)
    assert img.mode == "RGB" and img.size == (30, 20)
    np.testing.assert_allclose(np.asarray(img)[10, 15], [255, 0, 0], atol=8)


def test_rgba_png_drops_alpha():
    img = decode(rgba_png(), PP)
    assert img.mode == "RGB" and img.size == (24, 16)
    assert (np.asarray(img) == [10, 200, 30]).all()


@pytest.mark.parametrize("data", [palette_gif(), palette_gif(transparency=0), palette_png_bytes_transparency()],
                         ids=["gif", "gif-transparent", "png-trns-bytes"])
def test_palette_colours(data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = decode(data, PP)
    arr = np.asarray(img)
    assert img.mode == "RGB" and img.size == (16, 12)
    assert arr[0, 0].tolist() == [0, 0, 255]    # index 2
    assert arr[8, 4].tolist() == [0, 255, 0]    # index 1
    assert arr[11, 15].tolist() == [255, 0, 0]  # index 0 (the transparent one keeps its colour)


def test_exif_orientation_6_is_applied():
    data = exif_rotated_jpeg(40, 20, orientation=6)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    img = decode(data, PP)
    assert img.size == (20, 40)
    arr = np.asarray(img).astype(int)
    # 90 degrees clockwise: the stored left (red) half ends on top, the right (blue) half below.
    np.testing.assert_allclose(arr[5, 10], [255, 0, 0], atol=8)
    np.testing.assert_allclose(arr[35, 10], [0, 0, 255], atol=8)
    assert decode(data, Preprocess(exif_transpose=False)).size == (40, 20)


def test_exif_orientation_with_jpeg_draft():
    # 400x200 stored, resize 37: PIL draft decodes at 1/2 scale, then the rotation still applies.
    img = decode(exif_rotated_jpeg(400, 200, orientation=6), PP32)
    w, h = img.size
    assert h == 2 * w and w >= 2 * PP32.resize
    assert img.mode == "RGB"


# --- skipped: decode raises DecodeError with the recorded reason ----------------------------

@pytest.mark.parametrize("data, pattern", [
    (b"", re.escape("empty file")),
    (b"this is a text file, not a JPEG\n", re.escape(NOT_IMAGE)),
    (truncated_jpeg(), re.escape(TRUNCATED) + r"image file is truncated.*"),
    (truncated_png(), re.escape(TRUNCATED) + ".+"),
], ids=["zero-bytes", "text", "truncated-jpeg", "truncated-png"])
def test_undecodable_bytes(data, pattern):
    with pytest.raises(DecodeError) as e:
        decode(data, PP)
    assert re.fullmatch(pattern, str(e.value)), str(e.value)


@pytest.mark.parametrize("side, pixels, limit", [(40, 1600, 1000), (64, 4096, 2000)],
                         ids=["warning-range", "error-range"])
def test_decompression_bomb(monkeypatch, side, pixels, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DecodeError) as e:
        decode(big_png(side), PP)
    assert str(e.value).startswith(f"{BOMB}Image size ({pixels} pixels) exceeds limit of {limit} pixels")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", side * side)
    assert decode(big_png(side), PP).size == (side, side)


# --- the shared extraction: skipped and recorded, good images all cached ---------------------

def test_corpus_extraction_counts(corpus):
    res = corpus["result"]
    n_train = len(_expected_train_ids(corpus["non_utf8"]))
    assert res.splits == {"train": n_train, "val": 2}
    assert res.failed == len(BAD) + 1
    assert res.cache_hit is False
    assert res.computed == n_train + 2 + len(BAD) + 1


def test_corpus_failures_are_reported_with_reasons(corpus):
    _assert_failures_match(corpus["result"].failures)


def test_corpus_good_images_are_all_in_the_cache(corpus):
    with open_cache(corpus["result"].cache) as c:
        assert c.classes == ["bad", "convert", "good"]
        assert c.ids("train") == _expected_train_ids(corpus["non_utf8"])
        assert c.ids("val") == ["val/good/v0.png", "val/good/v1.png"]
        x, y = c.load("train")
        assert x.shape == (len(c.ids("train")), 512)
        assert np.isfinite(x).all()
        assert y.tolist() == [1 if i.startswith("train/convert/") else 2 for i in c.ids("train")]
        xv, yv = c.load("val")
        assert xv.shape == (2, 512) and yv.tolist() == [2, 2]
        # Real features, not placeholders: no empty row, and the three different noise images differ.
        assert (np.abs(x).sum(axis=1) > 0).all()
        ids = c.ids("train")
        noise = [x[ids.index(f"train/good/{n}")].tobytes() for n in ("g0.png", "g1.jpg", "g2.bmp")]
        assert len(set(noise)) == 3


def test_corpus_failures_are_recorded_in_the_cache(corpus):
    with open_cache(corpus["result"].cache) as c:
        failed = c.failed
    _assert_failures_match(failed)
    assert [{k: f[k] for k in ("split", "id", "reason")} for f in failed] == corpus["result"].failures
    sizes = {f["id"]: f["stat"][0] for f in failed}
    assert sizes["train/bad/empty.jpg"] == 0 and sizes["val/bad/empty.jpg"] == 0


def test_corpus_rerun_is_a_cache_hit_with_the_same_failures(corpus):
    res = corpus["result"]
    again = extract(corpus["root"], cache_dir=os.path.dirname(res.cache), **FAST)
    assert again.cache_hit is True and again.cache == res.cache
    assert again.splits == res.splits and again.failed == res.failed
    assert again.failures == res.failures


def test_corpus_cli_info_lists_failures(corpus):
    out = CliRunner().invoke(main, ["info", corpus["result"].cache])
    assert out.exit_code == 0, out.output
    assert f"  failed:     {len(BAD) + 1}\n" in out.output
    for split, id_, _ in _expected_failures():
        assert f"    {split}/{id_}: " in out.output


def test_corpus_symlink_loop_walk_finishes_and_lists_once(corpus):
    with open_cache(corpus["result"].cache) as c:
        ids = c.ids("train") + [f["id"] for f in c.failed]
    assert len(ids) == len(set(ids))
    assert not any("loop" in i or "/sub/" in i for i in ids)


def test_corpus_non_utf8_file_name(corpus):
    if not corpus["non_utf8"]:
        pytest.skip("this file system rejects file names that are not valid UTF-8")
    with open_cache(corpus["result"].cache) as c:
        ids = c.ids("train")
    assert "train/convert/caf\\xe9.jpg" in ids
    for i in ids:
        i.encode("utf-8")  # no lone surrogates
    with h5py.File(corpus["result"].cache, "r") as h:
        raw = h["train/ids"][()]
    assert b"train/convert/caf\\xe9.jpg" in [r if isinstance(r, bytes) else r.encode() for r in raw]
    for r in raw:
        (r if isinstance(r, bytes) else r.encode()).decode("utf-8")


# --- symlink loops, without extraction ------------------------------------------------------

def test_symlink_loops_in_a_class_folder(tmp_path):
    root = tmp_path / "data"
    (root / "cls" / "sub").mkdir(parents=True)
    _write(root / "cls" / "a.png", good_png())
    _write(root / "cls" / "sub" / "b.png", good_png(1))
    (root / "cls" / "sub" / "up").symlink_to("..", target_is_directory=True)      # back to cls
    (root / "cls" / "sub" / "here").symlink_to(".", target_is_directory=True)     # to itself
    (root / "cls" / "self.png").symlink_to("self.png")                             # ELOOP file
    (root / "cls" / "sub" / "deep").symlink_to(root, target_is_directory=True)    # to the root
    src = ImageFolderSource(root)
    assert [r.id for r in src.splits["train"]] == ["cls/a.png", "cls/sub/b.png"]


def test_symlink_loop_into_the_split_is_skipped_recorded_in_the_cache_and_listed(tmp_path):
    """``ln -s .. DATA/train/bees/loop``: train keeps its own images only; the skip is in the
    extraction's result (and --json), in the cache, and in ``featcache info``, also on a cache hit."""
    root = tmp_path / "data"
    for split, n in (("train", 3), ("val", 1)):
        for c, cls in enumerate(("ants", "bees")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                _write(root / split / cls / f"{i}.png", good_png(seed=10 * c + i))
    (root / "train" / "bees" / "loop").symlink_to("..", target_is_directory=True)
    note = {"split": "train", "id": "train/bees/loop",
            "note": "folder skipped: a link to 'train', walked where it is (each real folder is walked once)"}
    res = extract(root, cache_dir=str(tmp_path / "cache"), **FAST)
    assert res.splits == {"train": 6, "val": 2} and res.notes == [note]
    with open_cache(res.cache) as c:
        assert c.notes == [note] and c.info()["notes"] == [note]
        assert not any("loop" in i for i in c.ids("train"))
    out = CliRunner().invoke(main, ["info", res.cache])
    assert "  notes:      1\n    train/train/bees/loop: folder skipped: a link to 'train'" in out.output
    again = CliRunner().invoke(main, ["extract", str(root), "--cache-dir", str(tmp_path / "cache"), "-b",
                                      "resnet18.none", "--input-size", "32", "--batch-size", "4", "--workers", "0"])
    assert again.exit_code == 0, again.output
    assert "cache hit" in again.output
    assert "1 note(s) on the source (recorded in the cache; 'featcache info' lists them):\n    train/train/bees/loop: " \
           "folder skipped" in again.output


# --- a split where every file fails -----------------------------------------------------------

def test_split_where_every_file_fails(tmp_path):
    root = tmp_path / "data"
    (root / "train" / "a").mkdir(parents=True)
    (root / "val" / "a").mkdir(parents=True)
    _write(root / "train" / "a" / "0.png", good_png())
    _write(root / "val" / "a" / "0.png", b"")
    res = extract(root, cache_dir=str(tmp_path / "cache"), **FAST)
    assert res.splits == {"train": 1, "val": 0}
    assert res.failures == [{"split": "val", "id": "val/a/0.png", "reason": "empty file"}]
    with open_cache(res.cache) as c:
        x, y = c.load("val")
        assert x.shape == (0, 512) and y.shape == (0,)
        assert [(f["split"], f["id"]) for f in c.failed] == [("val", "val/a/0.png")]


# --- path-like arguments ------------------------------------------------------------------------

def test_extract_accepts_path_objects(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    _write(root / "a" / "0.png", good_png())
    res = extract(root, cache_dir=tmp_path / "cache", **FAST)
    assert res.splits == {"train": 1}
    assert Path(res.cache).parent == tmp_path / "cache"


# --- CSV manifests: a missing file, an unknown split --------------------------------------------

@pytest.fixture
def manifest_with_missing_file(tmp_path):
    m = tmp_path / "m" / "manifest.csv"
    (m.parent / "img").mkdir(parents=True)
    _write(m.parent / "img" / "a.png", good_png(0))
    _write(m.parent / "img" / "b.png", good_png(1))
    _write(m.parent / "img" / "c.png", good_png(2))
    m.write_text("path,label,split\n"
                 "img/a.png,cat,train\n"
                 "img/missing.png,cat,train\n"
                 "img/b.png,dog,train\n"
                 "img/c.png,dog,val\n")
    return m


def test_csv_missing_file_is_recorded(manifest_with_missing_file, tmp_path):
    res = extract(manifest_with_missing_file, cache_dir=str(tmp_path / "cache"), **FAST)
    assert res.splits == {"train": 2, "val": 1}
    assert res.failures == [{"split": "train", "id": "img/missing.png",
                             "reason": "cannot read file: No such file or directory"}]
    with open_cache(res.cache) as c:
        assert c.ids("train") == ["img/a.png", "img/b.png"]
        assert c.ids("val") == ["img/c.png"]
        assert c.labels("train").tolist() == [0, 1]
        assert [(f["split"], f["id"], f["reason"]) for f in c.failed] == [
            ("train", "img/missing.png", "cannot read file: No such file or directory")]


def test_csv_missing_file_with_on_error_fail(manifest_with_missing_file, tmp_path):
    missing = manifest_with_missing_file.parent / "img" / "missing.png"
    with pytest.raises(SourceError) as e:
        extract(manifest_with_missing_file, cache_dir=str(tmp_path / "cache"), on_error="fail", **FAST)
    assert str(e.value) == f"Cannot use '{missing}': cannot read file: No such file or directory. {FAIL_HINT}"
    assert list((tmp_path / "cache").glob("*.h5")) == []


def test_csv_unknown_split(tmp_path):
    m = tmp_path / "manifest.csv"
    m.write_text("path,label,split\na.png,cat,train\nb.png,dog,dev\n")
    with pytest.raises(SourceError) as e:
        extract(m, cache_dir=str(tmp_path / "cache"), **FAST)
    assert str(e.value) == f"CSV manifest '{m}' line 3: split 'dev' is not one of train, val, test."
    out = CliRunner().invoke(main, ["extract", str(m), "--backbone", "resnet18.none", "--cache-dir",
                                    str(tmp_path / "cache")])
    assert out.exit_code == 1
    assert out.output == f"Error: CSV manifest '{m}' line 3: split 'dev' is not one of train, val, test.\n"


# --- on_error="fail": a SourceError naming the file -----------------------------------------------

@pytest.mark.parametrize("name, make, reason", [
    ("empty.jpg", lambda: b"", re.escape("empty file")),
    ("text.jpg", lambda: b"plain text", re.escape(NOT_IMAGE)),
    ("truncated.jpg", truncated_jpeg, re.escape(TRUNCATED) + ".*"),
    ("bomb.png", lambda: big_png(64), re.escape(BOMB) + ".*"),
], ids=["empty", "text", "truncated", "bomb"])
def test_on_error_fail_names_the_file(tmp_path, monkeypatch, name, make, reason):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", CORPUS_PIXEL_LIMIT)
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    _write(root / "a" / "0.png", good_png())
    _write(root / "a" / name, make())
    with pytest.raises(SourceError) as e:
        extract(root, cache_dir=str(tmp_path / "cache"), on_error="fail", **FAST)
    bad = root / "a" / name
    assert re.fullmatch(f"Cannot use '{re.escape(str(bad))}': {reason}\\. {re.escape(FAIL_HINT)}", str(e.value)), \
        str(e.value)
    assert list((tmp_path / "cache").glob("*.h5")) == []


@pytest.fixture
def folder_with_bad_first(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    _write(root / "a" / "0_bad.jpg", b"this is not a JPEG")
    _write(root / "a" / "1.png", good_png(1))
    _write(root / "b" / "0.png", good_png(2))
    return root


def test_cli_on_error_fail(folder_with_bad_first, tmp_path):
    root = folder_with_bad_first
    # Default --workers: decoding runs in worker processes, the error still reaches the CLI.
    out = CliRunner().invoke(main, ["extract", str(root), "--backbone", "resnet18.none", "--input-size", "32",
                                    "--cache-dir", str(tmp_path / "cache"), "--on-error", "fail"])
    assert out.exit_code == 1
    assert out.output.startswith("Error: ")
    assert out.output == f"Error: Cannot use '{root / 'a' / '0_bad.jpg'}': {NOT_IMAGE}. {FAIL_HINT}\n"
    assert "Traceback" not in out.output


def test_cli_on_error_skip_lists_skipped_files(folder_with_bad_first, tmp_path):
    out = CliRunner().invoke(main, ["extract", str(folder_with_bad_first), "--backbone", "resnet18.none",
                                    "--input-size", "32", "--cache-dir", str(tmp_path / "cache"),
                                    "--workers", "0", "--quiet"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[2] == "  splits: train 2"
    assert lines[3] == ("  skipped 1 unreadable file(s) (recorded in the cache; 'featcache info' lists them):")
    assert lines[4] == f"    train/a/0_bad.jpg: {NOT_IMAGE}"


# --- bugs -----------------------------------------------------------------------------------------

def test_on_error_fail_after_a_skip_run(folder_with_bad_first, tmp_path):
    cache = str(tmp_path / "cache")
    first = extract(folder_with_bad_first, cache_dir=cache, on_error="skip", **FAST)
    assert first.failed == 1
    with pytest.raises(SourceError):
        extract(folder_with_bad_first, cache_dir=cache, on_error="fail", **FAST)


def test_on_error_fail_message_with_non_utf8_name(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    if not _non_utf8_names_supported(root):
        pytest.skip("this file system rejects file names that are not valid UTF-8")
    _write(root / "a" / "0.png", good_png())
    _write(os.path.join(os.fsencode(root / "a"), b"z\xff.jpg"), b"not an image")
    with pytest.raises(SourceError) as e:
        extract(root, cache_dir=str(tmp_path / "cache"), on_error="fail", **FAST)
    msg = str(e.value)
    msg.encode("utf-8")
    assert "z\\xff.jpg" in msg


def test_non_utf8_class_folder_name(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    if not _non_utf8_names_supported(root):
        pytest.skip("this file system rejects file names that are not valid UTF-8")
    cls = os.path.join(os.fsencode(root), b"caf\xe9")
    os.mkdir(cls)
    _write(os.path.join(cls, b"0.png"), good_png())
    src = ImageFolderSource(root)
    assert [r.id for r in src.splits["train"]] == ["caf\\xe9/0.png"]
    for c in src.classes:
        c.encode("utf-8")
    assert src.classes == ["caf\\xe9"]
