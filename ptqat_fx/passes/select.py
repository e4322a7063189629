"""Selection: which layers PTQAT fine-tunes.

PTQAT trains the layers whose discrepancy is SMALL: there fine-tuning best compensates the
error that propagates through the network. ``large``, ``random``, ``all`` (full QAT) and
``none`` (pure PTQ) exist for ablations. The cut is a threshold ``theta``, a ``fraction`` of
the layers (``max(1, floor(fraction * N))`` layers, so 0.5 of 9 layers selects 4), or a
``param_budget``: layers are taken in order while the selected share of quantizable
parameters stays within the budget. Ties in discrepancy are broken by graph order, and
``random`` draws from a generator seeded by ``Select.seed``: the same inputs always give the
same selection.
"""
from __future__ import annotations

import math

from torch import fx

from ..config import Select
from ..layer_spec import LayerSpec, layer_specs
from ..meta import DiscrepancyKey, set_selection
from ..strategies import STRATEGIES, Strategy, require_discrepancy


def _cut(ranked: list[LayerSpec], select: Select, strategy: Strategy, key: str) -> list[LayerSpec]:
    if select.theta is not None and strategy.passes_theta(0.0, select.theta) is not None:
        return [s for s in ranked if strategy.passes_theta(s.discrepancy[key], select.theta)]
    if select.param_budget is not None:
        budget = select.param_budget * sum(s.params for s in ranked)
        chosen, used = [], 0
        for spec in ranked:
            if used + spec.params > budget:
                break
            chosen.append(spec)
            used += spec.params
        return chosen
    fraction = 0.5 if select.fraction is None else select.fraction
    return ranked[: max(1, math.floor(fraction * len(ranked) + 1e-9))]


def select_layers(gm: fx.GraphModule, select: Select | None = None) -> fx.GraphModule:
    """Set ``LayerSpec.selected`` on every annotated layer of ``gm`` by the strategy
    ``select.strategy`` names (``strategies.STRATEGIES``); returns ``gm``.

    The rule is recorded in ``gm.meta`` (``meta.selection``).

    Raises:
        ConfigError: a strategy that ranks by discrepancy, without it.
    """
    select = select or Select()
    specs = layer_specs(gm)
    key = str(DiscrepancyKey(select.mode, select.metric))
    strategy = STRATEGIES[select.strategy]
    chosen = strategy.choose(specs)
    if chosen is None and not specs:
        chosen = []
    elif chosen is None:
        if strategy.ranks_by_discrepancy:
            require_discrepancy(specs, select, key)
        chosen = _cut(strategy.order(specs, select, key), select, strategy, key)
    chosen_names = {s.name for s in chosen}
    for spec in specs:
        spec.selected = spec.name in chosen_names
    set_selection(gm, select)
    return gm
