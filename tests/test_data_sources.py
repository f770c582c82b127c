"""Data where it lives (issue 22): webdataset shards (local and over HTTP), parquet and saved Hugging
Face data sets give the features, labels and class names of the same images in a folder; their
identity, resume, faults and ids."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_image_folder
from data_kinds import FlakyServer, add_member, fetch_env, write_hf, write_parquet, write_wds
from featcache import extract, open_cache
from featcache.cli import main
from featcache.errors import ExtractionInterrupted, SourceError
from featcache.sources import HfSource, ParquetSource, WdsSource, check_source_spec, open_source


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "imgs", per_class=5)


def _content(result) -> dict:
    with open_cache(result.cache) as c:
        return {"classes": c.classes,
                **{s: (c.labels(s).tolist(), c.features(s)[()], [h for h in c.hashes(s)]) for s in c.splits}}


def _same(a: dict, b: dict) -> None:
    assert a["classes"] == b["classes"]
    assert set(a) == set(b)
    for split in set(a) - {"classes"}:
        assert a[split][0] == b[split][0]  # labels, in the same order
        assert a[split][2] == b[split][2]  # the same image bytes
        assert np.array_equal(a[split][1], b[split][1])  # bit-identical features


@pytest.mark.parametrize("kind", ["wds", "parquet", "hf", "http"])
def test_each_kind_gives_the_features_labels_and_class_names_of_the_folder(kind, folder, tmp_path, tiny, monkeypatch):
    # A batch never spans two tar shards or row groups (a share of whole units computes a whole run's batches):
    # with units of 5 and batches of 5 the batches are the folder's, and so are the features, bit for bit.
    tiny = {**tiny, "batch_size": 5}
    ref = _content(extract(str(folder), **{**tiny, "cache_dir": str(tmp_path / "ref")}))
    if kind == "wds":
        spec = f"wds:{write_wds(folder, tmp_path / 'shards')}"
    elif kind == "parquet":
        spec = f"parquet:{write_parquet(folder, tmp_path / 'pq', row_group_size=5)}"
    elif kind == "hf":
        spec = f"hf:{write_hf(folder, tmp_path / 'saved')}"
    if kind != "http":
        res = extract(spec, **tiny)
        assert res.failed == 0
        _same(_content(res), ref)
        return
    fetch_env(monkeypatch, tmp_path)
    shards = write_wds(folder, tmp_path / "srv", shards=2)
    with FlakyServer(shards) as srv:
        res = extract(f"wds:{srv.url}/train/shard-{{000..001}}.tar#classes={srv.url}/classes.txt", **tiny)
    assert res.failed == 0
    got = _content(res)
    assert got["classes"] == ref["classes"] and set(got) == {"classes", "train"}
    assert got["train"][0] == ref["train"][0] and np.array_equal(got["train"][1], ref["train"][1])


def test_ids_are_shard_key_for_shards_file_row_for_parquet_split_index_for_hf(folder, tmp_path):
    w = WdsSource(str(write_wds(folder, tmp_path / "s")))
    assert w.splits["train"][0].id == "shard-000/000000_cat_000" and set(w.splits) == {"train", "val"}
    p = ParquetSource(str(write_parquet(folder, tmp_path / "p")))
    assert [r.id for r in p.splits["val"][:2]] == ["part-0/0", "part-0/1"]
    assert p.classes == ["cat", "dog"]
    h = HfSource(str(write_hf(folder, tmp_path / "h")))
    assert [r.id for r in h.splits["val"][:2]] == ["val/0", "val/1"] and h.classes == ["cat", "dog"]
    # the same listing on every open: ids are stable across runs
    assert [r.id for r in WdsSource(str(tmp_path / "s")).splits["train"]] == [r.id for r in w.splits["train"]]


def test_a_file_name_with_dots_is_one_sample_whose_image_and_label_are_found_by_their_last_extension(folder,
                                                                                                      tmp_path, tiny):
    # The benchmark's 'F.pergan.28(f)_q95.jpg' became key '000201_F' with members 'pergan.28(f)_q95.jpg' and
    # 'pergan.28(f)_q95.cls' (webdataset's key ends at the first dot): it was skipped as "no image member".
    for p in sorted((folder / "val" / "dog").iterdir())[:2]:
        p.rename(p.with_name(f"F.pergan.{p.stem}(f){p.suffix}"))
    tiny = {**tiny, "batch_size": 5}  # the batches of 5-sample shards are the folder's
    ref = _content(extract(str(folder), **{**tiny, "cache_dir": str(tmp_path / "ref")}))
    shards = write_wds(folder, tmp_path / "s")
    src = WdsSource(str(shards))
    dotted = [r for r in src.splits["val"] if r.id.endswith("_F")]
    assert len(dotted) == 2 and all(r.label == 1 for r in dotted)
    res = extract(f"wds:{shards}", **tiny)
    assert res.failures == []
    _same(_content(res), ref)
    with tarfile.open(tmp_path / "two.tar", "w") as tf:  # two images of one key: a recorded reason
        for name in ("k.left.jpg", "k.right.jpg", "k.cls"):
            add_member(tf, name, (folder / "train" / "cat" / "cat_000.jpg").read_bytes() if "jpg" in name else b"0")
    (ref2,) = WdsSource(str(tmp_path / "two.tar")).splits["train"]
    assert ref2.label == -1 and "several image members (left.jpg, right.jpg)" in ref2.key[1]
    (one,) = WdsSource(f"{tmp_path / 'two.tar'}#image=left.jpg").splits["train"]
    assert one.label == 0


def test_a_shard_pattern_is_train_and_without_classes_txt_the_classes_are_the_integers(folder, tmp_path):
    write_wds(folder, tmp_path / "s", classes_txt=False)
    src = open_source(f"wds:{tmp_path}/s/val/shard-{{000..001}}.tar")
    assert set(src.splits) == {"train"} and src.classes == ["0", "1"] and len(src.splits["train"]) == 10
    assert len(open_source(f"wds:{tmp_path}/s/val/*.tar").splits["train"]) == 10


def _counting_reads(monkeypatch, cls) -> list:
    reads = []
    original = cls.read

    def read(self, ref):
        reads.append(ref.id)
        return original(self, ref)

    monkeypatch.setattr(cls, "read", read)
    return reads


@pytest.mark.parametrize("kind", ["wds", "parquet", "hf"])
def test_identity_an_unchanged_source_is_a_hit_without_reading_a_sample_and_a_changed_one_is_not(
        kind, folder, tmp_path, tiny, monkeypatch):
    writers = {"wds": write_wds, "parquet": write_parquet, "hf": write_hf}
    cls = {"wds": WdsSource, "parquet": ParquetSource, "hf": HfSource}[kind]
    data = writers[kind](folder, tmp_path / "data")
    first = extract(f"{kind}:{data}", **tiny)
    before = _content(first)
    reads = _counting_reads(monkeypatch, cls)
    again = extract(f"{kind}:{data}", **tiny)
    assert again.cache_hit and reads == []
    # change one image (new content): a new shard / parquet file / saved data set
    from PIL import Image

    Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(folder / "train" / "cat" / "cat_000.jpg")
    shutil.rmtree(data)
    writers[kind](folder, data)
    changed = extract(f"{kind}:{data}", **tiny)
    assert not changed.cache_hit and changed.cache == first.cache
    # only the batch (block) holding the changed image is computed; the rest is reused by content
    assert 0 < changed.computed <= tiny["batch_size"]
    with open_cache(changed.cache) as c:
        assert c.hashes("train")[0] != before["train"][2][0]


@pytest.mark.parametrize("kind", ["wds", "parquet", "hf"])
def test_resume_after_an_interrupt_is_bit_identical_and_computes_only_what_is_missing(kind, folder, tmp_path, tiny):
    writers = {"wds": write_wds, "parquet": write_parquet, "hf": write_hf}
    spec = f"{kind}:{writers[kind](folder, tmp_path / 'data')}"
    ref = extract(spec, **{**tiny, "cache_dir": str(tmp_path / "ref")})
    seen = []

    def stop(done, total):
        seen.append(done)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(ExtractionInterrupted):
        extract(spec, **{**tiny, "checkpoint_every": 0}, progress=stop)
    res = extract(spec, **tiny)
    assert res.reused >= 2 * tiny["batch_size"] and 0 < res.computed == 20 - res.reused
    _same(_content(res), _content(ref))


def test_a_shard_added_later_computes_only_its_samples(folder, tmp_path, tiny):
    shards = write_wds(folder, tmp_path / "s")
    extra = tmp_path / "s" / "train" / "shard-002.tar"
    shutil.move(str(extra.with_name("shard-001.tar")), tmp_path / "later.tar")
    first = extract(f"wds:{shards}", **tiny)
    assert first.splits["train"] == 5
    shutil.move(str(tmp_path / "later.tar"), extra)  # the same samples, as a shard added later
    res = extract(f"wds:{shards}", **tiny)
    # the new samples, and the old ones that share a batch with them (batches stay those of a whole run)
    assert res.splits["train"] == 10 and 5 <= res.computed < 5 + tiny["batch_size"]


def test_faults_in_shards_are_recorded_with_their_reason_and_the_rest_is_extracted(folder, tmp_path, tiny):
    shards = write_wds(folder, tmp_path / "s")
    good = (folder / "train" / "cat" / "cat_000.jpg").read_bytes()
    with tarfile.open(tmp_path / "s" / "train" / "shard-002.tar", "w") as tf:
        add_member(tf, "corrupt.jpg", b"\xff\xd8\xff not a jpeg")
        add_member(tf, "corrupt.cls", b"0")
        add_member(tf, "nolabel.jpg", good)
        add_member(tf, "badlabel.jpg", good)
        add_member(tf, "badlabel.cls", b"cat?")
        add_member(tf, "noimage.cls", b"1")
    whole = (tmp_path / "s" / "train" / "shard-001.tar").read_bytes()
    with tarfile.open(tmp_path / "s" / "train" / "shard-001.tar") as tf:
        members = tf.getmembers()
    image, header = members[-2], members[-1]
    (tmp_path / "s" / "train" / "shard-003.tar").write_bytes(whole[:image.offset_data + image.size // 2])
    (tmp_path / "s" / "train" / "shard-005.tar").write_bytes(whole[:header.offset + 100])  # inside a header
    (tmp_path / "s" / "train" / "shard-004.tar").write_bytes(b"\x00" * 100)  # not a tar at all
    res = extract(f"wds:{shards}", **tiny)
    reasons = {f["id"]: f["reason"] for f in res.failures}
    assert reasons["shard-002/corrupt"] == "not an image file PIL can read"
    assert reasons["shard-002/nolabel"] == "no label (cls member)"
    assert reasons["shard-002/badlabel"].startswith("label b'cat?' is not a class index")
    assert reasons["shard-002/noimage"].startswith("no image member (jpg, jpeg, png, webp)")
    assert any(r.startswith("truncated tar: member") for i, r in reasons.items() if i.startswith("shard-003/"))
    assert reasons["shard-004/"].startswith("truncated or damaged tar shard")
    assert reasons["shard-005/"].startswith("truncated tar: the shard ends inside a header")
    n = len(WdsSource(str(shards)).splits["train"])
    assert res.splits["train"] == n - res.failed and res.splits["train"] >= 10
    again = extract(f"wds:{shards}", **tiny)  # recorded faults are kept, not retried
    assert again.cache_hit and again.failed == res.failed


def test_parquet_rows_without_a_label_or_image_are_recorded(folder, tmp_path, tiny):
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = (folder / "train" / "cat" / "cat_000.jpg").read_bytes()
    pq.write_table(pa.table({"img": [img, img, None, img], "y": [0, None, 1, 1]}), tmp_path / "t.parquet")
    res = extract(f"{tmp_path}/t.parquet", **tiny)  # detected by suffix
    assert res.splits == {"train": 2}
    assert sorted((f["id"], f["reason"]) for f in res.failures) == [
        ("t/1", "no label (the label column is empty for this row)"),
        ("t/2", "no image (the image column is empty for this row)")]


def test_parquet_image_paths_relative_to_the_file(folder, tmp_path, tiny):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = sorted(str(p.relative_to(folder)) for p in (folder / "train").rglob("*.*"))
    pq.write_table(pa.table({"path": paths, "label": [p.split("/")[1] for p in paths]}), folder / "m.parquet")
    ref = _content(extract(str(folder / "train"), **{**tiny, "cache_dir": str(tmp_path / "ref")}))
    got = _content(extract(f"parquet:{folder}/m.parquet", **tiny))
    _same(got, ref)


def test_hf_rows_without_a_label_and_options_naming_columns(folder, tmp_path, tiny):
    from datasets import Dataset, DatasetDict, Image

    img = (folder / "train" / "cat" / "cat_000.jpg").read_bytes()
    ds = Dataset.from_dict({"pic": [{"bytes": img, "path": None}] * 3, "y": [0, None, 1]}).cast_column("pic", Image())
    DatasetDict(train=ds).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(SourceError, match="has no ClassLabel column among pic, y. Name it with #label=COL"):
        open_source(f"hf:{tmp_path}/saved")
    res = extract(f"hf:{tmp_path}/saved#label=y", **tiny)
    assert res.splits == {"train": 2} and [(f["id"], f["reason"]) for f in res.failures] == [
        ("train/1", "no label (the label column is empty for this row)")]


def test_bad_specs_name_the_value_and_the_next_step(tmp_path):
    with pytest.raises(SourceError, match=r"No tar shards found for 'wds:.*empty'"):
        (tmp_path / "empty").mkdir()
        open_source(f"wds:{tmp_path}/empty")
    with pytest.raises(SourceError, match=r"Source option 'imgae=png' in .* is not one of image=..., label=..."):
        open_source(f"wds:{tmp_path}/empty#imgae=png")
    with pytest.raises(SourceError, match="'.*nothere' does not exist"):
        check_source_spec(f"wds:{tmp_path}/nothere")
    with pytest.raises(SourceError, match="Parquet source '.*nothere' does not exist"):
        open_source(f"parquet:{tmp_path}/nothere")
    check_source_spec(f"wds:http://127.0.0.1:1/x-{{0..3}}.tar")  # remote: known only once opened


def test_cli_extract_reads_a_shard_folder(folder, tmp_path):
    shards = write_wds(folder, tmp_path / "s")
    out = CliRunner().invoke(main, ["extract", f"wds:{shards}", "--backbone", "resnet18.none", "--input-size", "32",
                                    "--batch-size", "4", "--workers", "0", "--cache-dir", str(tmp_path / "c"),
                                    "--device", "cpu"])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(main, ["sources", "--json"])
    assert {"wds", "parquet", "hf"} <= {k["kind"] for k in __import__("json").loads(out.output)}


# --- over HTTP (a local server on 127.0.0.1) ------------------------------------------------------


def _served(folder, tmp_path, monkeypatch, **env):
    fetch_env(monkeypatch, tmp_path, **env)
    return write_wds(folder, tmp_path / "srv", shards=2)


def test_http_a_404_shard_is_recorded_and_the_rest_extracted(folder, tmp_path, tiny, monkeypatch):
    root = _served(folder, tmp_path, monkeypatch)
    with FlakyServer(root) as srv:
        res = extract(f"wds:{srv.url}/train/shard-{{000..002}}.tar", **tiny)
    assert res.splits == {"train": 10}
    assert [(f["id"], f["reason"]) for f in res.failures] == [
        ("shard-002/", f"'{srv.url}/train/shard-002.tar' was not found (404)")]


def test_http_503_twice_and_a_dropped_connection_are_retried(folder, tmp_path, tiny, monkeypatch):
    root = _served(folder, tmp_path, monkeypatch)
    faults = {"/train/shard-000.tar": [503, 503], "/train/shard-001.tar": ["drop"]}
    with FlakyServer(root, faults) as srv:
        res = extract(f"wds:{srv.url}/train/shard-{{000..001}}.tar", **tiny)
        assert srv.faults == {"/train/shard-000.tar": [], "/train/shard-001.tar": []}  # every fault was served
    assert res.splits == {"train": 10} and res.failed == 0


def test_http_a_shard_that_keeps_failing_is_recorded_after_the_retries(folder, tmp_path, tiny, monkeypatch):
    root = _served(folder, tmp_path, monkeypatch, retries=2)
    with FlakyServer(root, {"/train/shard-001.tar": ["drop"] * 3}) as srv:
        res = extract(f"wds:{srv.url}/train/shard-{{000..001}}.tar", **tiny)
    assert res.splits == {"train": 5}
    (reason,) = [f["reason"] for f in res.failures]
    assert reason.startswith(f"'{srv.url}/train/shard-001.tar' could not be fetched after 3 tries")


def test_http_a_fetch_that_hangs_times_out_and_is_recorded(folder, tmp_path, tiny, monkeypatch):
    root = _served(folder, tmp_path, monkeypatch, timeout=0.5, retries=1)
    with FlakyServer(root, {"/train/shard-001.tar": ["hang", "hang"]}) as srv:
        res = extract(f"wds:{srv.url}/train/shard-{{000..001}}.tar", **tiny)
    (reason,) = [f["reason"] for f in res.failures]
    assert "could not be fetched after 2 tries: timed out after 0.5 s" in reason


def test_shards_written_by_webdataset_read_as_webdataset_reads_them(folder, tmp_path, tiny):
    import webdataset as wds

    images = sorted((folder / "train").rglob("*.jpg"))
    with wds.TarWriter(str(tmp_path / "w-000.tar")) as sink:
        for i, p in enumerate(images):
            sink.write({"__key__": f"dir/s{i:03d}", "jpg": p.read_bytes(), "cls": i % 2,
                        "json": {"label": "dog" if i % 2 else "cat"}})
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    theirs = [(s["__key__"], int(s["cls"])) for s in wds.WebDataset(str(tmp_path / "w-000.tar"), shardshuffle=False)]
    src = open_source(f"wds:{tmp_path}/w-{{000..000}}.tar")
    assert [(r.id, r.label) for r in src.splits["train"]] == [(f"w-000/{k}", y) for k, y in theirs]
    named = open_source(f"wds:{tmp_path}/w-000.tar#label=json:label&classes={tmp_path}/names.txt")
    assert [r.label for r in named.splits["train"]] == [y for _, y in theirs] and named.classes == ["cat", "dog"]
    assert extract(f"wds:{tmp_path}/w-*.tar#image=jpg", **tiny).splits == {"train": len(images)}


def test_pipe_shards_are_read_from_a_command(folder, tmp_path, tiny, monkeypatch):
    fetch_env(monkeypatch, tmp_path)
    shards = write_wds(folder, tmp_path / "s")
    src = open_source(f"wds:pipe:cat {shards}/val/shard-{{000..001}}.tar")
    assert len(src.splits["train"]) == 10 and src.splits["train"][0].id.startswith("shard-000/")
    assert src.read(src.splits["train"][0])[0] == (folder / "val" / "cat" / "cat_000.jpg").read_bytes()
    bad = open_source(f"wds:pipe:cat {shards}/val/nothere.tar")
    (ref,) = bad.splits["train"]
    assert ref.id == "nothere/" and "exited with status 1" in ref.key[1]


def test_finetune_and_bench_accept_the_new_specs(folder, tmp_path):
    from featcache.runs.finetuning import finetune

    shards = write_wds(folder, tmp_path / "s")
    res = finetune(f"wds:{shards}", backbone="resnet18.none", input_size=32, freeze_until="layer3", epochs=1,
                   batch_size=4, device="cpu", output=str(tmp_path / "run"))
    assert res.metrics["val"]["n"] == 10 and res.failures == []
    check_source_spec(f"parquet:{write_parquet(folder, tmp_path / 'p')}")  # what bench checks before extracting
    check_source_spec(f"hf:{write_hf(folder, tmp_path / 'h')}")


def test_sources_travel_to_loader_worker_processes(folder, tmp_path, tiny):
    specs = [f"wds:{write_wds(folder, tmp_path / 's')}", f"parquet:{write_parquet(folder, tmp_path / 'p')}",
             f"hf:{write_hf(folder, tmp_path / 'h')}"]
    for spec in specs:
        main_process = _content(extract(spec, **{**tiny, "cache_dir": str(tmp_path / "c0")}))
        _same(_content(extract(spec, **{**tiny, "num_workers": 1, "cache_dir": str(tmp_path / "c1")})), main_process)


def test_a_csv_manifest_of_urls_reads_through_fsspec_and_records_a_404(folder, tmp_path, tiny, monkeypatch):
    fetch_env(monkeypatch, tmp_path)
    ref = _content(extract(str(folder / "train"), **{**tiny, "cache_dir": str(tmp_path / "ref")}))
    paths = sorted(str(p.relative_to(folder)) for p in (folder / "train").rglob("*.*"))
    with FlakyServer(folder, {f"/{paths[1]}": [503]}) as srv:
        rows = [f"{srv.url}/{p},{p.split('/')[1]}" for p in paths]
        (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows + [f"{srv.url}/gone.jpg,dog"]) + "\n")
        res = extract(str(tmp_path / "m.csv"), **tiny)
        again = extract(str(tmp_path / "m.csv"), **tiny)
    assert [(f["id"], f["reason"]) for f in res.failures] == [
        (f"{srv.url}/gone.jpg", f"'{srv.url}/gone.jpg' was not found (404)")]
    assert again.cache_hit
    got = _content(res)
    assert got["train"][0] == ref["train"][0] and np.array_equal(got["train"][1], ref["train"][1])


def test_a_shard_run_reads_only_the_images_of_its_share(folder, tmp_path, tiny, monkeypatch):
    shards = write_wds(folder, tmp_path / "s")
    reads = _counting_reads(monkeypatch, WdsSource)
    first = extract(f"wds:{shards}", **tiny, shard=(0, 2))
    assert first.computed == len(reads) < 20  # each of its images read once, no other
    reads.clear()
    second = extract(f"wds:{shards}", **tiny, shard=(1, 2))
    # its own images only: each hashed once (shard 0's file is a donor to check against) and read once
    assert len(reads) == 2 * second.computed and first.computed + second.computed == 20 and second.merged


def test_a_shard_run_lists_and_reads_only_its_own_tar_shards_and_assembles_the_unsharded_cache(folder, tmp_path,
                                                                                                tiny, monkeypatch):
    shards = write_wds(folder, tmp_path / "s", shards=4)  # 10 samples per split: shards of 3, 3, 3 and 1
    ref = extract(f"wds:{shards}", **{**tiny, "cache_dir": str(tmp_path / "ref")})
    listed, real = [], WdsSource._index
    monkeypatch.setattr(WdsSource, "_index", lambda self, url, *a: listed.append(Path(url).relative_to(shards)
                                                                             .as_posix()) or real(self, url, *a))
    reads = _counting_reads(monkeypatch, WdsSource)
    for i, own in enumerate([(0, 1), (2, 3)]):
        listed.clear(), reads.clear()
        res = extract(f"wds:{shards}", **tiny, shard=(i, 2))
        assert listed == [f"{s}/shard-{k:03d}.tar" for s in ("train", "val") for k in own]  # its shards, no other
        assert {r.split("/")[0] for r in reads} == {f"shard-{k:03d}" for k in own}
    assert res.merged and WdsSource.share_unit == "tar shard"
    with open_cache(res.merged) as got, open_cache(ref.cache) as want:
        assert got.splits == want.splits and got.classes == want.classes
        for split in want.splits:
            assert list(got.ids(split)) == list(want.ids(split))
            assert np.array_equal(got.labels(split), want.labels(split))
            assert np.array_equal(got.batch_n(split), want.batch_n(split))  # the batches of the unsharded run
            assert np.array_equal(got.features(split)[()], want.features(split)[()])  # bit for bit
    listed.clear()
    again = extract(f"wds:{shards}", **tiny, shard=(1, 2))
    assert again.cache_hit and listed == ["train/shard-002.tar", "train/shard-003.tar", "val/shard-002.tar",
                                          "val/shard-003.tar"]


def test_a_shard_run_of_parquet_reads_only_its_own_row_groups_and_assembles_the_unsharded_cache(folder, tmp_path,
                                                                                                tiny, monkeypatch):
    import pyarrow.parquet as pq

    (tmp_path / "names.txt").write_text("cat\ndog\n")
    spec = f"parquet:{write_parquet(folder, tmp_path / 'p', row_group_size=3)}#classes={tmp_path}/names.txt"
    ref = extract(spec, **{**tiny, "cache_dir": str(tmp_path / "ref")})  # 10 rows per split: groups of 3, 3, 3, 1
    touched, real = [], pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, g, *a, **k: touched.append(g) or real(self, g, *a, **k))
    for i, own in enumerate([{0, 1}, {2, 3}]):
        touched.clear()
        res = extract(spec, **tiny, shard=(i, 2))
        assert set(touched) == own  # labels and images of its own row groups, no other
    assert ParquetSource.share_unit == "row group"
    with open_cache(res.merged) as got, open_cache(ref.cache) as want:
        for split in want.splits:
            assert list(got.ids(split)) == list(want.ids(split)) and got.classes == want.classes
            assert np.array_equal(got.batch_n(split), want.batch_n(split))
            assert np.array_equal(got.features(split)[()], want.features(split)[()])


def test_http_identity_a_rerun_asks_for_headers_only_and_a_changed_shard_is_fetched_again(folder, tmp_path, tiny,
                                                                                          monkeypatch):
    import os

    root = _served(folder, tmp_path, monkeypatch)
    spec_tail = "/train/shard-{000..001}.tar"
    with FlakyServer(root) as srv:
        first = extract(f"wds:{srv.url}{spec_tail}", **tiny)
        srv.requests.clear()
        again = extract(f"wds:{srv.url}{spec_tail}", **tiny)
        assert again.cache_hit and not [r for r in srv.requests if r.endswith(".tar") and not r.startswith("HEAD")]
        shard = root / "train" / "shard-001.tar"
        shard.write_bytes(shard.read_bytes())  # same bytes, new Last-Modified
        os.utime(shard, (shard.stat().st_atime, shard.stat().st_mtime + 10))
        srv.requests.clear()
        changed = extract(f"wds:{srv.url}{spec_tail}", **tiny)
        assert "/train/shard-001.tar" in srv.requests and "/train/shard-000.tar" not in srv.requests
    assert not changed.cache_hit and changed.computed == 0 and changed.cache == first.cache  # same content: reused


def test_cli_flags_are_the_spec_options(folder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = (folder / "train" / "cat" / "cat_000.jpg").read_bytes()
    pq.write_table(pa.table({"a": [img, img], "b": [img, img], "k": [1, 0]}), tmp_path / "t.parquet")
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    flags = ["--backbone", "resnet18.none", "--input-size", "32", "--workers", "0", "--device", "cpu", "--json",
             "--cache-dir", str(tmp_path / "c")]
    out = CliRunner().invoke(main, ["extract", f"parquet:{tmp_path}/t.parquet", "--image-column", "b",
                                    "--label-column", "k", "--classes", str(tmp_path / "names.txt"), *flags])
    assert out.exit_code == 0, out.output
    src = open_source(f"parquet:{tmp_path}/t.parquet#image=b&label=k&classes={tmp_path}/names.txt")
    assert src.classes == ["cat", "dog"] and [r.label for r in src.splits["train"]] == [1, 0]
    out = CliRunner().invoke(main, ["extract", f"parquet:{tmp_path}/t.parquet", "--label-key", "json:y", *flags])
    assert out.exit_code == 1
    assert "Source option 'label=json:y'" not in out.output and "no column 'json:y' (label)" in out.output


def test_http_a_served_folder_of_split_folders_and_an_unreachable_host(folder, tmp_path, monkeypatch):
    root = _served(folder, tmp_path, monkeypatch, retries=1)
    with FlakyServer(root) as srv:
        src = open_source(f"wds:{srv.url}/")  # the server's folder listings, as fsspec reads them
        counts = {k: len(v) for k, v in src.splits.items()}  # listed when first asked for
    assert counts == {"train": 10, "val": 10} and src.classes == ["cat", "dog"]
    with pytest.raises(SourceError, match=r"Cannot list the shards of 'wds:http://127.0.0.1:1/x/\*.tar': "
                                          r".* could not be fetched after 2 tries: .*Check the URL."):
        open_source("wds:http://127.0.0.1:1/x/*.tar")


def test_hf_a_name_that_is_not_a_folder_goes_to_the_hub_with_its_config(folder, tmp_path, monkeypatch):
    import datasets

    saved = datasets.load_from_disk(str(write_hf(folder, tmp_path / "h")))
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config: asked.append((name, config)) or saved)
    src = open_source("hf:someone/bees:small")
    assert asked == [("someone/bees", "small")] and src.spec == "someone/bees:small" and len(src) == 20

    def offline(name, config):
        raise ConnectionError("Couldn't reach 'someone/bees' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SourceError, match=r"Cannot open Hugging Face data set 'someone/bees': Couldn't reach"):
        open_source("hf:someone/bees")


def _memory_copy(folder: Path, url: str) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in sorted(folder.rglob("*.*")):
        fs.pipe(f"{url.split('://', 1)[1]}/{p.relative_to(folder).as_posix()}", p.read_bytes())


def test_a_folder_and_a_csv_manifest_on_remote_storage_read_through_fsspec(folder, tmp_path, tiny, monkeypatch):
    fetch_env(monkeypatch, tmp_path)
    ref = _content(extract(str(folder), **{**tiny, "cache_dir": str(tmp_path / "ref")}))
    _memory_copy(folder, "memory://bucket/imgs")
    src = open_source("memory://bucket/imgs/")  # a folder URL ends with '/', as s3://bucket/prefix/ would
    local = open_source(str(folder))
    assert src.remote_reads and not local.remote_reads
    assert {s: [(r.id, r.label) for r in refs] for s, refs in src.splits.items()} == \
        {s: [(r.id, r.label) for r in refs] for s, refs in local.splits.items()}
    _same(_content(extract("memory://bucket/imgs/", **tiny)), ref)
    # a manifest at a URL, its paths relative to it
    rows = [f"{r.id},{local.classes[r.label]},{split}" for split, refs in local.splits.items() for r in refs]
    _memory_copy(folder, "memory://bucket/m")
    import fsspec

    fsspec.filesystem("memory").pipe("/bucket/m/list.csv", ("path,label,split\n" + "\n".join(rows) + "\n").encode())
    manifest = open_source("memory://bucket/m/list.csv")
    assert manifest.splits["train"][0].key == f"memory://bucket/m/{local.splits['train'][0].id}"
    _same(_content(extract("memory://bucket/m/list.csv", **{**tiny, "cache_dir": str(tmp_path / "m")})), ref)
    check_source_spec("memory://bucket/imgs/")  # bench checks specs before extracting: a URL is checked when opened
    with pytest.raises(SourceError, match=r"Image folder 'memory://bucket/none/' has no class sub-folders"):
        open_source("memory://bucket/none/")


def test_a_folder_served_over_http_reads_as_the_local_folder(folder, tmp_path, tiny, monkeypatch):
    fetch_env(monkeypatch, tmp_path)
    ref = _content(extract(str(folder), **{**tiny, "cache_dir": str(tmp_path / "ref")}))
    with FlakyServer(folder) as srv:
        got = _content(extract(f"{srv.url}/", **tiny))
    _same(got, ref)


def test_sources_base_does_not_import_remote():
    import ast

    import featcache.sources.base as base

    tree = ast.parse(Path(base.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "remote" not in imported and not any(m and m.endswith("remote") for m in imported)


@pytest.mark.parametrize("workers", [0, 1])
def test_remote_reads_run_ahead_of_the_forward_pass_a_bounded_number_at_a_time(folder, tmp_path, tiny, monkeypatch,
                                                                               workers):
    from featcache.extraction.loading import READ_AHEAD

    fetch_env(monkeypatch, tmp_path)
    ref = _content(extract(str(folder), **{**tiny, "cache_dir": str(tmp_path / "ref")}))
    with FlakyServer(folder, gate=3) as srv:  # each GET waits until 3 are in flight together
        res = extract(f"{srv.url}/", **{**tiny, "num_workers": workers, "threads": 1})
    # Read one at a time, no GET would ever have company (the gate gives up after 5 s each time).
    assert 3 <= srv.most <= READ_AHEAD
    _same(_content(res), ref)


def test_predict_classifies_the_samples_of_a_source_spec(folder, tmp_path, tiny):
    from featcache.runs.fit import fit_head
    from featcache.runs.inference import predict

    shards = write_wds(folder, tmp_path / "s")
    res = extract(f"wds:{shards}", **tiny)
    run = fit_head(res.cache, head="ncm", runs_dir=str(tmp_path / "runs")).run
    got = predict(run, [f"wds:{shards}", f"parquet:{write_parquet(folder, tmp_path / 'p')}"], device=tiny["device"])
    assert len(got) == 40 and all(p["label"] in ("cat", "dog") for p in got)
    assert got[0]["path"] == "train/shard-000/000000_cat_000" and got[20]["path"] == "train/part-0/0"
    assert [p["label"] for p in got[:20]] == [p["label"] for p in got[20:]]  # the same images, the same answers
    out = CliRunner().invoke(main, ["predict", str(run), f"hf:{write_hf(folder, tmp_path / 'h')}", "--json",
                                    "--device", tiny["device"]])
    assert out.exit_code == 0, out.output
    assert [p["label"] for p in __import__("json").loads(out.output)["predictions"]] == [p["label"] for p in got[:20]]


def test_bench_runs_its_grid_on_a_shard_source(folder, tmp_path):
    from featcache.runs.bench import BenchConfig, run_bench

    shards = write_wds(folder, tmp_path / "s")
    grid = BenchConfig(backbones=("resnet18.none",), sources=(f"wds:{shards}",), layers=("pre_logits",),
                       heads=("ncm",), shots=(0,), seeds=1,
                       extract={"input_size": 32, "num_workers": 0, "dtype": "float32",
                                "cache_dir": str(tmp_path / "cache")})
    (record,) = run_bench(grid, tmp_path / "out")
    assert record["source"] == f"wds:{shards}" and 0 <= record["metrics"]["val"]["top1"] <= 1


def test_probe_layers_reads_a_parquet_source(folder, tmp_path):
    from featcache.extraction.plan import ExtractConfig
    from featcache.runs.probe import probe_layers

    res = probe_layers("resnet18.none", f"parquet:{write_parquet(folder, tmp_path / 'p')}", out_dir=tmp_path / "l",
                       head="ncm", extract_config=ExtractConfig(cache_dir=str(tmp_path / "c"), input_size=32,
                                                                num_workers=0, dtype="float32"))
    assert [r["name"] for r in res.layers] == ["layer1", "layer2", "layer3", "layer4", "pre_logits"]


def test_what_is_held_per_sample_stays_small(tmp_path):
    """Memory flat in the number of samples (issue 22): the listing of a shard, the plan and the index
    of computed features hold a few hundred bytes per sample (ids included): 183, 166 and 232 bytes where
    they held 259, 224 and 690."""
    import tracemalloc

    from featcache.extraction.loading import plan_rows
    from featcache.extraction.reuse import Donors, stat_key

    n = 4000
    with tarfile.open(tmp_path / "s-000.tar", "w") as tf:
        for i in range(n):
            add_member(tf, f"{i:07d}.png", b"x" * 300)
            add_member(tf, f"{i:07d}.cls", str(i % 2).encode())
    (tmp_path / "classes.txt").write_text("a\nb\n")
    hashes = [f"{i:032x}" for i in range(n)]
    tracemalloc.start()
    try:
        src = WdsSource(str(tmp_path))
        assert len(src.splits["train"]) == n
        listed = tracemalloc.get_traced_memory()[0]
        plan = plan_rows(src)
        planned = tracemalloc.get_traced_memory()[0]
        donors = Donors(1, 8)
        for r, h in zip(plan["train"], hashes):
            donors.hash_by_stat[stat_key(r.ref.id, r.stat)] = h
        donors._index(0, hashes, 0, False, np.full(n, 8))
        indexed = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert listed / n < 200 and (planned - listed) / n < 190 and (indexed - planned) / n < 300
    assert donors.lookup(hashes[5], False, 8) == (0, 5, 8)
