"""Hooks that exist only while one thread traces: no patch outlives a ``trace`` call.

Tracing needs two things torch offers no scoped API for: ``autograd.Function.apply`` on a
traced value must become one graph node (FX would inline the Function's forward and drop its
custom backward), and a library function that rejects a Proxy (``einops.rearrange``) must be
recorded as one call. Both are name bindings swapped for the duration of ``tracing(tracer)``:

* one trace at a time in the process (``_LOCK``, re-entrant for nested captures): FX itself
  swaps ``nn.Module.__call__``/``__getattr__`` process-wide while it traces, and two
  overlapping swaps restore each other's wrappers (the race that broke every later
  ``quantize`` of the process);
* the swapped functions dispatch on the calling thread: only the thread that owns the trace
  (``_STATE.tracers``) and only on arguments holding a Proxy reaches the tracer; any other
  call, in any thread, runs the original;
* originals are restored in ``finally``, so ``KeyboardInterrupt`` or any error leaves torch
  and the libraries as they were.

``torch.no_grad()`` inside a forward is detected without a patch: the tracer runs with grad
enabled and refuses to record an op while grad mode is off (see ``tracer.QuantTracer``).
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .values import MISSING

_LOCK = threading.RLock()
_STATE = threading.local()
_FUNCTION = torch.autograd.function.Function


def active_tracer() -> fx.Tracer | None:
    """The tracer of the innermost trace running in this thread, if any."""
    tracers = getattr(_STATE, "tracers", None)
    return tracers[-1] if tracers else None


def _proxy_in(args: tuple, kwargs: dict) -> fx.Proxy | None:
    return next((leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, fx.Proxy)), None)


def record_call(target: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """One ``call_function`` node calling ``target`` if this thread traces and an argument is a
    Proxy of its tracer; otherwise ``target(*args, **kwargs)``.

    A call that returns None on the example values is None, not a node: a Proxy is never None,
    so model code testing the result with ``is None`` would take the other branch than eager
    does (transformers' ``create_causal_mask`` returns None where SDPA's ``is_causal`` masks,
    and the attention then passes ``is_causal=attention_mask is None``: a traced node made
    GPT-2's attention non-causal)."""
    tracer = active_tracer()
    proxy = _proxy_in(args, kwargs) if tracer is not None and not getattr(tracer, "eager", False) else None
    if proxy is None or proxy.tracer is not tracer:
        return target(*args, **kwargs)
    result = tracer.create_proxy("call_function", target, args, kwargs)
    if getattr(tracer, "tracks_values", False) and tracer.value_of(result.node) is None:
        _erase_unused(tracer, result.node)
        return None
    return result


def _erase_unused(tracer: fx.Tracer, node: fx.Node) -> None:
    """Erase ``node`` and, recursively, the inputs only it read that are attribute reads or
    calls known to make no tensor (the ``GPT2Config`` built for a call that is gone); a tensor
    op, or one of unknown value, may act in place, so it stays."""
    inputs = node.all_input_nodes
    tracer.values.pop(node, None)
    tracer.graph.erase_node(node)
    for source in inputs:
        value = tracer.value_of(source)
        made_no_tensor = source.op in ("call_function", "call_method") and value is not MISSING \
            and not any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))
        if not source.users and (source.op == "get_attr" or made_no_tensor):
            _erase_unused(tracer, source)


@functools.lru_cache(maxsize=None)
def function_caller(function_class: type) -> Callable[..., Any]:
    """A plain function that applies ``function_class``; it is what the graph node calls."""

    def apply(*args: Any, **kwargs: Any) -> Any:
        return function_class.apply(*args, **kwargs)

    apply.__name__ = apply.__qualname__ = f"{function_class.__name__}_apply"
    return apply


_ORIGINAL_APPLY = _FUNCTION.__dict__["apply"]


def _apply(cls: type, *args: Any, **kwargs: Any) -> Any:
    if active_tracer() is None or _proxy_in(args, kwargs) is None:
        return _ORIGINAL_APPLY.__func__(cls, *args, **kwargs)
    return record_call(function_caller(cls), args, kwargs)


def bindings_of(function: Callable[..., Any], extra: dict[str, Any] | None = None) -> list[tuple[dict, str]]:
    """Every module-level name bound to ``function`` (``einops.rearrange`` and a user's
    ``from einops import rearrange`` alike), plus names in ``extra`` (a frame's globals)."""
    found = []
    namespaces = [getattr(module, "__dict__", None) for module in list(sys.modules.values())]
    for namespace in [*namespaces, extra]:
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if value is function and not name.startswith("__"):
                found.append((namespace, name))
    return found


def _recording(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        return record_call(function, args, kwargs)

    recorded.__ptqat_recorded__ = function  # type: ignore[attr-defined]
    return recorded


@contextlib.contextmanager
def tracing(tracer: fx.Tracer, record_functions: tuple[Callable[..., Any], ...] = ()) -> Iterator[None]:
    """Make ``tracer`` this thread's active tracer, with ``Function.apply`` and every binding of
    ``record_functions`` recording calls on its Proxies, until the block ends."""
    with _LOCK:
        tracers = _STATE.__dict__.setdefault("tracers", [])
        swapped: list[tuple[dict, str, Any]] = []
        outermost = not tracers
        try:
            tracers.append(tracer)
            if outermost:
                _FUNCTION.apply = classmethod(_apply)
            for function in record_functions:
                for namespace, name in bindings_of(function):
                    swapped.append((namespace, name, namespace[name]))
                    namespace[name] = _recording(function)
            yield
        finally:
            for namespace, name, original in reversed(swapped):
                namespace[name] = original
            if outermost:
                _FUNCTION.apply = _ORIGINAL_APPLY
            if tracers and tracers[-1] is tracer:  # an interrupt may land before the append
                tracers.pop()


def unpatched() -> bool:
    """True when no hook of this module is installed (for tests and sanity checks)."""
    return _FUNCTION.__dict__["apply"] is _ORIGINAL_APPLY and not getattr(_STATE, "tracers", None)
