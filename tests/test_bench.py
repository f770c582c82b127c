"""The benchmark grid runner, the freeze recommendation and probe-layers."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import make_image_folder
from featcache.runs.bench import RECORD_KEYS, BenchConfig, read_records, run_bench
from featcache.cli import main
from featcache.errors import ConfigError
from featcache.runs.probe import probe_layers, recommend

EXTRACT = {"input_size": 32, "num_workers": 0, "dtype": "float32"}


@pytest.fixture
def grid(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=6)
    return BenchConfig(backbones=("resnet18.none",), sources=(str(folder),), layers=("layer3", "pre_logits"),
                       heads=("ncm", "ridge"), shots=(2, 0), seeds=2,
                       extract={**EXTRACT, "cache_dir": str(tmp_path / "cache")})


def test_grid_runs_every_cell_once_with_complete_records(grid, tmp_path):
    calls = []
    records = run_bench(grid, tmp_path / "out", progress=lambda i, n, rec, t: calls.append((i, n)))
    # ncm and ridge (swept on val) draw nothing from the seed: at shots 0 one seed, not two.
    assert grid.runs() == 2 * 2 * 2 * 2 and len(records) == 2 * 2 * (2 + 1)
    assert calls[-1] == (12, 12)
    assert sorted(r["seed"] for r in records if r["shots"] == 0) == [0, 0, 0, 0]
    for rec in records:
        assert set(RECORD_KEYS) <= set(rec)
        assert rec["metrics"]["val"]["top1"] >= 0
    keys = {(r["layer"], r["head"], r["shots"], r["seed"]) for r in records}
    assert len(keys) == 12
    assert len({r["cache"] for r in records}) == 1  # extracted once, both layers from one pass
    assert sum(r["extract_seconds"] > 0 for r in records) == 12  # first extraction, recorded per run
    out = tmp_path / "out"
    for name in ("records.jsonl", "leaderboard.md", "leaderboard.csv", "shots.png", "layers.png", "time.png"):
        assert (out / name).is_file(), name
    assert "| ridge |" in (out / "leaderboard.md").read_text() or "ridge" in (out / "leaderboard.md").read_text()


def test_skip_existing_resumes_an_interrupted_grid(grid, tmp_path):
    out = tmp_path / "out"

    class Stop(Exception):
        pass

    def stop_after_five(i, n, rec, t):
        if i == 5:
            raise Stop

    with pytest.raises(Stop):
        run_bench(grid, out, progress=stop_after_five)
    assert len(read_records(out)) == 5
    with open(out / "records.jsonl", "a") as f:
        f.write('{"cut by a crash"')  # a torn last line is ignored
    fitted = []
    records = run_bench(grid, out, skip_existing=True, progress=lambda i, n, rec, t: fitted.append(i))
    assert len(fitted) == 7 and len(records) == 12
    assert len({(r["layer"], r["head"], r["shots"], r["seed"]) for r in records}) == 12


def test_bench_toml_and_cli(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    toml = tmp_path / "grid.toml"
    toml.write_text(f'backbones = ["resnet18.none"]\nsources = ["{folder}"]\nheads = ["ncm"]\nshots = [0]\n'
                    f'seeds = 1\n[extract]\ninput_size = 32\nnum_workers = 0\ncache_dir = "{tmp_path / "c"}"\n')
    cfg = BenchConfig.from_toml(toml)
    assert cfg.heads == ("ncm",) and cfg.extract["input_size"] == 32
    r = CliRunner().invoke(main, ["bench", str(toml), "-o", str(tmp_path / "out"), "--heads", "ncm,knn", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["runs"] == 2 and {row["head"] for row in out["leaderboard"]} == {"ncm", "knn"}
    bad = tmp_path / "bad.toml"
    bad.write_text('backbone = ["x"]\n')
    r = CliRunner().invoke(main, ["bench", str(bad)])
    assert r.exit_code == 1 and r.output.startswith("Error: Unknown keys in") and "backbone" in r.output


def test_grid_validation_errors():
    with pytest.raises(ConfigError, match="'shots' must be integers >= 0"):
        BenchConfig(shots=(-1,)).validate()
    with pytest.raises(ConfigError, match="needs at least one value in 'heads'"):
        BenchConfig(heads=()).validate()


def _curve(*tops):
    names = [f"stage{i + 1}" for i in range(len(tops) - 1)] + ["pre_logits"]
    return [{"name": n, "top1": t} for n, t in zip(names, tops)]


def test_recommend_linear_probe_when_the_last_layer_is_best():
    rec = recommend(_curve(0.60, 0.75, 0.85, 0.93))
    assert rec["strategy"] == "linear-probe" and rec["freeze_until"] == "pre_logits" and rec["fine_tune"] == []
    assert "transfers as-is" in rec["reason"]


def test_recommend_partial_fine_tune_when_a_middle_stage_wins():
    rec = recommend(_curve(0.60, 0.88, 0.80, 0.78))
    assert rec["strategy"] == "partial-fine-tune"
    assert rec["freeze_until"] == "stage2" and rec["fine_tune"] == ["stage3"]
    assert rec["best_layer"] == "stage2" and rec["last_top1"] == 0.78
    assert "Freeze up to stage2 and fine-tune stage3" in rec["reason"]


def test_recommend_prefers_the_deeper_layer_within_tolerance():
    rec = recommend(_curve(0.70, 0.900, 0.898, 0.80), tolerance=0.005)
    assert rec["freeze_until"] == "stage3" and rec["fine_tune"] == []  # only pre_logits after it: a probe
    rec = recommend(_curve(0.70, 0.900, 0.880, 0.80), tolerance=0.005)
    assert rec["freeze_until"] == "stage2" and rec["fine_tune"] == ["stage3"]
    with pytest.raises(ConfigError):
        recommend([])


def test_probe_layers_taps_every_stage_in_one_pass(tmp_path):
    from featcache.extraction.plan import ExtractConfig

    folder = make_image_folder(tmp_path / "imgs", per_class=6)
    res = probe_layers("resnet18.none", str(folder), out_dir=tmp_path / "layers", head="ncm",
                       extract_config=ExtractConfig(cache_dir=str(tmp_path / "c"), **EXTRACT))
    assert [r["name"] for r in res.layers] == ["layer1", "layer2", "layer3", "layer4", "pre_logits"]
    assert [r["dim"] for r in res.layers] == [64, 128, 256, 512, 512]
    doc = json.loads((tmp_path / "layers" / "layers.json").read_text())
    assert doc["recommendation"]["freeze_until"] in [r["name"] for r in res.layers]
    assert all(r["top1_ci"][0] <= r["top1"] <= r["top1_ci"][1] for r in doc["layers"])
    assert "vs_next" in doc["recommendation"]
    assert (tmp_path / "layers" / "layers.png").is_file()
    r = CliRunner().invoke(main, ["probe-layers", "resnet18.none", str(folder), "-o", str(tmp_path / "l2"),
                                  "--head", "ncm", "--input-size", "32", "--workers", "0",
                                  "--cache-dir", str(tmp_path / "c"), "--json"], catch_exceptions=False)
    out = json.loads(r.output)
    assert set(out) >= {"layers", "recommendation"} and len(out["layers"]) == 5
    r = CliRunner().invoke(main, ["report", str(tmp_path / "l2"), "-o", str(tmp_path / "l.html")])
    assert r.exit_code == 0 and "data:image/png;base64," in (tmp_path / "l.html").read_text()


def _small_grid(tmp_path, **kw):
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    base = dict(backbones=("resnet18.none",), sources=(str(folder),), heads=("ncm",), shots=(0,), seeds=1,
                extract={**EXTRACT, "cache_dir": str(tmp_path / "cache")})
    return BenchConfig(**{**base, **kw})


def test_a_second_grid_keeps_earlier_records_and_never_reuses_a_run_number(tmp_path):
    out = tmp_path / "out"
    first = run_bench(_small_grid(tmp_path, heads=("ncm", "knn")), out)
    assert len(first) == 2
    second = run_bench(_small_grid(tmp_path, heads=("ridge",)), out)
    assert len(second) == 3 and [r["head"] for r in second] == ["ncm", "knn", "ridge"]
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert [r[:5] for r in runs] == ["00001", "00002", "00003"]
    assert len({r["run"] for r in second}) == 3
    again = run_bench(_small_grid(tmp_path, heads=("ncm",)), out, overwrite=True)
    assert [r["head"] for r in again] == ["ncm"] and len(list((out / "runs").iterdir())) == 1
    with pytest.raises(ConfigError, match="The 'overwrite' option deletes the records"):
        run_bench(_small_grid(tmp_path), out, overwrite=True, skip_existing=True)


def test_bench_cli_appends_and_overwrite_is_explicit(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    args = ["bench", "--backbones", "resnet18.none", "--sources", str(folder), "--input-size", "32", "--workers",
            "0", "--cache-dir", str(tmp_path / "c"), "-o", str(tmp_path / "out"), "--json"]
    r = CliRunner().invoke(main, [*args, "--heads", "ncm,knn"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*args, "--heads", "ridge"])
    out = json.loads(r.stdout)
    assert (out["runs"], out["new_runs"]) == (3, 1)
    assert len(read_records(tmp_path / "out")) == 3
    r = CliRunner().invoke(main, [*args, "--heads", "ridge", "--overwrite"])
    assert json.loads(r.stdout)["runs"] == 1
    r = CliRunner().invoke(main, [*args[:-1], "--heads", "ncm", "-q"])
    assert r.exit_code == 0 and "[1/1]" not in r.output and "2 runs in" in r.output


@pytest.mark.parametrize("table, line, error", [
    ("fit", 'normalise = "l2"', "Error: Unknown keys in the [fit] table of '{toml}': normalise (did you mean "
                                "'normalize'?). Known: "),
    ("extract", "batchsize = 16", "Error: Unknown keys in the [extract] table of '{toml}': batchsize (did you "
                                  "mean 'batch_size'?). Known: "),
])
def test_unknown_keys_in_toml_tables_name_the_closest(tmp_path, table, line, error):
    toml = tmp_path / "grid.toml"
    toml.write_text(f'heads = ["ncm"]\n[{table}]\n{line}\n')
    r = CliRunner().invoke(main, ["bench", str(toml), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and r.output.startswith(error.format(toml=toml)), r.output
    assert "Traceback" not in r.output
    toml.write_text('heads = ["ncm"]\nbackbone = ["resnet18"]\n')
    r = CliRunner().invoke(main, ["bench", str(toml)])
    assert r.output.startswith(f"Error: Unknown keys in '{toml}': backbone (did you mean 'backbones'?). Known: ")


def test_toml_grid_accepts_the_cli_syntax(tmp_path):
    toml = tmp_path / "grid.toml"
    toml.write_text('[fit]\ngrid = "logspace:-2:2:5"\n')
    assert BenchConfig.from_toml(toml).fit_config().grid == pytest.approx((0.01, 0.1, 1.0, 10.0, 100.0))
    toml.write_text('[fit]\ngrid = [0.1, 1]\n')
    assert BenchConfig.from_toml(toml).fit_config().grid == (0.1, 1.0)


def test_bench_checks_names_and_options_before_extracting(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    cache = tmp_path / "c"
    base = ["bench", "--backbones", "resnet18.none", "--sources", str(folder), "--input-size", "32",
            "--cache-dir", str(cache), "-o", str(tmp_path / "out")]
    r = CliRunner().invoke(main, [*base, "--heads", "logreg,bogus"])
    assert r.output == "Error: Unknown head 'bogus'. Run 'featcache heads' to list them.\n"
    r = CliRunner().invoke(main, ["bench", "--backbones", "resnet18.none,nonet", "--sources", str(folder),
                                  "--cache-dir", str(cache)])
    assert r.output == "Error: Unknown backbone 'nonet'. Run 'featcache backbones' to list them.\n"
    r = CliRunner().invoke(main, ["bench", "--backbones", "resnet18.none", "--sources", f"{folder},{folder}/nope.csv",
                                  "--cache-dir", str(cache)])
    assert r.output == f"Error: Source '{folder}/nope.csv': '{folder}/nope.csv' does not exist. Check the path.\n"
    r = CliRunner().invoke(main, ["bench", "--backbones", "resnet18.none", "--sources", f"digits,{folder}/nope",
                                  "--cache-dir", str(cache)])
    assert r.output.startswith(f"Error: Source '{folder}/nope' is not a folder, a .csv manifest")
    toml = tmp_path / "g.toml"
    toml.write_text('heads = ["logreg", "ncm"]\n[fit]\ngrid = [0.1, 1]\n')
    r = CliRunner().invoke(main, [str(a) for a in ("bench", toml, *base[1:])])
    assert r.output == "Error: --C does not apply to head 'ncm': it sweeps no parameter. Drop --C.\n"
    assert not cache.exists() and not (tmp_path / "out").exists()


def test_probe_layers_checks_splits_head_and_pool_before_extracting(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=4, splits=("train",))
    cache = tmp_path / "c"
    base = ["probe-layers", "resnet18.none", str(folder), "--input-size", "32", "--workers", "0",
            "--cache-dir", str(cache), "-o", str(tmp_path / "l")]
    r = CliRunner().invoke(main, base)
    assert r.output == (f"Error: Source '{folder}' has no split besides train to score layers on. Pass "
                        f"--val-fraction 0.2 to carve one out, or add a val/ folder.\n")
    r = CliRunner().invoke(main, [*base, "--head", "bogus"])
    assert r.output == "Error: Unknown head 'bogus'. Run 'featcache heads' to list them.\n"
    r = CliRunner().invoke(main, [*base, "--pool", "none", "--val-fraction", "0.5"])
    assert r.output.startswith("Error: probe-layers fits one head per layer on pooled features")
    assert not cache.exists()
    r = CliRunner().invoke(main, [*base, "--head", "ncm", "--pool", "max", "--val-fraction", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert len(out["layers"]) == 5 and {row["split"] for row in out["layers"]} == {"val"}
    from featcache.store.cache import open_cache

    with open_cache(next(cache.glob("*.h5"))) as c:
        assert c.fingerprint["pool"] == "max" and c.fingerprint["source"]["val_fraction"] == 0.5


def test_extraction_warns_about_single_class_and_empty_class_sources(tmp_path, caplog):
    from featcache.sources import open_source

    folder = make_image_folder(tmp_path / "one", classes=("cat",), per_class=2)
    with caplog.at_level("WARNING", logger="featcache.sources"):
        open_source(str(folder))
    assert f"Source '{folder}' has a single class ('cat'); a head needs at least 2 classes to train." in caplog.text
    caplog.clear()
    folder = make_image_folder(tmp_path / "two", classes=("cat", "dog"), per_class=2)
    (folder / "train" / "emu").mkdir()
    with caplog.at_level("WARNING", logger="featcache.sources"):
        r = CliRunner().invoke(main, ["extract", str(folder), "--backbone", "resnet18.none", "--input-size", "32",
                                      "--workers", "0", "--cache-dir", str(tmp_path / "c"), "-q"])
    assert r.exit_code == 0
    assert (f"Source '{folder}' has no samples of class(es) 'emu'. Add images for them or remove their "
            f"folders.") in caplog.text


def test_seeded_heads_and_k_fold_sweeps_keep_every_seed_at_shots_0(tmp_path):
    recs = run_bench(_small_grid(tmp_path, heads=("svm", "ridge"), seeds=2, fit={"eval_split": "none"}),
                     tmp_path / "out")
    assert sorted((r["head"], r["seed"]) for r in recs) == [("ridge", 0), ("ridge", 1), ("svm", 0), ("svm", 1)]


def test_a_cache_hit_records_the_original_extraction_time(tmp_path):
    from featcache.store.cache import open_cache

    grid = _small_grid(tmp_path)
    first = run_bench(grid, tmp_path / "a")
    again = run_bench(grid, tmp_path / "b")
    with open_cache(first[0]["cache"]) as c:
        stored = c.timings["compute_seconds"]
    assert first[0]["cache_hit"] is False and again[0]["cache_hit"] is True
    assert again[0]["extract_seconds"] == pytest.approx(stored) and stored > 0


def test_layers_all_benchmarks_every_stage_from_one_extraction(tmp_path):
    calls = []
    records = run_bench(_small_grid(tmp_path, layers=("all",)), tmp_path / "out",
                        progress=lambda i, n, rec, t: calls.append((i, n)))
    assert [r["layer"] for r in records] == ["layer1", "layer2", "layer3", "layer4", "pre_logits"]
    assert len({r["cache"] for r in records}) == 1
    assert calls[-1] == (5, 5)  # the count follows the expanded layers


def test_the_leaderboard_ranks_on_the_held_out_test_split_and_names_it(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=6, splits=("train", "val", "test"))
    grid = BenchConfig(backbones=("resnet18.none",), sources=(str(folder),), heads=("logreg", "knn"), shots=(0,),
                       seeds=1, extract={**EXTRACT, "cache_dir": str(tmp_path / "cache")})
    out = tmp_path / "out"
    records = run_bench(grid, out)
    from featcache.reports.leaderboard import leaderboard

    rows = leaderboard(records)
    by_head = {r["head"]: r for r in records}
    for row in rows:
        assert row["split"] == "test" and row["held_out"] is True
        assert row["top1_mean"] == pytest.approx(by_head[row["head"]]["metrics"]["test"]["top1"])
    md = (out / "leaderboard.md").read_text()
    assert "top-1 on test" in md.splitlines()[0]
    csv_text = (out / "leaderboard.csv").read_text().splitlines()
    assert "split" in csv_text[0].split(",") and all(",test," in line for line in csv_text[1:])


def test_without_a_test_split_the_table_says_it_shows_the_selection_split(tmp_path):
    out = tmp_path / "out"
    records = run_bench(_small_grid(tmp_path, heads=("logreg",)), out)
    md = (out / "leaderboard.md").read_text()
    assert "top-1 on val" in md.splitlines()[0]
    assert "No test split" in md and "selected" in md
    from featcache.reports.leaderboard import leaderboard

    assert leaderboard(records)[0]["held_out"] is False


def test_re_running_a_grid_replaces_its_records_instead_of_counting_them_twice(tmp_path):
    grid = _small_grid(tmp_path, heads=("svm",), seeds=3, fit={"eval_split": "none"})
    out = tmp_path / "out"
    run_bench(grid, out)
    again = run_bench(grid, out)
    assert len(again) == 3 and len(read_records(out)) == 3
    from featcache.reports.leaderboard import leaderboard

    assert [r["runs"] for r in leaderboard(again)] == [3]
    assert len((out / "records.jsonl").read_text().splitlines()) == 3
    assert len(list((out / "runs").iterdir())) == 3  # the replaced runs' folders are gone
    assert sorted(p.name[:5] for p in (out / "runs").iterdir()) == ["00004", "00005", "00006"]


def test_a_moved_bench_folder_still_finds_its_runs(tmp_path):
    import shutil

    out = tmp_path / "out"
    run_bench(_small_grid(tmp_path, heads=("ncm",)), out)
    stored = json.loads((out / "records.jsonl").read_text().splitlines()[0])
    assert stored["run"].startswith("runs/")
    shutil.move(str(out), str(tmp_path / "moved"))
    rec = read_records(tmp_path / "moved")[0]
    from pathlib import Path

    assert Path(rec["run"]).is_dir() and (Path(rec["run"]) / "run.json").is_file()
    assert Path(rec["cache"]).is_file()


def test_the_progress_total_is_known_before_the_first_fit_and_never_changes(tmp_path):
    a = make_image_folder(tmp_path / "a", per_class=4)
    b = make_image_folder(tmp_path / "b", per_class=4, seed=1)
    grid = BenchConfig(backbones=("resnet18.none",), sources=(str(a), str(b)), heads=("ncm",), shots=(0,), seeds=2,
                       extract={**EXTRACT, "cache_dir": str(tmp_path / "cache")})
    calls = []
    run_bench(grid, tmp_path / "out", progress=lambda i, n, rec, t: calls.append((i, n)))
    assert calls == [(1, 2), (2, 2)]


def test_recommend_says_when_the_next_layer_is_not_distinguishably_worse():
    import numpy as np

    curve = _curve(0.60, 0.88, 0.80, 0.78)
    y = np.repeat([0, 1], 25)
    base = np.random.default_rng(0).random(50)
    rows = {r["name"]: (y, np.where(base < r["top1"], y, 1 - y)) for r in curve}
    rec = recommend(curve, rows=rows)
    assert rec["freeze_until"] == "stage2" and rec["vs_next"]["layer"] == "stage3"
    assert rec["vs_next"]["distinguishable"] is False
    assert "On these 50 images, stage2 is not distinguishably better than the next layer, stage3" in rec["reason"]
    y = np.repeat([0, 1], 500)
    base = np.random.default_rng(0).random(1000)
    rows = {r["name"]: (y, np.where(base < r["top1"], y, 1 - y)) for r in curve}
    rec = recommend(curve, rows=rows)
    assert rec["vs_next"]["distinguishable"] is True and "not distinguishably" not in rec["reason"]
    assert recommend(_curve(0.60, 0.75, 0.85, 0.93), rows=rows)["vs_next"] is None  # the last layer: no next
