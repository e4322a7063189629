"""quantize_leaves: layers inside leaf modules and wrapped functions get quantizers whose
arithmetic matches torch's own fake-quant ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

import ptqat_fx
from ptqat_fx.coverage import coverage
from ptqat_fx.runtime.quantized_modules import QuantizedConvTranspose1d, QuantizedConvTranspose2d, QuantizedLinear
from ptqat_fx.runtime.opaque_call import OpaqueCall
from ptqat_fx.meta import auto_leaves, leaf_record
from ptqat_fx.passes.quantize_leaves import leaf_layer_specs

G = torch.Generator().manual_seed(0)
X = torch.randn(8, 4, generator=G)


def _reference_linear(x, linear, input_quantizer, weight_quantizer):
    """F.linear on torch.fake_quantize_* of the input (per tensor) and weight (per channel)."""
    x_q = torch.fake_quantize_per_tensor_affine(x, input_quantizer.scale.item(), 0, -128, 127)
    scales = weight_quantizer.scale.detach()
    w_q = torch.fake_quantize_per_channel_affine(
        linear.weight.detach(), scales, torch.zeros_like(scales, dtype=torch.int32), 0, -8, 7
    )
    return F.linear(x_q, w_q, linear.bias)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.unused_branch = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 1e6:
            return self.unused_branch(x)
        return self.fc(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gated()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gate(x))


def test_leaf_linear_matches_torch_fake_quant_and_keeps_parameter_paths():
    model = Net()
    gm = ptqat_fx.quantize(model, (X,), [X], progress=False)
    fc = gm.get_submodule("gate.fc")
    assert isinstance(fc, QuantizedLinear)
    expected = _reference_linear(X, model.gate.fc, fc.input_quantizer, fc.weight_fake_quant)
    torch.testing.assert_close(fc(X), expected)
    assert {"gate.fc.weight", "gate.fc.bias"} <= set(dict(gm.named_parameters()))
    assert torch.equal(gm.get_parameter("gate.fc.weight"), model.gate.fc.weight)


def test_layers_not_run_on_the_example_inputs_are_listed_in_float():
    gm = ptqat_fx.quantize(Net(), (X,), [X], progress=False)
    (leaf,) = auto_leaves(gm)
    assert leaf.quantized == ["gate.fc"]
    assert leaf.float_layers == ["gate.unused_branch (not called on the example inputs)"]
    node = next(n for n in gm.graph.nodes if n.target == "gate")
    assert leaf_record(node)["quantized"] == ["gate.fc"]
    assert coverage(gm).float_layers == ["gate.unused_branch"]
    assert [spec.name for spec in leaf_layer_specs(gm)] == ["gate.fc"]


def test_user_leaves_and_skip_patterns_apply_inside_leaves():
    config = ptqat_fx.QuantConfig(skip=("gate.fc",))
    gm = ptqat_fx.quantize(Net(), (X,), [X], config, leaf_modules=["gate"], progress=False)
    assert type(gm.get_submodule("gate.fc")) is nn.Linear
    assert gm.get_submodule("gate").__class__ is Gated
    assert "gate.fc" in coverage(gm).float_layers


class Upsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 3, 3, stride=2, padding=1)

    def forward(self, x):
        return self.up(x, output_size=[x.shape[2] * 2, x.shape[3] * 2])


def test_conv_transpose_called_with_output_size_is_quantized_as_a_module():
    x = torch.randn(2, 3, 5, 5, generator=G)
    model = Upsample()
    gm = ptqat_fx.quantize(model, (x,), [x], ptqat_fx.QuantConfig(w_bits=8), progress=False)
    assert isinstance(gm.get_submodule("up"), QuantizedConvTranspose2d)
    assert gm(x).shape == (2, 3, 10, 10)
    assert ((gm(x) - model(x)).norm() / model(x).norm()) < 0.03


def scaled_linear(x, weight, bias):
    return F.linear(x, weight, bias) * 2


fx.wrap("scaled_linear")


class UsesWrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return scaled_linear(x, self.fc.weight, bias=self.fc.bias)


def test_weights_passed_to_a_wrapped_function_are_quantized_with_their_inputs():
    model = UsesWrapped()
    gm = ptqat_fx.quantize(model, (X,), [X], progress=False)
    (region,) = [m for m in gm.modules() if isinstance(m, OpaqueCall)]
    expected = 2 * _reference_linear(X, model.fc, region.input_quantizers["1"], gm.get_submodule("fc.weight_fake_quant"))
    torch.testing.assert_close(gm(X), expected)
    assert [spec.name for spec in leaf_layer_specs(gm)] == ["fc"]
    assert coverage(gm).share == 1.0


class LeafFirstAndLast(nn.Module):
    """gate (an auto-leaf holding the first layer) -> relu -> mid -> relu -> tail (the last
    layer: a transposed conv called with ``output_size``, which the graph rewrite leaves to
    run as a module)."""

    def __init__(self):
        super().__init__()
        self.gate = Gated()
        self.mid = nn.Linear(4, 4)
        self.tail = nn.ConvTranspose1d(4, 2, 1)

    def forward(self, x):
        return self.tail(torch.relu(self.mid(torch.relu(self.gate(x))).unsqueeze(-1)), output_size=[1])


def test_layers_inside_leaves_follow_first_last_bits_and_unsigned_rules():
    config = ptqat_fx.QuantConfig(w_bits=4, a_bits=8, first_layer_bits=8, last_layer_bits=6, unsigned_activations=True)
    gm = ptqat_fx.quantize(LeafFirstAndLast(), (X,), [X], config, progress=False)
    first, tail = gm.get_submodule("gate.fc"), gm.get_submodule("tail")
    assert isinstance(first, QuantizedLinear) and isinstance(tail, QuantizedConvTranspose1d)
    # Written out: gate.fc is the first quantizable layer, tail the last, mid in between.
    assert (first.weight_fake_quant.bits, first.input_quantizer.bits) == (8, 8)
    assert (tail.weight_fake_quant.bits, tail.input_quantizer.bits) == (6, 6)
    assert (first.layer_spec.w_bits, tail.layer_spec.a_bits) == (8, 6)
    mid = next(s for s in ptqat_fx.report(gm).rows if s.name == "mid")
    assert (mid.w_bits, mid.a_bits) == (4, 8)
    # tail's input comes from a ReLU in the graph: unsigned [0, 63] at 6 bits.
    assert (tail.input_quantizer.signed, tail.input_quantizer.qmax) == (False, 63)
    # gate.fc's input is the model input, which may be negative.
    assert first.input_quantizer.signed
