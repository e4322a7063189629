"""The layer-graph drawing: layered (Sugiyama-style), and no edge runs through a box.

The check reads the SVG as written (the built-in layout, and Graphviz's when it is installed):
boxes from its rect / ellipse / polygon elements, edges from its path data, curves sampled
every pixel or so; a point of an edge strictly inside any box (2 px in from its border) fails.
"""
from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree

import pytest
import torch

import ptqat_fx
from ptqat_fx import QuantConfig
from ptqat_fx.views.dump import drawing as graph_drawing
from ptqat_fx.views.dump.drawing import Drawing, DrawNode
from ptqat_fx.views.dump.layout import _crossings, layered_layout
from ptqat_fx.views.dump.svg import render_svg
from examples import resnet_small, vit_small

SVG = "{http://www.w3.org/2000/svg}"
MARGIN = 2.0


def stem_with_skips() -> Drawing:
    """conv1 feeds the next layer and, by skips, layers two and three rows down: the picture
    that looked as if conv1 fed three layers when edges ran through boxes."""
    names = ["conv1", "conv2", "conv3", "conv4", "add", "fc"]
    edges = [("conv1", "conv2"), ("conv2", "conv3"), ("conv3", "conv4"), ("conv1", "conv3"),
             ("conv1", "add"), ("conv4", "add"), ("add", "fc"), ("conv2", "fc")]
    return Drawing("stem", [DrawNode(n, f"{n}\nconv2d W4A8\ndis 0.01") for n in names], edges)


def _quantized_drawings() -> dict[str, Drawing]:
    fast = QuantConfig(w_observer="minmax", a_observer="minmax")
    drawings = {"stem": stem_with_skips()}
    for name, build, shape in (("resnet", resnet_small.build, (2, 3, 32, 32)), ("vit", vit_small.build, (2, 1, 28, 28))):
        data = [torch.randn(shape, generator=torch.Generator().manual_seed(0))]
        qmodel = ptqat_fx.quantize(build(), (data[0],), data, fast, progress=False)
        drawings[f"{name}-layers"] = graph_drawing(qmodel, "layers")
    drawings["vit-full"] = graph_drawing(qmodel, "full")
    return drawings


@pytest.fixture(scope="module")
def drawings() -> dict[str, Drawing]:
    return _quantized_drawings()


def _numbers(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", text)]


def _sample(d: str) -> list[tuple[float, float]]:
    """Points along an SVG path made of absolute M, L and C commands."""
    points: list[tuple[float, float]] = []
    for command, args in re.findall(r"([MLC])([^MLC]*)", d):
        values = _numbers(args)
        pairs = list(zip(values[0::2], values[1::2]))
        if command == "M":
            points.append(pairs[0])
            pairs, command = pairs[1:], "L"  # extra pairs after M are line-tos
        step = 3 if command == "C" else 1
        for i in range(0, len(pairs) - step + 1, step):
            start = points[-1]
            ends = [start, *pairs[i:i + step]] if command == "C" else [start, pairs[i], pairs[i], pairs[i]]
            length = sum(math.dist(a, b) for a, b in zip(ends, ends[1:]))
            for k in range(1, max(2, int(length)) + 1):
                t = k / max(2, int(length))
                (x0, y0), (x1, y1), (x2, y2), (x3, y3) = ends
                u = 1 - t
                points.append((u**3 * x0 + 3 * u * u * t * x1 + 3 * u * t * t * x2 + t**3 * x3,
                               u**3 * y0 + 3 * u * u * t * y1 + 3 * u * t * t * y2 + t**3 * y3))
    return points


def shapes_and_edges(svg: str) -> tuple[list[tuple[str, float, float, float, float]], list[list[tuple[float, float]]]]:
    """Node shapes ``(kind, centre x, centre y, width, height)`` and sampled edge paths of an
    SVG from ``render_svg`` (ours: ``g.node`` and ``path.edge``; Graphviz: ``g.node`` / ``g.edge``)."""
    root = ElementTree.fromstring(svg)
    shapes = []
    for group in root.iter(f"{SVG}g"):
        if group.get("class") != "node":
            continue
        for element in group.iter():  # Graphviz wraps a node with a tooltip in <g><a>
            tag = element.tag.removeprefix(SVG)
            if tag == "rect":
                x, y, w, h = (float(element.get(k)) for k in ("x", "y", "width", "height"))
                shapes.append(("box", x + w / 2, y + h / 2, w, h))
            elif tag == "ellipse":
                cx, cy, rx, ry = (float(element.get(k)) for k in ("cx", "cy", "rx", "ry"))
                shapes.append(("ellipse", cx, cy, 2 * rx, 2 * ry))
            elif tag == "polygon":
                values = _numbers(element.get("points"))
                xs, ys = values[0::2], values[1::2]
                shapes.append(("box", (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)))
    edges = []
    in_edge_groups = {e for g in root.iter(f"{SVG}g") if g.get("class") == "edge" for e in g.iter(f"{SVG}path")}
    for element in root.iter(f"{SVG}path"):
        if element.get("class") == "edge" or element in in_edge_groups:
            edges.append(_sample(element.get("d")))
    return shapes, edges


def inside(shape: tuple[str, float, float, float, float], x: float, y: float) -> bool:
    kind, cx, cy, width, height = shape
    a, b = width / 2 - MARGIN, height / 2 - MARGIN
    if kind == "ellipse":
        return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 < 1
    return abs(x - cx) < a and abs(y - cy) < b


def edges_through_boxes(svg: str) -> list[str]:
    shapes, edges = shapes_and_edges(svg)
    return [f"edge {i} at ({x:.0f}, {y:.0f}) inside box at ({s[1]:.0f}, {s[2]:.0f})"
            for i, edge in enumerate(edges) for x, y in edge for s in shapes if inside(s, x, y)]


@pytest.mark.parametrize("graphviz", [False, True], ids=["built-in", "graphviz"])
@pytest.mark.parametrize("name", ["stem", "resnet-layers", "vit-layers", "vit-full"])
def test_no_edge_crosses_a_box(drawings, name, graphviz):
    if graphviz and shutil.which("dot") is None:
        pytest.skip("graphviz (dot) is not installed")
    drawing = drawings[name]
    svg = render_svg(drawing, graphviz=graphviz)
    shapes, edges = shapes_and_edges(svg)
    assert len(shapes) == sum(node.shape != "plain" or graphviz for node in drawing.nodes)
    assert len(edges) == len(drawing.edges) and all(len(edge) > 2 for edge in edges)
    assert edges_through_boxes(svg) == []


def test_the_check_sees_an_edge_drawn_through_a_box():
    # An edge from conv1 to conv3 straight through conv2's box, as the old layout drew skips.
    svg = render_svg(stem_with_skips(), graphviz=False)
    shapes, edges = shapes_and_edges(svg)
    (_, x1, y1, _, h1), (_, x2, y2, _, _), (_, x3, y3, _, h3) = shapes[:3]
    through = f'<path class="edge" d="M{x1},{y1 + h1 / 2} L{x2},{y2} L{x3},{y3 - h3 / 2}"/></svg>'
    found = edges_through_boxes(svg.replace("</svg>", through))
    assert found and all(line.startswith(f"edge {len(edges)} ") for line in found)


def test_layers_are_topological_generations_and_edges_point_down():
    geometry = layered_layout(stem_with_skips())
    rows = sorted({box.y for box in geometry.boxes.values()})
    row = {name: rows.index(box.y) for name, box in geometry.boxes.items()}
    assert row == {"conv1": 0, "conv2": 1, "conv3": 2, "conv4": 3, "add": 4, "fc": 5}
    for route in geometry.edges:
        ys = [y for _, y in route.points]
        assert ys == sorted(ys)  # monotone: down from the source to the target
        assert route.points[0] == (geometry.boxes[route.source].x, geometry.boxes[route.source].y + geometry.boxes[route.source].height / 2)
        assert route.points[-1] == (geometry.boxes[route.target].x, geometry.boxes[route.target].y - geometry.boxes[route.target].height / 2)
        # one vertical lane piece per layer crossed, plus the two ends
        assert len(route.points) == 2 * (row[route.target] - row[route.source]) + 2


def test_barycentre_ordering_untangles_crossed_chains():
    # Two chains a0->a1->a2 and b0->b1->b2 whose middle layer is listed the wrong way round.
    nodes = [DrawNode(n, n) for n in ("a0", "b0", "b1", "a1", "a2", "b2")]
    edges = [("a0", "a1"), ("a1", "a2"), ("b0", "b1"), ("b1", "b2")]
    geometry = layered_layout(Drawing("crossed", nodes, edges))
    x = {name: box.x for name, box in geometry.boxes.items()}
    layers = [sorted(pair, key=x.get) for pair in (("a0", "b0"), ("a1", "b1"), ("a2", "b2"))]
    assert sum(_crossings(layers[i], layers[i + 1], edges) for i in range(2)) == 0
    assert _crossings(["a0", "b0"], ["b1", "a1"], edges) == 1  # the listed order did cross


_MEASURE = """
const shapes = [], edges = [];
for (const group of document.querySelectorAll('g.node')) {
  const shape = group.querySelector('rect, ellipse, polygon');
  if (!shape) continue;
  const box = shape.getBBox(), m = shape.getScreenCTM();
  shapes.push({kind: shape.tagName === 'ellipse' ? 'ellipse' : 'box', x: box.x + box.width / 2, y: box.y + box.height / 2,
               w: box.width, h: box.height, left: m.a * (box.x + 5) + m.e, middle: m.d * (box.y + box.height / 2) + m.f,
               fill: shape.getAttribute('fill')});
}
for (const path of document.querySelectorAll('path.edge, g.edge path')) {
  const length = path.getTotalLength(), points = [];
  for (let s = 0; s <= length; s += 1) { const p = path.getPointAtLength(s); points.push([p.x, p.y]); }
  edges.push(points);
}
document.getElementById('geometry').textContent = JSON.stringify({shapes, edges});
"""


@pytest.mark.slow
@pytest.mark.parametrize("graphviz", [False, True], ids=["built-in", "graphviz"])
def test_headless_chromium_draws_the_boxes_and_edges_where_the_svg_says(drawings, graphviz, tmp_path):
    """The browser's own geometry (getBBox, getPointAtLength) of the page: boxes where the SVG
    puts them, no edge point inside a box, and in the screenshot each box filled with its colour."""
    plt = pytest.importorskip("matplotlib.pyplot")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed")
    if graphviz and shutil.which("dot") is None:
        pytest.skip("graphviz (dot) is not installed")
    svg = render_svg(drawings["resnet-layers"], graphviz=graphviz)
    page = tmp_path / "graph.html"
    page.write_text(f'<!DOCTYPE html><html><body style="margin:0">{svg[svg.index("<svg"):]}'
                    f'<pre id="geometry"></pre><script>{_MEASURE}</script></body></html>')
    # --no-sandbox: Chromium refuses to start as root without it (CI runs as root).
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=900,1400"]
    dom = subprocess.run([*command, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    measured = json.loads(html.unescape(re.search(r'<pre id="geometry">(.*?)</pre>', dom, re.S).group(1)))
    written, _ = shapes_and_edges(svg)
    assert len(measured["shapes"]) == len(written) == len(drawings["resnet-layers"].nodes)
    for box, (_, x, y, w, h) in zip(measured["shapes"], written):
        assert (box["x"], box["y"], box["w"], box["h"]) == pytest.approx((x, y, w, h), abs=0.6)
    assert len(measured["edges"]) == len(drawings["resnet-layers"].edges)
    shapes = [(s["kind"], s["x"], s["y"], s["w"], s["h"]) for s in measured["shapes"]]
    through = [(i, x, y) for i, edge in enumerate(measured["edges"]) for x, y in edge for s in shapes if inside(s, x, y)]
    assert through == []

    shot = tmp_path / "shot.png"
    subprocess.run([*command, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = plt.imread(shot)[..., :3]
    for box in measured["shapes"]:
        fill = [int(box["fill"][i:i + 2], 16) / 255 for i in (1, 3, 5)]
        assert pixels[round(box["middle"]), round(box["left"])] == pytest.approx(fill, abs=0.03), box
