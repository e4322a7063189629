"""The one registry of quantizable layer kinds: what every pass, ``coverage`` and
``serialization`` know about conv, linear and matmul layers.

A ``LayerKind`` records how the kind appears (module types, matched by ``isinstance`` so
subclasses count; functional forms; tensor methods; ATen overloads), where its weight's output
channels lie, and the forms the passes give it: the frozen form (``freeze``), the fused
training form (``freeze`` for selected layers), the module-level quantized class (layers inside
leaf modules) and the deployable form that ``lowering`` turns the others back into (the kind's
functional form). Adding a kind is one ``register`` call here and one test.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import quantized_modules as qm
from .runtime.frozen_conv import frozen_conv
from .runtime.linear_transposed import linear_transposed
from .runtime.fused_layers import quantized_conv, quantized_linear, quantized_matmul

ModuleArguments = Callable[[nn.Module], tuple]


@dataclass(frozen=True)
class LayerKind:
    """One kind of quantizable layer.

    Attributes:
        name: ``conv2d``, ``linear``, ``matmul``... (``LayerSpec.kind``, ``QuantConfig.skip``).
        module_type: the ``nn.Module`` class whose instances (and subclasses') are this kind;
            None for kinds that exist only as functions (matmul).
        functions: functional forms; the first is the canonical one, the deployable form.
            A weighted kind's functions take ``(input, weight, bias, ...)``.
        methods: tensor method names of the kind (``x.matmul(y)``).
        aten: the ATen overloads of the kind, for graphs captured below the torch API.
        weight_axis: the weight's output-channel axis (per-channel scales), None when the
            kind has no weight (both operands are activations).
        module_arguments: the functional form's arguments after ``(input, weight, bias)``
            for a module of this kind.
        frozen: the form of a frozen layer that keeps only its weight for backward, if any.
        fused: the training form with the input quantizer fused in, if any.
        quantized_module: the module-level quantized class for layers inside leaf modules.
        torch_function_forms: what the functional forms resolve to inside
            ``__torch_function__`` (``F.linear`` arrives as ``torch._C._nn.linear``).
    """

    name: str
    module_type: type[nn.Module] | None
    functions: tuple[Callable[..., Any], ...]
    methods: tuple[str, ...] = ()
    aten: tuple[Any, ...] = ()
    weight_axis: int | None = 0
    module_arguments: ModuleArguments | None = None
    frozen: Callable[..., Any] | None = None
    fused: Callable[..., Any] | None = None
    quantized_module: type[nn.Module] | None = None
    torch_function_forms: tuple[Callable[..., Any], ...] = ()

    @property
    def function(self) -> Callable[..., Any]:
        """The canonical functional form: what a module call, a frozen and a fused layer of
        this kind are lowered to."""
        return self.functions[0]

    @property
    def weighted(self) -> bool:
        return self.weight_axis is not None


_KINDS: dict[str, LayerKind] = {}


def register(kind: LayerKind) -> LayerKind:
    """Add ``kind`` to the registry (a later kind of the same name replaces it)."""
    _KINDS[kind.name] = kind
    return kind


def kinds() -> tuple[LayerKind, ...]:
    """Every registered kind, in registration order."""
    return tuple(_KINDS.values())


def kind(name: str) -> LayerKind:
    """The kind called ``name``; KeyError for an unknown name."""
    return _KINDS[name]


def kind_of_type(cls: type) -> LayerKind | None:
    """The kind whose module type ``cls`` is (or subclasses), the most specific one."""
    matches = [k for k in _KINDS.values() if k.module_type is not None and issubclass(cls, k.module_type)]
    return max(matches, key=lambda k: len(k.module_type.__mro__), default=None)


def kind_of_module(module: nn.Module) -> LayerKind | None:
    """The kind of ``module`` (``isinstance``), or None."""
    return kind_of_type(type(module))


def runs_as_kind(module: nn.Module) -> LayerKind | None:
    """The kind of ``module`` when its ``forward`` is its kind's own, so the graph may replace
    the module call by the kind's functional form; None otherwise (a subclass such as
    EfficientNet's ``Conv2dStaticSamePadding`` pads in its own ``forward``)."""
    found = kind_of_module(module)
    if found is None or type(module).forward is not found.module_type.forward:
        return None
    return found


def quantizable_as_module(module: nn.Module) -> bool:
    """Whether ``module`` can be quantized at module level (inside a leaf): that swaps its
    class for the kind's quantized class, so only the kind's exact module type qualifies."""
    found = kind_of_module(module)
    return found is not None and found.quantized_module is not None and type(module) is found.module_type


def kind_of_function(function: object) -> LayerKind | None:
    """The kind that ``function`` is a functional form of, or None."""
    return next((k for k in _KINDS.values() if function in k.functions), None)


def kind_of_method(name: str) -> LayerKind | None:
    """The kind that the tensor method ``name`` is a form of, or None."""
    return next((k for k in _KINDS.values() if name in k.methods), None)


def kind_of_graph_function(function: object) -> LayerKind | None:
    """The kind whose frozen or fused form ``function`` is, or None."""
    return next((k for k in _KINDS.values() if function is not None and function in (k.frozen, k.fused)), None)


def graph_functions() -> tuple[Callable[..., Any], ...]:
    """ptqat-fx's own functions that passes put into graphs (frozen and fused forms, and the
    functional forms that capture writes, such as ``linear_transposed``)."""
    found = {f: None for k in _KINDS.values() for f in (k.frozen, k.fused) if f is not None}
    found.update({f: None for k in _KINDS.values() for f in k.functions
                  if (getattr(f, "__module__", None) or "").startswith("ptqat_fx.")})
    return tuple(found)


def torch_function_forms() -> frozenset:
    """Every weighted kind's forms as ``__torch_function__`` sees them."""
    return frozenset(f for k in _KINDS.values() if k.weighted for f in (*k.functions, *k.torch_function_forms))


def _linear_arguments(module: nn.Module) -> tuple:
    return ()


def _conv_arguments(module: nn.Module) -> tuple:
    return (module.stride, module.padding, module.dilation, module.groups)


def _transposed_arguments(module: nn.Module) -> tuple:
    return (module.stride, module.padding, module.output_padding, module.groups, module.dilation)


def _aten(*names: str) -> tuple[Any, ...]:
    """ATen overloads by ``"op.overload"`` name."""
    return tuple(getattr(getattr(torch.ops.aten, op), overload) for op, _, overload in (n.partition(".") for n in names))


register(LayerKind(
    "linear", nn.Linear, (F.linear,), aten=_aten("linear.default"), module_arguments=_linear_arguments,
    fused=quantized_linear, quantized_module=qm.QuantizedLinear, torch_function_forms=(torch._C._nn.linear,),
))
for _spatial, _conv, _module, _quantized in (
    (1, F.conv1d, nn.Conv1d, qm.QuantizedConv1d),
    (2, F.conv2d, nn.Conv2d, qm.QuantizedConv2d),
    (3, F.conv3d, nn.Conv3d, qm.QuantizedConv3d),
):
    register(LayerKind(
        f"conv{_spatial}d", _module, (_conv,), aten=_aten(f"conv{_spatial}d.default"),
        module_arguments=_conv_arguments, frozen=frozen_conv, fused=quantized_conv, quantized_module=_quantized,
    ))
for _spatial, _conv, _module, _quantized, _overload in (
    (1, F.conv_transpose1d, nn.ConvTranspose1d, qm.QuantizedConvTranspose1d, "default"),
    (2, F.conv_transpose2d, nn.ConvTranspose2d, qm.QuantizedConvTranspose2d, "input"),
    (3, F.conv_transpose3d, nn.ConvTranspose3d, qm.QuantizedConvTranspose3d, "input"),
):
    # A transposed conv's weight is [in, out / groups, ...]: output channels on axis 1.
    register(LayerKind(
        f"conv_transpose{_spatial}d", _module, (_conv,), aten=_aten(f"conv_transpose{_spatial}d.{_overload}"),
        weight_axis=1, module_arguments=_transposed_arguments, quantized_module=_quantized,
    ))
# transformers' Conv1D (GPT-2), captured as ``linear_transposed`` (capture/layer_calls.py):
# weight [in, out], output channels on axis 1. No fused or integer form: it trains and deploys
# as its function on a fake-quantized weight.
register(LayerKind("linear_transposed", None, (linear_transposed,), weight_axis=1))
register(LayerKind(
    "matmul", None, (torch.matmul, operator.matmul, torch.bmm, torch.mm, torch.linalg.matmul),
    methods=("matmul", "bmm", "mm"),
    aten=_aten("matmul.default", "bmm.default", "mm.default"), weight_axis=None, fused=quantized_matmul,
))
