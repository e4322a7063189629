"""Proxies that know their example value, so shape queries become constants at trace time.

While it traces, the tracer also runs every recorded op on the example inputs (real tensors,
under ``no_grad``; ``tracer.QuantTracer.evaluate``) and keeps each node's value. A
``ValueProxy`` answers the questions Python asks of a tensor's *shape* from that value:
``x.size(2)``, ``x.shape``, ``x.dim()``, ``x.ndim``, ``x.numel()``, ``x.dtype``, ``x.device``,
``len(x)``, and unpacking ``a, b = x`` or a tuple a leaf returned. The answers are plain Python
ints, ``torch.Size`` and dtypes, so shape arithmetic, ``range(B)``, ``x.view(b * s,
*x.shape[2:])``, ``if x.size(2) > y.size(2)`` and ``assert C == 3`` run as ordinary Python and
the graph is specialized to the example shapes (``specialization`` records which and guards
them at run time).

What still needs a value the graph does not have (``if x.sum() > 0``, ``int(x.max())``) stays a
failure: control flow on tensor *values* is not specialized, since a constant would be
silently wrong for the next input.

Why real tensors and not ``FakeTensorMode``: every op then runs exactly as eager does,
including custom autograd Functions, third-party kernels and library calls without fake
implementations, and the cost is one eager forward on the example inputs, which ``quantize``
runs anyway (``capture`` restores buffers and RNG state afterwards).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .diagnostics import ProxyItemAssignment, TensorValueBranch

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()

# Attributes and methods of a tensor that depend on its shape, dtype and placement only.
SHAPE_ATTRIBUTES = frozenset({
    "shape", "ndim", "dtype", "device", "is_cuda", "layout", "is_sparse", "is_quantized", "is_meta",
})
SHAPE_METHODS = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "element_size", "is_floating_point",
    "is_complex", "is_contiguous", "stride", "get_device",
})


class ValueProxy(fx.Proxy):
    """An ``fx.Proxy`` whose tracer knows the example value of its node (or ``MISSING``)."""

    @property
    def value(self) -> Any:
        return self.tracer.value_of(self.node)  # type: ignore[attr-defined]

    def _shape_source(self) -> torch.Tensor | None:
        value = self.value if self.tracer.specialize else MISSING  # type: ignore[attr-defined]
        return value if isinstance(value, torch.Tensor) else None

    def __getattr__(self, name: str) -> Any:
        if name in SHAPE_ATTRIBUTES or name in SHAPE_METHODS:
            value = self._shape_source()
            if value is not None:
                self.tracer.note_shape_query(self.node, name)  # type: ignore[attr-defined]
                return getattr(value, name)
        return super().__getattr__(name)

    def _sequence(self) -> Any:
        value = self.value if self.tracer.specialize else MISSING  # type: ignore[attr-defined]
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                return MISSING
            self.tracer.note_shape_query(self.node, "len")  # type: ignore[attr-defined]
            return value
        # The structure a leaf or a function returned is known; its length is not data.
        return value if isinstance(value, (tuple, list)) else MISSING

    def __len__(self) -> int:
        value = self._sequence()
        if value is MISSING:
            raise TensorValueBranch(f"len() of traced value {self.node.name!r}, whose length the example does not fix")
        return len(value)

    def __iter__(self) -> Any:
        value = self._sequence()
        if value is MISSING:
            return super().__iter__()
        return iter([self[i] for i in range(len(value))])

    def __index__(self) -> int:
        raise TensorValueBranch(f"traced value {self.node.name!r} used as a Python integer (range, indexing)")

    def __setitem__(self, key: Any, value: Any) -> None:
        raise ProxyItemAssignment(f"item assignment into traced value {self.node.name!r}")
