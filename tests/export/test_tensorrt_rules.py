"""export_onnx(target="tensorrt") and the TensorRT rule checker: the examples pass, a W4
convolution is INT8 on the 4-bit grid with the default export's numerics, every rule refuses a
hand-built graph that breaks it (naming the node and the fix), and the deploy report."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import ptqat_fx
from ptqat_fx.errors import InputError
from ptqat_fx.export import tensorrt_rules
from ptqat_fx.views.deploy_report import DeployReport
from tests.export.quantized_examples import EXAMPLES, example_input, quantized


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(name, w_bits, target) -> path of that export of the example, made once per module."""
    paths: dict[tuple, object] = {}
    root = tmp_path_factory.mktemp("exports")

    def export(name: str, w_bits: int, target: str):
        key = (name, w_bits, target)
        if key not in paths:
            paths[key] = root / f"{name}_w{w_bits}_{target}.onnx"
            ptqat_fx.export_onnx(quantized(name, w_bits), (example_input(name),), paths[key], target=target)
        return paths[key]

    return export


def _int_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init).astype(np.int64) for init in model.graph.initializer
            if init.data_type in (TensorProto.INT8, TensorProto.INT4, TensorProto.UINT8)}


@pytest.mark.parametrize("name,w_bits", [
    pytest.param(name, bits, marks=[pytest.mark.slow] if bits == 8 else []) for name in EXAMPLES for bits in (8, 4)
])
def test_examples_pass_the_checker_with_int8_weights_on_their_grid(name, w_bits, exported):
    default = onnx.load(exported(name, w_bits, "onnxruntime"))
    model = onnx.load(exported(name, w_bits, "tensorrt"))
    assert tensorrt_rules.check(model) == []
    onnx.checker.check_model(model, full_check=True)

    weights = {init.name: init for init in model.graph.initializer if init.name.endswith("_quantized")}
    assert weights and all(init.data_type == TensorProto.INT8 for init in weights.values())
    expected = _int_initializers(default)
    for init_name in weights:
        values = numpy_helper.to_array(weights[init_name]).astype(np.int64)
        np.testing.assert_array_equal(values, expected[init_name])  # the same integers, only the type differs
        assert -(2 ** (w_bits - 1)) <= values.min() and values.max() <= 2 ** (w_bits - 1) - 1

    report = DeployReport.of(exported(name, w_bits, "tensorrt"))
    assert report.target == "tensorrt"
    weighted = [layer for layer in report.layers if layer.kind != "matmul"]
    assert len(weighted) == len(weights)
    wanted = "INT8 (4-bit grid)" if w_bits == 4 else "INT8"
    assert {layer.precision for layer in weighted} == {wanted}
    assert {layer.onnx_node for layer in weighted} <= {node.name for node in model.graph.node}


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_w4_as_int8_on_the_grid_computes_what_the_default_export_computes(name, exported):
    other = example_input(name, seed=7).numpy()
    options = onnxruntime.SessionOptions()
    # The file's semantics, op by op: with fusions on, onnxruntime would run the INT8 graph
    # in integer kernels and the INT4 one in float, which is a runtime difference, not the
    # file's.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    outputs = {}
    for kind in ("onnxruntime", "tensorrt"):
        path = str(exported(name, 4, kind))
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: other}
        outputs[kind] = (session.run(None, feed)[0], ReferenceEvaluator(path).run(None, feed)[0])
    # The default file computes conv/linear in integer form (exact accumulators), the TensorRT
    # file the standard DQ -> layer pattern in float: the same integers and scales, so equal up
    # to float rounding (ties flipped by the summation order).
    for index in (0, 1):
        trt, default = outputs["tensorrt"][index], outputs["onnxruntime"][index]
        assert np.linalg.norm(trt - default) <= 3e-2 * np.linalg.norm(default - default.mean())  # ~1e-2 measured
        assert (trt.argmax(-1) == default.argmax(-1)).mean() >= 0.9


def test_the_default_w4_export_breaks_the_int4_rule_and_names_the_fix(exported):
    model = onnx.load(exported("resnet", 4, "onnxruntime"))
    found = tensorrt_rules.check(model)
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    # Rule 4: INT4 on the convs and the fc. Rule 1: the default (onnxruntime) file writes signed
    # activations as UINT8 with zero point 128, which TensorRT refuses.
    int4 = [v for v in found if v.rule == 4]
    assert {v.rule for v in found} == {1, 4} and len(int4) == len(convs) + 1
    assert all("target='tensorrt'" in v.message for v in int4)
    assert DeployReport.of(model).counts() == {"INT4 Q/DQ": len(int4)}


def test_unsigned_activations_are_refused_for_tensorrt(tmp_path):
    import torch
    from examples import mlp

    x = torch.randn(8, 784)
    config = ptqat_fx.QuantConfig(w_bits=8, w_observer="minmax", a_observer="minmax", unsigned_activations=True)
    qmodel = ptqat_fx.quantize(mlp.build(), (x,), [x], config, progress=False).eval()
    with pytest.raises(InputError, match=r"rule 1 .*UINT8 .*unsigned_activations=False"):
        ptqat_fx.export_onnx(qmodel, (x,), tmp_path / "m.onnx", target="tensorrt")
    assert not (tmp_path / "m.onnx").exists()


def test_shared_join_quantizers_on_a_residual_add_are_refused(tmp_path):
    import torch
    from examples import resnet_small

    x = torch.randn(4, 3, 16, 16)
    config = ptqat_fx.QuantConfig(w_bits=8, w_observer="minmax", a_observer="minmax", share_join_quantizers=True)
    qmodel = ptqat_fx.quantize(resnet_small.build(), (x,), [x], config, progress=False).eval()
    with pytest.raises(InputError, match=r"rule 3 .*node 'node_add.*share_join_quantizers=False"):
        ptqat_fx.export_onnx(qmodel, (x,), tmp_path / "m.onnx", target="tensorrt")


def test_unknown_target_is_refused(tmp_path):
    with pytest.raises(InputError, match="target='tensorrt8'.*onnxruntime"):
        ptqat_fx.export_onnx(quantized("mlp", 8), (example_input("mlp"),), tmp_path / "m.onnx", target="tensorrt8")


# Hand-built graphs: each is a valid ONNX model (full check) breaking one rule.
class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, name: str, values: np.ndarray, data_type: int | None = None) -> str:
        tensor = numpy_helper.from_array(np.asarray(values), name)
        if data_type is not None:
            tensor = helper.make_tensor(name, data_type, list(np.shape(values)), np.asarray(values).ravel().tolist())
        self.initializers.append(tensor)
        return name

    def node(self, op: str, inputs: list[str], name: str, **attributes) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    def qdq(self, x: str, name: str, data_type: int = TensorProto.INT8, zero: int = 0, zero_point: bool = True) -> str:
        scale = self.constant(f"{name}.scale", np.array(0.05, np.float32))
        inputs = [x, scale]
        if zero_point:
            inputs.append(self.constant(f"{name}.zero_point", np.array(zero), data_type))
        quantized = self.node("QuantizeLinear", inputs, f"{name}_q")
        return self.node("DequantizeLinear", [quantized, *inputs[1:]], f"{name}_dq")

    def weight(self, name: str, shape: tuple, axis: int = 0, data_type: int = TensorProto.INT8,
               block: int | None = None) -> str:
        values = np.arange(np.prod(shape)).reshape(shape) % 7 - 3
        self.constant(f"{name}_quantized", values, data_type)
        if block is not None:
            scale_shape = list(shape)
            scale_shape[axis] //= block
            attributes = {"axis": axis, "block_size": block}
        else:
            scale_shape = [shape[axis]]
            attributes = {"axis": axis}
        self.constant(f"{name}_scale", np.full(scale_shape, 0.01, np.float32))
        self.constant(f"{name}_zero_point", np.zeros(scale_shape, np.int64), data_type)
        return self.node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                         f"{name}_dq", **attributes)

    def model(self, inputs: dict[str, list[int]], output: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "hand_built",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in inputs.items()],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        # Strict inference fails on any type or shape error, and gives the output its shape.
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
        return model


def _conv(g: _Graph, x: str, name: str, axis: int = 0, data_type: int = TensorProto.INT8, quantize_input: bool = True) -> str:
    w = g.weight(name, (4, 4, 3, 3), axis=axis, data_type=data_type)
    return g.node("Conv", [g.qdq(x, f"{name}_in") if quantize_input else x, w], name, pads=[1, 1, 1, 1])


def _conv_relu_block(**conv_options) -> onnx.ModelProto:
    g = _Graph()
    y = g.node("Relu", [_conv(g, "x", "conv", **conv_options)], "relu")
    return g.model({"x": [1, 4, 8, 8]}, y)


def _refused(model: onnx.ModelProto, rule: int, node: str, fix: str) -> None:
    found = tensorrt_rules.check(model)
    assert [(v.rule, v.node) for v in found] == [(rule, node)], found
    assert fix in found[0].message
    with pytest.raises(InputError, match=f"rule {rule} .*node '{node}'"):
        tensorrt_rules.require(model)


def test_a_conv_relu_block_built_by_hand_passes():
    assert tensorrt_rules.check(_conv_relu_block()) == []


def test_rule1_refuses_uint8_a_nonzero_zero_point_and_a_missing_one():
    for options, fix in [({"data_type": TensorProto.UINT8}, "unsigned_activations=False"),
                         ({"zero": 3}, "symmetric"), ({"zero_point": False}, "unsigned_activations=False")]:
        g = _Graph()
        y = g.node("Relu", [g.node("Conv", [g.qdq("x", "in", **options), g.weight("w", (4, 4, 3, 3))], "conv")], "relu")
        model = g.model({"x": [1, 4, 8, 8]}, y)
        found = tensorrt_rules.check(model)
        assert {(v.rule, v.node) for v in found} == {(1, "in_q"), (1, "in_dq")}, (options, found)
        assert all(fix in v.message for v in found)


def test_rule2_refuses_weights_quantized_along_the_input_channels():
    _refused(_conv_relu_block(axis=1), 2, "conv_dq", "output channels")


def test_rule2_follows_the_transpose_between_a_gemm_weight_and_its_matmul():
    g = _Graph()
    # A linear weight [out=6, in=4] transposed to [4, 6] for MatMul: axis 0 is its output axis.
    w = g.node("Transpose", [g.weight("fc", (6, 4), axis=0)], "fc_t", perm=[1, 0])
    assert tensorrt_rules.check(g.model({"x": [2, 4]}, g.node("MatMul", [g.qdq("x", "in"), w], "mm"))) == []
    g = _Graph()
    w = g.node("Transpose", [g.weight("fc", (6, 4), axis=1)], "fc_t", perm=[1, 0])
    _refused(g.model({"x": [2, 4]}, g.node("MatMul", [g.qdq("x", "in"), w], "mm")), 2, "fc_dq", "output channels")


def test_rule3_refuses_an_int8_weight_with_a_float_input():
    _refused(_conv_relu_block(quantize_input=False), 3, "conv", "quantize its input")


def test_rule3_refuses_qdq_between_a_conv_and_its_relu():
    g = _Graph()
    y = g.node("Relu", [g.qdq(_conv(g, "x", "conv"), "out")], "relu")
    _refused(g.model({"x": [1, 4, 8, 8]}, y), 3, "out_q", "quantize after the Relu")


def test_rule3_refuses_qdq_between_a_matmul_and_its_bias_add():
    g = _Graph()
    mm = g.node("MatMul", [g.qdq("x", "in"), g.weight("fc", (4, 6), axis=1)], "mm")
    y = g.node("Add", [g.qdq(mm, "out"), g.constant("bias", np.zeros(6, np.float32))], "bias_add")
    _refused(g.model({"x": [2, 4]}, y), 3, "bias_add", "quantize after the add")


def test_rule3_refuses_a_residual_add_whose_conv_input_passes_a_qdq():
    g = _Graph()
    conv = _conv(g, "x", "conv")
    y = g.node("Relu", [g.node("Add", [g.qdq(conv, "joined"), g.qdq("x", "residual")], "add")], "relu")
    _refused(g.model({"x": [1, 4, 8, 8]}, y), 3, "add", "quantize only the residual")
    # The placement TensorRT recommends: the conv output straight into the add, the residual quantized.
    g = _Graph()
    y = g.node("Relu", [g.node("Add", [_conv(g, "x", "conv"), g.qdq("x", "residual")], "add")], "relu")
    model = g.model({"x": [1, 4, 8, 8]}, g.qdq(y, "next"))
    assert tensorrt_rules.check(model) == [] and tensorrt_rules.fusion_notes(model) == []


def test_rule4_refuses_int4_on_a_convolution():
    _refused(_conv_relu_block(data_type=TensorProto.INT4), 4, "conv_dq", "target='tensorrt'")


def test_rule4_refuses_per_channel_int4_on_a_matmul():
    g = _Graph()
    y = g.node("MatMul", ["x", g.weight("fc", (8, 6), axis=1, data_type=TensorProto.INT4)], "mm")
    _refused(g.model({"x": [2, 8]}, y), 4, "fc_dq", "block")


def test_rule4_takes_block_wise_weight_only_int4_and_refuses_it_with_an_int8_input():
    g = _Graph()
    y = g.node("MatMul", ["x", g.weight("fc", (8, 6), axis=0, data_type=TensorProto.INT4, block=4)], "mm")
    assert tensorrt_rules.check(g.model({"x": [2, 8]}, y)) == []
    g = _Graph()
    y = g.node("MatMul", [g.qdq("x", "in"), g.weight("fc", (8, 6), axis=0, data_type=TensorProto.INT4, block=4)], "mm")
    _refused(g.model({"x": [2, 8]}, y), 4, "fc_dq", "weight-only")


def test_rule4_refuses_int4_activations():
    g = _Graph()
    y = g.node("MatMul", [g.qdq("x", "in", data_type=TensorProto.INT4), g.weight("fc", (8, 6), axis=1)], "mm")
    found = tensorrt_rules.check(g.model({"x": [2, 8]}, y))
    assert {(v.rule, v.node) for v in found} == {(4, "in_q"), (4, "in_dq")}
    assert all("a_bits=8" in v.message for v in found)


def test_report_prints_a_row_per_layer_and_the_fusion_notes(exported):
    model = onnx.load(exported("resnet", 4, "tensorrt"))
    report = DeployReport.of(model)
    text = str(report).splitlines()
    assert text[0] == f"Deploy report (tensorrt): {len(report.layers)} INT8 (4-bit grid)"
    assert len(text) == 2 + len(report.layers) + len(report.notes)
    # Each residual add of the example has a float input (its residual is not quantized); the
    # notes name those whose ReLU output is quantized next (the last one feeds the pooling).
    quantized_next = {node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"}
    relu_of = {node.input[0]: node.output[0] for node in model.graph.node if node.op_type == "Relu"}
    adds = [node.name for node in model.graph.node if node.op_type == "Add" and relu_of.get(node.output[0]) in quantized_next]
    assert len(adds) == 2 and len(report.notes) == 2 and all(add in " ".join(report.notes) for add in adds)
    assert DeployReport.from_json(report.to_json()) == report
