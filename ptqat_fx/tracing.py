"""Symbolic tracing with quantization-aware leaves and diagnostics that say what to change.

``trace`` wraps ``torch.fx.Tracer`` with three additions:

* leaves: our ``FakeQuantizer`` and every module the user names (by class or module path)
  are kept as ``call_module`` nodes;
* ``autograd.Function.apply`` on traced values becomes one ``call_function`` node that calls
  the Function at run time, instead of being traced through (FX would inline its forward
  and silently drop its custom backward);
* failures become a ``TraceError`` that names the deepest module being traced, the user's
  source line, and the option that fixes it. ``torch.no_grad()`` inside ``forward`` is such a
  failure: FX does not record it, so the traced graph would differentiate what eager does not.

Given ``example_inputs``, dicts, lists and other nested structures of tensors are traced
through (each tensor becomes a placeholder, the structure is rebuilt around them, so
``for meta in img_metas`` runs on a real list) and non-tensor arguments are fixed as
constants. With ``auto_leaf=True`` a failure does not end tracing: the deepest failing module
becomes a leaf that runs eagerly (recorded as an ``AutoLeaf`` in ``gm.meta["ptqat_auto_leaves"]``)
and tracing starts again, until the rest of the model traces.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import os
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph import _PyTreeCodeGen
from torch.utils import _pytree as pytree

from .errors import TraceError
from .runtime.quantizer import FakeQuantizer

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(__file__)
AUTO_LEAVES_KEY = "ptqat_auto_leaves"
# GraphModule keeps only what the graph references (a parameter used through get_attr keeps
# a bare Module at its owner's path), so the module types are recorded at trace time.
MODULE_TYPES_KEY = "ptqat_module_types"


@dataclass
class AutoLeaf:
    """A module torch.fx could not trace, kept as a leaf that runs eagerly.

    Attributes:
        path: its module path in the traced GraphModule (``model``: the whole model, whose
            own forward did not trace, under a root that calls it).
        error: the exception tracing raised, as ``Type: message``.
        line: the user's source line that raised it, if known.
        quantized: paths of the layers inside it that got module-level quantizers.
        float_layers: paths of the quantizable layers inside it left in float, with why.
    """

    path: str
    error: str
    line: str | None
    quantized: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)


class _NoGradInForward(RuntimeError):
    pass


class QuantTracer(fx.Tracer):
    """A Tracer that keeps ``FakeQuantizer`` and user-named modules as leaves and remembers
    the deepest module it was inside when tracing failed."""

    def __init__(self, leaf_modules: Sequence[type | str] = ()) -> None:
        super().__init__()
        self.leaf_types = tuple(leaf for leaf in leaf_modules if isinstance(leaf, type))
        self.leaf_paths = {leaf for leaf in leaf_modules if isinstance(leaf, str)}
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, FakeQuantizer) or isinstance(m, self.leaf_types):
            return True
        if module_qualified_name in self.leaf_paths:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = self.path_of_module(m)
            raise


@functools.lru_cache(maxsize=None)
def _function_caller(function_class: type) -> Any:
    """A plain function that applies ``function_class``; it is what the graph node calls."""

    def apply(*args: Any, **kwargs: Any) -> Any:
        return function_class.apply(*args, **kwargs)

    apply.__name__ = apply.__qualname__ = f"{function_class.__name__}_apply"
    return apply


@contextlib.contextmanager
def _tracing_patches() -> Iterator[None]:
    function_type = torch.autograd.function.Function
    original_apply = function_type.__dict__["apply"]
    original_enter = torch.no_grad.__enter__

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, fx.Proxy):
                return leaf.tracer.create_proxy("call_function", _function_caller(cls), args, kwargs)
        return original_apply.__func__(cls, *args, **kwargs)

    def enter(self: torch.no_grad) -> None:
        raise _NoGradInForward(
            "torch.no_grad() inside forward: torch.fx does not record it, so the traced graph "
            "would compute gradients the eager model does not"
        )

    function_type.apply = classmethod(apply)
    torch.no_grad.__enter__ = enter
    try:
        yield
    finally:
        function_type.apply = original_apply
        torch.no_grad.__enter__ = original_enter


def _user_source_line(error: BaseException) -> str | None:
    """The deepest traceback frame outside torch and ptqat-fx: the user's line that failed."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if not frame.filename.startswith((_TORCH_DIR, _OWN_DIR)) and "<eval_with_key>" not in frame.filename:
            return f'{frame.filename}:{frame.lineno}: "{(frame.line or "").strip()}"'
    return None


def _fix_for(error: BaseException, module_path: str | None) -> str:
    message = str(error)
    leaf = f"leaf_modules=[{module_path!r}]" if module_path else "leaf_modules=[<module path>]"
    if isinstance(error, _NoGradInForward):
        return f"use .detach() on the tensors computed there, or pass {leaf} to run it eagerly"
    if "item assignment" in message:
        return f"write the update out of place (torch.cat / torch.where / index_put), or pass {leaf}"
    if "control flow" in message or "iterated" in message or "interpreted as an integer" in message or "len" in message:
        return (
            f"the module branches or loops on tensor values or shapes: pass {leaf}, or fix the "
            "deciding argument with concrete_args={...}"
        )
    return f"pass {leaf}, or wrap the failing function with torch.fx.wrap"


def describe_trace_failure(error: BaseException, module_path: str | None) -> str:
    """The message of a ``TraceError``: what failed, where, and what to do."""
    where = f"module {module_path!r}" if module_path else "the top-level forward"
    line = _user_source_line(error)
    at_line = f" at {line}" if line else ""
    return (
        f"torch.fx could not trace {where}{at_line}: {type(error).__name__}: {error}. "
        f"Fix: {_fix_for(error, module_path)}."
    )


def _eager_graph_module(model: nn.Module) -> fx.GraphModule:
    """A GraphModule with one node that calls ``model`` (as the leaf ``model``) with the
    arguments of its forward signature: for a model whose own forward cannot be traced."""
    graph = fx.Graph()
    args, kwargs = [], {}
    for name, parameter in inspect.signature(model.forward).parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TraceError(
                f"the forward of {type(model).__name__} cannot be traced and takes *args/**kwargs, "
                "so it cannot run as one leaf either; make the failing code a submodule or fix it"
            )
        placeholder = graph.placeholder(name, default_value=parameter.default)
        if parameter.kind is parameter.KEYWORD_ONLY:
            kwargs[name] = placeholder
        else:
            args.append(placeholder)
    graph.output(graph.call_module("model", tuple(args), kwargs))
    root = nn.Module()
    root.model = model
    return fx.GraphModule(root, graph, type(model).__name__)


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


def _keep_defaults(graph: fx.Graph, model: nn.Module) -> None:
    """Make a graph with nested inputs generate valid Python, callable without the arguments
    the forward has (literal) defaults for."""
    if not isinstance(graph._codegen, _PyTreeCodeGen):
        return
    defaults = {
        name: repr(p.default) for name, p in inspect.signature(model.forward).parameters.items()
        if p.default is not p.empty and _literal(p.default)
    }
    graph._codegen = _StructuredInputsCodeGen(graph._codegen.pytree_info, defaults)


def _literal(value: object) -> bool:
    try:
        return ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError):
        return False


class _Failure(Exception):
    """Tracing failed inside ``module_path`` (None: in no module's forward) with ``error``."""

    def __init__(self, module_path: str | None, error: Exception) -> None:
        super().__init__(module_path, error)
        self.module_path = module_path
        self.error = error

    def trace_error(self) -> TraceError:
        return TraceError(describe_trace_failure(self.error, self.module_path))

    def auto_leaf(self, path: str) -> AutoLeaf:
        return AutoLeaf(path, f"{type(self.error).__name__}: {self.error}", _user_source_line(self.error))


def _trace_once(model: nn.Module, leaves: Sequence[type | str], concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    tracer = QuantTracer(leaves)
    try:
        with _tracing_patches():
            graph = tracer.trace(model, concrete_args)
    except Exception as error:
        raise _Failure(tracer.failed_module, error) from error
    _keep_defaults(graph, model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def trace(
    model: nn.Module,
    *,
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    auto_leaf: bool = False,
) -> fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule that shares its parameters.

    Args:
        model: the module to trace (trace a copy if it must stay untouched).
        leaf_modules: module classes or module paths kept as opaque ``call_module`` nodes.
        concrete_args: forward arguments fixed to constants (``torch.fx.Tracer.trace``);
            they take precedence over what ``example_inputs`` implies.
        example_inputs / example_kwargs: the model's inputs; nested structures of tensors
            among them are traced through, non-tensor values fixed (``structured_concrete_args``).
        auto_leaf: on failure make the deepest failing module a leaf and trace again; every
            such module is listed in ``gm.meta["ptqat_auto_leaves"]``. A model whose own
            forward fails becomes one leaf under the path ``model``.

    ``gm.meta["ptqat_module_types"]`` maps every module path of the traced model (as the
    GraphModule names it) to the module's class.

    Raises:
        TraceError: naming the deepest failing module, the source line and the fix; with
            ``auto_leaf`` only if a module the user named a leaf still fails.
    """
    concrete = {**structured_concrete_args(model, example_inputs, example_kwargs), **(concrete_args or {})}
    leaves = list(leaf_modules)
    auto_leaves: list[AutoLeaf] = []
    while True:
        try:
            gm = _trace_once(model, leaves, concrete or None)
            break
        except _Failure as failure:
            if not auto_leaf or failure.module_path in leaves:
                raise failure.trace_error() from failure.error
            if failure.module_path is None:
                auto_leaves.append(failure.auto_leaf("model"))
                gm = _eager_graph_module(model)
                model = gm
                break
            auto_leaves.append(failure.auto_leaf(failure.module_path))
            leaves.append(failure.module_path)
    gm.meta[AUTO_LEAVES_KEY] = auto_leaves
    gm.meta[MODULE_TYPES_KEY] = {path: type(module) for path, module in model.named_modules()}
    return gm
