"""Module-level quantized layers whose quantizers ``convert`` or the ONNX export lowered.

A layer inside a leaf module (``quantized_modules``) runs in its leaf's own ``forward``, which
no graph pass can rewrite. It is lowered in place instead: ``lower_layer_module`` swaps its
class for a lowered subclass whose operands come from two modules, ``input_quantizer`` (the
input: ``x -> operand``) and ``weight_operand`` (the weight: ``() -> operand``), and, where the
layer accumulates integers, an ``accumulation`` applied to the layer's output. The lowered
forms are the graph's, op for op (``convert`` writes the same functions into graphs):

- ``QuantizeDequantize``: an activation quantizer's explicit quantize -> dequantize with its
  fixed step (or, for integer accumulation, the integers as float32);
- ``StoredWeight``: a weight's stored integers (int8, or two int4 per byte) times its steps
  (or the integers as float32);
- ``Accumulation``: ``y * (s_x * s_w) + float(bias_int32) * (s_x * s_w)``, the integer engine's
  scaling of a layer computed on integers with its bias removed.

The export gives the same layers marker modules as operands instead. The float weight is gone
from the lowered layer (``weight`` is None), so its ``state_dict`` is the deployable one.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .quantized_modules import is_quantized_layer


def quantize_integers(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    """The integers of ``quantize_dequantize``: ``round(clamp(x / scale))`` stored as ``dtype``."""
    return torch.round(torch.clamp(torch.div(x, scale), qmin, qmax)).to(dtype)


def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, dtype: torch.dtype
) -> torch.Tensor:
    """Explicit quantize (``round(clamp(x / scale))`` stored as ``dtype``) then dequantize
    (times ``scale``): the fake-quantizer's arithmetic, op for op. Plain tensor ops, so it
    also traces (``convert`` records it into the graph)."""
    return quantize_integers(x, scale, qmin, qmax, dtype) * scale


def unpack_int4(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``lowering.pack_int4``: the int8 tensor of ``shape``. Plain tensor ops, so it
    also traces (``convert`` records it into the graph)."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], -1).flatten().to(torch.int8)
    count = math.prod(shape)
    return ((nibbles ^ 8) - 8)[:count].reshape(tuple(shape))


class QuantizeDequantize(nn.Module):
    """An activation quantizer with a fixed step ``scale`` (a 0-dim buffer): explicit
    quantize to ``dtype`` then dequantize, or with ``integers`` the integers as float32."""

    def __init__(self, scale: torch.Tensor, qmin: int, qmax: int, dtype: torch.dtype, integers: bool = False) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().float().reshape(()).clone())
        self.qmin, self.qmax, self.dtype, self.integers = qmin, qmax, dtype, integers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.integers:
            return quantize_integers(x, self.scale, self.qmin, self.qmax, self.dtype).to(torch.float32)
        return quantize_dequantize(x, self.scale, self.qmin, self.qmax, self.dtype)

    def extra_repr(self) -> str:
        return f"range=[{self.qmin}, {self.qmax}], dtype={self.dtype}, integers={self.integers}"


class StoredWeight(nn.Module):
    """A weight as integers ``values`` (int8 of the weight's ``shape``, or with ``packed`` two
    int4 per byte, flattened) and steps ``scale`` broadcast over them; ``forward()`` gives
    ``values * scale``, or with ``integers`` the values as float32."""

    def __init__(self, values: torch.Tensor, scale: torch.Tensor, shape: torch.Size, packed: bool, integers: bool = False) -> None:
        super().__init__()
        self.register_buffer("values", values.clone())
        self.register_buffer("scale", scale.clone())
        self.shape, self.packed, self.integers = tuple(shape), packed, integers

    def forward(self) -> torch.Tensor:
        values = unpack_int4(self.values, self.shape) if self.packed else self.values
        return values.to(torch.float32) if self.integers else values * self.scale

    def extra_repr(self) -> str:
        return f"shape={self.shape}, packed={self.packed}, integers={self.integers}"


class Accumulation(nn.Module):
    """The output scaling of a layer computed on integers: ``y * scale``, plus the int32 bias
    ``bias_int32`` at the same step where the layer has one (``scale`` and ``bias_int32``
    shaped to broadcast over the output)."""

    def __init__(self, scale: torch.Tensor, bias_int32: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("scale", scale.clone())
        self.register_buffer("bias_int32", None if bias_int32 is None else bias_int32.clone())

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = y * self.scale
        return y if self.bias_int32 is None else y + self.bias_int32.to(torch.float32) * self.scale


class _LoweredLayer:
    """Mixin before a quantized layer class: operands from ``input_quantizer`` and
    ``weight_operand``, output through ``accumulation`` where there is one."""

    input_quantizer: nn.Module
    weight_operand: nn.Module
    accumulation: nn.Module | None

    def quantized_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_quantizer(x), self.weight_operand()

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        y = super().forward(x, *args, **kwargs)
        return y if self.accumulation is None else self.accumulation(y)


_LOWERED: dict[type, type] = {}


def is_lowered_layer(module: nn.Module) -> bool:
    """Whether ``lower_layer_module`` lowered ``module``."""
    return isinstance(module, _LoweredLayer)


def lower_layer_module(
    module: nn.Module, input_operand: nn.Module, weight_operand: nn.Module, accumulation: nn.Module | None = None
) -> None:
    """Lower the module-level quantized layer ``module`` in place: its quantizers and float
    weight are removed, its operands come from ``input_operand`` (``x -> operand``) and
    ``weight_operand`` (``() -> operand``); with ``accumulation`` its bias is removed too (the
    accumulation adds it) and its output passes through it."""
    if not is_quantized_layer(module) or is_lowered_layer(module):
        raise TypeError(f"{type(module).__name__} is not a module-level quantized layer")
    cls = type(module)
    if cls not in _LOWERED:
        _LOWERED[cls] = type(f"Lowered{cls.__name__}", (_LoweredLayer, cls), {})
    module.__class__ = _LOWERED[cls]
    del module.weight_fake_quant
    module.register_parameter("weight", None)
    if accumulation is not None:
        module.register_parameter("bias", None)
    module.input_quantizer = input_operand
    module.weight_operand = weight_operand
    module.accumulation = accumulation
