"""The example shapes a captured graph is specialized to, and the graph node that holds them.

A graph whose trace answered a shape query from the example values (``values.ValueProxy``)
bakes those shapes in: ``x.view(b * s, ...)`` with ``b * s`` a constant serves the example
batch size only. Such a GraphModule records a ``Specialization`` (``specialization(gm)``) and
its graph calls ``runtime.shape_guard.check_input_shapes`` right after the placeholders, which
refuses inputs of other shapes with an ``InputError`` naming the input, the expected and the
given shape, instead of computing a silently wrong result. Being a node, the check survives
``copy.deepcopy``, every pass, ``save``/``load``, ``torch.compile`` and export (see
``shape_guard``). A graph that answered no shape query is as general as torch.fx makes it and
has no check.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..meta import SPECIALIZATION_KEY
from ..runtime.shape_guard import check_input_shapes


@dataclass
class Specialization:
    """Attributes:
        input_shapes: the example shape of every tensor input, by input name (``batch['image']``
            for a tensor inside a structure).
        queries: where the trace read a shape, as ``node.attribute`` (``x.size``, ``conv1.shape``).
    """

    input_shapes: dict[str, tuple[int, ...]]
    queries: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        shapes = ", ".join(f"{name} {list(shape)}" for name, shape in self.input_shapes.items())
        return f"specialized to the example shapes ({shapes})"


def _input_names(graph: fx.Graph, placeholders: list[fx.Node]) -> list[str]:
    """What the user calls each placeholder: its argument name, or ``batch['image']`` for a
    tensor FX unpacked from a structure (``batch_1`` to the graph)."""
    info = getattr(graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return [str(node.target) for node in placeholders]
    positions = pytree.tree_unflatten(list(range(info.in_spec.num_leaves)), info.in_spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(positions)[0]:
        argument = info.orig_args[path[0].idx]
        if argument != "self":  # FX flattens the module along with the inputs
            names.append(argument + pytree.keystr(path[1:]))
    return names if len(names) == len(placeholders) else [str(node.target) for node in placeholders]


def specialize(gm: fx.GraphModule, inputs: dict[fx.Node, Any], queries: list[str]) -> None:
    """If the trace read shapes (``queries``), record the example shapes of ``gm``'s tensor
    inputs (``inputs``: placeholder -> example value) and insert the node that checks them."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    guarded = [
        (node, name, tuple(inputs[node].shape))
        for node, name in zip(placeholders, _input_names(gm.graph, placeholders))
        if isinstance(inputs.get(node), torch.Tensor)
    ]
    if not queries or not guarded:
        return
    nodes, names, shapes = zip(*guarded)
    with gm.graph.inserting_after(placeholders[-1]):
        gm.graph.call_function(check_input_shapes, (nodes, names, shapes, type(gm).__name__))
    gm.graph.lint()
    gm.recompile()
    gm.meta[SPECIALIZATION_KEY] = Specialization(dict(zip(names, shapes)), queries)


def specialization(gm: nn.Module) -> Specialization | None:
    """The ``Specialization`` of a captured GraphModule, or None if it serves any shape FX allows."""
    meta = getattr(gm, "meta", None)
    return meta.get(SPECIALIZATION_KEY) if isinstance(meta, dict) else None
