"""featcache: run a frozen pretrained backbone once, cache its features, fit heads in seconds."""

__version__ = "0.1.0"

from .backbones import Backbone, list_backbones, load_backbone  # noqa: E402
from .errors import FeatcacheError  # noqa: E402
from .extract import ExtractConfig, ExtractResult, extract  # noqa: E402
from .sources import open_source  # noqa: E402
from .store import FeatureCache, list_caches, open_cache  # noqa: E402
from .taps import list_layers  # noqa: E402

__all__ = [
    "Backbone", "ExtractConfig", "ExtractResult", "FeatcacheError", "FeatureCache", "extract",
    "list_backbones", "list_caches", "list_layers", "load_backbone", "open_cache", "open_source",
]
