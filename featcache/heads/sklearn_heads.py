"""Linear heads fitted on the CPU: logistic regression, closed-form ridge, linear SVM."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from .params import CLASS_WEIGHT, COUNT, POSITIVE, SEED
from .base import BaseHead, LinearHeadMixin, scores_to_proba
from .inputs import class_weights, iter_row_chunks

#: C values of logistic regression and of the torch ``linear`` head: 1e-4 .. 1e4, 13 points.
LOGREG_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 4, 13))
#: Ridge penalties: 1e-3 .. 1e5, 13 points (alpha is on the summed-loss scale, so it grows with n).
RIDGE_GRID: tuple[float, ...] = tuple(float(a) for a in np.logspace(-3, 5, 13))
#: LinearSVC C values: 1e-5 .. 1e3, 13 points (the squared hinge wants a smaller C than log loss).
SVM_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-5, 3, 13))


def _sorted_order(grid: list[float]) -> np.ndarray:
    """Indices visiting the grid from the strongest to the weakest penalty (ascending C)."""
    return np.argsort(np.asarray(grid, dtype=np.float64), kind="stable")


class LogRegHead(LinearHeadMixin, BaseHead):
    """Multinomial logistic regression (scikit-learn ``LogisticRegression``, lbfgs, L2).

    Parameters
    ----------
    C : float, default=1.0
        Inverse L2 strength on the summed loss (scikit-learn's meaning).
    max_iter : int, default=1000
        lbfgs iterations.
    tol : float, default=1e-6
        lbfgs gradient tolerance (tighter than scikit-learn's 1e-4, as the ``linear`` head).
    class_weight : {None, "balanced"}, default=None
        "balanced" weighs class c by ``n_samples / (n_classes * n_c)`` (scikit-learn's meaning).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    coef_ : ndarray of shape (1, n_features) for two classes, else (n_classes, n_features)
    intercept_ : ndarray of shape (1,) or (n_classes,)
    n_features_in_ : int
    n_iter_ : int

    Notes
    -----
    ``sweep_proba`` and ``sweep_fit`` fit the grid in ascending ``C`` order, each fit
    warm-started from the last. With a weak penalty lbfgs stops (``tol``) before the flat optimum,
    so a warm-started fit and a cold ``fit`` with the same C can differ; ``fit-head`` therefore
    saves the swept model it selected, never a cold refit.
    """

    head_name = "logreg"
    param = "C"
    default_grid = LOGREG_GRID
    grid_bounds = (1e-6, 1e6)
    _parameter_constraints = {"C": POSITIVE, "max_iter": COUNT, "tol": POSITIVE, "class_weight": CLASS_WEIGHT}

    def __init__(self, *, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-6,
                 class_weight: str | None = None) -> None:
        self._store_options(locals())

    def _estimator(self, **extra: Any) -> LogisticRegression:
        return LogisticRegression(
            C=float(self.C),
            solver="lbfgs",
            max_iter=self.max_iter,
            tol=float(self.tol),
            class_weight=self.class_weight,
            **extra,
        )

    def _fit(self, X, y_idx, n_classes) -> None:
        est = self._estimator().fit(X, y_idx)
        self.coef_ = est.coef_
        self.intercept_ = est.intercept_
        self.n_iter_ = int(np.max(est.n_iter_))

    def _sweep_fit(self, X, y_idx, n_classes, grid) -> list[BaseHead]:
        est = self._estimator(warm_start=True)
        heads: list[BaseHead | None] = [None] * len(grid)
        for i in _sorted_order(grid):
            est.set_params(C=float(grid[i])).fit(X, y_idx)
            head = self.with_value(grid[i])
            head.coef_, head.intercept_ = est.coef_.copy(), est.intercept_.copy()
            head.n_iter_ = int(np.max(est.n_iter_))
            head.n_features_in_ = int(X.shape[1])
            heads[i] = head
        return heads


#: Up to this many training rows per feature the SVM head solves the dual problem.
DUAL_ROWS_PER_FEATURE = 10


class SVMHead(LinearHeadMixin, BaseHead):
    """Linear SVM, one-vs-rest squared hinge (scikit-learn ``LinearSVC``).

    Parameters
    ----------
    C : float, default=1.0
        Inverse L2 strength on the summed loss.
    max_iter : int, default=1000
        liblinear iterations.
    tol : float, default=1e-4
        liblinear stopping tolerance.
    random_state : int, default=0
        Seed of liblinear's coordinate shuffling (dual solver only).
    class_weight : {None, "balanced"}, default=None
        "balanced" weighs class c by ``n_samples / (n_classes * n_c)`` (scikit-learn's meaning).

    Attributes
    ----------
    classes_, coef_, intercept_, n_features_in_ : as for :class:`LogRegHead`

    Notes
    -----
    ``predict_proba`` is ``softmax(decision_function)`` (``sigmoid`` for two classes), not Platt
    scaling: it ranks like the SVM and sums to one but is not calibrated. liblinear has no warm
    start, so ``sweep_proba`` fits the grid values one after the other.
    """

    head_name = "svm"
    param = "C"
    default_grid = SVM_GRID
    grid_bounds = (1e-6, 1e6)
    _parameter_constraints = {"C": POSITIVE, "max_iter": COUNT, "tol": POSITIVE, "random_state": SEED,
                              "class_weight": CLASS_WEIGHT}

    def __init__(self, *, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4, random_state: int = 0,
                 class_weight: str | None = None) -> None:
        self._store_options(locals())

    def _fit(self, X, y_idx, n_classes) -> None:
        est = LinearSVC(
            C=float(self.C),
            loss="squared_hinge",
            # The dual solver unless rows outnumber features tenfold. scikit-learn's "auto" takes the
            # primal as soon as rows outnumber features: on digits' 1,437 x 1,280 standardised
            # features it ran 47.8 s without converging at C=0.1 (29.6 s at C=10), the dual 1.5 s.
            dual=bool(X.shape[0] <= DUAL_ROWS_PER_FEATURE * X.shape[1]),
            tol=float(self.tol),
            max_iter=self.max_iter,
            random_state=self.random_state,
            class_weight=self.class_weight,
        ).fit(X, y_idx)
        self.coef_ = est.coef_
        self.intercept_ = est.intercept_
        self.n_iter_ = int(est.n_iter_)


class _RidgeSpectrum:
    """One eigendecomposition that gives the ridge solution for every alpha.

    With ``Xc`` the centred features and ``Yc`` the centred {-1, 1} targets, the ridge weights
    are ``W(alpha) = A @ diag(1 / (lam + alpha)) @ M`` where, for ``n_features <= n_samples``,
    ``Xc.T @ Xc = V diag(lam) V.T``, ``A = V``, ``M = V.T @ Xc.T @ Yc`` (the Gram matrix is
    accumulated over row chunks, so ``X`` may be an ``h5py.Dataset``), and otherwise
    ``Xc @ Xc.T = U diag(lam) U.T``, ``A = Xc.T @ U``, ``M = U.T @ Yc``.

    With sample weights ``w`` (weighted least squares, as scikit-learn's ``Ridge`` with
    ``sample_weight``): the means are ``w``-weighted averages, and ``Xc`` and ``Yc`` are the
    centred rows multiplied by ``sqrt(w)``; the intercept stays ``y_mean - x_mean @ W``.
    """

    def __init__(
        self, X: Any, y_idx: np.ndarray, n_classes: int, sample_weight: np.ndarray | None = None
    ) -> None:
        n, d = (int(s) for s in X.shape)
        k = 1 if n_classes == 2 else n_classes
        if k == 1:
            Y = np.where(y_idx == 1, 1.0, -1.0)[:, None]
        else:
            Y = -np.ones((n, k))
            Y[np.arange(n), y_idx] = 1.0
        w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        sw = None if sample_weight is None else np.sqrt(w)[:, None]
        self.y_mean = np.average(Y, axis=0, weights=w)
        Yc = Y - self.y_mean
        if sw is not None:
            Yc *= sw
        total = np.zeros(d)
        for a, b, chunk in iter_row_chunks(X, 8192):
            if sw is None:
                total += chunk.sum(axis=0, dtype=np.float64)
            else:
                total += w[a:b] @ chunk.astype(np.float64)
        self.x_mean = total / w.sum()

        def centred(a: int, b: int, chunk: np.ndarray) -> np.ndarray:
            xc = chunk.astype(np.float64) - self.x_mean
            return xc if sw is None else xc * sw[a:b]

        if d <= n:
            gram = np.zeros((d, d))
            xty = np.zeros((d, k))
            for a, b, chunk in iter_row_chunks(X, 8192):
                xc = centred(a, b, chunk)
                gram += xc.T @ xc
                xty += xc.T @ Yc[a:b]
            lam, V = np.linalg.eigh(gram)
            self.A, self.M = V, V.T @ xty
        else:
            Xc = np.concatenate([centred(a, b, c) for a, b, c in iter_row_chunks(X, 8192)])
            lam, U = np.linalg.eigh(Xc @ Xc.T)
            self.A, self.M = Xc.T @ U, U.T @ Yc
        self.lam = np.clip(lam, 0.0, None)

    def weights(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """``coef_`` (k, d) and ``intercept_`` (k,) for one alpha."""
        W = self.A @ (self.M / (self.lam + alpha)[:, None])
        return W.T.copy(), self.y_mean - self.x_mean @ W

    def decision_grid(self, X_eval: Any, alphas: list[float]) -> np.ndarray:
        """Scores of shape (len(alphas), n_eval, k) from one projection of ``X_eval``."""
        Z = np.concatenate(
            [
                (c.astype(np.float64) - self.x_mean) @ self.A
                for _, _, c in iter_row_chunks(X_eval, what="X_eval")
            ]
        )
        return np.stack([Z @ (self.M / (self.lam + a)[:, None]) + self.y_mean for a in alphas])


class RidgeHead(LinearHeadMixin, BaseHead):
    """Closed-form ridge classifier, the same model as scikit-learn ``RidgeClassifier``.

    Targets are one-hot in {-1, 1} (one column for two classes), both ``X`` and the targets are
    centred, and ``coef_ = argmin ||Xc W - Yc||^2 + alpha ||W||^2``; computed in float64.

    Parameters
    ----------
    alpha : float, default=1.0
        L2 strength on the summed squared error (scikit-learn's meaning).
    class_weight : {None, "balanced"}, default=None
        "balanced" weighs the squared error of a row of class c by
        ``n_samples / (n_classes * n_c)``: weighted least squares with weighted centring, as
        scikit-learn's ``RidgeClassifier(class_weight="balanced")``.

    Attributes
    ----------
    classes_, coef_, intercept_, n_features_in_ : as for :class:`LogRegHead`

    Notes
    -----
    ``predict_proba`` is ``softmax(decision_function)`` (``sigmoid`` for two classes). Ridge
    scores live on the {-1, 1} target scale, so these probabilities are soft and uncalibrated;
    they rank like the classifier. ``sweep_proba`` computes one eigendecomposition (of the
    smaller of ``Xc.T Xc`` and ``Xc Xc.T``) and reads every alpha off it. ``fit`` and
    ``sweep_proba`` stream an ``h5py.Dataset``-like ``X`` in row chunks when
    ``n_features <= n_samples``.
    """

    head_name = "ridge"
    param = "alpha"
    default_grid = RIDGE_GRID
    grid_bounds = (1e-6, 1e9)
    parallel_work = 1 << 16
    _parameter_constraints = {"alpha": POSITIVE, "class_weight": CLASS_WEIGHT}
    streams = True

    def __init__(self, *, alpha: float = 1.0, class_weight: str | None = None) -> None:
        self._store_options(locals())

    def _spectrum(self, X: Any, y_idx: np.ndarray, n_classes: int) -> _RidgeSpectrum:
        cw = class_weights(y_idx, n_classes, self.class_weight)
        return _RidgeSpectrum(X, y_idx, n_classes, None if cw is None else cw[y_idx])

    def _fit(self, X, y_idx, n_classes) -> None:
        spectrum = self._spectrum(X, y_idx, n_classes)
        self.coef_, self.intercept_ = spectrum.weights(float(self.alpha))

    def _sweep(self, X, y_idx, n_classes, grid, X_eval) -> np.ndarray:
        spectrum = self._spectrum(X, y_idx, n_classes)
        scores = spectrum.decision_grid(X_eval, [float(a) for a in grid])
        return np.stack([scores_to_proba(s) for s in scores])

    def _sweep_fit(self, X, y_idx, n_classes, grid) -> list[BaseHead]:
        spectrum = self._spectrum(X, y_idx, n_classes)
        heads = []
        for alpha in grid:
            head = self.with_value(alpha)
            head.coef_, head.intercept_ = spectrum.weights(float(alpha))
            head.n_features_in_ = int(X.shape[1])
            heads.append(head)
        return heads


__all__ = ["LOGREG_GRID", "RIDGE_GRID", "SVM_GRID", "LogRegHead", "RidgeHead", "SVMHead"]
