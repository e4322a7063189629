"""Quantize the layers inside a function the graph calls as a whole.

A function wrapped with ``torch.fx.wrap`` (torchvision's ``shifted_window_attention``) is one
``call_function`` node that receives layer weights as arguments and applies them itself with
``F.linear``/``F.conv*``. The graph can fake-quantize such a weight argument, but not the
activation the function multiplies it with. ``OpaqueCall`` runs the function under a
``TorchFunctionMode`` that passes the input of every linear/conv whose weight is one of the
quantized weight arguments through that layer's input quantizer.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.overrides import TorchFunctionMode

from ..layer_spec import LayerSpec


class _QuantizeLayerInputs(TorchFunctionMode):
    def __init__(self, by_weight: dict[int, nn.Module], layer_functions: frozenset) -> None:
        super().__init__()
        self.by_weight = by_weight
        self.layer_functions = layer_functions

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if func in self.layer_functions and id(weight) in self.by_weight:
            quantizer = self.by_weight[id(weight)]
            if args:
                args = (quantizer(args[0]), *args[1:])
            else:
                kwargs = {**kwargs, "input": quantizer(kwargs["input"])}
        return func(*args, **kwargs)


class OpaqueCall(nn.Module):
    """Calls ``function`` with the graph's arguments; the argument at each key of
    ``input_quantizers`` (a position, or a keyword prefixed ``kw:``) is a layer weight whose
    linear/conv input that quantizer fake-quantizes. ``layer_functions`` are the layer
    functions as ``__torch_function__`` sees them (``layer_kinds.torch_function_forms()``).

    Attributes:
        layer_specs: one LayerSpec per quantized weight argument.
    """

    def __init__(
        self,
        function: Callable[..., Any],
        input_quantizers: dict[str, nn.Module],
        specs: list[LayerSpec],
        layer_functions: frozenset,
    ) -> None:
        super().__init__()
        self.layer_functions = layer_functions
        self.function = function
        self.input_quantizers = nn.ModuleDict(input_quantizers)
        self.layer_specs = specs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        by_weight = {
            id(kwargs[key[3:]] if key.startswith("kw:") else args[int(key)]): quantizer
            for key, quantizer in self.input_quantizers.items()
        }
        with _QuantizeLayerInputs(by_weight, self.layer_functions):
            return self.function(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"function={getattr(self.function, '__qualname__', self.function)}"
