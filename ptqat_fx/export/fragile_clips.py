"""A ReLU written as ``Clip`` right before a ``QuantizeLinear`` whose range is tiny becomes a ``Relu``.

onnxruntime's ClipQuantFusion (in every session from ``ORT_ENABLE_EXTENDED``, so in the default
one) removes a Clip that feeds a QuantizeLinear when the Q's float range lies within float32
epsilon (an absolute 1.2e-7) of the clip's bounds, taking the Q's saturation for the clip. A
signed activation is written with its zero point at the middle (``onnx._MarkerLowering``), so
its range reaches below 0; with steps below about 1e-9 that range is within 1.2e-7 of a ReLU6's
[0, 6] anyway, the Clip is dropped, and negative values pass where the model clamps them
(smp's FPN on MobileNetV2 with random init: steps of 1e-10, 0.073 off the engine arithmetic).

Where the clip's upper bound is at or above the Q's, the Q saturates there by itself, so the
Clip is a ReLU for this Q, value for value. It is written as a ``Relu``, which onnxruntime
removes only where the zero point is the Q's minimum (where a ReLU is redundant).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .tensorrt_rules import QDQGraph

ORT_CLIP_EPSILON = float(np.finfo(np.float32).eps)
_INTEGER_RANGES = {
    TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127),
    TensorProto.UINT4: (0, 15), TensorProto.INT4: (-8, 7),
    TensorProto.UINT16: (0, 65535), TensorProto.INT16: (-32768, 32767),
}


def _scalar(graph: QDQGraph, name: str) -> float | None:
    values = graph.array(name)
    return float(values) if values is not None and values.size == 1 else None


def _quantize_range(graph: QDQGraph, node: onnx.NodeProto) -> tuple[float, float] | None:
    """The float range [lower, upper] a per-tensor QuantizeLinear with constant scale and zero
    point can represent; None for anything else."""
    if len(node.input) < 3:
        return None
    scale, zero_point = _scalar(graph, node.input[1]), _scalar(graph, node.input[2])
    bounds = _INTEGER_RANGES.get(graph.quantized_type(node))
    if scale is None or zero_point is None or bounds is None:
        return None
    return scale * (bounds[0] - zero_point), scale * (bounds[1] - zero_point)


def relu_for_fragile_clips(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite in place each ``Clip(x, 0, high)`` whose only consumer is a QuantizeLinear of
    range [lower, upper] with lower < 0 <= lower + epsilon and high >= upper (the case
    onnxruntime's ClipQuantFusion gets wrong) into ``Relu(x)``; returns ``model``."""
    graph = QDQGraph(model)
    graph_outputs = {output.name for output in model.graph.output}
    bounds: set[str] = set()
    for node in graph.nodes:
        if node.op_type != "Clip" or len(node.input) < 2 or node.output[0] in graph_outputs:
            continue
        users = graph.consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or users[0].input[0] != node.output[0]:
            continue
        low = _scalar(graph, node.input[1])
        high = _scalar(graph, node.input[2]) if len(node.input) > 2 and node.input[2] else float("inf")
        q_range = _quantize_range(graph, users[0])
        if low != 0.0 or high is None or q_range is None:
            continue
        lower, upper = q_range
        if lower < 0.0 <= lower + ORT_CLIP_EPSILON and high >= upper:
            bounds.update(node.input[1:])
            # ``graph.nodes`` holds the model's own messages: this rewrites the model.
            node.CopyFrom(helper.make_node("Relu", [node.input[0]], list(node.output), name=node.name))
    used = {name for node in model.graph.node for name in node.input}
    kept = [init for init in model.graph.initializer if init.name not in bounds or init.name in used]
    if len(kept) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return model
