"""Features out: ``export-features``, ``index``, ``search``, ``leaks``. Each imports its library
(and its optional packages: ``pip install 'featcache[index]'``) only when it runs."""

from __future__ import annotations

import click

from .common import Progress, echo_json, fail_cleanly


@click.command(name="export-features")
@click.argument("cache", type=click.Path())
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--layer", default=None, help="Cached layer (default: the first); spatial features are flattened.")
@click.option("--split", "splits", multiple=True, help="Split to export (repeatable; default: every split).")
@click.option("--format", "format", default="npy", show_default=True,
              help="npy: SPLIT/embeddings/NNNN.npy + SPLIT/metadata/NNNN.parquet (embedding-reader parquet_npy); "
                   "parquet: SPLIT/embeddings/NNNN.parquet with an 'embedding' column.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None,
              help="Vector dtype (default: the cache's).")
@click.option("--part-rows", type=int, default=None, help="Rows per part (default: parts of about 256 MiB).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@fail_cleanly
def export_features(cache, out, layer, splits, format, dtype, part_rows, quiet, as_json) -> None:  # noqa: A002
    """Write CACHE's vectors and row metadata (id, label, class, split, path, row) for embedding-reader,
    autofaiss, pandas: per split, numbered parts, each written atomically; a rerun keeps finished parts."""
    from ..exports import export_features as run

    bar = Progress("export", quiet or as_json)
    try:
        rep = run(cache, out, layer=layer, splits=splits or None, format=format, dtype=dtype, part_rows=part_rows,
                  progress=bar)
    finally:
        bar.close()
    if as_json:
        echo_json(rep)
        return
    for split, d in rep["splits"].items():
        kept = f", {d['kept']} kept from the last run" if d["kept"] else ""
        click.echo(f"{split:<6} {d['rows']:>8} rows x {d['dim']} {d['dtype']} in {d['parts']} parts{kept}: {d['dir']}")


@click.command(name="index")
@click.argument("cache", type=click.Path())
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False), help="Index folder.")
@click.option("--layer", default=None, help="Cached layer (default: the first).")
@click.option("--split", default="train", show_default=True, help="Split to index, or 'all'.")
@click.option("--metric", type=click.Choice(["cosine", "l2"]), default="cosine", show_default=True,
              help="cosine: inner product of L2-normalised vectors.")
@click.option("--index-factory", default=None,
              help="FAISS factory string (default: exact Flat up to 1M rows, else IVF-HNSW with SQ8/PQ by size).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@fail_cleanly
def index(cache, out, layer, split, metric, index_factory, quiet, as_json) -> None:
    """Build a FAISS index of a split of CACHE, with its ids, labels and the cache fingerprint beside it."""
    from ..retrieval import build_index

    bar = Progress("index", quiet or as_json)
    try:
        meta = build_index(cache, out, layer=layer, split=split, metric=metric, index_factory=index_factory,
                           progress=bar)
    finally:
        bar.close()
    if as_json:
        echo_json({k: v for k, v in meta.items() if k not in ("fingerprint", "extract_config", "classes")})
        return
    click.echo(f"{meta['index']}: {meta['n']} rows x {meta['dim']} ({meta['layer']}), {meta['index_factory']} "
               f"{meta['metric']}{' (exact)' if meta['exact'] else ''}, {meta['bytes'] / 1e6:.1f} MB")


@click.command()
@click.argument("index", type=click.Path(file_okay=False))
@click.argument("query", nargs=-1, required=True)
@click.option("-k", "k", type=int, default=10, show_default=True, help="Neighbours per query.")
@click.option("--ids", "by_id", is_flag=True, help="QUERY is ids of rows in the index's cache, not images.")
@click.option("--device", default="auto", show_default=True, help="Device that embeds query images.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="The weights file the cache was extracted with, if it moved.")
@click.option("--batch-size", type=int, default=None, help="Images per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per query.")
@fail_cleanly
def search(index, query, k, by_id, device, weights, batch_size, as_json) -> None:
    """The K nearest indexed rows of QUERY: image files, folders or a source spec (embedded with the
    index's backbone, preprocessing and layer), or with --ids rows already in the cache. Scores are
    cosine similarities (metric cosine) or squared L2 distances (metric l2)."""
    from ..retrieval import search as run

    results = run(index, list(query), k=k, by_id=by_id, device=device, weights=weights, batch_size=batch_size)
    if as_json:
        echo_json(results)
        return
    for r in results:
        click.echo(r["query"])
        for h in r["neighbors"]:
            click.echo(f"  {h['rank']:>3}  {h['score']:.4f}  {h['split']}/{h['class']}  {h['id']}")


@click.command()
@click.argument("cache", type=click.Path())
@click.option("--layer", default=None, help="Cached layer compared (default: the first).")
@click.option("--threshold", type=float, default=None,
              help="Cosine similarity above which two rows are near duplicates (default: 0.83, or midway between "
                   "train's median nearest-neighbour cosine and 1 when higher; README 'leaks').")
@click.option("--max-pairs", type=int, default=10000, show_default=True, help="Near pairs listed at most.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@fail_cleanly
def leaks(cache, layer, threshold, max_pairs, as_json) -> None:
    """Exact (same content hash) and near (cosine above --threshold) duplicates within and across
    the splits of CACHE: val or test rows with a copy in train inflate every score measured on them."""
    from ..retrieval import find_leaks

    rep = find_leaks(cache, layer=layer, threshold=threshold, max_pairs=max_pairs)
    if as_json:
        echo_json(rep.to_dict())
        return
    click.echo(f"{rep.cache} ({rep.layer}, near: cosine > {rep.threshold:g})")
    if not rep.summary:
        click.echo("No exact or near duplicates.")
        return
    click.echo(f"{'splits':<14} {'rows':>7} {'exact rows':>11} {'near rows':>10} {'exact pairs':>12} "
               f"{'near pairs':>11}")
    for pair, d in rep.summary.items():
        click.echo(f"{pair:<14} {d['rows']:>7} {d['exact_rows']:>11} {d['near_rows']:>10} {d['exact_pairs']:>12} "
                   f"{d['near_pairs']:>11}")
    for g in rep.exact[:20]:
        click.echo("exact  " + "  ==  ".join(f"{r['split']}/{r['id']}" for r in g["rows"]))
    for p in rep.near[:20]:
        a, b = p["a"], p["b"]
        click.echo(f"near   {p['cosine']:.4f}  {a['split']}/{a['id']}  ~  {b['split']}/{b['id']}")
    hidden = len(rep.exact) + rep.near_pairs - min(20, len(rep.exact)) - min(20, len(rep.near))
    if hidden > 0:
        listed = f"the first {len(rep.near)}" if rep.truncated else "every"
        click.echo(f"... {hidden} more: --json lists every exact group and {listed} near pair.")
