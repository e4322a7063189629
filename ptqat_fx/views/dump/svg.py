"""SVG for a ``Drawing``: Graphviz ``dot`` when it is installed, else a layout of our own.

The fallback is ``layout.layered_layout``: a Sugiyama-style layered drawing whose edges run
in lanes of their own between the boxes, never through them; it needs only networkx.
"""
from __future__ import annotations

import shutil
import subprocess
from xml.sax.saxutils import escape

from .dot import render_dot
from .drawing import Drawing, DrawNode
from .layout import LINE, Box, layered_layout


def graphviz_available() -> bool:
    """Whether the Graphviz ``dot`` program is on PATH."""
    return shutil.which("dot") is not None


def _text(box: Box, node: DrawNode) -> str:
    lines = node.label.split("\n")
    top = box.y - (len(lines) - 1) * LINE / 2 + 4
    spans = "".join(
        f'<tspan x="{box.x:.1f}" y="{top + i * LINE:.1f}">{escape(line)}</tspan>' for i, line in enumerate(lines)
    )
    return f'<text text-anchor="middle" font-family="Helvetica,Arial,sans-serif" font-size="10">{spans}</text>'


def _shape(box: Box, node: DrawNode) -> str:
    if node.shape == "plain":
        return ""
    paint = f'fill="{node.fill}" stroke="{node.border}" stroke-width="{node.width:g}"'
    paint += ' stroke-dasharray="5,3"' if node.dashed else ""
    if node.shape == "ellipse":
        return f'<ellipse cx="{box.x:.1f}" cy="{box.y:.1f}" rx="{box.width / 2:.1f}" ry="{box.height / 2:.1f}" {paint}/>'
    return (
        f'<rect x="{box.x - box.width / 2:.1f}" y="{box.y - box.height / 2:.1f}" width="{box.width:.1f}" '
        f'height="{box.height:.1f}" rx="3" {paint}/>'
    )


def _path(points: list[tuple[float, float]]) -> str:
    """Straight down inside a layer, an S-curve across each gap (its control points share the
    gap's middle height, so the curve stays inside the gap)."""
    (x, y), parts = points[0], [f"M{points[0][0]:.1f},{points[0][1]:.1f}"]
    for i, (x1, y1) in enumerate(points[1:], start=1):
        if i % 2 == 0:  # points 1->2, 3->4, ... cross a gap between layers
            middle = (y + y1) / 2
            parts.append(f"C{x:.1f},{middle:.1f} {x1:.1f},{middle:.1f} {x1:.1f},{y1:.1f}")
        else:
            parts.append(f"L{x1:.1f},{y1:.1f}")
        x, y = x1, y1
    return " ".join(parts)


def layout_svg(drawing: Drawing) -> str:
    """SVG of ``drawing`` with the built-in layered layout (``layout.layered_layout``)."""
    geometry = layered_layout(drawing)
    width, height = geometry.width, geometry.height
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker></defs>',
        f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-family="Helvetica,Arial,sans-serif" '
        f'font-size="13">{escape(drawing.title)}</text>',
    ]
    for route in geometry.edges:
        parts.append(
            f'<path class="edge" d="{_path(route.points)}" fill="none" stroke="#888" stroke-width="1" '
            'marker-end="url(#arrow)"/>'
        )
    for node in drawing.nodes:
        box = geometry.boxes[node.id]
        title = f"<title>{escape(node.tooltip or node.id)}</title>"
        parts.append(f'<g class="node">{title}{_shape(box, node)}{_text(box, node)}</g>')
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
