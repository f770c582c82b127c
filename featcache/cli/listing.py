"""Commands that list and describe: ``backbones``, ``layers``, ``sources``, ``heads``, ``ls``, ``info``.
Those that read no network (all but ``layers``) import neither torch nor torchvision."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .common import echo_json, fail_cleanly


@click.command()
@click.option("--json", "as_json", is_flag=True, help='Print {"families": [...], "backbones": [...]}.')
def backbones(as_json: bool) -> None:
    """List the backbone families (timm:NAME, hf:NAME_OR_PATH, ...) and the named backbones."""
    from ..backbones import list_backbones, list_families

    families, rows = list_families(), list_backbones()
    if as_json:
        echo_json({"families": families, "backbones": rows})
        return
    for r in rows:
        click.echo(f"{r['name']:<32} {r['description']}")
    for f in families:
        if f["family"] not in {r["family"] for r in rows}:
            click.echo(f"{f['syntax']:<32} {f['description']}")


@click.command()
@click.argument("backbone")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Local weights file.")
@click.option("--depth", type=int, default=2, show_default=True,
              help="Show modules nested at most this deep (stages always shown); 0 shows all.")
@click.option("--input-size", type=int, default=None, help="Override the input size (px).")
@click.option("--json", "as_json", is_flag=True, help='Print [{"name", "shape", "stage"}, ...].')
@fail_cleanly
def layers(backbone: str, weights, depth: int, input_size, as_json: bool) -> None:
    """List BACKBONE's tap points in forward order, with output shapes; '*' marks stages."""
    from ..backbones import load_backbone
    from ..backbones.taps import list_layers

    # Names and shapes do not depend on the parameters: list them without fetching weights.
    bb = load_backbone(backbone, weights=weights, input_size=input_size, download=False)
    infos = list_layers(bb, depth=depth or None)
    if as_json:
        echo_json([i.to_dict() for i in infos])
        return
    click.echo(f"{bb.name} at {bb.preprocess.crop} px (default layer: {bb.default_layer})")
    for i in infos:
        click.echo(f"{'*' if i.stage else ' '} {i.name:<40} {' x '.join(map(str, i.shape))}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of the kinds with their capabilities.")
def sources(as_json: bool) -> None:
    """List the kinds of data source."""
    from ..sources import list_sources

    rows = list_sources()
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['kind']:<8} {r['description']}")


@click.command()
@click.argument("cache", type=click.Path())
@click.option("--verify", is_flag=True,
              help="Read every chunk and check its checksum (reads the whole file); a damaged cache is an error.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@fail_cleanly
def info(cache: str, verify: bool, as_json: bool) -> None:
    """Show a cache's fingerprint, splits, shapes, failures, notes and checksums."""
    from ..store.cache import open_cache

    with open_cache(cache) as c:
        d = c.info()
        if verify:
            d["verified"] = c.verify()
    if as_json:
        echo_json(d)
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
    if d["notes"]:
        click.echo(f"  notes:      {len(d['notes'])}")
        for n in d["notes"][:20]:
            click.echo(f"    {n.get('split')}/{n.get('id')}: {n.get('note')}")
    click.echo(f"  size:       {d['bytes'] / 1e6:.1f} MB, fingerprint {d['fingerprint_hash']}")
    if d["checksums"] == "none":
        state = ("none (made by a featcache before checksums: damaged bytes cannot be detected; delete it and "
                 "extract again to add them)")
    elif "verified" in d:
        state = f"{d['checksums']} per chunk; verified: {d['verified']['datasets']} datasets read intact"
    else:
        state = f"{d['checksums']} per chunk (checked on every read; --verify reads every chunk now)"
    click.echo(f"  checksums:  {state}")


@click.command(name="ls")
@click.option("--cache-dir", type=click.Path(file_okay=False), default="cache", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def ls_(cache_dir: str, as_json: bool) -> None:
    """List caches in the cache folder with size and date."""
    from ..store.cache import list_caches

    rows = list_caches(cache_dir)
    if as_json:
        echo_json(rows)
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

@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def heads(as_json: bool) -> None:
    """List the heads, their swept parameter and their options."""
    from ..heads import list_heads

    rows = list_heads()
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        click.echo(f"{r['name']:<8} {r['description']}")
        if r["param"]:
            g = r["default_grid"]
            click.echo(f"         sweeps {r['param']} over {len(g)} values, {g[0]:g} .. {g[-1]:g}")
        for opt, o in r["options"].items():
            # The default as --opt KEY=VALUE reads it (JSON, or the bare string).
            d = o["default"]
            given = "(required)" if o.get("required") else d if isinstance(d, str) else json.dumps(d)
            click.echo(f"         --opt {opt}={given}  {o['constraint']}" + (f"; {o['help']}" if o["help"] else ""))
