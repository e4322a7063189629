"""Fold BatchNorm into the convolution before it, as deploy engines do.

Quantizing the folded weight (not the conv weight before a BN) makes the simulated numerics
the ones TensorRT will run. A pair is folded only where the conv output feeds nothing but
the BN and neither module is called elsewhere, so no other use sees a changed value.
"""
from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx, nn

from ..meta import set_folded_bn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fused_conv(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``conv`` whose weight and bias absorb ``bn``'s eval-mode affine map."""
    # A copy of everything but the weight and bias, which are replaced: copying them would
    # be a device copy of every conv weight for nothing.
    kept = {id(p): p for p in (conv.weight, conv.bias) if p is not None}
    fused = copy.deepcopy(conv, memo=kept)
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(bias)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(bias)
    factor = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    fused.weight = nn.Parameter((weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))).to(conv.weight.dtype))
    fused.bias = nn.Parameter(((bias - bn.running_mean.double()) * factor + beta).to(conv.weight.dtype))
    return fused


def fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every foldable Conv -> BatchNorm pair of ``gm`` in place; returns ``gm``.

    Records the BN's path in ``conv_node.meta["folded_bn"]``.
    """
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    folded = False
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module" or not isinstance(gm.get_submodule(bn_node.target), _NORMS):
            continue
        conv_node = bn_node.args[0]
        if not (
            isinstance(conv_node, fx.Node)
            and conv_node.op == "call_module"
            and isinstance(gm.get_submodule(conv_node.target), _CONVS)
            and len(conv_node.users) == 1
            and calls[conv_node.target] == 1
            and calls[bn_node.target] == 1
            and gm.get_submodule(bn_node.target).track_running_stats
        ):
            continue
        conv = gm.get_submodule(conv_node.target)
        bn = gm.get_submodule(bn_node.target)
        parent, _, leaf = conv_node.target.rpartition(".")
        setattr(gm.get_submodule(parent), leaf, fused_conv(conv, bn))
        bn_node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(bn_node)
        set_folded_bn(conv_node, bn_node.target)
        folded = True
    gm.delete_all_unused_submodules()
    if folded:  # else the graph and its code are as they were (codegen: 5-25 ms)
        gm.graph.lint()
        gm.recompile()
    return gm
