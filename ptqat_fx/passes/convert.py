"""Lower a fake-quant graph to stored integer weights and explicit quantize/dequantize ops.

Every weight fake-quant becomes an integer buffer (int8, whatever the bit width; 4-bit
weights optionally packed two per byte) and a per-channel scale, dequantized in the graph::

    fc1.weight -> fc1.weight_fake_quant -> F.linear
        becomes   fc1.weight_int (int8) * fc1.weight_scale -> F.linear

and every activation fake-quant becomes explicit quantize -> dequantize with its fixed scale::

    q = round(clamp(x / s, qmin, qmax)).to(int8)      # uint8 for unsigned ranges
    y = q * s

Only plain torch ops appear, so the result runs eagerly, under ``torch.compile`` and under
``torch.export``; its ``state_dict`` (integer weights, scales, biases, the remaining float
parameters) is the deployable artefact. The arithmetic is the fake-quantizer's, op for op,
so in float32 the converted model reproduces the fake-quant model in eval mode.

``integer_weight`` and ``require_lowerable`` are shared with the ONNX exporter, so both
lowerings store the same integers.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.proxy import GraphAppendingTracer

from ..checks import require_quantized_float32
from ..errors import CalibrationError, InputError
from ..frozen_conv import frozen_conv
from ..layer_spec import META_KEY, layer_nodes, layer_specs
from ..quantizer import FakeQuantizer, broadcast_scale, is_quantizer_node, quantizers
from .unfuse import unfuse

CONVERT_KEY = "ptqat_convert"
FROZEN_WEIGHT = "frozen_weight"
_CONV_FUNCTIONS = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}


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
    weight = _fetch(gm, node.target if node.op == "get_attr" else path).detach()
    scale = quantizer.scale.detach().float()
    step = broadcast_scale(scale, weight.dim(), quantizer.channel_axis)
    values = (weight.float() / step).clamp(quantizer.qmin, quantizer.qmax).round()
    return IntegerWeight(path, values.to(torch.int8), scale, quantizer.channel_axis, quantizer.bits)


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
    layer (``unfuse``), ``frozen_conv`` becomes ``F.conv{1,2,3}d``, and each quantizer is
    called once per input. Returns ``gm``, rewritten in place; ``convert`` and
    ``export_onnx`` start with it."""
    unfuse(gm)
    for node in layer_nodes(gm):
        if node.op == "call_function" and node.target is frozen_conv:
            node.target = _CONV_FUNCTIONS[node.meta[META_KEY].kind]
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
    return torch.round(torch.clamp(torch.div(x, scale), qmin, qmax)).to(dtype) * scale


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


def _fetch(gm: nn.Module, path: str) -> torch.Tensor:
    owner, _, leaf = path.rpartition(".")
    return getattr(gm.get_submodule(owner), leaf)


def _set_buffer(gm: nn.Module, path: str, value: torch.Tensor) -> None:
    owner, _, leaf = path.rpartition(".")
    gm.get_submodule(owner).register_buffer(leaf, value)


class _Lowering:
    def __init__(self, gm: fx.GraphModule, pack: bool) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.pack = pack
        self.stored: set[str] = set()
        self.float_weights: set[str] = set()

    def weight(self, node: fx.Node, weight: IntegerWeight) -> fx.Node:
        graph = self.graph
        packed = self.pack and weight.bits <= 4
        values_path = f"{weight.path}_int4x2" if packed else f"{weight.path}_int"
        scale_path = f"{weight.path}_scale"
        if weight.path not in self.stored:
            stored = pack_int4(weight.values) if packed else weight.values
            _set_buffer(self.gm, values_path, stored)
            _set_buffer(self.gm, scale_path, weight.broadcast_scale().clone())
            self.stored.add(weight.path)
            self.float_weights.add(weight.path)
        with graph.inserting_before(node):
            values = graph.get_attr(values_path)
            if packed:
                # The same function, run on a Proxy, writes its ops into the graph.
                values = unpack_int4(fx.Proxy(values, GraphAppendingTracer(graph)), weight.values.shape).node
            dequantized = graph.call_function(torch.mul, (values, graph.get_attr(scale_path)))
        dequantized.meta[CONVERT_KEY] = {"weight": weight.path, "bits": weight.bits, "packed": packed}
        return dequantized

    def activation(self, node: fx.Node, quantizer: FakeQuantizer) -> fx.Node:
        graph = self.graph
        scale_path = f"{node.target}.scale"
        if node.target not in self.stored:
            holder = nn.Module()
            holder.register_buffer("scale", quantizer.scale.detach().float().reshape(()).clone())
            parent, _, leaf = node.target.rpartition(".")
            setattr(self.gm.get_submodule(parent), leaf, holder)
            self.stored.add(node.target)
        integer = torch.int8 if quantizer.signed else torch.uint8
        with graph.inserting_before(node):
            tracer = GraphAppendingTracer(graph)
            x, scale = fx.Proxy(node.args[0], tracer), fx.Proxy(graph.get_attr(scale_path), tracer)
            dequantized = quantize_dequantize(x, scale, quantizer.qmin, quantizer.qmax, integer).node
        dequantized.meta[CONVERT_KEY] = {"activation": node.target, "bits": quantizer.bits, "signed": quantizer.signed}
        return dequantized


def convert(qmodel: fx.GraphModule, *, pack_int4_weights: bool = False) -> fx.GraphModule:
    """Return a copy of the calibrated fake-quant ``qmodel`` with integer weights and
    explicit quantize/dequantize ops (see the module docstring); ``qmodel`` is unchanged.

    Args:
        qmodel: a graph from ``ptqat_fx.quantize`` (fine-tuned or not).
        pack_int4_weights: store weights of 4 bits or fewer two per byte (uint8,
            ``<weight>_int4x2``), unpacked in the graph; else one int8 per weight.

    The float weights that were quantized are removed; the result is in eval mode. Each
    dequantize node records what it lowered in ``node.meta["ptqat_convert"]``.

    Raises:
        CalibrationError: a quantizer was never calibrated.
    """
    require_quantized_float32(qmodel, "convert")
    require_lowerable(qmodel)
    gm = deployable_layers(copy.deepcopy(qmodel))
    lowering = _Lowering(gm, pack_int4_weights)
    # Planned before rewriting: lowering an activation quantizer replaces its module, which
    # later calls of the same quantizer would no longer be recognised by.
    plan = [
        (node, integer_weight(gm, node), gm.get_submodule(node.target) if is_quantizer_node(gm, node) else None)
        for node in gm.graph.nodes
    ]
    for node, weight, quantizer in plan:
        if weight is not None:
            replacement = lowering.weight(node, weight)
        elif quantizer is not None:
            replacement = lowering.activation(node, quantizer)
        else:
            continue
        source = node.args[0] if node.args else None
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        if source is not None and source.op == "get_attr" and not source.users:
            gm.graph.erase_node(source)
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for path in lowering.float_weights - used:
        owner, _, leaf = path.rpartition(".")
        delattr(gm.get_submodule(owner), leaf)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


def state_dict_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s state_dict tensors: the size of the deployable artefact."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
