"""Vectorised MSE clip search against the observer's former sequential search (kept here only,
as the reference), and the zero-range step."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqat_fx
from examples import resnet_small
from ptqat_fx.runtime import lsq_kernels
from ptqat_fx.runtime.mse_search import mse_channel_clip, zero_range_steps
from ptqat_fx.runtime.observer import RangeObserver


def sequential_mse_clip(values: torch.Tensor, abs_max: torch.Tensor, qmax: int) -> torch.Tensor:
    """The observer's search before vectorisation, verbatim: 100 candidates one after another,
    the first of strictly least error kept per channel."""
    ratios = torch.linspace(1.0 / 100, 1.0, 100).tolist()
    best_error = torch.full_like(abs_max, float("inf"))
    best_clip = abs_max.clone()
    for clip in [abs_max * ratio for ratio in ratios]:
        step = clip.clamp_min(1e-30)[:, None] / qmax
        error = (values - (values / step).round().clamp(max=qmax) * step).square().sum(1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_clip = torch.where(better, clip, best_clip)
    return best_clip


@pytest.mark.parametrize("shape,qmax,budget", [
    ((16, 3, 5, 5), 7, None),          # conv weight, one block
    ((40, 96), 7, 96 * 7),             # forces blocks over candidates and over channels
    ((9, 50), 127, 50 * 100 * 3),      # 8-bit, channel blocks of 3
    ((1, 300), 3, None),               # one channel, 3-bit
    ((12, 1), 7, None),                # one element per channel: exact on the grid
    ((32, 4096), 7, None),             # a wide fan-in, many near-equal candidates
    ((24, 4608), 127, 4608 * 3),       # 8-bit over a wide fan-in: 25401 bins per channel
])
def test_same_clips_as_the_observer(shape, qmax, budget):
    generator = torch.Generator().manual_seed(sum(shape) + qmax)
    spread = torch.rand(shape[0], generator=generator).reshape(-1, *([1] * (len(shape) - 1)))
    weight = torch.randn(shape, generator=generator) * spread
    weight[-1] = 0 if shape[0] > 1 else weight[-1]  # a zero channel where there are several
    magnitudes = weight.abs().flatten(1)
    abs_max = magnitudes.amax(1)
    expected = sequential_mse_clip(magnitudes, abs_max, qmax)
    got = mse_channel_clip(magnitudes, abs_max, qmax, max_elements=budget)
    assert torch.equal(got, expected)
    if magnitudes.shape[1] > 1:  # a lone element is best at its own magnitude
        assert (got < abs_max).any(), "the search must clip some channel below its range"


def test_calibrated_weight_steps_of_a_quantized_model_equal_the_sequential_search():
    data = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    config = ptqat_fx.QuantConfig(w_bits=4, a_bits=8, w_observer="mse")
    gm = ptqat_fx.quantize(resnet_small.build(), (data[0],), data, config, select=None, progress=False)
    checked = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.target.endswith("weight_fake_quant"):
            continue
        quantizer = gm.get_submodule(node.target)
        weight = gm.get_parameter(node.args[0].target).detach()  # the (BN-folded) weight it saw
        magnitudes = weight.abs().transpose(0, quantizer.channel_axis).flatten(1)
        expected = sequential_mse_clip(magnitudes, magnitudes.amax(1), quantizer.qmax) / quantizer.qmax
        assert torch.equal(quantizer.scale.detach(), expected), node.target
        checked += 1
    assert checked == 10  # every conv and the classifier of the small ResNet


def test_a_zero_initialised_head_passes_gradient_upstream_after_quantize():
    """torchvision ViT's head is zero-initialised: at W4 with step 1.0 its quantized weight
    stays 0 and no gradient reaches the layers before it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    data = [torch.randn(8, 16) for _ in range(2)]
    gm = ptqat_fx.quantize(model, (data[0],), data, ptqat_fx.QuantConfig(w_bits=4, a_bits=8), select=None,
                           progress=False)
    step = gm.get_submodule("2.weight_fake_quant").scale.detach()
    assert torch.allclose(step, torch.full((10,), 0.5 / 32**0.5 / 7))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.5)
    labels = torch.randint(0, 10, (8,))
    for _ in range(3):  # the head's first update moves its latent weight across half a step
        optimizer.zero_grad()
        nn.functional.cross_entropy(gm(data[0]), labels).backward()
        optimizer.step()
    assert gm.get_parameter("0.weight").grad.abs().sum() > 0


def test_heavy_tailed_weights():
    """A few large magnitudes per channel: the best clips lie far below the range."""
    torch.manual_seed(5)
    values = torch.distributions.StudentT(2.0).sample((64, 1024)).abs()
    values[:, :3] *= 50
    abs_max = values.amax(1)
    for qmax in (3, 7, 127):
        assert torch.equal(mse_channel_clip(values, abs_max, qmax), sequential_mse_clip(values, abs_max, qmax))


def test_uniform_and_lattice_weights_where_candidates_nearly_tie():
    """Values on a quantization grid and uniform values: many candidates' errors are close,
    so the screening must keep every one the float32 loop could prefer."""
    generator = torch.Generator().manual_seed(3)
    lattice = (torch.randint(0, 8, (20, 64), generator=generator).float() * 0.125)
    uniform = torch.rand(20, 64, generator=generator)
    for values in (lattice, uniform, torch.cat([lattice, uniform], 1)):
        abs_max = values.amax(1)
        assert torch.equal(mse_channel_clip(values, abs_max, 7), sequential_mse_clip(values, abs_max, 7))


def test_non_finite_channels_take_the_loop_path():
    values = torch.rand(3, 10)
    values[1, 2] = float("inf")
    values[2, 0] = float("nan")
    abs_max = values.amax(1)
    got, expected = mse_channel_clip(values, abs_max, 7), sequential_mse_clip(values, abs_max, 7)
    assert torch.equal(got[:2], expected[:2]) and got[2].isnan() and expected[2].isnan()


def test_rejects_misshaped_input():
    with pytest.raises(ValueError, match="channels"):
        mse_channel_clip(torch.rand(4, 5), torch.rand(5), 7)


def test_zero_range_steps_from_fan_in():
    steps = torch.tensor([0.1, 0.0, 0.3])
    out = zero_range_steps(steps, fan_in=768, qmax=7)
    assert out[0] == steps[0] and out[2] == steps[2]
    assert out[1].item() == pytest.approx(0.5 / 768**0.5 / 7)


def test_zero_initialised_head_learns_with_the_fan_in_step_and_not_with_one():
    """A zero head (torchvision ViT's) fake-quantized at 4 bits: with step 1.0 its quantized
    weight stays 0 and passes no gradient upstream; with the fan-in step it starts to."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(32, 64, generator=generator)
    labels = torch.randint(0, 10, (32,), generator=generator)
    upstream = {}
    for name, step in (("one", torch.ones(10)), ("fan_in", zero_range_steps(torch.zeros(10), 64, 7))):
        head = torch.zeros(10, 64, requires_grad=True)
        scale = step.clone().requires_grad_()
        optimizer = torch.optim.SGD([head, scale], lr=0.5)
        for _ in range(5):
            x = features.clone().requires_grad_()
            logits = x @ lsq_kernels.lsq_fake_quantize(head, scale, -8, 7, 0).t()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(logits, labels).backward()
            optimizer.step()
        upstream[name] = x.grad.abs().sum().item()
    assert upstream["one"] == 0.0
    assert upstream["fan_in"] > 0.0
