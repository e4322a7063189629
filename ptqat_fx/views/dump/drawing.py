"""What the pictures show: graphs as boxes and arrows, coloured by discrepancy and state.

A ``Drawing`` is independent of the output: ``dot.render_dot`` writes it as Graphviz DOT and
``svg.render_svg`` as SVG. Two drawings exist: the layer graph (quantizable layers and the
data flow between them) and the full FX graph (every node, quantizers included).

Colours: a layer's fill goes from pale yellow (smallest discrepancy in the model) to red
(largest), white where none was measured; its border is thick green when selected
(trainable), dashed grey when not selected (frozen), thin black before selection.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...meta import bits_label
from ..layer_rows import LayerRow
from .text import layer_state, scale_text

_STOPS = ((1.0, 0.97, 0.74), (0.99, 0.55, 0.24), (0.84, 0.19, 0.12))  # YlOrRd
QUANTIZER_FILL = "#deebf7"
SELECTED, UNSELECTED, PENDING = "#1a9850", "#666666", "#000000"


@dataclass
class DrawNode:
    """One box: ``shape`` is ``box``, ``ellipse`` or ``plain`` (text only)."""

    id: str
    label: str
    fill: str = "#ffffff"
    border: str = PENDING
    width: float = 1.0
    dashed: bool = False
    shape: str = "box"
    tooltip: str = ""


@dataclass
class Drawing:
    """Nodes in topological order, edges as ``(source id, target id)``."""

    title: str
    nodes: list[DrawNode] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)


def heat(value: float | None, low: float, high: float) -> str:
    """The fill colour of a discrepancy ``value`` on the model's range ``[low, high]``."""
    if value is None:
        return "#ffffff"
    t = 0.0 if high <= low else min(max((value - low) / (high - low), 0.0), 1.0)
    segment = min(int(t * 2), 1)
    local = t * 2 - segment
    start, end = _STOPS[segment], _STOPS[segment + 1]
    red, green, blue = (round(255 * (a + (b - a) * local)) for a, b in zip(start, end))
    return f"#{red:02x}{green:02x}{blue:02x}"


def _layer_box(node_id: str, label: str, value: float | None, selected: bool | None, span: tuple[float, float]) -> DrawNode:
    border, width, dashed = {
        True: (SELECTED, 3.0, False), False: (UNSELECTED, 1.5, True), None: (PENDING, 1.0, False),
    }[selected]
    return DrawNode(node_id, label, heat(value, *span), border, width, dashed, "box")


def _span(values: Sequence[float | None]) -> tuple[float, float]:
    known = [v for v in values if v is not None]
    return (min(known), max(known)) if known else (0.0, 0.0)


def layer_drawing(rows: Sequence[LayerRow], edges: Sequence[Sequence[str]], title: str) -> Drawing:
    """The layer graph of a report's ``rows`` (see ``Report.layer_edges``)."""
    span = _span([row.discrepancy for row in rows])
    drawing = Drawing(title)
    for row in rows:
        bits = bits_label(row.w_bits, row.a_bits)
        value = "" if row.discrepancy is None else f"\ndis {row.discrepancy:.3g}"
        node = _layer_box(row.name, f"#{row.index} {row.name}\n{row.kind} {bits}{value}", row.discrepancy, row.selected, span)
        node.tooltip = f"{row.name}: {row.params:,} params, trainable {row.trainable_params:,}"
        drawing.nodes.append(node)
    drawing.edges = [(source, target) for source, target in edges]
    return drawing


def full_drawing(record: dict[str, Any]) -> Drawing:
    """Every node of a ``graph_record``; layers coloured as in the layer graph."""
    key = record["discrepancy_key"]
    layers = {layer["node"]: layer for layer in record["layers"]}
    span = _span([layer["discrepancy"].get(key) for layer in layers.values()])
    drawing = Drawing(f"{record['model']}: full graph")
    for node in record["nodes"]:
        heading = f"{node['name']}\n{node['op']}[{node['target']}]"
        layer = layers.get(node["name"])
        if layer is not None:
            value = layer["discrepancy"].get(key)
            label = f"{heading}\n#{layer['index']} {layer['name']} {layer['kind']}"
            label += "" if value is None else f"\ndis {value:.3g}"
            box = _layer_box(node["name"], label, value, layer["selected"], span)
            box.tooltip = layer_state(layer)
        elif node["quantizer"] is not None and node["op"] == "call_module":
            quantizer = record["quantizers"][node["quantizer"]]
            label = f"{node['name']}\nQ{quantizer['bits']} {scale_text(quantizer['scale'])}"
            box = DrawNode(node["name"], label, QUANTIZER_FILL, shape="ellipse", tooltip=quantizer["mode"])
        elif node["op"] == "get_attr":
            box = DrawNode(node["name"], node["target"], shape="plain")
        else:
            box = DrawNode(node["name"], heading, shape="ellipse")
        drawing.nodes.append(box)
        drawing.edges.extend((source, node["name"]) for source in node["inputs"])
    return drawing
