"""One shared input quantizer on every add and concat of activations.

Quantizers sit on layer inputs (``insert_quantizers``), which leaves the inputs of an add or a
concat in float. A deploy engine wants them quantized with one scale: TensorRT runs a concat
in INT8 without a reformat only when all its inputs share a scale, and fuses a residual add
into the conv before it when the other input is INT8 (NVIDIA's BEVFusion QAT shares one
quantizer across such branches by hand). This pass inserts one ``FakeQuantizer``
(``join_quantizers.<node>``) applied to each tensor input of each such node; calibration
sees all the inputs, so the scale covers them all. Enabled by
``QuantConfig.share_join_quantizers``.
"""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..config import QuantConfig
from ..meta import set_join_quantizer, tensor_meta
from ..quantizer_factory import input_spec, model_device
_ADDS = {operator.add, operator.iadd, torch.add}
_CATS = {torch.cat, torch.concat}


def _join_inputs(node: fx.Node) -> list[fx.Node]:
    if node.op == "call_function" and node.target in _CATS:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        return list(tensors) if isinstance(tensors, (list, tuple)) else []
    is_add = (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target == "add")
    return list(node.args[:2]) if is_add else []


def _is_activation(value: object) -> bool:
    if not isinstance(value, fx.Node) or value.op == "get_attr":
        return False
    meta = tensor_meta(value)
    return isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point


def quantize_joins(gm: fx.GraphModule, config: QuantConfig, example_inputs: tuple) -> fx.GraphModule:
    """Insert a shared ``FakeQuantizer`` on the inputs of every add/concat of two or more
    floating activations (found by running ``example_inputs``); returns ``gm``.

    Records the quantizer's path in ``node.meta["ptqat_join_quantizer"]``.
    """
    ShapeProp(gm).propagate(*example_inputs)
    device = model_device(gm)
    for node in list(gm.graph.nodes):
        inputs = _join_inputs(node)
        if len(inputs) < 2 or not all(_is_activation(value) for value in inputs):
            continue
        target = f"join_quantizers.{node.name}"
        # Signed whatever the inputs: a join adds or stacks branches of either sign.
        gm.add_submodule(target, input_spec(config, config.a_bits).build(device))
        with gm.graph.inserting_before(node):
            quantized = {value: gm.graph.call_module(target, (value,)) for value in dict.fromkeys(inputs)}
        node.args = fx.node.map_arg(node.args, lambda value: quantized.get(value, value))
        node.kwargs = fx.node.map_arg(node.kwargs, lambda value: quantized.get(value, value))
        set_join_quantizer(node, target)
    gm.graph.lint()
    gm.recompile()
    return gm
