"""Nested capture: a forward that cannot be traced runs eagerly, calling captured children.

When a module's own forward does not trace (control flow on tensor values, ``torch.no_grad``,
in-place writes), it is not given up as a whole: ``nest`` returns a shallow clone of it
(same parameters, same class, so the same Python forward) whose children are replaced by
their captures. Each child is traced with the inputs it received in one eager run of the
model on the example inputs (``record_calls``); a child that does not trace in turn is nested
the same way, so the deepest traceable subtrees become GraphModules. Module paths do not
change: ``encoder.layer.0.attention`` stays that path inside the nested graphs.

A child is left as it is when the example run never called it (containers such as
``nn.ModuleList`` are descended into instead), when it is a torch layer or a leaf the user
named. It is nested rather than traced when it was called with inputs of different shapes or
constants (a specialized graph would serve only one of them), and when it was given an object
that keeps tensors (``holds_tensors``: transformers' ``DynamicCache``): a trace would fix that
object as a constant, with the tensors it held in the example run, while the eager forward
reads and updates the object it is given at each call.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree


@dataclass
class Calls:
    """The first inputs a module was called with, and how many distinct input signatures."""

    args: tuple
    kwargs: dict[str, Any]
    signatures: set[str] = field(default_factory=set)


def signature(args: tuple, kwargs: dict[str, Any]) -> str:
    """Shapes, dtypes and constants of a call: calls with equal signatures trace alike."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    described = [
        f"T{tuple(leaf.shape)}{leaf.dtype}" if isinstance(leaf, torch.Tensor) else repr(leaf)[:80] for leaf in leaves
    ]
    return f"{spec}|{described}"


def holds_tensors(value: Any, depth: int = 4) -> bool:
    """True if ``value``, not a tensor and not a container of them, keeps tensors among its
    attributes (searched ``depth`` levels of attributes, lists, tuples and dicts deep)."""
    seen: set[int] = set()

    def search(item: Any, level: int) -> bool:
        if isinstance(item, torch.Tensor):
            return True
        if level == 0 or id(item) in seen:
            return False
        seen.add(id(item))
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            children = list(getattr(item, "__dict__", {}).values())
        return any(search(child, level - 1) for child in children)

    return not isinstance(value, (torch.Tensor, dict, list, tuple)) and search(value, depth)


def record_calls(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[int, Calls]:
    """Run ``model`` eagerly (no grad) and record every module's call inputs, by ``id``."""
    calls: dict[int, Calls] = {}

    def hook(module: nn.Module, call_args: tuple, call_kwargs: dict[str, Any]) -> None:
        recorded = calls.setdefault(id(module), Calls(call_args, dict(call_kwargs)))
        recorded.signatures.add(signature(call_args, call_kwargs))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s buffers (BatchNorm statistics) after running it on example values.

    The RNG is not forked and restored: that state is process-wide, and restoring it would
    rewind the draws of other threads. Capture draws random numbers only where the model does
    (dropout in train mode), the same ones on every run under a seed.
    """
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def shallow_clone(module: nn.Module) -> nn.Module:
    """``module`` with its own child table (parameters and buffers are the same objects)."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


# capture(child, args, kwargs, path) -> the child's GraphModule, or None if its own forward
# fails (then it is nested); it records what it did on its own.
CaptureChild = Callable[[nn.Module, tuple, dict, str], "nn.Module | None"]


def nest(
    module: nn.Module, path: str, calls: dict[int, Calls], keep: Callable[[nn.Module, str], bool], capture: CaptureChild,
    on_nested: Callable[[str, str], None],
) -> nn.Module:
    """A shallow clone of ``module`` whose children are captured (see the module docstring).

    ``keep(child, path)`` says a child stays as it is (torch layers, user leaves);
    ``on_nested(path, why)`` is told of a child nested because of its calls: different call
    signatures, or an object holding tensors among its inputs.
    """
    clone = shallow_clone(module)
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        seen = calls.get(id(child))
        if keep(child, child_path) or (seen is None and not any(True for _ in child.children())):
            continue
        stateful = [] if seen is None else [
            type(leaf).__name__ for leaf in pytree.tree_leaves((seen.args, seen.kwargs)) if holds_tensors(leaf)
        ]
        if seen is None or len(seen.signatures) > 1 or stateful:
            if seen is not None and stateful:
                on_nested(child_path, f"called with {', '.join(dict.fromkeys(stateful))}, an object holding "
                                      "tensors that a graph would fix as a constant")
            elif seen is not None:
                on_nested(child_path, f"called with {len(seen.signatures)} different input shapes or constants")
            clone._modules[name] = nest(child, child_path, calls, keep, capture, on_nested)
            continue
        captured = capture(child, seen.args, seen.kwargs, child_path)
        clone._modules[name] = captured if captured is not None else nest(
            child, child_path, calls, keep, capture, on_nested
        )
    return clone
