"""select_layers against hand-built discrepancy tables."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ptqat_fx import ConfigError, Select
from ptqat_fx.layer_spec import LayerSpec, layer_specs
from ptqat_fx.meta import set_layer_spec
from ptqat_fx.passes.select import select_layers

# name: (discrepancy, params)
TABLE = {"a": (0.30, 100), "b": (0.10, 1000), "c": (0.20, 10), "d": (0.05, 500), "e": (0.40, 50)}


def _graph(table=TABLE) -> torch.fx.GraphModule:
    gm = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
    x = gm.graph.placeholder("x")
    for index, (name, (value, params)) in enumerate(table.items()):
        x = gm.graph.call_function(torch.relu, (x,))
        spec = LayerSpec(name, "linear", name, None, None, params, index)
        spec.discrepancy["accumulated.relative"] = value
        spec.discrepancy["local.euclidean"] = params
        set_layer_spec(x, spec)
    gm.graph.output(x)
    return gm


def _selected(select: Select, table=TABLE) -> list[str]:
    return [s.name for s in layer_specs(select_layers(_graph(table), select)) if s.selected]


@pytest.mark.parametrize(
    "select, expected",
    [
        (Select("small", fraction=0.4), ["b", "d"]),
        (Select("small", fraction=0.5), ["b", "d"]),  # floor(0.5 * 5) = 2
        (Select("small", fraction=0.6), ["b", "c", "d"]),
        (Select("large", fraction=0.4), ["a", "e"]),
        (Select("small", fraction=1.0), ["a", "b", "c", "d", "e"]),
        (Select("small", fraction=0.1), ["d"]),  # at least one layer
        (Select("small", theta=0.25), ["b", "c", "d"]),
        (Select("large", theta=0.25), ["a", "e"]),
        (Select("small", theta=0.01), []),
        (Select("small", theta=1.0), ["a", "b", "c", "d", "e"]),
        # order d(500), b(1000) -> 1500 > 0.5 * 1660: stop after d
        (Select("small", param_budget=0.5), ["d"]),
        # order e(50), a(100), c(10) -> 160 <= 0.1 * 1660; b would exceed
        (Select("large", param_budget=0.1), ["a", "c", "e"]),
        (Select("all"), ["a", "b", "c", "d", "e"]),
        (Select("none"), []),
        (Select("small", fraction=0.4, mode="local", metric="euclidean"), ["c", "e"]),
    ],
)
def test_strategy_and_cut(select, expected):
    assert _selected(select) == expected


def test_ties_break_by_graph_order():
    table = {"x": (0.1, 1), "y": (0.1, 1), "z": (0.1, 1), "w": (0.2, 1)}
    assert _selected(Select("small", fraction=0.5), table) == ["x", "y"]


def test_random_is_seeded_and_deterministic():
    first = _selected(Select("random", fraction=0.6, seed=3))
    assert len(first) == 3
    assert first == _selected(Select("random", fraction=0.6, seed=3))
    draws = {tuple(_selected(Select("random", fraction=0.6, seed=s))) for s in range(10)}
    assert len(draws) > 1


def test_small_without_discrepancy_is_a_clear_error():
    gm = _graph()
    for spec in layer_specs(gm):
        spec.discrepancy.clear()
    with pytest.raises(ConfigError, match="discrepancy"):
        select_layers(gm, Select("small"))


def test_fewest_takes_the_smallest_layers_first_and_needs_no_discrepancy():
    # TABLE's params: c 10, e 50, a 100, d 500, b 1660 in all; 10% of 1660 = 166 fits c, e, a.
    assert _selected(Select("fewest", param_budget=0.1)) == ["a", "c", "e"]
    bare = {name: (float("nan"), params) for name, (_, params) in TABLE.items()}
    assert _selected(Select("fewest", fraction=0.4), bare) == ["c", "e"]
