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

``lowering`` (integer weights, int4 packing, the deployable form) is shared with the ONNX
exporter, so both lowerings store the same integers.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.fx.proxy import GraphAppendingTracer

from ..checks import require_quantized_float32
from ..lowering import (
    IntegerWeight, deployable_layers, integer_weight, pack_int4, quantize_dequantize, require_lowerable, set_buffer,
    unpack_int4,
)
from ..meta import set_converted
from ..runtime.quantizer import FakeQuantizer, is_quantizer_node


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
            set_buffer(self.gm, values_path, stored)
            set_buffer(self.gm, scale_path, weight.broadcast_scale().clone())
            self.stored.add(weight.path)
            self.float_weights.add(weight.path)
        with graph.inserting_before(node):
            values = graph.get_attr(values_path)
            if packed:
                # The same function, run on a Proxy, writes its ops into the graph.
                values = unpack_int4(fx.Proxy(values, GraphAppendingTracer(graph)), weight.values.shape).node
            dequantized = graph.call_function(torch.mul, (values, graph.get_attr(scale_path)))
        set_converted(dequantized, {"weight": weight.path, "bits": weight.bits, "packed": packed})
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
        set_converted(dequantized, {"activation": node.target, "bits": quantizer.bits, "signed": quantizer.signed})
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
