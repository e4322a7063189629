"""QuantConfig and Select: the user's choices, validated on construction."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

from .errors import ConfigError
from .runtime.observer import OBSERVERS
from .strategies import STRATEGIES
MODES = ("local", "accumulated")
METRICS = ("euclidean", "relative", "mse", "cosine")


def _check_bits(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= 8:
        raise ConfigError(f"QuantConfig.{name}={value!r}: bits must be an int in 2..8")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize.

    Weights are quantized per output channel, symmetric, to ``w_bits``; activations (the
    inputs of every quantizable layer) per tensor to ``a_bits``, symmetric, or unsigned where
    the input is provably non-negative (after ReLU, sigmoid, softmax...) and
    ``unsigned_activations`` is on.

    Args:
        w_bits: weight bit width, 2..8.
        a_bits: activation bit width, 2..8.
        w_observer / a_observer: how calibration sets the initial scales: ``minmax``
            (absolute maximum), ``percentile`` (the ``percentile`` of |x|) or ``mse``
            (the clipping that minimises the quantization MSE; matters at 4 bits) or
            ``lsq`` (the LSQ paper's ``2 * mean|x| / sqrt(qmax)``).
        percentile: used by the percentile observer, in (0, 100].
        skip: module paths or glob patterns (``"head.*"``) of layers left in float,
            or layer kinds (``"linear"``, ``"conv2d"``, ``"matmul"``...).
        first_layer_bits / last_layer_bits: weight and activation bits of the first and last
            quantizable layer (in graph order); ``None`` means the same as the rest. Many
            deployments keep them at 8 bits.
        unsigned_activations: use the unsigned range for provably non-negative inputs. Off by
            default because TensorRT's explicit quantization takes signed INT8 only.
        fold_bn: fold BatchNorm into the preceding convolution, as deploy engines do.
        share_join_quantizers: give every add and concat of activations one input quantizer
            shared by all its inputs (``passes.quantize_joins``): TensorRT concatenates in
            INT8 without a reformat only when the inputs share one scale, and fuses a
            residual add into the preceding conv when the other input is INT8.
    """

    w_bits: int = 4
    a_bits: int = 8
    # Any name registered in runtime.observer.OBSERVERS.
    w_observer: str = "mse"
    a_observer: str = "mse"
    percentile: float = 99.99
    skip: tuple[str, ...] = ()
    first_layer_bits: int | None = None
    last_layer_bits: int | None = None
    unsigned_activations: bool = False
    fold_bn: bool = True
    share_join_quantizers: bool = False

    def __post_init__(self) -> None:
        _check_bits("w_bits", self.w_bits)
        _check_bits("a_bits", self.a_bits)
        for name in ("first_layer_bits", "last_layer_bits"):
            value = getattr(self, name)
            if value is not None:
                _check_bits(name, value)
        for name in ("w_observer", "a_observer"):
            if getattr(self, name) not in OBSERVERS:
                raise ConfigError(
                    f"QuantConfig.{name}={getattr(self, name)!r}: unknown observer; "
                    f"choose one of {tuple(OBSERVERS)}"
                )
        if not isinstance(self.percentile, (int, float)) or not 0 < self.percentile <= 100:
            raise ConfigError(
                f"QuantConfig.percentile={self.percentile!r}: must be a number in (0, 100]"
            )
        if isinstance(self.skip, str):
            raise ConfigError(
                f"QuantConfig.skip={self.skip!r}: give a tuple of patterns, e.g. ({self.skip!r},)"
            )
        object.__setattr__(self, "skip", tuple(self.skip))

    def skips(self, module_path: str, kind: str) -> bool:
        """Whether a layer at ``module_path`` of ``kind`` is left in float."""
        return any(
            pattern == kind or fnmatch.fnmatchcase(module_path, pattern) for pattern in self.skip
        )


@dataclass(frozen=True)
class Select:
    """Which layers PTQAT fine-tunes.

    Args:
        strategy: ``small`` (PTQAT: lowest discrepancy first), ``large`` (highest first, for
            ablation), ``random`` (seeded), ``all`` (full QAT), ``none`` (pure PTQ).
        fraction: share of quantizable layers to train, in (0, 1]; ``floor(fraction * N)``
            layers (at least one) are selected. Ignored when ``theta`` or ``param_budget``
            is given.
        theta: select layers whose discrepancy is below (``small``) or above (``large``)
            this threshold.
        param_budget: select layers in order until this share of the quantizable
            parameters, in (0, 1], would be exceeded.
        mode / metric: the discrepancy to rank by (see ``passes.discrepancy``).
        seed: for ``random``.
        train_other_params: also train parameters outside quantizable layers (norms,
            embeddings); they are frozen by default.
    """

    strategy: str = "small"  # any name registered in strategies.STRATEGIES
    fraction: float | None = 0.5
    theta: float | None = None
    param_budget: float | None = None
    mode: Literal["local", "accumulated"] = "accumulated"
    metric: Literal["euclidean", "relative", "mse", "cosine"] = "relative"
    seed: int = 0
    train_other_params: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"Select.strategy={self.strategy!r}: unknown strategy; choose one of {tuple(STRATEGIES)}"
            )
        for name in ("fraction", "theta", "param_budget"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"Select.{name}={value!r}: must be a number (or None), e.g. {name}=0.5")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ConfigError(f"Select.fraction={self.fraction!r}: must be in (0, 1]")
        if self.theta is not None and not self.theta >= 0:
            raise ConfigError(f"Select.theta={self.theta!r}: must be >= 0")
        if self.param_budget is not None and not 0 < self.param_budget <= 1:
            raise ConfigError(f"Select.param_budget={self.param_budget!r}: must be in (0, 1]")
        if self.mode not in MODES:
            raise ConfigError(f"Select.mode={self.mode!r}: choose one of {MODES}")
        if self.metric not in METRICS:
            raise ConfigError(f"Select.metric={self.metric!r}: choose one of {METRICS}")
