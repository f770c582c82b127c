"""The command line: exit codes, JSON outputs and exact error texts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from featcache.cli import main

TINY = ["--backbone", "resnet18.none", "--input-size", "32", "--workers", "0", "--dtype", "float32"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_extract_json_then_cache_hit_info_and_ls(image_folder, tmp_path):
    cache_dir = tmp_path / "cache"
    r = run("extract", image_folder, *TINY, "--cache-dir", cache_dir, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert set(out) >= {"cache", "splits", "failed", "cache_hit", "seconds", "images_per_second"}
    assert (out["splits"], out["failed"], out["cache_hit"]) == ({"train": 12, "val": 12}, 0, False)
    # compute_seconds is printed to the millisecond: a fast run's rate is known to that rounding only.
    lo, hi = out["computed"] / (out["compute_seconds"] + 5e-4), out["computed"] / max(out["compute_seconds"] - 5e-4, 1e-9)
    assert lo * 0.99 <= out["images_per_second"] <= hi * 1.01
    assert 0 < out["compute_seconds"] <= out["seconds"]
    again = json.loads(run("extract", image_folder, *TINY, "--cache-dir", cache_dir, "--json").output)
    assert again["cache_hit"] is True and again["cache"] == out["cache"]

    r = run("info", out["cache"], "--json")
    info = json.loads(r.output)
    assert info["splits"]["train"]["features"]["pre_logits"]["shape"] == [12, 512]
    assert info["fingerprint"]["backbone"]["name"] == "resnet18.none"
    r = run("info", out["cache"])
    assert "resnet18.none" in r.output and re.search(r"train +12 samples", r.output)

    r = run("ls", "--cache-dir", cache_dir)
    assert r.exit_code == 0 and "resnet18.none" in r.output and "train=12" in r.output


def test_extract_human_output(image_folder, tmp_path):
    r = run("extract", image_folder, *TINY, "--cache-dir", tmp_path / "c", "-q")
    assert r.exit_code == 0
    assert "24 images extracted" in r.output and "splits: train 12, val 12" in r.output


def test_errors_are_one_line_with_the_fix(image_folder, tmp_path):
    r = run("extract", image_folder, *TINY, "--cache-dir", tmp_path, "--batch-size", "0")
    assert r.exit_code == 1
    assert r.output == "Error: The --batch-size option must be an int >= 1. Got 0.\n"
    r = run("extract", image_folder, *TINY, "--cache-dir", tmp_path, "--layer", "layer5")
    assert r.output == ("Error: Layer 'layer5' is not in resnet18.none. Run 'featcache layers resnet18.none' "
                        "to list the layers.\n")
    r = run("extract", tmp_path / "missing", *TINY)
    assert r.exit_code == 1 and r.output.startswith("Error: Source '") and "is not a folder" in r.output
    r = run("extract", image_folder, "--backbone", "nonet")
    assert r.output == "Error: Unknown backbone 'nonet'. Run 'featcache backbones' to list them.\n"
    r = run("info", tmp_path / "nothing.h5")
    assert r.output.startswith("Error: Cache file") and "does not exist" in r.output


def test_layers_json_and_backbones():
    r = run("layers", "resnet18.none", "--json", "--depth", "1")
    rows = json.loads(r.output)
    assert {"name": "layer2", "shape": [128, 28, 28], "stage": True} in rows
    assert [r["name"] for r in rows[-3:]] == ["pre_logits", "fc", "output"]
    r = run("backbones")
    assert "efficientnet_lite0" in r.output and "resnet50" in r.output and "timm:NAME" in r.output
    r = run("sources")
    assert "digits" in r.output and "npz" in r.output


def test_heads_json_lists_each_option_with_its_default_and_allowed_values():
    from featcache.heads import HEADS

    r = run("heads", "--json")
    assert r.exit_code == 0, r.output
    rows = {h["name"]: h for h in json.loads(r.output)}
    assert list(rows) == HEADS.names()
    for name, row in rows.items():  # every option of the signature, in its order, from the registry
        assert list(row["options"]) == list(HEADS.get(name).options), name
    assert rows["linear"]["options"]["C"] == {
        "default": 1.0, "constraint": "a finite number > 0", "help": "Inverse L2 strength (scikit-learn's meaning)"}
    assert rows["linear"]["options"]["solver"]["constraint"] == "one of 'lbfgs', 'adamw'"
    assert rows["linear"]["options"]["max_memory"]["default"] == 2 << 30
    assert rows["ncm"]["options"]["temperature"] == {
        "default": None, "constraint": "None or a finite number > 0",
        "help": "Softmax temperature of predict_proba = softmax(scores); None means 0.05 for cosine and 1.0 for "
                "euclidean"}
    assert rows["tail"]["options"]["boundary"]["required"] is True
    assert rows["tail"]["options"]["augment"]["default"] == "flip+crop"
    r = run("heads")
    assert "--opt C=1.0  a finite number > 0; Inverse L2 strength" in r.output
    assert "--opt solver=lbfgs  one of 'lbfgs', 'adamw';" in r.output
    assert "--opt boundary=(required)  the name of the layer" in r.output
    assert "--opt class_weight=null  one of None, 'balanced';" in r.output


def test_help_lists_every_command():
    r = run("--help")
    for cmd in ("extract", "layers", "backbones", "info", "ls"):
        assert cmd in r.output


def test_extract_device_thread_and_layout_options(image_folder, tmp_path):
    r = run("extract", image_folder, *TINY, "--cache-dir", tmp_path, "--device", "cpu", "--threads", "1",
            "--no-channels-last", "--batch-size", "5", "--json")
    out = json.loads(r.output)
    r = run("info", out["cache"], "--json")
    fp = json.loads(r.output)["fingerprint"]
    assert (fp["device_type"], fp["channels_last"]) == ("cpu", False)
    r = run("extract", image_folder, *TINY, "--device", "cuda:7")
    assert r.exit_code == 1 and ("CUDA is not available" in r.output or r.output.startswith("Error:"))


def test_finetune_command_json(image_folder, tmp_path):
    r = run("finetune", image_folder, "-b", "resnet18.none", "--freeze-until", "layer3", "--epochs", "1",
            "--batch-size", "8", "--input-size", "32", "--precision", "fp32", "--workers", "0",
            "-o", tmp_path / "ft", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert {"run", "metrics", "seconds"} <= set(out) and "top1" in out["metrics"]["val"]
    assert (tmp_path / "ft" / "model.safetensors").is_file()
    meta = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert (meta["precision"], meta["config"]["num_workers"]) == ("fp32", 0)
    r = run("finetune", image_folder, "-b", "resnet18.none")
    assert r.exit_code == 1 and r.output.startswith("Error:") and "freeze" in r.output


def test_extract_checkpoint_decode_and_compile_options(image_folder, tmp_path):
    """--checkpoint-every and --decode-on-device reach the extraction; --compile reaches the
    fingerprint (checked with --dry-run: a compile takes seconds)."""
    r = run("extract", image_folder, *TINY, "--cache-dir", tmp_path, "--checkpoint-every", "0",
            "--decode-on-device", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    fp = json.loads(run("info", out["cache"], "--json").output)["fingerprint"]
    assert fp["decode"] == "torchvision" and out["splits"] == {"train": 12, "val": 12}
    plain = json.loads(run("extract", image_folder, *TINY, "--cache-dir", tmp_path, "--dry-run", "--json").output)
    compiled = json.loads(run("extract", image_folder, *TINY, "--cache-dir", tmp_path, "--compile", "--dry-run",
                              "--json").output)
    assert compiled["cache"] != plain["cache"] and not compiled["exists"]
    r = run("extract", image_folder, *TINY, "--checkpoint-every", "-1")
    assert r.exit_code == 1 and "--checkpoint-every option must be a number of seconds >= 0" in r.output


def _json_commands():
    return sorted(name for name, cmd in main.commands.items() if any(p.name == "as_json" for p in cmd.params))


def test_every_json_command_prints_one_json_object_when_it_fails(tmp_path):
    names = _json_commands()
    assert {"extract", "info", "fit-head", "bench", "predict", "evaluate", "export", "report"} <= set(names)
    for name in names:
        r = CliRunner().invoke(main, [name, "--json", "--no-such-option"])
        assert r.exit_code == 1, (name, r.output)
        out = json.loads(r.stdout)
        assert out["type"] == "NoSuchOption" and "--no-such-option" in out["error"], name
        assert r.stderr.endswith(f"Error: {out['error']}\n")


def test_json_errors_carry_the_library_message_and_type(image_folder, tmp_path):
    r = CliRunner().invoke(main, ["info", str(tmp_path / "nothing.h5"), "--json"])
    out = json.loads(r.stdout)
    assert r.exit_code == 1 and out["type"] == "CacheError" and out["error"].startswith("Cache file")
    assert r.stderr == f"Error: {out['error']}\n"
    r = CliRunner().invoke(main, ["extract", str(image_folder), *TINY, "--batch-size", "0", "--json"])
    assert json.loads(r.stdout) == {"error": "The --batch-size option must be an int >= 1. Got 0.",
                                    "type": "ConfigError"}
    r = CliRunner().invoke(main, ["info", str(tmp_path / "nothing.h5")])  # without --json stdout stays empty
    assert r.exit_code == 1 and r.stdout == ""


def _cache(image_folder, tmp_path):
    out = json.loads(run("extract", image_folder, *TINY, "--cache-dir", tmp_path / "cache", "--json").output)
    return out["cache"]


def test_fit_head_refuses_to_overwrite_a_run(image_folder, tmp_path):
    cache = _cache(image_folder, tmp_path)
    r = run("fit-head", cache, "--head", "ncm", "-o", tmp_path / "run")
    assert r.exit_code == 0, r.output
    before = (tmp_path / "run" / "run.json").read_text()
    r = run("fit-head", cache, "--head", "knn", "-o", tmp_path / "run")
    assert r.exit_code == 1
    assert r.output == (f"Error: '{tmp_path / 'run'}' already holds a run. Pass --overwrite to replace it, or "
                        f"choose another output folder.\n")
    assert (tmp_path / "run" / "run.json").read_text() == before
    r = run("fit-head", cache, "--head", "knn", "-o", tmp_path / "run", "--overwrite")
    assert r.exit_code == 0 and '"head": "knn"' in (tmp_path / "run" / "head.json").read_text()


def test_options_that_do_not_apply_are_refused(image_folder, tmp_path):
    cache = _cache(image_folder, tmp_path)
    for args, error in [
        (("--head", "ncm", "--C", "0.1,1"), "--C does not apply to head 'ncm': it sweeps no parameter. Drop --C."),
        (("--head", "logreg", "--C", ""), "The grid (--C) is empty. Pass values, e.g. --C 0.01,0.1,1 or "
                                           "logspace:-4:4:13, or drop --C for the head's own grid."),
        (("--head", "ncm", "--seeds", "3"), "--seeds 3 applies to few-shot fits only. Add the --shots option or drop the --seeds option."),
        (("--head", "ncm", "--cv", "3"), "The --cv option applies only without an eval split; this sweep is scored "
                                          "on 'val'. Drop the --cv option, or pass --eval-split none to sweep by "
                                          "k-fold on train."),
        (("--head", "logreg", "--epochs", "3"), "--epochs does not apply to head 'logreg'. Drop --epochs."),
    ]:
        r = run("fit-head", cache, *args, "-o", tmp_path / "never")
        assert (r.exit_code, r.output) == (1, f"Error: {error}\n"), args
    assert not (tmp_path / "never").exists()
    r = run("fit-head", cache, "--head", "ridge", "--eval-split", "none", "--cv", "2", "-o", tmp_path / "cv", "--json")
    assert json.loads(r.stdout)["best"]["scored_on"] == "2-fold cv on train", r.output


def test_refit_on_trainval_does_not_report_val_as_held_out(image_folder, tmp_path):
    cache = _cache(image_folder, tmp_path)
    r = run("fit-head", cache, "--head", "ridge", "--refit-on-trainval", "-o", tmp_path / "rf", "--json")
    out = json.loads(r.output)
    assert r.exit_code == 0 and "val" not in out["metrics"] and out["best"]["scored_on"] == "val"


def test_finetune_runs_hold_out_val_report_and_are_refused_by_head_commands(tmp_path, caplog):
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "imgs", per_class=4, splits=("train",))
    ft = ["finetune", folder, "-b", "resnet18.none", "--freeze-until", "layer3", "--epochs", "1", "--batch-size", "4",
          "--input-size", "32"]
    with caplog.at_level("WARNING", logger="featcache.runs.finetuning"):
        r = run(*ft, "-o", tmp_path / "plain", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["metrics"] == {}
    assert (f"Source '{folder}' has no split besides train: the fine-tuned network will not be scored. Pass "
            f"--val-fraction 0.2 to hold out a val split.") in caplog.text
    r = run(*ft, "--val-fraction", "0.5", "-o", tmp_path / "ft", "--json")
    out = json.loads(r.stdout)
    assert r.exit_code == 0 and out["metrics"]["val"]["n"] == 4
    ft_dir = tmp_path / "ft"
    refusal = (f"Error: '{ft_dir}' is a finetune run (a whole fine-tuned network), not a head fitted on cached "
               f"features; predict, export and evaluate use fit-head runs. 'featcache report {ft_dir}' shows its "
               f"scores; to predict with frozen features, extract a cache and run 'featcache fit-head'.\n")
    for args in (("predict", ft_dir, folder), ("export", ft_dir, tmp_path / "m.pt2"),
                 ("evaluate", ft_dir, tmp_path / "any.h5")):
        r = run(*args)
        assert (r.exit_code, r.output) == (1, refusal), args
    r = run("report", ft_dir, "-o", tmp_path / "ft.html")
    assert r.exit_code == 0, r.output
    html = (tmp_path / "ft.html").read_text()
    assert "fine-tuned resnet18.none" in html and "Per epoch" in html and "data:image/png;base64," in html
    assert ">?<" not in html and "?," not in html


def test_evaluate_on_a_subset_of_the_run_classes(tmp_path):
    from conftest import make_image_folder

    three = make_image_folder(tmp_path / "three", classes=("cat", "dog", "emu"), per_class=4)
    two = make_image_folder(tmp_path / "two", classes=("cat", "emu"), per_class=4, splits=("test",), seed=1)
    other = make_image_folder(tmp_path / "other", classes=("cat", "yak"), per_class=2, splits=("test",))
    caches = [json.loads(run("extract", f, *TINY, "--cache-dir", tmp_path / "c", "--json").stdout)["cache"]
              for f in (three, two, other)]
    assert run("fit-head", caches[0], "--head", "ncm", "-o", tmp_path / "run").exit_code == 0
    r = run("evaluate", tmp_path / "run", caches[1], "--json")
    m = json.loads(r.stdout)["metrics"]["test"]
    assert m["n"] == 8 and m["absent_classes"] == ["dog"] and m["per_class_recall"]["dog"] is None
    r = run("evaluate", tmp_path / "run", caches[1])
    assert r.output.splitlines()[-1] == ("test: scored on the 2 of 3 run classes it holds; no samples of dog "
                                         "(balanced accuracy and macro F1 are over the classes present)")
    r = run("evaluate", tmp_path / "run", caches[2])
    assert r.exit_code == 1 and r.output == (
        f"Error: Cache '{Path(caches[2]).name}' has classes the run was not fitted on: yak. A head only scores data "
        f"of its own classes (3: cat, dog, emu).\n")


def test_layers_lists_a_pretrained_torchvision_model_without_fetching_weights(monkeypatch):
    from torchvision.models._api import WeightsEnum

    def no_network(self, *a, **k):
        raise AssertionError("layers must not download weights")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", no_network)
    r = run("layers", "resnet18", "--depth", "1")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == "resnet18.IMAGENET1K_V1 at 224 px (default layer: pre_logits)"
    assert "* layer4                                   512 x 7 x 7" in r.output


def test_ls_lists_a_sharded_cache_once_with_the_bytes_of_its_shards(image_folder, tmp_path):
    cache_dir = tmp_path / "cache"
    for i in (0, 1):
        r = run("extract", image_folder, *TINY, "--cache-dir", cache_dir, "--shard", f"{i}/2", "-q")
        assert r.exit_code == 0, r.output
    files = sorted(p.name for p in cache_dir.glob("*.h5"))
    assert len(files) == 3  # the cache over its two shard files
    rows = json.loads(run("ls", "--cache-dir", cache_dir, "--json").output)
    assert len(rows) == 1 and len(rows[0]["shards"]) == 2
    assert rows[0]["bytes"] == sum(p.stat().st_size for p in cache_dir.glob("*.h5"))
    r = run("ls", "--cache-dir", cache_dir)
    assert len(r.output.splitlines()) == 1 and "(over 2 shard files)" in r.output and " 0.0 MB" not in r.output


def test_library_errors_name_the_flags_the_user_typed():
    """The library says freeze_until=LAYER; the command line user typed --freeze-until."""
    res = CliRunner().invoke(main, ["finetune", "digits", "--freeze-until", "layer3", "--train", "fc*"])
    assert res.exit_code == 1
    assert res.output.startswith("Error: Pass only one of the --freeze-until and --train options: --freeze-until "
                                 "LAYER freezes LAYER and everything before it")
    assert "freeze_until" not in res.output
    res = CliRunner().invoke(main, ["finetune", "digits"])
    assert "'stage6' of efficientnet_lite0" in res.output and "freeze_until" not in res.output


# --- nothing lost, one line per failure (issue 26) -------------------------------------------------

@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A small cache and an ncm run on it, shared by the tests below (which never change them)."""
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp("fitted")
    folder = make_image_folder(root / "images")
    cache = json.loads(run("extract", folder, *TINY, "--cache-dir", root / "cache", "--json").output)["cache"]
    r = run("fit-head", cache, "--head", "ncm", "-o", root / "run")
    assert r.exit_code == 0, r.output
    return {"folder": folder, "cache": cache, "run": root / "run"}


def json_error(*args) -> dict:
    """Run a command with --json that must fail: exit 1, one ``Error:`` line on stderr and the same
    message as one JSON object on stdout, no traceback."""
    r = CliRunner().invoke(main, [str(a) for a in args] + ["--json"])
    assert r.exit_code == 1 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    out = json.loads(r.stdout)
    assert r.stderr == f"Error: {out['error']}\n", r.stderr
    return out


class HeldLock:
    """Another process holding the ``flock`` of a folder, as a running fit-head or bench does."""

    def __init__(self, folder: Path) -> None:
        import subprocess
        import sys

        code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
                "print('locked', flush=True); sys.stdin.read()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "locked\n"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


def test_a_run_folder_another_process_writes_is_refused(fitted, tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    with HeldLock(target):
        out = json_error("fit-head", fitted["cache"], "--head", "ncm", "-o", target)
    assert out == {"error": f"Another process is writing the run folder '{target}'. Wait for it to finish, or "
                            f"choose another output folder.", "type": "FolderLockedError"}
    assert list(target.iterdir()) == []
    r = run("fit-head", fitted["cache"], "--head", "ncm", "-o", target)  # the lock is gone: it runs
    assert r.exit_code == 0 and (target / "run.json").is_file(), r.output


def test_a_bench_folder_another_process_writes_is_refused(fitted, tmp_path):
    out_dir = tmp_path / "bench"
    out_dir.mkdir()
    with HeldLock(out_dir):
        out = json_error("bench", "--backbones", "resnet18.none", "--sources", fitted["folder"], "--input-size", "32",
                         "--workers", "0", "--cache-dir", tmp_path / "c", "--heads", "ncm", "-o", out_dir)
    assert out == {"error": f"Another process is writing the bench folder '{out_dir}'. Wait for it to finish, or "
                            f"choose another output folder.", "type": "FolderLockedError"}
    assert list(out_dir.iterdir()) == []


def test_runs_named_in_the_same_second_get_folders_of_their_own(fitted, tmp_path, monkeypatch):
    import time

    from featcache.runs.fit import fit_head

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")  # both names are the same
    runs = [fit_head(fitted["cache"], head=head, runs_dir=str(tmp_path / "runs")).run for head in ("ncm", "ncm")]
    assert runs[1] == runs[0] + "-2"
    assert all(json.loads((Path(r) / "run.json").read_text())["config"]["head"] == "ncm" for r in runs)


def test_run_numbers_are_claimed_once_under_concurrency(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from featcache.runs.outputs import claim_numbered

    def claim(k: int) -> list[int]:
        return [claim_numbered(tmp_path, f"w{k}-{i}", 1)[0] for i in range(5)]

    with ThreadPoolExecutor(8) as pool:
        numbers = [n for got in pool.map(claim, range(8)) for n in got]
    assert sorted(numbers) == list(range(1, 41))
    assert sorted(int(p.name[:5]) for p in tmp_path.iterdir()) == list(range(1, 41))


@pytest.mark.parametrize("command", ["fit-head", "bench", "predict", "finetune"])
def test_ctrl_c_with_json_prints_one_json_object(fitted, tmp_path, monkeypatch, command):
    import importlib

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    module, name, args = {
        "fit-head": ("runs.fit", "fit_head", [fitted["cache"], "-o", tmp_path / "run"]),
        "bench": ("runs.bench", "run_bench", ["--backbones", "resnet18.none", "--sources", fitted["folder"], "-o",
                                         tmp_path / "b"]),
        "predict": ("runs.inference", "predict", [fitted["run"], fitted["folder"]]),
        "finetune": ("runs.finetuning", "finetune", [fitted["folder"], "--freeze-until", "layer3", "-o", tmp_path / "run"]),
    }[command]
    monkeypatch.setattr(importlib.import_module(f"featcache.{module}"), name, interrupted)
    out = json_error(command, *args)
    assert out["type"] == "Interrupted" and out["error"].startswith("Stopped (Ctrl-C)")
    if command == "bench":
        assert "--skip-existing" in out["error"]
    else:
        assert not (tmp_path / "run").exists()


def test_a_csv_manifest_that_is_not_utf8_is_one_error_line(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"path,label\na.png,caf\xe9\n")
    out = json_error("extract", tmp_path / "m.csv", *TINY, "--cache-dir", tmp_path / "c")
    assert out == {"error": f"CSV manifest '{tmp_path / 'm.csv'}' is not UTF-8: byte 0xe9 on line 2 cannot be "
                            f"decoded. Save the file as UTF-8 (e.g. 'iconv -f latin1 -t utf-8 OLD > NEW').",
                   "type": "SourceError"}


def test_fit_head_on_a_cache_without_images_is_one_error_line(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / "train" / c).mkdir(parents=True)
        (tmp_path / "imgs" / "train" / c / "x.jpg").write_bytes(b"not a jpeg")
    cache = json.loads(run("extract", tmp_path / "imgs", *TINY, "--cache-dir", tmp_path / "c", "--json").output)["cache"]
    out = json_error("fit-head", cache, "-o", tmp_path / "run")
    assert out == {"error": f"Split 'train' of cache '{Path(cache).name}' holds no images: nothing to fit on (2 "
                            f"unreadable file(s) were skipped; 'featcache info {cache}' lists them). Extract a source "
                            f"with readable training images.", "type": "ConfigError"}
    assert not (tmp_path / "run").exists()


def test_predict_checks_its_options_and_output_before_any_image_is_read(fitted, tmp_path, monkeypatch):
    import importlib

    out = json_error("predict", fitted["run"], fitted["folder"], "--batch-size", "0")
    assert out == {"error": "The --batch-size option must be an int >= 1. Got 0.", "type": "ConfigError"}
    monkeypatch.setattr(importlib.import_module("featcache.runs.inference"), "predict", lambda *a, **k: pytest.fail("predicted before checking -o"))
    missing = tmp_path / "missing" / "dir" / "out.json"
    out = json_error("predict", fitted["run"], fitted["folder"], "-o", missing)
    assert out == {"error": f"Folder '{missing.parent}' does not exist. Create it first, or choose another output "
                            f"path.", "type": "OutputError"}


def test_predict_skips_hidden_files_in_folders_as_extract_does(fitted, tmp_path):
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(fitted["folder"] / "val" / "cat", folder)
    shown = sorted(p.name for p in folder.iterdir())
    shutil.copy(folder / shown[0], folder / ".hidden.jpg")
    (folder / ".thumbs").mkdir()
    shutil.copy(folder / shown[0], folder / ".thumbs" / "a.jpg")
    preds = json.loads(run("predict", fitted["run"], folder, "--json").output)["predictions"]
    assert sorted(Path(p["path"]).name for p in preds) == shown


def test_info_on_a_folder_says_it_is_a_folder(tmp_path):
    out = json_error("info", tmp_path)
    assert out == {"error": f"'{tmp_path}' is a folder, not a cache file. Run 'featcache ls --cache-dir {tmp_path}' "
                            f"to list the caches in it.", "type": "CacheError"}


def test_max_memory_must_be_positive(fitted):
    r = CliRunner().invoke(main, ["fit-head", fitted["cache"], "--max-memory", "-1", "--json"])
    error = "Invalid value for '--max-memory': -1.0 is not in the range x>0."
    assert r.exit_code == 1 and json.loads(r.stdout) == {"error": error, "type": "BadParameter"}
    assert r.stderr.endswith(f"\nError: {error}\n"), r.stderr


def test_fit_head_quiet_shows_no_progress_bar(fitted, tmp_path):
    args = ["fit-head", fitted["cache"], "--head", "linear", "--opt", "solver=adamw", "--epochs", "2"]
    r = CliRunner().invoke(main, [str(a) for a in args] + ["-o", str(tmp_path / "a")])
    assert r.exit_code == 0 and "train:" in r.stderr, r.output
    r = CliRunner().invoke(main, [str(a) for a in args] + ["-o", str(tmp_path / "b"), "-q"])
    assert r.exit_code == 0 and "train:" not in r.stderr and "run saved to" in r.stdout, r.output


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_files_get_the_permissions_of_the_umask_like_caches(fitted, tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        r = run("fit-head", fitted["cache"], "--head", "ncm", "-o", tmp_path / "run")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o777 & ~umask


def test_an_overwrite_killed_between_its_two_renames_loses_no_run(tmp_path, caplog):
    """Replacing a run moves the old folder aside, then the new one into place: a kill between the
    two leaves the old run aside with nothing in its place; the next writer moves it back."""
    from featcache.errors import OutputError
    from featcache.runs.outputs import RunFolder

    aside = tmp_path / ".run.old-x1" / "run"
    aside.mkdir(parents=True)
    (aside / "run.json").write_text("{}")
    (tmp_path / ".run.tmp-x2").mkdir()  # the new run, unfinished
    with pytest.raises(OutputError, match="already holds a run"):
        RunFolder(tmp_path / "run")
    assert (tmp_path / "run" / "run.json").read_text() == "{}"
    assert "moved back the run" in caplog.text
    folder = RunFolder(tmp_path / "run", overwrite=True)
    with folder as tmp:
        (tmp / "run.json").write_text('{"new": 1}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the private folders are cleared
    assert (tmp_path / "run" / "run.json").read_text() == '{"new": 1}'
