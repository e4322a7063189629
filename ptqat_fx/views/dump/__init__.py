"""``dump(gm, path)``: write a graph and its quantization state for a person or a program.

Formats: ``txt`` (a listing, one node a line, with bits, step sizes, mode, discrepancy,
selection), ``json`` (the schema in ``ptqat_fx.views.dump.graph_record``), ``dot`` (Graphviz source) and
``svg`` (a picture: Graphviz when installed, else a built-in layout). ``dot`` and ``svg`` draw
the full FX graph or, with ``graph="layers"``, the layer graph. ``quantize(..., dump_dir=)``
writes these after every stage (``ptqat_fx.views.dump.stages``).
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import fx

from ...errors import InputError
from ..report import report
from .dot import render_dot
from .drawing import Drawing, full_drawing, layer_drawing
from .graph_record import graph_record
from .svg import render_svg
from .text import render_text

FORMATS = ("txt", "json", "dot", "svg")
GRAPHS = ("full", "layers")


def drawing(gm: fx.GraphModule, graph: str = "full") -> Drawing:
    """The ``full`` FX graph or the ``layers`` graph of ``gm`` as a Drawing."""
    if graph not in GRAPHS:
        raise InputError(f"dump graph={graph!r}: choose one of {GRAPHS}")
    if graph == "full":
        return full_drawing(graph_record(gm))
    rows = report(gm)
    return layer_drawing(rows.rows, rows.layer_edges, f"{type(gm).__name__}: layer graph ({rows.key})")


def render(gm: fx.GraphModule, format: str, graph: str = "full") -> str:
    """The dump of ``gm`` in ``format`` as text."""
    if format == "txt":
        return render_text(graph_record(gm))
    if format == "json":
        return json.dumps(graph_record(gm), indent=1) + "\n"
    if format == "dot":
        return render_dot(drawing(gm, graph))
    if format == "svg":
        return render_svg(drawing(gm, graph))
    raise InputError(f"dump format={format!r}: choose one of {FORMATS}")


def dump(gm: fx.GraphModule, path: str | Path, format: str | None = None, *, graph: str = "full") -> Path:
    """Write ``gm`` to ``path`` in ``format`` (by default the path's suffix); returns the path.

    Args:
        gm: any GraphModule; quantization details appear as far as the passes have run.
        path: the file to write; parent folders are created.
        format: ``txt``, ``json``, ``dot`` or ``svg``.
        graph: for ``dot`` and ``svg``: ``full`` (every FX node) or ``layers`` (the layer graph).

    Raises:
        InputError: unknown format or graph, or no format and a path without a known suffix.
    """
    path = Path(path)
    format = format or path.suffix.lstrip(".")
    if format not in FORMATS:
        raise InputError(
            f"dump({str(path)!r}): format {format!r} is not one of {FORMATS}; "
            "pass format= or use one of those suffixes"
        )
    text = render(gm, format, graph)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


__all__ = ["dump", "render", "drawing", "FORMATS", "GRAPHS"]
