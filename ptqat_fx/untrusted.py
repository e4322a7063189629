"""Names from untrusted files, and the code generator that keeps them out of Python source.

FX turns a graph into Python source and ``exec``s it: node names become variables, module paths
become ``self.a.b`` (or ``getattr(self.a, "<part>")`` without escaping for a part that is not an
identifier), method targets and keyword names are written as they are. A name read from a file
that holds a quote or a newline would therefore run as code. Two layers stop that:

- ``check_name`` / ``check_path``: every name and path read from a file is an identifier (or, for
  a path part, a decimal child index such as ``layer1.0``), not a keyword, not a dunder, and of
  bounded length.
- ``CheckedCodeGen``: the code generator of every loaded graph (kept through ``deepcopy`` and the
  passes that edit the graph in place, such as ``convert``). Before FX ``exec``s a source, it parses
  it and refuses anything but one ``forward`` of assignments and a return whose names are the
  graph's own nodes, ``self``, and the globals FX registered for objects it holds. Whatever field a
  crafted name came through, it cannot reach ``exec``.
"""
from __future__ import annotations

import ast
import builtins
import keyword
import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from .errors import SerializationError
from .layer_kinds import graph_functions
from .runtime.shape_guard import check_input_shapes

_DENIED_OPERATORS = {"attrgetter", "itemgetter", "methodcaller", "call"}
MAX_PART = 200
MAX_PATH = 1000

# The Python syntax FX emits for a graph; anything else in a generated source was injected.
_SYNTAX = (
    ast.Module, ast.FunctionDef, ast.arguments, ast.arg, ast.Assign, ast.Return, ast.Call,
    ast.Attribute, ast.Name, ast.Constant, ast.Tuple, ast.List, ast.Dict, ast.Subscript, ast.Slice,
    ast.BinOp, ast.UnaryOp, ast.Compare, ast.keyword, ast.Starred, ast.expr_context, ast.operator,
    ast.unaryop, ast.cmpop, ast.BoolOp, ast.boolop,
)

# Builtins FX writes: getattr for a child that is not an identifier, slice and Ellipsis in indices.
_BUILTINS = {"getattr", "slice", "Ellipsis"}


def check_name(name: Any, what: str) -> str:
    """``name`` if it is a plain identifier FX may write into source; else SerializationError."""
    if (not isinstance(name, str) or not name.isidentifier() or not name.isascii() or keyword.iskeyword(name)
            or len(name) > MAX_PART or (name.startswith("__") and name.endswith("__"))):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise SerializationError(
            f"{what} {shown} is not a Python identifier (ASCII, no keyword or dunder, at most "
            f"{MAX_PART} characters); the file is corrupt or crafted: do not load it"
        )
    return name


def check_path(path: Any, what: str) -> str:
    """``path`` if it is a dotted module/attribute path (parts: identifiers or child indices)."""
    if not isinstance(path, str) or len(path) > MAX_PATH:
        check_name(path, what)  # raises with the value shown
    for part in path.split("."):
        if not (part.isascii() and part.isdecimal() and len(part) <= MAX_PART):
            check_name(part, f"{what} {path[:80]!r}: part")
    return path


def check_strings(value: Any, where: str) -> None:
    """``check_path`` on every string in ``value``, a nested list, tuple or dict (keys too)."""
    if isinstance(value, str):
        check_path(value, where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_strings(item, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_strings(key, where)
            check_strings(item, where)


def _check_source(src: str, nodes: list[fx.Node], globals_: dict[str, Any]) -> None:
    try:
        tree = ast.parse(src)
    except SyntaxError as error:
        raise SerializationError(f"the graph's generated source does not parse ({error}); a name in it was crafted") from error
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef) or tree.body[0].decorator_list:
        raise SerializationError("the graph's generated source holds more than its forward; a name in it was crafted")
    placeholders = {node.target for node in nodes if node.op == "placeholder"}  # FX's argument names
    known = {node.name for node in nodes} | placeholders | {"self"} | _BUILTINS | set(globals_)
    for item in ast.walk(tree):
        if not isinstance(item, _SYNTAX):
            raise SerializationError(f"the graph's generated source holds a {type(item).__name__}; a name in it was crafted")
        if isinstance(item, ast.Name) and item.id not in known:
            raise SerializationError(f"the graph's generated source names {item.id!r}, which is not one of its nodes")
        if isinstance(item, ast.Attribute) and item.attr.startswith("__"):
            raise SerializationError(f"the graph's generated source reads the attribute {item.attr!r}")
        if isinstance(item, ast.Call) and isinstance(item.func, ast.Name) and item.func.id == "getattr":
            # FX reads a child that is not an identifier (``getattr(self.blocks, "0")``).
            if len(item.args) != 2 or not isinstance(item.args[1], ast.Constant):
                raise SerializationError("the graph's generated source calls getattr with a computed name")
            check_path(item.args[1].value, "attribute read by the generated source")
        if isinstance(item, ast.arg) and item.arg not in known:
            raise SerializationError(f"the graph's generated source takes an argument {item.arg!r} that is not a placeholder")


class CheckedCodeGen(fx.graph.CodeGen):
    """FX's code generator, refusing a source that holds anything but the graph (see module docstring)."""

    def _gen_python_code(self, nodes: Any, root_module: str, namespace: Any, **kwargs: Any) -> Any:
        code = super()._gen_python_code(nodes, root_module, namespace, **kwargs)
        _check_source(code.src, list(nodes), code.globals)
        return code


def _allowed_functions() -> dict[str, Any]:
    names: dict[str, Any] = {"builtins.getattr": builtins.getattr, "torch._assert": torch._assert}
    for name in dir(torch._C._VariableFunctions):
        if not name.startswith("_") and name != "from_file" and hasattr(torch, name):
            names[f"torch.{name}"] = getattr(torch, name)
    for name in torch.functional.__all__:
        names[f"torch.{name}"] = getattr(torch, name)
    for name in dir(torch._C._nn):
        if not name.startswith("_"):
            names[f"torch._C._nn.{name}"] = getattr(torch._C._nn, name)
    for name in dir(F):
        value = getattr(F, name)
        if not name.startswith("_") and callable(value) and getattr(value, "__module__", "") == F.__name__:
            names[f"torch.nn.functional.{name}"] = value
    for module in (operator, math):
        for name in dir(module):
            if not name.startswith("_") and name not in _DENIED_OPERATORS and callable(getattr(module, name)):
                names[f"{module.__name__}.{name}"] = getattr(module, name)
    # ptqat-fx's own graph functions (what freeze puts in graphs, and a specialized graph's check).
    for function in (*graph_functions(), check_input_shapes):
        names[f"{function.__module__}.{function.__name__}"] = function
    return names


FUNCTIONS = _allowed_functions()
_FUNCTION_NAMES = {id(function): name for name, function in reversed(list(FUNCTIONS.items()))}


def function_name(target: Any) -> str | None:
    """The allow-list name of ``target``, or None when it is not allowed."""
    return _FUNCTION_NAMES.get(id(target))
