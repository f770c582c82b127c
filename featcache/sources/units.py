"""Sources made of units (tar shards, parquet row groups) that list their samples when first asked
for: a sharded run restricts one to its own units first, and lists and reads only those
(:attr:`~featcache.sources.base.Source.share_unit`)."""

from __future__ import annotations

from .base import SampleRef, Source
from .checks import warn_about_listing


class UnitSource(Source):
    """The listing machinery of a source made of units. A kind implements :meth:`units`,
    :meth:`_keep` (keep some units of its layout, before listing) and :meth:`_list_units` (list the
    samples of the units it keeps: per split the refs and where each unit's begin; it sets the
    classes), and calls :meth:`_start_units` at the end of ``__init__``."""

    def _start_units(self, *, list_now: bool) -> None:
        self._splits: dict[str, list[SampleRef]] | None = None
        self._starts: dict[str, list[int]] = {}
        self._restricted = False
        if list_now:
            self._list(warn=False)

    @property
    def splits(self) -> dict[str, list[SampleRef]]:
        if self._splits is None:
            self._list()
        return self._splits

    @splits.setter
    def splits(self, value: dict[str, list[SampleRef]]) -> None:
        self._splits = value
        self._starts = {}  # carved anew (val_fraction): no longer whole units

    @property
    def listed(self) -> bool:
        return self._splits is not None

    def unit_starts(self, split: str) -> list[int]:
        if self._splits is None:
            self._list()
        return self._starts.get(split, [0])

    def restrict(self, keep: dict[str, list[int]]) -> None:
        self._restricted = True
        if self._splits is not None:  # listed already (the class names needed every label): keep whole units
            for split, refs in list(self._splits.items()):
                bounds = self._starts[split] + [len(refs)]
                kept, starts = [], []
                for j in keep.get(split, []):
                    starts.append(len(kept))
                    kept.extend(refs[bounds[j]:bounds[j + 1]])
                self._splits[split], self._starts[split] = kept, starts
        self._keep(keep)

    def _keep(self, keep: dict[str, list[int]]) -> None:
        raise NotImplementedError

    def _list_units(self) -> tuple[dict[str, list[SampleRef]], dict[str, list[int]]]:
        raise NotImplementedError

    def _list(self, warn: bool = True) -> None:
        self._splits, self._starts = self._list_units()
        if warn and not self._restricted:  # open_source warned of nothing: the samples were not listed then
            warn_about_listing(self)
