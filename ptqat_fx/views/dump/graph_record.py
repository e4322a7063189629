"""What a dump says about a graph: one JSON-ready record per node, layer and quantizer.

Every dump format (text, JSON, DOT, SVG) renders these records, so they all agree. The JSON
dump is ``graph_record(gm)`` as is; its schema (``"schema": "ptqat-fx.dump/1"``) is::

    {
      "schema": "ptqat-fx.dump/1",
      "model": str,                      # class name of the traced model
      "config": str | null,              # repr(QuantConfig)
      "select": str | null,              # repr(Select), null before selection
      "discrepancy_key": str,            # "<mode>.<metric>" the selection ranks by
      "nodes": [                         # every FX node, in graph (execution) order
        {"name": str, "op": str, "target": str,
         "inputs": [str],                # names of the nodes it reads
         "layer": str | null,            # LayerSpec.name when the node is a quantizable layer
         "quantizer": str | null,        # module path of the FakeQuantizer it calls or reads
         "frozen": bool, "fused": bool}  # freeze rewrite: constant weight / fused quantizers
      ],
      "layers": [                        # quantizable layers, in graph order
        {"name": str, "kind": str, "index": int, "node": str, "params": int,
         "w_bits": int | null, "a_bits": int | null,
         "weight_quantizer": str | null, "input_quantizers": [str],
         "discrepancy": {"<mode>.<metric>": float},   # empty before the analysis
         "selected": bool | null,        # null before selection
         "frozen": bool, "fused": bool,
         "trainable_params": int}        # weight and bias elements with requires_grad
      ],
      "layer_edges": [[str, str]],       # layer graph (ptqat_fx.layer_graph.layer_graph)
      "quantizers": {                    # by module path
        str: {"bits": int, "signed": bool, "channel_axis": int | null, "channels": int,
              "mode": "observe" | "quantize",
              "scale": {"min": float, "max": float, "mean": float} | null,  # null while observing
              "trainable": bool}         # whether the step size has requires_grad
      }
    }

New fields may be added under schema ``ptqat-fx.dump/1``; removing or renaming one bumps it.
"""
from __future__ import annotations

from typing import Any

from torch import fx

from ...layer_graph import layer_graph
from ...layer_spec import LayerSpec
from ...meta import DiscrepancyKey, config, fused_from, is_frozen, layer_spec, selection
from ...runtime.quantizer import FakeQuantizer, quantizers
from ..layer_rows import trainable_layer_params

SCHEMA = "ptqat-fx.dump/1"


def discrepancy_key(gm: fx.GraphModule) -> str:
    """The ``"<mode>.<metric>"`` the selection of ``gm`` ranks by (or would by default)."""
    return str(DiscrepancyKey.of(selection(gm)))


def quantizer_record(quantizer: FakeQuantizer) -> dict[str, Any]:
    """Bits, range, granularity, mode and a summary of the step sizes of one quantizer."""
    scale = quantizer.scale.detach().float()
    return {
        "bits": quantizer.bits,
        "signed": quantizer.signed,
        "channel_axis": quantizer.channel_axis,
        "channels": scale.numel(),
        "mode": quantizer.mode.value,
        "scale": None if not quantizer.calibrated else {
            "min": float(scale.min()), "max": float(scale.max()), "mean": float(scale.mean()),
        },
        "trainable": quantizer.scale.requires_grad,
    }


def _quantizer_of(node: fx.Node, known: dict[str, FakeQuantizer]) -> str | None:
    """The quantizer a node calls (``call_module``) or reads (its ``scale``, ``frozen_weight``)."""
    if node.op == "call_module" and node.target in known:
        return node.target
    if node.op == "get_attr":
        owner = node.target.rpartition(".")[0]
        return owner if owner in known else None
    return None


def _target(node: fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target
    return getattr(node.target, "__name__", repr(node.target))


def graph_record(gm: fx.GraphModule) -> dict[str, Any]:
    """The JSON-ready description of ``gm`` documented in this module."""
    known = quantizers(gm)
    nodes, layers = [], []
    for node in gm.graph.nodes:
        spec: LayerSpec | None = layer_spec(node)
        frozen, fused = is_frozen(node), fused_from(node) is not None
        nodes.append({
            "name": node.name,
            "op": node.op,
            "target": _target(node),
            "inputs": [source.name for source in node.all_input_nodes],
            "layer": spec.name if spec else None,
            "quantizer": _quantizer_of(node, known),
            "frozen": frozen,
            "fused": fused,
        })
        if spec is not None:
            layers.append({
                "name": spec.name, "kind": spec.kind, "index": spec.index, "node": node.name,
                "params": spec.params, "w_bits": spec.w_bits, "a_bits": spec.a_bits,
                "weight_quantizer": spec.weight_quantizer,
                "input_quantizers": list(spec.input_quantizers),
                "discrepancy": dict(spec.discrepancy), "selected": spec.selected,
                "frozen": frozen, "fused": fused,
                "trainable_params": trainable_layer_params(gm, spec),
            })
    config_, select = config(gm), selection(gm)
    return {
        "schema": SCHEMA,
        "model": type(gm).__name__,
        "config": repr(config_) if config_ is not None else None,
        "select": repr(select) if select is not None else None,
        "discrepancy_key": discrepancy_key(gm),
        "nodes": nodes,
        "layers": layers,
        "layer_edges": [list(edge) for edge in layer_graph(gm).edges],
        "quantizers": {path: quantizer_record(q) for path, q in known.items()},
    }
