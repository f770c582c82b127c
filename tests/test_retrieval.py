"""Features out (issue 23): export-features (npy and parquet layouts, read back with pyarrow + numpy
and with embedding-reader), index, search and leaks, library and CLI."""

from __future__ import annotations

import io
import json
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from featcache import extract, fit_head, open_cache
from featcache.cli import main
from featcache.errors import BackboneError, ConfigError
from featcache.exports import MANIFEST, export_features, read_manifest
from featcache.exports import writer as export_writer
from featcache.retrieval import build_index, choose_index_factory, find_leaks, load_index, search
from featcache.retrieval.leaks import DEFAULT_THRESHOLD, near_pairs, normalised
from featcache.store.cache import FeatureCache

from conftest import make_image_folder

THUMB = dict(backbone="toy_models:thumbnail", input_size=32, num_workers=0, dtype="float32", precision="fp32",
             device="cpu")


def _pattern(rng) -> Image.Image:
    """A random blocky colour pattern (4 x 4 blocks, 48 px): every image differs from the others."""
    grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(grid, np.ones((12, 12, 1), np.uint8)))


def _jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def patterns(tmp_path_factory):
    """train: 3 classes x 4 patterns; val: 4 new patterns, 2 train images re-encoded at quality 70 under
    other names and 1 byte-identical copy; test: 3 new patterns. Returns (root, {val copy: train id})."""
    root = tmp_path_factory.mktemp("patterns") / "imgs"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 1), ("test", 1)):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                (root / split / c / f"{c}{i}.jpg").write_bytes(_jpeg(_pattern(rng), 95))
    (root / "val" / "a" / "a9.jpg").write_bytes(_jpeg(_pattern(rng), 95))
    copies = {}
    for name, src in (("copy1.jpg", "train/a/a1.jpg"), ("copy2.jpg", "train/b/b2.jpg")):
        (root / "val" / src.split("/")[1] / name).write_bytes(_jpeg(Image.open(root / src).convert("RGB"), 70))
        copies[f"val/{src.split('/')[1]}/{name}"] = src
    shutil.copyfile(root / "train/c/c0.jpg", root / "val/c/same.jpg")
    copies["val/c/same.jpg"] = "train/c/c0.jpg"
    return root, copies


@pytest.fixture(scope="module")
def pattern_cache(patterns, tmp_path_factory):
    return extract(str(patterns[0]), cache_dir=str(tmp_path_factory.mktemp("pc")), **THUMB).cache


@pytest.fixture(scope="module")
def folder_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    folder = make_image_folder(root / "imgs", classes=("a", "b", "c"), per_class=3, splits=("train", "val"))
    return extract(str(folder), backbone="resnet18.none", input_size=32, num_workers=0, cache_dir=str(root / "c"),
                   dtype="float32", device="cpu").cache


def _cache_rows(cache, split):
    with open_cache(cache) as c:
        x, y = c.load(split)
        return x, y, c.ids(split), c.classes, c.fingerprint["source"]["spec"]


# --- export ---------------------------------------------------------------------------------------

def test_export_npy_reads_back_equal_with_numpy_and_embedding_reader(folder_cache, tmp_path):
    from embedding_reader import EmbeddingReader

    rep = export_features(folder_cache, tmp_path / "out", part_rows=4)
    assert rep["splits"]["train"] == {"rows": 9, "parts": 3, "kept": 0, "dim": 512, "dtype": "float32",
                                      "dir": str(tmp_path / "out" / "train")}
    for split in ("train", "val"):
        x, y, ids, classes, spec = _cache_rows(folder_cache, split)
        d = tmp_path / "out" / split
        emb = sorted((d / "embeddings").glob("*.npy"))
        assert [p.name for p in emb] == ["0000.npy", "0001.npy", "0002.npy"]
        got = np.concatenate([np.load(p, allow_pickle=False) for p in emb])
        np.testing.assert_array_equal(got, x)
        meta = [pq.read_table(p).to_pydict() for p in sorted((d / "metadata").glob("*.parquet"))]
        assert [i for m in meta for i in m["id"]] == ids
        assert [v for m in meta for v in m["label"]] == y.tolist()
        assert [v for m in meta for v in m["class"]] == [classes[v] for v in y]
        assert {v for m in meta for v in m["split"]} == {split}
        assert [v for m in meta for v in m["path"]] == [f"{spec}/{i}" for i in ids]
        assert [v for m in meta for v in m["row"]] == list(range(len(ids)))
        assert read_manifest(d)["complete"] is True
        reader = EmbeddingReader(str(d / "embeddings"), file_format="parquet_npy", metadata_folder=str(d / "metadata"),
                                 meta_columns=["id", "label"])
        assert reader.count == len(ids) and reader.dimension == 512
        batches = list(reader(batch_size=5, show_progress=False))
        np.testing.assert_array_equal(np.concatenate([b for b, _ in batches]), x)
        assert [i for _, m in batches for i in m["id"]] == ids
        assert [v for _, m in batches for v in m["label"]] == y.tolist()


def test_export_parquet_float16_reads_back_equal(folder_cache, tmp_path):
    from embedding_reader import EmbeddingReader

    export_features(folder_cache, tmp_path / "out", splits=["val"], format="parquet", dtype="float16", part_rows=5)
    assert not (tmp_path / "out" / "train").exists()
    x, y, ids, _, _ = _cache_rows(folder_cache, "val")
    files = sorted((tmp_path / "out" / "val" / "embeddings").glob("*.parquet"))
    assert [p.name for p in files] == ["0000.parquet", "0001.parquet"]
    tables = [pq.read_table(p) for p in files]
    assert tables[0].schema.field("embedding").type.list_size == 512
    got = np.concatenate([np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in tables])
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, x.astype(np.float16))
    assert [i for t in tables for i in t.column("id").to_pylist()] == ids
    reader = EmbeddingReader(str(tmp_path / "out" / "val" / "embeddings"), file_format="parquet",
                             embedding_column="embedding", meta_columns=["id", "label"])
    batches = list(reader(batch_size=9, show_progress=False))
    np.testing.assert_array_equal(np.concatenate([b for b, _ in batches]), x.astype(np.float16).astype(np.float32))
    assert [v for _, m in batches for v in m["label"]] == y.tolist()


def test_export_rerun_keeps_parts_and_other_settings_replace_them(folder_cache, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = []
    real = export_writer.FORMATS.get("npy").write_part

    def failing(self, split_dir, part):  # the second part of train fails: an interrupted export
        calls.append(part.name)
        if split_dir.name == "train" and part.name == "0001":
            raise OSError("disk full")
        return real(self, split_dir, part)

    monkeypatch.setattr(export_writer.FORMATS.get("npy"), "write_part", failing)
    with pytest.raises(OSError):
        export_features(folder_cache, out, part_rows=4)
    with pytest.raises(Exception, match="is unfinished. Run the same 'featcache export-features' command again"):
        read_manifest(out / "train")
    calls.clear()
    monkeypatch.setattr(export_writer.FORMATS.get("npy"), "write_part", real)
    first = (out / "train" / "embeddings" / "0000.npy").stat().st_mtime_ns
    rep = export_features(folder_cache, out, part_rows=4)
    assert rep["splits"]["train"]["kept"] == 1  # part 0000 survived the failure and is kept
    assert (out / "train" / "embeddings" / "0000.npy").stat().st_mtime_ns == first
    assert export_features(folder_cache, out, part_rows=4)["splits"]["val"]["kept"] == 3
    # Other part size: the old parts go, none is left over beyond the new count.
    export_features(folder_cache, out, part_rows=8)
    assert sorted(p.name for p in (out / "train" / "embeddings").iterdir()) == ["0000.npy", "0001.npy"]
    assert sorted(p.name for p in (out / "train" / "metadata").iterdir()) == ["0000.parquet", "0001.parquet"]
    # Other format: the npy layout's files go.
    export_features(folder_cache, out, format="parquet", part_rows=8)
    assert not (out / "train" / "metadata").exists()
    assert sorted(p.name for p in (out / "train" / "embeddings").iterdir()) == ["0000.parquet", "0001.parquet"]
    assert json.loads((out / "train" / MANIFEST).read_text())["layout"] == "parquet"


def test_export_streams_bounded_blocks(folder_cache, tmp_path, monkeypatch):
    spans = []
    rows = FeatureCache.rows

    def spy(self, split, start, stop, layer=None):
        spans.append(stop - start)
        return rows(self, split, start, stop, layer)

    def no_load(*a, **k):
        raise AssertionError("export read a whole split")

    monkeypatch.setattr(FeatureCache, "rows", spy)
    monkeypatch.setattr(FeatureCache, "load", no_load)
    monkeypatch.setattr(export_writer, "BLOCK_BYTES", 2 * 512 * 4)  # two rows of 512 float32
    export_features(folder_cache, tmp_path / "out", part_rows=5)
    assert max(spans) == 2 and sum(spans) == 18
    monkeypatch.undo()
    x, _, _, _, _ = _cache_rows(folder_cache, "train")
    got = np.concatenate([np.load(p) for p in sorted((tmp_path / "out/train/embeddings").glob("*.npy"))])
    np.testing.assert_array_equal(got, x)


def test_export_errors(folder_cache, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"^The 'format' option must be one of npy, parquet. Got 'csv'.$"):
        export_features(folder_cache, tmp_path / "o", format="csv")
    r = CliRunner().invoke(main, ["export-features", folder_cache, "-o", str(tmp_path / "o"), "--format", "csv"])
    assert r.exit_code == 1
    assert r.output.strip().endswith("Error: The --format option must be one of npy, parquet. Got 'csv'.")
    r = CliRunner().invoke(main, ["export-features", folder_cache, "-o", str(tmp_path / "o"), "--split", "nope"])
    assert r.exit_code == 1 and "Error: Split 'nope' is not in cache" in r.output
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ConfigError, match=r"Exporting features needs the 'pyarrow' package, which is not installed. "
                                          r"Install it with: pip install 'featcache\[export\]'."):
        export_features(folder_cache, tmp_path / "o")


def test_export_cli(folder_cache, tmp_path):
    r = CliRunner().invoke(main, ["export-features", folder_cache, "-o", str(tmp_path / "o"), "--part-rows", "4",
                                  "--dtype", "float16", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["splits"]["val"]["parts"] == 3 and d["dtype"] == "float16" and d["format"] == "npy"
    assert np.load(tmp_path / "o/val/embeddings/0000.npy").dtype == np.float16


# --- index and search -----------------------------------------------------------------------------

def test_size_rule():
    assert choose_index_factory(1_000_000, 768) == "Flat"
    assert choose_index_factory(1_000_001, 768) == "IVF4096_HNSW32,SQ8"
    assert choose_index_factory(50_000_000, 768) == "IVF32768_HNSW32,SQ8"
    assert choose_index_factory(200_000_000, 768) == "IVF65536_HNSW32,PQ64x8"
    assert choose_index_factory(5000, 10, exact_max_rows=100) == "IVF128_HNSW32,SQ8"


def test_search_finds_itself_and_reencoded_copies(patterns, pattern_cache, tmp_path):
    root, copies = patterns
    meta = build_index(pattern_cache, tmp_path / "ix")
    assert (meta["index_factory"], meta["metric"], meta["n"], meta["exact"]) == ("Flat", "cosine", 12, True)
    with open_cache(pattern_cache) as c:
        assert meta["fingerprint_hash"] == c.text_attr("fingerprint_hash")
    res = search(tmp_path / "ix", root / "train", k=3, device="cpu")
    assert len(res) == 12
    for r in res:
        top = r["neighbors"][0]
        assert r["query"].endswith(top["id"]) and top["score"] >= 0.999
        assert top["class"] == top["id"].split("/")[1] and top["split"] == "train"
    res = search(tmp_path / "ix", [str(root / c) for c in copies], k=3, device="cpu")
    for r, want in zip(res, copies.values()):
        assert want in [h["id"] for h in r["neighbors"]]
    by_id = search(tmp_path / "ix", list(copies), by_id=True, k=1)
    assert [r["neighbors"][0]["id"] for r in by_id] == list(copies.values())


def test_search_takes_a_source_spec(patterns, pattern_cache, tmp_path):
    root, _ = patterns
    (tmp_path / "q.csv").write_text(f"path,label\n{root}/test/a/a0.jpg,a\n{root}/test/b/b0.jpg,b\n")
    build_index(pattern_cache, tmp_path / "ix", split="test")
    res = search(tmp_path / "ix", tmp_path / "q.csv", k=1, device="cpu")
    assert [(r["query"], r["neighbors"][0]["id"]) for r in res] == [
        (f"{root}/test/a/a0.jpg", "test/a/a0.jpg"), (f"{root}/test/b/b0.jpg", "test/b/b0.jpg")]
    assert res[0]["neighbors"][0]["score"] >= 0.999


def test_search_refuses_other_preprocessing(patterns, pattern_cache, tmp_path):
    build_index(pattern_cache, tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    meta["fingerprint"]["preprocess"]["mean"] = [0.0, 0.0, 0.0]
    (tmp_path / "ix" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(BackboneError, match=r"^The query images were embedded with another preprocessing than the "
                                            r"index \(preprocess: .*Pass the weights file"):
        search(tmp_path / "ix", patterns[0] / "test", device="cpu")
    with pytest.raises(ConfigError, match=r"^Id 'nope.jpg' is not in cache"):
        search(tmp_path / "ix", ["nope.jpg"], by_id=True)


def test_approximate_index_and_l2(pattern_cache, tmp_path):
    meta = build_index(pattern_cache, tmp_path / "ix", split="all", exact_max_rows=0)
    assert (meta["index_factory"], meta["n"], meta["search_params"]) == ("IVF1_HNSW32,SQ8", 22, "nprobe=1,efSearch=128")
    ix = load_index(tmp_path / "ix")
    x = open_cache(pattern_cache).load("test")[0]
    _, pos = ix.search(x, 1)
    assert [ix.ids[p] for p in pos[:, 0]] == open_cache(pattern_cache).ids("test")
    build_index(pattern_cache, tmp_path / "l2", metric="l2", split="test")
    r = search(tmp_path / "l2", ["test/a/a0.jpg"], by_id=True, k=2)[0]["neighbors"]
    assert r[0]["id"] == "test/a/a0.jpg" and r[0]["score"] == pytest.approx(0, abs=1e-4) and r[1]["score"] > 0.1
    with pytest.raises(ConfigError, match=r"^The 'index_factory' option 'Bogus12' is not a FAISS factory string"):
        build_index(pattern_cache, tmp_path / "bad", index_factory="Bogus12")


def test_index_and_search_cli(pattern_cache, patterns, tmp_path, monkeypatch):
    r = CliRunner().invoke(main, ["index", pattern_cache, "-o", str(tmp_path / "ix"), "-q"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"{tmp_path / 'ix'}: 12 rows x 48 (pre_logits), Flat cosine (exact)")
    r = CliRunner().invoke(main, ["search", str(tmp_path / "ix"), "train/a/a1.jpg", "-k", "2", "--ids", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d[0]["query"] == "train/a/a1.jpg" and d[0]["neighbors"][0]["id"] == "train/a/a1.jpg"
    assert set(d[0]["neighbors"][0]) == {"rank", "id", "split", "label", "class", "score"}
    r = CliRunner().invoke(main, ["search", str(tmp_path / "nope"), "x.jpg"])
    assert r.exit_code == 1
    assert f"Error: '{tmp_path / 'nope'}' is not a finished featcache index (no readable index.json)" in r.output
    monkeypatch.setitem(sys.modules, "faiss", None)
    r = CliRunner().invoke(main, ["index", pattern_cache, "-o", str(tmp_path / "ix2"), "--json"])
    assert r.exit_code == 1
    assert json.loads(r.output.splitlines()[0])["error"] == (
        "Building an index needs the 'faiss' package, which is not installed. Install it with: "
        "pip install 'featcache[index]'.")


# --- leaks ----------------------------------------------------------------------------------------

def test_near_pairs_match_brute_force(monkeypatch):
    import featcache.retrieval.leaks as leaks

    monkeypatch.setattr(leaks, "QUERY_BLOCK", 7)
    monkeypatch.setattr(leaks, "REF_BLOCK", 5)
    rng = np.random.default_rng(0)
    a, b = normalised(rng.normal(size=(30, 4))), normalised(rng.normal(size=(23, 4)))
    got = {(int(i), int(j)) for ii, jj, _ in near_pairs(a, b, 0.8) for i, j in zip(ii, jj)}
    assert got == {(int(i), int(j)) for i, j in zip(*np.nonzero(a @ b.T > 0.8))} and got
    got = {(int(i), int(j)) for ii, jj, _ in near_pairs(a, a, 0.8, upper=True) for i, j in zip(ii, jj)}
    s = a @ a.T
    assert got == {(i, j) for i, j in zip(*np.nonzero(s > 0.8)) if j > i} and got


def test_leaks_reports_injected_copies(pattern_cache, patterns):
    _, copies = patterns
    rep = find_leaks(pattern_cache)
    assert rep.threshold == DEFAULT_THRESHOLD
    assert [[(r["split"], r["id"]) for r in g["rows"]] for g in rep.exact] == [
        [("train", "train/c/c0.jpg"), ("val", "val/c/same.jpg")]]
    assert {(p["a"]["id"], p["b"]["id"]) for p in rep.near} == {
        (k, v) for k, v in copies.items() if k != "val/c/same.jpg"}
    assert all(p["cosine"] > DEFAULT_THRESHOLD for p in rep.near)
    assert rep.summary == {"val/train": {"exact_rows": 1, "near_rows": 2, "rows": 3, "exact_pairs": 1,
                                         "near_pairs": 2}}
    assert find_leaks(pattern_cache, threshold=1.0).near == []


def test_threshold_adapts_to_a_crowded_feature_space(folder_cache, tmp_path):
    """Random resnet18 features: every image is close to every other (median nearest neighbour above
    0.99); the default threshold rises above it instead of flagging every val row."""
    from featcache.retrieval.leaks import auto_threshold, median_nn_cosine

    basis = np.eye(5, dtype=np.float32)
    hashes = np.array([b"a", b"b", b"c", b"d", b"a"], dtype="S32")
    assert median_nn_cosine(np.vstack([basis[:4], basis[:1]]), hashes) == 0.0  # exact copies are not neighbours
    assert auto_threshold(basis, np.array([b"%d" % i for i in range(5)], dtype="S32")) == DEFAULT_THRESHOLD
    with open_cache(folder_cache) as c:
        med = median_nn_cosine(normalised(c.load("train")[0]), c.hashes("train"))
    assert med > 0.99
    rep = find_leaks(folder_cache)
    assert rep.threshold == round((1 + med) / 2, 4) > DEFAULT_THRESHOLD
    assert rep.near_pairs < find_leaks(folder_cache, threshold=DEFAULT_THRESHOLD).near_pairs
    res = fit_head(folder_cache, head="ncm", output=str(tmp_path / "run"))
    assert res.metrics["val"]["near_duplicates_in_train"] < 9


def test_leaks_cli(pattern_cache):
    r = CliRunner().invoke(main, ["leaks", pattern_cache])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[1].split() == ["splits", "rows", "exact", "rows", "near", "rows", "exact", "pairs", "near", "pairs"]
    assert lines[2].split() == ["val/train", "3", "1", "2", "1", "2"]
    assert "exact  train/train/c/c0.jpg  ==  val/val/c/same.jpg" in lines
    r = CliRunner().invoke(main, ["leaks", pattern_cache, "--json", "--threshold", "0.99"])
    assert json.loads(r.output)["threshold"] == 0.99
    r = CliRunner().invoke(main, ["leaks", pattern_cache, "--threshold", "1.5"])
    assert r.exit_code == 1
    assert r.output.strip().endswith("Error: The --threshold option must be a cosine similarity in (0, 1]. Got 1.5.")


def test_fit_head_warns_about_leaks(pattern_cache, tmp_path, caplog):
    res = fit_head(pattern_cache, head="knn", output=str(tmp_path / "run"))
    line = (f"3 of 7 'val' rows have an exact or near copy (cosine > {DEFAULT_THRESHOLD:g}) in 'train': their scores are inflated. "
            f"Run 'featcache leaks {pattern_cache}' to list them.")
    assert line in res.warnings
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["metrics"]["val"]["near_duplicates_in_train"] == 3
    assert m["metrics"]["test"]["near_duplicates_in_train"] == 0
    assert line in m["warnings"]


# --- the knn head on a FAISS index ----------------------------------------------------------------

def _blobs(n, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (3, 16))
    y = rng.integers(0, 3, n)
    return (centres[y] + 0.8 * rng.normal(0, 1, (n, 16))).astype(np.float32), y


def test_knn_head_on_faiss_index_gives_the_exact_answers(monkeypatch):
    import featcache.heads.neighbors as neighbors
    import featcache.retrieval.index as index_mod
    from featcache.heads import make_head

    X, y = _blobs(400)
    Xq, _ = _blobs(50, seed=1)
    torch_proba = make_head("knn", k=10, device="cpu").fit(X, y).predict_proba(Xq)
    torch_sweep = make_head("knn", device="cpu").sweep_proba(X, y, [1, 5, 20], Xq)
    built = []
    real = index_mod.memory_index
    monkeypatch.setattr(index_mod, "memory_index", lambda *a, **k: built.append(1) or real(*a, **k))
    monkeypatch.setattr(neighbors, "KNN_INDEX_ROWS", 100)
    head = make_head("knn", k=10, device="cpu").fit(X, y)
    np.testing.assert_allclose(head.predict_proba(Xq), torch_proba, atol=1e-5)
    head.predict_proba(Xq)
    assert len(built) == 1  # built once per bank
    np.testing.assert_allclose(make_head("knn", device="cpu").sweep_proba(X, y, [1, 5, 20], Xq), torch_sweep, atol=1e-5)
    assert len(built) == 2
    # Above the exact limit: the size rule's approximate index, nearly the same predictions.
    monkeypatch.setattr(index_mod, "EXACT_MAX_ROWS", 0)
    approx = make_head("knn", k=10, device="cpu").fit(X, y)
    agree = np.mean(approx.predict(Xq) == make_head("knn", k=10, device="cpu").fit(X, y).predict(Xq))
    assert type(approx._index_cache[1]).__name__ == "IndexIVFScalarQuantizer" and agree == 1.0
    monkeypatch.setitem(sys.modules, "faiss", None)  # without faiss: the torch search, same answers
    np.testing.assert_allclose(make_head("knn", k=10, device="cpu").fit(X, y).predict_proba(Xq), torch_proba,
                               atol=1e-5)


# --- on the real images ---------------------------------------------------------------------------

@pytest.mark.real
@pytest.mark.slow
def test_real_copies_found_by_search_leaks_and_fit_head(real_data, lite0_available, tmp_path):
    """The hymenoptera images with every 8th train image re-encoded at JPEG quality 70 into val under
    another name (efficientnet_lite0, fp32)."""
    root = tmp_path / "imgs"
    shutil.copytree(real_data, root)
    copies = {}
    for i, f in enumerate(sorted((root / "train").rglob("*.jpg"))[::8]):
        dest = root / "val" / f.parent.name / f"reencoded{i:03d}.jpg"
        dest.write_bytes(_jpeg(Image.open(f).convert("RGB"), 70))
        copies[str(dest.relative_to(root))] = str(f.relative_to(root))
    cache = extract(str(root), backbone="efficientnet_lite0", cache_dir=str(tmp_path / "c"), dtype="float32",
                    precision="fp32", device="cpu").cache
    build_index(cache, tmp_path / "ix")
    own = search(tmp_path / "ix", root / "train", k=3, device="cpu")
    assert all(r["query"].endswith(r["neighbors"][0]["id"]) and r["neighbors"][0]["score"] >= 0.999 for r in own)
    found = search(tmp_path / "ix", [root / c for c in copies], k=3, device="cpu")
    assert all(want in [h["id"] for h in r["neighbors"]] for r, want in zip(found, copies.values()))
    rep = find_leaks(cache)
    assert {(k, v) for k, v in copies.items()} <= {(p["a"]["id"], p["b"]["id"]) for p in rep.near}
    res = fit_head(cache, head="logreg", output=str(tmp_path / "run"))
    assert any(w.startswith(f"{len(copies)} of ") and "'val' rows have an exact or near copy" in w
               for w in res.warnings), res.warnings


def test_export_rerun_after_the_cache_changed_rewrites_every_part(folder_cache, tmp_path):
    import os

    cache = tmp_path / "copy.h5"
    shutil.copyfile(folder_cache, cache)
    export_features(cache, tmp_path / "out", splits=["val"], part_rows=4)
    st = os.stat(cache)
    os.utime(cache, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a re-extraction replaces the file
    assert export_features(cache, tmp_path / "out", splits=["val"], part_rows=4)["splits"]["val"]["kept"] == 0


def test_a_part_keeps_no_vectors_of_the_blocks_it_wrote():
    from featcache.exports.base import Block

    b = Block(np.ones((1000, 8), np.float32), np.zeros(1000, np.int64), ["x"] * 1000, 0).without_vectors()
    assert b.vectors.shape == (0, 8) and b.vectors.base is None
