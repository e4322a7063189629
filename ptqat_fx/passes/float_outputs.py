"""The float layer outputs of calibration, kept for the discrepancy analysis.

While observing, calibration computes exactly the float model (every quantizer passes its
input through), and the analysis's float side recomputes the same values over the same
batches. ``FloatOutputs`` keeps, per calibration batch, a copy of the inputs and of every
annotated layer's output, so that ``discrepancy`` runs only the quantized model for a batch
whose inputs are equal to a recorded one: one forward instead of two. What it keeps is
bounded (``max_bytes``); batches beyond the bound, or that differ from the recorded ones (a
shuffling loader), are analysed on both sides as before.

Both passes run a ``tapped`` copy of the graph: the GraphModule's own generated forward,
sharing the model's modules, with a call after each layer node. There is no per-node Python
dispatch as in an ``fx.Interpreter``.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..meta import layer_spec
from ..runtime.quantizer import step_sizes

Tap = Callable[[str, Any], None]


def tapped(gm: fx.GraphModule, tap: Tap, replace: dict[str, Callable[..., Any]] | None = None) -> fx.GraphModule:
    """A GraphModule that runs ``gm``'s graph with ``gm``'s modules and calls ``tap(node name,
    value)`` right after each annotated layer node (before any in-place op can change the
    value); a node named in ``replace`` calls that function on its arguments instead."""
    graph = fx.Graph()
    # The same calling convention (a pytree codegen flattens structured inputs).
    graph.set_codegen(gm.graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if replace and node.name in replace:
            env[node] = graph.call_function(replace[node.name], fx.node.map_arg(node.args, env.__getitem__))
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
        if layer_spec(node) is not None:
            graph.call_function(tap, (node.name, env[node]))
    return fx.GraphModule(gm, graph, type(gm).__name__)


def _default_budget(device: torch.device | None) -> int:
    # A quarter of what is free: the analysis's own forward needs the rest.
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 1 << 31


def _copy(value: Any) -> Any:
    return pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value)


def _nbytes(value: Any) -> int:
    return sum(v.nbytes for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor))


def _versions(gm: fx.GraphModule) -> list[int]:
    steps = step_sizes(gm)
    return [p._version for p in gm.parameters() if id(p) not in steps]


def same_inputs(recorded: Any, given: Any) -> bool:
    """Whether two batches of model inputs are equal (structure, tensor values, constants)."""
    leaves, spec = pytree.tree_flatten(recorded)
    other, other_spec = pytree.tree_flatten(given)
    if spec != other_spec:
        return False
    for a, b in zip(leaves, other):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if isinstance(a, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device or not torch.equal(a, b):
                return False
            continue
        try:
            if a is not b and not bool(a == b):
                return False
        except Exception:  # a value without a plain truth value: not provably the same
            return False
    return True


class FloatOutputs:
    """Per calibration batch: its inputs and the float output of every layer node.

    Give one to ``calibrate(..., record=...)`` and the same to ``discrepancy(...,
    reference=...)`` of the same GraphModule; ``quantize`` does.

    Args:
        max_bytes: bound on what is kept (inputs and outputs); default a quarter of the free
            memory of the model's device.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.batches: list[tuple[Any, dict[str, torch.Tensor | None]]] = []
        self.bytes = 0
        self.full = False
        self._current: tuple[Any, dict[str, torch.Tensor | None]] | None = None
        self._graph: fx.Graph | None = None
        self._versions: list[int] = []

    def module(self, gm: fx.GraphModule, device: torch.device | None) -> fx.GraphModule:
        """``gm``'s forward that also records; reset, bound to ``gm``."""
        if self.max_bytes is None:
            self.max_bytes = _default_budget(device)
        self.batches, self.bytes, self.full, self._current = [], 0, False, None
        self._graph = gm.graph
        return tapped(gm, self._keep)

    def start(self, args: tuple) -> None:
        """Before the forward of a batch with inputs ``args``."""
        self._current = None
        if not self.full and self._room(_nbytes(args)):
            self._current = (_copy(args), {})

    def _room(self, nbytes: int) -> bool:
        self.bytes += nbytes
        if self.bytes > self.max_bytes:
            self.full, self._current = True, None
        return not self.full

    def _keep(self, name: str, value: Any) -> None:
        if self._current is None:
            return
        if not isinstance(value, torch.Tensor):
            self._current[1][name] = None
        elif self._room(value.nbytes):
            self._current[1][name] = value.detach().clone()

    def finish(self, gm: fx.GraphModule) -> None:
        """After the forward of a batch."""
        if self._current is not None:
            self.batches.append(self._current)
            self._current = None
        self._versions = _versions(gm)

    def valid_for(self, gm: fx.GraphModule) -> bool:
        """Recorded on ``gm``'s graph, with its parameters (step sizes aside) unchanged since."""
        return self._graph is gm.graph and bool(self.batches) and self._versions == _versions(gm)

    def release(self) -> None:
        """Drop what was recorded (the analysis is done with it)."""
        self.batches, self._current, self._graph = [], None, None

    def outputs(self, index: int, args: tuple) -> dict[str, torch.Tensor | None] | None:
        """The recorded float outputs of batch ``index`` if its inputs equal ``args``."""
        if index >= len(self.batches) or not same_inputs(self.batches[index][0], args):
            return None
        return self.batches[index][1]
