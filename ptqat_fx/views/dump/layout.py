"""Where every box and edge of a ``Drawing`` goes: a layered (Sugiyama-style) layout.

    geometry = layered_layout(drawing)
    geometry.boxes["conv1"]   # Box(x, y, width, height): centre and size
    geometry.edges[0]         # EdgeRoute(source, target, points): a polyline, top to bottom

Layers are networkx's topological generations (a node sits one layer below its deepest input).
An edge that spans several layers gets a dummy node in every layer it crosses, so it runs down
a lane of its own instead of through the boxes between; the order within each layer is improved
by barycentre sweeps (the order with the fewest crossings seen is kept), then boxes and lanes
are pulled towards their neighbours without overlapping. Each route is: down from the source's
bottom to its layer's floor, across the gap to the next layer, down its lane, ..., and into the
target's top. Every vertical piece lies inside its own node's or lane's column and every slanted
piece inside a gap between layers, so no edge crosses a box.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from .drawing import Drawing, DrawNode

CHAR, LINE, PAD, GAP_X, GAP_Y, LANE = 6.2, 13.0, 8.0, 16.0, 40.0, 6.0
TOP = 30.0  # room for the title
_SWEEPS = 12


@dataclass(frozen=True)
class Box:
    """A node's centre ``(x, y)`` and size."""

    x: float
    y: float
    width: float
    height: float

    def contains(self, x: float, y: float, margin: float = 0.0) -> bool:
        """Whether ``(x, y)`` is inside the box shrunk by ``margin`` on every side."""
        return abs(x - self.x) < self.width / 2 - margin and abs(y - self.y) < self.height / 2 - margin


@dataclass
class EdgeRoute:
    """The polyline an edge is drawn along, from the source's bottom to the target's top."""

    source: str
    target: str
    points: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Geometry:
    """Boxes by node id, edge routes in the drawing's edge order, and the canvas size."""

    boxes: dict[str, Box]
    edges: list[EdgeRoute]
    width: float
    height: float


def box_size(node: DrawNode) -> tuple[float, float]:
    """Width and height of a node's box: its label's lines in a 10 px font, padded."""
    lines = node.label.split("\n")
    return max(map(len, lines)) * CHAR + 2 * PAD, len(lines) * LINE + PAD


def _crossings(upper: list[str], lower: list[str], links: list[tuple[str, str]]) -> int:
    """Crossings between two adjacent layers: pairs of links whose ends are in opposite order."""
    up, low = {n: i for i, n in enumerate(upper)}, {n: i for i, n in enumerate(lower)}
    ends = sorted((up[a], low[b]) for a, b in links if a in up and b in low)
    return sum(1 for i, (a0, b0) in enumerate(ends) for a1, b1 in ends[i + 1:] if a1 > a0 and b1 < b0)


def _order(layers: list[list[str]], graph: nx.DiGraph) -> list[list[str]]:
    """Barycentre sweeps down and up; the ordering with the fewest crossings wins."""
    links = list(graph.edges)

    def total(order: list[list[str]]) -> int:
        return sum(_crossings(order[i], order[i + 1], links) for i in range(len(order) - 1))

    order = [list(layer) for layer in layers]
    best, best_count = [list(layer) for layer in order], total(order)
    for sweep in range(_SWEEPS):
        downwards = sweep % 2 == 0
        indices = range(1, len(order)) if downwards else range(len(order) - 2, -1, -1)
        for i in indices:
            fixed = {n: rank for rank, n in enumerate(order[i - 1 if downwards else i + 1])}
            neighbours = graph.predecessors if downwards else graph.successors
            current = {n: rank for rank, n in enumerate(order[i])}

            def barycentre(node: str) -> float:
                ranks = [fixed[m] for m in neighbours(node) if m in fixed]
                return sum(ranks) / len(ranks) if ranks else current[node]

            order[i].sort(key=lambda n: (barycentre(n), current[n]))  # stable on ties
        count = total(order)
        if count < best_count:
            best, best_count = [list(layer) for layer in order], count
    return best


def _place_x(order: list[list[str]], widths: dict[str, float], graph: nx.DiGraph) -> dict[str, float]:
    """Centres that keep each layer's order and gaps, pulled towards the neighbours' mean."""
    x: dict[str, float] = {}
    for layer in order:
        left = 0.0
        for node in layer:
            x[node] = left + widths[node] / 2
            left += widths[node] + GAP_X

    def settle(layer: list[str], wanted: dict[str, float]) -> None:
        # Closest positions to ``wanted`` that keep the order and the gaps: overlaps resolved by
        # pushing right, and by pushing left; the mean of two such placements keeps the gaps too.
        gap = [(widths[a] + widths[b]) / 2 + GAP_X for a, b in zip(layer, layer[1:])]
        right = [wanted[n] for n in layer]
        for i in range(1, len(layer)):
            right[i] = max(right[i], right[i - 1] + gap[i - 1])
        left = [wanted[n] for n in layer]
        for i in range(len(layer) - 2, -1, -1):
            left[i] = min(left[i], left[i + 1] - gap[i])
        for node, a, b in zip(layer, right, left):
            x[node] = (a + b) / 2

    for sweep in range(2 * _SWEEPS):
        downwards = sweep % 2 == 0
        for layer in order if downwards else reversed(order):
            neighbours = graph.predecessors if downwards else graph.successors
            wanted = {}
            for node in layer:
                around = [x[m] for m in neighbours(node)]
                wanted[node] = sum(around) / len(around) if around else x[node]
            settle(layer, wanted)
    shift = GAP_X - min((x[n] - widths[n] / 2 for n in x), default=0.0)
    return {node: value + shift for node, value in x.items()}


def layered_layout(drawing: Drawing) -> Geometry:
    """The layered layout of ``drawing`` (see the module docstring)."""
    sizes = {node.id: box_size(node) for node in drawing.nodes}
    graph = nx.DiGraph()
    graph.add_nodes_from(sizes)
    graph.add_edges_from(drawing.edges)
    rank = {node: depth for depth, layer in enumerate(nx.topological_generations(graph)) for node in layer}
    position = {node.id: i for i, node in enumerate(drawing.nodes)}
    layers: list[list[str]] = [[] for _ in range(max(rank.values(), default=-1) + 1)]
    for node in sorted(rank, key=position.__getitem__):
        layers[rank[node]].append(node)
    # Dummy nodes: one per layer that an edge passes through, chained source -> ... -> target.
    chains: list[list[str]] = []
    lanes = nx.DiGraph()
    lanes.add_nodes_from(graph)
    for number, (source, target) in enumerate(drawing.edges):
        chain = [source] + [f"\0lane{number}.{depth}" for depth in range(rank[source] + 1, rank[target])] + [target]
        for depth, dummy in zip(range(rank[source] + 1, rank[target]), chain[1:-1]):
            layers[depth].append(dummy)
        nx.add_path(lanes, chain)
        chains.append(chain)
    widths = {node: sizes[node][0] if node in sizes else LANE for node in lanes}
    order = _order(layers, lanes)
    x = _place_x(order, widths, lanes)
    tops, y = [], TOP
    for layer in order:
        tops.append(y)
        y += max((sizes[n][1] for n in layer if n in sizes), default=LINE) + GAP_Y
    floors = [top + max((sizes[n][1] for n in layer if n in sizes), default=LINE) for top, layer in zip(tops, order)]
    boxes = {
        node: Box(x[node], tops[rank[node]] + (floors[rank[node]] - tops[rank[node]]) / 2, *sizes[node])
        for node in sizes
    }
    edges = []
    for (source, target), chain in zip(drawing.edges, chains):
        start, end = boxes[source], boxes[target]
        points = [(start.x, start.y + start.height / 2), (start.x, floors[rank[source]])]
        for depth, dummy in zip(range(rank[source] + 1, rank[target]), chain[1:-1]):
            points += [(x[dummy], tops[depth]), (x[dummy], floors[depth])]
        points += [(end.x, tops[rank[target]]), (end.x, end.y - end.height / 2)]
        edges.append(EdgeRoute(source, target, points))
    width = max((x[n] + widths[n] / 2 for n in x), default=0.0) + GAP_X
    return Geometry(boxes, edges, width, y)
