"""The rows every view shows: one ``LayerRow`` per quantizable layer, and the trainable
parameters of a layer. Data only, so the report, its HTML page and the dumps all read it
without importing one another."""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ..layer_spec import LayerSpec


@dataclass
class LayerRow:
    """One quantizable layer in the report."""

    index: int
    name: str
    kind: str
    params: int
    w_bits: int | None
    a_bits: int | None
    discrepancy: float | None
    selected: bool | None
    trainable_params: int


def trainable_layer_params(gm: fx.GraphModule, spec: LayerSpec) -> int:
    """Weight and bias elements of a layer with ``requires_grad`` (0 once ``convert`` has
    made them integer buffers)."""
    parameters = dict(gm.named_parameters())
    return sum(
        parameters[path].numel()
        for path in (spec.weight, spec.bias)
        if path in parameters and parameters[path].requires_grad
    )
