"""Vectorised MSE clip search against the observer's sequential search, and the zero-range step."""
from __future__ import annotations

import importlib

import pytest
import torch

from ptqat_fx.runtime import lsq_kernels
from ptqat_fx.runtime.mse_search import mse_channel_clip, zero_range_steps


def _observer_class():
    for name in ("ptqat_fx.runtime.observer", "ptqat_fx.observer"):
        try:
            return importlib.import_module(name).RangeObserver
        except (ImportError, AttributeError):
            continue
    raise ImportError("no ptqat_fx RangeObserver")


RangeObserver = _observer_class()


@pytest.mark.parametrize("shape,qmax,budget", [
    ((16, 3, 5, 5), 7, None),          # conv weight, one block
    ((40, 96), 7, 96 * 7),             # forces blocks over candidates and over channels
    ((9, 50), 127, 50 * 100 * 3),      # 8-bit, channel blocks of 3
    ((1, 300), 3, None),               # one channel, 3-bit
])
def test_same_clips_as_the_observer(shape, qmax, budget):
    generator = torch.Generator().manual_seed(sum(shape) + qmax)
    spread = torch.rand(shape[0], generator=generator).reshape(-1, *([1] * (len(shape) - 1)))
    weight = torch.randn(shape, generator=generator) * spread
    weight[-1] = 0 if shape[0] > 1 else weight[-1]  # a zero channel where there are several
    observer = RangeObserver("mse", qmax, 0)
    observer.update(weight)
    expected = observer._channel_clip()
    got = mse_channel_clip(observer.latest, observer.abs_max, qmax, max_elements=budget)
    assert torch.equal(got, expected)
    assert (got < observer.abs_max).any(), "the search must clip some channel below its range"


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
