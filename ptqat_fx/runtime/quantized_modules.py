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

from collections.abc import Iterator
from contextlib import contextmanager

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
    # True while the discrepancy analysis runs the float side (``float_reference``).
    computes_float: bool = False

    def quantized_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self._parameters["weight"]
        if self.computes_float:
            return x, weight
        return self.input_quantizer(x), self.weight_fake_quant(weight)


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


class _QuantizedSubclass(_QuantizedLayer):
    """Mixin for a subclass of a layer type with its own ``forward`` (EfficientNet's
    ``Conv2dStaticSamePadding``, timm's ``Conv2dSame``: pad, then ``F.conv2d(x, self.weight,
    ...)``). Its forward runs unchanged on the quantized input, with ``self.weight`` reading as
    the fake-quantized weight for the duration of the call, as a parametrization would.
    Quantizing the input before the padding equals quantizing after it: zero is on the grid."""

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        parameter = self._parameters["weight"]
        x, quantized = self.quantized_operands(x)
        # The Parameter stays registered; only attribute reads during this call see the
        # quantized tensor (gradients reach the Parameter through the quantizer).
        self._parameters["weight"] = quantized
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            self._parameters["weight"] = parameter


_SUBCLASS_WRAPPERS: dict[type, type] = {}


def quantized_subclass(cls: type[nn.Module]) -> type[nn.Module]:
    """The quantized class of a layer subclass ``cls`` with its own forward (made once)."""
    if cls not in _SUBCLASS_WRAPPERS:
        _SUBCLASS_WRAPPERS[cls] = type(f"Quantized{cls.__name__}", (_QuantizedSubclass, cls), {})
    return _SUBCLASS_WRAPPERS[cls]


@contextmanager
def float_reference(modules: list[nn.Module], on: bool = True) -> Iterator[None]:
    """Within the block the module-level quantized ``modules`` compute in float (``on``) or
    quantized (``on=False``), whatever they did before; the analysis's float side."""
    previous = [m.computes_float for m in modules]
    for module in modules:
        module.computes_float = on
    try:
        yield
    finally:
        for module, value in zip(modules, previous):
            module.computes_float = value


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
    if type(module) not in quantized_class.__bases__ and not issubclass(quantized_class, _QuantizedSubclass):
        raise TypeError(f"{quantized_class.__name__} does not quantize a {type(module).__name__}")
    module.__class__ = quantized_class
    module.add_module("weight_fake_quant", weight_quantizer)
    module.add_module("input_quantizer", input_quantizer)
    module.layer_spec = spec
