"""Extraction commands: ``extract`` (with the options every extracting command shares) and ``merge``."""

from __future__ import annotations

import click

from ..backbones.base import POOLS
from .common import Progress, echo_json, fail_cleanly, floats, human_bytes


# --- extraction options, shared by every command that extracts --------------------------------

def extraction_options(fn=None, *, exclude: tuple[str, ...] = ()):
    """The options of ``featcache extract``; reused by every command that extracts.
    ``exclude`` drops options a command sets itself (e.g. the backbone of a grid)."""
    if fn is None:
        return lambda f: extraction_options(f, exclude=exclude)
    opts = [
        click.option("-b", "--backbone", default="efficientnet_lite0", show_default=True,
                     help="Backbone spec: NAME[.TAG] (torchvision), efficientnet_lite0, timm:NAME, "
                          "hf:NAME_OR_PATH, torchscript:FILE or package.module:factory. See 'featcache backbones'."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Local weights file (state dict or .safetensors) instead of downloading."),
        click.option("-l", "--layer", "layers", multiple=True,
                     help="Layer to tap (repeatable; all from one forward pass). Default: pre_logits, "
                          "the pooled input of the classifier (output for hf: models); 'all': every stage "
                          "(block.N for hf:) and that pooled layer. See 'featcache layers BACKBONE'."),
        click.option("--pool", type=click.Choice(POOLS), default="avg",
                     show_default=True, help="Reduce spatial maps or tokens; none keeps them. Token models: cls "
                                             "(class token), mean (patch tokens), cls+mean (both)."),
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


EXTRACT_NAMES = ("backbone", "weights", "layers", "pool", "dtype", "precision", "channels_last", "fold_bn", "batch_size",
                  "num_workers", "threads", "device", "cache_dir", "val_fraction", "split_seed", "on_error",
                  "input_size", "mean", "std", "views", "view_seed", "checkpoint_every", "compile", "decode_on_device")


def extract_config(kw: dict):
    """Build an ExtractConfig from the options added by :func:`extraction_options` (popped from kw)."""
    from ..extraction.plan import ExtractConfig

    vals = {n: kw.pop(n) for n in EXTRACT_NAMES if n in kw}
    if "layers" in vals:
        vals["layers"] = tuple(vals["layers"])
    vals["mean"] = floats(vals.get("mean"), "--mean")
    vals["std"] = floats(vals.get("std"), "--std")
    return ExtractConfig(**vals)


@click.command()
@click.argument("source")
@extraction_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the cache to this file instead of a fingerprint-named file in --cache-dir.")
@click.option("--shard", default=None, metavar="I/N",
              help="Extract share I of N of every split into a shard file (SLURM arrays, shell loops); the last "
                   "shard to finish assembles the cache. Under torchrun the ranks are the shards.")
@click.option("--merge", is_flag=True,
              help="With shards: assemble one self-contained file (copy) instead of virtual datasets over the shards.")
@click.option("--verify", is_flag=True,
              help="Read and hash every file, not only those whose size or mtime changed since the cache was made, "
                   "and compute again the features of files whose content differs.")
@click.option("--dry-run", is_flag=True, help="Print per layer the shape, bytes per image and total bytes; extract nothing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the result.")
@click.option("--image-key", default=None, help="wds: the image member of a sample (default: first of jpg, jpeg, png, webp).")
@click.option("--label-key", default=None, help="wds: cls (default) or json:FIELD.")
@click.option("--classes", "classes_file", default=None, help="wds, parquet: class names file, one per line.")
@click.option("--image-column", default=None, help="parquet, hf: the image column (default: found by type).")
@click.option("--label-column", default=None, help="parquet, hf: the label column (default: found by type or name).")
@fail_cleanly
def extract(source: str, output, shard, merge, verify: bool, dry_run: bool, quiet: bool, as_json: bool, image_key,
            label_key, classes_file, image_column, label_column, **kw) -> None:
    """Extract features of SOURCE once into an HDF5 cache (a re-run is a cache hit).

    SOURCE is an image folder (class sub-folders, optionally under train/ val/ test/), a CSV
    manifest path,label[,split], a MedMNIST-style .npz, the built-in 'digits', webdataset shards
    (wds:DIR, 'wds:shard-{000..127}.tar', wds:URL), parquet (parquet:PATH) or a saved Hugging Face
    data set (hf:PATH[:CONFIG]); options after '#', e.g. 'wds:DIR#image=png&label=json:label'
    ('featcache sources' lists the kinds). An interrupted run resumes where it stopped. A file whose
    size and mtime are those recorded in the cache is taken as unchanged without reading it;
    --verify reads and hashes every file.
    """
    from ..extraction.distributed import extract_distributed, torchrun_env
    from ..extraction.pipeline import extract as run
    from ..extraction.plan import ExtractConfig
    from ..extraction.shards import parse_shard
    from ..sources import with_options

    if image_key and image_column or label_key and label_column:
        raise click.UsageError("--image-key/--label-key are for wds:, --image-column/--label-column for parquet: "
                               "and hf:; give one of each pair.")
    source = with_options(source, image=image_key or image_column, label=label_key or label_column,
                          classes=classes_file)
    config = extract_config(kw)
    config = ExtractConfig(**{**config.to_dict(), "output": output, "merge": merge, "verify": verify,
                              "shard": parse_shard(shard) if shard else None})
    env = torchrun_env()
    if env is not None and not dry_run:
        if shard:
            raise click.UsageError("--shard is set by torchrun (one shard per rank); drop it.")
        bar = Progress("extract (all ranks)", quiet or as_json or env[0] != 0)
        try:
            out = extract_distributed(source, config, progress=bar)
        finally:
            bar.close()
        if env[0] == 0:
            _print_ranks(out, as_json)
        return
    if dry_run:
        from ..extraction.plan import plan_cache

        _print_plan(plan_cache(source, config), as_json)
        return
    bar = Progress("extract", quiet or as_json)
    try:
        res = run(source, config, progress=bar)
    finally:
        bar.close()
    if as_json:
        echo_json(res.to_dict())
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
    if res.notes:
        click.echo(f"  {len(res.notes)} note(s) on the source (recorded in the cache; 'featcache info' lists them):")
        for n in res.notes[:10]:
            click.echo(f"    {n['split']}/{n['id']}: {n['note']}")


def _print_ranks(out: dict, as_json: bool) -> None:
    if as_json:
        echo_json(out)
        return
    click.echo(out["cache"])
    for r in out["ranks"]:
        click.echo(f"  rank {r['rank']}: {r['computed']} images at {r['images_per_second']:.1f} img/s")
    click.echo(f"  total {out['images_per_second']:.1f} img/s in {out['seconds']:.1f} s; splits: "
               + ", ".join(f"{k} {v}" for k, v in out["splits"].items()))


def _print_plan(plan: dict, as_json: bool) -> None:
    if as_json:
        echo_json(plan)
        return
    click.echo(f"{plan['cache']} ({'exists' if plan['exists'] else 'new'})")
    click.echo(f"  {plan['backbone']}, {plan['dtype']}, precision {plan['precision']} on {plan['device']}; "
               + ", ".join(f"{k} {v}" for k, v in plan["splits"].items())
               + (f"; {plan['views']} views per train image" if plan["views"] else ""))
    click.echo(f"  {'layer':<24} {'shape':<20} {'bytes/image':>12} {'total':>12}")
    for r in plan["layers"]:
        click.echo(f"  {r['layer']:<24} {' x '.join(map(str, r['shape'])):<20} {r['bytes_per_image']:>12,} "
                   f"{human_bytes(r['total_bytes']):>12}")
    click.echo(f"  {'all layers':<24} {'':<20} {'':>12} {human_bytes(plan['total_bytes']):>12}")


@click.command()
@click.argument("cache_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--copy", is_flag=True, help="Copy the shards into one self-contained file (and delete them).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@fail_cleanly
def merge(cache_dir, copy, as_json):
    """Assemble caches from finished shard files (extract --shard I/N) in CACHE_DIR."""
    from ..extraction.shards import merge_dir

    rows = merge_dir(cache_dir, copy=copy)
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['cache']}: {r['status']} from {r['shards']} shards")
