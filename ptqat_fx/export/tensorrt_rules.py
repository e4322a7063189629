"""TensorRT's documented explicit-quantization rules, checked on an exported ONNX graph.

TensorRT cannot be installed here, so ``export_onnx(..., target="tensorrt")`` checks the
graph against what NVIDIA documents instead of building an engine. The rules and where they
are written down:

1. **Symmetric INT8.** "TensorRT uses a symmetric quantization scheme" whose types are
   "INT8 (signed 8-bit integer)" and "INT4 (signed 4-bit integer, weight-only
   quantization)" (TensorRT developer guide, *Working with Quantized Types*). The Quantize
   and Dequantize operators take int8, fp8 or int4, and "the zero_point must only contain
   zero-valued coefficients" (TensorRT operator reference, *Quantize*, *Dequantize*). So
   every QuantizeLinear/DequantizeLinear here has an explicit all-zero INT8 zero point
   (INT4 on weights only); UINT8 and a missing zero point (ONNX then means UINT8) are refused.
2. **Weights per channel on the output axis.** A per-channel scale is "a 1-D tensor for
   per-channel quantization" (*Dequantize*), on the output channels of the weighted layer:
   axis 0 of a Conv kernel (KCRS), axis 1 of a ConvTranspose kernel, the N axis of a
   Gemm/MatMul weight (after any Transpose between the DequantizeLinear and the layer).
3. **Placement that lets conv, bias, residual add and ReLU fuse** (*Explicit Quantization*,
   Q/DQ layer-placement recommendations): quantize *all* inputs of weighted operations
   (an INT8 weight needs an INT8 input); no Q/DQ between a weighted layer and the bias add
   or activation TensorRT fuses into it, nor between a residual add and its ReLU; and a
   residual add must be able to fuse into one of its producing layers: "the extra pair of
   Q/DQ operators forces the separation of the convolution operator from the element-wise
   addition operator", so an add whose every input from a weighted layer passes a Q/DQ is
   refused. (A float residual input still fuses; the fused layer then outputs float, which
   ``fusion_notes`` reports, not refuses.)
4. **INT4 is weight-only and block-wise, for GEMM/MatMul only.** A scale is "a 2-D tensor
   for block quantization (supported for DataType::kINT4 only)" (*Dequantize*); INT4 is
   "weight-only quantization" (*Working with Quantized Types*), i.e. the GEMM's other input
   stays float. An INT4 convolution or an INT4 GEMM with an INT8 input has no TensorRT
   kernel; a W4 convolution deploys as INT8 Q/DQ whose integers lie on the 4-bit grid (the
   same numerics), which is what ``target="tensorrt"`` exports.

``check(model)`` lists every ``Violation``; ``require(model)`` raises ``InputError`` with all
of them, each naming the node and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import InputError
from ..lowering import IntegerWeight

TARGETS = ("onnxruntime", "tensorrt")
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
GEMMS = ("Gemm", "MatMul")
# Ops a DequantizeLinear's value passes unchanged in layout-only ways; TensorRT moves Q/DQ
# across them (its Q/DQ propagation), so a weighted layer behind one still sees an INT8 input.
TRANSPARENT = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "MaxPool")
# Activations TensorRT fuses into the weighted layer (or residual add) before them.
FUSED_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu")


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``rule`` (1-4, as in the module docstring), the ONNX ``node``, what
    is wrong and the fix."""

    rule: int
    node: str
    message: str

    def __str__(self) -> str:
        return f"rule {self.rule} ({RULE_NAMES[self.rule]}), node {self.node!r}: {self.message}"


RULE_NAMES = {
    1: "symmetric INT8, zero point 0",
    2: "weights per channel on the output axis",
    3: "Q/DQ placement for conv/bias/add/ReLU fusion",
    4: "INT4 weight-only, block-wise, GEMM/MatMul only",
}


def tensorrt_table(table: list) -> list:
    """The export table for TensorRT: weights of 4 bits or fewer are stored as INT8 (their
    integers unchanged, so on the 4-bit grid; rule 4), everything else as it is."""
    return [replace(entry, bits=8) if isinstance(entry, IntegerWeight) and entry.bits <= 4 else entry for entry in table]


class QDQGraph:
    """Producers, consumers and initializers of an ONNX graph, and the Q/DQ questions the
    rules and the deploy report ask of it."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = list(model.graph.node)
        self.initializers = {init.name: init for init in model.graph.initializer}
        self.producer = {name: node for node in self.nodes for name in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def array(self, name: str) -> np.ndarray | None:
        init = self.initializers.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def is_weight_dq(self, node: onnx.NodeProto) -> bool:
        return node.op_type == "DequantizeLinear" and node.input[0] in self.initializers

    def quantized_type(self, node: onnx.NodeProto) -> int | None:
        """The integer type a Q/DQ node works in: its zero point's, else (none given) its
        integer input's for a DequantizeLinear of an initializer, else None (ONNX: UINT8)."""
        if len(node.input) > 2 and node.input[2] in self.initializers:
            return self.initializers[node.input[2]].data_type
        if node.op_type == "DequantizeLinear" and node.input[0] in self.initializers:
            return self.initializers[node.input[0]].data_type
        return None

    def weight_use(self, dq: onnx.NodeProto) -> tuple[onnx.NodeProto, list[int]] | None:
        """(weighted layer, permutation applied on the way) that the weight DequantizeLinear
        ``dq`` feeds, following Transposes; None when it feeds no weighted layer's weight
        input."""
        name, perm = dq.output[0], None
        while True:
            users = self.consumers.get(name, [])
            if len(users) != 1:
                return None
            user = users[0]
            if user.op_type == "Transpose":
                step = list(helper.get_attribute_value(_attribute(user, "perm")))
                perm = step if perm is None else [perm[i] for i in step]
                name = user.output[0]
                continue
            if user.op_type in WEIGHTED and list(user.input).index(name) == 1:
                return user, perm if perm is not None else list(range(len(self.initializers[dq.input[0]].dims)))
            return None

    def from_dequantize(self, name: str) -> onnx.NodeProto | None:
        """The activation DequantizeLinear that ``name`` is (or reaches through layout-only
        ops), or None for a float tensor."""
        node = self.producer.get(name)
        while node is not None and node.op_type in TRANSPARENT:
            node = self.producer.get(node.input[0])
        return node if node is not None and node.op_type == "DequantizeLinear" and not self.is_weight_dq(node) else None

    def weight_dq(self, layer: onnx.NodeProto) -> onnx.NodeProto | None:
        """The weight DequantizeLinear feeding ``layer``'s weight input, through Transposes."""
        if len(layer.input) < 2:
            return None
        node = self.producer.get(layer.input[1])
        while node is not None and node.op_type == "Transpose":
            node = self.producer.get(node.input[0])
        return node if node is not None and self.is_weight_dq(node) else None

    def layer_output_of(self, name: str) -> onnx.NodeProto | None:
        """The weighted layer whose output ``name`` is, directly or after its bias Add (a
        MatMul + Add is how linear layers export)."""
        node = self.producer.get(name)
        if node is not None and node.op_type == "Add" and any(i in self.initializers for i in node.input):
            other = [i for i in node.input if i not in self.initializers]
            node = self.producer.get(other[0]) if other else None
        return node if node is not None and node.op_type in WEIGHTED else None

    def dequantized_pair(self, q: onnx.NodeProto) -> list[onnx.NodeProto]:
        return [user for user in self.consumers.get(q.output[0], []) if user.op_type == "DequantizeLinear"]


def _attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return attribute
    return default


def _int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    attribute = _attribute(node, name)
    return default if attribute is None else int(helper.get_attribute_value(attribute))


def output_axis(layer: onnx.NodeProto, rank: int) -> int:
    """The output-channel axis of ``layer``'s weight input (as the layer sees it)."""
    if layer.op_type == "Conv":
        return 0
    if layer.op_type == "ConvTranspose":
        return 1
    if layer.op_type == "Gemm":
        return 0 if _int_attribute(layer, "transB", 0) else 1
    return rank - 1


def _symmetric(graph: QDQGraph, node: onnx.NodeProto) -> list[Violation]:
    """Rule 1 on one Q/DQ node."""
    data_type = graph.quantized_type(node)
    name = TensorProto.DataType.Name(data_type) if data_type is not None else "UINT8 (no zero point given)"
    where = f"(scale {node.input[1]!r})"
    if data_type == TensorProto.INT4 and not graph.is_weight_dq(node):
        return [Violation(4, node.name, f"INT4 activation {where}: TensorRT's INT4 is weight-only; quantize "
                          "activations to 8 bits (QuantConfig(a_bits=8))")]
    if data_type not in (TensorProto.INT8, TensorProto.INT4):
        return [Violation(1, node.name, f"{name} {where}: TensorRT's Q/DQ take signed INT8 only; quantize "
                          "with QuantConfig(unsigned_activations=False) (signed ranges)")]
    if len(node.input) > 2:
        zero_point = graph.array(node.input[2])
        if zero_point is None:
            return [Violation(1, node.name, f"zero point {node.input[2]!r} is not a constant initializer; "
                              "TensorRT needs a build-time constant zero point of 0")]
        if np.any(zero_point != 0):
            return [Violation(1, node.name, f"zero point {node.input[2]!r} is {zero_point.ravel()[:4].tolist()}, not 0: "
                              "TensorRT quantization is symmetric; re-quantize with a symmetric range")]
    return []


def _weight_axis(graph: QDQGraph, dq: onnx.NodeProto) -> list[Violation]:
    """Rules 2 and 4 on one weight DequantizeLinear."""
    scale = graph.array(dq.input[1])
    use = graph.weight_use(dq)
    data_type = graph.quantized_type(dq)
    if use is None:
        return []
    layer, perm = use
    rank = len(graph.initializers[dq.input[0]].dims)
    if data_type == TensorProto.INT4:
        if layer.op_type not in GEMMS:
            return [Violation(4, dq.name, f"INT4 weights feed {layer.op_type} {layer.name!r}: TensorRT runs INT4 only "
                              "in GEMM/MatMul; export with target='tensorrt', which stores them as INT8 on the "
                              "4-bit grid (same numerics)")]
        if scale is None or scale.ndim != 2 or _attribute(dq, "block_size") is None:
            return [Violation(4, dq.name, f"INT4 weights of {layer.name!r} are not block-quantized: TensorRT takes "
                              "INT4 only with a 2-D block scale and a block_size; export with target='tensorrt' "
                              "(INT8 on the 4-bit grid)")]
        if graph.from_dequantize(layer.input[0]) is not None:
            return [Violation(4, dq.name, f"INT4 weights of {layer.op_type} {layer.name!r} meet an INT8 input: "
                              "TensorRT's INT4 is weight-only; store the weights as INT8 (4-bit grid) or leave "
                              "the input float")]
        return []
    if scale is None or scale.size <= 1:
        return []
    if scale.ndim != 1:
        return [Violation(4, dq.name, f"block-wise scale {dq.input[1]!r} on a {TensorProto.DataType.Name(data_type)} "
                          "weight: TensorRT takes block quantization for INT4 only; use a 1-D per-channel scale")]
    axis = _int_attribute(dq, "axis", 1) % rank
    seen = perm.index(axis)
    wanted = output_axis(layer, rank)
    if seen != wanted:
        return [Violation(2, dq.name, f"weight scale of {layer.op_type} {layer.name!r} is along axis {seen} of the "
                          f"weight it sees, not the output-channel axis {wanted}: TensorRT quantizes weights per "
                          "output channel; quantize the weight along its output channels")]
    return []


def _placement(graph: QDQGraph) -> list[Violation]:
    """Rule 3 on the whole graph."""
    found: list[Violation] = []
    for layer in graph.nodes:
        dq = graph.weight_dq(layer) if layer.op_type in WEIGHTED else None
        if dq is not None and graph.quantized_type(dq) == TensorProto.INT8 and graph.from_dequantize(layer.input[0]) is None:
            found.append(Violation(3, layer.name, f"INT8 weights ({dq.name!r}) with a float input {layer.input[0]!r}: "
                                   "TensorRT quantizes all inputs of a weighted layer; quantize its input (or keep "
                                   "the weight float)"))
    for q in (node for node in graph.nodes if node.op_type == "QuantizeLinear"):
        layer = graph.layer_output_of(q.input[0])
        add = graph.producer.get(q.input[0])
        residual = add is not None and add.op_type == "Add" and any(
            graph.layer_output_of(i) is not None for i in add.input)
        if layer is None and not residual:
            continue
        before = layer.name if layer is not None else add.name
        for dq in graph.dequantized_pair(q):
            for user in graph.consumers.get(dq.output[0], []):
                if user.op_type in FUSED_ACTIVATIONS:
                    found.append(Violation(3, q.name, f"Q/DQ between {before!r} and {user.op_type} {user.name!r} keeps "
                                           f"TensorRT from fusing the {user.op_type} into it; quantize after the "
                                           f"{user.op_type} (the next layer's input) instead"))
    for add in (node for node in graph.nodes if node.op_type == "Add"):
        inputs = [i for i in add.input if i not in graph.initializers]
        if len(inputs) == 1 and len(add.input) == 2 and graph.from_dequantize(inputs[0]) is not None:
            layer = graph.layer_output_of(_before_qdq(graph, inputs[0]))
            if layer is not None and layer.op_type == "MatMul":
                found.append(Violation(3, add.name, f"Q/DQ between {layer.op_type} {layer.name!r} and its bias add "
                                       f"{add.name!r} keeps TensorRT from fusing the bias; quantize after the add"))
        through_qdq = [i for i in inputs if graph.layer_output_of(_before_qdq(graph, i)) is not None
                       and graph.from_dequantize(i) is not None]
        direct = [i for i in inputs if graph.layer_output_of(i) is not None]
        if len(inputs) == 2 and through_qdq and not direct:
            found.append(Violation(3, add.name, f"every input of residual add {add.name!r} from a weighted layer passes "
                                   f"a Q/DQ ({through_qdq}), so TensorRT cannot fuse the add into that layer; "
                                   "leave the layer-to-add edge float and quantize only the residual "
                                   "(QuantConfig(share_join_quantizers=False) does)"))
    return found


def _before_qdq(graph: QDQGraph, name: str) -> str:
    """The tensor a Q -> DQ pair ending in ``name`` quantized, or ``name``."""
    dq = graph.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return name
    q = graph.producer.get(dq.input[0])
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else name


def check(model: onnx.ModelProto) -> list[Violation]:
    """Every TensorRT explicit-quantization rule ``model`` breaks (empty when it passes)."""
    graph = QDQGraph(model)
    found: list[Violation] = []
    for node in graph.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            found.extend(_symmetric(graph, node))
        if graph.is_weight_dq(node):
            found.extend(_weight_axis(graph, node))
    return found + _placement(graph)


def require(model: onnx.ModelProto) -> None:
    """Raise ``InputError`` listing every rule ``model`` breaks (see ``check``)."""
    found = check(model)
    if found:
        lines = "\n  ".join(str(violation) for violation in found[:20])
        more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
        raise InputError(f"the graph breaks {len(found)} TensorRT explicit-quantization rule(s):\n  {lines}{more}")


def _feeds_quantize(graph: QDQGraph, name: str) -> bool:
    """Whether ``name`` (or the fused activation after it) is quantized next."""
    users = graph.consumers.get(name, [])
    return any(user.op_type == "QuantizeLinear" or (
        user.op_type in FUSED_ACTIVATIONS and _feeds_quantize(graph, user.output[0])) for user in users)


def fusion_notes(model: onnx.ModelProto) -> list[str]:
    """Residual adds whose other input is float: legal, and the add still fuses into its
    layer, but the fused layer then outputs float, so the QuantizeLinear after it runs as a
    kernel of its own (TensorRT: "quantize the residual input"). Quantizing that input would
    change the simulated numerics, so the export leaves it as trained."""
    graph = QDQGraph(model)
    notes = []
    for add in (node for node in graph.nodes if node.op_type == "Add"):
        inputs = [i for i in add.input if i not in graph.initializers]
        if len(inputs) != 2 or not any(graph.layer_output_of(i) is not None for i in inputs):
            continue
        fused = next(i for i in inputs if graph.layer_output_of(i) is not None)
        other = next((i for i in inputs if i != fused), fused)
        if graph.from_dequantize(other) is None and _feeds_quantize(graph, add.output[0]):
            notes.append(f"residual add {add.name!r}: input {other!r} is float, so the layer fused with the add "
                         "outputs float and the next QuantizeLinear runs on its own")
    return notes
