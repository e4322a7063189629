"""Lowering shared by ``convert`` and the ONNX export: the integer form of every quantized
weight, int4 packing, and the deployable form of a trained graph.

``deployable_layers`` gives the layers ``freeze`` rewrote for training their plain torch form
(``unfuse``, then each frozen form back to its kind's functional form, from ``layer_kinds``);
``integer_weight`` reads the integers a weight quantizer stands for; ``integer_layer`` and
``integer_form`` give a layer the arithmetic of integer engines (integer accumulation, int32
bias), ``integer_matmul`` and ``integer_matmul_form`` a matmul of two quantized activations
(``convert(..., arithmetic="engine")`` and the ONNX export share them); ``require_lowerable``
refuses graphs that cannot be lowered node by node. ``convert`` and ``export_onnx`` both start
from these, so both lowerings store the same integers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from .errors import CalibrationError, InputError
from .layer_kinds import kind
from .layer_spec import layer_nodes, layer_specs
from .meta import layer_spec
from .passes.unfuse import unfuse
from .runtime.quantizer import FROZEN_WEIGHT, FakeQuantizer, broadcast_scale, is_quantizer_node, quantizers


@dataclass(frozen=True)
class IntegerWeight:
    """A quantized weight: ``values * scale`` (scale broadcast along ``axis``) is the weight
    the fake-quant model computes with.

    Attributes:
        path: attribute path of the float weight (``fc1.weight``).
        values: int8 tensor of the weight's shape, inside ``[-2^(bits-1), 2^(bits-1)-1]``.
        scale: float32 steps, shape ``[C]`` (``[1]`` for a per-tensor weight).
        axis: the channel axis of ``scale``, None for per-tensor.
        bits: the quantizer's bit width.
    """

    path: str
    values: torch.Tensor
    scale: torch.Tensor
    axis: int | None
    bits: int

    def broadcast_scale(self) -> torch.Tensor:
        """``scale`` shaped to multiply ``values`` directly."""
        return broadcast_scale(self.scale, self.values.dim(), self.axis)


def require_lowerable(gm: fx.GraphModule) -> None:
    """Raise CalibrationError naming the first quantizer of ``gm`` still in observe mode, or
    InputError naming the quantizers the graph does not call (inside leaf modules, which
    run their own ``forward`` and cannot be lowered node by node)."""
    used = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    used |= {node.target.rpartition(".")[0] for node in gm.graph.nodes if node.op == "get_attr"}
    hidden = [name for name in quantizers(gm) if name not in used]
    if hidden:
        raise InputError(
            f"quantizers {hidden[:3]} are inside leaf modules, which convert/export cannot "
            "lower; trace those modules (drop them from leaf_modules) or skip their layers"
        )
    for name, quantizer in quantizers(gm).items():
        if not quantizer.calibrated:
            raise CalibrationError(
                f"quantizer {name!r} was never calibrated (mode 'observe'), so it has no scale "
                "to lower; run ptqat_fx.quantize(..., calib_data) or passes.calibrate first"
            )


def integer_weight(gm: fx.GraphModule, node: fx.Node) -> IntegerWeight | None:
    """The integer form of the weight that ``node`` computes, or None when ``node`` is not a
    quantized weight.

    Recognised: a weight ``FakeQuantizer`` applied to a ``get_attr`` (the form
    ``insert_quantizers`` builds), and the ``get_attr`` of a frozen layer's constant
    dequantized weight (``<weight quantizer>.frozen_weight``, which ``freeze`` stores).
    """
    if is_quantizer_node(gm, node) and node.args[0].op == "get_attr":
        quantizer_path, path = node.target, node.args[0].target
    elif node.op == "get_attr" and node.target.endswith(f".{FROZEN_WEIGHT}"):
        quantizer_path = node.target.rpartition(".")[0]
        path = {spec.weight_quantizer: spec.weight for spec in layer_specs(gm)}.get(quantizer_path, node.target)
    else:
        return None
    quantizer = gm.get_submodule(quantizer_path)
    if not isinstance(quantizer, FakeQuantizer):
        return None
    weight = fetch(gm, node.target if node.op == "get_attr" else path).detach()
    scale = quantizer.scale.detach().float()
    step = broadcast_scale(scale, weight.dim(), quantizer.channel_axis)
    values = (weight.float() / step).clamp(quantizer.qmin, quantizer.qmax).round()
    return IntegerWeight(path, values.to(torch.int8), scale, quantizer.channel_axis, quantizer.bits)


@dataclass(frozen=True)
class IntegerBias:
    """A layer's bias as integer engines add it: ``values * scale``, with ``values`` int32
    at the accumulator's step ``scale = s_x * s_w`` (input step times weight step, per output
    channel).

    Attributes:
        path: attribute path of the float bias (``fc1.bias``).
        values: int32, ``round(bias / scale)`` (half to even, in float32), shaped to broadcast
            over the layer's output (``[1, C, 1, 1]`` for a conv2d, ``[C]`` for a linear).
        scale: float32, shape ``[C]`` (``[1]`` for a per-tensor weight).
        axis: the channel axis of ``values`` (None for a per-tensor weight).
    """

    path: str
    values: torch.Tensor
    scale: torch.Tensor
    axis: int | None

    def dequantized(self) -> torch.Tensor:
        """The float bias the engine adds: ``float(values) * scale``."""
        return self.values.float() * broadcast_scale(self.scale, self.values.dim(), self.axis)


@dataclass(frozen=True)
class IntegerLayer:
    """A conv or linear layer between a quantized activation and a quantized weight, computed
    as integer engines compute it: ``layer(q_x, q_w) * scale + bias`` with the integers
    ``q_x``, ``q_w`` as float32. Their products and sums are integers, exact in float32 in any
    summation order while every partial sum stays below 2^24, so every runtime gets the same
    accumulator, and what follows is one float multiply and one add: the simulation and the
    engine round each activation alike (float Q/DQ arithmetic is not deterministic under
    reordering of a reduction, and a deep network amplifies each rounding flip).

    Attributes:
        node: the layer call.
        source: the activation quantizer call the layer takes as input.
        weight: its integer weight.
        scale: ``s_x * s_w``, float32, shaped to broadcast over the layer's output.
        bias: its int32 bias, None where the layer has none.
    """

    node: fx.Node
    source: fx.Node
    weight: IntegerWeight
    scale: torch.Tensor
    bias: IntegerBias | None


INTEGER_KINDS = ("linear", "conv1d", "conv2d", "conv3d")
INT32_RANGE = (-(2**31), 2**31 - 1)


def bias_argument(node: fx.Node) -> fx.Node | None:
    """The ``get_attr`` that a conv/linear layer call takes as its bias, or None."""
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return bias if isinstance(bias, fx.Node) and bias.op == "get_attr" else None


def integer_layer(gm: fx.GraphModule, node: fx.Node) -> IntegerLayer | None:
    """``node`` as an ``IntegerLayer``, or None where it is not one: a conv/linear call
    (``INTEGER_KINDS``) whose input is an activation quantizer (per-tensor step ``s_x``) and
    whose weight is quantized with one step per output channel (or per tensor)."""
    spec = layer_spec(node)
    if spec is None or spec.kind not in INTEGER_KINDS or node.op != "call_function" or len(node.args) < 2:
        return None
    source, weight_node = node.args[0], node.args[1]
    if not (isinstance(source, fx.Node) and is_quantizer_node(gm, source) and source.args[0].op != "get_attr"):
        return None
    weight = integer_weight(gm, weight_node) if isinstance(weight_node, fx.Node) else None
    if weight is None or weight.axis not in (None, 0):
        return None
    bias_node = bias_argument(node)
    given = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if given is not None and bias_node is None:
        return None  # a computed bias: keep the float layer
    step = gm.get_submodule(source.target).scale.detach().float().reshape(())
    channels = (step * weight.scale.float()).reshape(-1)
    axis = None if channels.numel() == 1 else (0 if spec.kind == "linear" else 1)
    ndim = 1 if spec.kind == "linear" else weight.values.dim()
    bias = None
    if bias_node is not None:
        values = fetch(gm, bias_node.target).detach().float()
        integers = torch.round(values / channels).clamp(*INT32_RANGE).to(torch.int32)
        bias = IntegerBias(bias_node.target, broadcast_scale(integers, ndim, axis) if axis is not None else integers,
                           channels, axis)
    return IntegerLayer(node, source, weight, broadcast_scale(channels, ndim, axis), bias)


def integer_form(
    gm: fx.GraphModule, layer: IntegerLayer, integers: fx.Node, weight: fx.Node, bias: fx.Node | None
) -> fx.Node:
    """Rewrite ``layer.node`` into ``layer(integers, weight) * scale (+ bias)``: ``integers``
    and ``weight`` are nodes giving ``q_x`` and ``q_w`` as float32, ``bias`` the dequantized
    int32 bias. The scale is stored as ``<weight>_accumulator_scale`` (suffixed where one
    weight serves several calls). Returns the node that now gives the layer's output."""
    node, graph = layer.node, gm.graph
    owner, _, leaf = f"{layer.weight.path}_accumulator_scale".rpartition(".")
    module, name, count = gm.get_submodule(owner), leaf, 0
    while hasattr(module, name):
        count += 1
        name = f"{leaf}_{count}"
    module.register_buffer(name, layer.scale.clone())
    node.args = (integers, weight, None, *node.args[3:]) if len(node.args) > 2 else (integers, weight)
    node.kwargs = {key: value for key, value in node.kwargs.items() if key != "bias"}
    with graph.inserting_after(node):
        scale = graph.get_attr(f"{owner}.{name}" if owner else name)
    with graph.inserting_after(scale):
        scaled = output = graph.call_function(torch.mul, (node, scale))
    if bias is not None:
        with graph.inserting_after(output):
            output = graph.call_function(torch.add, (output, bias))
    node.replace_all_uses_with(output, delete_user_cb=lambda user: user is not scaled)
    return output


@dataclass(frozen=True)
class IntegerMatmul:
    """A matmul of two quantized activations (attention's ``q @ k^T`` and ``softmax @ v``),
    computed as ``(q_a @ q_b) * scale`` with the integers ``q_a``, ``q_b`` as float32: exact
    in any summation order while partial sums stay below 2^24, like ``IntegerLayer``.

    Its output is a plain float tensor: the activation quantizer after it quantizes
    ``acc * scale`` as a float QuantizeLinear does. An engine that instead fuses that
    QuantizeLinear into the matmul (onnxruntime's ``QLinearMatMul`` requantizes with one
    combined multiplier ``s_a s_b / s_y``) rounds differently at the rare near-ties, and a
    deep network amplifies each flip (3.7 output steps on 0.5% of the 4-bit ViT's outputs);
    the multiply between the matmul and the quantizer is what keeps every runtime on this
    arithmetic.

    Attributes:
        node: the matmul call.
        sources: the activation quantizer calls of its two operands.
        scale: ``s_a * s_b``, a float32 scalar.
    """

    node: fx.Node
    sources: tuple[fx.Node, fx.Node]
    scale: torch.Tensor


def _is_activation_quantizer(gm: fx.GraphModule, node: object) -> bool:
    return isinstance(node, fx.Node) and is_quantizer_node(gm, node) and node.args[0].op != "get_attr"


def integer_matmul(gm: fx.GraphModule, node: fx.Node) -> IntegerMatmul | None:
    """``node`` as an ``IntegerMatmul``, or None where it is not a matmul layer whose two
    operands are activation quantizer calls."""
    spec = layer_spec(node)
    if spec is None or spec.kind != "matmul" or len(node.args) != 2 or node.kwargs:
        return None
    first, second = node.args
    if not (_is_activation_quantizer(gm, first) and _is_activation_quantizer(gm, second)):
        return None
    steps = [gm.get_submodule(source.target).scale.detach().float().reshape(()) for source in (first, second)]
    return IntegerMatmul(node, (first, second), steps[0] * steps[1])


def integer_matmul_form(gm: fx.GraphModule, product: IntegerMatmul, first: fx.Node, second: fx.Node) -> fx.Node:
    """Rewrite ``product.node`` into ``matmul(first, second) * scale``: ``first`` and
    ``second`` are nodes giving ``q_a`` and ``q_b`` as float32. The scale is stored as a root
    buffer ``<layer>_accumulator_scale``. Returns the node that now gives the product."""
    node, graph = product.node, gm.graph
    name = f"{layer_spec(node).name.replace('.', '_')}_accumulator_scale"
    while hasattr(gm, name):
        name = f"{name}_"
    gm.register_buffer(name, product.scale.clone())
    node.args = (first, second)
    with graph.inserting_after(node):
        scale = graph.get_attr(name)
    with graph.inserting_after(scale):
        output = graph.call_function(torch.mul, (node, scale))
    node.replace_all_uses_with(output, delete_user_cb=lambda user: user is not output)
    return output


def _share_quantizer_calls(gm: fx.GraphModule) -> None:
    """One call per quantizer and input, as ``insert_quantizers`` made them: the first in
    graph order serves the later ones."""
    first: dict[tuple, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if is_quantizer_node(gm, node):
            key = (node.target, node.args[0])
            if key in first:
                node.replace_all_uses_with(first[key])
                gm.graph.erase_node(node)
            else:
                first[key] = node


def deployable_layers(gm: fx.GraphModule) -> fx.GraphModule:
    """Give the layers ``freeze`` rewrote for training their plain torch form, which computes
    the same forward: fused ``quantized_*`` calls become their input quantizers' calls and the
    layer (``unfuse``), a frozen form (``frozen_conv``) becomes its kind's function, and each quantizer is
    called once per input. Returns ``gm``, rewritten in place; ``convert`` and
    ``export_onnx`` start with it."""
    unfuse(gm)
    for node in layer_nodes(gm):
        layer_kind = kind(layer_spec(node).kind)
        if node.op == "call_function" and layer_kind.frozen is not None and node.target is layer_kind.frozen:
            node.target = layer_kind.function
    _share_quantizer_calls(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    """Explicit quantize (``round(clamp(x / scale))`` stored as ``dtype``) then dequantize
    (times ``scale``): the fake-quantizer's arithmetic, op for op. Plain tensor ops, so it
    also traces (``convert`` records it into the graph)."""
    return quantize_integers(x, scale, qmin, qmax, dtype) * scale


def quantize_integers(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    """The integers of ``quantize_dequantize``: ``round(clamp(x / scale))`` stored as ``dtype``."""
    return torch.round(torch.clamp(torch.div(x, scale), qmin, qmax)).to(dtype)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit values per byte (element 2i in the low nibble), flattened; an odd
    count is padded with a zero."""
    flat = values.flatten().to(torch.uint8) & 0xF
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack_int4``: the int8 tensor of ``shape``. Plain tensor ops, so it also
    traces (``convert`` records it into the graph)."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], -1).flatten().to(torch.int8)
    count = math.prod(shape)
    return ((nibbles ^ 8) - 8)[:count].reshape(tuple(shape))


def fetch(gm: nn.Module, path: str) -> torch.Tensor:
    owner, _, leaf = path.rpartition(".")
    return getattr(gm.get_submodule(owner), leaf)


def set_buffer(gm: nn.Module, path: str, value: torch.Tensor) -> None:
    owner, _, leaf = path.rpartition(".")
    gm.get_submodule(owner).register_buffer(leaf, value)
