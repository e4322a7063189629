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


import torch
import torch.nn.functional as F
from torch import fx, nn

from ..config import QuantConfig
from ..layer_spec import META_KEY, LayerSpec, layer_nodes
from ..runtime.quantizer import FakeQuantizer

# Producers whose output is never negative: an unsigned range doubles their resolution.
_NON_NEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Hardsigmoid)
_NON_NEGATIVE_FUNCTIONS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.softmax, torch.softmax, F.hardsigmoid}
_NON_NEGATIVE_METHODS = {"relu", "sigmoid", "softmax"}

_CONV_FUNCTIONS = {
    "conv1d": F.conv1d,
    "conv2d": F.conv2d,
    "conv3d": F.conv3d,
    "conv_transpose1d": F.conv_transpose1d,
    "conv_transpose2d": F.conv_transpose2d,
    "conv_transpose3d": F.conv_transpose3d,
}


def _non_negative(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _NON_NEGATIVE_MODULES)
    if node.op == "call_function":
        return node.target in _NON_NEGATIVE_FUNCTIONS
    return node.op == "call_method" and node.target in _NON_NEGATIVE_METHODS


def _layer_bits(spec: LayerSpec, count: int, config: QuantConfig) -> tuple[int, int]:
    if spec.index == 0 and config.first_layer_bits is not None:
        return config.first_layer_bits, config.first_layer_bits
    if spec.index == count - 1 and config.last_layer_bits is not None:
        return config.last_layer_bits, config.last_layer_bits
    return config.w_bits, config.a_bits


class _Inserter:
    def __init__(self, gm: fx.GraphModule, config: QuantConfig) -> None:
        self.gm = gm
        self.config = config
        self.input_quantizers: dict[tuple[fx.Node, int], fx.Node] = {}
        self.weight_quantizers: dict[str, str] = {}

    def input_quantizer(self, source: fx.Node, bits: int, before: fx.Node) -> fx.Node:
        key = (source, bits)
        if key not in self.input_quantizers:
            signed = not (self.config.unsigned_activations and _non_negative(self.gm, source))
            target = f"input_quantizers.{source.name}" + ("" if bits == self.config.a_bits else f"_a{bits}")
            quantizer = FakeQuantizer(
                bits, signed, observer=self.config.a_observer, percentile=self.config.percentile
            )
            self.gm.add_submodule(target, quantizer)
            with self.gm.graph.inserting_before(before):
                self.input_quantizers[key] = self.gm.graph.call_module(target, (source,))
        return self.input_quantizers[key]

    def weight_quantizer(self, spec: LayerSpec, bits: int, before: fx.Node) -> fx.Node:
        if spec.weight not in self.weight_quantizers:
            weight = self.gm.get_parameter(spec.weight)
            axis = 1 if spec.kind.startswith("conv_transpose") else 0
            quantizer = FakeQuantizer(
                bits,
                signed=True,
                channel_axis=axis,
                channels=weight.shape[axis],
                observer=self.config.w_observer,
                percentile=self.config.percentile,
            )
            target = f"{spec.weight}_fake_quant"
            self.gm.add_submodule(target, quantizer)
            self.weight_quantizers[spec.weight] = target
        target = self.weight_quantizers[spec.weight]
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.call_module(target, (self.gm.graph.get_attr(spec.weight),))

    def rewrite(self, node: fx.Node, count: int) -> None:
        spec: LayerSpec = node.meta[META_KEY]
        w_bits, spec.a_bits = _layer_bits(spec, count, self.config)
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
        graph = self.gm.graph
        with graph.inserting_before(node):
            bias = graph.get_attr(spec.bias) if spec.bias is not None else None
            if spec.kind == "linear":
                call = graph.call_function(F.linear, (x, weight, bias))
            elif spec.kind.startswith("conv_transpose"):
                call = graph.call_function(
                    _CONV_FUNCTIONS[spec.kind],
                    (x, weight, bias, module.stride, module.padding, module.output_padding,
                     module.groups, module.dilation),
                )
            else:
                padding = module.padding
                if module.padding_mode != "zeros":
                    x = graph.call_function(
                        F.pad, (x, module._reversed_padding_repeated_twice), {"mode": module.padding_mode}
                    )
                    padding = 0
                call = graph.call_function(
                    _CONV_FUNCTIONS[spec.kind],
                    (x, weight, bias, module.stride, padding, module.dilation, module.groups),
                )
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)


def insert_quantizers(gm: fx.GraphModule, config: QuantConfig | None = None) -> fx.GraphModule:
    """Insert weight and input ``FakeQuantizer`` nodes for every annotated layer of ``gm``.

    Fills each LayerSpec's bits and quantizer paths. Returns ``gm``, rewritten in place.
    """
    config = config or QuantConfig()
    inserter = _Inserter(gm, config)
    nodes = layer_nodes(gm)
    for node in nodes:
        inserter.rewrite(node, len(nodes))
    gm.graph.lint()
    gm.recompile()
    return gm

