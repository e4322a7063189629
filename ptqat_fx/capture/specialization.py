"""The example shapes a captured graph is specialized to, and the run-time check that holds them.

A graph whose trace answered a shape query from the example values (``values.ValueProxy``)
bakes those shapes in: ``x.view(b * s, ...)`` with ``b * s`` a constant serves the example
batch size only. Such a GraphModule records a ``Specialization`` (``specialization(gm)``) and
gets a forward pre-hook that refuses inputs of other shapes with an ``InputError`` naming the
input, the expected and the given shape, instead of computing a silently wrong result. A graph
that answered no shape query is as general as torch.fx makes it and has no guard.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import InputError
from ..meta import SPECIALIZATION_KEY



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


def _tensor_inputs(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    bound = signature.bind_partial(*args, **kwargs)
    found: dict[str, torch.Tensor] = {}
    for name, value in bound.arguments.items():
        for path, leaf in pytree.tree_flatten_with_path(value)[0]:
            if isinstance(leaf, torch.Tensor):
                found[name + pytree.keystr(path)] = leaf
    return found


class ShapeGuard:
    """A forward pre-hook raising ``InputError`` for an input whose shape is not the example's."""

    def __init__(self, signature: inspect.Signature, input_shapes: dict[str, tuple[int, ...]]) -> None:
        self.signature = signature
        self.input_shapes = input_shapes

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        try:
            given = _tensor_inputs(self.signature, args, kwargs)
        except TypeError:
            return  # a wrong call: the forward itself says what is wrong with it
        for name, tensor in given.items():
            expected = self.input_shapes.get(name)
            if expected is not None and tuple(tensor.shape) != expected:
                raise InputError(
                    f"input {name!r} has shape {list(tensor.shape)}, but {type(module).__name__} was captured "
                    f"for shape {list(expected)}: its graph is specialized to the example shapes (it read "
                    "them while tracing). Pass inputs of the example shape, or quantize with example "
                    "inputs of the shape you will run"
                )


def specialize(gm: fx.GraphModule, args: tuple, kwargs: dict[str, Any], queries: list[str]) -> None:
    """Record the example shapes of ``gm``'s inputs and guard them, if the trace read shapes."""
    if not queries:
        return
    signature = inspect.signature(gm.forward)
    shapes = {name: tuple(t.shape) for name, t in _tensor_inputs(signature, args, kwargs).items()}
    gm.meta[SPECIALIZATION_KEY] = Specialization(shapes, queries)
    gm.register_forward_pre_hook(ShapeGuard(signature, shapes), with_kwargs=True)


def specialization(gm: nn.Module) -> Specialization | None:
    """The ``Specialization`` of a captured GraphModule, or None if it serves any shape FX allows."""
    meta = getattr(gm, "meta", None)
    return meta.get(SPECIALIZATION_KEY) if isinstance(meta, dict) else None
