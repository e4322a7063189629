"""export_onnx(): the Q/DQ structure (node counts, initializer types, axes), the full checker,
and agreement of onnxruntime and onnx.reference with the converted model."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto
from torch import nn

import ptqat_fx
from ptqat_fx.export.verify import RUNTIMES, agreement, onnxruntime_session, output_step, run_onnx, step_agreement
from ptqat_fx.layer_spec import layer_nodes
from ptqat_fx.meta import layer_spec
from ptqat_fx.runtime.quantizer import is_quantizer_node
from tests.export.quantized_examples import EXAMPLES, example_input, quantized


def _weight_paths(qmodel) -> set[str]:
    return {node.args[0].target for node in qmodel.graph.nodes
            if is_quantizer_node(qmodel, node) and node.args[0].op == "get_attr"}


@pytest.mark.parametrize("name,w_bits", [(name, bits) for name in EXAMPLES for bits in (8, 4)])
def test_export_structure_and_agreement(name, w_bits, tmp_path):
    qmodel = quantized(name, w_bits)
    x = example_input(name, seed=5)
    path = tmp_path / "model.onnx"
    ptqat_fx.export_onnx(qmodel, (x,), path)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == 21

    initializers = {init.name: init for init in model.graph.initializer}
    weight_type = TensorProto.INT8 if w_bits == 8 else TensorProto.INT4
    integer = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    # Every quantized weight, and nothing else, is an integer initializer of its bit width.
    assert {n.input[0] for n in integer} == {f"{p}_quantized" for p in _weight_paths(qmodel)}
    for node in integer:
        assert initializers[node.input[0]].data_type == weight_type
        assert initializers[node.input[2]].data_type == weight_type
    for node in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        # Signed 8-bit range written as UINT8 around zero point 128: the same integers.
        zero_point = initializers[node.input[2]]
        assert zero_point.data_type == TensorProto.UINT8 and onnx.numpy_helper.to_array(zero_point) == 128
        assert len(initializers[node.input[1]].dims) == 0
    for spec in (layer_spec(n) for n in layer_nodes(qmodel)):
        assert spec.weight is None or spec.weight not in initializers  # float weights are gone

    expected = ptqat_fx.convert(qmodel, arithmetic="engine")(x).detach().numpy()
    step = output_step(qmodel)
    for runtime in RUNTIMES:
        found = step_agreement(run_onnx(path, (x,), runtime)[0], expected, step)
        assert found.within_one_step == 1.0 and found.argmax_changed == 0.0, (runtime, found)


def test_conv_transpose_weights_dequantize_along_axis_1(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.ConvTranspose2d(6, 5, 3, stride=2)).eval()
    x = torch.randn(2, 3, 8, 8)
    qmodel = ptqat_fx.quantize(model, (x,), [x], ptqat_fx.QuantConfig(w_bits=4), progress=False).eval()
    onnx_model = ptqat_fx.export_onnx(qmodel, (x,), tmp_path / "m.onnx")
    axes = {n.input[0]: onnx.helper.get_attribute_value(n.attribute[0]) for n in onnx_model.graph.node if n.op_type == "DequantizeLinear" and n.attribute}
    # The conv is an integer layer (its integers, unscaled); the transposed conv keeps its
    # per-channel scale along axis 1.
    assert axes == {"2.weight_quantized": 1}
    unscaled = {n.input[0] for n in onnx_model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] == "ptqat_fx.unit_scale"}
    assert "0.weight_quantized" in unscaled
    expected = ptqat_fx.convert(qmodel, arithmetic="engine")(x).detach().numpy()
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", (x,), "onnxruntime")[0], expected, atol=1e-5)


def test_default_onnxruntime_optimizations_drop_relu_before_int4_quantize(tmp_path):
    """The pitfall the verification session avoids: with 4-bit activations (INT4, zero point 0)
    ReluQuantRewrite removes the ReLU although the signed range keeps negatives."""
    x = example_input("mlp")
    qmodel = quantized("mlp", 4, a_bits=4)
    ptqat_fx.export_onnx(qmodel, (x,), tmp_path / "m.onnx")
    expected = ptqat_fx.convert(qmodel, arithmetic="engine")(x).detach().numpy()
    default = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    naive = default.run(None, {"x": x.numpy()})[0]
    fixed = onnxruntime_session(tmp_path / "m.onnx").run(None, {"x": x.numpy()})[0]
    assert np.abs(naive - expected).max() > 1e-2
    np.testing.assert_allclose(fixed, expected, atol=1e-5)


def test_int4_weights_need_opset_21(tmp_path):
    x = example_input("mlp")
    with pytest.raises(ptqat_fx.InputError, match="opset=20 .*opset >= 21"):
        ptqat_fx.export_onnx(quantized("mlp", 4), (x,), tmp_path / "m.onnx", opset=20)
    assert not (tmp_path / "m.onnx").exists()


def test_uncalibrated_model_cannot_be_exported(tmp_path):
    x = example_input("mlp")
    gm = quantized("mlp", 8)
    gm.get_submodule("input_quantizers.relu").observe()
    with pytest.raises(ptqat_fx.CalibrationError, match="input_quantizers.relu"):
        ptqat_fx.export_onnx(gm, (x,), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_unsigned_activations_export_as_uint8(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16)
    config = ptqat_fx.QuantConfig(w_bits=8, unsigned_activations=True, a_observer="minmax")
    qmodel = ptqat_fx.quantize(model, (x,), [x], config, progress=False).eval()
    onnx_model = ptqat_fx.export_onnx(qmodel, (x,), tmp_path / "m.onnx")
    initializers = {init.name: init.data_type for init in onnx_model.graph.initializer}
    zero_points = [initializers[n.input[2]] for n in onnx_model.graph.node if n.op_type == "QuantizeLinear"]
    assert set(zero_points) == {TensorProto.UINT8}
    # The input's signed range sits around 128; after the ReLU the unsigned range starts at 0.
    values = {int(onnx.numpy_helper.to_array(i)) for i in onnx_model.graph.initializer if i.name.endswith(".zero_point")}
    assert values == {0, 128}
    for runtime, result in agreement(tmp_path / "m.onnx", ptqat_fx.convert(qmodel, arithmetic="engine"), (x,)).items():
        assert result.max_abs_error <= 1e-5, runtime


@pytest.mark.slow  # about 14 s at load 4: a PTQAT quantization, two exports, two runtimes
def test_ptqat_model_exports_like_its_fake_quant_form(tmp_path):
    """Fused trainable layers (quantized_linear/conv/matmul) and frozen constants export to the
    same Q/DQ graph as the plain fake-quant model."""
    x = example_input("vit")
    ptqat = quantized("vit", 4, select=ptqat_fx.Select())
    exported = ptqat_fx.export_onnx(ptqat, (x,), tmp_path / "p.onnx")
    plain = ptqat_fx.export_onnx(quantized("vit", 4), (x,), tmp_path / "f.onnx")
    assert sorted(n.op_type for n in exported.graph.node) == sorted(n.op_type for n in plain.graph.node)
    assert {i.name: i.data_type for i in exported.graph.initializer} == {i.name: i.data_type for i in plain.graph.initializer}
    for runtime, result in agreement(tmp_path / "p.onnx", ptqat_fx.convert(ptqat, arithmetic="engine"), (x,)).items():
        assert result.max_abs_error <= 1e-5, runtime
