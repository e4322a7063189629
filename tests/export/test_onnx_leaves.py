"""export_onnx on leaf modules and wrapped calls: their layers become integer initializers with
Q/DQ like the graph's, onnxruntime agrees with ``convert(arithmetic="engine")`` on inputs other
than the example, and a decision on tensor values is taken as the example takes it, with a
warning naming the leaf and line."""
from __future__ import annotations

import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto
from torch import nn

import ptqat_fx
from tests.passes.test_quantize_leaves import UsesWrapped
from tests.test_leaf_lowering import TEST, X, _quantized

G = torch.Generator().manual_seed(1)


def _run(path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def test_leaf_layers_export_as_integer_initializers_and_agree_with_engine_convert(tmp_path):
    _, qmodel = _quantized(w_bits=4)
    path = tmp_path / "leaf.onnx"
    with pytest.warns(UserWarning, match=r"leaf module 'block' at .*test_leaf_lowering.py:\d+ \(`if y.amax\(\) > 1e6:.*taken as False"):
        model = ptqat_fx.export_onnx(qmodel, (X,), path)
    initializers = {init.name: init for init in model.graph.initializer}
    for layer in ("block.conv", "block.fc", "block.up"):
        assert initializers[f"{layer}.weight_quantized"].data_type == TensorProto.INT4
        assert f"{layer}.weight_operand.weight" not in initializers  # the float weight is not exported
    quantize_inputs = {n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert {f"{layer}.input_quantizer.scale" for layer in ("block.conv", "block.fc", "block.up")} <= quantize_inputs
    engine = ptqat_fx.convert(qmodel, arithmetic="engine")
    with torch.no_grad():
        assert _relative(_run(path, TEST), engine(TEST)) < 1e-5


class Doubles(nn.Module):
    """Doubles its conv's output where the input's mean is positive: a decision on values."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.mean() > 0:
            x = x * 2
        return self.conv(x)


def test_a_decision_on_values_takes_the_example_inputs_path(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(Doubles(), nn.Conv2d(3, 3, 1)).eval()
    example = torch.rand(2, 3, 4, 4, generator=G) + 0.1  # mean > 0: doubles
    qmodel = ptqat_fx.quantize(model, (example,), [example, -example], leaf_modules=[Doubles], progress=False).eval()
    path = tmp_path / "decides.onnx"
    with pytest.warns(UserWarning, match="leaf module '0' at .*`if x.mean\\(\\) > 0:`.* taken as True"):
        ptqat_fx.export_onnx(qmodel, (example,), path)
    engine = ptqat_fx.convert(qmodel, arithmetic="engine")
    other = -example  # mean < 0: the eager leaf does not double
    with torch.no_grad():
        assert _relative(_run(path, example), engine(example)) < 1e-5
        assert _relative(_run(path, other), engine(other)) > 0.1  # the exported graph doubles anyway
        leaf = engine.get_submodule("0")
        leaf.forward = lambda x: leaf.conv(x * 2)  # the example's path, forced
        assert _relative(_run(path, other), engine(other)) < 1e-5


def test_a_wrapped_calls_input_quantizers_export_as_qdq(tmp_path):
    model = UsesWrapped().eval()
    x, other = torch.randn(8, 4, generator=G), torch.randn(8, 4, generator=G)
    qmodel = ptqat_fx.quantize(model, (x,), [x], progress=False).eval()
    path = tmp_path / "wrapped.onnx"
    model_proto = ptqat_fx.export_onnx(qmodel, (x,), path)
    assert [n.op_type for n in model_proto.graph.node].count("QuantizeLinear") == 1
    with torch.no_grad():
        assert _relative(_run(path, other), ptqat_fx.convert(qmodel, arithmetic="engine")(other)) < 1e-5
    onnx.checker.check_model(model_proto, full_check=True)
