"""convert on leaf modules and wrapped calls: the layers inside a leaf (whose forward runs
eagerly) are lowered as modules, with torch's own fake-quant ops and a float64 integer
recomputation as references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptqat_fx
from ptqat_fx.runtime.lowered_layers import is_lowered_layer
from ptqat_fx.runtime.quantized_modules import is_quantized_layer
from ptqat_fx.runtime.quantizer import FakeQuantizer
from tests.passes.test_quantize_leaves import UsesWrapped

G = torch.Generator().manual_seed(0)
X = torch.randn(4, 3, 8, 8, generator=G)
TEST = torch.randn(4, 3, 8, 8, generator=G)


class Block(nn.Module):
    """conv -> branch on values -> linear over channels -> transposed conv: a leaf."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if y.amax() > 1e6:  # never true: a decision on values
            y = y / y.amax()
        y = self.fc(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.up(y)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.block = Block()
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def _quantized(w_bits: int = 4) -> tuple[nn.Module, torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = Net().eval()
    config = ptqat_fx.QuantConfig(w_bits=w_bits, a_bits=8, w_observer="minmax", a_observer="minmax")
    return model, ptqat_fx.quantize(model, (X,), [X], config, leaf_modules=[Block], progress=False).eval()


def _fake_quant_weight(module: nn.Module) -> torch.Tensor:
    quantizer = module.weight_fake_quant
    scales = quantizer.scale.detach()
    return torch.fake_quantize_per_channel_affine(
        module.weight.detach(), scales, torch.zeros_like(scales, dtype=torch.int32), quantizer.channel_axis,
        quantizer.qmin, quantizer.qmax,
    )


@pytest.mark.parametrize("pack", [False, True])
def test_convert_lowers_leaf_layers_to_integers_and_equals_fake_quant(pack):
    _, qmodel = _quantized()
    leaf_layers = {path: m for path, m in qmodel.named_modules() if is_quantized_layer(m)}
    assert set(leaf_layers) == {"block.conv", "block.fc", "block.up"}
    converted = ptqat_fx.convert(qmodel, pack_int4_weights=pack)
    with torch.no_grad():
        assert torch.equal(converted(TEST), qmodel(TEST))
    state = converted.state_dict()
    for path, module in leaf_layers.items():
        assert f"{path}.weight" not in state  # the float weight is not deployed
        lowered = converted.get_submodule(path)
        assert is_lowered_layer(lowered) and not any(isinstance(m, FakeQuantizer) for m in lowered.modules())
        assert state[f"{path}.weight_operand.values"].dtype == (torch.uint8 if pack else torch.int8)
        torch.testing.assert_close(lowered.weight_operand(), _fake_quant_weight(module), rtol=0, atol=0)
    assert is_quantized_layer(qmodel.block.conv) and not is_lowered_layer(qmodel.block.conv)  # qmodel unchanged


def test_engine_arithmetic_accumulates_a_leaf_convs_integers():
    _, qmodel = _quantized(w_bits=8)
    conv = qmodel.block.conv
    engine = ptqat_fx.convert(qmodel, arithmetic="engine")
    s_x, s_w = conv.input_quantizer.scale.detach().double(), conv.weight_fake_quant.scale.detach().double()
    q_x = torch.round(torch.clamp(TEST.double() / s_x, -128, 127))
    q_w = torch.round(torch.clamp(conv.weight.detach().double() / s_w.reshape(-1, 1, 1, 1), -128, 127))
    step = (s_x * s_w).reshape(1, -1, 1, 1)
    bias = torch.round(conv.bias.detach().double().reshape(1, -1, 1, 1) / step)
    expected = F.conv2d(q_x, q_w, padding=1) * step + bias * step
    with torch.no_grad():
        got = engine.get_submodule("block.conv")(TEST).double()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        # A transposed conv keeps float Q/DQ (as in graphs): the fake-quant module's output.
        y = torch.rand(2, 8, 4, 4)
        assert torch.equal(engine.get_submodule("block.up")(y), qmodel.block.up(y))
        error = (engine(TEST) - qmodel(TEST)).norm() / qmodel(TEST).norm()
    assert 0 < error < 1e-3


def test_convert_lowers_the_input_quantizers_of_a_wrapped_call():
    model = UsesWrapped().eval()
    x = torch.randn(8, 4, generator=G)
    qmodel = ptqat_fx.quantize(model, (x,), [x], progress=False).eval()
    converted = ptqat_fx.convert(qmodel)
    assert not any(isinstance(m, FakeQuantizer) for m in converted.modules())
    with torch.no_grad():
        assert torch.equal(converted(x), qmodel(x))


def test_a_quantizer_nothing_lowers_is_refused_by_name():
    _, qmodel = _quantized()
    stray = FakeQuantizer(8)
    stray.load_state_dict(qmodel.block.conv.input_quantizer.state_dict())
    stray.mode = qmodel.block.conv.input_quantizer.mode
    qmodel.block.add_module("stray", stray)
    with pytest.raises(ptqat_fx.InputError, match=r"\['block.stray'\] are neither called by the graph"):
        ptqat_fx.convert(qmodel)
