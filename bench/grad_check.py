"""Refuse to time a training arm whose compiled gradients are wrong.

A compiled quantized model once returned exactly zero for every weight gradient while its loss
matched eager (issue 15), so a compiled step time can measure a step that trains nothing.
``grad_check`` runs one eager and one compiled forward/backward from the same state (no
optimizer step, so the state stays the same) and compares, per trainable tensor, the compiled
gradient with eager's. It raises ``GradientCheckError`` when a trainable tensor's gradient is
missing or all zero in either mode, or when it differs from eager by more than ``tolerance``
(relative L2 norm). The tolerance comes from the float model of the same structure: its own
eager/compiled difference is what float reordering alone gives (``tolerance_from_floor``).

Where one number cannot serve every tensor, ``sensitivity=True`` gives each its own: eager
runs a second time on the inputs moved by one ulp (each element to a neighbour, up or down), and a tensor's
compiled gradient may differ from eager's by ``FLOOR_MARGIN`` times what that moved. A
random-init model with train-mode BatchNorm and 4-bit rounding can be that sensitive: on the
tiny BEV stand-in (CPU) inputs scaled by 1 + 1e-7 moved 311 of 317 full-QAT gradients by more than 1e-3
(activation step sizes by up to 5.5x, a conv bias before a BatchNorm, whose exact gradient is 0,
by 1.5x in float), so a compiled step could not be told from a correct one by a global bound,
while a zero or rerouted gradient still stands out against its own tensor's sensitivity.

    report = grad_check(model, torch.compile(model), (x,), lambda out: F.cross_entropy(out, y))
"""
from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

# Rounding flips at quantization-level boundaries make quantized arms differ a little more
# than their float floor; this margin allows that and no more.
FLOOR_MARGIN = 4.0
MIN_TOLERANCE = 1e-3
# A gradient that is 0 in exact arithmetic (a key bias before softmax: 1e-9 against weights'
# 0.1-1 on the small ViT) is float roundoff, and its relative difference is noise over noise;
# differences are measured against at least this share of the arm's largest gradient.
NOISE_SHARE = 1e-5


class GradientCheckError(RuntimeError):
    """A compiled arm's gradients are missing, zero, or differ from eager's."""


def _moved_by_one_ulp(inputs: Sequence) -> tuple:
    """Each float element moved to its neighbour up or down, by a fixed random sign: not a
    common scale factor, which a normalisation (ViT's first LayerNorm) would undo."""
    generator = torch.Generator().manual_seed(0)

    def move(x: torch.Tensor) -> torch.Tensor:
        up = torch.rand(x.shape, generator=generator).to(x.device) < 0.5
        return torch.nextafter(x, torch.where(up, torch.inf, -torch.inf).to(x.dtype))

    return tuple(move(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)


@contextlib.contextmanager
def _full_fp32() -> Iterator[None]:
    """TF32 off for the check (the timing keeps the caller's setting): its ~1e-3 noise flips
    near-tie roundings of activation quantizers between two runs, and one ulp of input, which
    TF32 rounds away, could not show that sensitivity. cuBLAS and cuDNN read the flags at call
    time, so a model compiled here runs with TF32 afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


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
    tolerance: float | None = None, label: str = "arm", sensitivity: bool = False,
    floor: Mapping[str, float] | None = None,
) -> dict:
    """Compare one eager and one compiled backward of ``model``; raise ``GradientCheckError``
    on a missing or zero gradient, or (when ``tolerance`` is given) a relative difference above it.
    Without ``compiled_forward`` (an arm timed eager only) only the eager gradients are checked.
    With ``sensitivity``, each tensor's bound is also at least ``FLOOR_MARGIN`` times how far
    its eager gradient moves when the inputs move by one ulp (module docstring). With ``floor``
    (per-tensor eager/compiled differences of the float model of the same structure, the
    ``"diffs"`` of its own check), each tensor's bound is also at least ``FLOOR_MARGIN`` times
    its float twin's difference, or the median one for a tensor without a twin (a step size):
    a gradient that is 0 in exact arithmetic (a key bias before softmax) is reordering noise,
    which one ulp of input does not show.

    Returns ``{"tensors", "worst_rel_diff", "worst_tensor", "eager_loss", "compiled_loss",
    "diffs"}``, and with per-tensor bounds also ``"worst_excess"`` (the largest difference over
    its bound) and ``"worst_excess_tensor"``."""
    with _full_fp32():
        eager, eager_loss = _gradients(model, model, inputs, loss_fn)
        compiled, compiled_loss = eager, eager_loss
        if compiled_forward is not None:
            compiled, compiled_loss = _gradients(model, compiled_forward, inputs, loss_fn)
        moved = _gradients(model, model, _moved_by_one_ulp(inputs), loss_fn)[0] if sensitivity and compiled_forward is not None else {}
    noise = NOISE_SHARE * max((float(g.norm()) for g in eager.values() if g is not None), default=0.0)
    bounds: dict[str, float] = {}
    if moved or floor:
        base = tolerance if tolerance is not None else MIN_TOLERANCE
        typical = statistics.median(floor.values()) if floor else 0.0
        for name, reference in eager.items():
            if reference is None or float(reference.norm()) == 0:
                continue
            shift = 0.0
            if moved.get(name) is not None:
                shift = float((moved[name] - reference).norm()) / max(float(reference.norm()), noise)
            twin = floor.get(name, typical) if floor else 0.0
            bounds[name] = max(base, FLOOR_MARGIN * shift, FLOOR_MARGIN * twin)
    if not eager:
        raise GradientCheckError(f"{label}: no trainable tensor; nothing would train")
    problems: list[str] = []
    worst, worst_name = 0.0, None
    worst_excess, excess_name = 0.0, None
    diffs: dict[str, float] = {}
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
        difference = diffs[name] = float((got - reference).norm()) / max(reference_norm, noise)
        if difference > worst or difference != difference:
            worst, worst_name = difference, name
        if name in bounds and not difference / bounds[name] <= worst_excess:
            worst_excess, excess_name = difference / bounds[name], name
    if bounds and not worst_excess <= 1:
        problems.append(f"{excess_name}: compiled gradient differs from eager by {worst_excess:.2f}x its bound "
                        f"{bounds[excess_name]:.2e} (x{FLOOR_MARGIN:g} what one ulp of input or compiling the float twin moves it)")
    elif not bounds and tolerance is not None and not worst <= tolerance:
        problems.append(f"{worst_name}: compiled gradient differs from eager by {worst:.2e} (tolerance {tolerance:.2e})")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise GradientCheckError(f"{label}: refusing to time it, {len(problems)} of {len(eager)} trainable "
                                 f"tensors fail the eager/compiled gradient check: {shown}")
    report = {"tensors": len(eager), "worst_rel_diff": worst, "worst_tensor": worst_name,
              "eager_loss": eager_loss, "compiled_loss": compiled_loss, "diffs": diffs}
    if bounds:
        report.update(worst_excess=worst_excess, worst_excess_tensor=excess_name)
    return report


def tolerance_from_floor(float_diffs: Sequence[float]) -> float:
    """The tolerance for quantized arms from the float arms' own eager/compiled differences."""
    return max(FLOOR_MARGIN * max(float_diffs, default=0.0), MIN_TOLERANCE)
