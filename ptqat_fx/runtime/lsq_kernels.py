"""Fused LSQ fake-quantization: one kernel for the forward, one for the backward.

Eager training ran the LSQ arithmetic as a chain of element-wise kernels (divide, clamp,
round, multiply forward; divide, compare, round, subtract, where, multiply, sum backward),
each a full pass over the activation. Here each direction is one pass:

* ``triton_forward``: ``round(clamp(x / s, qmin, qmax)) * s`` and, for a frozen step, the
  one-byte clip mask in the same pass.
* ``triton_backward``: the straight-through input gradient and the per-block partial sums of
  the step-size gradient in one pass; the partials (a few per thousand elements) are summed
  afterwards so the result is deterministic (no atomics).

Where they run (``applies``): CUDA tensors, when triton imports and ``ENABLED`` (the
environment variable ``PTQAT_FX_LSQ_KERNELS=0`` turns them off, to compare or to rule them
out). Everywhere else the pure-torch reference (``lsq_arithmetic``) runs, and the kernels are
tested bit for bit against it. ``forward_pass`` / ``backward_pass`` are that choice for code
that runs eagerly inside its own ``autograd.Function`` (the fused layers).

``lsq_fake_quantize`` is a ``torch.library`` custom op (``ptqat::lsq_fake_quantize``) with
autograd and a fake implementation; its backward is a second one (``ptqat::lsq_backward``)
whose CUDA kernel is the Triton one. ``torch.compile`` sees one
opaque node per quantizer and no graph break, and does not trace into it: the
``autograd.Function`` miscompilation of torch 2.11 (pytorch/pytorch#180642, dynamo's tracing
of an ``autograd.Function`` forward that mutates in place) does not reach it, and compiled
code divides exactly as eager does (inductor's own division on CUDA is approximate, which
moves values at the clip bound across it). Saved for backward: ``x`` and ``scale`` when the
step trains (or ``save_input`` says ``x`` is kept anyway), else only the one-byte mask; as
the quantizer's ``_LSQFunction`` does.
"""
from __future__ import annotations

import os

import torch

from .lsq_arithmetic import fake_quantize_and_mask, fake_quantize_backward, lsq_grad_scale

try:  # Triton ships with torch's CUDA build; the CPU build and CI have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

BLOCK = 1024
# Read at each call, so a benchmark can time the same model with the kernels on and off.
ENABLED = os.environ.get("PTQAT_FX_LSQ_KERNELS", "1") != "0"

# The pure-torch forms the kernels must reproduce, and the custom ops' implementation off CUDA.
reference_forward = fake_quantize_and_mask
reference_backward = fake_quantize_backward


def applies(x: torch.Tensor) -> bool:
    """Whether the fused kernels run for ``x``: a CUDA tensor, triton importable, ``ENABLED``."""
    return ENABLED and triton is not None and x.device.type == "cuda"


if triton is not None:

    @triton.jit
    def _forward_kernel(x_ptr, scale_ptr, out_ptr, mask_ptr, n, inner, channels, qmin, qmax,
                        PER_CHANNEL: tl.constexpr, WITH_MASK: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < n
        if PER_CHANNEL:
            step = tl.load(scale_ptr + (offsets // inner) % channels, mask=valid, other=1.0).to(tl.float32)
        else:
            step = tl.load(scale_ptr).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
        # div_rn: IEEE division, as torch's; Triton's `/` is an approximate division on CUDA.
        scaled = tl.math.div_rn(x.to(tl.float32), step)
        clipped = tl.minimum(tl.maximum(scaled, qmin), qmax)
        # Adding and subtracting 1.5 * 2^23 rounds a float32 of magnitude < 2^22 to the nearest
        # integer, ties to even (torch.round's rule), in plain IEEE arithmetic that the Triton
        # interpreter runs too; it is used only inside [qmin, qmax], far below 2^22.
        out = ((clipped + 12582912.0) - 12582912.0) * step
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=valid)
        if WITH_MASK:
            inside = (scaled >= qmin) & (scaled <= qmax)
            tl.store(mask_ptr + offsets, inside.to(tl.int8), mask=valid)

    @triton.jit
    def _backward_kernel(x_ptr, scale_ptr, grad_ptr, grad_x_ptr, partial_ptr, k, blocks, qmin, qmax,
                         PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
        # One program per block of a row (a row per step: a channel, or the whole tensor), on a
        # one-dimensional grid: CUDA limits a grid's other dimensions to 65535, fewer blocks
        # than a large activation has, or rows than a large vocabulary's head.
        program = tl.program_id(0).to(tl.int64)
        row = program // blocks
        block = program % blocks
        within = block * BLOCK + tl.arange(0, BLOCK)
        valid = within < k
        offsets = row * k + within
        if PER_CHANNEL:
            step = tl.load(scale_ptr + row).to(tl.float32)
        else:
            step = tl.load(scale_ptr).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        scaled = tl.math.div_rn(x, step)
        inside = (scaled >= qmin) & (scaled <= qmax)
        # A multiply by 1 or 0, not a select, so NaN and -0.0 come out as torch's `grad * mask`;
        # in float32, exact for any input dtype.
        grad_x = grad * tl.where(inside, 1.0, 0.0)
        tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=valid)
        rounded = (scaled + 12582912.0) - 12582912.0  # ties to even; see _forward_kernel
        d_step = tl.where(inside, rounded - scaled, tl.minimum(tl.maximum(scaled, qmin), qmax))
        contribution = tl.where(valid, grad * d_step, 0.0)
        tl.store(partial_ptr + program, tl.sum(contribution, axis=0))


def _kernel(kernel, device: torch.device):
    """The Triton kernel to launch for tensors on ``device``: compiled on CUDA; on the CPU only
    the Triton interpreter runs it (what the CPU tests use to check the kernels' arithmetic)."""
    if device.type == "cuda" or type(kernel).__name__ == "InterpretedFunction":
        return kernel
    raise RuntimeError(
        f"the Triton LSQ kernels got {device.type} tensors: they run on CUDA, or on the CPU under the "
        "Triton interpreter (set TRITON_INTERPRET=1 before triton is imported); use reference_forward / "
        "reference_backward elsewhere"
    )


def _dense(x: torch.Tensor) -> bool:
    """Whether ``x``'s elements fill a block of memory without gaps or overlaps, in any order of
    the dims (contiguous, channels-last, transposed), so that an element-wise kernel can run
    over that memory as it lies: no copy in, and ``empty_like`` gives the output the same
    strides, so no copy out."""
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda pair: pair[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def triton_forward(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, channel_axis: int | None, with_mask: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference_forward`` in one Triton pass (any device Triton runs on)."""
    # One step for the whole tensor does not care about the layout; one per channel needs
    # the contiguous one to find an element's channel.
    as_laid_out = x.is_contiguous() or (channel_axis is None and _dense(x))
    dense = x if as_laid_out else x.contiguous()
    out = torch.empty_like(dense)
    mask = torch.empty_like(dense, dtype=torch.bool) if with_mask else x.new_empty((0,), dtype=torch.bool)
    n = dense.numel()
    if n:
        channels = 1 if channel_axis is None else dense.shape[channel_axis]
        inner = 1 if channel_axis is None else dense[(0,) * (channel_axis + 1)].numel()
        mask_view = mask.view(torch.int8) if with_mask else out
        _kernel(_forward_kernel, x.device)[(triton.cdiv(n, BLOCK),)](
            dense, scale.detach().float().contiguous(), out, mask_view, n, inner, channels, float(qmin), float(qmax),
            PER_CHANNEL=channel_axis is not None, WITH_MASK=with_mask, BLOCK=BLOCK,
        )
    if dense is not x:  # keep x's strides, as the reference and the fake implementation do
        out = torch.empty_like(x).copy_(out)
        mask = torch.empty_like(x, dtype=torch.bool).copy_(mask) if with_mask else mask
    return out, mask


def triton_backward(
    x: torch.Tensor, scale: torch.Tensor, grad_out: torch.Tensor, qmin: int, qmax: int,
    channel_axis: int | None, grad_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference_backward`` in one Triton pass plus a sum over per-block partials."""
    axis = 0 if channel_axis is None else channel_axis
    # Rows are the slices sharing one step, laid out contiguously; one step for the whole
    # tensor takes any dense layout that x and the gradient share.
    if channel_axis is None and _dense(x) and grad_out.stride() == x.stride():
        x_rows, grad_rows = x.detach(), grad_out
    else:
        x_rows = x.detach().movedim(axis, 0).contiguous()
        grad_rows = grad_out.movedim(axis, 0).contiguous()
    rows = 1 if channel_axis is None else x_rows.shape[0]
    k = x_rows.numel() // max(rows, 1)
    grad_x = torch.empty_like(grad_rows)
    blocks = max(triton.cdiv(k, BLOCK), 1)
    partial = torch.zeros((rows, blocks), dtype=torch.float32, device=x.device)
    if x_rows.numel():
        _kernel(_backward_kernel, x.device)[(rows * blocks,)](
            x_rows, scale.detach().float().contiguous(), grad_rows, grad_x, partial, k, blocks, float(qmin), float(qmax),
            PER_CHANNEL=channel_axis is not None, BLOCK=BLOCK,
        )
    grad_step = partial.sum(1).reshape(scale.shape) * grad_scale
    if grad_rows is not grad_out:
        grad_x = grad_x.movedim(0, axis)
    if grad_x.stride() != grad_out.stride():
        grad_x = torch.empty_like(grad_out).copy_(grad_x)
    return grad_x, grad_step.to(scale.dtype)


def forward_pass(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, channel_axis: int | None, with_mask: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference_forward``, in the fused kernel where it ``applies``; for eager code."""
    return (triton_forward if applies(x) else reference_forward)(x, scale, qmin, qmax, channel_axis, with_mask)


def backward_pass(
    x: torch.Tensor, scale: torch.Tensor, grad_out: torch.Tensor, qmin: int, qmax: int,
    channel_axis: int | None, grad_scale: float, need_scale_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``reference_backward``, in the fused kernel where it ``applies`` (which computes the
    step gradient in the same pass whether asked or not); for eager code."""
    if not applies(x):
        return reference_backward(x, scale, grad_out, qmin, qmax, channel_axis, grad_scale, need_scale_grad)
    grad_x, grad_step = triton_backward(x, scale, grad_out, qmin, qmax, channel_axis, grad_scale)
    return grad_x, grad_step if need_scale_grad else None


# ---- torch.library registration -------------------------------------------------------

_BACKWARD_SCHEMA = ("(Tensor x, Tensor scale, Tensor grad_out, int qmin, int qmax, int? channel_axis, "
                    "float grad_scale) -> (Tensor, Tensor)")


# The backward is an op of its own so that compiled code can trace the autograd formula
# (``_backward``) into its backward graph; the forward never needs tracing into.
@torch.library.custom_op("ptqat::lsq_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def lsq_backward(x, scale, grad_out, qmin, qmax, channel_axis, grad_scale):
    """``(grad_x, grad_step)`` of LSQ fake quantization; see ``reference_backward``."""
    return reference_backward(x, scale, grad_out, qmin, qmax, channel_axis, grad_scale)


@lsq_backward.register_fake
def _(x, scale, grad_out, qmin, qmax, channel_axis, grad_scale):
    return torch.empty_like(grad_out), torch.empty_like(scale)


if triton is not None:
    lsq_backward.register_kernel("cuda")(triton_backward)


_FAKE_QUANT_SCHEMA = ("(Tensor x, Tensor scale, int qmin, int qmax, int? channel_axis, bool keep_input) "
                      "-> (Tensor, Tensor)")


@torch.library.custom_op("ptqat::lsq_fake_quantize", mutates_args=(), schema=_FAKE_QUANT_SCHEMA)
def _fake_quantize_op(x, scale, qmin, qmax, channel_axis, keep_input):
    # The mask (only for a frozen step) comes out of the same forward pass; autograd sees it
    # as a second, non-differentiable output.
    return forward_pass(x, scale, qmin, qmax, channel_axis, not keep_input)


@_fake_quantize_op.register_fake
def _(x, scale, qmin, qmax, channel_axis, keep_input):
    mask = x.new_empty((0,), dtype=torch.bool) if keep_input else torch.empty_like(x, dtype=torch.bool)
    return torch.empty_like(x), mask


def _setup_context(ctx, inputs, output):
    x, scale, qmin, qmax, channel_axis, keep_input = inputs
    ctx.quant = (qmin, qmax, channel_axis)
    ctx.keep_input = keep_input
    ctx.save_for_backward(*((x, scale) if keep_input else (output[1],)))


def _backward(ctx, grad_out, _grad_mask):
    qmin, qmax, channel_axis = ctx.quant
    if not ctx.keep_input:
        (inside,) = ctx.saved_tensors
        return grad_out * inside, None, None, None, None, None
    x, scale = ctx.saved_tensors
    # The step gradient is computed whether or not needs_input_grad asks for it: torch 2.11's
    # compile has reported needs_input_grad False for tensors that do need a gradient.
    grad_x, grad_step = lsq_backward(
        x, scale, grad_out, qmin, qmax, channel_axis, lsq_grad_scale(x, scale, qmax)
    )
    return grad_x, grad_step, None, None, None, None


_fake_quantize_op.register_autograd(_backward, setup_context=_setup_context)


def lsq_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, channel_axis: int | None = None,
    save_input: bool = False,
) -> torch.Tensor:
    """Fake-quantize ``x`` with step ``scale`` and the LSQ gradients; the drop-in for
    ``quantizer.lsq_fake_quantize`` (same arguments, same saved tensors)."""
    # The mask only for an input gradient through a frozen step; no autograd, no mask.
    needs_mask = torch.is_grad_enabled() and x.requires_grad and not scale.requires_grad
    keep_input = bool(save_input or not needs_mask)
    return _fake_quantize_op(x, scale, qmin, qmax, channel_axis, keep_input)[0]
