"""Head options declared once: the ``parameters`` table is checked against the ``__init__``
signature when the class is made, and ``options`` and ``_check_params`` follow from it."""

from __future__ import annotations

import pytest

from featcache.errors import ConfigError
from featcache.heads import HEADS, make_head
from featcache.heads.base import BaseHead
from featcache.heads.params import Option, integer


@pytest.mark.parametrize("name", [e.name for e in HEADS])
def test_every_head_declares_each_init_option_once_with_help_and_check(name):
    cls = HEADS.get(name)
    assert "parameters" in cls.__dict__
    assert sorted(cls.parameters) == cls._get_param_names()
    assert cls.options == {k: o.help for k, o in cls.parameters.items()} and all(cls.options.values())
    assert "_check_params" not in cls.__dict__  # validation comes from the table


def test_a_table_that_drifts_from_the_signature_is_refused_when_the_class_is_made():
    with pytest.raises(TypeError, match=r"Toy.parameters declares \['k'\] but __init__ takes \['k', 'width'\]"):
        class Toy(BaseHead):
            parameters = {"k": Option("neighbours", integer)}

            def __init__(self, *, k: int = 1, width: int = 2) -> None:
                self.k, self.width = k, width


@pytest.mark.parametrize("name,option,value,message", [
    ("logreg", "C", 0, "The 'C' option must be a finite number > 0. Got 0."),
    ("mlp", "dropout", 1.0, "The 'dropout' option must be in [0, 1). Got 1.0."),
    ("knn", "device", "gpu", "The 'device' option must be 'auto', 'cpu', 'cuda' or 'cuda:N'. Got 'gpu'."),
    ("ncm", "metric", "l1", "The 'metric' option must be one of cosine, euclidean. Got 'l1'."),
    ("svm", "random_state", -1, "The 'random_state' option must be an int >= 0. Got -1."),
    ("linear", "patience", 3, "The 'patience' option stops AdamW epochs; solver='lbfgs' has none."),
])
def test_values_are_checked_from_the_table(name, option, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make_head(name, **{option: value})
