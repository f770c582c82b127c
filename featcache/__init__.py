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
import sys
import types

#: Public name -> (module, attribute). Imported on first use, so that ``featcache --help``,
#: ``featcache ls`` or reading a cache do not pay for importing torch and torchvision.
_EXPORTS = {
    "Backbone": ("backbones", "Backbone"), "list_backbones": ("backbones", "list_backbones"),
    "load_backbone": ("backbones", "load_backbone"),
    "BenchConfig": ("bench", "BenchConfig"), "run_bench": ("bench", "run_bench"),
    "FeatcacheError": ("errors", "FeatcacheError"),
    "ExtractConfig": ("plan", "ExtractConfig"), "ExtractResult": ("plan", "ExtractResult"),
    "extract": ("extract", "extract"),
    "FitConfig": ("fit", "FitConfig"), "FitResult": ("fit", "FitResult"), "evaluate": ("runs", "evaluate"),
    "fit_head": ("fit", "fit_head"), "load_run": ("runs", "load_run"),
    "list_heads": ("heads", "list_heads"), "make_head": ("heads", "make_head"),
    "export_run": ("predict", "export"), "load_export": ("predict", "load_export"),
    "predict": ("predict", "predict"),
    "probe_layers": ("probe_layers", "probe_layers"),
    "open_source": ("sources", "open_source"),
    "FeatureCache": ("store", "FeatureCache"), "list_caches": ("store", "list_caches"),
    "open_cache": ("store", "open_cache"),
    "list_layers": ("taps", "list_layers"),
    "write_report": ("report", "write_report"),
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


class _Package(types.ModuleType):
    """``featcache.extract``, ``featcache.predict`` and ``featcache.probe_layers`` are functions, as
    they were when this file imported them eagerly: importing the submodules of the same names
    must not replace them (the modules stay in ``sys.modules``)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name, ("",))[0] == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
