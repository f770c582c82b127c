"""What heads accept as training data: features in memory or on disk, and labels."""

from __future__ import annotations

import sys
from typing import Any, Iterator

import numpy as np

from ..errors import HeadError
from ..common.validation import check_class_weight

#: Rows read at a time when a head walks over an ``h5py.Dataset``-like input.
CHUNK_ROWS = 65536


def from_tensor(X: Any) -> Any:
    """A torch tensor as a numpy array (other inputs unchanged), without importing torch: a tensor
    can only exist once torch is imported."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(X, torch.Tensor):
        return X.detach().cpu().numpy()
    return X


def is_dataset_like(X: Any) -> bool:
    """True for array-likes read by slicing (``h5py.Dataset``, ``np.memmap`` is an ndarray)."""
    return (
        not isinstance(X, np.ndarray)
        and hasattr(X, "shape")
        and hasattr(X, "dtype")
        and hasattr(X, "__getitem__")
    )


def as_float(chunk: np.ndarray) -> np.ndarray:
    """Cast a block of features to a float dtype numpy computes well in (float16 -> float32)."""
    chunk = np.asarray(chunk)
    if chunk.dtype == np.float32 or chunk.dtype == np.float64:
        return chunk
    if chunk.dtype == np.float16:
        return chunk.astype(np.float32)
    return chunk.astype(np.float64)


def iter_row_chunks(
    X: Any, rows: int = CHUNK_ROWS, *, what: str = "X"
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(start, stop, X[start:stop])`` over contiguous row blocks, cast by :func:`as_float`.

    Raises ``HeadError`` at the first block holding NaN or infinity.
    """
    n = int(X.shape[0])
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        chunk = as_float(X[start:stop])
        if not np.isfinite(chunk).all():
            raise HeadError(
                f"{what} contains NaN or infinity (rows {start}:{stop}). "
                "Check the features (re-extract the cache) or drop those rows."
            )
        yield start, stop, chunk


def _check_finite(X: np.ndarray, what: str) -> None:
    for _ in iter_row_chunks(X, what=what):
        pass


def check_features(
    X: Any,
    *,
    allow_dataset: bool = False,
    n_features: int | None = None,
    what: str = "X",
) -> Any:
    """Validate a feature matrix.

    Parameters
    ----------
    X : array-like or h5py.Dataset-like of shape (n_samples, n_features)
        Features. Torch tensors are moved to the CPU and converted.
    allow_dataset : bool, default=False
        Return ``X`` itself (unread, uncast) when it is an ``h5py.Dataset``-like object or an
        ndarray, so that the caller can stream it in row chunks. Otherwise the data is read and
        cast (float16 -> float32, integers -> float64).
    n_features : int, optional
        The number of columns a fitted head expects.
    what : str, default="X"
        The argument name used in error messages.

    Returns
    -------
    ndarray or dataset-like of shape (n_samples, n_features)
    """
    X = from_tensor(X)
    if is_dataset_like(X):
        shape = tuple(X.shape)
        dtype = np.dtype(X.dtype)
        if not allow_dataset:
            X = np.asarray(X[0 : shape[0]]) if len(shape) >= 1 else np.asarray(X)
    else:
        try:
            X = np.asarray(X)
        except (TypeError, ValueError) as exc:
            raise HeadError(f"{what} cannot be read as a numeric array ({exc}).") from None
        shape, dtype = X.shape, X.dtype
    if dtype.kind not in "fiub":
        raise HeadError(
            f"{what} must hold numbers; got dtype {dtype}. Pass a float array of shape "
            "(n_samples, n_features)."
        )
    if len(shape) != 2:
        raise HeadError(
            f"{what} must be 2-D of shape (n_samples, n_features); got shape {shape}. "
            "Reshape it, e.g. X.reshape(len(X), -1)."
        )
    if shape[0] < 1 or shape[1] < 1:
        raise HeadError(f"{what} is empty (shape {shape}). Pass at least one row and one column.")
    if n_features is not None and shape[1] != n_features:
        raise HeadError(
            f"{what} has {shape[1]} features but the head was fitted with {n_features}. "
            "Use features from the same backbone and layer as the training set."
        )
    if is_dataset_like(X):
        # Streamed data is checked chunk by chunk as it is read: no extra pass over the file.
        return X
    _check_finite(X, what)
    return X if allow_dataset else as_float(X)


def encode_labels(y: Any, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Map labels to ``0..K-1``.

    Returns
    -------
    y_idx : ndarray of shape (n_samples,), dtype int64
    classes : ndarray of shape (n_classes,)
        ``np.unique(y)``, the column order of every probability matrix.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        y = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.ndim != 1:
        raise HeadError(f"y must be 1-D of shape (n_samples,); got shape {np.shape(y)}.")
    if y.shape[0] != n_samples:
        raise HeadError(
            f"X has {n_samples} rows but y has {y.shape[0]} labels. Pass one label per row."
        )
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise HeadError("y contains NaN or infinity. Drop the unlabelled rows first.")
    try:
        classes, y_idx = np.unique(y, return_inverse=True)
    except TypeError:
        raise HeadError(
            f"The labels in y cannot be sorted (mixed types, dtype {y.dtype}). "
            "Use labels of one type, e.g. all str or all int."
        ) from None
    if len(classes) < 2:
        raise HeadError(
            f"y holds a single class ({classes.tolist()!r}); a classifier needs at least 2. "
            "Check the split or the label column."
        )
    return y_idx.astype(np.int64).reshape(-1), classes


def class_weights(y_idx: np.ndarray, n_classes: int, class_weight: str | None) -> np.ndarray | None:
    """Per-class weights of shape (n_classes,), float64, or None for ``class_weight=None``.

    "balanced" is scikit-learn's ``n_samples / (n_classes * np.bincount(y))``; the per-sample
    weights ``w[y_idx]`` then sum to ``n_samples``.
    """
    if check_class_weight(class_weight) is None:
        return None
    counts = np.bincount(y_idx, minlength=n_classes).astype(np.float64)
    return len(y_idx) / (n_classes * np.maximum(counts, 1.0))
