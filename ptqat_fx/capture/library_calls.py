"""Find the library function that rejected a Proxy, so the next attempt records it as one call.

``einops.rearrange(x, "b c h w -> b (h w) c")`` on a traced ``x`` fails inside einops (it
does not know the Proxy type), and so do other libraries that inspect their inputs. Such a
function is an ordinary op for the graph: called at run time on real tensors it works. The
traceback of the failure tells which function it was: the first frame that is neither model
code, torch nor ptqat-fx, called from model code with a Proxy among its arguments. The next
attempt records every call of it on a Proxy as one ``call_function`` node
(``hooks.tracing(record_functions=...)``), without the user naming it.
"""
from __future__ import annotations

import gc
import inspect
import traceback
import types
from collections.abc import Callable
from typing import Any

from torch import fx, nn

from .diagnostics import is_library_file
from .hooks import bindings_of


def model_files(model: nn.Module) -> set[str]:
    """Source files defining the classes of ``model``'s modules: the code being traced."""
    files = set()
    for module in model.modules():
        try:
            files.add(inspect.getsourcefile(type(module)) or "")
        except TypeError:
            continue
    return files


def _holds_proxy(namespace: dict[str, Any]) -> bool:
    for value in namespace.values():
        items = value if isinstance(value, (tuple, list)) else value.values() if isinstance(value, dict) else (value,)
        if any(isinstance(item, fx.Proxy) for item in items):
            return True
    return False


def _function_of(code: types.CodeType, namespace: dict[str, Any]) -> Callable[..., Any] | None:
    """The module-level function whose code is ``code`` (bound to some module name): looked up
    by name in the module that defines it, else among the referrers of the code (slow)."""
    candidate = namespace.get(code.co_name)
    if isinstance(candidate, types.FunctionType) and candidate.__code__ is code:
        return candidate
    for referrer in gc.get_referrers(code):
        if isinstance(referrer, types.FunctionType) and referrer.__code__ is code and bindings_of(referrer):
            return referrer
    return None


def rejecting_library_function(error: BaseException, files: set[str]) -> Callable[..., Any] | None:
    """The library function model code called with a Proxy where ``error`` was raised, if any."""
    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
    for caller, callee in zip(frames, frames[1:]):
        callee_file = callee.f_code.co_filename
        if caller.f_code.co_filename not in files or callee_file in files or is_library_file(callee_file):
            continue
        if isinstance(callee.f_locals.get("self"), nn.Module) or not _holds_proxy(callee.f_locals):
            continue
        function = _function_of(callee.f_code, callee.f_globals)
        if function is not None:
            return function
    return None
