"""Refuse to time a training arm whose compiled gradients are wrong.

A compiled quantized model once returned exactly zero for every weight gradient while its loss
matched eager (issue 15), so a compiled step time can measure a step that trains nothing.
``grad_check`` runs one eager and one compiled forward/backward from the same state (no
optimizer step, so the state stays the same) and compares, per trainable tensor, the compiled
gradient with eager's. It raises ``GradientCheckError`` when a trainable tensor's gradient is
missing or all zero in either mode, or when it differs from eager by more than ``tolerance``
(relative L2 norm). The tolerance comes from the float model of the same structure: its own
eager/compiled difference is what float reordering alone gives (``tolerance_from_floor``).

    report = grad_check(model, torch.compile(model), (x,), lambda out: F.cross_entropy(out, y))
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

# Rounding flips at quantization-level boundaries make quantized arms differ a little more
# than their float floor; this margin allows that and no more.
FLOOR_MARGIN = 4.0
MIN_TOLERANCE = 1e-3


class GradientCheckError(RuntimeError):
    """A compiled arm's gradients are missing, zero, or differ from eager's."""


def _gradients(model: nn.Module, forward: Callable, inputs: Sequence, loss_fn: Callable) -> tuple[dict, float]:
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for _, parameter in trainable:
        parameter.grad = None
    loss = loss_fn(forward(*inputs))
    loss.backward()
    grads = {name: None if p.grad is None else p.grad.detach().float().clone() for name, p in trainable}
    for _, parameter in trainable:
        parameter.grad = None
    return grads, float(loss.detach())


def grad_check(
    model: nn.Module, compiled_forward: Callable | None, inputs: Sequence, loss_fn: Callable,
    tolerance: float | None = None, label: str = "arm",
) -> dict:
    """Compare one eager and one compiled backward of ``model``; raise ``GradientCheckError``
    on a missing or zero gradient, or (when ``tolerance`` is given) a relative difference above it.
    Without ``compiled_forward`` (an arm timed eager only) only the eager gradients are checked.

    Returns ``{"tensors", "worst_rel_diff", "worst_tensor", "eager_loss", "compiled_loss"}``."""
    eager, eager_loss = _gradients(model, model, inputs, loss_fn)
    compiled, compiled_loss = eager, eager_loss
    if compiled_forward is not None:
        compiled, compiled_loss = _gradients(model, compiled_forward, inputs, loss_fn)
    if not eager:
        raise GradientCheckError(f"{label}: no trainable tensor; nothing would train")
    problems: list[str] = []
    worst, worst_name = 0.0, None
    for name, reference in eager.items():
        got = compiled[name]
        if reference is None or got is None:
            problems.append(f"{name}: gradient missing ({'eager' if reference is None else 'compiled'})")
            continue
        reference_norm = float(reference.norm())
        if reference_norm == 0:
            problems.append(f"{name}: eager gradient is all zero")
            continue
        if float(got.abs().max()) == 0:
            problems.append(f"{name}: compiled gradient is all zero, eager's is not")
            continue
        difference = float((got - reference).norm()) / reference_norm
        if difference > worst or difference != difference:
            worst, worst_name = difference, name
    if tolerance is not None and not worst <= tolerance:
        problems.append(f"{worst_name}: compiled gradient differs from eager by {worst:.2e} (tolerance {tolerance:.2e})")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise GradientCheckError(f"{label}: refusing to time it, {len(problems)} of {len(eager)} trainable "
                                 f"tensors fail the eager/compiled gradient check: {shown}")
    return {"tensors": len(eager), "worst_rel_diff": worst, "worst_tensor": worst_name,
            "eager_loss": eager_loss, "compiled_loss": compiled_loss}


def tolerance_from_floor(float_diffs: Sequence[float]) -> float:
    """The tolerance for quantized arms from the float arms' own eager/compiled differences."""
    return max(FLOOR_MARGIN * max(float_diffs, default=0.0), MIN_TOLERANCE)
