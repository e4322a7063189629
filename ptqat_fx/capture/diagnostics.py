"""What failed while tracing, where, and what to change: the text of every ``TraceError``.

A failure is located twice: the deepest module whose forward was being traced (the tracer
remembers it) and the user's source line (the deepest traceback frame outside torch and
ptqat-fx). The fix names the option that helps for that kind of failure.
"""
from __future__ import annotations

import linecache
import os
import traceback

import torch

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(__file__))


class NoGradInForward(RuntimeError):
    """An op was recorded inside ``torch.no_grad()``: FX would drop the grad mode."""


class TensorValueBranch(RuntimeError):
    """Python control flow asked for the value of a traced tensor (``if x.sum() > 0``,
    ``range(n)`` or ``len(x)`` where the example value does not answer it)."""


class ProxyItemAssignment(TypeError):
    """Code assigned into a traced value (``kwargs["key"] = ...`` on a traced dict, ``x[i] = y``)."""


def is_library_file(filename: str) -> bool:
    """True for torch's and ptqat-fx's own files (never the user's line)."""
    return filename.startswith((_TORCH_DIR, _OWN_DIR)) or "<eval_with_key>" in filename


def _grad_mode_line(filename: str, lineno: int) -> int:
    """The ``with torch.no_grad()`` (or ``inference_mode``) line enclosing ``lineno``, else
    ``lineno``: grad mode is seen at the first op inside the block, not at its ``with``."""
    indent = len(linecache.getline(filename, lineno)) - len(linecache.getline(filename, lineno).lstrip())
    for candidate in range(lineno - 1, max(lineno - 40, 0), -1):
        text = linecache.getline(filename, candidate)
        depth = len(text) - len(text.lstrip())
        if text.strip() and depth < indent:
            if text.lstrip().startswith("with ") and ("no_grad" in text or "inference_mode" in text):
                return candidate
            indent = depth
    return lineno


def user_source_line(error: BaseException) -> str | None:
    """The deepest traceback frame outside torch and ptqat-fx: the user's line that failed."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if not is_library_file(frame.filename):
            lineno = frame.lineno or 0
            if isinstance(error, NoGradInForward):
                lineno = _grad_mode_line(frame.filename, lineno)
            line = linecache.getline(frame.filename, lineno) or frame.line or ""
            return f'{frame.filename}:{lineno}: "{line.strip()}"'
    return None


def _fix_for(error: BaseException, module_path: str | None) -> str:
    leaf = f"leaf_modules=[{module_path!r}]" if module_path else "leaf_modules=[<module path>]"
    if isinstance(error, NoGradInForward):
        return f"use .detach() on the tensors computed there, or pass {leaf} to run it eagerly"
    if isinstance(error, ProxyItemAssignment):
        return f"write the update out of place (torch.cat / torch.where / index_put), or pass {leaf}"
    if isinstance(error, TensorValueBranch):
        return (
            f"the module branches or loops on tensor values or shapes: pass {leaf}, or fix the "
            "deciding argument with concrete_args={...}"
        )
    return f"pass {leaf}, or wrap the failing function with torch.fx.wrap"


def describe_trace_failure(error: BaseException, module_path: str | None) -> str:
    """The message of a ``TraceError``: what failed, where, and what to do."""
    where = f"module {module_path!r}" if module_path else "the top-level forward"
    line = user_source_line(error)
    at_line = f" at {line}" if line else ""
    return (
        f"torch.fx could not trace {where}{at_line}: {type(error).__name__}: {error}. "
        f"Fix: {_fix_for(error, module_path)}."
    )
