"""The layer dependency graph: quantizable layers as nodes, data flow between them as edges.

An edge ``a -> b`` means some input of layer ``b`` is computed from layer ``a``'s output
through operations that are not quantizable layers (activations, adds, concats, reshapes,
softmax, quantizers). Skip connections, concatenations and attention's q/k/v -> matmul all
appear as edges. Used to order layers, to ask what lies downstream of a layer, and in reports.
"""
from __future__ import annotations

import networkx as nx
from torch import fx

from .layer_spec import LayerSpec
from .meta import layer_spec


def layer_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """Build the DiGraph of ``gm``'s annotated layers.

    Node keys are ``LayerSpec.name``; attributes: ``spec`` (the LayerSpec), ``kind``,
    ``params``, ``index``, ``fx_node`` (the FX node name). Nodes are added in graph order.
    """
    graph = nx.DiGraph()
    nearest_layers: dict[fx.Node, frozenset[str]] = {}
    for node in gm.graph.nodes:
        upstream: set[str] = set()
        for source in node.all_input_nodes:
            upstream |= nearest_layers[source]
        spec: LayerSpec | None = layer_spec(node)
        if spec is None:
            nearest_layers[node] = frozenset(upstream)
            continue
        graph.add_node(
            spec.name, spec=spec, kind=spec.kind, params=spec.params, index=spec.index, fx_node=node.name
        )
        graph.add_edges_from((source, spec.name) for source in sorted(upstream))
        nearest_layers[node] = frozenset((spec.name,))
    return graph


def downstream(graph: nx.DiGraph, layer: str) -> list[str]:
    """Every layer whose input depends on ``layer``'s output, in graph order."""
    return sorted(nx.descendants(graph, layer), key=lambda name: graph.nodes[name]["index"])
