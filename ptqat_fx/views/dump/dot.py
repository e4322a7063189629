"""Graphviz DOT for a ``Drawing`` (``dot -Tsvg file.dot`` renders it)."""
from __future__ import annotations

from .drawing import Drawing, DrawNode


def quote(text: str) -> str:
    """``text`` as a DOT double-quoted string; newlines become centred line breaks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attributes(node: DrawNode) -> str:
    style = ["filled"] + ["dashed"] * node.dashed
    shape = "plaintext" if node.shape == "plain" else node.shape
    fields = {
        "label": quote(node.label), "shape": shape, "style": quote(",".join(style)),
        "fillcolor": quote(node.fill), "color": quote(node.border), "penwidth": f"{node.width:g}",
    }
    if node.tooltip:
        fields["tooltip"] = quote(node.tooltip)
    return ", ".join(f"{name}={value}" for name, value in fields.items())


def render_dot(drawing: Drawing) -> str:
    """The DOT source of ``drawing``: a top-to-bottom digraph."""
    lines = [
        "digraph ptqat {",
        f"  label={quote(drawing.title)}; labelloc=t; rankdir=TB;",
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [color="#888888", arrowsize=0.6];',
    ]
    lines += [f"  {quote(node.id)} [{_attributes(node)}];" for node in drawing.nodes]
    lines += [f"  {quote(source)} -> {quote(target)};" for source, target in drawing.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"
