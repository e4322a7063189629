"""Selection strategies: which layers PTQAT fine-tunes, one small class per rule, registered
by name (``Select(strategy=name)``).

A strategy orders the layers (best candidates first) and says whether ``theta`` applies to
it; the pass ``passes.select`` then cuts the order by ``theta``, ``param_budget`` or
``fraction``. ``all`` and ``none`` choose outright. Adding a strategy is one class here and
one test.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, ClassVar

from .errors import ConfigError
from .layer_spec import LayerSpec

if TYPE_CHECKING:
    from .config import Select


class Strategy:
    """Base class: rank by discrepancy ascending (ties by graph order)."""

    name: ClassVar[str]
    ranks_by_discrepancy: ClassVar[bool] = True

    def order(self, specs: list[LayerSpec], select: Select, key: str) -> list[LayerSpec]:
        """The layers, best candidates first."""
        return sorted(specs, key=lambda s: (s.discrepancy[key], s.index))

    def passes_theta(self, value: float, theta: float) -> bool | None:
        """Whether a layer of discrepancy ``value`` is chosen under ``theta``; None when
        ``theta`` does not apply to this strategy (the cut falls back to the fraction)."""
        return None

    def choose(self, specs: list[LayerSpec]) -> list[LayerSpec] | None:
        """The chosen layers outright, or None to rank and cut."""
        return None


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available as ``Select(strategy=cls.name)``."""
    STRATEGIES[cls.name] = cls()
    return cls


def require_discrepancy(specs: list[LayerSpec], select: Select, key: str) -> None:
    """ConfigError naming the layers that lack the discrepancy ``key`` a strategy ranks by."""
    missing = [s.name for s in specs if key not in s.discrepancy]
    if missing:
        raise ConfigError(
            f"Select(strategy={select.strategy!r}) ranks by discrepancy {key!r}, which layers "
            f"{missing[:3]} lack; run the discrepancy pass with mode {select.mode!r} first"
        )


@register_strategy
class Small(Strategy):
    """PTQAT: the layers with the smallest discrepancy."""

    name = "small"

    def passes_theta(self, value: float, theta: float) -> bool | None:
        return value < theta


@register_strategy
class Large(Strategy):
    """Ablation: the layers with the largest discrepancy."""

    name = "large"

    def order(self, specs: list[LayerSpec], select: Select, key: str) -> list[LayerSpec]:
        return sorted(specs, key=lambda s: (-s.discrepancy[key], s.index))

    def passes_theta(self, value: float, theta: float) -> bool | None:
        return value > theta


@register_strategy
class Random(Strategy):
    """Ablation: a random order drawn from ``Select.seed``."""

    name = "random"
    ranks_by_discrepancy = False

    def order(self, specs: list[LayerSpec], select: Select, key: str) -> list[LayerSpec]:
        order = list(specs)
        random.Random(select.seed).shuffle(order)
        return order


@register_strategy
class Fewest(Strategy):
    """Ablation: the layers with the fewest parameters first (ties by graph order), so a
    ``param_budget`` trains as many layers as it can; needs no discrepancy."""

    name = "fewest"
    ranks_by_discrepancy = False

    def order(self, specs: list[LayerSpec], select: Select, key: str) -> list[LayerSpec]:
        return sorted(specs, key=lambda s: (s.params, s.index))


@register_strategy
class All(Strategy):
    """Full QAT: every layer."""

    name = "all"
    ranks_by_discrepancy = False

    def choose(self, specs: list[LayerSpec]) -> list[LayerSpec] | None:
        return list(specs)


@register_strategy
class Nothing(Strategy):
    """Pure PTQ: no layer."""

    name = "none"
    ranks_by_discrepancy = False

    def choose(self, specs: list[LayerSpec]) -> list[LayerSpec] | None:
        return []
