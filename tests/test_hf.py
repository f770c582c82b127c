"""The hf: family on tiny random transformers models (tests/hf_models.py): taps and pools equal the
model's own outputs, preprocessing comes from the processor config, identity covers weights and
configs, and the errors say what to do. No network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featcache import extract, open_cache
from featcache.backbones import OUTPUT, load_backbone, weights_sha256_without_building
from featcache.cli import main
from featcache.errors import ConfigError, WeightsUnavailableError
from featcache.backbones.taps import FeatureTap, list_layers

transformers = pytest.importorskip("transformers")  # in the [test] extra: present in CI


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from hf_models import make

    root = tmp_path_factory.mktemp("hf")
    return {k: make(k, root / k) for k in ("vit", "dinov2", "clip", "siglip", "convnext")}


def _tap(bb, layers, how):
    infos = list_layers(bb, depth=None)
    tap = FeatureTap(bb, layers, how, order=[i.name for i in infos])
    x = torch.randn(3, 3, bb.preprocess.crop, bb.preprocess.crop, generator=torch.Generator().manual_seed(1))
    try:
        with torch.inference_mode():
            return x, tap(x)
    finally:
        tap.remove()


@pytest.mark.parametrize("kind", ["vit", "dinov2", "clip"])
def test_blocks_and_pools_are_the_models_own_hidden_states(folders, kind):
    bb = load_backbone(f"hf:{folders[kind]}")
    assert bb.stage_layers == (*[f"block.{i}" for i in range(len(bb.stages))], OUTPUT) and bb.prefix_tokens == 1
    x, cls = _tap(bb, [*bb.stages, OUTPUT], "cls")
    _, both = _tap(bb, [*bb.stages, OUTPUT], "cls+mean")
    model = bb.model.model
    with torch.inference_mode():
        out = model(pixel_values=x, output_hidden_states=True)
    for i, name in enumerate(bb.stages):
        torch.testing.assert_close(cls[name], out.hidden_states[i + 1][:, 0])
        torch.testing.assert_close(both[name], torch.cat([out.hidden_states[i + 1][:, 0],
                                                          out.hidden_states[i + 1][:, 1:].mean(1)], 1))
    # The output's class token: after the model's last norm (CLIP's pooler output is exactly that).
    torch.testing.assert_close(cls[OUTPUT], out.pooler_output if kind == "clip" else out.last_hidden_state[:, 0])


def test_a_model_without_class_token_refuses_cls_and_pools_its_mean(folders, image_folder, tmp_path):
    for kind in ("siglip", "convnext"):
        spec = f"hf:{folders[kind]}"
        with pytest.raises(ConfigError, match=rf"--pool cls reads a class token; hf:{kind} has none. Use --pool mean"):
            extract(str(image_folder), backbone=spec, pool="cls", num_workers=0, cache_dir=str(tmp_path))
    bb = load_backbone(f"hf:{folders['siglip']}")
    x, mean = _tap(bb, ["block.1"], "mean")
    with torch.inference_mode():
        out = bb.model.model(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(mean["block.1"], out.hidden_states[2].mean(1))


def test_preprocessing_comes_from_the_processor_config(folders):
    pp = load_backbone(f"hf:{folders['dinov2']}").preprocess
    assert (pp.resize, pp.crop, pp.interpolation, pp.mean) == (36, 32, "bicubic", (0.485, 0.456, 0.406))
    pp = load_backbone(f"hf:{folders['convnext']}").preprocess  # shorter side to 32 / crop_pct, crop 32
    assert (pp.resize, pp.crop, pp.interpolation) == (37, 32, "bicubic")
    pp = load_backbone(f"hf:{folders['clip']}").preprocess
    assert (pp.resize, pp.crop, pp.std) == (32, 32, (0.26862954, 0.26130258, 0.27577711))


def test_a_changed_config_or_processor_is_a_cache_miss(folders, image_folder, tmp_path):
    import shutil

    folder = shutil.copytree(folders["vit"], tmp_path / "vit")
    options = dict(backbone=f"hf:{folder}", input_size=32, num_workers=0, dtype="float32", precision="fp32",
                   device="cpu", cache_dir=str(tmp_path / "cache"))
    first = extract(str(image_folder), **options)
    known, sha = weights_sha256_without_building(f"hf:{folder}")
    assert known and sha == json.loads(open_cache(first.cache).text_attr("fingerprint"))["backbone"]["weights_sha256"]
    for name, key, value in (("config.json", "layer_norm_eps", 1e-5), ("preprocessor_config.json", "image_mean", [0.4] * 3)):
        cfg = json.loads((folder / name).read_text())
        cfg[key] = value
        (folder / name).write_text(json.dumps(cfg))
        again = extract(str(image_folder), **options)
        assert not again.cache_hit and again.cache != first.cache
        assert weights_sha256_without_building(f"hf:{folder}") != (known, sha)
        first = again


def test_errors_name_the_next_step(folders, tmp_path):
    with pytest.raises(ConfigError, match="hf: backbones read their weights from their folder; drop --weights"):
        load_backbone(f"hf:{folders['vit']}", weights=tmp_path / "w.pt")
    from featcache.backbones import check_backbone_spec
    from featcache.errors import BackboneError

    with pytest.raises(BackboneError, match=f"Hugging Face model folder '{tmp_path}/nope' does not exist"):
        check_backbone_spec(f"hf:{tmp_path}/nope")  # bench refuses it before any extraction
    check_backbone_spec("hf:facebook/dinov2-small")  # a hub name: known once it is fetched
    # A hub name not downloaded yet: unknown without building, and refused offline with the way out.
    assert weights_sha256_without_building("hf:featcache-tests/not-a-model") == (False, None)
    with pytest.raises(WeightsUnavailableError, match=r"Cannot fetch the Hugging Face model .*save_pretrained\(FOLDER\)"):
        load_backbone("hf:featcache-tests/not-a-model", download=False)


def test_cli_extract_every_block_and_fit_every_layer(folders, image_folder, tmp_path):
    r = CliRunner().invoke(main, ["extract", str(image_folder), "-b", f"hf:{folders['dinov2']}", "--layer", "all",
                                  "--pool", "cls+mean", "--workers", "0", "--cache-dir", str(tmp_path / "c"), "--json"])
    assert r.exit_code == 0, r.output
    cache = json.loads(r.output)["cache"]
    with open_cache(cache) as c:
        assert c.layers == ["block.0", "block.1", "block.2", "output"]
        assert c.features("train", "block.1").shape == (12, 64)
    r = CliRunner().invoke(main, ["fit-head", cache, "--layer", "all", "--head", "ncm", "--runs-dir",
                                  str(tmp_path / "runs"), "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["layers", f"hf:{folders['dinov2']}", "--json"])
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert rows["block.2"] == {"name": "block.2", "shape": [17, 32], "stage": True}
    assert np.isfinite(rows["output"]["shape"]).all()


def test_probe_layers_scores_every_block_of_a_transformer(folders, image_folder, tmp_path):
    from featcache.extraction.plan import ExtractConfig
    from featcache.runs.probe import probe_layers

    res = probe_layers(f"hf:{folders['vit']}", str(image_folder), out_dir=tmp_path / "probe", head="ncm",
                       extract_config=ExtractConfig(num_workers=0, pool="cls", cache_dir=str(tmp_path / "c")))
    assert [r["name"] for r in res.layers] == ["block.0", "block.1", "output"]
