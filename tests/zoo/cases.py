"""The zoo: every model with its inputs, and ``measure``, which quantizes one and reports
what the coverage table and the zoo tests check."""
from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import ptqat_fx
from ptqat_fx import QuantConfig
from ptqat_fx.coverage import coverage
from ptqat_fx.runtime.quantizer import quantizers

from tests.zoo import models
from tests.zoo.torchvision_zoo import builders, load_torchvision, randomize_zero_weights


@dataclass
class Case:
    """A zoo model: ``build()`` -> eval-mode model, ``inputs(seed)`` -> its positional inputs."""

    name: str
    family: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple]


@dataclass
class Row:
    """What ``measure`` found for one model."""

    name: str
    family: str
    traced_whole: bool
    auto_leaves: list[str]
    layers: int
    quantized: int
    w8a8_error: float
    w4a8_error: float
    unchanged: bool
    seconds: float
    report: str


def cases() -> list[Case]:
    """The hand-written idiom models, then torchvision's where it imports."""
    found = [Case(name, "idiom", lambda name=name: models.build(name), lambda seed, name=name: models.inputs(name, seed))
             for name in models.IDIOMS]
    torchvision = load_torchvision()
    if torchvision is not None:
        for name, (build, shape) in builders(torchvision).items():
            def built(build=build) -> nn.Module:
                torch.manual_seed(0)
                return randomize_zero_weights(build()).eval()

            def inputs(seed: int, shape=shape) -> tuple:
                return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)),)

            found.append(Case(name, "torchvision", built, inputs))
    return found


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def measure(case: Case, calib_batches: int = 2) -> Row:
    """Quantize ``case`` at W4A8 and W8A8 (calibrated on ``calib_batches`` batches) and
    compare with the float model on a held-out batch."""
    start = time.perf_counter()
    model = case.build()
    before = copy.deepcopy(model.state_dict())
    types_before = [type(m) for m in model.modules()]
    example, test = case.inputs(0), case.inputs(100)
    calib = [case.inputs(seed) for seed in range(1, calib_batches + 1)]
    with torch.no_grad():
        reference = model(*test)
    errors = {}
    for bits, observer in ((4, "mse"), (8, "minmax")):
        config = QuantConfig(w_bits=bits, a_bits=8, w_observer=observer, a_observer=observer)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gm = ptqat_fx.quantize(model, example, calib, config, progress=False)
        if not all(q.calibrated for q in quantizers(gm).values()):
            raise AssertionError(f"{case.name}: a quantizer was not calibrated")
        with torch.no_grad():
            errors[bits] = _relative_error(gm(*test), reference)
    after = model.state_dict()
    unchanged = (
        before.keys() == after.keys()
        and all(torch.equal(before[k], after[k]) for k in before)
        and types_before == [type(m) for m in model.modules()]
    )
    found = coverage(gm)
    return Row(
        case.name, case.family, found.traced_whole, [leaf.path for leaf in found.auto_leaves], found.layers,
        found.quantized, errors[8], errors[4], unchanged, time.perf_counter() - start, str(found),
    )
