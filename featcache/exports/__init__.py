"""Features out of the cache, in the layouts other tools read.

Each output format is one module registered in :data:`FORMATS` (one file, one registry line):

    npy       SPLIT/embeddings/NNNN.npy + SPLIT/metadata/NNNN.parquet   (embedding-reader parquet_npy)
    parquet   SPLIT/embeddings/NNNN.parquet, an 'embedding' fixed-size-list column + metadata
"""

from __future__ import annotations

from . import npy, parquet  # noqa: F401  (registers the formats)
from .base import FORMATS, META_COLUMNS
from .writer import MANIFEST, export_features, read_manifest

__all__ = ["FORMATS", "META_COLUMNS", "MANIFEST", "export_features", "read_manifest"]
