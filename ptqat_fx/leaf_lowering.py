"""Lowering of the quantizers no graph node calls, shared by ``convert`` and the ONNX export:
those of the module-level quantized layers inside leaf modules, and the input quantizers of
``OpaqueCall`` regions (wrapped functions such as torchvision's ``shifted_window_attention``).

A leaf runs its own ``forward``, so it cannot be lowered node by node. ``lower_leaves`` lowers
each of its layers in place (``runtime.lowered_layers``) with operand modules the caller makes:
``convert`` gives stored integers and explicit quantize/dequantize, the export gives markers.
Both read the integers from ``leaf_layers``, which computes them as the graph lowering does
(``lowering.weight_integers``, ``lowering.accumulator``), so a layer stores the same integers
whether the graph or a leaf calls it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

from .errors import CalibrationError, InputError
from .layer_kinds import kind
from .lowering import INTEGER_KINDS, IntegerBias, IntegerWeight, accumulator, weight_integers
from .runtime.lowered_layers import is_lowered_layer, lower_layer_module
from .runtime.opaque_call import OpaqueCall
from .runtime.quantized_modules import is_quantized_layer
from .runtime.quantizer import FakeQuantizer, quantizers


@dataclass(frozen=True)
class LeafLayer:
    """A module-level quantized layer and what its quantizers store.

    Attributes:
        path: the layer's module path (``body.conv``).
        module: the layer.
        weight: its integer weight (``path`` ``<layer>.weight``).
        input: its input quantizer.
        scale: with integer accumulation, ``s_x * s_w`` shaped to broadcast over the output;
            None where the layer keeps float Q/DQ arithmetic (transposed convs, layer
            subclasses with their own forward, per-channel steps off the output axis).
        bias: with integer accumulation, its int32 bias (None without a bias).
    """

    path: str
    module: nn.Module
    weight: IntegerWeight
    input: FakeQuantizer
    scale: torch.Tensor | None
    bias: IntegerBias | None


def leaf_layers(gm: nn.Module, integer: bool) -> list[LeafLayer]:
    """The module-level quantized layers of ``gm``; with ``integer``, those that integer engines
    accumulate in integers (the kinds of ``lowering.integer_layer``, in their exact quantized
    class) get the accumulator step and int32 bias."""
    found = []
    for path, module in gm.named_modules():
        if not is_quantized_layer(module) or is_lowered_layer(module):
            continue
        weight = weight_integers(f"{path}.weight", module.weight, module.weight_fake_quant)
        spec_kind = module.layer_spec.kind
        scale = bias = None
        exact = spec_kind in INTEGER_KINDS and type(module) is kind(spec_kind).quantized_module
        if integer and exact and weight.axis in (None, 0):
            given = None if module.bias is None else (f"{path}.bias", module.bias)
            scale, bias = accumulator(spec_kind, module.input_quantizer, weight, given)
        found.append(LeafLayer(path, module, weight, module.input_quantizer, scale, bias))
    return found


def opaque_input_quantizers(gm: nn.Module) -> dict[str, FakeQuantizer]:
    """The input quantizers of ``gm``'s ``OpaqueCall`` regions, by module path."""
    return {
        f"{path}.input_quantizers.{key}": quantizer
        for path, module in gm.named_modules() if isinstance(module, OpaqueCall)
        for key, quantizer in module.input_quantizers.items()
    }


def unreached_quantizers(gm: fx.GraphModule) -> list[str]:
    """Paths of the quantizers of ``gm`` that neither a graph node nor ``lower_leaves`` lowers
    (nothing should remain: a quantizer in an unknown place is reported, not left in float)."""
    used = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    used |= {node.target.rpartition(".")[0] for node in gm.graph.nodes if node.op == "get_attr"}
    layers = leaf_layers(gm, integer=False)
    owned = {id(q) for layer in layers for q in (layer.module.weight_fake_quant, layer.input)}
    owned |= {id(quantizer) for quantizer in opaque_input_quantizers(gm).values()}
    return [
        path for path, module in gm.named_modules()
        if isinstance(module, FakeQuantizer) and path not in used and id(module) not in owned
    ]


def require_lowerable(gm: fx.GraphModule) -> None:
    """Raise CalibrationError naming the first quantizer of ``gm`` still in observe mode, or
    InputError naming quantizers that neither the graph lowering nor ``lower_leaves`` reaches."""
    unreached = unreached_quantizers(gm)
    if unreached:
        raise InputError(
            f"quantizers {unreached[:3]} are neither called by the graph nor part of a module-level "
            "quantized layer or an OpaqueCall, so convert/export cannot lower them; trace the modules "
            "that hold them (drop them from leaf_modules) or skip their layers"
        )
    for name, quantizer in quantizers(gm).items():
        if not quantizer.calibrated:
            raise CalibrationError(
                f"quantizer {name!r} was never calibrated (mode 'observe'), so it has no scale "
                "to lower; run ptqat_fx.quantize(..., calib_data) or passes.calibrate first"
            )


InputOperand = Callable[[str, FakeQuantizer, bool], nn.Module]
WeightOperand = Callable[[LeafLayer], nn.Module]
Accumulate = Callable[[LeafLayer], nn.Module]


def lower_leaves(
    gm: nn.Module, integer: bool, input_operand: InputOperand, weight_operand: WeightOperand, accumulate: Accumulate
) -> nn.Module:
    """Lower, in place, every module-level quantized layer of ``gm`` and every ``OpaqueCall``
    input quantizer. ``input_operand(path, quantizer, integers)`` makes the module replacing an
    activation quantizer (``integers``: it gives the integers as float, for a layer that
    accumulates integers), ``weight_operand(layer)`` the one giving a layer's weight operand
    (integers as float where ``layer.scale`` is set), ``accumulate(layer)`` the output scaling
    of a layer with ``layer.scale``. With ``integer``, layers integer engines accumulate in
    integers take that form (``leaf_layers``). Returns ``gm``."""
    for layer in leaf_layers(gm, integer):
        integers = layer.scale is not None
        lower_layer_module(
            layer.module, input_operand(f"{layer.path}.input_quantizer", layer.input, integers),
            weight_operand(layer), accumulate(layer) if integers else None,
        )
    for path, quantizer in opaque_input_quantizers(gm).items():
        owner, _, key = path.rpartition(".")
        gm.get_submodule(owner)[key] = input_operand(path, quantizer, False)
    return gm
