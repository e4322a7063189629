"""How a forward's inputs become placeholders, and how the GraphModule takes them back.

Two ways, chosen by the forward's signature:

* named parameters only: FX's own placeholders, with ``concrete_args`` that trace through
  nested structures of tensors (``structured_concrete_args``) and a codegen that keeps the
  forward's defaults (``keep_defaults``);
* ``*args``/``**kwargs`` (transformers forwards, and forwards wrapped by decorators that assign
  into ``kwargs``): the example call is replayed (``ExampleCall``). Each tensor given becomes a
  placeholder named after its argument (or its keyword), every other value is fixed, and the
  forward receives a real ``kwargs`` dict, so ``kwargs["x"] = ...`` works.
"""
from __future__ import annotations

import ast
import inspect
import keyword
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph import _PyTreeCodeGen
from torch.utils import _pytree as pytree

from ..errors import TraceError


def has_var_arguments(model: nn.Module) -> bool:
    """True if the forward (or the function a decorator wraps) takes ``*args``/``**kwargs``."""
    functions = (model.forward, inspect.unwrap(model.forward))
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return any(
        p.kind in kinds for f in functions for p in inspect.signature(f, follow_wrapped=False).parameters.values()
    )


@dataclass
class ExampleCall:
    """The example call of a forward as placeholder names and values: ``positional`` then
    ``keywords``, each ``(name, value)``.

    ``every_argument``: a placeholder for every value given, not only the tensors. A nested
    child's graph is called by its eager parent exactly as in the example call (GPT2Block gets
    ``(hidden, cache, None, None, use_cache=True, position_ids=ids)``); with placeholders for
    the tensors only, the parent's third positional value would bind to the graph's second
    tensor. The non-tensor placeholders are unused: the graph keeps the example's value.
    """

    positional: list[tuple[str, Any]]
    keywords: list[tuple[str, Any]]
    every_argument: bool = False

    @classmethod
    def of(cls, model: nn.Module, args: tuple, kwargs: dict[str, Any], every_argument: bool = False) -> ExampleCall:
        signature = inspect.signature(model.forward)
        names: list[str] = []
        for name, p in signature.parameters.items():
            if p.kind is p.VAR_POSITIONAL:
                names.extend(f"{name}_{i}" for i in range(len(args) - len(names)))
            elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.append(name)
        if len(names) < len(args):
            raise TraceError(f"{type(model).__name__}.forward takes {len(names)} positional inputs, got {len(args)}")
        for name in kwargs:
            if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
                raise TraceError(f"keyword input {name!r} of {type(model).__name__} is not a Python identifier")
        call = cls(list(zip(names, args)), list(kwargs.items()), every_argument)
        for name, value in call.positional + call.keywords:
            nested = pytree.tree_leaves(value)
            if not isinstance(value, torch.Tensor) and any(isinstance(leaf, torch.Tensor) for leaf in nested):
                raise TraceError(
                    f"input {name!r} of {type(model).__name__} holds tensors inside a structure and the "
                    "forward takes *args/**kwargs; pass those tensors as separate arguments"
                )
        return call


def structured_concrete_args(
    model: nn.Module, example_inputs: tuple = (), example_kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``concrete_args`` that trace through the structure of the example inputs.

    A tensor argument stays a plain placeholder. An argument holding tensors inside dicts,
    lists or tuples maps to that structure with ``torch.fx.PH`` for each tensor, so FX makes
    one placeholder per tensor and the GraphModule still takes the nested structure. Any
    other given value (int, str, None, config objects) is fixed as a constant, and so is the
    default of every argument not given (FX would otherwise trace it as a tensor).
    """
    signature = inspect.signature(model.forward)
    bound = signature.bind_partial(*example_inputs, **(example_kwargs or {}))
    concrete: dict[str, Any] = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if name in bound.arguments:
            value = bound.arguments[name]
            if not isinstance(value, torch.Tensor):
                concrete[name] = pytree.tree_map(lambda v: fx.PH if isinstance(v, torch.Tensor) else v, value)
        elif parameter.default is not parameter.empty:
            concrete[name] = parameter.default
    return concrete


class _StructuredInputsCodeGen(_PyTreeCodeGen):
    """FX's codegen for nested inputs, with the forward's defaults kept in its signature
    (FX writes them into the unpacking line, which is then not valid Python)."""

    def __init__(self, pytree_info: Any, defaults: dict[str, str]) -> None:
        super().__init__(pytree_info)
        self.defaults = defaults

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *, expanded_def: bool = False) -> str:
        names = self.pytree_info.orig_args
        if names and names[0] == "self":
            free_vars.insert(0, "self")
        signature = [f"{name}={self.defaults[name]}" if name in self.defaults else name for name in names]
        definition = fx.graph.CodeGen.gen_fn_def(self, signature, maybe_return_annotation, expanded_def=expanded_def)
        # The placeholders keep their defaults (an Interpreter uses them); the unpacking must not.
        bound = [var.split(" = ")[0] for var in free_vars]
        return definition + self.gen_var_bindings(names, bound, expanded_def)


def keep_defaults(graph: fx.Graph, model: nn.Module) -> None:
    """Make a graph with nested inputs generate valid Python, callable without the arguments
    the forward has (literal) defaults for."""
    if not isinstance(graph._codegen, _PyTreeCodeGen):
        return
    defaults = {
        name: repr(p.default) for name, p in inspect.signature(model.forward).parameters.items()
        if p.default is not p.empty and is_literal(p.default)
    }
    graph._codegen = _StructuredInputsCodeGen(graph._codegen.pytree_info, defaults)


def is_literal(value: object) -> bool:
    try:
        return ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError):
        return False


