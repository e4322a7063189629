"""Quantize the layers inside leaf modules and wrapped functions, which the graph cannot see.

A leaf module (one the user named, one ``trace(auto_leaf=True)`` made a leaf because it did
not trace, or a torch module called with arguments the graph rewrite does not handle) runs
its own ``forward`` eagerly. Its Conv/Linear descendants are quantized at module level
(``leaf_layers.quantize_layer_module``), so nothing quantizable is left in float silently:
every layer inside a leaf is either quantized or listed with the reason it is not (skipped by
``QuantConfig.skip``, or never called on the example inputs, so calibration could not set it).

A wrapped function (``torch.fx.wrap``) that receives layer weights as arguments gets a weight
quantizer on each such argument in the graph, and runs as an ``OpaqueCall`` that quantizes
the matching linear/conv inputs.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from ..config import QuantConfig
from ..layer_spec import META_KEY, LayerSpec
from ..leaf_layers import QUANTIZED_CLASSES, is_quantized_layer, quantize_layer_module
from .annotate import MODULE_KINDS
from ..opaque_call import OpaqueCall
from ..quantizer import FakeQuantizer
from ..capture import AUTO_LEAVES_KEY, MODULE_TYPES_KEY, AutoLeaf

LEAF_KEY = "ptqat_leaf"


def _leaf_layers(gm: fx.GraphModule) -> dict[str, list[tuple[str, nn.Module]]]:
    """Leaf path -> its Conv/Linear modules (itself included) not yet quantized, by path."""
    layers: dict[str, list[tuple[str, nn.Module]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in layers:
            continue
        leaf = gm.get_submodule(node.target)
        if isinstance(leaf, FakeQuantizer):
            continue
        found = [
            (f"{node.target}.{name}" if name else node.target, module)
            for name, module in leaf.named_modules()
            if type(module) in QUANTIZED_CLASSES and not is_quantized_layer(module)
        ]
        if found:
            layers[node.target] = found
    return layers


def _called_on(gm: fx.GraphModule, modules: list[nn.Module], example_inputs: tuple) -> set[int]:
    """ids of ``modules`` that run when ``gm`` runs on ``example_inputs``."""
    called: set[int] = set()
    handles = [m.register_forward_hook(lambda m, args, out: called.add(id(m))) for m in modules]
    was_training = gm.training
    try:
        with torch.no_grad():
            gm.eval()(*example_inputs)
    finally:
        gm.train(was_training)
        for handle in handles:
            handle.remove()
    return called


def _weight_quantizer(kind: str, weight: torch.Tensor, config: QuantConfig) -> FakeQuantizer:
    axis = 1 if kind.startswith("conv_transpose") else 0
    return FakeQuantizer(config.w_bits, True, axis, weight.shape[axis], config.w_observer, config.percentile)


def _input_quantizer(config: QuantConfig) -> FakeQuantizer:
    return FakeQuantizer(config.a_bits, True, observer=config.a_observer, percentile=config.percentile)


def _spec(path: str, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, input_quantizer: str, config: QuantConfig) -> LayerSpec:
    params = weight.numel() + (bias.numel() if bias is not None else 0)
    return LayerSpec(
        path, kind, path, f"{path}.weight", f"{path}.bias" if bias is not None else None, params, -1,
        config.w_bits, config.a_bits, f"{path}.weight_fake_quant", (input_quantizer,),
    )


def _quantize(path: str, module: nn.Module, config: QuantConfig) -> None:
    kind = MODULE_KINDS[type(module)]
    weight_quantizer = getattr(module, "weight_fake_quant", None) or _weight_quantizer(kind, module.weight, config)
    spec = _spec(path, kind, module.weight, module.bias, f"{path}.input_quantizer", config)
    quantize_layer_module(module, spec, weight_quantizer, _input_quantizer(config))


def _layer_weight(gm: fx.GraphModule, value: object) -> tuple[str, str] | None:
    """(layer path, kind) of a ``get_attr`` of a Conv/Linear weight, else None."""
    if not (isinstance(value, fx.Node) and value.op == "get_attr" and value.target.endswith(".weight")):
        return None
    path = value.target[: -len(".weight")]
    kind = gm.meta.get(MODULE_TYPES_KEY, {}).get(path)
    base = next((base for base in kind.__mro__ if base in MODULE_KINDS), None) if kind else None
    return (path, MODULE_KINDS[base]) if base is not None else None


def _quantize_wrapped_call(gm: fx.GraphModule, node: fx.Node, config: QuantConfig) -> None:
    region = f"opaque_calls.{node.name}"
    quantizers: dict[str, FakeQuantizer] = {}
    specs: list[LayerSpec] = []

    def quantized_weight(key: str, value: object) -> object:
        layer = _layer_weight(gm, value)
        if layer is None or config.skips(*layer):
            return value
        path, kind = layer
        weight, owner = gm.get_parameter(value.target), gm.get_submodule(path)
        target = f"{path}.weight_fake_quant"
        if not isinstance(getattr(owner, "weight_fake_quant", None), FakeQuantizer):
            gm.add_submodule(target, _weight_quantizer(kind, weight, config))
        quantizers[key] = _input_quantizer(config)
        specs.append(_spec(path, kind, weight, getattr(owner, "bias", None), f"{region}.input_quantizers.{key}", config))
        with gm.graph.inserting_before(node):
            return gm.graph.call_module(target, (value,))

    args = tuple(quantized_weight(str(i), value) for i, value in enumerate(node.args))
    kwargs = {name: quantized_weight(f"kw:{name}", value) for name, value in node.kwargs.items()}
    if not quantizers:
        return
    gm.add_submodule(region, OpaqueCall(node.target, quantizers, specs))
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(region, args, kwargs)
    call.meta.update(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)



def quantize_leaves(
    gm: fx.GraphModule, config: QuantConfig | None = None, example_inputs: tuple | None = None
) -> fx.GraphModule:
    """Quantize at module level every Conv/Linear inside the leaf modules of ``gm``.

    Run after ``insert_quantizers`` (which handles the layers the graph calls directly) and
    before ``calibrate``. With ``example_inputs``, layers that do not run on them stay in
    float (a quantizer that never sees data cannot be calibrated). Each leaf node gets
    ``node.meta["ptqat_leaf"] = {"quantized": [...], "float": [...]}`` and the matching
    ``AutoLeaf`` of ``gm.meta["ptqat_auto_leaves"]`` the same lists. Returns ``gm``.
    """
    config = config or QuantConfig()
    layers = _leaf_layers(gm)
    every = [module for found in layers.values() for _, module in found]
    probe = example_inputs is not None and every
    called = _called_on(gm, every, example_inputs) if probe else {id(m) for m in every}
    records: dict[str, dict[str, list[str]]] = {}
    for leaf, found in layers.items():
        record: dict[str, list[str]] = {"quantized": [], "float": []}
        for path, module in found:
            if is_quantized_layer(module):
                record["quantized"].append(path)
            elif config.skips(path, MODULE_KINDS[type(module)]):
                record["float"].append(f"{path} (QuantConfig.skip)")
            elif id(module) not in called:
                record["float"].append(f"{path} (not called on the example inputs)")
            else:
                _quantize(path, module, config)
                record["quantized"].append(path)
        records[leaf] = record
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and META_KEY not in node.meta:
            _quantize_wrapped_call(gm, node, config)
    auto: dict[str, AutoLeaf] = {leaf.path: leaf for leaf in gm.meta.get(AUTO_LEAVES_KEY, [])}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in records:
            node.meta[LEAF_KEY] = records[node.target]
    for path, record in records.items():
        if path in auto:
            auto[path].quantized, auto[path].float_layers = record["quantized"], record["float"]
    gm.graph.lint()
    gm.recompile()
    return gm


def leaf_layer_specs(gm: nn.Module) -> list[LayerSpec]:
    """The LayerSpecs of the layers this pass quantized (inside leaves and wrapped calls)."""
    specs: list[LayerSpec] = []
    for module in gm.modules():
        if is_quantized_layer(module):
            specs.append(module.layer_spec)
        elif isinstance(module, OpaqueCall):
            specs.extend(module.layer_specs)
    return specs
