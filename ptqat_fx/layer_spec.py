"""LayerSpec: what the passes know about one quantizable layer, kept in ``node.meta``."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

from .meta import layer_spec


@dataclass
class LayerSpec:
    """One quantizable layer (one call site of a conv, linear or matmul).

    Attributes:
        name: the module path (``layer1.0.conv1``; ``#k`` appended for the k-th further call
            of a module used at several places), or the FX node name for functional layers.
        kind: ``conv2d``, ``linear``, ``conv_transpose2d``, ``matmul``...
        module_path: the module called, or None for functional layers.
        weight / bias: attribute paths of the parameters, None where the layer has none.
        params: number of weight and bias elements.
        index: position among the quantizable layers in graph (execution) order.
        w_bits / a_bits: chosen bits, set when quantizers are inserted.
        weight_quantizer / input_quantizers: module paths of its quantizers.
        discrepancy: metric name -> value, filled by the discrepancy analysis.
        selected: whether PTQAT fine-tunes it; None before selection.
    """

    name: str
    kind: str
    module_path: str | None
    weight: str | None
    bias: str | None
    params: int
    index: int
    w_bits: int | None = None
    a_bits: int | None = None
    weight_quantizer: str | None = None
    input_quantizers: tuple[str, ...] = ()
    discrepancy: dict[str, float] = field(default_factory=dict)
    selected: bool | None = None


def layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes that carry a LayerSpec, in graph order."""
    return [node for node in gm.graph.nodes if layer_spec(node) is not None]


def module_layer_specs(module: nn.Module, wrapped_calls: bool = False) -> list[LayerSpec]:
    """The LayerSpecs held by modules under ``module``: layers quantized at module level inside
    leaves and nested graphs (``layer_spec`` attribute) and, with ``wrapped_calls``, the
    layers of wrapped calls (``OpaqueCall.layer_specs``, which the analysis cannot yet measure
    and so are not selectable), in module order. Duck-typed, so that this module imports no
    runtime module (which imports ``LayerSpec``)."""
    specs: list[LayerSpec] = []
    for sub in module.modules():
        held = getattr(sub, "layer_spec", None)
        if isinstance(held, LayerSpec):
            specs.append(held)
        if wrapped_calls:
            specs.extend(s for s in getattr(sub, "layer_specs", ()) if isinstance(s, LayerSpec))
    return specs


def layer_specs(gm: fx.GraphModule) -> list[LayerSpec]:
    """Every quantizable layer of ``gm`` in execution order: the graph's LayerSpecs and, at
    each leaf module call, the module-level LayerSpecs inside that leaf (its nested graphs
    included), so report, selection and analysis see the layers a leaf runs."""
    specs: list[LayerSpec] = []
    seen: set[int] = set()
    for node in gm.graph.nodes:
        spec = layer_spec(node)
        found = [spec] if spec is not None else (
            module_layer_specs(gm.get_submodule(node.target)) if node.op == "call_module" else []
        )
        for one in found:
            if id(one) not in seen:
                seen.add(id(one))
                specs.append(one)
    return specs


def graph_layer_specs(gm: fx.GraphModule) -> list[LayerSpec]:
    """Only the LayerSpecs on ``gm``'s own graph nodes (the ones a graph rewrite can change)."""
    return [layer_spec(node) for node in layer_nodes(gm)]
