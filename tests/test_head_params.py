"""Head options declared once: the ``__init__`` signature names them and gives their defaults, one
``_parameter_constraints`` table per head gives their allowed values, the docstring their help;
``options``, ``_check_params``, ``featcache heads`` and saved runs follow from these."""

from __future__ import annotations

import inspect
import json
import re
from numbers import Integral, Real

import numpy as np
import pytest
from safetensors.numpy import save_file

from featcache.errors import ConfigError
from featcache.heads import HEADS, LinearHead, MLPHead, TailHead, make_head
from featcache.heads import params
from featcache.heads.base import BaseHead
from featcache.heads.params import COUNT, Interval, OneOf, describe, validate_options
from featcache.runs.artifacts import load_head


def _docstring_names(cls) -> list[str]:
    doc = inspect.cleandoc(cls.__doc__)
    section = doc.split("Parameters\n----------\n", 1)[1].split("\n\n", 1)[0]
    names = []
    for line in section.splitlines():
        m = re.match(r"^(\w+) :", line)
        if m:
            names.append(m.group(1))
    return names


@pytest.mark.parametrize("name", HEADS.names())
def test_every_head_declares_its_options_once(name):
    cls = HEADS.get(name)
    signature = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    assert all(p.kind == p.KEYWORD_ONLY for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self")
    # One table of allowed values, keyed as the signature; options follow, in signature order.
    assert set(cls.__dict__["_parameter_constraints"]) == set(signature)
    assert list(cls.options) == list(signature)
    assert {k: o["default"] for k, o in cls.options.items()} == signature
    assert "parameters" not in cls.__dict__ and "_check_params" not in cls.__dict__
    # The help comes from the numpydoc Parameters section, which documents exactly these options.
    assert _docstring_names(cls) == list(signature)
    assert all(o["help"] and o["constraint"] for o in cls.options.values()), cls.options
    assert cls.head_name == name and HEADS.entry(name).extra["options"] is cls.options


def test_shared_constraints_are_one_object():
    assert LinearHead._parameter_constraints["device"] is MLPHead._parameter_constraints["device"] is params.DEVICE
    patience = LinearHead._parameter_constraints["patience"]
    assert patience is TailHead._parameter_constraints["patience"] is params.PATIENCE
    users = [n for n in HEADS.names() if "class_weight" in HEADS.get(n).options]
    assert len(users) == 6 and all(HEADS.get(n)._parameter_constraints["class_weight"] is params.CLASS_WEIGHT
                                   for n in users)


def test_a_table_that_drifts_from_the_signature_is_refused_when_the_class_is_made():
    drift = r"Toy._parameter_constraints covers \['k'\] but __init__ takes \['k', 'width'\]"
    with pytest.raises(TypeError, match=drift):
        class Toy(BaseHead):
            _parameter_constraints = {"k": COUNT}

            def __init__(self, *, k: int = 1, width: int = 2) -> None:
                self._store_options(locals())

    with pytest.raises(TypeError, match=r"Star.__init__ takes \*args"):
        class Star(BaseHead):
            _parameter_constraints = {}

            def __init__(self, *args) -> None:
                pass


def test_init_stores_each_option_as_given():
    weights = object()
    head = TailHead(weights=weights, boundary="layer3")
    assert head.weights is weights and head.boundary == "layer3" and head.epochs == 10
    assert make_head("knn", k=3).get_params() == {"k": 3, "temperature": 0.07, "batch_size": 1024, "device": "auto"}


@pytest.mark.parametrize("name,option,value,message", [
    ("logreg", "C", 0, "The 'C' option of the 'logreg' head must be a finite number > 0. Got 0."),
    ("logreg", "C", float("nan"), "The 'C' option of the 'logreg' head must be a finite number > 0. Got nan."),
    ("mlp", "dropout", 1.0, "The 'dropout' option of the 'mlp' head must be a finite number in [0, 1). Got 1.0."),
    ("knn", "device", "gpu", "The 'device' option of the 'knn' head must be 'auto', 'cpu', 'cuda' or 'cuda:N'. "
                             "Got 'gpu'."),
    ("knn", "k", True, "The 'k' option of the 'knn' head must be an int >= 1. Got True."),
    ("ncm", "metric", "l1", "The 'metric' option of the 'ncm' head must be one of 'cosine', 'euclidean'. Got 'l1'."),
    ("ncm", "temperature", 0.0, "The 'temperature' option of the 'ncm' head must be None or a finite number > 0. "
                                "Got 0.0."),
    ("svm", "random_state", -1, "The 'random_state' option of the 'svm' head must be an int >= 0. Got -1."),
    ("svm", "random_state", None, "The 'random_state' option of the 'svm' head must be an int >= 0. Got None."),
    ("linear", "patience", 0, "The 'patience' option of the 'linear' head must be None or an int >= 1. Got 0."),
    ("ridge", "class_weight", "auto", "The 'class_weight' option of the 'ridge' head must be one of None, "
                                      "'balanced'. Got 'auto'."),
    ("tail", "precision", "half", "The 'precision' option of the 'tail' head must be one of 'auto', 'fp32', "
                                  "'bf16', 'fp16'. Got 'half'."),
    ("tail", "input_size", 4, "The 'input_size' option of the 'tail' head must be None or an int >= 8. Got 4."),
    ("linear", "patience", 3, "The 'patience' option stops AdamW epochs; solver='lbfgs' has none."),
])
def test_values_are_checked_from_the_table(name, option, value, message):
    kw = {"boundary": "layer3"} if name == "tail" else {}
    with pytest.raises(ConfigError) as err:
        make_head(name, **{**kw, option: value})
    assert str(err.value).startswith(message)


def test_numpy_numbers_pass_and_defaults_satisfy_their_constraints():
    assert make_head("knn", k=np.int64(5), temperature=np.float32(0.1)).k == 5
    for name in HEADS.names():
        required = [k for k, o in HEADS.get(name).options.items() if o.get("required")]
        assert required == (["boundary"] if name == "tail" else []), name


def test_constraints_in_words():
    assert describe([Interval(Integral, 1, None, closed="left")]) == "an int >= 1"
    assert describe([None, Interval(Real, 0, 1, closed="right")]) == "None or a finite number in (0, 1]"
    assert describe([None, str, OneOf("a")]) == "None, a string or 'a'"
    validate_options("Toy", {"x": [OneOf(1, 2)]}, {"x": 2})
    with pytest.raises(ConfigError, match=r"^The 'x' option of Toy must be one of 1, 2. Got 2.0.$"):
        validate_options("Toy", {"x": [OneOf(1, 2)]}, {"x": 2.0})
    with pytest.raises(TypeError, match="Interval takes Integral or Real"):
        Interval(float, 0, 1, closed="left")


# The params of each head as a run saved them before options were declared once (head.json's
# state.params, written by get_params()).
SAVED_BEFORE = {
    "logreg": {"C": 1.0, "class_weight": None, "max_iter": 1000, "tol": 1e-06},
    "ridge": {"alpha": 1.0, "class_weight": None},
    "linear": {"C": 1.0, "batch_size": 1024, "class_weight": None, "device": "auto", "epochs": 30, "lr": 0.001,
               "max_iter": 1000, "max_memory": 2147483648, "patience": None, "random_state": 0, "solver": "lbfgs",
               "tol": 1e-06},
    "mlp": {"batch_size": 256, "class_weight": None, "device": "auto", "dropout": 0.5, "epochs": 30, "hidden": 512,
            "lr": 0.001, "max_memory": 2147483648, "patience": None, "random_state": 0, "weight_decay": 0.0001},
    "knn": {"batch_size": 1024, "device": "auto", "k": 20, "temperature": 0.07},
    "ncm": {"metric": "cosine", "temperature": None},
    "svm": {"C": 1.0, "class_weight": None, "max_iter": 1000, "random_state": 0, "tol": 0.0001},
    "tail": {"augment": "flip+crop", "backbone": "efficientnet_lite0", "batch_size": 32, "boundary": "layer3",
             "class_weight": None, "device": "auto", "epochs": 10, "input_size": None, "lr": 0.001,
             "patience": None, "precision": "auto", "random_state": 0, "weight_decay": 0.0001, "weights": None},
}


@pytest.mark.parametrize("name", HEADS.names())
def test_params_saved_before_still_build_the_same_head(name):
    head = HEADS.get(name)(**SAVED_BEFORE[name])
    head._check_params()
    assert head.get_params() == SAVED_BEFORE[name]


def test_a_head_json_written_before_still_loads(tmp_path):
    # head.json as save_head wrote it before this change (logreg, C=0.5, balanced, 3 classes, 2 features).
    doc = {"format": "featcache-head", "version": 1, "head": "logreg",
           "state": {"params": {"C": 0.5, "class_weight": "balanced", "max_iter": 1000, "tol": 1e-06},
                     "classes": [0, 1, 2], "classes_dtype": "<i8", "n_features_in": 2}}
    coef = np.array([[-0.157637, -0.569407], [-0.324089, 0.088945], [0.481726, 0.480462]])
    intercept = np.array([0.798979, 0.438281, -1.23726])
    (tmp_path / "head.json").write_text(json.dumps(doc, indent=2))
    save_file({"coef_": coef, "intercept_": intercept}, str(tmp_path / "head.safetensors"),
              metadata={"format": "featcache-head"})
    head, meta = load_head(tmp_path)
    assert head.get_params() == doc["state"]["params"] and meta["head"] == "logreg"
    X = np.array([[0.0, 0.0], [3.0, 3.0]])
    z = X @ coef.T + intercept
    np.testing.assert_allclose(head.predict_proba(X), np.exp(z) / np.exp(z).sum(1, keepdims=True), rtol=1e-12)
