"""Exceptions raised by featcache.

Library code raises these; the command-line interface turns them into ``Error: ...`` lines.
Every message names the bad value and the next step.
"""

from __future__ import annotations


class FeatcacheError(Exception):
    """Base class of every error featcache raises on purpose."""


class ConfigError(FeatcacheError, ValueError):
    """An option has a bad value."""


class BackboneError(FeatcacheError):
    """A backbone, its weights or one of its layers cannot be used."""


class WeightsUnavailableError(BackboneError):
    """Pretrained weights cannot be fetched (no network) or read."""


class SourceError(FeatcacheError):
    """A data source is missing or malformed."""


class CacheError(FeatcacheError):
    """A cache file is missing, malformed or does not match what was asked."""


class CacheLockedError(CacheError):
    """Another process is writing the same cache."""


class ExtractionInterrupted(FeatcacheError):
    """Extraction stopped early (Ctrl-C); what was computed is kept for the next run."""


class HeadError(FeatcacheError):
    """A head cannot be fitted, loaded or used."""


class OutputError(FeatcacheError):
    """A run folder, bench folder or exported file cannot be written (it exists, its folder is
    missing or read-only, the disk is full)."""


class FolderLockedError(OutputError):
    """Another process is writing the same run or bench folder."""
