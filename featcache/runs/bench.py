"""Linear-probe benchmarking: a grid of backbones x layers x sources x heads x shots x seeds.

Extraction happens once per (backbone, layers, source) and is reused from the cache; every fit
appends one record to ``records.jsonl``, so an interrupted grid resumes with ``skip_existing``.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import ConfigError
from ..common.files import dumps, write_text
from ..extraction.pipeline import extract
from ..extraction.options import ExtractConfig
from .fit import FitConfig, check_options, fit_head, parse_grid
from ..backbones.base import DEFAULT_BACKBONE
from ..heads import HEADS
from .outputs import FolderLock, claim_numbered, reporting
from ..store.cache import open_cache

RECORDS = "records.jsonl"
RUNS = "runs"
#: Options of the [extract] and [fit] tables that the grid itself sets, per run.
_GRID_OWNED = {"extract": {"backbone", "layers", "output", "shard", "merge", "defer_merge"},
               "fit": {"head", "layer", "seed", "shots", "seeds", "output", "runs_dir", "overwrite"}}
_TABLES = {"extract": ExtractConfig, "fit": FitConfig}
RECORD_KEYS = ("backbone", "weights", "layer", "source", "head", "shots", "seed", "metrics",
               "extract_seconds", "fit_seconds", "cache", "featcache_version")


@dataclass(frozen=True)
class BenchConfig:
    """A benchmark grid. ``shots`` 0 means all training data; ``layers`` empty means each
    backbone's default layer."""

    backbones: tuple[str, ...] = (DEFAULT_BACKBONE,)
    sources: tuple[str, ...] = ("digits",)
    layers: tuple[str, ...] = ()
    heads: tuple[str, ...] = ("logreg",)
    shots: tuple[int, ...] = (0,)
    seeds: int = 1
    extract: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Check every name and option of the grid before anything is extracted or fitted."""
        for table, options in (("extract", self.extract), ("fit", self.fit)):
            _check_keys(options, _table_keys(table), f"the [{table}] table")
        for name in ("backbones", "sources", "heads", "shots"):
            if not getattr(self, name):
                raise ConfigError(f"The benchmark grid needs at least one value in '{name}'.")
        if any((not isinstance(s, int)) or s < 0 for s in self.shots):
            raise ConfigError(f"'shots' must be integers >= 0 (0 = all data). Got {list(self.shots)}.")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ConfigError(f"'seeds' must be an int >= 1. Got {self.seeds!r}.")
        from ..backbones import check_backbone_spec
        from ..sources import check_source_spec

        for spec in self.backbones:
            check_backbone_spec(spec)
        for spec in self.sources:
            check_source_spec(spec)
        self.extract_config().validate()
        base = self.fit_config()
        for head in self.heads:
            check_options(FitConfig(**{**base.to_dict(), "head": head}))

    def extract_config(self) -> ExtractConfig:
        return ExtractConfig(**self.extract)

    def fit_config(self) -> FitConfig:
        """The [fit] options; a ``grid`` may be a list or the CLI syntax ("0.1,1", "logspace:-2:2:5")."""
        fit = dict(self.fit)
        if isinstance(fit.get("grid"), str):
            fit["grid"] = parse_grid(fit["grid"])
        elif fit.get("grid") is not None:
            fit["grid"] = tuple(fit["grid"])
        return FitConfig(**fit)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "BenchConfig":
        """Read a grid from TOML: top-level lists ``backbones``, ``sources``, ``layers``, ``heads``,
        ``shots``, an int ``seeds``, and optional tables ``[extract]`` and ``[fit]`` of options."""
        import tomllib

        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"Benchmark file '{path}' does not exist.") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"Benchmark file '{path}' is not valid TOML: {e}.") from None
        _check_keys(data, {f.name for f in cls.__dataclass_fields__.values()}, f"'{path}'")
        for table in _TABLES:
            if table in data and not isinstance(data[table], dict):
                raise ConfigError(f"'{table}' in '{path}' must be a table ([{table}]). Got {data[table]!r}.")
            _check_keys(data.get(table, {}), _table_keys(table), f"the [{table}] table of '{path}'")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kw)

    def runs(self) -> int:
        """Cells of the grid: an upper bound of the fits (see :func:`run_bench` on seeds at shots 0)."""
        n_layers = max(1, len(self.layers))
        return len(self.backbones) * len(self.sources) * n_layers * len(self.heads) * len(self.shots) * self.seeds


def _table_keys(table: str) -> set[str]:
    return {f.name for f in _TABLES[table].__dataclass_fields__.values()} - _GRID_OWNED[table]


def _check_keys(data: dict, known: set[str], where: str) -> None:
    """Unknown keys raise one error naming each with its closest valid name."""
    unknown = sorted(set(data) - known)
    if not unknown:
        return
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        named.append(f"{key} (did you mean '{close[0]}'?)" if close else key)
    raise ConfigError(f"Unknown keys in {where}: {', '.join(named)}. Known: {', '.join(sorted(known))}.")


def _key(rec: dict) -> tuple:
    return (rec["backbone"], rec["layer"], rec["source"], rec["head"], int(rec["shots"]), int(rec["seed"]))


def _stored_records(out: Path) -> list[dict]:
    """Records as stored, one per grid cell: a cell fitted again (the same grid re-run into the
    folder) is replaced by its latest record, so a re-run never counts a run twice. A line cut by a
    crash is ignored."""
    path = out / RECORDS
    if not path.is_file():
        return []
    cells: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and all(k in rec for k in RECORD_KEYS):
            cells.pop(_key(rec), None)  # re-inserted: the order is that of the latest fits
            cells[_key(rec)] = rec
    return list(cells.values())


def resolve_paths(rec: dict, out: Path) -> dict:
    """A record with its ``run`` and ``cache`` paths, stored relative to the bench folder, joined
    to where the folder is now (an absolute path, as older records hold, stays as it is)."""
    rec = dict(rec)
    for key in ("run", "cache"):
        if isinstance(rec.get(key), str) and rec[key]:
            rec[key] = os.path.join(out, rec[key])
    return rec


def _relative(path: str, out: Path) -> str:
    """``path`` relative to the bench folder when it lies inside it (runs, a cache kept there); else absolute,
    so that moving the bench folder breaks neither."""
    p, base = Path(path).resolve(), out.resolve()
    return p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p)


def read_records(out_dir: str | os.PathLike) -> list[dict]:
    """Records of a benchmark folder, one per grid cell (the latest fit of a cell replaces earlier
    ones), with ``run`` and ``cache`` paths joined to ``out_dir``: a moved folder still finds its runs."""
    out = Path(out_dir)
    return [resolve_paths(r, out) for r in _stored_records(out)]


ProgressFn = Callable[[int, int, dict, float], None]


def _drop_torn_tail(path: Path) -> None:
    """A crash can leave half a line at the end of records.jsonl: cut it, so the next record starts
    on a line of its own instead of being glued to the torn one (and lost)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _extraction_seconds(timings: dict) -> float:
    """Forward-pass seconds stored in a cache; a cache assembled from shards adds up its shards'."""
    if isinstance(timings.get("shards"), list):
        return sum(_extraction_seconds(t) for t in timings["shards"] if isinstance(t, dict))
    return float(timings.get("compute_seconds") or 0.0)


def _seedless(head: str, on_eval_split: bool) -> bool:
    """Whether a fit on all training data draws nothing from its seed (every seed would repeat it):
    the head has no random_state and its sweep, if any, is scored on an eval split, not by k-fold."""
    entry = HEADS.entry(head)
    return "random_state" not in entry.extra["options"] and (entry.extra["param"] is None or on_eval_split)


def _next_run_number(out: Path, records: list[dict]) -> int:
    """One more than any run number used in ``out``: in its run folders or its records."""
    names = [Path(r.get("run") or "").name for r in records]
    if (out / RUNS).is_dir():
        names += [p.name for p in (out / RUNS).iterdir()]
    numbers = [int(m.group(1)) for n in names if (m := re.match(r"(\d+)-", n))]
    return max(numbers, default=0) + 1


def run_bench(config: BenchConfig, out_dir: str | os.PathLike, *, skip_existing: bool = False,
              overwrite: bool = False, progress: ProgressFn | None = None, extract_progress=None) -> list[dict]:
    """Run the grid, appending one record per fit to ``out_dir/records.jsonl``; then write the
    leaderboard (Markdown, CSV) and plots. Returns all records of the folder (see :func:`read_records`).

    Every cache is extracted (or found) first, so the progress total is exact from the first fit.
    A fit on all training data (shots 0) whose head draws nothing from the seed is run for seed 0
    only: the other seeds would repeat it. Earlier records of the folder are kept (a second grid
    adds to the leaderboard) unless ``overwrite``, which deletes them and their run folders first;
    a cell fitted again replaces its earlier record and run folder, so a re-run grid counts each
    run once. ``skip_existing`` skips the cells that already have a record. Run folders are
    numbered on from the highest number used, each number claimed once. Records store the paths
    of runs (and of a cache inside ``out_dir``) relative to ``out_dir``. The folder is locked
    while the grid runs: a second process writing it gets an error.
    """
    config.validate()
    if overwrite and skip_existing:
        raise ConfigError("The 'overwrite' option deletes the records that the 'skip_existing' option would resume "
                          "from. Pass one of them.")
    out = Path(out_dir)
    with reporting(out):
        out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out, "bench folder")
    try:
        return _run_bench(config, out, skip_existing=skip_existing, overwrite=overwrite, progress=progress,
                          extract_progress=extract_progress)
    finally:
        lock.release()


def _run_bench(config: BenchConfig, out_dir: Path, *, skip_existing: bool, overwrite: bool,
               progress: ProgressFn | None, extract_progress) -> list[dict]:
    """:func:`run_bench` under the folder's lock."""
    out = Path(out_dir)
    if overwrite:
        (out / RECORDS).unlink(missing_ok=True)
        shutil.rmtree(out / RUNS, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(out / RECORDS)
    earlier = _stored_records(out)
    done = {_key(r) for r in earlier} if skip_existing else set()
    number = _next_run_number(out, earlier)
    t0 = time.perf_counter()
    ex = config.extract_config()
    fit_base = config.fit_config()
    # Every cache first (a finished one is a cache hit: a fingerprint check, no forward pass): the
    # cells, and so the progress total, are known before the first fit and never change.
    plan = []
    for backbone, source in itertools.product(config.backbones, config.sources):
        res = extract(source, ex, backbone=backbone, layers=tuple(config.layers), progress=extract_progress)
        with open_cache(res.cache) as c:
            layers, weights = list(c.layers), c.fingerprint["backbone"]["weights"]
            # A cache hit costs no forward pass; the extraction it saved is the one recorded in the cache.
            extract_seconds = _extraction_seconds(c.timings) if res.cache_hit else res.seconds
            on_eval_split = fit_base.eval_split != "none" and (fit_base.eval_split is not None or "val" in c.splits)
        plan += [(backbone, source, res, weights, extract_seconds, layer, head, shots, seed)
                 for layer, head, shots, seed in itertools.product(layers, config.heads, config.shots,
                                                                   range(config.seeds))
                 if not (seed and not shots and _seedless(head, on_eval_split))]  # else the same fit as seed 0's
    total = len(plan)
    replaced = {_key(r): r.get("run") for r in earlier}
    for i, (backbone, source, res, weights, extract_seconds, layer, head, shots, seed) in enumerate(plan, 1):
        key = (backbone, layer, source, head, shots, seed)
        if key in done:
            continue
        number, run_dir = claim_numbered(out / RUNS, f"{head}-{layer}-{shots}shot-seed{seed}", number)
        fit = fit_head(res.cache, fit_base, head=head, layer=layer, seed=seed, shots=shots or None, seeds=1,
                       output=str(run_dir))
        number += 1
        rec = {"backbone": backbone, "weights": weights, "layer": layer, "source": source, "head": head,
               "shots": shots, "seed": seed, "metrics": fit.metrics, "extract_seconds": extract_seconds,
               "fit_seconds": fit.seconds, "cache": _relative(res.cache, out), "cache_hit": res.cache_hit,
               "featcache_version": __version__, "best": fit.best, "run": _relative(fit.run, out)}
        with open(out / RECORDS, "a") as f:
            f.write(dumps(rec) + "\n")  # strict JSON: a NaN metric is written as null
            f.flush()
            os.fsync(f.fileno())
        _drop_replaced_run(out, replaced.pop(key, None))
        done.add(key)
        if progress:
            progress(i, total, resolve_paths(rec, out), time.perf_counter() - t0)
    stored = _stored_records(out)
    # One line per cell: the lines of replaced fits go (the latest fit of a cell is the one kept).
    write_text(out / RECORDS, "".join(dumps(r) + "\n" for r in stored))
    records = [resolve_paths(r, out) for r in stored]
    write_outputs(records, out)
    return records


def _drop_replaced_run(out: Path, run: str | None) -> None:
    """Delete the run folder of a record that a new fit of the same cell replaced (only inside
    ``out/runs``: a folder elsewhere is not the benchmark's to delete)."""
    if not run:
        return
    path = (out / run).resolve()
    if path.parent == (out / RUNS).resolve() and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def write_outputs(records: list[dict], out: Path) -> dict[str, Path]:
    """Leaderboard (Markdown, CSV) and PNG plots of a benchmark folder (``leaderboard.png``: top-1 with
    its 95% intervals; ``shots.png``, ``layers.png``, ``time.png``)."""
    from ..reports import plots
    from ..reports.leaderboard import board_split, leaderboard, leaderboard_csv, leaderboard_markdown

    split, _ = board_split(records)
    rows = leaderboard(records, split=split)
    write_text(out / "leaderboard.md", leaderboard_markdown(rows))
    leaderboard_csv(rows, out / "leaderboard.csv")
    paths = {"leaderboard.md": out / "leaderboard.md", "leaderboard.csv": out / "leaderboard.csv"}
    if records:
        if any(r["top1_mean"] is not None for r in rows):
            paths["leaderboard.png"] = plots.leaderboard_intervals(rows, out / "leaderboard.png")
        paths["shots.png"] = plots.shots_curve(records, out / "shots.png", split=split, rows=rows)
        paths["layers.png"] = plots.accuracy_by_layer(records, out / "layers.png", split=split, rows=rows)
        paths["time.png"] = plots.time_breakdown(records, out / "time.png")
    return paths
