"""Mark the quantizable layers of a traced graph with a ``LayerSpec``.

Quantizable: convolutions (1-3d), transposed convolutions, linear layers (as modules or as
functional calls on a parameter) and matrix products of two activations (``matmul``, ``@``,
``bmm``, ``mm``). Everything else (norms, softmax, sampling, geometry) stays in float.

An activation here is a tensor computed from the output of a layer (or of a module with
parameters the tracer kept whole). A matrix product with an operand that is not, such as
camera matrices times pixel rays or box centres projected by ``lidar2img``, is geometry: an
8-bit grid over coordinates tens of metres wide would move points across BEV cells, so it
stays in float.
"""
from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..config import QuantConfig
from ..layer_spec import META_KEY, LayerSpec

MODULE_KINDS: dict[type, str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d",
    nn.ConvTranspose1d: "conv_transpose1d",
    nn.ConvTranspose2d: "conv_transpose2d",
    nn.ConvTranspose3d: "conv_transpose3d",
}
FUNCTION_KINDS: dict[object, str] = {
    F.linear: "linear",
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d",
    F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d",
}
MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm, torch.mm}
MATMUL_METHODS = {"matmul", "bmm", "mm"}


def _parameter_count(gm: fx.GraphModule, *paths: str | None) -> int:
    return sum(gm.get_parameter(path).numel() for path in paths if path is not None)


def _function_weight(node: fx.Node) -> fx.Node | None:
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    return weight if isinstance(weight, fx.Node) and weight.op == "get_attr" else None


def _function_bias(node: fx.Node) -> str | None:
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return bias.target if isinstance(bias, fx.Node) and bias.op == "get_attr" else None


def _functional_name(node: fx.Node) -> str:
    """``blocks.0.attn.matmul_1``: the innermost module that made the call, then the node."""
    stack = node.meta.get("nn_module_stack") or {}
    owner = next(reversed(stack.values()))[0] if stack else ""
    return f"{owner}.{node.name}" if owner else node.name


def _layer_of(gm: fx.GraphModule, node: fx.Node, calls: Counter, features: set[fx.Node]) -> LayerSpec | None:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        kind = MODULE_KINDS.get(type(module))
        if kind is None or len(node.args) + len(node.kwargs) != 1:
            # Extra call arguments (ConvTranspose's output_size) have no functional form here.
            return None
        calls[node.target] += 1
        name = node.target if calls[node.target] == 1 else f"{node.target}#{calls[node.target] - 1}"
        bias = f"{node.target}.bias" if module.bias is not None else None
        weight = f"{node.target}.weight"
        return LayerSpec(name, kind, node.target, weight, bias, _parameter_count(gm, weight, bias), -1)
    if node.op == "call_function" and node.target in FUNCTION_KINDS:
        weight_node = _function_weight(node)
        if weight_node is None:
            return None
        bias = _function_bias(node)
        params = _parameter_count(gm, weight_node.target, bias)
        return LayerSpec(
            _functional_name(node), FUNCTION_KINDS[node.target], None, weight_node.target, bias, params, -1
        )
    is_matmul = (node.op == "call_function" and node.target in MATMUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in MATMUL_METHODS
    )
    if is_matmul and all(operand in features for operand in node.args[:2]):
        return LayerSpec(_functional_name(node), "matmul", None, None, None, 0, -1)
    return None


def _makes_features(gm: fx.GraphModule, node: fx.Node, features: set[fx.Node]) -> bool:
    """Whether ``node``'s output is an activation: computed from a layer's output."""
    if any(source in features for source in node.all_input_nodes):
        return True
    if node.op == "call_module":
        return any(True for _ in gm.get_submodule(node.target).parameters())
    return node.op == "call_function" and node.target in FUNCTION_KINDS and _function_weight(node) is not None


def annotate(gm: fx.GraphModule, config: QuantConfig | None = None) -> fx.GraphModule:
    """Attach a ``LayerSpec`` to every quantizable node not skipped by ``config.skip``.

    Returns ``gm`` (modified in place; the graph itself is unchanged).
    """
    config = config or QuantConfig()
    calls: Counter = Counter()
    features: set[fx.Node] = set()
    index = 0
    for node in gm.graph.nodes:
        node.meta.pop(META_KEY, None)
        if _makes_features(gm, node, features):
            features.add(node)
        spec = _layer_of(gm, node, calls, features)
        if spec is None or config.skips(spec.module_path or spec.name, spec.kind):
            continue
        spec.index = index
        index += 1
        node.meta[META_KEY] = spec
    return gm
