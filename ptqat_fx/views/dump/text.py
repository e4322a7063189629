"""The text dump: the graph as a listing, one node a line, each with its quantization.

::

    # SmallResNet: 58 nodes, 13 layers (6 selected), 27 quantizers; discrepancy accumulated.relative
    %x = placeholder[x]()
    %input_quantizers_x = call_module[input_quantizers.x](%x)  | input_quantizers.x: Q8 signed per-tensor s=0.0213 quantize step fixed
    %conv2d = call_function[quantized_conv](%x, ...)            | layer #0 stem.0 conv2d W4A8 dis=0.0596 selected fused
"""
from __future__ import annotations

from typing import Any

from ...meta import bits_label

_ALIGN = 100  # annotations start in this column, or after longer statements


def scale_text(scale: dict[str, float] | None) -> str:
    """``s=0.0213``, ``s=[0.0057..0.0159]`` per channel, or ``s=?`` before calibration."""
    if scale is None:
        return "s=?"
    if scale["min"] == scale["max"]:
        return f"s={scale['min']:.4g}"
    return f"s=[{scale['min']:.4g}..{scale['max']:.4g}]"


def quantizer_text(quantizer: dict[str, Any]) -> str:
    """One quantizer in a few words: ``Q4 signed per-channel(0) s=[..] quantize step trainable``."""
    granularity = "per-tensor" if quantizer["channel_axis"] is None else f"per-channel({quantizer['channel_axis']})"
    sign = "signed" if quantizer["signed"] else "unsigned"
    words = [f"Q{quantizer['bits']}", sign, granularity, scale_text(quantizer["scale"]), quantizer["mode"]]
    words.append("step trainable" if quantizer["trainable"] else "step fixed")
    return " ".join(words)


def layer_state(layer: dict[str, Any]) -> str:
    """``selected`` / ``not selected`` / ``unselected-yet``, plus ``frozen`` and ``fused``."""
    words = {True: ["selected"], False: ["not selected"], None: []}[layer["selected"]]
    words += ["frozen"] * layer["frozen"] + ["fused"] * layer["fused"]
    return " ".join(words)


def layer_text(layer: dict[str, Any], key: str) -> str:
    """One layer in a line: index, name, kind, bits, discrepancy and state."""
    bits = bits_label(layer["w_bits"], layer["a_bits"]) if layer["a_bits"] else "float"
    value = layer["discrepancy"].get(key)
    words = [f"layer #{layer['index']}", layer["name"], layer["kind"], bits]
    words += [f"dis={value:.4g}"] if value is not None else []
    words += [layer_state(layer)] if layer_state(layer) else []
    return " ".join(words)


def render_text(record: dict[str, Any]) -> str:
    """The listing of a ``graph_record``."""
    layers = {layer["node"]: layer for layer in record["layers"]}
    key = record["discrepancy_key"]
    chosen = sum(bool(layer["selected"]) for layer in record["layers"])
    lines = [
        f"# {record['model']}: {len(record['nodes'])} nodes, {len(layers)} layers ({chosen} selected), "
        f"{len(record['quantizers'])} quantizers; discrepancy {key}",
        f"# config: {record['config']}",
        f"# select: {record['select']}",
    ]
    statements = [
        f"%{node['name']} = {node['op']}[{node['target']}]({', '.join('%' + name for name in node['inputs'])})"
        for node in record["nodes"]
    ]
    width = min(max(map(len, statements), default=0), _ALIGN)
    for node, statement in zip(record["nodes"], statements):
        notes = []
        if node["name"] in layers:
            notes.append(layer_text(layers[node["name"]], key))
        if node["quantizer"] is not None:
            notes.append(f"{node['quantizer']}: {quantizer_text(record['quantizers'][node['quantizer']])}")
        lines.append(f"{statement:<{width}}  | {'; '.join(notes)}" if notes else statement)
    return "\n".join(lines) + "\n"
