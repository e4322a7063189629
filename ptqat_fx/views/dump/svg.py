"""SVG for a ``Drawing``: Graphviz ``dot`` when it is installed, else a layout of our own.

The fallback is a plain layered layout: each node sits one row below its lowest input, rows
are ordered by the mean position of the inputs (a barycentre sweep), edges are curves from
the bottom of one box to the top of the next. It is less tidy than Graphviz on wide graphs
but needs nothing beyond the standard library.
"""
from __future__ import annotations

import shutil
import subprocess
from xml.sax.saxutils import escape

from .dot import render_dot
from .drawing import Drawing, DrawNode

_CHAR, _LINE, _PAD, _GAP_X, _GAP_Y = 6.2, 13.0, 8.0, 16.0, 34.0


def graphviz_available() -> bool:
    """Whether the Graphviz ``dot`` program is on PATH."""
    return shutil.which("dot") is not None


def _box_size(node: DrawNode) -> tuple[float, float]:
    lines = node.label.split("\n")
    return max(map(len, lines)) * _CHAR + 2 * _PAD, len(lines) * _LINE + _PAD


def _rows(drawing: Drawing) -> list[list[str]]:
    """Node ids by row: one row below the lowest input, ordered by input barycentre."""
    inputs: dict[str, list[str]] = {node.id: [] for node in drawing.nodes}
    for source, target in drawing.edges:
        inputs[target].append(source)
    depth: dict[str, int] = {}
    for node in drawing.nodes:
        depth[node.id] = 1 + max((depth[s] for s in inputs[node.id] if s in depth), default=-1)
    rows: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for node in drawing.nodes:
        rows[depth[node.id]].append(node.id)
    position: dict[str, float] = {}
    for row in rows:
        for rank, node_id in enumerate(row):
            position[node_id] = rank
        row.sort(key=lambda n: sum(position[s] for s in inputs[n]) / len(inputs[n]) if inputs[n] else position[n])
        for rank, node_id in enumerate(row):
            position[node_id] = rank
    return rows


def _text(x: float, y: float, node: DrawNode) -> str:
    lines = node.label.split("\n")
    top = y - (len(lines) - 1) * _LINE / 2 + 4
    spans = "".join(
        f'<tspan x="{x:.1f}" y="{top + i * _LINE:.1f}">{escape(line)}</tspan>' for i, line in enumerate(lines)
    )
    return f'<text text-anchor="middle" font-family="Helvetica,Arial,sans-serif" font-size="10">{spans}</text>'


def _shape(x: float, y: float, width: float, height: float, node: DrawNode) -> str:
    if node.shape == "plain":
        return ""
    paint = f'fill="{node.fill}" stroke="{node.border}" stroke-width="{node.width:g}"'
    paint += ' stroke-dasharray="5,3"' if node.dashed else ""
    if node.shape == "ellipse":
        return f'<ellipse cx="{x:.1f}" cy="{y:.1f}" rx="{width / 2:.1f}" ry="{height / 2:.1f}" {paint}/>'
    return f'<rect x="{x - width / 2:.1f}" y="{y - height / 2:.1f}" width="{width:.1f}" height="{height:.1f}" rx="3" {paint}/>'


def layout_svg(drawing: Drawing) -> str:
    """SVG of ``drawing`` with the built-in layered layout."""
    nodes = {node.id: node for node in drawing.nodes}
    sizes = {node.id: _box_size(node) for node in drawing.nodes}
    rows = _rows(drawing)
    centres: dict[str, tuple[float, float]] = {}
    widths = [sum(sizes[n][0] for n in row) + _GAP_X * (len(row) - 1) for row in rows]
    total_width = max(widths, default=0) + 2 * _GAP_X
    y = 30.0
    for row, row_width in zip(rows, widths):
        height = max(sizes[n][1] for n in row)
        x = (total_width - row_width) / 2
        for node_id in row:
            centres[node_id] = (x + sizes[node_id][0] / 2, y + height / 2)
            x += sizes[node_id][0] + _GAP_X
        y += height + _GAP_Y
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_width:.0f}" height="{y:.0f}" '
        f'viewBox="0 0 {total_width:.0f} {y:.0f}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker></defs>',
        f'<text x="{total_width / 2:.1f}" y="18" text-anchor="middle" font-family="Helvetica,Arial,sans-serif" '
        f'font-size="13">{escape(drawing.title)}</text>',
    ]
    for source, target in drawing.edges:
        (x0, y0), (x1, y1) = centres[source], centres[target]
        y0 += sizes[source][1] / 2
        y1 -= sizes[target][1] / 2
        bend = max((y1 - y0) / 2, 10.0)
        parts.append(
            f'<path d="M{x0:.1f},{y0:.1f} C{x0:.1f},{y0 + bend:.1f} {x1:.1f},{y1 - bend:.1f} {x1:.1f},{y1:.1f}" '
            'fill="none" stroke="#888" stroke-width="1" marker-end="url(#arrow)"/>'
        )
    for node_id, (x, y_centre) in centres.items():
        node = nodes[node_id]
        title = f"<title>{escape(node.tooltip or node.id)}</title>"
        parts.append(f"<g>{title}{_shape(x, y_centre, *sizes[node_id], node)}{_text(x, y_centre, node)}</g>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def render_svg(drawing: Drawing, graphviz: bool | None = None) -> str:
    """SVG of ``drawing``: through Graphviz when ``graphviz`` (default: when installed), else
    with ``layout_svg``."""
    if graphviz is None:
        graphviz = graphviz_available()
    if not graphviz:
        return layout_svg(drawing)
    result = subprocess.run(["dot", "-Tsvg"], input=render_dot(drawing), capture_output=True, text=True, check=True)
    return result.stdout
