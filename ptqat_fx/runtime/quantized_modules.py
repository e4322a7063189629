"""Module-level quantized layers, for the layers inside a leaf module that runs eagerly.

The graph passes cannot rewrite what they cannot see: a leaf module (named by the user, or
made a leaf because it does not trace) runs its own Python ``forward``. Its Conv and Linear
children are quantized in place instead: ``quantize_layer_module`` swaps the child's class for
its quantized subclass below and gives it a weight ``FakeQuantizer`` (``weight_fake_quant``,
the path ``insert_quantizers`` would use) and an ``input_quantizer``. The parameters stay the
same objects at the same paths, so state_dict keys and optimizers are unaffected, and
``quantizer.quantizers(gm)`` finds the new quantizers, so ``calibrate`` sets them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layer_spec import LayerSpec
from .quantizer import FakeQuantizer


class _QuantizedLayer:
    """Mixin: the layer's input and weight pass a FakeQuantizer before the float op."""

    weight_fake_quant: FakeQuantizer
    input_quantizer: FakeQuantizer
    layer_spec: LayerSpec

    def quantized_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_quantizer(x), self.weight_fake_quant(self.weight)


class QuantizedLinear(_QuantizedLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self.quantized_operands(x)
        return F.linear(x, weight, self.bias)


class _QuantizedConv(_QuantizedLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self.quantized_operands(x)
        return self._conv_forward(x, weight, self.bias)


class QuantizedConv1d(_QuantizedConv, nn.Conv1d):
    pass


class QuantizedConv2d(_QuantizedConv, nn.Conv2d):
    pass


class QuantizedConv3d(_QuantizedConv, nn.Conv3d):
    pass


class _QuantizedConvTranspose(_QuantizedLayer):
    transposed_function: staticmethod

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        spatial = len(self.kernel_size)
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, spatial, self.dilation
        )
        x, weight = self.quantized_operands(x)
        return self.transposed_function(
            x, weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )


class QuantizedConvTranspose1d(_QuantizedConvTranspose, nn.ConvTranspose1d):
    transposed_function = staticmethod(F.conv_transpose1d)


class QuantizedConvTranspose2d(_QuantizedConvTranspose, nn.ConvTranspose2d):
    transposed_function = staticmethod(F.conv_transpose2d)


class QuantizedConvTranspose3d(_QuantizedConvTranspose, nn.ConvTranspose3d):
    transposed_function = staticmethod(F.conv_transpose3d)


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether ``module`` was quantized at module level by ``quantize_layer_module``."""
    return isinstance(module, _QuantizedLayer)


def quantize_layer_module(
    module: nn.Module,
    quantized_class: type[nn.Module],
    spec: LayerSpec,
    weight_quantizer: FakeQuantizer,
    input_quantizer: FakeQuantizer,
) -> None:
    """Turn ``module`` (an exact ``nn.Linear``/``nn.ConvNd``/``nn.ConvTransposeNd``) into
    ``quantized_class``, its quantized subclass above (``LayerKind.quantized_module``), in
    place, holding the given quantizers and ``spec``."""
    if type(module) not in quantized_class.__bases__:
        raise TypeError(f"{quantized_class.__name__} does not quantize a {type(module).__name__}")
    module.__class__ = quantized_class
    module.add_module("weight_fake_quant", weight_quantizer)
    module.add_module("input_quantizer", input_quantizer)
    module.layer_spec = spec
