"""Run the converted model's linear layers as integer GEMMs (``runtime.integer_gemm``).

``convert`` lowers a linear layer to ``F.linear(dequantize(q_x), q_w * s_w, b)``: float
arithmetic on dequantized integers. This pass rewrites every such call whose input is a signed
8-bit-or-fewer activation quantize/dequantize and whose weight is an unpacked integer weight
into ``integer_linear(q_x, s_x, q_w, s_w, b)``, which multiplies the integers with
``torch._int_mm``::

    converted = ptqat_fx.convert(qmodel)
    fast = integer_gemm(converted)          # rewritten in place, returned

Unsigned inputs (uint8 has no int8 x int8 GEMM), packed INT4 weights and convolutions are
left as they are. The outputs differ from ``converted``'s only by float32 accumulation
rounding (the integer sum is exact).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import fx

from ..dead_code import eliminate_dead_code
from ..meta import converted
from ..runtime.integer_gemm import integer_linear


def _integer_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node] | None:
    """(q_x, s_x, q_w, s_w) of a converted ``F.linear`` call, or None when it has none."""
    x, weight = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not isinstance(x, fx.Node) or not isinstance(weight, fx.Node):
        return None
    x_record, w_record = converted(x) or {}, converted(weight) or {}
    if not x_record.get("signed") or "activation" not in x_record:
        return None
    if "weight" not in w_record or w_record.get("packed"):
        return None
    (q_x, s_x), (q_w, s_w) = x.args, weight.args
    return q_x, s_x, q_w, s_w


def integer_gemm(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the converted linear layers of ``gm`` (from ``ptqat_fx.convert``) into
    ``integer_linear`` calls; returns ``gm``, rewritten in place."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.linear:
            continue
        operands = _integer_operands(node)
        if operands is None:
            continue
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_function(integer_linear, (*operands, bias))
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    eliminate_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm
