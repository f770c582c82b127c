"""The command line answers without importing torch where it needs none, and a cache hit builds
no network (issue 14). Checked by the modules a fresh process holds, never by time."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch

from featcache import extract
from featcache.extraction.plan import ExtractConfig

HEAVY = ("torch", "torchvision", "sklearn", "PIL")
plan_mod = importlib.import_module("featcache.extraction.plan")


def _imported_after(code: str, cwd) -> list[str]:
    script = (f"import sys, json\n{code}\n"
              f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cli(args: list[str]) -> str:
    """Run ``featcache ARGS`` in this process (what the subprocess runs) and fail on a failure."""
    return ("from featcache.cli import main\n"
            f"try:\n    main({args!r}, standalone_mode=False)\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n")


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """A pooled cache of digits (resnet18.none at 32 px), and the options that made it."""
    options = dict(backbone="resnet18.none", input_size=32, batch_size=64, num_workers=0, dtype="float32",
                   precision="fp32", device="cpu", cache_dir=str(tmp_path_factory.mktemp("startup") / "cache"))
    res = extract("digits", **options)
    return res.cache, options


@pytest.mark.parametrize("args", [["--help"], ["ls"], ["ls", "--json"], ["extract", "--help"], ["fit-head", "--help"],
                                  ["backbones"], ["backbones", "--json"], ["sources"]])
def test_cli_without_work_imports_no_torch(tmp_path, args):
    assert _imported_after(_cli(args), tmp_path) == []


def test_listing_heads_imports_no_torch(tmp_path):
    # Heads are scikit-learn estimators: listing them imports scikit-learn, never torch.
    assert _imported_after(_cli(["heads"]) + _cli(["heads", "--json"]), tmp_path) == ["sklearn"]


def test_fit_head_with_a_scikit_learn_head_imports_no_torch(tmp_path, small_cache):
    cache, _ = small_cache
    args = ["fit-head", cache, "--head", "logreg", "--C", "1", "--runs-dir", str(tmp_path / "runs"), "--json"]
    assert _imported_after(_cli(args), tmp_path) == ["sklearn"]


def test_info_imports_no_torch(tmp_path, small_cache):
    cache, _ = small_cache
    assert _imported_after(_cli(["info", cache]) + _cli(["info", cache, "--json"]), tmp_path) == []


def test_fit_head_with_a_scikit_learn_head_imports_no_torchvision(tmp_path, small_cache):
    cache, _ = small_cache
    args = ["fit-head", cache, "--head", "logreg", "--C", "1", "--runs-dir", str(tmp_path / "runs"), "--json"]
    assert "torchvision" not in _imported_after(_cli(args), tmp_path)


def test_a_cache_hit_imports_no_torchvision(tmp_path, small_cache):
    cache, options = small_cache
    args = ["extract", "digits", "-b", options["backbone"], "--input-size", "32", "--batch-size", "64",
            "--workers", "0", "--dtype", "float32", "--precision", "fp32", "--device", "cpu",
            "--cache-dir", options["cache_dir"], "--json"]
    code = ("import contextlib, io\nbuf = io.StringIO()\nwith contextlib.redirect_stdout(buf):\n"
            + "".join("    " + line + "\n" for line in _cli(args).splitlines())
            + "out = json.loads(buf.getvalue())\n"
            f"assert out['cache_hit'] and out['cache'] == {cache!r}, out\n")
    # torch for the device check; no torchvision: the network (a torchvision resnet18) was not built
    assert "torchvision" not in _imported_after(code, tmp_path)


def test_reading_a_cache_imports_no_torch(tmp_path):
    assert _imported_after("import featcache\nfrom featcache import open_cache, list_caches", tmp_path) == []


def test_backbones_import_no_torch_and_list_every_torchvision_model(tmp_path):
    code = "from featcache.backbones import list_backbones, TORCHVISION_MODELS\nlist_backbones()"
    assert _imported_after(code, tmp_path) == []
    import torchvision.models as tvm

    from featcache.backbones import TORCHVISION_MODELS

    assert sorted(TORCHVISION_MODELS) == sorted(tvm.list_models(module=tvm))


def test_public_names_are_the_functions_whatever_the_import_order(tmp_path):
    code = ("import featcache.extraction.pipeline, featcache.runs.inference\n"
            "from featcache.extraction.pipeline import ExtractConfig\n"
            "from featcache import extract, predict, probe_layers\n"
            "import types\n"
            "assert all(isinstance(f, types.FunctionType) for f in (extract, predict, probe_layers)), (extract, predict)\n"
            "assert sorted(featcache.__all__) == featcache.__all__ and all(hasattr(featcache, n) for n in featcache.__all__)")
    assert set(_imported_after(code, tmp_path)) >= {"torch"}


# --- a cache hit is found without building the network, and only a true hit ----------------------

def _counting_builds(monkeypatch) -> list:
    built, real = [], plan_mod.load_backbone
    monkeypatch.setattr(plan_mod, "load_backbone", lambda *a, **k: built.append(a) or real(*a, **k))
    return built


def test_a_hit_builds_no_network_and_a_changed_weights_file_is_a_miss(monkeypatch, tmp_path, tiny):
    from featcache.backbones import load_backbone

    weights = tmp_path / "w.pt"
    torch.save(load_backbone("resnet18.none").model.state_dict(), weights)
    config = ExtractConfig(**{**tiny, "weights": str(weights)})
    built = _counting_builds(monkeypatch)
    first = extract("digits", config)
    again = extract("digits", config)
    assert (first.cache_hit, again.cache_hit, again.cache, len(built)) == (False, True, first.cache, 1)

    sd = torch.load(weights)
    sd["fc.bias"] += 1.0  # another network under the same file name: its features differ
    torch.save(sd, weights)
    changed = extract("digits", config)
    assert (changed.cache_hit, len(built)) == (False, 2) and changed.cache != first.cache


@pytest.mark.parametrize("change", [dict(layers=("layer3",)), dict(input_size=40), dict(fold_bn=False)])
def test_other_options_are_not_a_hit(monkeypatch, tiny, change):
    built = _counting_builds(monkeypatch)
    first = extract("digits", **tiny)
    other = extract("digits", **{**tiny, **change})
    assert (other.cache_hit, len(built)) == (False, 2) and other.cache != first.cache


def test_a_renamed_cache_is_not_found_by_its_contents(monkeypatch, tiny, tmp_path):
    from pathlib import Path

    first = Path(extract("digits", **tiny).cache)
    first.rename(first.with_name("renamed.h5"))
    built = _counting_builds(monkeypatch)
    res = extract("digits", **tiny)  # where prepare looks, there is no file: extracted again
    assert (res.cache_hit, res.cache, len(built)) == (False, str(first), 1)
