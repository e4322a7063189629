"""Undo the training fusion of ``freeze``: every ``quantized_linear`` / ``quantized_conv`` /
``quantized_matmul`` call becomes its input quantizer node(s) and the plain layer again.

The fused form only changes what autograd keeps; lowering, export and serialization may
prefer the plain form, where each quantizer is a node. Outputs are unchanged.
"""
from __future__ import annotations

from torch import fx

from ..layer_kinds import kind_of_graph_function
from ..meta import pop_fused_from


def _quantizer_call(gm: fx.GraphModule, before: fx.Node, source: fx.Node, scale: fx.Node) -> fx.Node:
    """A call of the quantizer owning ``scale`` on ``source``: an existing one that runs
    before ``before`` (a shared input quantizer stays one node), else a new one."""
    target = scale.target.rpartition(".")[0]
    for user in source.users:
        if user.op == "call_module" and user.target == target and user.args == (source,) and user < before:
            return user
    with gm.graph.inserting_before(before):
        return gm.graph.call_module(target, (source,))


def unfuse(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``gm``'s fused quantized-input layers into quantizers + plain layers; returns
    ``gm``. Each fused node remembers its plain ``(op, target)`` in
    ``node.meta["ptqat_fused_from"]``."""
    for node in list(gm.graph.nodes):
        plain = pop_fused_from(node)
        if plain is None:
            continue
        if not kind_of_graph_function(node.target).weighted:  # both operands were quantized
            a, a_scale, _, _, b, b_scale, _, _ = node.args
            node.args = (_quantizer_call(gm, node, a, a_scale), _quantizer_call(gm, node, b, b_scale))
            scales = (a_scale, b_scale)
        else:
            source, scale, _, _, *rest = node.args
            node.args = (_quantizer_call(gm, node, source, scale), *rest)
            scales = (scale,)
        node.op, node.target = plain
        for scale in scales:
            if not scale.users:
                gm.graph.erase_node(scale)
    gm.graph.lint()
    gm.recompile()
    return gm
