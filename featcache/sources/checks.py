"""What a source's listing says before any forward pass: notes on what it skipped, classes without
samples, splits of one class (logged once, when the samples are listed)."""

from __future__ import annotations

import logging

from .base import Source

log = logging.getLogger("featcache.sources")


def warn_about_listing(src: Source) -> None:
    """Log the notes of ``src`` and what its classes lack."""
    _warn_about_classes(src)
    _warn_about_notes(src)


def _warn_about_notes(src: Source) -> None:
    """One warning line for what the listing skipped or found odd (all of it is recorded in the cache)."""
    if src.notes:
        shown = "; ".join(f"{n['split']}/{n['id']}: {n['note']}" for n in src.notes[:3])
        more = f"; and {len(src.notes) - 3} more" if len(src.notes) > 3 else ""
        log.warning("Source '%s': %d note(s), recorded in the cache ('featcache info' lists them): %s%s",
                    src.spec, len(src.notes), shown, more)


def _warn_about_classes(src: Source) -> None:
    """A class without samples, or a split of one class, extracts fine but cannot train or score a
    head: say so before the forward passes rather than at fit time."""
    seen: set[int] = set()
    for split, refs in src.splits.items():
        labels = {r.label for r in refs if r.label >= 0}  # -1: a sample without a label, recorded as failed
        seen |= labels
        if len(labels) == 1 and len(src.classes) > 1:
            log.warning("Split '%s' of source '%s' holds only class '%s'; a head needs at least 2 classes to train "
                        "and scores on one class say little.", split, src.spec, src.classes[next(iter(labels))])
    empty = [c for i, c in enumerate(src.classes) if i not in seen]
    if empty:
        log.warning("Source '%s' has no samples of class(es) %s. Add images for them or remove their folders.",
                    src.spec, ", ".join(f"'{c}'" for c in empty))
    if len(src.classes) == 1:
        log.warning("Source '%s' has a single class ('%s'); a head needs at least 2 classes to train.",
                    src.spec, src.classes[0])
