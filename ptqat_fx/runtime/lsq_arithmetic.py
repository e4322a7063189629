"""LSQ fake-quantization arithmetic in plain torch: the reference every other form matches.

The quantizer's ``autograd.Function`` runs it on the CPU; the fused Triton kernels
(``lsq_kernels``) compute the same numbers in one pass each way on CUDA and are tested bit for
bit against it; the discrepancy analysis calls ``fake_quantize_forward`` directly. It lives
apart from both so that each can import it without importing the other.
"""
from __future__ import annotations

import torch


def broadcast_scale(scale: torch.Tensor, ndim: int, channel_axis: int | None) -> torch.Tensor:
    """``scale`` shaped to broadcast against a tensor of ``ndim`` dims along ``channel_axis``."""
    if channel_axis is None:
        return scale.reshape(())
    shape = [1] * ndim
    shape[channel_axis] = -1
    return scale.reshape(shape)


def fake_quantize_and_mask(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, channel_axis: int | None, with_mask: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(round(clamp(x / s, qmin, qmax)) * s`` in float32 cast to ``x``'s dtype, the clip mask
    ``qmin <= x / s <= qmax`` or, without ``with_mask``, an empty bool tensor)``; no autograd.
    The mask comes from the same division. One new tensor, updated in place (on the CPU,
    allocating each step costs more than it)."""
    step = broadcast_scale(scale.detach().float(), x.dim(), channel_axis)
    scaled = x.detach().float() / step
    mask = (scaled >= qmin) & (scaled <= qmax) if with_mask else x.new_empty((0,), dtype=torch.bool)
    return scaled.clamp_(qmin, qmax).round_().mul_(step).to(x.dtype), mask


def fake_quantize_forward(
    x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, channel_axis: int | None
) -> torch.Tensor:
    """round(clamp(x / s, qmin, qmax)) * s in float32, returned in ``x``'s dtype; no autograd."""
    return fake_quantize_and_mask(x, scale, qmin, qmax, channel_axis, with_mask=False)[0]


def fake_quantize_backward(
    x: torch.Tensor,
    scale: torch.Tensor,
    grad_out: torch.Tensor,
    qmin: int,
    qmax: int,
    channel_axis: int | None,
    grad_scale: float,
    need_scale_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LSQ gradients (Esser et al., 2020) of ``x`` and the step from the output gradient:
    straight through inside [qmin, qmax], zero outside; for the step, ``round(v) - v`` inside
    and the clip bound outside, times ``grad_scale``."""
    step = broadcast_scale(scale.float(), x.dim(), channel_axis)
    scaled = x.float() / step
    inside = (scaled >= qmin) & (scaled <= qmax)
    grad_x = grad_out * inside
    if not need_scale_grad:
        return grad_x, None
    d_step = torch.where(inside, scaled.round() - scaled, scaled.clamp(qmin, qmax))
    per_element = grad_out.float() * d_step
    if channel_axis is None:
        grad_step = per_element.sum().reshape(scale.shape)
    else:
        grad_step = per_element.transpose(0, channel_axis).flatten(1).sum(1)
    return grad_x, (grad_step * grad_scale).to(scale.dtype)


def lsq_grad_scale(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> float:
    """LSQ's step-gradient scale 1 / sqrt(N * qmax), N the elements sharing one step."""
    return 1.0 / (x.numel() // scale.numel() * max(qmax, 1)) ** 0.5
