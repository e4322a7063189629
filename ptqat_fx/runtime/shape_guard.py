"""The run-time check of a shape-specialized graph, as a function its graph calls.

A graph captured with shape queries answered from the example values serves the example
shapes only (``capture.specialization``). The check is a ``call_function`` node of the graph
itself, right after the placeholders, not a hook on the GraphModule: a hook is lost by
``copy.deepcopy`` (which rebuilds the module), by ``save``/``load`` and by anything else that
rebuilds the module from its graph, so the wrong shape would reach a reshape deep inside, or
compute a silently wrong result. A node goes wherever the graph goes.

It is registered with ``torch.fx.node.has_side_effect`` (as ``torch._assert`` is), so dead-code
elimination keeps it although nothing uses its result. Under ``torch.compile`` and
``torch.export`` the shapes are static, so the comparison is decided while tracing and leaves
nothing in the compiled graph; a symbolic batch dimension (``export_onnx(dynamic_batch=True)``)
is specialized by it, which the exporter reports.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import fx

from ..errors import InputError


@fx.node.has_side_effect
def check_input_shapes(
    inputs: Sequence[Any], names: Sequence[str], shapes: Sequence[tuple[int, ...]], graph: str
) -> None:
    """Raise ``InputError`` naming the input, its shape and the example's, for the first of
    ``inputs`` whose shape is not its entry of ``shapes``; ``graph`` names the captured model."""
    for value, name, expected in zip(inputs, names, shapes):
        shape = getattr(value, "shape", None)
        if shape is not None and tuple(shape) == tuple(expected):
            continue
        given = f"has shape {list(shape)}" if shape is not None else f"is a {type(value).__name__}, not a tensor"
        raise InputError(
            f"input {name!r} {given}, but {graph} was captured for shape {list(expected)}: its graph is "
            "specialized to the example shapes (it read them while tracing). Pass inputs of the example "
            "shape, or quantize with example inputs of the shape you will run"
        )
