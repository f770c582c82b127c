"""Every registered head honours the scikit-learn contract, the sweep and the state contract."""

from __future__ import annotations

import json
import warnings

import h5py
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from featcache.errors import ConfigError, HeadError
from featcache.heads import HEADS, HeadNotFittedError, list_heads, make_head
from featcache.heads.neighbors import KNN_GRID
from featcache.heads.sklearn_heads import LOGREG_GRID, RIDGE_GRID, SVM_GRID
from featcache.heads.mlp import MLP_GRID
from featcache.heads.solvers import batched_lbfgs

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

#: Options that keep each head fast on the toy problems below.
FAST: dict[str, dict] = {
    "mlp": {"hidden": 16, "epochs": 6, "lr": 3e-2, "batch_size": 150, "device": "cpu"},
    "linear": {"device": "cpu"},
    "knn": {"k": 10, "device": "cpu"},
}
#: Heads of pooled feature vectors (the tail head reads spatial activations: tests/test_tail.py).
NAMES = [n for n in HEADS.names() if HEADS.entry(n).extra["inputs"] == "features"]


def _problem(n_classes: int, *, n: int = 300, d: int = 12, seed: int = 0):
    X, y = make_classification(
        n_samples=n + 100,
        n_features=d,
        n_informative=min(d, 8),
        n_redundant=0,
        n_classes=n_classes,
        n_clusters_per_class=1,
        class_sep=2.0,
        random_state=seed,
    )
    X = StandardScaler().fit_transform(X).astype(np.float32)
    return X[:n], y[:n], X[n:], y[n:]


@pytest.fixture(scope="module")
def multi():
    Xtr, ytr, Xte, yte = _problem(3)
    names = np.array(["cat", "dog", "eel"])
    return Xtr, names[ytr], Xte, names[yte]


@pytest.fixture(scope="module")
def binary():
    return _problem(2)


@pytest.fixture(scope="module", params=NAMES)
def fitted(request, multi):
    Xtr, ytr, Xte, yte = multi
    return request.param, make_head(request.param, **FAST.get(request.param, {})).fit(Xtr, ytr)


# --------------------------------------------------------------------------------------------
# Registry


def test_registry_lists_every_head_with_its_options():
    heads = {h["name"]: h for h in list_heads()}
    assert set(heads) == {"logreg", "ridge", "linear", "mlp", "knn", "ncm", "svm", "tail"}
    assert heads["tail"]["inputs"] == "activations"
    for name, info in heads.items():
        cls = HEADS.get(name)
        assert set(info["options"]) == set(cls._get_param_names()), name
        assert all(set(v) >= {"default", "constraint", "help"} and v["constraint"] for v in info["options"].values())
        assert info["description"]
        assert info["param"] == cls.param
        if info["param"] is not None:
            assert info["param"] in info["options"]
        json.dumps(info)
    assert heads["logreg"]["default_grid"] == list(LOGREG_GRID) and len(LOGREG_GRID) == 13
    assert heads["linear"]["default_grid"] == list(LOGREG_GRID)
    assert LOGREG_GRID[0] == pytest.approx(1e-4) and LOGREG_GRID[-1] == pytest.approx(1e4)
    assert len(RIDGE_GRID) == 13 and len(SVM_GRID) == 13
    assert heads["knn"]["default_grid"] == [1, 5, 10, 20, 50, 100] == list(KNN_GRID)
    assert heads["mlp"]["default_grid"] == list(MLP_GRID)
    assert heads["ncm"]["param"] is None and heads["ncm"]["default_grid"] == [None]


def test_make_head_rejects_unknown_names_and_options():
    with pytest.raises(ConfigError, match="Unknown head 'lasso'. Run 'featcache heads'"):
        make_head("lasso")
    with pytest.raises(ConfigError) as err:
        make_head("logreg", alpha=1.0)
    assert (
        str(err.value)
        == "Unknown option 'alpha' for head 'logreg'. Valid options: C, max_iter, tol, "
        "class_weight."
    )


@pytest.mark.parametrize(
    "name, option, value, message",
    [
        ("logreg", "C", -1.0, "The 'C' option of the 'logreg' head must be a finite number > 0. Got -1.0."),
        ("ridge", "alpha", 0, "The 'alpha' option of the 'ridge' head must be a finite number > 0. Got 0."),
        ("linear", "solver", "sgd",
         "The 'solver' option of the 'linear' head must be one of 'lbfgs', 'adamw'. Got 'sgd'."),
        (
            "linear",
            "device",
            "gpu7",
            "The 'device' option of the 'linear' head must be 'auto', 'cpu', 'cuda' or 'cuda:N'. Got 'gpu7'.",
        ),
        ("mlp", "dropout", 1.0, "The 'dropout' option of the 'mlp' head must be a finite number in [0, 1). Got 1.0."),
        ("knn", "k", 0, "The 'k' option of the 'knn' head must be an int >= 1. Got 0."),
        (
            "ncm",
            "metric",
            "manhattan",
            "The 'metric' option of the 'ncm' head must be one of 'cosine', 'euclidean'. Got 'manhattan'.",
        ),
        ("svm", "max_iter", 2.5, "The 'max_iter' option of the 'svm' head must be an int >= 1. Got 2.5."),
    ],
)
def test_bad_option_values_raise_config_error(name, option, value, message, multi):
    with pytest.raises(ConfigError) as err:
        make_head(name, **{option: value})
    assert str(err.value) == message
    # A head built directly (sklearn style) fails the same way at fit time.
    with pytest.raises(ConfigError):
        HEADS.get(name)(**{option: value}).fit(multi[0], multi[1])


# --------------------------------------------------------------------------------------------
# The scikit-learn contract, for every head


def test_fit_predict_proba_score(fitted, multi):
    name, head = fitted
    Xtr, ytr, Xte, yte = multi
    assert list(head.classes_) == ["cat", "dog", "eel"]
    assert head.n_features_in_ == Xtr.shape[1]
    proba = head.predict_proba(Xte)
    assert proba.shape == (len(Xte), 3) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert (proba >= 0).all()
    pred = head.predict(Xte)
    assert set(pred) <= {"cat", "dog", "eel"}
    np.testing.assert_array_equal(pred, head.classes_[proba.argmax(axis=1)])
    score = head.score(Xte, yte)
    assert score == pytest.approx(np.mean(pred == yte))
    assert score > 0.8, f"{name} scored {score} on a well separated 3-class problem"


def test_binary_problem(binary):
    Xtr, ytr, Xte, yte = binary
    for name in NAMES:
        head = make_head(name, **FAST.get(name, {})).fit(Xtr, ytr + 10)
        proba = head.predict_proba(Xte)
        assert proba.shape == (len(Xte), 2)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
        assert head.score(Xte, yte + 10) > 0.85, name
        if hasattr(head, "decision_function") and name != "ncm":
            d = head.decision_function(Xte)
            assert d.shape == (len(Xte),), name
            np.testing.assert_array_equal(head.predict(Xte), np.where(d > 0, 11, 10))


def test_get_params_and_clone(fitted):
    name, head = fitted
    params = head.get_params()
    assert set(params) == set(HEADS.entry(name).extra["options"])
    twin = clone(head)
    assert twin.get_params() == params
    assert not hasattr(twin, "classes_")
    if head.param is not None:
        value = HEADS.entry(name).extra["default_grid"][1]
        assert twin.set_params(**{head.param: value}).get_params()[head.param] == value
    assert head.get_params() == params


@pytest.mark.parametrize("name", NAMES)
def test_unfitted_head_raises_not_fitted(name, multi):
    head = make_head(name)
    for method in ("predict", "predict_proba", "get_state", "to_torch"):
        with pytest.raises(NotFittedError) as err:
            fn = getattr(head, method)
            fn(multi[2]) if method.startswith("predict") else fn()
        assert isinstance(err.value, HeadNotFittedError) and isinstance(err.value, HeadError)
        assert f"This {type(head).__name__} is not fitted yet. Call 'fit(X, y)' first" in str(
            err.value
        )


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_head_error(name, multi):
    Xtr, ytr, Xte, _ = multi
    head = make_head(name, **FAST.get(name, {}))
    with pytest.raises(HeadError, match="single class"):
        head.fit(Xtr, np.zeros(len(Xtr)))
    with pytest.raises(HeadError, match="must be 2-D"):
        head.fit(Xtr[:, 0], ytr)
    bad = Xtr.copy()
    bad[3, 2] = np.nan
    with pytest.raises(HeadError, match="NaN or infinity"):
        head.fit(bad, ytr)
    with pytest.raises(HeadError, match="X has 300 rows but y has 299 labels"):
        head.fit(Xtr, ytr[:-1])
    head.fit(Xtr, ytr)
    with pytest.raises(HeadError, match="X has 11 features but the head was fitted with 12"):
        head.predict(Xte[:, :11])


# --------------------------------------------------------------------------------------------
# sweep_proba


@pytest.mark.parametrize("name", NAMES)
def test_sweep_proba_shape_and_self_untouched(name, multi):
    Xtr, ytr, Xte, yte = multi
    head = make_head(name, **FAST.get(name, {}))
    grid = list(HEADS.entry(name).extra["default_grid"])[:3]
    before = head.get_params()
    out = head.sweep_proba(Xtr, ytr, grid, Xte)
    assert out.shape == (len(grid), len(Xte), 3)
    np.testing.assert_allclose(out.sum(axis=2), 1.0, atol=1e-9)
    assert head.get_params() == before
    assert not hasattr(head, "classes_"), "sweep_proba must leave the head unfitted"
    # The last grid value equals a plain fit with that value.
    last = clone(head)
    if head.param is not None:
        last.set_params(**{head.param: grid[-1]})
    ref = last.fit(Xtr, ytr).predict_proba(Xte)
    np.testing.assert_allclose(out[-1], ref, atol=2e-4)


@pytest.mark.parametrize("name", NAMES)
def test_sweep_fit_returns_the_models_sweep_proba_scores(name, multi):
    """fit-head keeps the selected swept model, so sweep_fit must give the very models scored."""
    Xtr, ytr, Xte, _ = multi
    head = make_head(name, **FAST.get(name, {}))
    grid = list(HEADS.entry(name).extra["default_grid"])[-3:]
    heads = head.sweep_fit(Xtr, ytr, grid)
    swept = head.sweep_proba(Xtr, ytr, grid, Xte)
    assert not hasattr(head, "classes_")
    for h, p, value in zip(heads, swept, grid):
        assert list(h.classes_) == ["cat", "dog", "eel"]
        if head.param is not None:
            assert h.get_params()[head.param] == value
        np.testing.assert_allclose(h.predict_proba(Xte), p, atol=1e-5)


def test_logreg_warm_started_sweep_differs_from_a_cold_fit():
    """Why fit-head saves the swept model instead of refitting: with a weak penalty lbfgs stops
    short of the flat optimum, and a warm-started fit stops elsewhere than a cold one (this is
    what made fit-head report 1.0 on val for a saved model scoring 0.95)."""
    X, y = make_classification(n_samples=160, n_features=200, n_informative=20, n_classes=4, class_sep=1.5,
                               random_state=0)
    grid = list(HEADS.entry("logreg").extra["default_grid"])
    heads = make_head("logreg").sweep_fit(X[:80], y[:80], grid)
    warm = [np.mean(h.predict(X[80:]) == y[80:]) for h in heads]
    cold = [np.mean(make_head("logreg", C=c).fit(X[:80], y[:80]).predict(X[80:]) == y[80:]) for c in grid]
    assert warm != cold


def test_sweep_rejects_bad_grids(multi):
    Xtr, ytr, Xte, _ = multi
    with pytest.raises(ConfigError, match="The 'C' option of the 'logreg' head must be a finite number > 0. Got -2."):
        make_head("logreg").sweep_proba(Xtr, ytr, [1.0, -2], Xte)
    with pytest.raises(ConfigError, match="non-empty sequence"):
        make_head("ridge").sweep_proba(Xtr, ytr, [], Xte)
    with pytest.raises(ConfigError, match=r"no parameter to sweep; its grid is \(None,\)"):
        make_head("ncm").sweep_proba(Xtr, ytr, [1.0], Xte)
    with pytest.raises(HeadError, match="X_eval has 5 features"):
        make_head("ridge").sweep_proba(Xtr, ytr, [1.0], Xte[:, :5])


# --------------------------------------------------------------------------------------------
# State and torch export


def test_state_round_trip_predicts_identically(fitted, multi):
    name, head = fitted
    arrays, meta = head.get_state()
    text = json.dumps(meta)  # JSON-able
    assert all(isinstance(a, np.ndarray) and a.dtype.kind in "biuf" for a in arrays.values())
    copies = {k: v.copy() for k, v in arrays.items()}
    again = type(head).from_state(copies, json.loads(text))
    Xte = multi[2]
    np.testing.assert_array_equal(again.predict_proba(Xte), head.predict_proba(Xte))
    np.testing.assert_array_equal(again.predict(Xte), head.predict(Xte))
    assert again.get_params() == head.get_params()
    assert list(again.classes_) == list(head.classes_)


def test_from_state_rejects_inconsistent_state(fitted):
    name, head = fitted
    arrays, meta = head.get_state()
    key = sorted(arrays)[0]
    broken = dict(arrays)
    broken[key] = broken[key][:1] if broken[key].shape[0] > 1 else np.concatenate([broken[key]] * 2)
    with pytest.raises(HeadError, match=r"The saved array '\w+' has shape .* expected"):
        type(head).from_state(broken, meta)
    with pytest.raises(HeadError, match=f"lacks the array '{key}'"):
        type(head).from_state({k: v for k, v in arrays.items() if k != key}, meta)
    with pytest.raises(HeadError, match="unknown .* option"):
        type(head).from_state(arrays, {**meta, "params": {**meta["params"], "bogus": 1}})


def test_to_torch_matches_predict_proba_and_traces(fitted, multi):
    name, head = fitted
    Xte = multi[2]
    module = head.to_torch()
    assert isinstance(module, torch.nn.Module)
    x = torch.from_numpy(Xte)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        traced = torch.jit.trace(module, x[:7])
        scripted = torch.jit.script(module)
    with torch.no_grad():
        for m in (module, traced, scripted):
            out = m(x)  # a batch size other than the traced one
            assert out.shape == (len(Xte), 3)
            np.testing.assert_allclose(
                torch.softmax(out, dim=1).numpy(), head.predict_proba(Xte), atol=1e-5
            )


# --------------------------------------------------------------------------------------------
# ridge


@pytest.mark.parametrize("n, d, k", [(200, 10, 3), (60, 100, 4), (150, 8, 2), (30, 50, 2)])
def test_ridge_matches_sklearn_ridge_classifier(n, d, k):
    X, y = make_classification(
        n + 40,
        d,
        n_informative=min(d, 6),
        n_redundant=0,
        n_classes=k,
        n_clusters_per_class=1,
        random_state=1,
    )
    X = X * 3.0 + 5.0  # uncentred features exercise the intercept
    Xtr, ytr, Xte = X[:n], y[:n], X[n:]
    alphas = [1e-3, 1.0, 100.0]
    swept = make_head("ridge").sweep_proba(Xtr, ytr, alphas, Xte)
    for i, alpha in enumerate(alphas):
        ours = make_head("ridge", alpha=alpha).fit(Xtr, ytr)
        ref = RidgeClassifier(alpha=alpha).fit(Xtr, ytr)
        np.testing.assert_allclose(
            ours.decision_function(Xte), ref.decision_function(Xte), rtol=1e-5, atol=1e-8
        )
        np.testing.assert_allclose(ours.coef_.ravel(), ref.coef_.ravel(), rtol=1e-5, atol=1e-8)
        np.testing.assert_array_equal(ours.predict(Xte), ref.predict(Xte))
        np.testing.assert_allclose(swept[i], ours.predict_proba(Xte), rtol=1e-7, atol=1e-10)


def test_ridge_streams_an_hdf5_dataset(tmp_path, multi):
    Xtr, ytr, Xte, _ = multi
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["X"] = Xtr
    with h5py.File(tmp_path / "f.h5", "r") as f:
        head = make_head("ridge", alpha=3.0).fit(f["X"], ytr)
        np.testing.assert_allclose(head.predict_proba(f["X"]), head.predict_proba(Xtr), atol=1e-12)
    ref = RidgeClassifier(alpha=3.0).fit(Xtr.astype(np.float64), ytr)
    np.testing.assert_allclose(
        head.decision_function(Xte), ref.decision_function(Xte), rtol=1e-5, atol=1e-7
    )


# --------------------------------------------------------------------------------------------
# linear


@pytest.mark.parametrize("n_classes", [2, 3])
def test_linear_agrees_with_logreg(n_classes):
    Xtr, ytr, Xte, yte = _problem(n_classes, seed=3)
    for C in (0.01, 1.0):
        lin = make_head("linear", C=C, device="cpu").fit(Xtr, ytr)
        ref = make_head("logreg", C=C).fit(Xtr, ytr)
        assert abs(lin.score(Xte, yte) - ref.score(Xte, yte)) <= 0.01
        assert lin.coef_.shape == ref.coef_.shape
        np.testing.assert_allclose(lin.coef_, ref.coef_, atol=2e-3)
        np.testing.assert_allclose(lin.predict_proba(Xte), ref.predict_proba(Xte), atol=2e-3)
    # logreg itself is scikit-learn's LogisticRegression.
    sk = LogisticRegression(C=1.0, max_iter=1000, tol=1e-6).fit(Xtr, ytr)
    np.testing.assert_allclose(ref.predict_proba(Xte), sk.predict_proba(Xte), atol=1e-6)


def test_linear_grid_equals_separate_fits(multi):
    Xtr, ytr, Xte, _ = multi
    Cs = [1e-3, 0.1, 3.0]
    swept = make_head("linear", device="cpu").sweep_proba(Xtr, ytr, Cs, Xte)
    for i, C in enumerate(Cs):
        single = make_head("linear", C=C, device="cpu").fit(Xtr, ytr)
        np.testing.assert_allclose(swept[i], single.predict_proba(Xte), atol=2e-4)
    # Different C really gives different heads.
    assert np.abs(swept[0] - swept[-1]).max() > 0.1


def test_batched_lbfgs_matches_separate_runs():
    # G independent quadratics with very different conditioning, solved together and apart.
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(4, 6, 6, generator=gen, dtype=torch.float64)
    H = A @ A.transpose(1, 2) + torch.tensor([1e-2, 1.0, 10.0, 1e3], dtype=torch.float64)[
        :, None, None
    ] * torch.eye(6, dtype=torch.float64)
    c = torch.randn(4, 6, generator=gen, dtype=torch.float64)

    def fg(x, idx=None):
        Hs, cs = (H, c) if idx is None else (H[idx], c[idx])
        Hx = torch.einsum("gij,gj->gi", Hs, x)
        return 0.5 * (x * Hx).sum(1) - (cs * x).sum(1), Hx - cs

    x, n_iter, unfinished = batched_lbfgs(
        fg, torch.zeros(4, 6, dtype=torch.float64), max_iter=200, tol=1e-10, ftol=0.0
    )
    exact = torch.linalg.solve(H, c)
    torch.testing.assert_close(x, exact, rtol=1e-7, atol=1e-8)
    assert not unfinished.any()
    for g in range(4):
        xg, ng, _ = batched_lbfgs(
            lambda z, idx, g=g: fg(z, torch.tensor([g])),
            torch.zeros(1, 6, dtype=torch.float64),
            max_iter=200,
            tol=1e-10,
            ftol=0.0,
        )
        assert ng[0] == n_iter[g]


def _counting(ds):
    class Counting:
        """An h5py.Dataset-like wrapper recording every slice read."""

        def __init__(self):
            self.shape, self.dtype, self.reads = ds.shape, ds.dtype, []

        def __getitem__(self, key):
            self.reads.append((key.start, key.stop))
            return ds[key]

    return Counting()


@pytest.mark.parametrize("solver", ["lbfgs", "adamw"])
def test_linear_out_of_core_matches_in_memory(tmp_path, solver):
    Xtr, ytr, Xte, yte = _problem(3, seed=5)
    kw = dict(solver=solver, device="cpu", epochs=8, lr=5e-2, batch_size=100)
    mem = make_head("linear", **kw).fit(Xtr, ytr)
    with h5py.File(tmp_path / "feats.h5", "w") as f:
        f["X"] = Xtr.astype(np.float16)  # float16 caches are cast per chunk
    with h5py.File(tmp_path / "feats.h5", "r") as f:
        ds = _counting(f["X"])
        row_bytes = 4 * Xtr.shape[1]
        ooc = make_head("linear", max_memory=100 * row_bytes, **kw).fit(ds, ytr)
        starts = {a for a, _ in ds.reads}
        assert starts == {0, 100, 200}, "the dataset must be read in contiguous 100-row chunks"
        assert max(b - a for a, b in ds.reads) == 100
    assert abs(ooc.score(Xte, yte) - mem.score(Xte, yte)) <= 0.03
    assert ooc.score(Xte, yte) > 0.8
    if solver == "lbfgs":
        np.testing.assert_allclose(ooc.coef_, mem.coef_, atol=5e-3)


def test_big_ndarray_is_streamed_like_a_small_one(multi):
    Xtr, ytr, Xte, _ = multi
    small = make_head("linear", device="cpu", C=0.5).fit(Xtr, ytr)
    chunked = make_head("linear", device="cpu", C=0.5, max_memory=100 * 4 * 12).fit(Xtr, ytr)
    # Equal up to the float32 rounding of the summation order (the optimum is the same).
    np.testing.assert_allclose(chunked.predict_proba(Xte), small.predict_proba(Xte), atol=1e-3)
    np.testing.assert_allclose(chunked.coef_, small.coef_, atol=1e-3)


def test_linear_adamw_is_seeded(multi):
    Xtr, ytr, Xte, _ = multi
    kw = dict(solver="adamw", device="cpu", epochs=3, batch_size=100)
    a = make_head("linear", random_state=1, **kw).fit(Xtr, ytr).coef_
    b = make_head("linear", random_state=1, **kw).fit(Xtr, ytr).coef_
    c = make_head("linear", random_state=2, **kw).fit(Xtr, ytr).coef_
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-6


def test_linear_warns_when_lbfgs_runs_out_of_iterations(multi):
    Xtr, ytr, _, _ = multi
    with pytest.warns(ConvergenceWarning, match=r"max_iter=2 before converging for C=1000"):
        make_head("linear", C=1e3, max_iter=2, device="cpu").fit(Xtr, ytr)


# --------------------------------------------------------------------------------------------
# mlp


def test_mlp_is_seeded_and_grid_equals_separate_fits(multi):
    Xtr, ytr, Xte, _ = multi
    kw = dict(FAST["mlp"], epochs=2)
    a = make_head("mlp", random_state=3, **kw).fit(Xtr, ytr).predict_proba(Xte)
    b = make_head("mlp", random_state=3, **kw).fit(Xtr, ytr).predict_proba(Xte)
    c = make_head("mlp", random_state=4, **kw).fit(Xtr, ytr).predict_proba(Xte)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4
    grid = [0.0, 1.0, 30.0]
    swept = make_head("mlp", random_state=3, **kw).sweep_proba(Xtr, ytr, grid, Xte)
    np.testing.assert_allclose(swept[0], a, atol=1e-5)
    for i, wd in enumerate(grid):
        single = make_head("mlp", random_state=3, weight_decay=wd, **kw).fit(Xtr, ytr)
        np.testing.assert_allclose(swept[i], single.predict_proba(Xte), atol=1e-5)
    assert np.abs(swept[0] - swept[-1]).max() > 1e-3


def test_mlp_streams_an_hdf5_dataset(tmp_path, multi):
    Xtr, ytr, Xte, yte = multi
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["X"] = Xtr
    with h5py.File(tmp_path / "f.h5", "r") as f:
        ds = _counting(f["X"])
        head = make_head("mlp", max_memory=4 * 12 * 150, **FAST["mlp"]).fit(ds, ytr)
    assert {a for a, _ in ds.reads} == {0, 150}
    assert head.score(Xte, yte) > 0.8


# --------------------------------------------------------------------------------------------
# knn and ncm


def _dino_knn(Xtr, ytr, Xte, k, T, n_classes):
    """DINO's knn_classifier, written out with numpy."""
    tr = Xtr / np.linalg.norm(Xtr, axis=1, keepdims=True)
    te = Xte / np.linalg.norm(Xte, axis=1, keepdims=True)
    sim = te.astype(np.float64) @ tr.T.astype(np.float64)
    idx = np.argsort(-sim, axis=1)[:, :k]
    scores = np.zeros((len(Xte), n_classes))
    for i in range(len(Xte)):
        for j in idx[i]:
            scores[i, ytr[j]] += np.exp(sim[i, j] / T)
    return scores / scores.sum(axis=1, keepdims=True)


def test_knn_is_dinos_weighted_vote(multi):
    Xtr, ytr, Xte, _ = multi
    y_idx = np.unique(ytr, return_inverse=True)[1]
    for k, T in [(1, 0.07), (7, 0.07), (20, 0.5)]:
        head = make_head("knn", k=k, temperature=T, device="cpu").fit(Xtr, ytr)
        np.testing.assert_allclose(
            head.predict_proba(Xte), _dino_knn(Xtr, y_idx, Xte, k, T, 3), atol=1e-5
        )


def test_knn_sweep_reads_every_k_from_one_search_and_clips_k(multi):
    Xtr, ytr, Xte, _ = multi
    small_X, small_y = Xtr[:30], ytr[:30]
    grid = [1, 5, 50]
    swept = make_head("knn", device="cpu").sweep_proba(small_X, small_y, grid, Xte)
    for i, k in enumerate(grid):
        single = make_head("knn", k=k, device="cpu").fit(small_X, small_y)
        np.testing.assert_allclose(swept[i], single.predict_proba(Xte), atol=1e-6)
    y_idx = np.unique(small_y, return_inverse=True)[1]
    np.testing.assert_allclose(swept[2], _dino_knn(small_X, y_idx, Xte, 30, 0.07, 3), atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ncm_scores_against_class_means(metric, multi):
    Xtr, ytr, Xte, _ = multi
    head = make_head("ncm", metric=metric, temperature=0.3).fit(Xtr, ytr)
    X = Xtr.astype(np.float64)
    if metric == "cosine":
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
    means = np.stack([X[ytr == c].mean(axis=0) for c in head.classes_])
    np.testing.assert_allclose(head.centroids_, means, atol=1e-6)
    Q = Xte.astype(np.float64)
    if metric == "cosine":
        scores = (
            (Q / np.linalg.norm(Q, axis=1, keepdims=True))
            @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
            / 0.3
        )
    else:
        scores = -((Q[:, None, :] - means[None]) ** 2).sum(axis=2) / 0.6
    np.testing.assert_allclose(head.decision_function(Xte), scores, atol=1e-6)
    expected = np.exp(scores - scores.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(head.predict_proba(Xte), expected, atol=1e-6)
    np.testing.assert_array_equal(head.predict(Xte), head.classes_[scores.argmax(axis=1)])


# --------------------------------------------------------------------------------------------
# class_weight

WEIGHTED = ("logreg", "svm", "ridge", "linear", "mlp")


def _imbalanced(n_classes: int = 2, *, seed: int = 0):
    """A 90/10 (or 70/20/10) problem where an unweighted head under-predicts the minority."""
    weights = [0.9, 0.1] if n_classes == 2 else [0.7, 0.2, 0.1]
    X, y = make_classification(
        n_samples=1400,
        n_features=12,
        n_informative=8,
        n_redundant=0,
        n_classes=n_classes,
        n_clusters_per_class=1,
        weights=weights,
        class_sep=0.8,
        flip_y=0.02,
        random_state=seed,
    )
    X = StandardScaler().fit_transform(X).astype(np.float32)
    return X[:600], y[:600], X[600:], y[600:]


@pytest.fixture(scope="module")
def imbalanced():
    return _imbalanced()


def test_class_weight_is_an_option_of_the_linear_and_torch_heads():
    heads = {h["name"]: h for h in list_heads()}
    for name in WEIGHTED:
        assert "class_weight" in heads[name]["options"], name
        assert heads[name]["options"]["class_weight"]["constraint"] == "one of None, 'balanced'"
        assert make_head(name).get_params()["class_weight"] is None
        assert make_head(name, class_weight="balanced").get_params()["class_weight"] == "balanced"
    for name in ("knn", "ncm"):
        with pytest.raises(ConfigError, match=f"Unknown option 'class_weight' for head '{name}'"):
            make_head(name, class_weight="balanced")


@pytest.mark.parametrize("name", WEIGHTED)
@pytest.mark.parametrize("value", ["auto", "Balanced", {0: 1.0, 1: 9.0}, 1.0])
def test_bad_class_weight_raises_config_error(name, value, multi):
    message = f"The 'class_weight' option of the '{name}' head must be one of None, 'balanced'. Got {value!r}."
    with pytest.raises(ConfigError) as err:
        make_head(name, class_weight=value)
    assert str(err.value) == message
    with pytest.raises(ConfigError, match="'class_weight' option"):
        HEADS.get(name)(class_weight=value).fit(multi[0], multi[1])


def _recall(pred, y, c=1):
    return float(np.mean(pred[y == c] == c))


@pytest.mark.parametrize(
    "name, extra",
    [(n, {}) for n in WEIGHTED]
    + [("linear", {"solver": "adamw", "epochs": 10, "lr": 5e-2, "batch_size": 100})],
    ids=list(WEIGHTED) + ["linear-adamw"],
)
def test_balanced_class_weight_raises_minority_recall(name, extra, imbalanced):
    Xtr, ytr, Xte, yte = imbalanced
    kw = {**FAST.get(name, {}), **extra}
    plain = make_head(name, **kw).fit(Xtr, ytr)
    head = make_head(name, class_weight="balanced", **kw).fit(Xtr, ytr)
    r_plain, r_bal = _recall(plain.predict(Xte), yte), _recall(head.predict(Xte), yte)
    assert r_bal >= r_plain + 0.1, f"{name}: minority recall {r_plain:.3f} -> {r_bal:.3f}"
    # Balanced accuracy (mean per-class recall), what the weighting targets, does not drop.
    assert r_bal > 0.7, name
    assert balanced_accuracy_score(yte, head.predict(Xte)) >= balanced_accuracy_score(
        yte, plain.predict(Xte)
    ), name

    # The grid path trains the same weighted model as fit.
    value = head.get_params()[head.param]
    swept = make_head(name, class_weight="balanced", **kw).sweep_proba(Xtr, ytr, [value], Xte)
    np.testing.assert_allclose(swept[0], head.predict_proba(Xte), atol=2e-4)

    # The option travels in the saved state and comes back from it.
    arrays, meta = head.get_state()
    meta = json.loads(json.dumps(meta))
    assert meta["params"]["class_weight"] == "balanced"
    again = type(head).from_state({k: v.copy() for k, v in arrays.items()}, meta)
    assert again.get_params() == head.get_params()
    np.testing.assert_array_equal(again.predict_proba(Xte), head.predict_proba(Xte))
    assert clone(again).get_params()["class_weight"] == "balanced"


@pytest.mark.parametrize("n, d, k", [(200, 10, 3), (60, 100, 4), (150, 8, 2), (30, 50, 2)])
def test_balanced_ridge_matches_sklearn_ridge_classifier(n, d, k):
    X, y = make_classification(
        n + 40,
        d,
        n_informative=min(d, 6),
        n_redundant=0,
        n_classes=k,
        n_clusters_per_class=1,
        weights=[0.7] + [0.3 / (k - 1)] * (k - 1),
        random_state=1,
    )
    X = X * 3.0 + 5.0  # uncentred features exercise the weighted centring and the intercept
    Xtr, ytr, Xte = X[:n], y[:n], X[n:]
    alphas = [1e-3, 1.0, 100.0]
    swept = make_head("ridge", class_weight="balanced").sweep_proba(Xtr, ytr, alphas, Xte)
    for i, alpha in enumerate(alphas):
        ours = make_head("ridge", alpha=alpha, class_weight="balanced").fit(Xtr, ytr)
        ref = RidgeClassifier(alpha=alpha, class_weight="balanced").fit(Xtr, ytr)
        np.testing.assert_allclose(
            ours.decision_function(Xte), ref.decision_function(Xte), rtol=1e-5, atol=1e-8
        )
        np.testing.assert_allclose(ours.coef_.ravel(), ref.coef_.ravel(), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(ours.intercept_, ref.intercept_, rtol=1e-5, atol=1e-8)
        np.testing.assert_array_equal(ours.predict(Xte), ref.predict(Xte))
        np.testing.assert_allclose(swept[i], ours.predict_proba(Xte), rtol=1e-7, atol=1e-10)
    # Weighting changes the model (the problem is imbalanced).
    plain = make_head("ridge", alpha=100.0).fit(Xtr, ytr)
    balanced = make_head("ridge", alpha=100.0, class_weight="balanced").fit(Xtr, ytr)
    assert np.abs(plain.decision_function(Xte) - balanced.decision_function(Xte)).max() > 1e-2


def test_balanced_ridge_streams_an_hdf5_dataset(tmp_path, imbalanced):
    Xtr, ytr, Xte, _ = imbalanced
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["X"] = Xtr
    with h5py.File(tmp_path / "f.h5", "r") as f:
        head = make_head("ridge", alpha=3.0, class_weight="balanced").fit(f["X"], ytr)
    ref = RidgeClassifier(alpha=3.0, class_weight="balanced").fit(Xtr.astype(np.float64), ytr)
    np.testing.assert_allclose(
        head.decision_function(Xte), ref.decision_function(Xte), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("n_classes", [2, 3])
def test_balanced_linear_agrees_with_balanced_logreg(n_classes):
    Xtr, ytr, Xte, yte = _imbalanced(n_classes, seed=3)
    Cs = [0.01, 1.0]
    swept = make_head("linear", class_weight="balanced", device="cpu").sweep_proba(
        Xtr, ytr, Cs, Xte
    )
    for i, C in enumerate(Cs):
        lin = make_head("linear", C=C, class_weight="balanced", device="cpu").fit(Xtr, ytr)
        ref = make_head("logreg", C=C, class_weight="balanced").fit(Xtr, ytr)
        assert abs(lin.score(Xte, yte) - ref.score(Xte, yte)) <= 0.01
        np.testing.assert_allclose(lin.coef_, ref.coef_, atol=2e-3)
        np.testing.assert_allclose(lin.predict_proba(Xte), ref.predict_proba(Xte), atol=2e-3)
        # The grid equals separate fits up to where float32 L-BFGS stops on a flat optimum.
        np.testing.assert_allclose(swept[i], lin.predict_proba(Xte), atol=1e-3)
        np.testing.assert_allclose(swept[i], ref.predict_proba(Xte), atol=2e-3)
        # ... and the weights really changed the model.
        plain = make_head("logreg", C=C).fit(Xtr, ytr)
        assert np.abs(plain.predict_proba(Xte) - ref.predict_proba(Xte)).max() > 0.05
    # logreg with balanced weights is scikit-learn's LogisticRegression(class_weight="balanced").
    sk = LogisticRegression(C=1.0, max_iter=1000, tol=1e-6, class_weight="balanced").fit(Xtr, ytr)
    np.testing.assert_allclose(ref.predict_proba(Xte), sk.predict_proba(Xte), atol=1e-6)


@pytest.mark.parametrize("normalize,pca", [("standard", 3), ("l2", None), ("none", 2)])
def test_transform_module_is_built_from_the_transform_state_without_an_import_circle(normalize, pca):
    import ast
    import inspect

    from featcache.heads import modules, transform

    imported = {n.module for n in ast.walk(ast.parse(inspect.getsource(modules))) if isinstance(n, ast.ImportFrom)}
    assert "transform" not in imported and not any("heads.transform" in (m or "") for m in imported)
    X = np.random.default_rng(0).standard_normal((20, 5)).astype(np.float32)
    t = transform.FeatureTransform(normalize, pca).fit(X)
    with torch.no_grad():
        out = t.to_torch()(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(out, t.transform(X), rtol=1e-5, atol=1e-5)
