"""Dead-code elimination for captured graphs that keeps in-place writes.

``fx.Graph.eliminate_dead_code`` keeps a node without users only where ``Node.is_impure``
says so, which knows ATen overloads with mutable schemas and a few Python functions
(``operator.setitem``), not tensor methods: a captured ``buf[0].copy_(image)`` (torchvision's
detection transform batches its images that way) is a ``call_method`` node nobody uses, and
fx drops it, so ``buf`` stays all zeros. ``eliminate_dead_code`` here also keeps every
in-place call a capture writes: a tensor method or function named ``<op>_``, a call with
``inplace=True`` or ``out=``, and a module built with ``inplace=True``.
"""
from __future__ import annotations

from torch import fx


def _in_place_name(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_")


def writes_in_place(node: fx.Node) -> bool:
    """Whether ``node`` may change a tensor it is given (so it matters without users)."""
    if node.kwargs.get("inplace") is True or node.kwargs.get("out") is not None:
        return True
    if node.op == "call_method":
        return _in_place_name(node.target)
    if node.op == "call_function":
        return _in_place_name(getattr(node.target, "__name__", ""))
    if node.op == "call_module":
        return getattr(node.graph.owning_module.get_submodule(node.target), "inplace", False) is True
    return False


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """Remove the nodes of ``graph`` whose values nothing reads, keeping impure nodes
    (``Node.is_impure``) and in-place writes (``writes_in_place``); whether it changed."""
    return graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure() or writes_in_place(node))
