"""Extraction commands: ``extract`` (with the options every extracting command shares) and ``merge``."""

from __future__ import annotations

import click

from ..extraction.options import EXTRACT_ONLY, SHARED, cli_fields
from .common import Progress, echo_json, fail_cleanly, floats, human_bytes


# --- extraction options, shared by every command that extracts --------------------------------

def extraction_options(fn=None, *, exclude: tuple[str, ...] = (), scope: str = SHARED):
    """The options of every command that extracts, built from the declarations of
    :class:`~featcache.extraction.options.ExtractConfig` (``scope='extract'`` adds those of
    ``featcache extract`` alone). ``exclude`` drops options a command sets itself (e.g. the
    backbone of a grid)."""
    if fn is None:
        return lambda f: extraction_options(f, exclude=exclude, scope=scope)
    for f in reversed(cli_fields(scope)):
        if f.name not in exclude:
            fn = _click_option(f)(fn)
    return fn


def _click_option(f):
    meta = f.metadata
    kw = {"help": meta["help"], "show_default": meta["show_default"] or None}
    if meta["metavar"]:
        kw["metavar"] = meta["metavar"]
    kind = meta["kind"]
    if kind == "switch":
        return click.option(*meta["flags"], f.name, default=f.default, **kw)
    if kind == "flag":
        return click.option(*meta["flags"], f.name, is_flag=True, **kw)
    if kind == "multiple":
        return click.option(*meta["flags"], f.name, multiple=True, **kw)
    kind_type = {"file": click.Path(dir_okay=False), "dir": click.Path(file_okay=False)}
    type_ = click.Choice(meta["choices"]) if meta["choices"] else kind_type.get(meta["type"], meta["type"])
    return click.option(*meta["flags"], f.name, type=type_, default=f.default, **kw)


#: The keyword names :func:`extraction_options` adds (every field offered on the command line).
EXTRACT_NAMES = tuple(f.name for f in cli_fields(EXTRACT_ONLY))


def extract_config(kw: dict):
    """Build an ExtractConfig from the options added by :func:`extraction_options` (popped from kw)."""
    from ..extraction.options import ExtractConfig

    vals = {f.name: kw.pop(f.name) for f in cli_fields(EXTRACT_ONLY) if f.name in kw}
    for f in cli_fields(EXTRACT_ONLY):
        if f.metadata["kind"] == "floats" and f.name in vals:
            vals[f.name] = floats(vals[f.name], f.metadata["flags"][-1])
    return ExtractConfig(**vals)


@click.command()
@click.argument("source")
@extraction_options(scope=EXTRACT_ONLY)
@click.option("--dry-run", is_flag=True, help="Print per layer the shape, bytes per image and total bytes; extract nothing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the result.")
@click.option("--image-key", default=None, help="wds: the image member of a sample (default: first of jpg, jpeg, png, webp).")
@click.option("--label-key", default=None, help="wds: cls (default) or json:FIELD.")
@click.option("--classes", "classes_file", default=None, help="wds, parquet: class names file, one per line.")
@click.option("--image-column", default=None, help="parquet, hf: the image column (default: found by type).")
@click.option("--label-column", default=None, help="parquet, hf: the label column (default: found by type or name).")
@fail_cleanly
def extract(source: str, dry_run: bool, quiet: bool, as_json: bool, image_key,
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
    from ..sources import with_options

    if image_key and image_column or label_key and label_column:
        raise click.UsageError("--image-key/--label-key are for wds:, --image-column/--label-column for parquet: "
                               "and hf:; give one of each pair.")
    source = with_options(source, image=image_key or image_column, label=label_key or label_column,
                          classes=classes_file)
    shard = kw.get("shard")
    config = extract_config(kw)
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
