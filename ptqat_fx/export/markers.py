"""The export's markers: ``torch.ops.ptqat_fx.qdq(x, index)``, a custom op that stands for one
quantizer while torch exports the float graph around it, its ONNX translation
(``ptqat_fx::QDQ(index)``), and what ``index`` points to in the table (``IntegerWeight`` for
weights, ``ActivationQuant`` for activations, ``Unscaled`` for the integer operands of an integer
layer). ``export.onnx`` places the markers in graphs and lowers them to Q/DQ; ``mark_leaves``
gives the layers inside leaf modules marker operands (``leaf_lowering``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from onnx import defs
from torch import fx

from ..leaf_lowering import LeafLayer, lower_leaves
from ..lowering import IntegerWeight
from ..runtime.lowered_layers import Accumulation
from ..runtime.quantizer import FakeQuantizer

DOMAIN = "ptqat_fx"

if not defs.has("QDQ", DOMAIN):
    defs.register_schema(
        defs.OpSchema(
            "QDQ", DOMAIN, 1,
            doc="ptqat-fx export marker for one quantizer; replaced before the model is saved",
            inputs=[defs.OpSchema.FormalParameter("x", "T")],
            outputs=[defs.OpSchema.FormalParameter("y", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float")],
            attributes=[defs.OpSchema.Attribute("index", defs.OpSchema.AttrType.INT, "table index")],
        )
    )


@torch.library.custom_op("ptqat_fx::qdq", mutates_args=())
def _qdq_marker(x: torch.Tensor, index: int) -> torch.Tensor:
    """Stands for quantizer ``index`` during ONNX export only; its values are never used."""
    return x.clone()


@_qdq_marker.register_fake
def _(x: torch.Tensor, index: int) -> torch.Tensor:
    return torch.empty_like(x)


@functools.cache
def translation_table() -> dict:
    """The marker's ONNX translation; onnxscript (which torch's exporter needs anyway) is
    imported only when exporting."""
    try:
        import onnxscript
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "export_onnx needs onnxscript (torch's ONNX exporter is written in it), a dependency of "
            "ptqat-fx that this environment lacks: pip install onnxscript", name="onnxscript"
        ) from error

    opset = onnxscript.values.Opset(DOMAIN, 1)

    def translate(x, index: int):
        return opset.QDQ(x, index=index)

    return {torch.ops.ptqat_fx.qdq.default: translate}


@dataclass(frozen=True)
class ActivationQuant:
    """What an activation marker lowers to: Q/DQ with ``scale`` and zero point 0."""

    path: str
    scale: float
    bits: int
    signed: bool


@dataclass(frozen=True)
class Unscaled:
    """A quantizer lowered to its integers as float (DequantizeLinear with scale 1): the
    operands of an integer layer (``lowering.integer_layer``)."""

    entry: IntegerWeight | ActivationQuant

    @property
    def bits(self) -> int:
        return self.entry.bits

    @property
    def path(self) -> str:
        return self.entry.path


Entry = IntegerWeight | ActivationQuant | Unscaled


class _Marker(torch.nn.Module):
    """A leaf layer's input operand during export: the marker of table entry ``index``."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.ptqat_fx.qdq.default(x, self.index)


class _WeightMarker(_Marker):
    """A leaf layer's weight operand during export: the marker on its float weight (a buffer
    the marker lowering leaves unread, so it is not saved)."""

    def __init__(self, weight: torch.Tensor, index: int) -> None:
        super().__init__(index)
        self.register_buffer("weight", weight.detach().clone())

    def forward(self) -> torch.Tensor:
        return super().forward(self.weight)


def mark_leaves(gm: fx.GraphModule, table: list[Entry], integer_layers: bool) -> None:
    """Lower the leaf layers and opaque-call input quantizers of ``gm`` to marker modules
    (``leaf_lowering``): the entries they stand for are appended to ``table``."""

    def entry(value: Entry, integers: bool) -> int:
        table.append(Unscaled(value) if integers else value)
        return len(table) - 1

    def activation(path: str, quantizer: FakeQuantizer, integers: bool) -> torch.nn.Module:
        quant = ActivationQuant(path, float(quantizer.scale.detach().reshape(())), quantizer.bits, quantizer.signed)
        return _Marker(entry(quant, integers))

    def weight(layer: LeafLayer) -> torch.nn.Module:
        return _WeightMarker(layer.module.weight, entry(layer.weight, layer.scale is not None))

    def accumulation(layer: LeafLayer) -> torch.nn.Module:
        return Accumulation(layer.scale, None if layer.bias is None else layer.bias.values)

    lower_leaves(gm, integer_layers, activation, weight, accumulation)
