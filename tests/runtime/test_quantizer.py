"""FakeQuantizer against torch's own fake-quant ops and a float64 LSQ gradient."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptqat_fx.runtime.quantizer import FakeQuantizer, lsq_fake_quantize, quant_range

shapes = st.lists(st.integers(1, 6), min_size=2, max_size=4)


def _calibrated(x: torch.Tensor, bits: int, axis: int | None, observer: str = "minmax") -> FakeQuantizer:
    q = FakeQuantizer(bits, channel_axis=axis, channels=x.shape[axis] if axis is not None else 1, observer=observer)
    q(x)
    q.finish_calibration()
    return q


@settings(max_examples=25, deadline=None)
@given(shape=shapes, bits=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**16), spread=st.floats(0.01, 100.0))
def test_per_tensor_matches_torch_fake_quantize(shape, bits, seed, spread):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * spread
    q = _calibrated(x, bits, None)
    qmin, qmax = quant_range(bits, True)
    expected = torch.fake_quantize_per_tensor_affine(x, q.scale.item(), 0, qmin, qmax)
    assert torch.equal(q(x), expected)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, bits=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**16))
def test_per_channel_matches_torch_fake_quantize(shape, bits, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    q = _calibrated(x, bits, 0, observer="mse")
    qmin, qmax = quant_range(bits, True)
    zero = torch.zeros(shape[0], dtype=torch.int32)
    expected = torch.fake_quantize_per_channel_affine(x, q.scale.detach(), zero, 0, qmin, qmax)
    assert torch.equal(q(x), expected)


def test_unsigned_range_matches_torch():
    x = torch.rand(64) * 5
    q = FakeQuantizer(4, signed=False, observer="minmax")
    q(x)
    q.finish_calibration()
    expected = torch.fake_quantize_per_tensor_affine(x, q.scale.item(), 0, 0, 15)
    assert torch.equal(q(x), expected)
    assert q.scale.item() == pytest.approx(5 * float(x.max()) / 5 / 15, rel=1e-6)


@pytest.mark.parametrize("axis", [None, 1])
def test_step_size_gradient_equals_lsq_formula_in_float64(axis):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5) * 2
    scale = torch.tensor([0.3, 0.2, 0.5] if axis is not None else [0.25], requires_grad=True)
    qmin, qmax = quant_range(4, True)
    grad_out = torch.randn(4, 3, 5)
    xr = x.clone().requires_grad_()
    lsq_fake_quantize(xr, scale, qmin, qmax, axis).backward(grad_out)

    # Reference: LSQ (Esser et al. 2020), eq. 3, recomputed in float64.
    x64, g64 = x.double(), grad_out.double()
    s64 = scale.detach().double().reshape((1, -1, 1) if axis is not None else ())
    v = x64 / s64
    inside = (v >= qmin) & (v <= qmax)
    d_step = torch.where(inside, torch.round(v) - v, v.clamp(qmin, qmax))
    per_step = x.numel() // scale.numel()
    g = 1 / math.sqrt(per_step * qmax)
    dims = (0, 2) if axis is not None else (0, 1, 2)
    expected_scale_grad = (g64 * d_step).sum(dim=dims).reshape(-1) * g
    assert torch.allclose(scale.grad.double(), expected_scale_grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(xr.grad, grad_out * inside.float())


def test_frozen_step_saves_only_a_mask():
    x = (torch.randn(8, 16) * 3).requires_grad_()
    scale = torch.tensor([0.1])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = lsq_fake_quantize(x, scale, -8, 7)
    assert [t.dtype for t in saved] == [torch.bool]
    out.sum().backward()
    inside = ((x / 0.1) >= -8) & ((x / 0.1) <= 7)
    assert torch.equal(x.grad, inside.float())


def test_bf16_autocast_keeps_dtype_and_values():
    x = torch.randn(4, 8)
    q = _calibrated(x, 8, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(x.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = torch.fake_quantize_per_tensor_affine(x.bfloat16().float(), q.scale.item(), 0, -128, 127)
    assert torch.allclose(out.float(), expected, rtol=1e-2, atol=q.scale.item())


def test_compiles_to_one_graph_without_breaks():
    x = torch.randn(4, 8)
    q = _calibrated(x, 4, None)
    explanation = torch._dynamo.explain(q)(x)
    assert explanation.graph_count == 1
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse", "lsq"])
def test_all_zero_input_gives_a_finite_positive_scale(observer):
    q = FakeQuantizer(4, observer=observer)
    q(torch.zeros(10))
    q.finish_calibration()
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    assert torch.equal(q(torch.zeros(10)), torch.zeros(10))


def test_all_zero_weight_channel_gives_a_finite_positive_scale():
    w = torch.randn(3, 4)
    w[1] = 0
    q = _calibrated(w, 4, 0, observer="mse")
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()


@pytest.mark.parametrize("channel_axis", [None, 0, 1])
@pytest.mark.parametrize("bits, signed", [(2, True), (4, True), (8, False)])
def test_compiled_form_matches_the_autograd_function_in_value_and_gradients(channel_axis, bits, signed):
    """The differentiable-ops form used under torch.compile: same bits forward, LSQ gradients."""
    from ptqat_fx.runtime.quantizer import lsq_fake_quantize, lsq_fake_quantize_ops, quant_range

    generator = torch.Generator().manual_seed(bits)
    qmin, qmax = quant_range(bits, signed)
    x = (torch.randn(6, 5, 4, generator=generator) * 3).requires_grad_()
    channels = 1 if channel_axis is None else x.shape[channel_axis]
    scale = (torch.rand(channels, generator=generator) * 0.5 + 0.1).requires_grad_()
    grad_out = torch.randn(6, 5, 4, generator=generator)
    outputs, gradients = [], []
    for form in (lsq_fake_quantize, lsq_fake_quantize_ops):
        out = form(x, scale, qmin, qmax, channel_axis)
        outputs.append(out.detach())
        gradients.append(torch.autograd.grad(out, (x, scale), grad_out))
    assert torch.equal(outputs[0], outputs[1])
    # x / s * s differentiates to 1 up to one rounding of the gradient.
    torch.testing.assert_close(gradients[1][0], gradients[0][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gradients[1][1], gradients[0][1], rtol=1e-5, atol=1e-6)
