"""featcache: run a frozen pretrained backbone once, cache its features, fit heads in seconds.

The public API (what the CLI and the notebook use)::

    extract(source, ...)            -> ExtractResult     source -> backbone -> HDF5 cache
    open_cache(path)                -> FeatureCache      read features, labels, ids
    fit_head(cache, head=...)       -> FitResult         sweep, refit, metrics, saved run
    evaluate / predict / export_run                      use a saved run
    run_bench, probe_layers, write_report                benchmarking and reports
    export_features, build_index, search, find_leaks     features out: files, FAISS, leaks
"""

__version__ = "0.1.0"

import importlib

#: Public name -> (module, attribute). Imported on first use, so that ``featcache --help``,
#: ``featcache ls`` or reading a cache do not pay for importing torch and torchvision.
_EXPORTS = {
    "Backbone": ("backbones", "Backbone"), "list_backbones": ("backbones", "list_backbones"),
    "load_backbone": ("backbones", "load_backbone"),
    "BenchConfig": ("runs.bench", "BenchConfig"), "run_bench": ("runs.bench", "run_bench"),
    "FeatcacheError": ("errors", "FeatcacheError"),
    "ExtractConfig": ("extraction.plan", "ExtractConfig"), "ExtractResult": ("extraction.plan", "ExtractResult"),
    "extract": ("extraction.pipeline", "extract"),
    "FitConfig": ("runs.fit", "FitConfig"), "FitResult": ("runs.fit", "FitResult"),
    "evaluate": ("runs.saved", "evaluate"), "fit_head": ("runs.fit", "fit_head"), "load_run": ("runs.saved", "load_run"),
    "list_heads": ("heads", "list_heads"), "make_head": ("heads", "make_head"),
    "export_run": ("runs.inference", "export"), "load_export": ("runs.inference", "load_export"),
    "predict": ("runs.inference", "predict"),
    "probe_layers": ("runs.probe", "probe_layers"),
    "open_source": ("sources", "open_source"),
    "FeatureCache": ("store.cache", "FeatureCache"), "list_caches": ("store.cache", "list_caches"),
    "open_cache": ("store.cache", "open_cache"),
    "list_layers": ("backbones.taps", "list_layers"),
    "write_report": ("reports.pages", "write_report"),
    "export_features": ("exports", "export_features"),
    "build_index": ("retrieval", "build_index"), "load_index": ("retrieval", "load_index"),
    "search": ("retrieval", "search"), "find_leaks": ("retrieval", "find_leaks"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'featcache' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
