"""Heads without training: cosine k-nearest neighbours (DINO's evaluation) and nearest class mean."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import HeadError
from ..common.lazy import torch
from .params import COUNT, DEVICE, POSITIVE, OneOf
from .base import BaseHead, softmax, state_array
from .inputs import iter_row_chunks
from .solvers import resolve_device

#: k values of the ``knn`` head; values above the number of training rows are clipped to it.
KNN_GRID: tuple[int, ...] = (1, 5, 10, 20, 50, 100)
#: From this many training rows, on a CPU with faiss installed, the ``knn`` head searches a FAISS
#: index (:func:`featcache.retrieval.index.memory_index`: exact up to 1M rows, the size rule's
#: approximate index above) instead of a (batch_size x n_train) similarity block per query block,
#: whose memory grows with the rows (4 GB per 1,024 queries at 1M rows). The crossover is measured by
#: ``python -m benchmarks export`` (BENCHMARKS.md).
KNN_INDEX_ROWS = 100_000


def _normalize(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (``torch.nn.functional.normalize``'s eps of 1e-12)."""
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def _has_faiss() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("faiss") is not None
    except (ImportError, ValueError):  # a broken or blocked install: the torch search
        return False


def _as_proba(p: torch.Tensor) -> np.ndarray:
    """Float64 copy renormalised to sum to 1 exactly (the votes are summed in float32)."""
    p = p.double().cpu().numpy()
    return p / p.sum(axis=1, keepdims=True)


class KNNHead(BaseHead):
    """Cosine k-nearest-neighbour classifier with temperature-weighted votes (DINO's k-NN eval).

    Features are L2-normalised; each of the ``k`` most similar training rows votes for its
    class with weight ``exp(sim / temperature)``; the probabilities are the normalised votes.

    Parameters
    ----------
    k : int, default=20
        Neighbours; clipped to the number of training rows.
    temperature : float, default=0.07
        Each neighbour votes ``exp(similarity / temperature)``.
    batch_size : int, default=1024
        Query rows per similarity block.
    device : str, default="auto"
        Torch device of the similarity search.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    bank_ : ndarray of shape (n_train, n_features), float32
        The normalised training features.
    bank_labels_ : ndarray of shape (n_train,), int64
        Their indices into ``classes_``.
    n_features_in_ : int

    Notes
    -----
    ``sweep_proba`` runs one top-``max(grid)`` search and reads every k off its sorted prefix.
    ``to_torch`` holds the whole bank, so the module is as big as the training features.
    """

    head_name = "knn"
    param = "k"
    default_grid = KNN_GRID
    _parameter_constraints = {"k": COUNT, "temperature": POSITIVE, "batch_size": COUNT, "device": DEVICE}
    thread_pool = "torch"
    grid_bounds = (1, None)

    @classmethod
    def grid_values(cls, grid: Sequence[Any], n_train: int) -> list[Any]:
        """Whole k up to the training rows (at least k=1)."""
        return sorted({int(k) for k in grid if int(k) <= n_train}) or [1]

    @classmethod
    def next_grid_value(cls, values: Sequence[Any], best: Any, n_train: int) -> Any:
        """k a decade down (at least 1) or up (at most the training rows) from an end of the grid."""
        if best == min(values) and best // 10 >= 1:
            return best // 10
        if best == max(values) and min(best * 10, n_train) > best:
            return min(best * 10, n_train)
        return None

    def __init__(self, *, k: int = 20, temperature: float = 0.07, batch_size: int = 1024,
                 device: str = "auto") -> None:
        self._store_options(locals())

    def _fit(self, X, y_idx, n_classes) -> None:
        self.bank_ = _normalize(X)
        self.bank_labels_ = y_idx.astype(np.int64)

    def _topk_blocks(self, bank: np.ndarray, X: Any, k: int):
        """Yield (sims, neighbour indices) of shape (B, k) per block of query rows."""
        device = resolve_device(self.device)
        if device.type == "cpu" and bank.shape[0] >= KNN_INDEX_ROWS and _has_faiss():
            yield from self._faiss_topk(bank, X, k)
            return
        bank_t = torch.from_numpy(bank).to(device)
        with torch.no_grad():
            for _, _, chunk in iter_row_chunks(X, int(self.batch_size)):
                q = torch.nn.functional.normalize(
                    torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(device),
                    dim=1,
                )
                yield (q @ bank_t.T).topk(k, dim=1)

    def _faiss_topk(self, bank: np.ndarray, X: Any, k: int):
        """The same blocks from a FAISS index of ``bank``, built once per bank (a sweep's heads share it)."""
        from ..retrieval.index import memory_index

        cache = self.__dict__.setdefault("_index_cache", [])  # [bank, index], shared by a sweep's heads
        if not cache or cache[0] is not bank:
            cache[:] = [bank, memory_index(bank, metric="cosine")]
        for _, _, chunk in iter_row_chunks(X, int(self.batch_size)):
            sims, idx = cache[1].search(_normalize(np.ascontiguousarray(chunk, dtype=np.float32)), k)
            yield torch.from_numpy(sims), torch.from_numpy(idx.astype(np.int64))

    def _proba(self, X: np.ndarray) -> np.ndarray:
        from .modules import knn_vote_proba

        k = min(int(self.k), self.bank_.shape[0])
        labels = torch.from_numpy(self.bank_labels_)
        out = []
        for sims, idx in self._topk_blocks(self.bank_, X, k):
            lab = labels.to(idx.device)[idx]
            out.append(knn_vote_proba(sims, lab, len(self.classes_), float(self.temperature)))
        return _as_proba(torch.cat(out))

    def _sweep(self, X, y_idx, n_classes, grid, X_eval) -> np.ndarray:
        from .modules import knn_vote_proba

        bank = _normalize(X)
        ks = [min(int(k), bank.shape[0]) for k in grid]
        labels = torch.from_numpy(y_idx.astype(np.int64))
        blocks: list[list[torch.Tensor]] = [[] for _ in ks]
        for sims, idx in self._topk_blocks(bank, X_eval, max(ks)):
            lab = labels.to(idx.device)[idx]
            for i, k in enumerate(ks):
                blocks[i].append(
                    knn_vote_proba(sims[:, :k], lab[:, :k], n_classes, float(self.temperature))
                )
        return np.stack([_as_proba(torch.cat(b)) for b in blocks])

    def _sweep_fit(self, X, y_idx, n_classes, grid) -> list[BaseHead]:
        # The k values share one normalised bank (not copied).
        bank, labels = _normalize(X), y_idx.astype(np.int64)
        heads, index_cache = [], []
        for k in grid:
            head = self.with_value(k)
            head.bank_, head.bank_labels_ = bank, labels
            head._index_cache = index_cache
            head.n_features_in_ = int(X.shape[1])
            heads.append(head)
        return heads

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"bank_": self.bank_, "bank_labels_": self.bank_labels_}

    def _load_state(self, arrays, meta, n_classes, n_features) -> None:
        self.bank_ = state_array(arrays, "bank_", (None, n_features)).astype(np.float32)
        labels = state_array(arrays, "bank_labels_", (self.bank_.shape[0],), kinds="iu")
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise HeadError(
                f"The saved 'bank_labels_' hold indices outside 0..{n_classes - 1}. Re-fit the head."
            )
        self.bank_labels_ = labels.astype(np.int64)

    def to_torch(self) -> torch.nn.Module:
        """A :class:`~featcache.heads.modules.KNNModule`: ``softmax(module(x)) == predict_proba(x)``."""
        self._require_fitted()
        k = min(int(self.k), self.bank_.shape[0])
        from .modules import KNNModule

        return KNNModule(
            self.bank_, self.bank_labels_, len(self.classes_), k, float(self.temperature)
        )


class NCMHead(BaseHead):
    """Nearest class mean.

    Parameters
    ----------
    metric : {"cosine", "euclidean"}, default="cosine"
        "cosine": centroids are the means of the L2-normalised features and the scores are
        ``cos(x, mean_c) / temperature``. "euclidean": centroids are the plain means and the
        scores are ``-||x - mean_c||^2 / (2 temperature)``.
    temperature : float or None, default=None
        Softmax temperature of ``predict_proba = softmax(scores)``; None means 0.05 for cosine
        and 1.0 for euclidean.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    centroids_ : ndarray of shape (n_classes, n_features), float64
    n_features_in_ : int

    Notes
    -----
    There is nothing to sweep: ``param`` is None and the grid is ``(None,)``. Both scores are
    linear in (normalised) ``x`` up to a per-row constant, so ``to_torch`` is a linear layer.
    ``fit`` streams an ``h5py.Dataset``-like ``X`` in row chunks.
    """

    head_name = "ncm"
    param = None
    default_grid = (None,)
    _parameter_constraints = {"metric": [OneOf("cosine", "euclidean")], "temperature": [None, *POSITIVE]}
    streams = True
    parallel_work = 1 << 16

    def __init__(self, *, metric: str = "cosine", temperature: float | None = None) -> None:
        self._store_options(locals())

    def _temperature(self) -> float:
        if self.temperature is not None:
            return float(self.temperature)
        return 0.05 if self.metric == "cosine" else 1.0

    def _fit(self, X, y_idx, n_classes) -> None:
        sums = np.zeros((n_classes, X.shape[1]))
        for a, b, chunk in iter_row_chunks(X):
            if self.metric == "cosine":
                chunk = _normalize(chunk)
            labels = y_idx[a:b]
            order = np.argsort(labels, kind="stable")
            present, starts = np.unique(labels[order], return_index=True)
            sums[present] += np.add.reduceat(chunk[order].astype(np.float64), starts, axis=0)
        counts = np.bincount(y_idx, minlength=n_classes).astype(np.float64)
        self.centroids_ = sums / counts[:, None]

    def _linear(self) -> tuple[np.ndarray, np.ndarray]:
        """Weight (K, D) and bias (K,) of the scores as a linear function of (normalised) x."""
        T = self._temperature()
        if self.metric == "cosine":
            c = self.centroids_ / np.maximum(
                np.linalg.norm(self.centroids_, axis=1, keepdims=True), 1e-12
            )
            return c / T, np.zeros(len(c))
        c = self.centroids_
        # -||x - c||^2 / 2T = (x.c - ||c||^2 / 2) / T - ||x||^2 / 2T; the last term is shared
        # by every class of a row and cancels in the softmax.
        return c / T, -0.5 * (c * c).sum(axis=1) / T

    def decision_function(self, X: Any) -> np.ndarray:
        """Scores of shape (n_samples, n_classes): ``cos / T`` or ``-||x - c||^2 / 2T``."""

        def scores(chunk: np.ndarray) -> np.ndarray:
            chunk = chunk.astype(np.float64)
            if self.metric == "cosine":
                return _normalize(chunk).astype(np.float64) @ self._linear()[0].T
            c = self.centroids_
            d2 = (chunk * chunk).sum(axis=1)[:, None] - 2.0 * chunk @ c.T + (c * c).sum(axis=1)
            return -np.maximum(d2, 0.0) / (2.0 * self._temperature())

        return self._map_rows(X, scores)

    def _proba(self, X: np.ndarray) -> np.ndarray:
        W, b = self._linear()
        if self.metric == "cosine":
            X = _normalize(X)
        return softmax(X.astype(np.float64) @ W.T + b)

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"centroids_": self.centroids_}

    def _load_state(self, arrays, meta, n_classes, n_features) -> None:
        self.centroids_ = state_array(arrays, "centroids_", (n_classes, n_features))

    def to_torch(self) -> torch.nn.Module:
        """A :class:`LinearScores` module (normalising ``x`` for cosine)."""
        self._require_fitted()
        W, b = self._linear()
        from .modules import LinearScores

        return LinearScores(W, b, binary=False, normalize=self.metric == "cosine")


__all__ = ["KNN_GRID", "KNNHead", "NCMHead"]
