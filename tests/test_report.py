"""Plots and HTML reports: every plot is a real PNG; every report kind is self-contained, holds its
numbers, escapes what it prints and renders to a non-blank page in a headless browser."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from featcache.reports import plots
from featcache.errors import ConfigError, FeatcacheError
from featcache.runs.fit import FitConfig
from featcache.metrics.scores import split_metrics
from featcache.reports.leaderboard import leaderboard, leaderboard_csv, leaderboard_markdown
from featcache.reports.pages import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<b>x</b>"
CLASSES = ["ants", "bees", EVIL, "wasps", "flies", "moths"]
CHROMIUM = Path("/usr/bin/chromium")


# --- synthetic inputs ------------------------------------------------------------------------


def _split_metrics(rng, n: int, classes: list[str], skill: float) -> dict:
    """Metrics of a plausible classifier: correct with probability ~skill."""
    y = rng.integers(0, len(classes), n)
    logits = rng.normal(0, 1, (n, len(classes)))
    logits[np.arange(n), y] += 3.0 * skill + rng.normal(0, 0.5, n)
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return split_metrics(y, proba, classes)


def make_run_dir(root: Path) -> Path:
    rng = np.random.default_rng(0)
    run = root / "logreg-run"
    run.mkdir(parents=True)
    grid = [10.0 ** e for e in range(-3, 4)]
    top1 = [0.61, 0.74, 0.83, 0.87, 0.86, 0.85, 0.84]
    ll = [1.21, 0.83, 0.55, 0.41, 0.44, 0.52, 0.63]
    sweep = [{"value": v, "top1": t, "log_loss": l} for v, t, l in zip(grid, top1, ll)]
    best = {"param": "C", "value": 1.0, "score": 0.87, "scored_on": "val"}
    metrics = {"val": _split_metrics(rng, 120, CLASSES, 1.0), "test": _split_metrics(rng, 150, CLASSES, 0.9)}
    fingerprint = {"backbone": {"name": "resnet18", "weights": "IMAGENET1K_V1"}, "layers": ["layer4", "pre_logits"],
                   "pool": "avg", "preprocess": {"resize": 256, "crop": 224}, "precision": "fp32",
                   "dtype": "float16", "channels_last": False, "device_type": "cpu",
                   "source": {"kind": "folder", "spec": "/data/insects"}, "versions": {}, "schema_version": 1}
    meta = {"cache": "/cache/resnet18__insects__0123456789abcdef.h5", "layer": "pre_logits", "classes": CLASSES,
            "fingerprint": fingerprint, "extract_config": {}, "config": FitConfig(head="logreg").to_dict(),
            "best": best, "transform": {"normalize": "standard"}, "format": "featcache-run", "version": 1}
    (run / "run.json").write_text(json.dumps(meta, indent=2))
    (run / "metrics.json").write_text(json.dumps({"metrics": metrics, "sweep": sweep, "best": best,
                                                  "few_shot": None, "seconds": 3.25}, indent=2))
    with open(run / "sweep.csv", "w") as f:
        f.write("C,top1,log_loss\n")
        for r in sweep:
            f.write(f"{r['value']},{r['top1']:.6f},{r['log_loss']:.6f}\n")
    return run


def make_records() -> list[dict]:
    """2 backbones x 2 layers x 3 shots x 2 seeds = 24 records, as bench writes them."""
    rng = np.random.default_rng(1)
    out = []
    for bi, (backbone, base) in enumerate((("resnet18", 0.80), ("efficientnet_lite0", 0.86))):
        cache = f"/cache/{backbone}__digits__{bi:016d}.h5"
        for li, layer in enumerate(("layer3", "pre_logits")):
            for shots, gain in ((1, -0.35), (5, -0.12), (0, 0.0)):
                for seed in range(2):
                    top1 = float(np.clip(base + gain + 0.04 * li + rng.normal(0, 0.02), 0, 1))
                    out.append({
                        "backbone": backbone, "weights": "DEFAULT", "layer": layer, "source": "digits",
                        "head": "logreg", "shots": shots, "seed": seed,
                        "metrics": {"val": {"n": 360, "top1": top1, "balanced_accuracy": top1 - 0.01,
                                            "macro_f1": top1 - 0.02, "log_loss": 1.5 - top1}},
                        "extract_seconds": 12.5 + 4 * bi, "fit_seconds": 0.4 + 0.1 * li + (0.6 if shots == 0 else 0),
                        "cache": cache, "featcache_version": "0.1.0", "best": {"param": "C", "value": 1.0},
                        "run": f"runs/{len(out):05d}",
                    })
    return out


def make_bench_dir(root: Path) -> Path:
    bench = root / "bench"
    bench.mkdir(parents=True)
    with open(bench / "records.jsonl", "w") as f:
        for r in make_records():
            f.write(json.dumps(r) + "\n")
        f.write('{"backbone": "cut by a cra')  # an interrupted write, ignored
    return bench


LAYER_ROWS = [("conv1", 0.41, 64), ("layer1", 0.58, 64), ("layer2", 0.74, 128), ("layer3", 0.86, 256),
              ("layer4", 0.81, 512), ("pre_logits", 0.80, 512)]
REASON = ("layer3 (top-1 0.860) beats the final features (pre_logits, 0.800) by 6.0 points: the layers after it "
          "are specific to the pretraining task & <not> generic. Freeze up to layer3 and fine-tune layer4.")


def make_layers_doc() -> dict:
    layers = [{"name": n, "depth": i, "top1": t, "balanced_accuracy": t - 0.01, "macro_f1": t - 0.015,
               "log_loss": 2.0 - 1.5 * t, "split": "val", "best": {"param": "C", "value": 0.1},
               "fit_seconds": 0.3 + 0.1 * i, "dim": d} for i, (n, t, d) in enumerate(LAYER_ROWS)]
    rec = {"freeze_until": "layer3", "fine_tune": ["layer4"], "strategy": "partial-fine-tune",
           "best_layer": "layer3", "best_top1": 0.86, "last_top1": 0.80, "tolerance": 0.005, "reason": REASON}
    return {"backbone": "resnet18", "source": "digits", "head": "logreg", "cache": "/cache/r18.h5",
            "layers": layers, "recommendation": rec}


def make_layers_dir(root: Path) -> Path:
    d = root / "layers"
    d.mkdir(parents=True)
    (d / "layers.json").write_text(json.dumps(make_layers_doc(), indent=2))
    return d


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Each kind of source folder and its report, written once for the module."""
    root = tmp_path_factory.mktemp("report")
    out = {}
    for kind, make in (("run", make_run_dir), ("bench", make_bench_dir), ("layers", make_layers_dir)):
        src = make(root / "in")
        path = write_report(src, root / "out" / f"{kind}.html")
        out[kind] = (path, path.read_text(encoding="utf-8"))
    return out


# --- plots -----------------------------------------------------------------------------------


def assert_png(path: Path, *, min_bytes: int = 8_000, min_w: int = 400, min_h: int = 250) -> np.ndarray:
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes, f"{path.name} is only {len(data)} bytes"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= min_h and img.shape[1] >= min_w, img.shape
    assert img[..., :3].std() > 0.05  # not a blank canvas
    return img


PLOTS = {
    "shots_curve": lambda p: plots.shots_curve(make_records(), p),
    "accuracy_by_layer": lambda p: plots.accuracy_by_layer(make_records(), p),
    "time_breakdown": lambda p: plots.time_breakdown(make_records(), p),
    "layer_curve": lambda p: plots.layer_curve(make_layers_doc()["layers"], p,
                                               recommendation=make_layers_doc()["recommendation"]),
    "confusion_matrix": lambda p: plots.confusion_matrix([[30, 2, 1], [4, 25, 3], [0, 5, 40]],
                                                         ["ants", EVIL, "$\\undefined$ cost"], p),
    "sweep_curve": lambda p: plots.sweep_curve(
        [{"value": 10.0 ** e, "top1": 0.7 + 0.03 * e - 0.01 * e * e, "log_loss": 0.6 + 0.05 * e * e}
         for e in range(-3, 4)], "C", p, best={"param": "C", "value": 1.0, "scored_on": "val"}),
}


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_plot_writes_a_png(name, tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    path = PLOTS[name](tmp_path / "sub" / f"{name}.png")
    assert path == tmp_path / "sub" / f"{name}.png"
    assert_png(path)
    assert plt.get_fignums() == before  # no figure leaked into pyplot's global state
    assert not list(path.parent.glob("*.tmp"))


def test_shots_curve_one_subplot_per_source_and_several_heads(tmp_path):
    one = assert_png(plots.shots_curve(make_records(), tmp_path / "one.png"))
    recs = make_records()
    for i, r in enumerate(recs):
        r["source"] = "digits" if i % 2 else "folder:/data/insects"
        r["head"] = "logreg" if i % 3 else "knn"
    two = assert_png(plots.shots_curve(recs, tmp_path / "two.png", metric="balanced_accuracy"))
    assert two.shape[1] > 1.5 * one.shape[1]  # two panels side by side


def test_plots_without_the_split_still_draw_and_empty_input_raises(tmp_path):
    recs = make_records()
    for r in recs:
        r["metrics"] = {"test": r["metrics"]["val"]}
    assert_png(plots.shots_curve(recs, tmp_path / "nodata.png"), min_bytes=3_000)
    with pytest.raises(ConfigError, match="needs at least one record"):
        plots.shots_curve([], tmp_path / "x.png")


def test_plot_input_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"square with one row per class \(2 classes\); got shape \(3, 3\)"):
        plots.confusion_matrix(np.eye(3, dtype=int).tolist(), ["a", "b"], tmp_path / "cm.png")
    with pytest.raises(ConfigError, match="needs sweep rows with a numeric 'value'"):
        plots.sweep_curve([], "C", tmp_path / "s.png")
    with pytest.raises(ConfigError, match="at least one layer"):
        plots.layer_curve([], tmp_path / "l.png")


def test_sweep_curve_linear_axis_for_non_positive_values(tmp_path):
    sweep = [{"value": v, "top1": 0.8 - 0.01 * abs(v), "log_loss": 0.5 + 0.02 * abs(v)} for v in (-2, 0, 2, 4)]
    assert_png(plots.sweep_curve(sweep, "shift", tmp_path / "lin.png"))


# --- leaderboard -----------------------------------------------------------------------------


def test_leaderboard_groups_over_seeds_best_first(tmp_path):
    recs = make_records()
    rows = leaderboard(recs)
    assert len(rows) == 2 * 2 * 3 and all(r["runs"] == 2 for r in rows)
    assert list(rows[0]) == ["backbone", "layer", "source", "head", "shots", "split", "held_out", "n", "top1_mean",
                             "top1_ci", "top1_std", "runs", "diff_vs_best", "diff_ci", "p_vs_best", "tied_with_best"]
    means = [r["top1_mean"] for r in rows]
    assert means == sorted(means, reverse=True)
    cell = [r["metrics"]["val"]["top1"] for r in recs
            if (r["backbone"], r["layer"], r["shots"]) == ("resnet18", "layer3", 5)]
    row = next(r for r in rows if (r["backbone"], r["layer"], r["shots"]) == ("resnet18", "layer3", 5))
    assert row["top1_mean"] == pytest.approx(np.mean(cell)) and row["top1_std"] == pytest.approx(np.std(cell))
    assert rows[0]["backbone"] == "efficientnet_lite0" and rows[0]["layer"] == "pre_logits" and rows[0]["shots"] == 0

    md = leaderboard_markdown(rows)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(rows) + 2  # and what the split resolves, under a blank line
    assert lines[-1].startswith("_On val: with 360 val images, differences under 1.7 points are not resolved")
    assert lines[2].startswith("| 1 | efficientnet_lite0 | pre_logits | digits | logreg | all | ")
    assert f"{rows[0]['top1_mean']:.4f}" in lines[2]

    path = leaderboard_csv(rows, tmp_path / "lb" / "leaderboard.csv")
    back = list(csv.DictReader(open(path)))
    assert len(back) == len(rows) and back[0]["shots"] == "0"
    assert float(back[0]["top1_mean"]) == pytest.approx(rows[0]["top1_mean"])


def test_leaderboard_cells_without_the_split_sort_last():
    recs = make_records()[:4]
    recs[0]["metrics"] = {"test": {"top1": 0.99}}
    recs[1]["metrics"] = {"test": {"top1": 0.99}}
    rows = leaderboard(recs)
    assert rows[-1]["top1_mean"] is None and rows[-1]["runs"] == 2
    assert "| – | – | 2 |" in leaderboard_markdown(rows)


# --- reports ---------------------------------------------------------------------------------


def assert_self_contained(html: str, n_images: int) -> None:
    assert html.startswith("<!DOCTYPE html>")
    assert 'src="http' not in html and "src='http" not in html
    assert "<script" not in html.lower()
    assert "<link" not in html.lower()  # no external stylesheet
    assert not re.search(r"url\((?!#)", html)  # no CSS fetches
    assert html.count("data:image/png;base64,") == n_images


def test_run_report(reports):
    path, html = reports["run"]
    assert_self_contained(html, n_images=2)  # confusion matrix + sweep
    metrics = json.loads((path.parent.parent / "in" / "logreg-run" / "metrics.json").read_text())["metrics"]
    for split in ("val", "test"):
        for key in ("top1", "top5", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss"):
            assert f"{metrics[split][key]:.4f}" in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html and EVIL not in html
    table = re.search(r'<table id="recall">.*?</table>', html, re.S).group(0)
    assert table.count("<tr") == 1 + len(CLASSES)
    for fact in ("resnet18", "pre_logits", "logreg", "C = 1 (top-1 0.8700 on val)",
                 "/cache/resnet18__insects__0123456789abcdef.h5", "3.2 s"):
        assert html.count(fact) >= 1, fact
    assert '<span class="tag">eval</span>' in html


def test_bench_report(reports):
    _, html = reports["bench"]
    assert_self_contained(html, n_images=4)  # leaderboard intervals, shots curve, accuracy by layer, time breakdown
    table = re.search(r'<table id="leaderboard">.*?</table>', html, re.S).group(0)
    rows = leaderboard(make_records())
    assert table.count("<tr") == 1 + len(rows)
    cells = re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S)[1:]
    for row, cell_html in zip(rows, cells):
        text = re.sub(r"<[^>]+>", "|", cell_html)
        assert f"|{row['backbone']}|" in text and f"|{row['layer']}|" in text
        assert f"{row['top1_mean']:.3f}" in text and f"{row['top1_std']:.4f}" in text
    assert "24" in re.search(r"<dt>runs</dt><dd>(\d+)</dd>", html).group(1)
    assert "1, 5, all" in html


def test_layers_report(reports):
    _, html = reports["layers"]
    assert_self_contained(html, n_images=1)
    assert "Freeze the backbone up to and including layer3; fine-tune layer4 with a new classifier." in html
    assert "partial fine-tune" in html
    assert REASON.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in html
    table = re.search(r'<table id="layers">.*?</table>', html, re.S).group(0)
    assert table.count("<tr") == 1 + len(LAYER_ROWS)
    assert re.search(r'<tr class="freeze"><td class="wrap">layer3<span class="tag freeze">', table)
    assert '<tr class="tune"><td class="wrap">layer4' in table
    for name, top1, dim in LAYER_ROWS:
        assert f">{top1:.3f}<" in table and f">{dim}<" in table


def test_report_into_a_folder_and_atomic(tmp_path):
    src = make_layers_dir(tmp_path)
    out = tmp_path / "site"
    out.mkdir()
    path = write_report(src, out)
    assert path == out / "report.html" and path.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]


def test_unknown_folder_names_the_expected_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError) as e:
        write_report(tmp_path, tmp_path / "r.html")
    assert isinstance(e.value, FeatcacheError)
    assert str(e.value) == (
        f"'{tmp_path}' is not a featcache run, bench or layers folder: expected run.json and metrics.json "
        "(from 'featcache fit-head'), records.jsonl (from 'featcache bench') or layers.json (from 'featcache "
        "probe-layers'). It holds: notes.txt."
    )
    with pytest.raises(ConfigError, match="does not exist"):
        write_report(tmp_path / "missing", tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_broken_json_is_a_config_error(tmp_path):
    d = tmp_path / "layers"
    d.mkdir()
    (d / "layers.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"layers\.json' is not valid JSON"):
        write_report(d, tmp_path / "r.html")


def test_run_without_sweep_or_val(tmp_path):
    run = make_run_dir(tmp_path)
    doc = json.loads((run / "metrics.json").read_text())
    doc["metrics"].pop("val")
    doc["sweep"] = []
    doc["best"] = {"param": "C", "value": 1.0, "score": None, "scored_on": None}
    (run / "metrics.json").write_text(json.dumps(doc))
    html = write_report(run, tmp_path / "r.html").read_text()
    assert_self_contained(html, n_images=1)  # the confusion matrix on test
    assert "Confusion matrix (test)" in html and "This head swept nothing" in html


# --- rendered in a browser -------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WINDOW = (1280, 5000)


def need_chromium() -> None:
    """Skip without a browser on a workstation; fail in CI, where 'make test' installs it."""
    if CHROMIUM.exists() and shutil.which(str(CHROMIUM)):
        return
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{CHROMIUM} is missing in CI: 'make test' installs it (apt-get install -y chromium); the "
                    f"browser check must run there.")
    pytest.skip("chromium not installed ('make test' installs it as root: apt-get install -y chromium)")


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def screenshot(html_path: Path, png: Path, profile: Path) -> np.ndarray:
    proc = _chromium([f"--screenshot={png}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars",
                      html_path.resolve().as_uri()], profile)
    assert png.is_file(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return mpimg.imread(png)[..., :3]


def visible_text(html_path: Path, profile: Path) -> str:
    """The text of the page as the browser parsed it (--dump-dom), tags removed."""
    proc = _chromium(["--dump-dom", html_path.resolve().as_uri()], profile)
    assert proc.returncode == 0 and "<body" in proc.stdout, proc.stderr[-2000:]
    body = re.sub(r"<style.*?</style>", " ", proc.stdout, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " | ", body))


def coloured_pixels(rgb: np.ndarray) -> int:
    """Pixels of a saturated colour (plot lines, bars, colour maps), not grey text or white."""
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25).sum())


@pytest.fixture(scope="module")
def real_reports(tmp_path_factory) -> dict[str, Path]:
    """Reports of folders the commands wrote: a bench leaderboard, a fit-head run, a probe-layers run."""
    from click.testing import CliRunner

    from conftest import make_image_folder
    from featcache.cli import main

    root = tmp_path_factory.mktemp("real-report")
    folder = make_image_folder(root / "imgs", classes=("ants", "bees", "wasps"), per_class=6)
    ex = ["--input-size", "32", "--workers", "0", "--dtype", "float32", "--cache-dir", str(root / "c")]

    def cli(*args):
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r

    cli("bench", "--backbones", "resnet18.none", "--sources", folder, "--layers", "layer3,pre_logits", "--heads",
        "logreg,ncm", "--shots", "2,0", *ex, "-o", root / "bench", "-q")
    cache = json.loads(cli("extract", folder, "--backbone", "resnet18.none", *ex, "--json").stdout)["cache"]
    cli("fit-head", cache, "--head", "logreg", "-o", root / "run")
    cli("probe-layers", "resnet18.none", folder, "--head", "ncm", *ex, "-o", root / "layers")
    return {kind: write_report(root / kind, root / "html" / f"{kind}.html") for kind in ("run", "bench", "layers")}


@pytest.mark.parametrize("kind, plots_drawn", [("run", 2), ("bench", 4), ("layers", 1)])
def test_report_renders_in_chromium(kind, plots_drawn, real_reports, tmp_path):
    """What a person sees: a page with text, tables and every plot drawn, and no '?' for a value."""
    need_chromium()
    path = real_reports[kind]
    html = path.read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == plots_drawn
    rgb = screenshot(path, tmp_path / f"{kind}.png", tmp_path / "profile")
    assert rgb.shape[:2] == (WINDOW[1], WINDOW[0])
    q = (rgb * 255).astype(np.uint32)
    assert len(np.unique((q[..., 0] << 16) | (q[..., 1] << 8) | q[..., 2])) > 50  # text, tables, plots
    # The same page without its images: the plots are what the screenshot's colour comes from.
    bare = tmp_path / f"{kind}-bare.html"
    bare.write_text(re.sub(r'<img [^>]*src="data:image/png;base64,[^"]*"[^>]*>', "", html), encoding="utf-8")
    without = screenshot(bare, tmp_path / f"{kind}-bare.png", tmp_path / "profile")
    drawn, chrome = coloured_pixels(rgb), coloured_pixels(without)
    assert drawn - chrome > 2_000 * plots_drawn, (drawn, chrome)  # a line plot colours ~3000 pixels
    text = visible_text(path, tmp_path / "profile")
    assert not re.search(r"\| \? \||\?\s*\(|: \?|= \?", text), re.findall(r".{60}\?.{60}", text)
    assert " nan " not in text.lower() and "None" not in text


def test_missing_chromium_fails_in_ci(monkeypatch):
    import featcache  # noqa: F401  (the check is about the test helper itself)

    monkeypatch.setattr(f"{__name__}.CHROMIUM", Path("/nonexistent/chromium"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="missing in CI"):
        need_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="chromium not installed"):
        need_chromium()


def test_plot_legends_and_titles_fit_the_figure(tmp_path):
    """Long labels (backbone · head · source) once ran off both edges of layers.png."""
    recs = [{"backbone": "resnet50.IMAGENET1K_V2", "head": head, "layer": "pre_logits", "source": src, "shots": 0,
             "seed": 0, "metrics": {"val": {"top1": 0.8}}, "extract_seconds": 1.0, "fit_seconds": 1.0, "cache": src}
            for src in ("/data/some/long/path/hymenoptera_data", "/data/other/long/path/medmnist_blood.npz")
            for head in ("logreg", "ncm")]
    from matplotlib.figure import Figure

    drawn = {}
    original = Figure.savefig

    def spy(fig, *a, **k):
        renderer = fig.canvas.get_renderer()
        drawn["extents"] = [t.get_window_extent(renderer) for t in (*fig.legends, *[ax.title for ax in fig.axes])]
        drawn["width"] = fig.bbox.width
        return original(fig, *a, **k)

    import unittest.mock

    with unittest.mock.patch.object(Figure, "savefig", spy):
        plots.accuracy_by_layer(recs, tmp_path / "layers.png")
    assert drawn["extents"] and all(e.x0 >= 0 and e.x1 <= drawn["width"] for e in drawn["extents"])
    rows = [{"name": n, "top1": 0.9} for n in ("layer1", "layer2", "pre_logits")]
    with unittest.mock.patch.object(Figure, "savefig", spy):
        plots.layer_curve(rows, tmp_path / "curve.png", title="resnet18.none on /tmp/a/very/long/path/to/the/"
                                                              "images/folder/of/some/user: ncm head per layer")
    assert all(e.x0 >= 0 and e.x1 <= drawn["width"] for e in drawn["extents"])


def test_run_report_of_a_layer_sweep_shows_the_layers_and_the_chosen_layers_curve(tmp_path):
    run = make_run_dir(tmp_path)
    doc = json.loads((run / "metrics.json").read_text())
    doc["sweep"] = [{**r, "layer": "pre_logits", "score": r["top1"]} for r in doc["sweep"]] + [
        {"layer": "layer4", "value": v, "top1": 0.5, "log_loss": 0.9, "score": 0.5} for v in (0.1, 1.0, 10.0)]
    doc["best"] = {**doc["best"], "select_by": "balanced_accuracy", "layer": "pre_logits",
                   "layers": [{"layer": "layer4", "value": 1.0, "score": 0.5, "log_loss": 0.9},
                              {"layer": "pre_logits", "value": 1.0, "score": 0.87, "log_loss": 0.41}]}
    (run / "metrics.json").write_text(json.dumps(doc))
    html = write_report(run, tmp_path / "r.html").read_text()
    assert 'id="layers"' in html and "Sweep of C on pre_logits" in html
    sweep_table = html[html.index('id="sweep"'):]
    sweep_table = sweep_table[:sweep_table.index("</table>")]
    assert sweep_table.count("<tr") == 1 + 7  # the header and pre_logits' 7 values, not layer4's
    assert sweep_table.count('class="top"') == 1
    assert "Chosen by balanced_accuracy on val" in html
