"""featcache: run a frozen pretrained backbone once, cache its features, fit heads in seconds.

The public API (what the CLI and the notebook use)::

    extract(source, ...)            -> ExtractResult     source -> backbone -> HDF5 cache
    open_cache(path)                -> FeatureCache      read features, labels, ids
    fit_head(cache, head=...)       -> FitResult         sweep, refit, metrics, saved run
    evaluate / predict / export_run                      use a saved run
    run_bench, probe_layers, write_report                benchmarking and reports
"""

__version__ = "0.1.0"

from .backbones import Backbone, list_backbones, load_backbone  # noqa: E402
from .bench import BenchConfig, run_bench  # noqa: E402
from .errors import FeatcacheError  # noqa: E402
from .extract import ExtractConfig, ExtractResult, extract  # noqa: E402
from .fit import FitConfig, FitResult, evaluate, fit_head, load_run  # noqa: E402
from .heads import list_heads, make_head  # noqa: E402
from .predict import export as export_run, load_export, predict  # noqa: E402
from .probe_layers import probe_layers  # noqa: E402
from .sources import open_source  # noqa: E402
from .store import FeatureCache, list_caches, open_cache  # noqa: E402
from .taps import list_layers  # noqa: E402

__all__ = [
    "Backbone", "BenchConfig", "ExtractConfig", "ExtractResult", "FeatcacheError", "FeatureCache", "FitConfig",
    "FitResult", "evaluate", "export_run", "extract", "fit_head", "list_backbones", "list_caches", "list_heads",
    "list_layers", "load_backbone", "load_export", "load_run", "make_head", "open_cache", "open_source", "predict",
    "probe_layers", "run_bench",
]


def write_report(src, out):
    """Write a self-contained HTML report of a run, bench or layers folder (see featcache.report)."""
    from .report import write_report as _write

    return _write(src, out)


__all__.append("write_report")
