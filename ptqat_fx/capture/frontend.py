"""``trace``: capture a model as a GraphModule, shape-aware where it must be, nested where a
forward does not trace.

The attempts, in order, for the model and for every module that capture descends into:

1. plain symbolic tracing (the graph serves any shape torch.fx allows);
2. if that fails and example inputs are given: shape-specialized tracing, in which shape
   queries answer from the example values (``values``) and the graph is guarded to the
   example shapes (``specialization``);
3. a library function that rejected a Proxy (``einops.rearrange``) is recorded as one call
   (``library_calls``) and the attempt repeated;
4. what still fails inside a module's forward makes that module a leaf of its parent's graph;
   with ``auto_leaf`` it becomes a nested capture (``nested``): its forward runs eagerly and
   its children are captured recursively. A root forward that fails is nested the same way,
   under one ``call_module`` node named ``model``.

Why torch.fx and not ``torch.export`` (non-strict) as the front end, on evidence
(``bench/capture_frontends.py``): export specializes shapes as well, but it produces an ATen
graph with no ``call_module`` nodes (module paths only in ``nn_module_stack`` metadata), so
every later pass (fold_bn, annotate, insert_quantizers, leaves) would have to be rewritten
against ATen ops; it refuses the whole model at the first tensor-value branch instead of
locating a module to nest; and it decomposes custom ``autograd.Function`` s and the
functions we record as calls. FX with example values gives the same shape specialization
while keeping ``nn.Module`` calls, paths and our leaves.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import TraceError
from ..layer_kinds import kind_of_module, runs_as_kind
from ..meta import AUTO_LEAVES_KEY, MODULE_TYPES_KEY, RECORDED_CALLS_KEY
from ..runtime.quantizer import FakeQuantizer
from .diagnostics import user_source_line
from .inputs import ExampleCall, has_var_arguments, is_literal, structured_concrete_args
from .library_calls import model_files, rejecting_library_function
from .nested import nest, preserved_state, record_calls
from .tracer import ExamplePH, TraceFailure, trace_once

_MAX_RECORDED_FUNCTIONS = 16


@dataclass
class AutoLeaf:
    """A module whose own forward did not trace: it runs eagerly (a nested capture).

    Attributes:
        path: its module path in the traced GraphModule (``model``: the whole model, whose
            own forward did not trace, under a root that calls it).
        error: why, as ``Type: message``.
        line: the user's source line that raised it, if known.
        graphs: paths of its descendants captured as GraphModules, which its forward calls.
        quantized: paths of the layers inside it that got module-level quantizers.
        float_layers: paths of the quantizable layers inside it left in float, with why.
    """

    path: str
    error: str
    line: str | None
    graphs: list[str] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)


def _cloned(value: Any) -> Any:
    # Example values are run through the ops as the trace goes: in-place ops must not reach
    # the caller's tensors.
    return pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value)


def _attempts(
    model: nn.Module, args: tuple, kwargs: dict[str, Any], leaves: Sequence[type | str],
    concrete_args: dict[str, Any] | None, has_examples: bool, nested: bool,
) -> tuple[fx.GraphModule, list[Callable[..., Any]]]:
    """Trace ``model`` plain, then shape-specialized, recording rejecting library functions;
    the GraphModule (guarded if specialized) and the recorded functions, or the last TraceFailure.
    ``nested``: ``model`` is a child that its eager parent calls as in the example call."""
    args, kwargs = _cloned(args), _cloned(kwargs)
    call = ExampleCall.of(model, args, kwargs, nested) if has_examples and has_var_arguments(model) else None
    concrete = {**structured_concrete_args(model, args, kwargs), **(concrete_args or {})}
    examples: dict[str, Any] = {}
    if has_examples and call is None:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
        examples = {name: value for name, value in bound.items() if isinstance(value, torch.Tensor)}
        for name, value in bound.items():
            if name in concrete and not isinstance(value, torch.Tensor) and name not in (concrete_args or {}):
                concrete[name] = pytree.tree_map(lambda v: ExamplePH(v) if isinstance(v, torch.Tensor) else v, value)
    files = model_files(model)
    functions: list[Callable[..., Any]] = []
    specialized = False
    while True:
        try:
            gm = trace_once(
                model, leaves, concrete or None, examples=examples if specialized else None,
                example_call=call, specialize=specialized, record_functions=tuple(functions),
            )
            return gm, functions
        except TraceFailure as failure:
            function = rejecting_library_function(failure.error, files)
            if function is not None and function not in functions and len(functions) < _MAX_RECORDED_FUNCTIONS:
                functions.append(function)
            elif has_examples and not specialized:
                specialized = True
            else:
                raise


class _Capture:
    """One ``trace`` call: the options, the recorded calls (lazily), and what was nested."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], leaf_modules: Sequence[type | str],
                 concrete_args: dict[str, Any] | None, auto_leaf: bool) -> None:
        self.model, self.args, self.kwargs = model, args, kwargs
        self.leaf_types = tuple(leaf for leaf in leaf_modules if isinstance(leaf, type))
        self.leaf_paths = [leaf for leaf in leaf_modules if isinstance(leaf, str)]
        self.concrete_args = concrete_args
        self.auto_leaf = auto_leaf
        self.has_examples = bool(args) or bool(kwargs)
        self.records: list[AutoLeaf] = []
        self.functions: list[Callable[..., Any]] = []
        self._calls: dict[int, Any] | None = None

    def calls(self) -> dict[int, Any]:
        if self._calls is None:
            self._calls = record_calls(self.model, self.args, self.kwargs)
        return self._calls

    def graph(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], path: str) -> fx.GraphModule | None:
        """``module`` (at ``path``) captured, its failing descendants nested; None if its own
        forward fails (recorded, for the caller to nest it)."""
        prefix = f"{path}." if path else ""
        leaves: list[type | str] = [*self.leaf_types]
        leaves += [p[len(prefix):] for p in self.leaf_paths if p.startswith(prefix)]
        if path:
            # Inside a nested capture no graph pass rewrites a traced-into layer subclass
            # (Conv2dStaticSamePadding): kept as a module call, quantize_leaves quantizes it.
            leaves += _layer_subclasses(module)
        failed: list[tuple[str, TraceFailure]] = []
        while True:
            try:
                gm, functions = _attempts(module, args, kwargs, leaves, self.concrete_args if not path else None,
                                          self.has_examples, nested=bool(path))
                break
            except TraceFailure as failure:
                if not self.auto_leaf or failure.module_path in leaves:
                    raise failure.trace_error() from failure.error
                if failure.module_path is None:
                    self._record(path or "model", failure)
                    return None
                failed.append((failure.module_path, failure))
                leaves.append(failure.module_path)
        self.functions += [f for f in functions if f not in self.functions]
        for relative, failure in failed:
            record = self._record(prefix + relative, failure)
            if self.has_examples:
                nested = nest(gm.get_submodule(relative), relative, self.calls(), self._keep, self._child(prefix),
                              self._on_nested)
                gm.set_submodule(relative, nested)
                record.graphs = [prefix + p for p, m in nested.named_modules(prefix=relative) if isinstance(m, fx.GraphModule)]
        return gm

    def _child(self, prefix: str) -> Callable[[nn.Module, tuple, dict, str], nn.Module | None]:
        return lambda child, args, kwargs, relative: self.graph(child, args, kwargs, prefix + relative)

    def _keep(self, module: nn.Module, path: str) -> bool:
        is_torch_layer = module.__module__.startswith("torch.nn") and not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
        return (
            isinstance(module, (FakeQuantizer, fx.GraphModule, *self.leaf_types)) or is_torch_layer
            or path in self.leaf_paths or kind_of_module(module) is not None
        )

    def _on_nested(self, path: str, why: str) -> None:
        self.records.append(AutoLeaf(path, why, None))

    def _record(self, path: str, failure: TraceFailure) -> AutoLeaf:
        record = AutoLeaf(path, f"{type(failure.error).__name__}: {failure.error}", user_source_line(failure.error))
        self.records.append(record)
        return record


def _layer_subclasses(module: nn.Module) -> list[type]:
    """Types of the layer modules under ``module`` whose own forward replaces their kind's."""
    found = {type(m) for m in module.modules() if kind_of_module(m) is not None and runs_as_kind(m) is None}
    return sorted(found, key=lambda cls: cls.__qualname__)


def _eager_graph_module(model: nn.Module, call: ExampleCall | None) -> fx.GraphModule:
    """A GraphModule with one node that calls ``model`` (as the leaf ``model``): for a model
    whose own forward cannot be traced. Its inputs are the forward's parameters, or, for a
    ``*args``/``**kwargs`` forward, the example call's tensors (other values fixed)."""
    graph = fx.Graph()
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    if call is not None:
        def given(name: str, value: Any) -> Any:
            return graph.placeholder(name) if isinstance(value, torch.Tensor) or not is_literal(value) else value

        args = [given(name, value) for name, value in call.positional]
        kwargs = {name: given(name, value) for name, value in call.keywords}
    else:
        for name, parameter in inspect.signature(model.forward).parameters.items():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise TraceError(
                    f"the forward of {type(model).__name__} cannot be traced and takes *args/**kwargs; "
                    "pass example_inputs/example_kwargs so its children can be captured"
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


def trace(
    model: nn.Module,
    *,
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    auto_leaf: bool = False,
) -> fx.GraphModule:
    """Capture ``model`` as a GraphModule that shares its parameters (``model`` itself and
    its buffers are left as they were).

    Args:
        model: the module to capture.
        leaf_modules: module classes or module paths kept as opaque ``call_module`` nodes.
        concrete_args: forward arguments fixed to constants (``torch.fx.Tracer.trace``);
            they take precedence over what ``example_inputs`` implies.
        example_inputs / example_kwargs: the model's inputs. Nested structures of tensors are
            traced through and non-tensor values fixed; where plain tracing fails, the trace
            is specialized to their shapes (``specialization(gm)``, guarded at run time).
        auto_leaf: where a forward still fails, run it eagerly: without example inputs as an
            opaque leaf, with them as a nested capture whose children are captured
            recursively. Each is an ``AutoLeaf`` in ``gm.meta["ptqat_auto_leaves"]``; a model
            whose own forward fails runs under the path ``model``.

    ``gm.meta["ptqat_module_types"]`` maps every module path of the traced model (as the
    GraphModule names it) to the module's class; ``gm.meta["ptqat_recorded_calls"]`` names
    the library functions recorded as calls because they rejected a Proxy.

    Raises:
        TraceError: naming the deepest failing module, the source line and the fix; with
            ``auto_leaf`` only if a module the user named a leaf still fails.
    """
    kwargs = dict(example_kwargs or {})
    capture = _Capture(model, example_inputs, kwargs, leaf_modules, concrete_args, auto_leaf)
    with preserved_state(model):
        gm = capture.graph(model, example_inputs, kwargs, "")
        types = {path: type(module) for path, module in model.named_modules()}
        if gm is None:
            root = model
            if capture.has_examples:
                root = nest(model, "", capture.calls(), capture._keep, capture._child(""), capture._on_nested)
            call = ExampleCall.of(model, example_inputs, kwargs) if capture.has_examples and has_var_arguments(model) else None
            gm = _eager_graph_module(root, call)
            for record in capture.records[1:]:
                record.path = f"model.{record.path}"
                record.graphs = [f"model.{path}" for path in record.graphs]
            capture.records[0].graphs = [f"model.{p}" for p, m in root.named_modules() if isinstance(m, fx.GraphModule)]
            types = {"": type(gm), **{f"model.{path}" if path else "model": kind for path, kind in types.items()}}
    gm.meta[AUTO_LEAVES_KEY] = capture.records
    gm.meta[MODULE_TYPES_KEY] = types
    gm.meta[RECORDED_CALLS_KEY] = [f"{f.__module__}.{f.__qualname__}" for f in capture.functions]
    return gm
