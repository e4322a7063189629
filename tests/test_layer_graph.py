"""layer_graph: data-flow edges between quantizable layers."""
from __future__ import annotations

import torch

import ptqat_fx
from ptqat_fx.layer_graph import downstream, layer_graph
from examples import resnet_small, vit_small


def test_residual_skip_connection_is_an_edge():
    gm = ptqat_fx.quantize(resnet_small.build(), (torch.randn(2, 3, 32, 32),), select=None, progress=False)
    graph = layer_graph(gm)
    # Block 0 has an identity shortcut: the stem feeds block 1 directly around block 0.
    assert graph.has_edge("stem.0", "layers.1.conv1")
    assert graph.has_edge("layers.0.conv2", "layers.1.conv1")
    assert graph.has_edge("stem.0", "layers.0.conv1")
    assert not graph.has_edge("layers.0.conv1", "layers.1.conv1")
    assert list(graph.nodes)[0] == "stem.0" and list(graph.nodes)[-1] == "fc"
    assert downstream(graph, "layers.2.conv2") == ["fc"]


def test_attention_projections_lead_to_the_matmuls():
    gm = ptqat_fx.quantize(vit_small.build(depth=1), (torch.randn(2, 1, 28, 28),), select=None, progress=False)
    graph = layer_graph(gm)
    scores, weighted = "blocks.0.attn.matmul", "blocks.0.attn.matmul_1"
    assert set(graph.predecessors(scores)) == {"blocks.0.attn.q", "blocks.0.attn.k"}
    assert set(graph.predecessors(weighted)) == {scores, "blocks.0.attn.v"}
    assert set(graph.successors(weighted)) == {"blocks.0.attn.proj"}
    assert graph.nodes["blocks.0.attn.q"]["params"] == 32 * 32 + 32
