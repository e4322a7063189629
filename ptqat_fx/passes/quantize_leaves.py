"""Quantize the layers inside leaf modules, which the graph passes cannot see.

A leaf module (one the user named, one ``trace(auto_leaf=True)`` made a leaf because it did
not trace, or a torch module called with arguments the graph rewrite does not handle) runs
its own ``forward`` eagerly. Its Conv/Linear descendants are quantized at module level
(``leaf_layers.quantize_layer_module``), so nothing quantizable is left in float silently:
every layer inside a leaf is either quantized or listed with the reason it is not (skipped by
``QuantConfig.skip``, or never called on the example inputs, so calibration could not set it).
"""
from __future__ import annotations

import torch
from torch import fx, nn

from ..config import QuantConfig
from ..layer_spec import LayerSpec
from ..leaf_layers import QUANTIZED_CLASSES, is_quantized_layer, quantize_layer_module
from .annotate import MODULE_KINDS
from ..quantizer import FakeQuantizer
from ..tracing import AUTO_LEAVES_KEY, AutoLeaf

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


def _quantize(path: str, module: nn.Module, config: QuantConfig) -> None:
    kind = MODULE_KINDS[type(module)]
    axis = 1 if kind.startswith("conv_transpose") else 0
    weight_quantizer = getattr(module, "weight_fake_quant", None) or FakeQuantizer(
        config.w_bits, True, axis, module.weight.shape[axis], config.w_observer, config.percentile
    )
    input_quantizer = FakeQuantizer(config.a_bits, True, observer=config.a_observer, percentile=config.percentile)
    params = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
    spec = LayerSpec(
        path, kind, path, f"{path}.weight", f"{path}.bias" if module.bias is not None else None,
        params, -1, config.w_bits, config.a_bits, f"{path}.weight_fake_quant", (f"{path}.input_quantizer",),
    )
    quantize_layer_module(module, spec, weight_quantizer, input_quantizer)


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
    called = _called_on(gm, every, example_inputs) if example_inputs is not None else {id(m) for m in every}
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
    """The LayerSpecs of the layers quantized at module level inside leaves, by module path."""
    return [module.layer_spec for module in gm.modules() if is_quantized_layer(module)]
