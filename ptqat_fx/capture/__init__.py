"""Capture: turn an ``nn.Module`` into the GraphModule the passes work on.

Public (for ``api`` and the passes):

* ``trace(model, example_inputs=..., auto_leaf=...)``: the front end (``frontend``);
* ``AutoLeaf`` records in ``gm.meta[AUTO_LEAVES_KEY]``: modules whose forward runs eagerly
  (nested captures), with the error, the user's line and the GraphModules under them;
* ``gm.meta[MODULE_TYPES_KEY]``: module path -> class of every module of the traced model;
* ``specialization(gm)``: the example shapes a graph is specialized to (None: any shape);
* ``describe_trace_failure``, ``structured_concrete_args``, ``QuantTracer`` for callers that
  trace on their own.

The pieces: ``tracer`` (the FX Tracer with example values), ``values`` (shape-aware
proxies), ``inputs`` (placeholders and codegen), ``layer_calls`` (functional layers in
positional form), ``library_calls`` (functions that reject a Proxy become calls), ``nested`` (eager forwards calling captured children),
``specialization`` (example shapes and their run-time guard), ``hooks`` (patches scoped to
one trace, thread-safe), ``diagnostics`` (error messages).
"""
from __future__ import annotations

from .diagnostics import describe_trace_failure
from .frontend import AUTO_LEAVES_KEY, MODULE_TYPES_KEY, RECORDED_CALLS_KEY, AutoLeaf, trace
from .inputs import structured_concrete_args
from .specialization import Specialization, specialization
from .tracer import QuantTracer

__all__ = [
    "AUTO_LEAVES_KEY", "MODULE_TYPES_KEY", "RECORDED_CALLS_KEY", "AutoLeaf", "QuantTracer", "Specialization",
    "describe_trace_failure", "specialization", "structured_concrete_args", "trace",
]
