"""unfuse: the fused training form of freeze becomes quantizer nodes + plain layers again,
with the same outputs and no fused call left."""
from __future__ import annotations

import torch

import ptqat_fx
from ptqat_fx import Select
from ptqat_fx.layer_kinds import graph_functions
from ptqat_fx.meta import fused_from
from ptqat_fx.passes.unfuse import unfuse
from ptqat_fx.runtime.fused_layers import quantized_conv, quantized_linear, quantized_matmul
from ptqat_fx.runtime.quantizer import is_quantizer_node
from examples import resnet_small, vit_small


def _fused_targets(gm):
    return [n.target for n in gm.graph.nodes if n.target in (quantized_conv, quantized_linear, quantized_matmul)]


def test_unfuse_restores_plain_layers_with_equal_outputs():
    data = [torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    gm = ptqat_fx.quantize(vit_small.build(), (data[0],), data, select=Select("all"), progress=False)
    fused = _fused_targets(gm)
    # vit_small by hand: patch conv, 2 x (q, k, v, proj, fc1, fc2), head = 14 linears/convs and 4 matmuls.
    assert sorted(f.__name__ for f in fused) == sorted(["quantized_conv"] + ["quantized_linear"] * 13 + ["quantized_matmul"] * 4)
    with torch.no_grad():
        before = [gm(x) for x in data]
    quantizer_calls = sum(is_quantizer_node(gm, n) for n in gm.graph.nodes)
    unfuse(gm)
    assert _fused_targets(gm) == []
    assert not any(fused_from(n) for n in gm.graph.nodes)
    assert not any(n.target in graph_functions() for n in gm.graph.nodes)
    # Each fused call had folded one input quantizer call (two for a matmul) into itself.
    assert sum(is_quantizer_node(gm, n) for n in gm.graph.nodes) > quantizer_calls
    with torch.no_grad():
        for x, expected in zip(data, before):
            torch.testing.assert_close(gm(x), expected)


def test_unfuse_of_an_unfused_graph_changes_nothing():
    data = [torch.randn(2, 3, 16, 16)]
    gm = ptqat_fx.quantize(resnet_small.build(width=4), (data[0],), data, select=Select("none"), progress=False)
    code = gm.code
    assert unfuse(gm).code == code
