"""The ``featcache`` command line: parse options, call one library function, print the result."""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from pathlib import Path

import click

from .errors import FeatcacheError


class LibraryError(click.ClickException):
    """A :class:`FeatcacheError` on its way to the user; ``kind`` is the library's class name."""

    def __init__(self, error: FeatcacheError) -> None:
        super().__init__(_flag_names(str(error)))
        self.kind = type(error).__name__


def _flag_names(message: str) -> str:
    """Library errors name parameters as Python spells them (the 'freeze_until' option,
    freeze_until=LAYER); on the command line the user typed flags: name those (--freeze-until)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return message
    flags = {p.name: next(o for o in p.opts if o.startswith("--")) for p in ctx.command.params
             if isinstance(p, click.Option) and p.name and any(o.startswith("--") for o in p.opts)}
    quoted = r"'(\w+)'"

    def options(m: re.Match) -> str:  # "the 'a' option", "the 'a' and 'b' options"
        return re.sub(quoted, lambda q: flags.get(q.group(1), q.group(0)), m.group(0))

    message = re.sub(rf"{quoted}( and {quoted})? options?\b", options, message)
    switches = {p.name for p in ctx.command.params if isinstance(p, click.Option) and p.is_flag}
    message = re.sub(r"\b(\w+)=True\b", lambda m: flags[m.group(1)] if m.group(1) in switches else m.group(0), message)
    return re.sub(r"\b(\w+)=(?=\S)", lambda m: flags[m.group(1)] + " " if m.group(1) in flags else m.group(0),
                  message)


def _fail_cleanly(fn):
    """Turn library errors into ``Error: ...`` (exit 1, no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FeatcacheError as e:
            raise LibraryError(e) from None

    return wrapper


class _Group(click.Group):
    """With ``--json``, a failing command also prints ``{"error": ..., "type": ...}`` on stdout
    (the ``Error:`` line still goes to stderr) and exits 1, usage errors included."""

    def make_context(self, info_name, args, parent=None, **extra):
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta["featcache.json"] = "--json" in args
        return ctx

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            cmd = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            if ctx.meta.get("featcache.json") and cmd and any(p.name == "as_json" for p in cmd.params):
                _echo_json({"error": e.format_message(), "type": getattr(e, "kind", type(e).__name__)})
                e.exit_code = 1
            raise


def _floats(value: str | None, name: str, n: int = 3):
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"needs {n} comma-separated numbers, e.g. 0.5,0.5,0.5. Got {value!r}.",
                                 param_hint=name) from None
    if len(out) != n:
        raise click.BadParameter(f"needs {n} comma-separated numbers. Got {value!r}.", param_hint=name)
    return out


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=None, default=str))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featcache")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does (warnings always show).")
def main(verbose: bool) -> None:
    """Run a frozen pretrained backbone once, cache its features in HDF5, fit heads in seconds."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .runtime import tune_allocator

    tune_allocator()  # freed activation buffers are reused instead of page-faulted in again


# --- extraction options, shared by every command that extracts --------------------------------

def extraction_options(fn=None, *, exclude: tuple[str, ...] = ()):
    """The options of ``featcache extract``; reused by every command that extracts.
    ``exclude`` drops options a command sets itself (e.g. the backbone of a grid)."""
    if fn is None:
        return lambda f: extraction_options(f, exclude=exclude)
    opts = [
        click.option("-b", "--backbone", default="efficientnet_lite0", show_default=True,
                     help="Backbone spec: NAME[.TAG] (torchvision), efficientnet_lite0, timm:NAME, "
                          "torchscript:FILE or package.module:factory. See 'featcache backbones'."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Local weights file (state dict or .safetensors) instead of downloading."),
        click.option("-l", "--layer", "layers", multiple=True,
                     help="Layer to tap (repeatable; all from one forward pass). Default: pre_logits, "
                          "the pooled input of the classifier; 'all': every stage and pre_logits. See "
                          "'featcache layers BACKBONE'."),
        click.option("--pool", type=click.Choice(["avg", "max", "avgmax", "none"]), default="avg",
                     show_default=True, help="Reduce spatial maps (or tokens); none keeps the map."),
        click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16",
                     show_default=True, help="Storage type of the features."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="Compute precision (autocast): auto is bf16 on GPUs with native "
                                             "bf16 (Ampere and later) and on CPUs with AVX512-BF16/AMX, fp16 on "
                                             "older GPUs, else fp32. Recorded in the fingerprint."),
        click.option("--channels-last/--no-channels-last", default=True, show_default=True,
                     help="Run convolutions in channels_last memory format."),
        click.option("--fold-bn/--no-fold-bn", default=True, show_default=True,
                     help="Fold BatchNorm into the preceding convolutions (checked against the unfolded model)."),
        click.option("--decode-on-device", is_flag=True,
                     help="Decode JPEGs with torchvision.io.decode_jpeg on the extraction device (nvJPEG on a GPU) "
                          "instead of PIL in worker processes. Recorded in the fingerprint."),
        click.option("--compile", "compile", is_flag=True,
                     help="Run the network through torch.compile: faster for long runs (1.23x for "
                          "efficientnet_lite0 on a CPU) after a one-off compilation (~20 s). Recorded in the fingerprint."),
        click.option("--batch-size", type=int, default=None,
                     help="Images per forward pass (default: 8 on a CPU, where small batches ran up to 3x faster "
                          "than 64, 64 on a GPU)."),
        click.option("--workers", "num_workers", type=int, default=None,
                     help="Decoding worker processes (default on a CPU: 0, the main process decodes each batch "
                          "with a thread per core between forward passes; on a GPU this process's share of the "
                          "CPUs it may run on, at most 8)."),
        click.option("--threads", type=int, default=None, help="Torch threads for the forward pass."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default="cache", show_default=True,
                     help="Folder of cache files."),
        click.option("--val-fraction", type=float, default=None,
                     help="Carve a stratified, seeded val split out of train when the source has none."),
        click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of --val-fraction."),
        click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
                     help="Unreadable images: skip and record them, or stop at the first."),
        click.option("--input-size", type=int, default=None, help="Override the crop size (px)."),
        click.option("--mean", default=None, help="Override the normalisation mean, e.g. 0.5,0.5,0.5."),
        click.option("--std", default=None, help="Override the normalisation std, e.g. 0.5,0.5,0.5."),
        click.option("--views", type=int, default=0, show_default=True,
                     help="Also store K augmented views (random resized crop + flip) of each training image."),
        click.option("--view-seed", type=int, default=0, show_default=True, help="Seed of the augmented views."),
        click.option("--checkpoint-every", type=float, default=10.0, show_default=True, metavar="SECONDS",
                     help="Write finished batches to disk at least this often; a crash loses at most this much "
                          "work (0: after every batch)."),
    ]
    for opt in reversed(opts):
        dest = opt(lambda: None).__click_params__[0].name
        if dest not in exclude:
            fn = opt(fn)
    return fn


_EXTRACT_NAMES = ("backbone", "weights", "layers", "pool", "dtype", "precision", "channels_last", "fold_bn", "batch_size",
                  "num_workers", "threads", "device", "cache_dir", "val_fraction", "split_seed", "on_error",
                  "input_size", "mean", "std", "views", "view_seed", "checkpoint_every", "compile", "decode_on_device")


def extract_config(kw: dict):
    """Build an ExtractConfig from the options added by :func:`extraction_options` (popped from kw)."""
    from .extract import ExtractConfig

    vals = {n: kw.pop(n) for n in _EXTRACT_NAMES if n in kw}
    if "layers" in vals:
        vals["layers"] = tuple(vals["layers"])
    vals["mean"] = _floats(vals.get("mean"), "--mean")
    vals["std"] = _floats(vals.get("std"), "--std")
    return ExtractConfig(**vals)


def _explicit(ctx: click.Context, names) -> set[str]:
    """Options the user typed (not defaults)."""
    from click.core import ParameterSource

    return {n for n in names if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)}


class _Progress:
    """A tqdm bar with images/s and ETA, created on the first call."""

    def __init__(self, desc: str, quiet: bool) -> None:
        self.desc, self.quiet, self.bar = desc, quiet, None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="img", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)
        if done >= total:  # finished: close now so later output is not interleaved with the bar
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@main.command()
@click.argument("source")
@extraction_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the cache to this file instead of a fingerprint-named file in --cache-dir.")
@click.option("--shard", default=None, metavar="I/N",
              help="Extract share I of N of every split into a shard file (SLURM arrays, shell loops); the last "
                   "shard to finish assembles the cache. Under torchrun the ranks are the shards.")
@click.option("--merge", is_flag=True,
              help="With shards: assemble one self-contained file (copy) instead of virtual datasets over the shards.")
@click.option("--dry-run", is_flag=True, help="Print per layer the shape, bytes per image and total bytes; extract nothing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the result.")
@_fail_cleanly
def extract(source: str, output, shard, merge, dry_run: bool, quiet: bool, as_json: bool, **kw) -> None:
    """Extract features of SOURCE once into an HDF5 cache (a re-run is a cache hit).

    SOURCE is an image folder (class sub-folders, optionally under train/ val/ test/), a CSV
    manifest path,label[,split], a MedMNIST-style .npz, or the built-in 'digits'.
    An interrupted run resumes where it stopped.
    """
    from .extract import ExtractConfig, extract as run

    config = extract_config(kw)
    from .distributed import extract_distributed, torchrun_env
    from .shards import parse_shard

    config = ExtractConfig(**{**config.to_dict(), "output": output, "merge": merge,
                              "shard": parse_shard(shard) if shard else None})
    env = torchrun_env()
    if env is not None and not dry_run:
        if shard:
            raise click.UsageError("--shard is set by torchrun (one shard per rank); drop it.")
        bar = _Progress("extract (all ranks)", quiet or as_json or env[0] != 0)
        try:
            out = extract_distributed(source, config, progress=bar)
        finally:
            bar.close()
        if env[0] == 0:
            if as_json:
                _echo_json(out)
            else:
                click.echo(out["cache"])
                for r in out["ranks"]:
                    click.echo(f"  rank {r['rank']}: {r['computed']} images at {r['images_per_second']:.1f} img/s")
                click.echo(f"  total {out['images_per_second']:.1f} img/s in {out['seconds']:.1f} s; splits: "
                           + ", ".join(f"{k} {v}" for k, v in out["splits"].items()))
        return
    if dry_run:
        from .extract import plan_cache

        plan = plan_cache(source, config)
        if as_json:
            _echo_json(plan)
            return
        click.echo(f"{plan['cache']} ({'exists' if plan['exists'] else 'new'})")
        click.echo(f"  {plan['backbone']}, {plan['dtype']}, precision {plan['precision']} on {plan['device']}; "
                   + ", ".join(f"{k} {v}" for k, v in plan["splits"].items())
                   + (f"; {plan['views']} views per train image" if plan["views"] else ""))
        click.echo(f"  {'layer':<24} {'shape':<20} {'bytes/image':>12} {'total':>12}")
        for r in plan["layers"]:
            click.echo(f"  {r['layer']:<24} {' x '.join(map(str, r['shape'])):<20} {r['bytes_per_image']:>12,} "
                       f"{_human(r['total_bytes']):>12}")
        click.echo(f"  {'all layers':<24} {'':<20} {'':>12} {_human(plan['total_bytes']):>12}")
        return
    bar = _Progress("extract", quiet or as_json)
    try:
        res = run(source, config, progress=bar)
    finally:
        bar.close()
    if as_json:
        _echo_json(res.to_dict())
        return
    if res.merged:
        click.echo(f"all shards finished: assembled {res.merged}")
    state = "cache hit (no forward pass)" if res.cache_hit else (
        f"{res.computed} images extracted at {res.images_per_second:.1f} img/s ({res.compute_seconds:.1f} s of "
        f"forward passes), {res.reused} reused")
    click.echo(f"{res.cache}")
    click.echo(f"  {state} in {res.seconds:.1f} s")
    click.echo("  splits: " + ", ".join(f"{k} {v}" for k, v in res.splits.items()))
    if res.failed:
        click.echo(f"  skipped {res.failed} unreadable file(s) (recorded in the cache; 'featcache info' lists them):")
        for f in res.failures[:10]:
            click.echo(f"    {f['split']}/{f['id']}: {f['reason']}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def backbones(as_json: bool) -> None:
    """List registered backbones (plus timm:NAME, torchscript:FILE and package.module:factory)."""
    from .backbones import list_backbones

    rows = list_backbones()
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['name']:<32} {r['description']}")
    click.echo("timm:NAME[.TAG]                  any timm model (pip install 'featcache[timm]')")
    click.echo("torchscript:FILE                 a TorchScript file (--input-size/--mean/--std)")
    click.echo("package.module:factory           a callable returning an nn.Module")


@main.command()
@click.argument("backbone")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Local weights file.")
@click.option("--depth", type=int, default=2, show_default=True,
              help="Show modules nested at most this deep (stages always shown); 0 shows all.")
@click.option("--input-size", type=int, default=None, help="Override the input size (px).")
@click.option("--json", "as_json", is_flag=True, help='Print [{"name", "shape", "stage"}, ...].')
@_fail_cleanly
def layers(backbone: str, weights, depth: int, input_size, as_json: bool) -> None:
    """List BACKBONE's tap points in forward order, with output shapes; '*' marks stages."""
    from .backbones import load_backbone
    from .taps import list_layers

    # Names and shapes do not depend on the parameters: list them without fetching weights.
    bb = load_backbone(backbone, weights=weights, input_size=input_size, download=False)
    infos = list_layers(bb, depth=depth or None)
    if as_json:
        _echo_json([i.to_dict() for i in infos])
        return
    click.echo(f"{bb.name} at {bb.preprocess.crop} px (default layer: {bb.default_layer})")
    for i in infos:
        click.echo(f"{'*' if i.stage else ' '} {i.name:<40} {' x '.join(map(str, i.shape))}")


@main.command()
def sources() -> None:
    """List the kinds of data source."""
    from .sources import SOURCES

    for e in SOURCES:
        click.echo(f"{e.name:<8} {e.description}")


@main.command()
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_fail_cleanly
def info(cache: str, as_json: bool) -> None:
    """Show a cache's fingerprint, splits, shapes and failures."""
    from .store import open_cache

    with open_cache(cache) as c:
        d = c.info()
    if as_json:
        _echo_json(d)
        return
    fp = d["fingerprint"]
    click.echo(d["cache"])
    click.echo(f"  backbone:   {fp['backbone']['name']} (weights {fp['backbone']['weights']})")
    click.echo(f"  source:     {fp['source'].get('spec')} ({fp['source']['kind']})")
    click.echo(f"  layers:     {', '.join(d['layers'])}  pool={fp['pool']} dtype={fp['dtype']} precision={fp['precision']}")
    pp = fp["preprocess"]
    click.echo(f"  preprocess: resize {pp['resize']}, crop {pp['crop']}, mean {pp['mean']}, std {pp['std']}, {pp['interpolation']}")
    click.echo(f"  classes:    {len(d['classes'])} ({', '.join(d['classes'][:8])}{', ...' if len(d['classes']) > 8 else ''})")
    for s, v in d["splits"].items():
        shapes = "; ".join(f"{l} {tuple(x['shape'])} {x['dtype']}" for l, x in v["features"].items())
        click.echo(f"  {s:<6} {v['n']:>7} samples  {shapes}")
    click.echo(f"  failed:     {len(d['failed'])}")
    for f in d["failed"][:20]:
        click.echo(f"    {f['split']}/{f['id']}: {f['reason']}")
    click.echo(f"  size:       {d['bytes'] / 1e6:.1f} MB, fingerprint {d['fingerprint_hash']}")


@main.command(name="ls")
@click.option("--cache-dir", type=click.Path(file_okay=False), default="cache", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def ls_(cache_dir: str, as_json: bool) -> None:
    """List caches in the cache folder with size and date."""
    from .store import list_caches

    rows = list_caches(cache_dir)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo(f"No caches in {cache_dir}/.")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["modified"]))
        what = r.get("error") or f"{r['backbone']}  {', '.join(f'{k}={v}' for k, v in r['splits'].items())}"
        if r.get("shards"):
            what += f"  (over {len(r['shards'])} shard files)"
        click.echo(f"{Path(r['cache']).name:<60} {r['bytes'] / 1e6:>8.1f} MB  {when}  {what}")


# --- heads ------------------------------------------------------------------------------------

@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def heads(as_json: bool) -> None:
    """List the heads, their swept parameter and their options."""
    from .heads import list_heads

    rows = list_heads()
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['name']:<8} {r['description']}")
        if r["param"]:
            g = r["default_grid"]
            click.echo(f"         sweeps {r['param']} over {len(g)} values, {g[0]:g} .. {g[-1]:g}")
        for opt, text in r["options"].items():
            click.echo(f"         --opt {opt}=...  {text}")


def _head_options(pairs: tuple[str, ...]) -> dict:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise click.BadParameter(f"expects KEY=VALUE, got {p!r}.", param_hint="--opt")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@main.command(name="fit-head")
@click.argument("cache", type=click.Path())
@click.option("--head", default="logreg", show_default=True, help="Head name (see 'featcache heads').")
@click.option("--layer", default=None,
              help="Cached layer to fit on (default: the first); 'all' or a comma list sweeps the layers too.")
@click.option("--train-split", default="train", show_default=True)
@click.option("--eval-split", default=None,
              help="Split the sweep is scored on (default: val when present, else k-fold on train); "
                   "'none': k-fold on train even when val exists.")
@click.option("--normalize", type=click.Choice(["none", "l2", "standard"]), default="standard", show_default=True,
              help="Feature normalisation, fitted on the training split.")
@click.option("--pca", type=int, default=None, help="Reduce to N principal components (fitted on train).")
@click.option("--C", "--grid", "grid", default=None,
              help="Regularisation grid: 0.01,0.1,1 or logspace:-4:4:13 (default: the head's own).")
@click.option("--class-weight", type=click.Choice(["balanced"]), default=None, help="Weigh classes by inverse frequency.")
@click.option("--select-by", type=click.Choice(["top1", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss"]),
              default="top1", show_default=True, help="Metric the sweep selects on.")
@click.option("--extend-grid/--no-extend-grid", default=True, show_default=True,
              help="Extend the grid a decade at a time while the best value sits at an end.")
@click.option("--threads", type=int, default=None,
              help="Threads of the head's pool (default: 1 for small problems, every core for large ones).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--refit-on-trainval", is_flag=True, help="Refit the chosen value on train + val.")
@click.option("--shots", type=int, default=None, help="Few-shot: K training examples per class.")
@click.option("--seeds", type=int, default=1, show_default=True, help="Few-shot: number of random draws.")
@click.option("--cv", type=int, default=None, help="Folds of the sweep when there is no eval split (default 5).")
@click.option("--max-memory", type=float, default=2.0, show_default=True,
              help="GiB of features to load into memory; larger caches are streamed (linear, mlp).")
@click.option("--epochs", type=int, default=None, help="Training epochs (tail, mlp, linear with adamw).")
@click.option("--lr", type=float, default=None, help="Learning rate (tail, mlp, linear with adamw).")
@click.option("--batch-size", type=int, default=None, help="Mini-batch size (tail, mlp, linear with adamw).")
@click.option("--patience", type=int, default=None,
              help="Stop after N epochs without a better eval score; keep the best epoch (tail, mlp, linear with adamw).")
@click.option("--opt", "opts", multiple=True, help="Head option KEY=VALUE (repeatable), e.g. --opt solver=adamw.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None, help="Run folder.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in -o (refused without it).")
@click.option("--runs-dir", type=click.Path(file_okay=False), default="runs", show_default=True)
@click.option("--json", "as_json", is_flag=True, help='Print {"run", "head", "best", "metrics", "seconds", "warnings"}.')
@_fail_cleanly
def fit_head(cache, head, layer, train_split, eval_split, normalize, pca, grid, class_weight, select_by,
             extend_grid, threads, seed, refit_on_trainval, shots, seeds, cv, max_memory, epochs, lr, batch_size,
             patience, opts, output, overwrite, runs_dir, as_json) -> None:
    """Fit a head on CACHE: sweep its regularisation, keep the model that scored best, score every other split.

    With --head tail, CACHE holds the activations at a freeze boundary (extract --layer B --pool none):
    the pretrained layers after B get a new classifier and are trained on them, sampling the cached
    augmented views (extract --views K) when there are any.
    """
    from .fit import FitConfig, fit_head as run, parse_grid
    from .heads import HEADS
    from .metrics import format_metrics_table

    head_opts = _head_options(opts)
    for name, value in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size), ("patience", patience)):
        if value is not None:
            if name not in HEADS.entry(head).extra["options"]:
                raise click.ClickException(f"--{name.replace('_', '-')} does not apply to head '{head}'. "
                                           f"Drop --{name.replace('_', '-')}.")
            head_opts[name] = value

    config = FitConfig(head=head, layer=layer, train_split=train_split, eval_split=eval_split, normalize=normalize,
                       pca=pca, grid=parse_grid(grid), class_weight=class_weight, select_by=select_by,
                       extend_grid=extend_grid, threads=threads, seed=seed,
                       refit_on_trainval=refit_on_trainval, shots=shots, seeds=seeds, cv=cv,
                       max_memory=int(max_memory * 2**30), head_options=head_opts, output=output,
                       runs_dir=runs_dir, overwrite=overwrite)
    fit_log = logging.getLogger("featcache.fit")
    level = fit_log.level
    fit_log.setLevel(logging.ERROR)  # its warnings are printed below, once, with the result
    bar = _EpochBar(as_json)
    try:
        res = run(cache, config, progress=bar)
    finally:
        bar.close()
        fit_log.setLevel(level)
    res.warnings = [_flag_names(w) for w in res.warnings]
    if as_json:
        _echo_json(res.to_dict())
        return
    for w in res.warnings:
        click.echo(f"Warning: {w}", err=True)
    b = res.best
    if b.get("score") is not None:
        name = "top-1" if b["select_by"] == "top1" else b["select_by"]
        value = f" {b['param']}={b['value']:g}" if b.get("param") else ""
        where = f" on layer {b['layer']}" if b.get("layer") else ""
        click.echo(f"{res.head}: best{value}{where} ({name} {b['score']:.4f} on {b['scored_on']})")
    if b.get("grid_extended") or b.get("at_bound"):
        added = ", ".join(f"{v:g}" for v in b.get("grid_extended") or [])
        click.echo(f"{res.head}: the best {b['param']} sat at an end of the grid"
                   + (f"; extended by {added}" if added else "")
                   + (f"; {b['param']}={b['value']:g} is as far as the search goes"
                      if b.get("at_bound") else ""))
    _print_metrics(res.metrics, format_metrics_table)
    if res.few_shot:
        for split, m in res.few_shot["summary"].items():
            t = m.get("top1")
            if t:
                click.echo(f"{shots}-shot over {seeds} seed(s), {split} top-1: {t['mean']:.4f} +- {t['std']:.4f}")
    click.echo(f"run saved to {res.run} ({res.seconds:.1f} s)")


class _EpochBar:
    """A tqdm bar over the epochs of a head trained by epochs, with its loss and eval score."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar = quiet, None

    def __call__(self, info: dict) -> None:
        if self.quiet:
            return
        if self.bar is None or info["epoch"] <= self.bar.n:  # a new training run (another grid or fold)
            from tqdm import tqdm

            self.close()
            self.bar = tqdm(total=info["epochs"], desc="train", unit="epoch", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(info["epoch"] - self.bar.n)
        shown = {"loss": f"{info['loss']:.4f}"}
        if info.get("score") is not None:
            shown[info["metric"]] = f"{info['score']:.4f}"
        self.bar.set_postfix(shown)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_metrics(metrics: dict, fmt) -> None:
    slim = {s: {k: v for k, v in m.items() if not isinstance(v, (list, dict))} for s, m in metrics.items()}
    if slim:
        click.echo(fmt(slim))


@main.command()
@click.argument("run_dir", type=click.Path())
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@_fail_cleanly
def evaluate(run_dir, cache, as_json) -> None:
    """Score a saved head (RUN_DIR) on every split of another CACHE of the same backbone and layer."""
    from .runs import evaluate as run
    from .metrics import format_metrics_table

    metrics = run(run_dir, cache)
    if as_json:
        _echo_json({"run": run_dir, "cache": cache, "metrics": metrics})
        return
    _print_metrics(metrics, format_metrics_table)
    for split, m in metrics.items():
        if m["absent_classes"]:
            n = len(m["classes"]) - len(m["absent_classes"])
            click.echo(f"{split}: scored on the {n} of {len(m['classes'])} run classes it holds; no samples of "
                       f"{', '.join(m['absent_classes'])} (balanced accuracy and macro F1 are over the classes present)")


@main.command()
@click.argument("run_dir", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top", type=int, default=5, show_default=True, help="Classes to list per image.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Backbone weights file, if the run's original file moved.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write predictions to a .csv or .json file.")
@click.option("--json", "as_json", is_flag=True, help='Print {"predictions": [{"path", "label", "probability", "top"}]}.')
@_fail_cleanly
def predict(run_dir, images, top, batch_size, device, weights, output, as_json) -> None:
    """Classify IMAGES (files or folders) end to end with the backbone and head of RUN_DIR."""
    from .predict import predict as run

    preds = run(run_dir, list(images), top=top, batch_size=batch_size, device=device, weights=weights)
    if output:
        _write_predictions(preds, output)
    if as_json:
        _echo_json({"predictions": preds})
        return
    for p in preds:
        if p["label"] is None:
            click.echo(f"{p['path']}: skipped ({p['error']})")
        else:
            others = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in p["top"][1:])
            click.echo(f"{p['path']}: {p['label']} {p['probability']:.3f}" + (f"  ({others})" if others else ""))


def _write_predictions(preds: list[dict], output: str) -> None:
    import csv

    path = Path(output)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({"predictions": preds}, indent=2))
    elif path.suffix.lower() == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "probability", "top"])
            for p in preds:
                w.writerow([p["path"], p["label"], p["probability"],
                            ";".join(f"{t['label']}:{t['probability']:.6f}" for t in p["top"])])
    else:
        raise click.BadParameter(f"must end in .csv or .json, got {output!r}.", param_hint="--output")


@main.command()
@click.argument("run_dir", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Backbone weights file.")
@click.option("--json", "as_json", is_flag=True, help='Print {"program", "classes", "preprocess", ...}.')
@_fail_cleanly
def export(run_dir, out, weights, as_json) -> None:
    """Export backbone + head of RUN_DIR as one torch.export program OUT (.pt2): normalised images -> logits.
    The classes and preprocessing travel inside it (featcache.load_export reads both)."""
    from .predict import EXPORT_META, export as run, load_export

    path = run(run_dir, out, weights=weights)
    meta = load_export(path).meta
    if as_json:
        _echo_json({"program": str(path), **meta})
        return
    pp = meta["preprocess"]
    click.echo(f"wrote {path}: normalised images (batch, 3, {pp['crop']}, {pp['crop']}) -> logits")
    click.echo(f"  classes:    {len(meta['classes'])} ({', '.join(meta['classes'])})")
    click.echo(f"  preprocess: resize {pp['resize']} ({pp['interpolation']}), centre crop {pp['crop']}, "
               f"mean {pp['mean']}, std {pp['std']}")
    click.echo(f"  load with featcache.load_export(path) (checks the input size; .meta holds the above), or "
               f"torch.export.load(path, extra_files={{'{EXPORT_META}': ''}}).module()")


@main.command()
@click.option("-o", "--out-dir", type=click.Path(file_okay=False), default="demo-out", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default="cache", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_fail_cleanly
def demo(out_dir, cache_dir, quiet) -> None:
    """Extract the built-in digits with efficientnet_lite0, fit two heads with sweeps, print the
    leaderboard and write an HTML report."""
    from .demo import run_demo

    def progress(i, total, rec, elapsed):
        m = rec["metrics"]["val"]
        click.echo(f"[{i}/{total}] {rec['head']}: best {rec['best']['param']}={rec['best']['value']:g}, val top-1 "
                   f"{m['top1']:.4f}, fitted in {rec['fit_seconds']:.1f} s")

    bar = _Progress("extract digits", quiet)
    try:
        out = run_demo(out_dir=out_dir, cache_dir=cache_dir, progress=progress, extract_progress=bar)
    finally:
        bar.close()
    rec = out["records"][0]
    when = ("a cache hit: extracted earlier in" if rec.get("cache_hit") else "extracted in")
    click.echo(f"\ncache: {rec['cache']} ({when} {rec['extract_seconds']:.1f} s; a re-run is a cache hit)\n")
    click.echo((Path(out["bench_dir"]) / "leaderboard.md").read_text())
    click.echo(f"report: {out['report']}")


# --- benchmarking -----------------------------------------------------------------------------

def _csv(value: str | None, cast=str):
    if value is None:
        return None
    try:
        return tuple(cast(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expects comma-separated values, got {value!r}.") from None


@main.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--backbones", default=None, help="Comma-separated backbone specs (overrides the TOML).")
@click.option("--sources", default=None, help="Comma-separated sources.")
@click.option("--layers", default=None, help="Comma-separated layers (default: each backbone's pre_logits).")
@click.option("--heads", default=None, help="Comma-separated heads.")
@click.option("--shots", default=None, help="Comma-separated shots per class; 0 = all training data.")
@click.option("--seeds", type=int, default=None, help="Seeds per (.., shots) cell.")
@extraction_options(exclude=("backbone", "layers"))
@click.option("-o", "--out-dir", type=click.Path(file_okay=False), default="bench-out", show_default=True)
@click.option("--skip-existing", is_flag=True, help="Resume: skip runs already in OUT_DIR/records.jsonl.")
@click.option("--overwrite", is_flag=True,
              help="Delete OUT_DIR's earlier records and runs first (by default a grid adds to them).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or per-run lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the leaderboard as JSON.")
@click.pass_context
@_fail_cleanly
def bench(ctx, config_file, backbones, sources, layers, heads, shots, seeds, out_dir, skip_existing, overwrite,
          quiet, as_json, **kw):
    """Benchmark a grid of backbones x layers x sources x heads x shots x seeds.

    CONFIG_FILE is a TOML file with lists backbones, sources, layers, heads, shots, an int seeds, and
    optional [extract] and [fit] tables of options; flags override it. Each cache is extracted once;
    every fit appends a record to OUT_DIR/records.jsonl (earlier records are kept unless --overwrite);
    then the leaderboard (Markdown, CSV) and plots are written.
    """
    from dataclasses import replace

    from .bench import BenchConfig, run_bench
    from .report import leaderboard

    cfg = BenchConfig.from_toml(config_file) if config_file else BenchConfig()
    grid = {"backbones": _csv(backbones), "sources": _csv(sources), "layers": _csv(layers), "heads": _csv(heads),
            "shots": _csv(shots, int), "seeds": seeds}
    cfg = replace(cfg, **{k: v for k, v in grid.items() if v is not None})
    typed = _explicit(ctx, [n for n in _EXTRACT_NAMES if n in kw])
    ex = extract_config(dict(kw)).to_dict()
    cfg = replace(cfg, extract={**cfg.extract, **{k: ex[k] for k in typed}})
    start = time.perf_counter()
    quiet = quiet or as_json
    fitted = []

    def progress(i, total, rec, elapsed):
        fitted.append(i)
        if quiet:
            return
        eta = elapsed / len(fitted) * (total - i)  # cells skipped by --skip-existing took no time
        top1 = next(iter(rec["metrics"].values()), {}).get("top1")
        click.echo(f"[{i}/{total}] {rec['backbone']} {rec['layer']} {rec['source']} {rec['head']} "
                   f"shots={rec['shots'] or 'all'} seed={rec['seed']}: top-1 {top1 if top1 is None else f'{top1:.4f}'}"
                   f"  elapsed {elapsed:.0f} s, ETA {eta:.0f} s", err=True)

    bar = _Progress("extract", quiet)
    try:
        records = run_bench(cfg, out_dir, skip_existing=skip_existing, overwrite=overwrite, progress=progress,
                            extract_progress=bar)
    finally:
        bar.close()
    rows = leaderboard(records)
    if as_json:
        _echo_json({"out_dir": out_dir, "runs": len(records), "new_runs": len(fitted), "leaderboard": rows})
        return
    click.echo((Path(out_dir) / "leaderboard.md").read_text())
    click.echo(f"{len(records)} runs in {out_dir}/ ({len(fitted)} new, {time.perf_counter() - start:.0f} s): "
               f"records.jsonl, leaderboard.md/.csv, shots.png, layers.png, time.png")


@main.command(name="probe-layers")
@click.argument("backbone")
@click.argument("source")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False), default="layers-out", show_default=True)
@click.option("--head", default="logreg", show_default=True, help="Head fitted on every layer.")
@extraction_options(exclude=("backbone", "layers"))
@click.option("--json", "as_json", is_flag=True, help='Print {"layers": [...], "recommendation": {...}}.')
@_fail_cleanly
def probe_layers(backbone, source, out_dir, head, as_json, **kw):
    """Which layers to freeze? Fit HEAD on every stage of BACKBONE over SOURCE and recommend a boundary."""
    from .probe_layers import probe_layers as run

    bar = _Progress("extract", as_json)
    try:
        res = run(backbone, source, out_dir=out_dir, head=head, extract_config=extract_config(kw), progress=bar)
    finally:
        bar.close()
    if as_json:
        _echo_json({"layers": res.layers, "recommendation": res.recommendation, "out_dir": res.out_dir})
        return
    click.echo(f"{'layer':<16} {'dim':>6} {'top-1':>7} {'bal.acc':>8}")
    for r in res.layers:
        mark = "  <- freeze until here" if r["name"] == res.recommendation["freeze_until"] else ""
        click.echo(f"{r['name']:<16} {r['dim']:>6} {r['top1']:>7.4f} {r['balanced_accuracy']:>8.4f}{mark}")
    click.echo("")
    click.echo(res.recommendation["reason"])
    click.echo(f"\nwrote {res.out_dir}/layers.json and {res.plot}")


@main.command()
@click.argument("src", type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="HTML file to write.")
@click.option("--json", "as_json", is_flag=True, help='Print {"report": PATH}.')
@_fail_cleanly
def report(src, output, as_json):
    """Write one self-contained HTML page for a RUN_DIR, BENCH_DIR or LAYERS_DIR."""
    from .report import write_report

    path = write_report(src, output)
    if as_json:
        _echo_json({"report": str(path)})
        return
    click.echo(f"wrote {path}")


@main.command()
@click.argument("cache_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--copy", is_flag=True, help="Copy the shards into one self-contained file (and delete them).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@_fail_cleanly
def merge(cache_dir, copy, as_json):
    """Assemble caches from finished shard files (extract --shard I/N) in CACHE_DIR."""
    from .shards import merge_dir

    rows = merge_dir(cache_dir, copy=copy)
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['cache']}: {r['status']} from {r['shards']} shards")


@main.command()
@click.argument("source")
@click.option("-b", "--backbone", default="efficientnet_lite0", show_default=True, help="Backbone spec.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Local weights file.")
@click.option("--freeze-until", default=None, help="Stage B: B and everything before it stay frozen.")
@click.option("--train", "train", multiple=True, help="Train modules matching this pattern (repeatable), e.g. 'layer4*'.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", "num_workers", type=int, default=None,
              help="Decoding worker processes [default: none on a CPU; on a GPU this process's share of the "
                   "usable CPUs, at most 8].")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Autocast precision; auto: bf16 on GPUs and CPUs with native bf16, fp16 on older GPUs, else fp32.")
@click.option("--input-size", type=int, default=None, help="Override the crop size (px).")
@click.option("--val-fraction", type=float, default=None,
              help="Carve a stratified, seeded val split out of train when the source has none.")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of --val-fraction.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None, help="Run folder.")
@click.option("--runs-dir", type=click.Path(file_okay=False), default="runs", show_default=True)
@click.option("--json", "as_json", is_flag=True, help='Print {"run", "metrics", "per_epoch", "seconds"}.')
@_fail_cleanly
def finetune(source, backbone, weights, freeze_until, train, epochs, lr, batch_size, seed, device, num_workers,
             precision, input_size, val_fraction, split_seed, output, runs_dir, as_json):
    """Fine-tune the layers after a freeze boundary on raw images, the classic way (the reference
    that 'fit-head --head tail' on cached boundary activations is measured against)."""
    from .finetune import FinetuneConfig, finetune as run

    config = FinetuneConfig(backbone=backbone, weights=weights, freeze_until=freeze_until, train=tuple(train),
                            epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device,
                            num_workers=num_workers, precision=precision, input_size=input_size, output=output,
                            runs_dir=runs_dir, val_fraction=val_fraction, split_seed=split_seed)
    res = run(source, config, progress=None if as_json else (lambda msg: click.echo(msg, err=True)))
    if as_json:
        _echo_json(res.to_dict())
        return
    from .metrics import format_metrics_table

    _print_metrics(res.metrics, format_metrics_table)
    click.echo(f"run saved to {res.run} ({res.seconds:.1f} s)")
