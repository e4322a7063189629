"""Quantize the layers inside leaf modules and wrapped functions, which the graph cannot see.

A leaf module (one the user named, one ``trace(auto_leaf=True)`` made a leaf because it did
not trace, or a torch module called with arguments the graph rewrite does not handle) runs
its own ``forward`` eagerly. Its Conv/Linear descendants are quantized at module level
(``runtime.quantized_modules.quantize_layer_module``), so nothing quantizable is left in float silently:
every layer inside a leaf is either quantized or listed with the reason it is not (skipped by
``QuantConfig.skip``, or never called on the example inputs, so calibration could not set it).

A wrapped function (``torch.fx.wrap``) that receives layer weights as arguments gets a weight
quantizer on each such argument in the graph, and runs as an ``OpaqueCall`` that quantizes
the matching linear/conv inputs.
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from ..config import QuantConfig
from ..layer_kinds import LayerKind, kind_of_module, kind_of_type, quantizable_as_module, torch_function_forms
from ..layer_spec import LayerSpec, graph_layer_specs, layer_specs, module_layer_specs
from ..meta import auto_leaves, layer_spec, module_types, set_leaf_record
from ..quantizer_factory import (
    QuantizerSpec, input_spec, layer_bits, leaf_layer_modules, non_negative, quantizable_order, weight_spec,
)
from ..runtime.opaque_call import OpaqueCall
from ..runtime.quantized_modules import is_quantized_layer, quantize_layer_module, quantized_subclass
from ..runtime.quantizer import FakeQuantizer
from ..capture import AutoLeaf


def _leaf_layers(gm: fx.GraphModule) -> dict[str, list[tuple[str, nn.Module]]]:
    """Leaf path -> its layer modules (itself included) not yet quantized, by path."""
    layers: dict[str, list[tuple[str, nn.Module]]] = {}
    for node in gm.graph.nodes:
        if node.target not in layers:
            found = leaf_layer_modules(gm, node)
            if found:
                layers[node.target] = found
    return layers


def _leaf_inputs(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Leaf path -> the graph value it is called on, for leaves that are a layer themselves
    (their input's producer is in the graph, so the unsigned rule can see it)."""
    return {
        node.target: node.args[0] for node in gm.graph.nodes
        if node.op == "call_module" and node.args and kind_of_module(gm.get_submodule(node.target)) is not None
    }


class _BaseCallProbe(TorchFunctionMode):
    """Records which modules pass their own ``weight`` to their kind's functional form while
    they run (the base-class call a subclass forward ends in)."""

    def __init__(self, functions: frozenset) -> None:
        super().__init__()
        self.functions = functions
        self.running: list[nn.Module] = []
        self.calls_base: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        if self.running and func in self.functions:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is self.running[-1]._parameters.get("weight"):
                self.calls_base.add(id(self.running[-1]))
        return func(*args, **kwargs)


def _called_on(gm: fx.GraphModule, modules: list[nn.Module], example_inputs: tuple) -> tuple[set[int], set[int]]:
    """ids of ``modules`` that run when ``gm`` runs on ``example_inputs``, and of those whose
    run passes their own weight to their kind's functional form."""
    called: set[int] = set()
    probe = _BaseCallProbe(frozenset(f for k in _kinds_of(modules) for f in k.functions))

    def enter(module: nn.Module, args: tuple) -> None:
        probe.running.append(module)

    def leave(module: nn.Module, args: tuple, out: object) -> None:
        called.add(id(module))
        probe.running.pop()

    handles = [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    was_training = gm.training
    try:
        with torch.no_grad(), probe:
            gm.eval()(*example_inputs)
    finally:
        gm.train(was_training)
        for handle in handles:
            handle.remove()
    return called, probe.calls_base


def _kinds_of(modules: list[nn.Module]) -> list[LayerKind]:
    """The distinct kinds of ``modules``."""
    kinds = {kind_of_module(m).name: kind_of_module(m) for m in modules}
    return list(kinds.values())


class _Layers:
    """Makes the quantizers and LayerSpecs of the layers this pass quantizes, through the
    quantizer factory, so leaf layers follow the first/last-layer and unsigned rules too."""

    def __init__(self, gm: fx.GraphModule, config: QuantConfig) -> None:
        self.config = config
        self.order = quantizable_order(gm, config)
        self.leaf_inputs = _leaf_inputs(gm)
        self.gm = gm
        # One quantizer per Parameter (tied weights): the graph's, then the first leaf use's.
        self.weight_quantizers: dict[int, FakeQuantizer] = {
            id(gm.get_parameter(spec.weight)): gm.get_submodule(spec.weight_quantizer)
            for spec in graph_layer_specs(gm) if spec.weight is not None and spec.weight_quantizer is not None
        }

    def quantizer_specs(self, path: str, kind: LayerKind, weight: torch.Tensor) -> tuple[QuantizerSpec, QuantizerSpec]:
        w_bits, a_bits = layer_bits(self.config, path, self.order)
        unsigned = non_negative(self.gm, self.leaf_inputs.get(path))
        return weight_spec(self.config, kind, weight, w_bits), input_spec(self.config, a_bits, unsigned)

    def spec(self, path: str, kind: LayerKind, weight: torch.Tensor, bias: torch.Tensor | None, input_quantizer: str) -> LayerSpec:
        params = weight.numel() + (bias.numel() if bias is not None else 0)
        w_bits, a_bits = layer_bits(self.config, path, self.order)
        return LayerSpec(
            path, kind.name, path, f"{path}.weight", f"{path}.bias" if bias is not None else None, params, -1,
            w_bits, a_bits, f"{path}.weight_fake_quant", (input_quantizer,),
        )

    def quantize(self, path: str, module: nn.Module) -> None:
        kind = kind_of_module(module)
        w_spec, a_spec = self.quantizer_specs(path, kind, module.weight)
        device = module.weight.device
        weight_quantizer = getattr(module, "weight_fake_quant", None)
        if weight_quantizer is None:
            if id(module.weight) not in self.weight_quantizers:
                self.weight_quantizers[id(module.weight)] = w_spec.build(device)
            weight_quantizer = self.weight_quantizers[id(module.weight)]
        spec = self.spec(path, kind, module.weight, module.bias, f"{path}.input_quantizer")
        quantized_class = kind.quantized_module if quantizable_as_module(module) else quantized_subclass(type(module))
        quantize_layer_module(module, quantized_class, spec, weight_quantizer, a_spec.build(device))


def _layer_weight(gm: fx.GraphModule, value: object) -> tuple[str, LayerKind] | None:
    """(layer path, kind) of a ``get_attr`` of a layer module's weight, else None."""
    if not (isinstance(value, fx.Node) and value.op == "get_attr" and value.target.endswith(".weight")):
        return None
    path = value.target[: -len(".weight")]
    cls = module_types(gm).get(path)
    kind = kind_of_type(cls) if cls else None
    return (path, kind) if kind is not None and kind.weighted else None


def _quantize_wrapped_call(gm: fx.GraphModule, node: fx.Node, config: QuantConfig, layers: _Layers) -> bool:
    """Wrap ``node`` in an ``OpaqueCall`` quantizing the layer weights it reads; whether it did."""
    region = f"opaque_calls.{node.name}"
    quantizers: dict[str, FakeQuantizer] = {}
    specs: list[LayerSpec] = []

    def quantized_weight(key: str, value: object) -> object:
        layer = _layer_weight(gm, value)
        if layer is None or config.skips(layer[0], layer[1].name):
            return value
        path, kind = layer
        weight, owner = gm.get_parameter(value.target), gm.get_submodule(path)
        target = f"{path}.weight_fake_quant"
        w_spec, a_spec = layers.quantizer_specs(path, kind, weight)
        if not isinstance(getattr(owner, "weight_fake_quant", None), FakeQuantizer):
            gm.add_submodule(target, w_spec.build(weight.device))
        quantizers[key] = a_spec.build(weight.device)
        specs.append(layers.spec(path, kind, weight, getattr(owner, "bias", None), f"{region}.input_quantizers.{key}"))
        with gm.graph.inserting_before(node):
            return gm.graph.call_module(target, (value,))

    args = tuple(quantized_weight(str(i), value) for i, value in enumerate(node.args))
    kwargs = {name: quantized_weight(f"kw:{name}", value) for name, value in node.kwargs.items()}
    if not quantizers:
        return False
    gm.add_submodule(region, OpaqueCall(node.target, quantizers, specs, torch_function_forms()))
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(region, args, kwargs)
    call.meta.update(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return True



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
    factory = _Layers(gm, config)
    layers = _leaf_layers(gm)
    every = [module for found in layers.values() for _, module in found]
    probe = example_inputs is not None and every
    called, calls_base = _called_on(gm, every, example_inputs) if probe else ({id(m) for m in every}, set())
    records: dict[str, dict[str, list[str]]] = {}
    for leaf, found in layers.items():
        record: dict[str, list[str]] = {"quantized": [], "float": []}
        for path, module in found:
            if is_quantized_layer(module):
                record["quantized"].append(path)
            elif config.skips(path, kind_of_module(module).name):
                record["float"].append(f"{path} (QuantConfig.skip)")
            elif id(module) not in called:
                record["float"].append(f"{path} (not called on the example inputs)")
            elif not quantizable_as_module(module) and (kind_of_module(module).quantized_module is None or id(module) not in calls_base):
                base = kind_of_module(module).module_type.__name__
                record["float"].append(
                    f"{path} ({type(module).__name__} subclasses {base} with a forward that does not pass "
                    f"self.weight to the {base} function)"
                )
            else:
                factory.quantize(path, module)
                record["quantized"].append(path)
        records[leaf] = record
    rewritten = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and layer_spec(node) is None:
            rewritten |= _quantize_wrapped_call(gm, node, config, factory)
    auto: dict[str, AutoLeaf] = {leaf.path: leaf for leaf in auto_leaves(gm)}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in records:
            set_leaf_record(node, records[node.target])
    for path, record in records.items():
        if path in auto:
            auto[path].quantized, auto[path].float_layers = record["quantized"], record["float"]
    for index, spec in enumerate(layer_specs(gm)):
        spec.index = index  # execution order over graph and leaf layers: ties in selection break by it
    if rewritten:
        # Only wrapped calls change the graph (leaf layers change inside their modules), and
        # generating its code again costs 10-25 ms (ResNet-50, ViT-B/16).
        gm.graph.lint()
        gm.recompile()
    return gm


def leaf_layer_specs(gm: nn.Module) -> list[LayerSpec]:
    """The LayerSpecs of the layers this pass quantized (inside leaves and wrapped calls)."""
    return module_layer_specs(gm, wrapped_calls=True)
