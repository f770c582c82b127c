"""What every classification head shares: the scikit-learn contract, input checks, saved state.

A head is a scikit-learn classifier (``BaseEstimator`` + ``ClassifierMixin``) with three more
methods the rest of featcache relies on:

- ``sweep_proba(X, y, grid, X_eval)`` fits every value of the head's swept parameter and returns
  the evaluation probabilities, using the fastest path the head has (one decomposition, one batched
  training run, one top-k search, a warm-started sequence);
- ``sweep_fit(X, y, grid)`` fits the same sequence and returns the fitted heads themselves, so
  that a caller selecting on an eval split can keep the very model it scored;
- ``get_state()`` / ``from_state(arrays, meta)`` turn a fitted head into plain arrays plus
  JSON-able metadata and back, so artifacts never need pickle;
- ``to_torch()`` returns a ``torch.nn.Module`` whose output ``z`` satisfies
  ``softmax(z, dim=1) == predict_proba`` for a float32 batch of features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import NotFittedError

from ..errors import ConfigError, HeadError
from ..common.runtime import head_threads
from .inputs import CHUNK_ROWS, as_float, check_features, encode_labels, iter_row_chunks
from .params import describe_options, validate_options

if TYPE_CHECKING:
    import torch

class HeadNotFittedError(HeadError, NotFittedError):
    """A head was used before ``fit`` (also a scikit-learn ``NotFittedError``)."""


# ----------------------------------------------------------------------------------------------
# Probabilities and saved state


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 of an array of shape (n_samples, n_classes)."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def scores_to_proba(scores: np.ndarray) -> np.ndarray:
    """Probabilities from decision scores of shape (n, K) or, for two classes, (n, 1).

    One binary column ``d`` is read as the score of ``classes_[1]`` against a fixed 0 for
    ``classes_[0]``: ``softmax([0, d]) == [1 - sigmoid(d), sigmoid(d)]``, scikit-learn's
    binary logistic regression.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[1] == 1:
        scores = np.concatenate([np.zeros_like(scores), scores], axis=1)
    return softmax(scores)


def to_jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays, tuples and nested containers as plain JSON-able Python objects."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def state_array(
    arrays: Mapping[str, np.ndarray],
    key: str,
    shape: tuple[int | None, ...],
    *,
    kinds: str = "f",
) -> np.ndarray:
    """Fetch and check one saved array (``None`` in ``shape`` matches any size)."""
    if key not in arrays:
        raise HeadError(f"The saved head state lacks the array '{key}'. Re-fit and save the head.")
    arr = np.asarray(arrays[key])
    ok = arr.ndim == len(shape) and all(s is None or s == a for s, a in zip(shape, arr.shape))
    if not ok:
        want = tuple("any" if s is None else s for s in shape)
        raise HeadError(
            f"The saved array '{key}' has shape {arr.shape}; expected {want}. "
            "The artifact is inconsistent: re-fit and save the head."
        )
    if arr.dtype.kind not in kinds:
        raise HeadError(
            f"The saved array '{key}' has dtype {arr.dtype}; expected kind {kinds!r}. "
            "Re-fit and save the head."
        )
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise HeadError(f"The saved array '{key}' contains NaN or infinity. Re-fit the head.")
    return np.ascontiguousarray(arr)


# ----------------------------------------------------------------------------------------------
# The base class


@dataclass
class CacheSetup:
    """What a head takes from a cache besides the features (see :meth:`BaseHead.from_cache`)."""

    #: The head's options.
    options: dict[str, Any]
    #: Extra keyword arguments of ``fit`` and ``sweep_fit`` (e.g. the tail head's ``views``).
    fit_kwargs: dict[str, Any] = field(default_factory=dict)
    #: The head reads the features as cached: no normalisation and no PCA before it.
    raw_features: bool = False


class BaseHead(ClassifierMixin, BaseEstimator):
    """Base class of featcache heads (scikit-learn classifier contract plus sweep and state).

    Subclasses set the class attributes below and implement ``_fit``, ``_proba``, ``_state_arrays``,
    ``_load_state`` and ``to_torch``; they may override ``_sweep`` with a faster path than one fit per
    grid value. Options are declared once, as scikit-learn declares parameters: the ``__init__``
    signature names them and gives their defaults (its body is ``self._store_options(locals())``),
    ``_parameter_constraints`` gives their allowed values (:mod:`featcache.heads.params`), the numpydoc
    ``Parameters`` section of the class docstring their help; ``options`` and ``_check_params``
    follow from these.
    """

    #: The name the head is registered under (``featcache heads``), used in errors.
    head_name: ClassVar[str] = ""

    #: Name of the parameter swept by ``sweep_proba`` (None: nothing to sweep).
    param: ClassVar[str | None] = None
    #: Grid swept when the user gives none.
    default_grid: ClassVar[tuple[Any, ...]] = (None,)
    #: The allowed values of each ``__init__`` option: a list of constraints, any one satisfied
    #: (scikit-learn's ``_parameter_constraints``; shared ones in :mod:`featcache.heads.params`).
    _parameter_constraints: ClassVar[dict[str, list]] = {}
    #: Per ``__init__`` option, in signature order: ``{"default", "constraint", "help"}`` (and
    #: ``"required"``), derived when the class is made; what ``featcache heads`` lists.
    options: ClassVar[dict[str, dict[str, Any]]] = {}
    #: What ``fit`` reads: "features" (vectors, (n, d)) or "activations" (the spatial maps at a
    #: freeze boundary as cached by ``extract --pool none``, (n, C, H, W)).
    inputs: ClassVar[str] = "features"
    #: Whether ``fit`` streams an ``h5py.Dataset``-like ``X`` instead of reading it whole.
    streams: ClassVar[bool] = False
    #: How far a grid search may extend ``param`` a decade at a time while the best value sits at
    #: an end of the grid: (low, high), high None for no bound but the data; None: never extended.
    grid_bounds: ClassVar[tuple[float, float | None] | None] = None
    #: The thread pool the head computes in: "numpy" (BLAS) or "torch" (see runtime.head_threads).
    thread_pool: ClassVar[str] = "numpy"
    #: Feature values (rows x features) from which the head's pool gets every core; below, one
    #: thread. None: the pool's default (runtime.SMALL_WORK). Heads of big dense BLAS-3 products
    #: (ridge's eigendecomposition, class means) gain from threads much earlier than iterative ones.
    parallel_work: ClassVar[int | None] = None

    # -- what the head takes from a cache and how its grid grows ---------------------------------

    @classmethod
    def from_cache(cls, cache: Any, layer: str, *, options: Mapping[str, Any], train_split: str,
                   rows: np.ndarray | None, pca: int | None) -> "CacheSetup":
        """The head's options and ``fit`` arguments for ``layer`` of ``cache`` (a
        :class:`~featcache.store.cache.FeatureCache`), training on ``rows`` of ``train_split`` (None:
        all). Heads that need more than the features override this (the tail head rebuilds its
        network from the cache's backbone and samples its augmented views)."""
        return CacheSetup(dict(options))

    @classmethod
    def grid_values(cls, grid: Sequence[Any], n_train: int) -> list[Any]:
        """The values to sweep, given the user's (or the default) ``grid`` and ``n_train``
        training rows."""
        return [None] if cls.param is None else list(grid)

    @classmethod
    def next_grid_value(cls, values: Sequence[Any], best: Any, n_train: int) -> Any:
        """The value one decade beyond ``best`` when it sits at an end of ``values`` and
        :attr:`grid_bounds` allows one; else None."""
        if cls.grid_bounds is None:
            return None
        lo, hi = cls.grid_bounds
        if best == min(values) and best > 0 and best / 10 >= lo * (1 - 1e-9):
            return best / 10
        if best == max(values) and (hi is None or best * 10 <= hi * (1 + 1e-9)):
            return best * 10
        return None

    # -- to implement ---------------------------------------------------------------------------

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "_parameter_constraints" in cls.__dict__ or "__init__" in cls.__dict__:
            cls.options = describe_options(cls, cls._parameter_constraints)

    def _store_options(self, values: Mapping[str, Any]) -> None:
        """``__init__``'s body: keep each option as given (``values``: ``__init__``'s ``locals()``),
        as scikit-learn's contract wants (no check, no copy)."""
        for name in self.options:
            setattr(self, name, values[name])

    def _check_params(self) -> None:
        """Raise ``ConfigError`` for a bad option value (checked against
        ``_parameter_constraints``), then :meth:`_check_combination`."""
        owner = f"the '{self.head_name}' head" if self.head_name else type(self).__name__
        validate_options(owner, self._parameter_constraints, self.get_params(deep=False))
        self._check_combination()

    def _check_combination(self) -> None:
        """Raise ``ConfigError`` for options that are valid alone but not together."""

    def _fit(self, X: Any, y_idx: np.ndarray, n_classes: int) -> None:
        raise NotImplementedError

    def _proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _state_arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _state_meta(self) -> dict[str, Any]:
        return {}

    def _load_state(
        self,
        arrays: Mapping[str, np.ndarray],
        meta: Mapping[str, Any],
        n_classes: int,
        n_features: int,
    ) -> None:
        raise NotImplementedError

    def to_torch(self) -> torch.nn.Module:
        """A module mapping features (B, n_features) to logits (B, n_classes).

        ``torch.softmax(module(x), dim=1)`` equals ``predict_proba(x)`` (to float32 precision).
        """
        raise NotImplementedError

    # -- the scikit-learn contract --------------------------------------------------------------

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "classes_")

    def _require_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise HeadNotFittedError(
                f"This {type(self).__name__} is not fitted yet. Call 'fit(X, y)' first, or load "
                "a fitted head with featcache.runs.artifacts.load_head(run_dir)."
            )

    def fit(self, X: Any, y: Any) -> "BaseHead":
        """Fit the head.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training features. Heads that stream (``linear``, ``mlp``, ``ridge``, ``ncm``) also
            take an ``h5py.Dataset``-like object read in row chunks.
        y : array-like of shape (n_samples,)
            Labels of any sortable type; ``classes_ = np.unique(y)``.

        Returns
        -------
        self
        """
        self._check_params()
        X = check_features(X, allow_dataset=self.streams)
        y_idx, classes = encode_labels(y, X.shape[0])
        with head_threads(self.thread_pool, int(np.prod(X.shape)), parallel_work=self.parallel_work):
            self._fit(X, y_idx, len(classes))
        self.classes_ = classes
        self.n_features_in_ = int(X.shape[1])
        return self

    def _map_rows(self, X: Any, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Apply ``fn`` to a checked ``X``, in row chunks when it is dataset-like."""
        self._require_fitted()
        X = check_features(X, allow_dataset=True, n_features=self.n_features_in_)
        if isinstance(X, np.ndarray) and X.shape[0] <= CHUNK_ROWS:
            return fn(as_float(X))
        return np.concatenate([fn(chunk) for _, _, chunk in iter_row_chunks(X)], axis=0)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes), float64
            Columns in ``classes_`` order; rows sum to 1.
        """
        return self._map_rows(X, self._proba)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels, ``classes_[argmax(predict_proba(X))]``.

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    # -- sweep ----------------------------------------------------------------------------------

    def _check_grid(self, grid: Sequence[Any]) -> list[Any]:
        if isinstance(grid, (str, bytes)) or not hasattr(grid, "__len__") or len(grid) == 0:
            raise ConfigError(f"The grid must be a non-empty sequence of values. Got {grid!r}.")
        grid = [v.item() if isinstance(v, np.generic) else v for v in grid]
        if self.param is None:
            if any(v is not None for v in grid):
                raise ConfigError(
                    f"{type(self).__name__} has no parameter to sweep; its grid is (None,). "
                    f"Got {grid!r}."
                )
            return grid
        for v in grid:
            clone(self).set_params(**{self.param: v})._check_params()
        return grid

    def sweep_proba(self, X: Any, y: Any, grid: Sequence[Any], X_eval: Any) -> np.ndarray:
        """Fit every value of the swept parameter and return the evaluation probabilities.

        ``self`` is not modified: neither its parameters nor its fitted state change (an
        unfitted head stays unfitted). Refit the best value with
        ``clone(head).set_params(**{head.param: best}).fit(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training features.
        y : array-like of shape (n_samples,)
            Training labels.
        grid : sequence
            Values of ``self.param`` (``(None,)`` for heads without one).
        X_eval : array-like of shape (n_eval, n_features)
            Features to score.

        Returns
        -------
        ndarray of shape (len(grid), n_eval, n_classes), float64
            ``[i]`` holds the probabilities of the head fitted with ``grid[i]``, columns in
            ``np.unique(y)`` order.
        """
        self._check_params()
        grid = self._check_grid(grid)
        X = check_features(X, allow_dataset=self.streams)
        y_idx, classes = encode_labels(y, X.shape[0])
        X_eval = check_features(X_eval, allow_dataset=True, n_features=X.shape[1], what="X_eval")
        with head_threads(self.thread_pool, int(np.prod(X.shape)), parallel_work=self.parallel_work):
            return self._sweep(X, y_idx, len(classes), grid, X_eval)

    def _sweep(
        self, X: Any, y_idx: np.ndarray, n_classes: int, grid: list[Any], X_eval: Any
    ) -> np.ndarray:
        """The probabilities of the heads :meth:`_sweep_fit` returns (heads with a faster path
        override this)."""
        heads = self._sweep_fit(X, y_idx, n_classes, grid)
        for head in heads:
            head.classes_ = np.arange(n_classes)
        return np.stack([head.predict_proba(X_eval) for head in heads])

    def sweep_fit(self, X: Any, y: Any, grid: Sequence[Any]) -> list["BaseHead"]:
        """Fit every value of the swept parameter; return the fitted heads.

        The heads are the models :meth:`sweep_proba` scores (the same warm-started sequence,
        the same batched training run), so selecting one of them on an eval split and saving it
        keeps the reported eval score true of the saved model. ``self`` is not modified.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        grid : sequence
            Values of ``self.param`` (``(None,)`` for heads without one).

        Returns
        -------
        list of BaseHead
            ``[i]`` is fitted with ``grid[i]`` (``get_params()[param] == grid[i]``).
        """
        self._check_params()
        grid = self._check_grid(grid)
        X = check_features(X, allow_dataset=self.streams)
        y_idx, classes = encode_labels(y, X.shape[0])
        with head_threads(self.thread_pool, int(np.prod(X.shape)), parallel_work=self.parallel_work):
            heads = self._sweep_fit(X, y_idx, len(classes), grid)
        for head in heads:
            head.classes_ = classes
        return heads

    def with_value(self, value: Any) -> "BaseHead":
        """An unfitted copy with the swept parameter set to ``value``."""
        head = clone(self)
        if self.param is not None:
            head.set_params(**{self.param: value})
        return head

    def _sweep_fit(self, X: Any, y_idx: np.ndarray, n_classes: int, grid: list[Any]) -> list["BaseHead"]:
        """One fit per grid value; ``classes_`` is set by the caller (heads sharing work across
        the grid override this)."""
        heads = []
        for value in grid:
            head = self.with_value(value)
            head._fit(X, y_idx, n_classes)
            head.n_features_in_ = int(X.shape[1])
            heads.append(head)
        return heads

    # -- state ----------------------------------------------------------------------------------

    def get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The fitted head as arrays plus JSON-able metadata (see :meth:`from_state`).

        Returns
        -------
        arrays : dict of str to ndarray
            Numeric arrays only (safe to write with safetensors).
        meta : dict
            ``params`` (``get_params()``), ``classes`` (list), ``classes_dtype`` (numpy dtype
            string), ``n_features_in`` and head-specific entries.
        """
        self._require_fitted()
        arrays = {k: np.ascontiguousarray(v) for k, v in self._state_arrays().items()}
        meta = {
            "params": to_jsonable(self.get_params()),
            "classes": to_jsonable(self.classes_),
            "classes_dtype": self.classes_.dtype.str,
            "n_features_in": int(self.n_features_in_),
        }
        meta.update(to_jsonable(self._state_meta()))
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> "BaseHead":
        """Rebuild a fitted head from :meth:`get_state` output.

        Raises
        ------
        HeadError
            When the metadata or the arrays do not describe a head of this class.
        """
        if not isinstance(meta, Mapping):
            raise HeadError(f"The head state must be a JSON object; got {type(meta).__name__}.")
        params = meta.get("params")
        if not isinstance(params, Mapping):
            raise HeadError("The head state lacks its 'params' object. Re-fit and save the head.")
        valid = cls._get_param_names()
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise HeadError(
                f"The saved state has unknown {cls.__name__} option(s) {', '.join(unknown)}; "
                f"valid options: {', '.join(valid)}. It was saved by another featcache version: "
                "re-fit the head."
            )
        head = cls(**params)
        try:
            head._check_params()
        except ConfigError as exc:
            raise HeadError(f"The saved options are invalid: {exc}") from None

        classes = meta.get("classes")
        dtype = meta.get("classes_dtype")
        n_features = meta.get("n_features_in")
        if not isinstance(classes, list) or len(classes) < 2:
            raise HeadError("The head state needs 'classes', a list of at least 2 labels.")
        if not isinstance(dtype, str):
            raise HeadError("The head state needs 'classes_dtype', a numpy dtype string.")
        try:
            np_dtype = np.dtype(dtype)
        except TypeError:
            raise HeadError(f"The saved classes_dtype {dtype!r} is not a numpy dtype.") from None
        if np_dtype.kind not in "biufUO":
            raise HeadError(f"The saved classes_dtype {dtype!r} is not a supported label type.")
        try:
            classes_arr = np.asarray(classes, dtype=np_dtype)
        except (TypeError, ValueError):
            raise HeadError(f"The saved classes do not fit dtype {dtype!r}.") from None
        if classes_arr.ndim != 1 or len(np.unique(classes_arr)) != len(classes_arr):
            raise HeadError("The saved classes must be a flat list of distinct labels.")
        if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
            raise HeadError("The head state needs 'n_features_in', an int >= 1.")
        head._load_state(arrays, meta, len(classes_arr), n_features)
        head.classes_ = classes_arr
        head.n_features_in_ = n_features
        return head


class LinearHeadMixin:
    """A head whose scores are ``X @ coef_.T + intercept_`` (scikit-learn linear layout).

    ``coef_`` has shape (1, n_features) for two classes (the score of ``classes_[1]``) and
    (n_classes, n_features) otherwise. ``predict_proba`` is ``softmax(decision_function)``;
    for two classes that is ``sigmoid(decision_function)`` for ``classes_[1]``.
    """

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return X @ self.coef_.T + self.intercept_

    def decision_function(self, X: Any) -> np.ndarray:
        """Decision scores.

        Returns
        -------
        ndarray of shape (n_samples,) for two classes, else (n_samples, n_classes)
        """
        scores = self._map_rows(X, self._scores)
        return scores.ravel() if scores.shape[1] == 1 else scores

    def _proba(self, X: np.ndarray) -> np.ndarray:
        return scores_to_proba(self._scores(X))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels (the sign of the binary score, else the arg-max score)."""
        scores = self._map_rows(X, self._scores)
        if scores.shape[1] == 1:
            return self.classes_[(scores[:, 0] > 0).astype(np.intp)]
        return self.classes_[np.argmax(scores, axis=1)]

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"coef_": self.coef_, "intercept_": self.intercept_}

    def _load_state(self, arrays, meta, n_classes, n_features) -> None:
        k = 1 if n_classes == 2 else n_classes
        self.coef_ = state_array(arrays, "coef_", (k, n_features))
        self.intercept_ = state_array(arrays, "intercept_", (k,))

    def to_torch(self) -> torch.nn.Module:
        """A :class:`LinearScores` module: ``softmax(module(x)) == predict_proba(x)``."""
        from .modules import LinearScores

        self._require_fitted()
        return LinearScores(self.coef_, self.intercept_, binary=self.coef_.shape[0] == 1)
