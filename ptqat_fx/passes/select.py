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
import random

from torch import fx

from ..config import Select
from ..errors import ConfigError
from ..layer_spec import LayerSpec, layer_specs
from ..meta import DiscrepancyKey, set_selection


def _ranked(specs: list[LayerSpec], select: Select, key: str) -> list[LayerSpec]:
    if select.strategy == "random":
        order = list(specs)
        random.Random(select.seed).shuffle(order)
        return order
    missing = [s.name for s in specs if key not in s.discrepancy]
    if missing:
        raise ConfigError(
            f"Select(strategy={select.strategy!r}) ranks by discrepancy {key!r}, which layers "
            f"{missing[:3]} lack; run the discrepancy pass with mode {select.mode!r} first"
        )
    descending = select.strategy == "large"
    return sorted(specs, key=lambda s: (-s.discrepancy[key] if descending else s.discrepancy[key], s.index))


def _cut(ranked: list[LayerSpec], select: Select, key: str) -> list[LayerSpec]:
    if select.theta is not None and select.strategy in ("small", "large"):
        if select.strategy == "small":
            return [s for s in ranked if s.discrepancy[key] < select.theta]
        return [s for s in ranked if s.discrepancy[key] > select.theta]
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
    """Set ``LayerSpec.selected`` on every annotated layer of ``gm``; returns ``gm``.

    The rule is recorded in ``gm.meta["ptqat_select"]``.

    Raises:
        ConfigError: ``small``/``large`` without the discrepancy they rank by.
    """
    select = select or Select()
    specs = layer_specs(gm)
    key = str(DiscrepancyKey(select.mode, select.metric))
    if select.strategy == "all":
        chosen = specs
    elif select.strategy == "none" or not specs:
        chosen = []
    else:
        chosen = _cut(_ranked(specs, select, key), select, key)
    chosen_names = {s.name for s in chosen}
    for spec in specs:
        spec.selected = spec.name in chosen_names
    set_selection(gm, select)
    return gm
