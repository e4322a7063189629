"""The example models, quantized once per process and shared by the lowering tests."""
from __future__ import annotations

import copy
import functools

import torch
from torch import fx

import ptqat_fx
from examples import mlp, resnet_small, vit_small

EXAMPLES = {
    "mlp": (mlp.build, (8, 784)),
    "resnet": (resnet_small.build, (8, 3, 16, 16)),
    "vit": (vit_small.build, (8, 1, 28, 28)),
}


def example_input(name: str, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(EXAMPLES[name][1], generator=generator)


@functools.cache
def _quantized(name: str, w_bits: int, a_bits: int, select: ptqat_fx.Select | None) -> fx.GraphModule:
    build, _ = EXAMPLES[name]
    calibration = [example_input(name, seed) for seed in (2, 3)]
    # minmax: the lowering tests need calibrated scales, not the best ones (MSE search is slow).
    config = ptqat_fx.QuantConfig(w_bits=w_bits, a_bits=a_bits, w_observer="minmax", a_observer="minmax")
    return ptqat_fx.quantize(build(), (calibration[0],), calibration, config, select, progress=False).eval()


def quantized(name: str, w_bits: int, a_bits: int = 8, select: ptqat_fx.Select | None = None) -> fx.GraphModule:
    """A calibrated copy of example ``name`` in eval mode (the caller may change it): plain
    fake-quant, or with ``select`` the PTQAT model (selected layers fused, the rest frozen)."""
    return copy.deepcopy(_quantized(name, w_bits, a_bits, select))
