"""QuantConfig and Select validation: every bad field names itself."""
from __future__ import annotations

import pytest

from ptqat_fx import ConfigError, QuantConfig, Select


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"w_bits": 1}, "w_bits"),
        ({"a_bits": 9}, "a_bits"),
        ({"w_bits": 4.0}, "w_bits"),
        ({"first_layer_bits": 16}, "first_layer_bits"),
        ({"a_observer": "kl"}, "a_observer"),
        ({"percentile": -1.0}, "percentile"),
        ({"skip": "fc1"}, "skip"),
    ],
)
def test_quant_config_rejects(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        QuantConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"theta": -0.1}, "theta"),
        ({"strategy": "smallest"}, "strategy"),
        ({"param_budget": 2.0}, "param_budget"),
        ({"metric": "l1"}, "metric"),
    ],
)
def test_select_rejects(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Select(**kwargs)


def test_skip_matches_globs_and_kinds():
    config = QuantConfig(skip=("head.*", "matmul"))
    assert config.skips("head.fc", "linear")
    assert config.skips("blocks.0.matmul", "matmul")
    assert not config.skips("blocks.0.fc1", "linear")
