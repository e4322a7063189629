"""integer_gemm: converted linear layers as int8 x int8 -> int32 GEMMs, checked against the
exact (float64) value of the converted layer's formula and against the converted model."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import ptqat_fx
from ptqat_fx.passes.integer_gemm import integer_gemm
from ptqat_fx.runtime.integer_gemm import integer_linear
from tests.export.quantized_examples import example_input, quantized


def _linears(gm) -> list:
    return [node for node in gm.graph.nodes if node.op == "call_function" and node.target is F.linear]


def _integer_calls(gm) -> list:
    return [node for node in gm.graph.nodes if node.op == "call_function" and node.target is integer_linear]


def test_integer_linear_is_the_exact_product_rounded_once():
    generator = torch.Generator().manual_seed(0)
    q_x = torch.randint(-128, 128, (3, 40, 64), generator=generator, dtype=torch.int8)
    q_w = torch.randint(-128, 128, (24, 64), generator=generator, dtype=torch.int8)
    s_x, s_w = torch.tensor(0.037), torch.rand(24, 1, generator=generator) * 0.01
    bias = torch.randn(24, generator=generator)
    exact = (q_x.double() @ q_w.double().t()) * (s_x.double() * s_w.double().reshape(-1)) + bias.double()
    got = integer_linear(q_x, s_x, q_w, s_w, bias)
    assert got.dtype == torch.float32 and got.shape == (3, 40, 24)
    # Three float32 roundings (scale product, product, bias add) from the exact value.
    assert torch.allclose(got.double(), exact, rtol=4e-7, atol=4e-7 * float(exact.abs().max()))
    simulated = F.linear(q_x.float() * s_x, q_w.float() * s_w, bias)
    assert (got.double() - exact).abs().max() <= (simulated.double() - exact).abs().max() + 1e-6


def test_every_linear_of_the_examples_is_rewritten_and_agrees_with_convert():
    for name in ("mlp", "vit"):
        converted = ptqat_fx.convert(quantized(name, 8))
        x = example_input(name, seed=4)
        expected = converted(x)
        linears = len(_linears(converted))
        fast = integer_gemm(converted)
        assert len(_linears(fast)) == 0 and len(_integer_calls(fast)) == linears
        got = fast(x)
        scale = float(expected.abs().max())
        assert torch.allclose(got, expected, rtol=0, atol=1e-5 * scale), name


def test_unsigned_inputs_and_packed_weights_are_left_in_float():
    x = torch.randn(8, 784)
    from examples import mlp

    config = ptqat_fx.QuantConfig(w_bits=8, w_observer="minmax", a_observer="minmax", unsigned_activations=True)
    qmodel = ptqat_fx.quantize(mlp.build(), (x,), [x], config, progress=False).eval()
    fast = integer_gemm(ptqat_fx.convert(qmodel))
    # fc1 reads the signed raw input; fc2 and fc3 read ReLU outputs, quantized unsigned.
    assert len(_integer_calls(fast)) == 1 and len(_linears(fast)) == 2
    packed = integer_gemm(ptqat_fx.convert(quantized("mlp", 4), pack_int4_weights=True))
    assert len(_integer_calls(packed)) == 0
