"""convert(arithmetic="engine"): integer accumulation and int32 biases, against a float64
recomputation from the quantizers' own steps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptqat_fx
from tests.export.quantized_examples import EXAMPLES, example_input, quantized


def _integers(x: torch.Tensor, quantizer) -> torch.Tensor:
    step = quantizer.scale.detach().double().reshape(-1, *([1] * (x.dim() - 1))) if quantizer.channel_axis == 0 \
        else quantizer.scale.detach().double()
    return torch.round(torch.clamp(x.double() / step, quantizer.qmin, quantizer.qmax))


@pytest.mark.parametrize("w_bits", [8, 4])
def test_conv_accumulates_integers_and_adds_its_int32_bias(w_bits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    config = ptqat_fx.QuantConfig(w_bits=w_bits, a_bits=8, w_observer="minmax", a_observer="minmax")
    qmodel = ptqat_fx.quantize(model, (x,), [x], config, progress=False).eval()
    (input_path, input_q), = [(p, q) for p, q in ptqat_fx.runtime.quantizer.quantizers(qmodel).items() if q.channel_axis is None]
    weight_q = qmodel.get_submodule("0.weight_fake_quant")
    q_x, q_w = _integers(x, input_q), _integers(model[0].weight.detach(), weight_q)
    step = input_q.scale.detach().double() * weight_q.scale.detach().double().reshape(-1)
    bias = torch.round(model[0].bias.detach().double() / step)
    expected = F.conv2d(q_x, q_w) * step.reshape(1, -1, 1, 1) + (bias * step).reshape(1, -1, 1, 1)

    engine = ptqat_fx.convert(qmodel, arithmetic="engine")
    assert torch.equal(engine.get_buffer("0.bias_int32").reshape(-1).double(), bias)
    with torch.no_grad():
        got = engine(x).double()
    # float32 scale products and adds against float64: a few ulps.
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got.float(), ptqat_fx.convert(qmodel)(x).detach())  # the modes differ


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_engine_mode_keeps_the_fake_quant_decisions(name):
    """The modes differ where an activation sits within float noise of a rounding tie (each
    flip moves the outputs it reaches by a step or a few); the decisions stay."""
    from ptqat_fx.export.verify import output_step, step_agreement

    qmodel = quantized(name, 8)
    x = example_input(name, seed=4)
    with torch.no_grad():
        fake, engine = qmodel(x), ptqat_fx.convert(qmodel, arithmetic="engine")(x)
    found = step_agreement(engine.numpy(), fake.numpy(), output_step(qmodel))
    assert found.argmax_changed == 0.0, found


def test_unknown_arithmetic_is_refused():
    with pytest.raises(ptqat_fx.InputError, match="arithmetic='int'"):
        ptqat_fx.convert(quantized("mlp", 8), arithmetic="int")


def test_a_layer_called_three_times_gets_one_int32_bias_per_call():
    torch.manual_seed(0)

    class Thrice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.refine = nn.Linear(8, 8)

        def forward(self, x):
            for _ in range(3):
                x = torch.relu(self.refine(x))
            return x

    x = torch.randn(4, 8)
    config = ptqat_fx.QuantConfig(w_bits=8, a_bits=8, w_observer="minmax", a_observer="minmax")
    qmodel = ptqat_fx.quantize(Thrice().eval(), (x,), [x], config, progress=False).eval()
    engine = ptqat_fx.convert(qmodel, arithmetic="engine")
    biases = sorted(name for name, _ in engine.named_buffers() if "bias_int32" in name and not name.endswith("scale"))
    assert biases == ["refine.bias_int32", "refine.bias_int32_1", "refine.bias_int32_2"]
    with torch.no_grad():
        assert torch.isfinite(engine(x)).all()


class _Attention(nn.Module):
    """``softmax(q @ k^T) @ v`` of one head: both matmuls multiply two activations."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def test_a_matmul_of_two_activations_accumulates_their_integers_and_is_scaled_once():
    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(2, 5, 8)
    config = ptqat_fx.QuantConfig(w_bits=8, a_bits=8, w_observer="minmax", a_observer="minmax")
    qmodel = ptqat_fx.quantize(model, (x,), [x], config, progress=False).eval()
    engine = ptqat_fx.convert(qmodel, arithmetic="engine")
    products = [node.meta["ptqat_convert"]["integer_matmul"] for node in engine.graph.nodes
                if "integer_matmul" in node.meta.get("ptqat_convert", {})]
    assert len(products) == 2, products

    # The last product, recomputed from its operands' integers in float64.
    recorded: dict[str, torch.Tensor] = {}
    quantizers = ptqat_fx.runtime.quantizer.quantizers(qmodel)
    last = [n for n in qmodel.graph.nodes if n.op == "call_function" and n.target.__name__ == "matmul"][-1]
    handles = [qmodel.get_submodule(source.target).register_forward_hook(
        lambda module, args, out, name=source.target: recorded.__setitem__(name, args[0].detach()))
        for source in last.args]
    with torch.no_grad():
        qmodel(x)
    for handle in handles:
        handle.remove()
    (a_name, b_name) = (source.target for source in last.args)
    q_a, q_b = _integers(recorded[a_name], quantizers[a_name]), _integers(recorded[b_name], quantizers[b_name])
    expected = (q_a @ q_b) * (quantizers[a_name].scale.double() * quantizers[b_name].scale.double())
    with torch.no_grad():
        got = engine(x).double()
    torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-7)
