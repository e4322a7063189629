"""Fused LSQ fake-quantization: one kernel for the forward, one for the backward.

Eager training ran the LSQ arithmetic as a chain of element-wise kernels (divide, clamp,
round, multiply forward; divide, compare, round, subtract, where, multiply, sum backward),
each a full pass over the activation. Here each direction is one pass:

* ``lsq_forward``: ``round(clamp(x / s, qmin, qmax)) * s`` and, for a frozen step, the
  one-byte clip mask in the same pass.
* ``lsq_backward``: the straight-through input gradient and the per-block partial sums of
  the step-size gradient in one pass; the partials (a few per thousand elements) are summed
  afterwards so the result is deterministic (no atomics).

Both are ``torch.library`` custom ops (``ptqat::lsq_forward``, ``ptqat::lsq_backward``) with
fake implementations, and ``lsq_fake_quantize`` is a custom op with autograd, so
``torch.compile(fullgraph=True)`` sees one node per quantizer and no graph break. On CUDA
the kernels are Triton; everywhere else (and as the reference) the pure-torch code below,
which is today's ``fake_quantize_forward`` / ``fake_quantize_backward`` arithmetic.

Saved for backward: ``x`` and ``scale`` when the step trains (or ``save_input`` says ``x`` is
kept anyway), else only the one-byte mask; as ``_LSQFunction`` does.
"""
from __future__ import annotations

import torch

from .quantizer import broadcast_scale, fake_quantize_backward

try:  # Triton ships with torch's CUDA build; the CPU build and CI have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

BLOCK = 1024


def reference_forward(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, channel_axis: int | None, with_mask: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(round(clamp(x / s, qmin, qmax)) * s`` in float32 cast to ``x``'s dtype, clip mask or an
    empty bool tensor)``; pure torch, no autograd: ``fake_quantize_forward``'s arithmetic with the
    mask taken from the same division."""
    step = broadcast_scale(scale.detach().float(), x.dim(), channel_axis)
    scaled = x.detach().float() / step
    mask = (scaled >= qmin) & (scaled <= qmax) if with_mask else x.new_empty((0,), dtype=torch.bool)
    return scaled.clamp_(qmin, qmax).round_().mul_(step).to(x.dtype), mask


# LSQ's gradients (the straight-through input gradient and the summed step gradient) are the
# quantizer's own; the Triton backward kernel computes the same in one pass.
reference_backward = fake_quantize_backward


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
    def _backward_kernel(x_ptr, scale_ptr, grad_ptr, grad_x_ptr, partial_ptr, k, qmin, qmax,
                         PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
        # Grid (rows, blocks per row): one row per step (a channel, or the whole tensor).
        row = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        within = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
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
        tl.store(partial_ptr + row * tl.num_programs(1) + block, tl.sum(contribution, axis=0))


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


def triton_forward(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, channel_axis: int | None, with_mask: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference_forward`` in one Triton pass (any device Triton runs on)."""
    dense = x.contiguous()
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
    # Rows are the slices sharing one step, laid out contiguously.
    x_rows = x.detach().movedim(axis, 0).contiguous()
    grad_rows = grad_out.movedim(axis, 0).contiguous()
    rows = 1 if channel_axis is None else x_rows.shape[0]
    k = x_rows.numel() // max(rows, 1)
    grad_x = torch.empty_like(grad_rows)
    blocks = max(triton.cdiv(k, BLOCK), 1)
    partial = torch.zeros((rows, blocks), dtype=torch.float32, device=x.device)
    if x_rows.numel():
        _kernel(_backward_kernel, x.device)[(rows, blocks)](
            x_rows, scale.detach().float().contiguous(), grad_rows, grad_x, partial, k, float(qmin), float(qmax),
            PER_CHANNEL=channel_axis is not None, BLOCK=BLOCK,
        )
    grad_step = partial.sum(1).reshape(scale.shape) * grad_scale
    grad_x = grad_x.movedim(0, axis)
    if grad_x.stride() != grad_out.stride():
        grad_x = torch.empty_like(grad_out).copy_(grad_x)
    return grad_x, grad_step.to(scale.dtype)


# ---- torch.library registration -------------------------------------------------------

_FORWARD_SCHEMA = "(Tensor x, Tensor scale, int qmin, int qmax, int? channel_axis, bool with_mask) -> (Tensor, Tensor)"
_BACKWARD_SCHEMA = ("(Tensor x, Tensor scale, Tensor grad_out, int qmin, int qmax, int? channel_axis, "
                    "float grad_scale) -> (Tensor, Tensor)")


@torch.library.custom_op("ptqat::lsq_forward", mutates_args=(), schema=_FORWARD_SCHEMA)
def lsq_forward(x, scale, qmin, qmax, channel_axis, with_mask):
    """Fake-quantized ``x`` and (``with_mask``) its clip mask; see ``reference_forward``."""
    return reference_forward(x, scale, qmin, qmax, channel_axis, with_mask)


@torch.library.custom_op("ptqat::lsq_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def lsq_backward(x, scale, grad_out, qmin, qmax, channel_axis, grad_scale):
    """``(grad_x, grad_step)`` of LSQ fake quantization; see ``reference_backward``."""
    return reference_backward(x, scale, grad_out, qmin, qmax, channel_axis, grad_scale)


@lsq_forward.register_fake
def _(x, scale, qmin, qmax, channel_axis, with_mask):
    mask = torch.empty_like(x, dtype=torch.bool) if with_mask else x.new_empty((0,), dtype=torch.bool)
    return torch.empty_like(x), mask


@lsq_backward.register_fake
def _(x, scale, grad_out, qmin, qmax, channel_axis, grad_scale):
    return torch.empty_like(grad_out), torch.empty_like(scale)


if triton is not None:
    lsq_forward.register_kernel("cuda")(triton_forward)
    lsq_backward.register_kernel("cuda")(triton_backward)


def lsq_grad_scale(numel: int, steps: int, qmax: int) -> float:
    """LSQ's step-gradient scale 1 / sqrt(N * qmax), N the elements sharing one step."""
    return 1.0 / (numel // steps * max(qmax, 1)) ** 0.5


_FAKE_QUANT_SCHEMA = ("(Tensor x, Tensor scale, int qmin, int qmax, int? channel_axis, bool keep_input) "
                      "-> (Tensor, Tensor)")


@torch.library.custom_op("ptqat::lsq_fake_quantize", mutates_args=(), schema=_FAKE_QUANT_SCHEMA)
def _fake_quantize_op(x, scale, qmin, qmax, channel_axis, keep_input):
    # The mask (only for a frozen step) comes out of the same forward pass; autograd sees it
    # as a second, non-differentiable output.
    out, mask = lsq_forward(x, scale, qmin, qmax, channel_axis, not keep_input)
    return out, mask


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
        x, scale, grad_out, qmin, qmax, channel_axis, lsq_grad_scale(x.numel(), scale.numel(), qmax)
    )
    return grad_x, grad_step, None, None, None, None


_fake_quantize_op.register_autograd(_backward, setup_context=_setup_context)


def lsq_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, channel_axis: int | None = None,
    save_input: bool = False,
) -> torch.Tensor:
    """Fake-quantize ``x`` with step ``scale`` and the LSQ gradients; the drop-in for
    ``quantizer.lsq_fake_quantize`` (same arguments, same saved tensors)."""
    keep_input = bool(save_input or (scale.requires_grad and torch.is_grad_enabled()))
    return _fake_quantize_op(x, scale, qmin, qmax, channel_axis, keep_input)[0]
