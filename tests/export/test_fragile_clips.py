"""A ReLU6 before a signed activation quantizer of tiny steps: onnxruntime's ClipQuantFusion would
drop its Clip (the Q's range is within float32 epsilon of [0, 6]), so the export writes a Relu
there, and the default session agrees with the engine arithmetic."""
from __future__ import annotations

import onnx
import onnxruntime
import torch
from torch import nn

import ptqat_fx
from ptqat_fx.export.fragile_clips import relu_for_fragile_clips


class ConvReLU6Conv(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.first, self.second = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():  # ``scale`` sets the size of the activations between the two
            self.first.weight.mul_(scale)
            self.first.bias.mul_(scale)
            self.second.bias.zero_()  # so that the output is all the second layer's input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(nn.functional.relu6(self.first(x)))


def _exported(scale: float, path) -> tuple[nn.Module, onnx.ModelProto, torch.Tensor]:
    torch.manual_seed(0)
    model = ConvReLU6Conv(scale).eval()
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(2)]
    config = ptqat_fx.QuantConfig(w_bits=8, a_bits=8, w_observer="minmax", a_observer="minmax")
    qmodel = ptqat_fx.quantize(model, batches[0], batches, config, select=None, progress=False).eval()
    return qmodel, ptqat_fx.export_onnx(qmodel, batches[0], path), batches[1][0]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / (want - want.mean()).norm())


def test_a_relu6_before_a_tiny_range_quantizer_is_exported_as_a_relu_and_agrees(tmp_path):
    qmodel, model, x = _exported(1e-9, tmp_path / "m.onnx")
    ops = [node.op_type for node in model.graph.node]
    assert "Clip" not in ops and "Relu" in ops, ops
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = ptqat_fx.convert(qmodel, arithmetic="engine")(x)
    assert _relative_error(got, want) < 1e-4


def test_the_same_clip_stays_where_the_quantizer_range_is_ordinary(tmp_path):
    _, model, _ = _exported(1.0, tmp_path / "m.onnx")
    assert "Clip" in [node.op_type for node in model.graph.node]


def test_the_rewrite_is_what_keeps_the_default_session_right(tmp_path):
    """The file with its Clip put back (what the export wrote before): the default session
    drops that Clip and lets negatives through; the basic-level session does not."""
    qmodel, model, x = _exported(1e-9, tmp_path / "m.onnx")
    relu = next(node for node in model.graph.node if node.op_type == "Relu")
    low = onnx.numpy_helper.from_array(torch.tensor(0.0).numpy(), "clip_low")
    high = onnx.numpy_helper.from_array(torch.tensor(6.0).numpy(), "clip_high")
    model.graph.initializer.extend([low, high])
    relu.CopyFrom(onnx.helper.make_node("Clip", [relu.input[0], "clip_low", "clip_high"], list(relu.output), name=relu.name))
    onnx.save(model, tmp_path / "clip.onnx")
    with torch.no_grad():
        want = ptqat_fx.convert(qmodel, arithmetic="engine")(x)

    def error(level: onnxruntime.GraphOptimizationLevel) -> float:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = level
        session = onnxruntime.InferenceSession(str(tmp_path / "clip.onnx"), options, providers=["CPUExecutionProvider"])
        return _relative_error(torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]), want)

    assert error(onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC) < 1e-4
    assert error(onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL) > 1e-2
    assert [node.op_type for node in relu_for_fragile_clips(model).graph.node].count("Clip") == 0
