"""Make quantization explicit: weight and input fake-quantizers as graph nodes.

Every annotated layer becomes a functional call whose weight comes from
``get_attr -> weight FakeQuantizer`` and whose activation inputs pass an input
``FakeQuantizer`` first::

    x -> input_quantizers.x -> F.conv2d(., layer.weight -> layer.weight_fake_quant, layer.bias)

One tensor feeding several layers gets one shared input quantizer (TensorRT places Q/DQ on
layer inputs, so they share one scale), unless the layers want different bits. A module
called at several places shares one weight quantizer. Module parameters keep their paths, so
state_dict keys stay the user's. Quantizers start in ``observe`` mode.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import fx

from ..config import QuantConfig
from ..layer_kinds import kind
from ..layer_spec import LayerSpec, layer_nodes
from ..meta import layer_spec
from ..quantizer_factory import input_spec, layer_bits, model_device, non_negative, quantizable_order, weight_spec


class _Inserter:
    def __init__(self, gm: fx.GraphModule, config: QuantConfig) -> None:
        self.gm = gm
        self.config = config
        # First and last layer counted over leaf layers too, as quantize_leaves counts them.
        self.order = quantizable_order(gm, config)
        self.input_quantizers: dict[tuple[fx.Node, int], fx.Node] = {}
        # By Parameter identity: a weight tied between layers gets one quantizer.
        self.weight_quantizers: dict[int, str] = {}
        # Quantizers are made where they will run: moving each one later is a small copy
        # per quantizer (on a GPU, a host-to-device transfer each).
        self.device = model_device(gm)

    def input_quantizer(self, source: fx.Node, bits: int, before: fx.Node) -> fx.Node:
        key = (source, bits)
        if key not in self.input_quantizers:
            target = f"input_quantizers.{source.name}" + ("" if bits == self.config.a_bits else f"_a{bits}")
            self.gm.add_submodule(target, input_spec(self.config, bits, non_negative(self.gm, source)).build(self.device))
            with self.gm.graph.inserting_before(before):
                self.input_quantizers[key] = self.gm.graph.call_module(target, (source,))
        return self.input_quantizers[key]

    def weight_quantizer(self, spec: LayerSpec, bits: int, before: fx.Node) -> fx.Node:
        weight = self.gm.get_parameter(spec.weight)
        if id(weight) not in self.weight_quantizers:
            target = f"{spec.weight}_fake_quant"
            self.gm.add_submodule(target, weight_spec(self.config, kind(spec.kind), weight, bits).build(weight.device))
            self.weight_quantizers[id(weight)] = target
        target = self.weight_quantizers[id(weight)]
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.call_module(target, (self.gm.graph.get_attr(spec.weight),))

    def rewrite(self, node: fx.Node) -> None:
        spec: LayerSpec = layer_spec(node)
        w_bits, spec.a_bits = layer_bits(self.config, spec.name, self.order)
        spec.w_bits = w_bits if spec.weight is not None else None
        if spec.weight is None:
            self._rewrite_matmul(node, spec)
            return
        source = node.args[0] if node.args else node.kwargs["input"]
        quantized_input = self.input_quantizer(source, spec.a_bits, node)
        quantized_weight = self.weight_quantizer(spec, w_bits, node)
        spec.weight_quantizer = quantized_weight.target
        spec.input_quantizers = (quantized_input.target,)
        if node.op == "call_module":
            self._replace_module_call(node, spec, quantized_input, quantized_weight)
        else:
            args = list(node.args)
            args[0] = quantized_input
            args[1] = quantized_weight
            node.args = tuple(args)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("input", "weight")}

    def _rewrite_matmul(self, node: fx.Node, spec: LayerSpec) -> None:
        quantized = []
        for operand in node.args[:2]:
            if isinstance(operand, fx.Node):
                operand = self.input_quantizer(operand, spec.a_bits, node)
            quantized.append(operand)
        node.args = (*quantized, *node.args[2:])
        spec.input_quantizers = tuple(q.target for q in quantized if isinstance(q, fx.Node))

    def _replace_module_call(
        self, node: fx.Node, spec: LayerSpec, x: fx.Node, weight: fx.Node
    ) -> None:
        module = self.gm.get_submodule(node.target)
        layer_kind = kind(spec.kind)
        graph = self.gm.graph
        with graph.inserting_before(node):
            bias = graph.get_attr(spec.bias) if spec.bias is not None else None
            arguments = layer_kind.module_arguments(module)
            if getattr(module, "padding_mode", "zeros") != "zeros":
                # A padding mode other than zeros has no functional argument: pad first.
                x = graph.call_function(
                    F.pad, (x, module._reversed_padding_repeated_twice), {"mode": module.padding_mode}
                )
                arguments = (arguments[0], 0, *arguments[2:])
            call = graph.call_function(layer_kind.function, (x, weight, bias, *arguments))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)


def insert_quantizers(gm: fx.GraphModule, config: QuantConfig | None = None) -> fx.GraphModule:
    """Insert weight and input ``FakeQuantizer`` nodes for every annotated layer of ``gm``.

    Fills each LayerSpec's bits and quantizer paths. Returns ``gm``, rewritten in place.
    """
    config = config or QuantConfig()
    inserter = _Inserter(gm, config)
    for node in layer_nodes(gm):
        inserter.rewrite(node)
    gm.graph.lint()
    gm.recompile()
    return gm

