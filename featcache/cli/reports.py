"""Benchmark and report commands: ``bench``, ``probe-layers``, ``report``, ``demo``."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .common import Progress, csv_values, echo_json, explicit_options, fail_cleanly
from .extraction import EXTRACT_NAMES, extract_config, extraction_options


@click.command()
@click.option("-o", "--out-dir", type=click.Path(file_okay=False), default="demo-out", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default="cache", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@fail_cleanly
def demo(out_dir, cache_dir, quiet) -> None:
    """Extract the built-in digits with efficientnet_lite0, fit two heads with sweeps, print the
    leaderboard and write an HTML report."""
    from ..runs.demo import run_demo

    def progress(i, total, rec, elapsed):
        from ..reports.leaderboard import board_split

        split, _ = board_split([rec])
        click.echo(f"[{i}/{total}] {rec['head']}: best {rec['best']['param']}={rec['best']['value']:g}, {split} top-1 "
                   f"{rec['metrics'][split]['top1']:.4f}, fitted in {rec['fit_seconds']:.1f} s")

    bar = Progress("extract digits", quiet)
    try:
        out = run_demo(out_dir=out_dir, cache_dir=cache_dir, progress=progress, extract_progress=bar)
    finally:
        bar.close()
    rec = out["records"][0]
    when = ("a cache hit: extracted earlier in" if rec.get("cache_hit") else "extracted in")
    click.echo(f"\ncache: {rec['cache']} ({when} {rec['extract_seconds']:.1f} s; a re-run is a cache hit)\n")
    click.echo((Path(out["bench_dir"]) / "leaderboard.md").read_text())
    click.echo(f"report: {out['report']}")


@click.command()
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
@fail_cleanly(interrupted="Stopped (Ctrl-C); the fits finished so far are kept in the folder's records.jsonl. Run "
                          "the same command with --skip-existing to resume.")
def bench(ctx, config_file, backbones, sources, layers, heads, shots, seeds, out_dir, skip_existing, overwrite,
          quiet, as_json, **kw):
    """Benchmark a grid of backbones x layers x sources x heads x shots x seeds.

    CONFIG_FILE is a TOML file with lists backbones, sources, layers, heads, shots, an int seeds, and
    optional [extract] and [fit] tables of options; flags override it. Each cache is extracted once;
    every fit appends a record to OUT_DIR/records.jsonl (earlier records are kept unless --overwrite);
    then the leaderboard (Markdown, CSV) and plots are written.
    """
    from dataclasses import replace

    from ..runs.bench import BenchConfig, run_bench
    from ..reports.leaderboard import board_split, leaderboard

    cfg = BenchConfig.from_toml(config_file) if config_file else BenchConfig()
    grid = {"backbones": csv_values(backbones), "sources": csv_values(sources), "layers": csv_values(layers), "heads": csv_values(heads),
            "shots": csv_values(shots, int), "seeds": seeds}
    cfg = replace(cfg, **{k: v for k, v in grid.items() if v is not None})
    typed = explicit_options(ctx, [n for n in EXTRACT_NAMES if n in kw])
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
        split, _ = board_split([rec])
        top1 = (rec["metrics"].get(split) or {}).get("top1")
        click.echo(f"[{i}/{total}] {rec['backbone']} {rec['layer']} {rec['source']} {rec['head']} "
                   f"shots={rec['shots'] or 'all'} seed={rec['seed']}: top-1 on {split} "
                   f"{top1 if top1 is None else f'{top1:.4f}'}"
                   f"  elapsed {elapsed:.0f} s, ETA {eta:.0f} s", err=True)

    bar = Progress("extract", quiet)
    try:
        records = run_bench(cfg, out_dir, skip_existing=skip_existing, overwrite=overwrite, progress=progress,
                            extract_progress=bar)
    finally:
        bar.close()
    rows = leaderboard(records)
    if as_json:
        echo_json({"out_dir": out_dir, "runs": len(records), "new_runs": len(fitted), "leaderboard": rows})
        return
    click.echo((Path(out_dir) / "leaderboard.md").read_text())
    click.echo(f"{len(records)} runs in {out_dir}/ ({len(fitted)} new, {time.perf_counter() - start:.0f} s): "
               f"records.jsonl, leaderboard.md/.csv/.png, shots.png, layers.png, time.png")


@click.command(name="probe-layers")
@click.argument("backbone")
@click.argument("source")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False), default="layers-out", show_default=True)
@click.option("--head", default="logreg", show_default=True, help="Head fitted on every layer.")
@extraction_options(exclude=("backbone", "layers"))
@click.option("--json", "as_json", is_flag=True, help='Print {"layers": [...], "recommendation": {...}}.')
@fail_cleanly
def probe_layers(backbone, source, out_dir, head, as_json, **kw):
    """Which layers to freeze? Fit HEAD on every stage of BACKBONE over SOURCE and recommend a boundary."""
    from ..runs.probe import probe_layers as run

    bar = Progress("extract", as_json)
    try:
        res = run(backbone, source, out_dir=out_dir, head=head, extract_config=extract_config(kw), progress=bar)
    finally:
        bar.close()
    if as_json:
        echo_json({"layers": res.layers, "recommendation": res.recommendation, "out_dir": res.out_dir})
        return
    from ..metrics.scores import format_interval

    click.echo(f"{'layer':<16} {'dim':>6} {'top-1':>7} {'95% CI':>11} {'bal.acc':>8}")
    for r in res.layers:
        mark = "  <- freeze until here" if r["name"] == res.recommendation["freeze_until"] else ""
        click.echo(f"{r['name']:<16} {r['dim']:>6} {r['top1']:>7.4f} {format_interval(r.get('top1_ci')):>11} "
                   f"{r['balanced_accuracy']:>8.4f}{mark}")
    click.echo("")
    click.echo(res.recommendation["reason"])
    click.echo(f"\nwrote {res.out_dir}/layers.json and {res.plot}")


@click.command()
@click.argument("src", type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="HTML file to write.")
@click.option("--json", "as_json", is_flag=True, help='Print {"report": PATH}.')
@fail_cleanly
def report(src, output, as_json):
    """Write one self-contained HTML page for a RUN_DIR, BENCH_DIR or LAYERS_DIR."""
    from ..reports.pages import write_report

    path = write_report(src, output)
    if as_json:
        echo_json({"report": str(path)})
        return
    click.echo(f"wrote {path}")
