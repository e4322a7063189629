"""report: the selection rule is printed in words a user would say, not as a dataclass repr."""
from __future__ import annotations

import pytest

from ptqat_fx import Select
from ptqat_fx.views.selection_words import selection_words


@pytest.mark.parametrize("select, threshold, words", [
    (Select(), 0.0651, "small-discrepancy half by accumulated relative error, theta 0.0651"),
    (Select(), None, "small-discrepancy half by accumulated relative error"),
    (Select("large", fraction=0.25, mode="local", metric="mse"), None,
     "large-discrepancy 25% of the layers by local mean squared error"),
    (Select(theta=0.07), 0.07, "small-discrepancy layers below theta 0.07 by accumulated relative error"),
    (Select("large", theta=0.2, metric="cosine"), None, "large-discrepancy layers above theta 0.2 by accumulated cosine distance"),
    (Select(param_budget=0.2), None, "small-discrepancy layers within 20% of the layer parameters by accumulated relative error"),
    (Select("random", seed=3), None, "random half, seed 3"),
    (Select("all"), None, "every layer (full QAT)"),
    (Select("none"), None, "no layer (pure PTQ)"),
    (None, None, "none (every layer trainable)"),
    (Select(train_other_params=True), None,
     "small-discrepancy half by accumulated relative error, other parameters trained too"),
])
def test_selection_is_said_in_words(select, threshold, words):
    assert selection_words(select, threshold) == words
