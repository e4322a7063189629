"""Functional layer calls in the one form the passes read: ``(input, weight, bias, ...)`` positional.

Model code may name a layer function's leading arguments: timm's BEiT and EVA attention call
``F.linear(x, weight=self.qkv.weight, bias=qkv_bias)``. Every pass reads a functional layer's
input, weight and bias by position (and rewrites them there: the quantized weight goes into
``args[1]``), so capture moves those three keywords into position. The call computes the same;
the remaining keywords (``stride=``, ``groups=``) stay keywords, which every pass keeps as they are.

transformers' ``Conv1D`` (GPT-2) computes a linear layer as ``torch.addmm(bias, x, weight)``
with its weight laid out ``[in, out]``: capture writes an ``addmm`` whose weight and bias are
parameters (``get_attr``) and whose input is not as ``linear_transposed(x, weight, bias)``, a
layer kind of its own. An ``addmm`` of activations, or with ``beta``/``alpha``, stays as it is.
"""
from __future__ import annotations

import torch
from torch import fx

from ..layer_kinds import kind_of_function
from ..runtime.linear_transposed import linear_transposed

# A weighted layer kind's functions take these first (layer_kinds.LayerKind.functions).
_LEADING = ("input", "weight", "bias")


def positional_layer_arguments(graph: fx.Graph) -> None:
    """Move the ``input``/``weight``/``bias`` keywords of functional layer calls in ``graph``
    into position, in place."""
    for node in graph.nodes:
        if node.op != "call_function" or not any(name in node.kwargs for name in _LEADING):
            continue
        layer_kind = kind_of_function(node.target)
        if layer_kind is None or not layer_kind.weighted:
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        for position, name in enumerate(_LEADING):
            if len(args) == position and name in kwargs:
                args.append(kwargs.pop(name))
        node.args, node.kwargs = tuple(args), kwargs


def _is_attribute(value: object) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr"


def addmm_as_linear_transposed(graph: fx.Graph) -> None:
    """Rewrite ``torch.addmm(bias, x, weight)`` with parameter ``bias`` and ``weight`` and an
    activation ``x`` into ``linear_transposed(x, weight, bias)``, in place."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not torch.addmm or node.kwargs or len(node.args) != 3:
            continue
        bias, source, weight = node.args
        if _is_attribute(bias) and _is_attribute(weight) and isinstance(source, fx.Node) and not _is_attribute(source):
            node.target, node.args = linear_transposed, (source, weight, bias)
