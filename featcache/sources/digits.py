"""The ``digits`` kind: scikit-learn's 8x8 handwritten digits, built in."""

from __future__ import annotations

import numpy as np

from .base import SOURCES, SampleRef, Source, content_hash


class DigitsSource(Source):
    """scikit-learn's handwritten digits, scaled to uint8, split 80/20 train/val (stratified, seed 0)."""

    kind = "digits"
    pre_decoded = True
    builtin = True
    splits_from = "a stratified 80/20 train/val split, seed 0"

    def __init__(self, spec: str = "digits") -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        super().__init__(spec="digits")
        d = load_digits()
        self._images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
        self.classes = [str(i) for i in range(10)]
        idx = np.arange(len(d.target))
        tr, va = train_test_split(idx, test_size=0.2, stratify=d.target, random_state=0)
        for split, rows in (("train", np.sort(tr)), ("val", np.sort(va))):
            self.splits[split] = [SampleRef(str(i), int(d.target[i]), int(i)) for i in rows]

    def read(self, ref: SampleRef) -> tuple[np.ndarray, str]:
        arr = self._images[ref.key]
        return arr, content_hash(arr)


SOURCES.register("digits", DigitsSource, description="scikit-learn's 8x8 handwritten digits (1797 real images, built in)")
