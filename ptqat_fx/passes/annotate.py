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

from collections import Counter

from torch import fx

from ..config import QuantConfig
from ..layer_kinds import LayerKind, kind_of_function, kind_of_method, runs_as_kind
from ..layer_spec import LayerSpec
from ..meta import module_stack, set_layer_spec


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
    stack = module_stack(node)
    owner = next(reversed(stack.values()))[0] if stack else ""
    return f"{owner}.{node.name}" if owner else node.name


def _weighted_function_kind(node: fx.Node) -> LayerKind | None:
    kind = kind_of_function(node.target) if node.op == "call_function" else None
    return kind if kind is not None and kind.weighted else None


def _weightless_kind(node: fx.Node) -> LayerKind | None:
    if node.op == "call_function":
        kind = kind_of_function(node.target)
    elif node.op == "call_method":
        kind = kind_of_method(node.target)
    else:
        return None
    return kind if kind is not None and not kind.weighted else None


def _layer_of(gm: fx.GraphModule, node: fx.Node, calls: Counter, features: set[fx.Node]) -> LayerSpec | None:
    if node.op == "call_module":
        kind = runs_as_kind(gm.get_submodule(node.target))
        module = gm.get_submodule(node.target)
        if kind is None or len(node.args) + len(node.kwargs) != 1:
            # Extra call arguments (ConvTranspose's output_size) have no functional form here.
            return None
        calls[node.target] += 1
        name = node.target if calls[node.target] == 1 else f"{node.target}#{calls[node.target] - 1}"
        bias = f"{node.target}.bias" if module.bias is not None else None
        weight = f"{node.target}.weight"
        return LayerSpec(name, kind.name, node.target, weight, bias, _parameter_count(gm, weight, bias), -1)
    function_kind = _weighted_function_kind(node)
    if function_kind is not None:
        weight_node = _function_weight(node)
        if weight_node is None:
            return None
        bias = _function_bias(node)
        params = _parameter_count(gm, weight_node.target, bias)
        return LayerSpec(
            _functional_name(node), function_kind.name, None, weight_node.target, bias, params, -1
        )
    weightless = _weightless_kind(node)
    if weightless is not None and all(operand in features for operand in node.args[:2]):
        return LayerSpec(_functional_name(node), weightless.name, None, None, None, 0, -1)
    return None


def _makes_features(gm: fx.GraphModule, node: fx.Node, features: set[fx.Node]) -> bool:
    """Whether ``node``'s output is an activation: computed from a layer's output."""
    if any(source in features for source in node.all_input_nodes):
        return True
    if node.op == "call_module":
        return any(True for _ in gm.get_submodule(node.target).parameters())
    return _weighted_function_kind(node) is not None and _function_weight(node) is not None


def annotate(gm: fx.GraphModule, config: QuantConfig | None = None) -> fx.GraphModule:
    """Attach a ``LayerSpec`` to every quantizable node not skipped by ``config.skip``.

    Returns ``gm`` (modified in place; the graph itself is unchanged).
    """
    config = config or QuantConfig()
    calls: Counter = Counter()
    features: set[fx.Node] = set()
    index = 0
    for node in gm.graph.nodes:
        set_layer_spec(node, None)
        if _makes_features(gm, node, features):
            features.add(node)
        spec = _layer_of(gm, node, calls, features)
        if spec is None or config.skips(spec.module_path or spec.name, spec.kind):
            continue
        spec.index = index
        index += 1
        set_layer_spec(node, spec)
    return gm
