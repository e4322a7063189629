"""The one place a ``FakeQuantizer`` is made from the user's config: config + layer ->
``QuantizerSpec`` -> ``FakeQuantizer``.

It holds the rules every pass shares: the first and last quantizable layer take
``first_layer_bits`` / ``last_layer_bits``; an input that is provably non-negative takes the
unsigned range when ``unsigned_activations`` is on; weights are per output channel along their
kind's channel axis. ``insert_quantizers`` (layers in the graph), ``quantize_leaves`` (layers
inside leaf modules and wrapped calls) and ``quantize_joins`` all build through it, so a layer
gets the same quantizers wherever the tracer left it.

"First" and "last" are positions in ``quantizable_order``: the graph's layers and, at the
place of each leaf module call, the layers inside that leaf (in module order).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .config import QuantConfig
from .layer_kinds import LayerKind, kind_of_module, quantizable_as_module
from .meta import layer_spec
from .runtime.quantized_modules import is_quantized_layer
from .runtime.quantizer import FakeQuantizer

# Producers whose output is never negative: an unsigned range doubles their resolution.
_NON_NEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Hardsigmoid)
_NON_NEGATIVE_FUNCTIONS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.softmax, torch.softmax, F.hardsigmoid}
_NON_NEGATIVE_METHODS = {"relu", "sigmoid", "softmax"}


@dataclass(frozen=True)
class QuantizerSpec:
    """Everything a ``FakeQuantizer`` is constructed from."""

    bits: int
    signed: bool = True
    channel_axis: int | None = None
    channels: int = 1
    observer: str = "mse"
    percentile: float = 99.99

    def build(self, device: torch.device | None = None) -> FakeQuantizer:
        return FakeQuantizer(
            self.bits, self.signed, self.channel_axis, self.channels, self.observer, self.percentile, device
        )


def model_device(model: nn.Module) -> torch.device | None:
    """Where the model's own parameters and buffers live (its quantizers aside), or None."""
    for module in model.modules():
        if isinstance(module, FakeQuantizer):
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            return tensor.device
    return None


def non_negative(gm: fx.GraphModule, node: object) -> bool:
    """Whether the graph value ``node`` is provably non-negative (made by a ReLU, sigmoid...)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _NON_NEGATIVE_MODULES)
    if node.op == "call_function":
        return node.target in _NON_NEGATIVE_FUNCTIONS
    return node.op == "call_method" and node.target in _NON_NEGATIVE_METHODS


def leaf_layer_modules(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, nn.Module]]:
    """The layer modules (of a registered kind, not yet quantized) that the leaf module call
    ``node`` runs, by path and in module order; empty for other nodes."""
    if node.op != "call_module" or layer_spec(node) is not None:
        return []
    leaf = gm.get_submodule(node.target)
    if isinstance(leaf, FakeQuantizer):
        return []
    return [
        (f"{node.target}.{name}" if name else node.target, module)
        for name, module in leaf.named_modules()
        if kind_of_module(module) is not None and not is_quantized_layer(module)
    ]


def quantizable_order(gm: fx.GraphModule, config: QuantConfig) -> list[str]:
    """Names of the layers to quantize in graph order: LayerSpec names, and leaf layer paths
    (those module-level quantization can take and ``config`` does not skip) at their leaf's call."""
    order: list[str] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        spec = layer_spec(node)
        if spec is not None:
            order.append(spec.name)
            continue
        for path, module in leaf_layer_modules(gm, node):
            if path not in seen and quantizable_as_module(module) and not config.skips(path, kind_of_module(module).name):
                seen.add(path)
                order.append(path)
    return order


def layer_bits(config: QuantConfig, name: str, order: list[str]) -> tuple[int, int]:
    """(weight bits, activation bits) of the layer ``name`` at its place in ``order``."""
    if order and name == order[0] and config.first_layer_bits is not None:
        return config.first_layer_bits, config.first_layer_bits
    if order and name == order[-1] and config.last_layer_bits is not None:
        return config.last_layer_bits, config.last_layer_bits
    return config.w_bits, config.a_bits


def weight_spec(config: QuantConfig, kind: LayerKind, weight: torch.Tensor, bits: int) -> QuantizerSpec:
    """Per output channel (along ``kind``'s channel axis), signed, with the weight observer."""
    axis = kind.weight_axis
    return QuantizerSpec(bits, True, axis, weight.shape[axis], config.w_observer, config.percentile)


def input_spec(config: QuantConfig, bits: int, non_negative_input: bool = False) -> QuantizerSpec:
    """Per tensor, with the activation observer; unsigned for a provably non-negative input
    when ``config.unsigned_activations``."""
    signed = not (config.unsigned_activations and non_negative_input)
    return QuantizerSpec(bits, signed, None, 1, config.a_observer, config.percentile)
