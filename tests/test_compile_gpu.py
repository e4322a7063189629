"""Compiled training computes the gradients eager training computes, on CUDA with inductor.

torch 2.11's compile once returned no weight gradient from the fused quantized layers (they
trusted ``ctx.needs_input_grad``), so a compiled PTQAT step trained nothing while its loss
matched eager. Each parameter's gradient after one step is compared with eager's; the
tolerance is what compilation alone changes in the float model of the same structure.
"""
from __future__ import annotations

import copy

import pytest
import torch

import ptqat_fx
from examples import resnet_small, vit_small

pytestmark = pytest.mark.gpu

MODELS = {
    "resnet": (resnet_small.build, (16, 3, 32, 32)),
    "vit": (vit_small.build, (16, 1, 28, 28)),
}


def _gradients(model: torch.nn.Module, x: torch.Tensor, compiled: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    run = torch.compile(model, fullgraph=True) if compiled else model
    run(x).square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def _relative_errors(eager: dict, compiled: dict) -> dict[str, float]:
    return {
        name: ((compiled[name] - grad).norm() / grad.norm().clamp_min(1e-12)).item()
        for name, grad in eager.items()
    }


@pytest.fixture(autouse=True)
def fresh_dynamo_without_tf32():
    """cuDNN convolutions use TF32 by default: its ~1e-3 noise flips near-tie roundings of
    the activation quantizers between eager and compiled runs, and a step-size gradient (a
    sum of ``round(v) - v`` terms that cancel) then moves by tens of percent. Full fp32 keeps
    the comparison about the compiler, not the arithmetic precision."""
    precision = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = precision


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("select", [ptqat_fx.Select("small", fraction=0.5), ptqat_fx.Select("all")], ids=["ptqat", "full_qat"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_gradients_equal_eager_gradients_on_cuda(name, select):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    float_model = build().cuda().train()
    x = torch.randn(shape, device="cuda")
    floor = _relative_errors(_gradients(float_model, x, False), _gradients(float_model, x, True))
    typical_floor = sorted(floor.values())[len(floor) // 2]

    def tolerance(name: str) -> float:
        # What compilation alone changes in the same tensor of the float model (a
        # key bias's gradient is ~0 in exact arithmetic, so its relative error is
        # large there too); step sizes have no float twin and take the median. The
        # quantized model also rounds near-ties differently: a factor of 10, at least 2e-3.
        return max(10 * floor.get(name, typical_floor), 2e-3)

    config = ptqat_fx.QuantConfig(w_bits=4, a_bits=8, w_observer="minmax", a_observer="minmax")
    calibration = [torch.randn(shape, device="cuda") for _ in range(2)]
    qmodel = ptqat_fx.quantize(copy.deepcopy(float_model), (x,), calibration, config, select, progress=False).train()
    eager = _gradients(qmodel, x, False)
    compiled = _gradients(qmodel, x, True)
    assert eager and eager.keys() == compiled.keys()
    largest = max(g.norm() for g in eager.values())
    zero = [n for n, g in compiled.items() if not g.abs().sum() and eager[n].norm() > 1e-6 * largest]
    assert not zero, f"compiled step gives zero gradient to {len(zero)} of {len(eager)} tensors: {zero[:5]}"
    errors = _relative_errors(eager, compiled)
    excess = {name: error / tolerance(name) for name, error in errors.items()}
    worst = max(excess, key=excess.get)
    assert excess[worst] <= 1, f"{worst}: relative gradient error {errors[worst]:.2e} > {tolerance(worst):.2e}"
