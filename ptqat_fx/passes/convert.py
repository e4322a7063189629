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
from typing import Callable

import torch
from torch import fx, nn
from torch.fx.proxy import GraphAppendingTracer

from ..checks import require_quantized_float32
from ..errors import InputError
from ..layer_spec import layer_nodes
from ..lowering import (
    IntegerLayer, IntegerMatmul, IntegerWeight, deployable_layers, integer_form, integer_layer, integer_matmul,
    integer_matmul_form, integer_weight, pack_int4,
    quantize_dequantize, quantize_integers, require_lowerable, set_buffer, unpack_int4,
)
from ..meta import layer_spec, set_converted
from ..runtime.quantizer import FakeQuantizer, is_quantizer_node


class _Lowering:
    def __init__(self, gm: fx.GraphModule, pack: bool) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.pack = pack
        self.stored: set[str] = set()
        self.float_weights: set[str] = set()

    def _values(self, node: fx.Node, weight: IntegerWeight) -> fx.Node:
        """The weight's stored integers (unpacked where packed), read before ``node``."""
        graph = self.graph
        packed = self.pack and weight.bits <= 4
        values_path = f"{weight.path}_int4x2" if packed else f"{weight.path}_int"
        if weight.path not in self.stored:
            stored = pack_int4(weight.values) if packed else weight.values
            set_buffer(self.gm, values_path, stored)
            set_buffer(self.gm, f"{weight.path}_scale", weight.broadcast_scale().clone())
            self.stored.add(weight.path)
            self.float_weights.add(weight.path)
        with graph.inserting_before(node):
            values = graph.get_attr(values_path)
            if packed:
                # The same function, run on a Proxy, writes its ops into the graph.
                values = unpack_int4(fx.Proxy(values, GraphAppendingTracer(graph)), weight.values.shape).node
        return values

    def weight(self, node: fx.Node, weight: IntegerWeight) -> fx.Node:
        values = self._values(node, weight)
        with self.graph.inserting_before(node):
            dequantized = self.graph.call_function(torch.mul, (values, self.graph.get_attr(f"{weight.path}_scale")))
        set_converted(dequantized, {"weight": weight.path, "bits": weight.bits, "packed": self.pack and weight.bits <= 4})
        return dequantized

    def _activation_scale(self, target: str, quantizer: FakeQuantizer) -> str:
        """The fixed scalar step of activation quantizer ``target``, stored once."""
        if target not in self.stored:
            holder = nn.Module()
            holder.register_buffer("scale", quantizer.scale.detach().float().reshape(()).clone())
            parent, _, leaf = target.rpartition(".")
            setattr(self.gm.get_submodule(parent), leaf, holder)
            self.stored.add(target)
        return f"{target}.scale"

    def _on_input(self, node: fx.Node, quantizer: FakeQuantizer, arithmetic: Callable[..., fx.Proxy]) -> fx.Node:
        """``arithmetic(x, scale, qmin, qmax, integer dtype)`` of activation quantizer call
        ``node``'s input and stored step, written into the graph before ``node``."""
        graph = self.graph
        scale_path = self._activation_scale(node.target, quantizer)
        integer = torch.int8 if quantizer.signed else torch.uint8
        with graph.inserting_before(node):
            tracer = GraphAppendingTracer(graph)
            x, scale = fx.Proxy(node.args[0], tracer), fx.Proxy(graph.get_attr(scale_path), tracer)
            return arithmetic(x, scale, quantizer.qmin, quantizer.qmax, integer).node

    def activation(self, node: fx.Node, quantizer: FakeQuantizer) -> fx.Node:
        dequantized = self._on_input(node, quantizer, quantize_dequantize)
        set_converted(dequantized, {"activation": node.target, "bits": quantizer.bits, "signed": quantizer.signed})
        return dequantized

    def _integers(self, source: fx.Node, quantizer: FakeQuantizer) -> fx.Node:
        """``q_x`` of activation quantizer call ``source`` as float32, computed before it."""
        return self._on_input(source, quantizer, lambda *args: quantize_integers(*args).to(torch.float32))

    def integer(self, layer: IntegerLayer, quantizer: FakeQuantizer) -> None:
        """Rewrite ``layer`` into integer accumulation with its int32 bias (``integer_form``)."""
        graph, node = self.graph, layer.node
        integers = self._integers(layer.source, quantizer)
        values = self._values(node, layer.weight)
        with graph.inserting_before(node):
            weight = graph.call_method("to", (values, torch.float32))
            bias = None
            if layer.bias is not None:
                # One float bias may serve layers with different input steps: one copy each.
                base = path = f"{layer.bias.path}_int32"
                count = 0
                while path in self.stored:
                    count += 1
                    path = f"{base}_{count}"
                self.stored.add(path)
                set_buffer(self.gm, path, layer.bias.values.clone())
                set_buffer(self.gm, f"{path}_scale", layer.scale.clone())
                self.float_weights.add(layer.bias.path)
                bias_values = graph.call_method("to", (graph.get_attr(path), torch.float32))
                bias = graph.call_function(torch.mul, (bias_values, graph.get_attr(f"{path}_scale")))
        output = integer_form(self.gm, layer, integers, weight, bias)
        set_converted(output, {"integer_layer": layer_spec(node).name, "bits": layer.weight.bits})

    def matmul(self, product: IntegerMatmul, quantizer_of: dict[fx.Node, FakeQuantizer]) -> None:
        """Rewrite ``product`` into an integer matmul scaled once (``integer_matmul_form``)."""
        first, second = (self._integers(source, quantizer_of[source]) for source in product.sources)
        output = integer_matmul_form(self.gm, product, first, second)
        set_converted(output, {"integer_matmul": layer_spec(product.node).name})


ARITHMETICS = ("fake_quant", "engine")


def convert(qmodel: fx.GraphModule, *, pack_int4_weights: bool = False, arithmetic: str = "fake_quant") -> fx.GraphModule:
    """Return a copy of the calibrated fake-quant ``qmodel`` with integer weights and
    explicit quantize/dequantize ops (see the module docstring); ``qmodel`` is unchanged.

    Args:
        qmodel: a graph from ``ptqat_fx.quantize`` (fine-tuned or not).
        pack_int4_weights: store weights of 4 bits or fewer two per byte (uint8,
            ``<weight>_int4x2``), unpacked in the graph; else one int8 per weight.
        arithmetic: ``"fake_quant"`` computes what the fake-quant model computes (float
            Q/DQ; bit-identical to it in float32). ``"engine"`` computes what the exported
            ONNX file and integer engines compute: a conv/linear between a quantized input and
            a quantized weight accumulates the integers ``q_x * q_w`` (exact while partial
            sums stay below 2^24), then multiplies by ``s_x * s_w`` and adds its int32 bias
            (``<bias>_int32``; ``lowering.integer_layer``); a matmul of two quantized
            activations accumulates ``q_a @ q_b`` and multiplies by ``s_a * s_b``
            (``lowering.integer_matmul``). Compare an engine against this mode
            (docs/deploy.md has the measured agreement).

    The float weights that were quantized are removed; the result is in eval mode. Each
    dequantize node records what it lowered in ``node.meta["ptqat_convert"]``.

    Raises:
        CalibrationError: a quantizer was never calibrated.
        InputError: an unknown ``arithmetic``.
    """
    require_quantized_float32(qmodel, "convert")
    if arithmetic not in ARITHMETICS:
        raise InputError(f"arithmetic={arithmetic!r}: choose one of {ARITHMETICS}")
    require_lowerable(qmodel)
    gm = deployable_layers(copy.deepcopy(qmodel))
    lowering = _Lowering(gm, pack_int4_weights)
    # Planned before rewriting: lowering an activation quantizer replaces its module, which
    # later calls of the same quantizer would no longer be recognised by.
    plan = [
        (node, integer_weight(gm, node), gm.get_submodule(node.target) if is_quantizer_node(gm, node) else None)
        for node in gm.graph.nodes
    ]
    if arithmetic == "engine":
        layers = [layer for node in layer_nodes(gm) if (layer := integer_layer(gm, node)) is not None]
        products = [product for node in layer_nodes(gm) if (product := integer_matmul(gm, node)) is not None]
        quantizer_of = {node: quantizer for node, _, quantizer in plan if quantizer is not None}
        for layer in layers:
            lowering.integer(layer, quantizer_of[layer.source])
        for product in products:
            lowering.matmul(product, quantizer_of)
    for node, weight, quantizer in plan:
        if weight is None and quantizer is None:
            continue
        source = node.args[0] if node.args else None
        if node.users:  # else an integer layer took over its only use
            replacement = lowering.weight(node, weight) if weight is not None else lowering.activation(node, quantizer)
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
