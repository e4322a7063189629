"""The Tracer: torch.fx symbolic tracing that knows the example values as it traces.

``QuantTracer`` is a ``torch.fx.Tracer`` with these additions:

* leaves: our ``FakeQuantizer`` and every module the user names (by class or module path)
  are kept as ``call_module`` nodes;
* ``autograd.Function.apply`` on traced values becomes one ``call_function`` node calling the
  Function at run time (FX would inline its forward and drop its custom backward), and so does
  every library function the capture found rejecting a Proxy (``record_functions``); both
  through the scoped hooks of ``hooks.tracing``;
* with example values, every recorded op is also run on them (``evaluate``) and its proxy is a
  ``values.ValueProxy``; with ``specialize`` shape queries answer from those values;
* an op recorded while grad mode is off (``torch.no_grad()`` in a forward) is refused: FX does
  not record grad mode, so the graph would differentiate what eager does not;
* calls from other threads, and module calls made while an op is evaluated, are not traced.

* functional layer calls come out positional (``layer_calls``): ``F.linear(x, weight=w)``
  reads as ``F.linear(x, w)`` to every pass.

``trace_once`` runs one attempt and raises ``TraceFailure`` naming the deepest module whose
forward failed; ``capture.trace`` decides what to do about it.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _orig_module_call

from ..errors import TraceError
from ..runtime.quantizer import FakeQuantizer
from .diagnostics import NoGradInForward, TensorValueBranch, describe_trace_failure
from .hooks import tracing
from .inputs import ExampleCall, keep_defaults
from . import specialization
from .layer_calls import addmm_as_linear_transposed, positional_layer_arguments
from .values import MISSING, ValueProxy


def _attribute(root: nn.Module, target: str) -> Any:
    value: Any = root
    for name in target.split("."):
        value = getattr(value, name)
    return value


def _refuse_without_grad() -> None:
    if not torch.is_grad_enabled():
        raise NoGradInForward(
            "torch.no_grad() inside forward: torch.fx does not record it, so the traced graph "
            "would compute gradients the eager model does not"
        )


class QuantTracer(fx.Tracer):
    """A Tracer that keeps ``FakeQuantizer`` and user-named modules as leaves, carries example
    values, and remembers the deepest module it was inside when tracing failed."""

    def __init__(self, leaf_modules: Sequence[type | str] = (), specialize: bool = False) -> None:
        super().__init__()
        self.leaf_types = tuple(leaf for leaf in leaf_modules if isinstance(leaf, type))
        self.leaf_paths = {leaf for leaf in leaf_modules if isinstance(leaf, str)}
        self.failed_module: str | None = None
        self.specialize = specialize
        self.examples: dict[str, Any] = {}
        self.values: dict[fx.Node, Any] = {}
        self.shape_queries: list[str] = []
        self.example_call: ExampleCall | None = None
        self.tracks_values = False
        self.eager = 0  # > 0 while an op runs on example values: its module calls are not traced
        self.thread = threading.get_ident()

    def to_bool(self, obj: fx.Proxy) -> bool:
        # fx.Tracer's hook for ``if proxy:``: a typed error, so diagnostics need not read messages.
        raise TensorValueBranch(f"traced value {obj.node.name!r} decides Python control flow (if, while, and, or)")

    def iter(self, obj: fx.Proxy) -> Any:
        raise TensorValueBranch(f"traced value {obj.node.name!r} is iterated, and the example does not fix its length")

    def _passes_through(self) -> bool:
        return self.eager > 0 or threading.get_ident() != self.thread

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, FakeQuantizer) or isinstance(m, self.leaf_types):
            return True
        if module_qualified_name in self.leaf_paths:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self._passes_through():
            return forward(*args, **kwargs)
        _refuse_without_grad()  # outside the try: the failure belongs to the calling forward
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = self.path_of_module(m)
            raise

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._passes_through():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ValueProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, *rest: Any, **options: Any) -> Any:
        if kind not in ("placeholder", "output"):
            _refuse_without_grad()
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
        if self.tracks_values:
            if kind == "placeholder":
                self.values[proxy.node] = self.examples.get(target, MISSING)
            elif kind != "output":
                self.values[proxy.node] = self.evaluate(kind, target, args, kwargs)
        return proxy

    def value_of(self, node: fx.Node) -> Any:
        """The example value of ``node``; ``MISSING`` where it is unknown."""
        value = self.values.get(node, MISSING)
        if value is MISSING and node.op == "placeholder":
            value = getattr(node, "ptqat_example", MISSING)  # a tensor inside a structure
        return value

    def note_shape_query(self, node: fx.Node, attribute: str) -> None:
        self.shape_queries.append(f"{node.name}.{attribute}")

    def evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        """The value of one op on the example values; ``MISSING`` if an input is unknown or the
        op fails on them (then its shape queries stay symbolic)."""
        missing = False

        def value(a: Any) -> Any:
            nonlocal missing
            if isinstance(a, fx.Proxy):
                v = self.value_of(a.node)
                missing = missing or v is MISSING
                return v
            return a

        args, kwargs = fx.node.map_aggregate(args, value), fx.node.map_aggregate(kwargs, value)
        if missing:
            return MISSING
        self.eager += 1
        grad = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":
                return _orig_module_call(self.root.get_submodule(target), *args, **kwargs)
            if kind == "get_attr":
                return _attribute(self.root, target)
            return MISSING
        except Exception:
            return MISSING
        finally:
            torch._C._set_grad_enabled(grad)
            self.eager -= 1

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None) -> Any:
        call = self.example_call
        if call is None:
            return super().create_args_for_root(root_fn, is_module, concrete_args)

        def placeholder(name: str, value: Any) -> Any:
            if not isinstance(value, torch.Tensor) and not call.every_argument:
                return value
            proxy = self.create_proxy("placeholder", name, (), {})
            self.values[proxy.node] = value
            return proxy if isinstance(value, torch.Tensor) else value

        positional = [placeholder(name, value) for name, value in call.positional]
        keywords = {name: placeholder(name, value) for name, value in call.keywords}

        def replay(root: nn.Module) -> Any:
            return root_fn(root, *positional, **keywords)

        return replay, [self.root]


class TraceFailure(Exception):
    """Tracing failed inside ``module_path`` (None: in no module's forward) with ``error``."""

    def __init__(self, module_path: str | None, error: Exception) -> None:
        super().__init__(module_path, error)
        self.module_path = module_path
        self.error = error

    def trace_error(self) -> TraceError:
        return TraceError(describe_trace_failure(self.error, self.module_path))


def trace_once(
    model: nn.Module,
    leaves: Sequence[type | str],
    concrete_args: dict[str, Any] | None,
    *,
    examples: dict[str, Any] | None = None,
    example_call: ExampleCall | None = None,
    specialize: bool = False,
    record_functions: tuple[Callable[..., Any], ...] = (),
) -> fx.GraphModule:
    """One tracing attempt: the GraphModule, guarded to the example shapes of its inputs
    (``specialization.specialize``) if the trace answered shape queries from them.

    ``examples`` maps top-level placeholder names to example values (tensors inside
    structures carry theirs on ``fx.PH`` instances, see ``ExamplePH``); ``example_call``
    replays a ``*args``/``**kwargs`` forward instead of FX's placeholders.
    """
    tracer = QuantTracer(leaves, specialize)
    tracer.examples = dict(examples or {})
    tracer.example_call = example_call
    tracer.tracks_values = examples is not None or example_call is not None
    try:
        with tracing(tracer, record_functions), torch.enable_grad():
            graph = tracer.trace(model, None if example_call is not None else concrete_args)
        inputs = {node: tracer.value_of(node) for node in graph.find_nodes(op="placeholder")}
    except Exception as error:
        raise TraceFailure(tracer.failed_module, error) from error
    finally:
        tracer.values.clear()  # the example activations: freed as soon as the attempt ends
    keep_defaults(graph, model)
    positional_layer_arguments(graph)
    addmm_as_linear_transposed(graph)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    # FX's tracing closures make the tracer part of a reference cycle: without this it would
    # keep the traced model (weights that later passes replace) until a full collection.
    tracer.root = None
    specialization.specialize(gm, inputs, tracer.shape_queries)
    return gm


class ExamplePH(fx._symbolic_trace.PHBase):
    """``fx.PH`` carrying the example tensor of one placeholder inside a structured input
    (FX copies non-callable attributes of the PH onto the placeholder node)."""

    def __init__(self, example: torch.Tensor) -> None:
        super().__init__()
        self.ptqat_example = example
