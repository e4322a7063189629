"""Convolution with a constant weight that keeps only the weight for backward.

``F.conv2d`` saves its input for backward even when the weight needs no gradient, although
the input gradient needs only the weight. PTQAT freezes about half of the layers; their
inputs would be kept for nothing. ``frozen_conv`` computes the same forward and saves just
the weight (a buffer that exists anyway) and the input's shape. Under ``torch.compile`` it is the plain convolution: the compiler sees
that the weight needs no gradient, and torch 2.11 miscompiles gradients through custom
``autograd.Function``s (see ``quantizer``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_FORWARD = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}


class _FrozenConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        spatial = weight.dim() - 2
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape, x.dtype, spatial, stride, padding, dilation, groups)
        return _FORWARD[spatial](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        shape, dtype, spatial, stride, padding, dilation, groups = ctx.geometry
        grad_x = _INPUT_GRAD[spatial](shape, weight.to(grad_out.dtype), grad_out, stride, padding, dilation, groups)
        return grad_x.to(dtype), None, None, None, None, None, None


def frozen_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple = 1,
    padding: int | tuple = 0,
    dilation: int | tuple = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv{1,2,3}d`` for a weight that takes no gradient: same output, saves only the
    weight for the input gradient. Weight and bias get no gradient."""
    if torch.compiler.is_compiling():
        return _FORWARD[weight.dim() - 2](x, weight.detach(), None if bias is None else bias.detach(), stride, padding, dilation, groups)
    return _FrozenConvFunction.apply(x, weight, bias, stride, padding, dilation, groups)
