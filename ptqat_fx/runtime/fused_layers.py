"""Layers that fake-quantize their own input and recompute it in backward.

A trainable quantized layer written as ``F.linear(quantizer(x), w_q, b)`` keeps two tensors of
the input's size for backward: ``x`` (the quantizer needs it for its gradients) and
``quantizer(x)`` (the layer needs it for the weight gradient). These functions keep only ``x``
and recompute the quantized input in backward from it and the step size, so a trainable layer
costs what the float layer costs. ``x`` is often kept anyway (a ReLU keeps its output), so the
saving is a whole activation per trainable layer.

Eagerly, the input's fake quantization (forward, recomputation, and its backward) is one
fused kernel each on CUDA (``lsq_kernels``). Under ``torch.compile`` each function is its
plain composition (``lsq_fake_quantize``, then the layer): the compiler decides what backward
keeps, and torch 2.11 miscompiles gradients through custom ``autograd.Function``s (see
``quantizer``).

Each function's ``float_reference`` computes the same layer without input quantization; the
discrepancy analysis uses it as the float side.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import lsq_kernels
from .lsq_arithmetic import lsq_grad_scale
from .quantizer import lsq_fake_quantize

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _quantize(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The input's per-tensor fake quantization, one fused kernel on CUDA."""
    return lsq_kernels.forward_pass(x, scale, qmin, qmax, None)[0]


def _expand(value: int | tuple, spatial: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value] * spatial


class _QuantizedInputLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, grad_scale, weight, bias):
        ctx.quant = (qmin, qmax, grad_scale)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, scale, weight)
        return F.linear(_quantize(x, scale, qmin, qmax), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, weight = ctx.saved_tensors
        qmin, qmax, grad_scale = ctx.quant
        grad_input = grad_out @ weight.to(grad_out.dtype)
        grad_weight = grad_bias = None
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[5]:
            x_q = _quantize(x, scale, qmin, qmax).to(grad_out.dtype)
            grad_weight = (flat_grad.t() @ x_q.reshape(-1, x_q.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[6]:
            grad_bias = flat_grad.sum(0).to(weight.dtype)
        grad_x, grad_step = lsq_kernels.backward_pass(
            x, scale, grad_input, qmin, qmax, None, grad_scale, ctx.needs_input_grad[1]
        )
        return grad_x.to(x.dtype), grad_step, None, None, None, grad_weight, grad_bias


class _QuantizedInputConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, grad_scale, weight, bias, stride, padding, dilation, groups):
        spatial = weight.dim() - 2
        ctx.quant = (qmin, qmax, grad_scale)
        ctx.geometry = (
            _expand(stride, spatial), _expand(padding, spatial), _expand(dilation, spatial), groups,
            None if bias is None else list(bias.shape),
        )
        ctx.save_for_backward(x, scale, weight)
        x_q = _quantize(x, scale, qmin, qmax)
        return _CONV[spatial](x_q, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, weight = ctx.saved_tensors
        qmin, qmax, grad_scale = ctx.quant
        stride, padding, dilation, groups, bias_shape = ctx.geometry
        x_q = _quantize(x, scale, qmin, qmax).to(grad_out.dtype)
        mask = [True, ctx.needs_input_grad[5], bias_shape is not None and ctx.needs_input_grad[6]]
        grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_out, x_q, weight.to(grad_out.dtype), bias_shape, stride, padding, dilation,
            False, [0] * len(stride), groups, mask,
        )
        grad_x, grad_step = lsq_kernels.backward_pass(
            x, scale, grad_input, qmin, qmax, None, grad_scale, ctx.needs_input_grad[1]
        )
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(weight.dtype) if grad_bias is not None else None
        return (grad_x.to(x.dtype), grad_step, None, None, None, grad_weight, grad_bias,
                None, None, None, None)


class _QuantizedInputMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, a_scale, a_qmin, a_qmax, a_grad_scale, b, b_scale, b_qmin, b_qmax, b_grad_scale):
        ctx.quant = ((a_qmin, a_qmax, a_grad_scale), (b_qmin, b_qmax, b_grad_scale))
        ctx.save_for_backward(a, a_scale, b, b_scale)
        a_q = _quantize(a, a_scale, a_qmin, a_qmax)
        b_q = _quantize(b, b_scale, b_qmin, b_qmax)
        return torch.matmul(a_q, b_q)

    @staticmethod
    def backward(ctx, grad_out):
        a, a_scale, b, b_scale = ctx.saved_tensors
        (a_qmin, a_qmax, a_grad_scale), (b_qmin, b_qmax, b_grad_scale) = ctx.quant
        a_q = _quantize(a, a_scale, a_qmin, a_qmax).to(grad_out.dtype)
        b_q = _quantize(b, b_scale, b_qmin, b_qmax).to(grad_out.dtype)
        grad_a_q = (grad_out @ b_q.transpose(-2, -1)).sum_to_size(a.shape)
        grad_b_q = (a_q.transpose(-2, -1) @ grad_out).sum_to_size(b.shape)
        grad_a, grad_a_step = lsq_kernels.backward_pass(
            a, a_scale, grad_a_q, a_qmin, a_qmax, None, a_grad_scale, ctx.needs_input_grad[1]
        )
        grad_b, grad_b_step = lsq_kernels.backward_pass(
            b, b_scale, grad_b_q, b_qmin, b_qmax, None, b_grad_scale, ctx.needs_input_grad[6]
        )
        return (grad_a.to(a.dtype), grad_a_step, None, None, None,
                grad_b.to(b.dtype), grad_b_step, None, None, None)


def quantized_linear(x, scale, qmin: int, qmax: int, weight, bias=None) -> torch.Tensor:
    """``F.linear(fake_quant(x, scale), weight, bias)`` that keeps only ``x`` for backward."""
    if torch.compiler.is_compiling():
        return F.linear(lsq_fake_quantize(x, scale, qmin, qmax), weight, bias)
    return _QuantizedInputLinear.apply(x, scale, qmin, qmax, lsq_grad_scale(x, scale, qmax), weight, bias)


def quantized_conv(x, scale, qmin: int, qmax: int, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``F.conv{1,2,3}d(fake_quant(x, scale), weight, ...)`` that keeps only ``x`` for backward."""
    if torch.compiler.is_compiling():
        x_q = lsq_fake_quantize(x, scale, qmin, qmax)
        return _CONV[weight.dim() - 2](x_q, weight, bias, stride, padding, dilation, groups)
    return _QuantizedInputConv.apply(
        x, scale, qmin, qmax, lsq_grad_scale(x, scale, qmax), weight, bias, stride, padding, dilation, groups
    )


def quantized_matmul(a, a_scale, a_qmin: int, a_qmax: int, b, b_scale, b_qmin: int, b_qmax: int) -> torch.Tensor:
    """``fake_quant(a) @ fake_quant(b)`` that keeps only ``a`` and ``b`` for backward."""
    if a.dim() < 2 or b.dim() < 2 or torch.compiler.is_compiling():
        # Vector products have no transposed form (they are rare and small); compiled code
        # takes the plain composition.
        return torch.matmul(lsq_fake_quantize(a, a_scale, a_qmin, a_qmax), lsq_fake_quantize(b, b_scale, b_qmin, b_qmax))
    return _QuantizedInputMatmul.apply(
        a, a_scale, a_qmin, a_qmax, lsq_grad_scale(a, a_scale, a_qmax),
        b, b_scale, b_qmin, b_qmax, lsq_grad_scale(b, b_scale, b_qmax),
    )


def _linear_reference(x, scale, qmin, qmax, weight, bias=None):
    return F.linear(x, weight, bias)


def _conv_reference(x, scale, qmin, qmax, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)


def _matmul_reference(a, a_scale, a_qmin, a_qmax, b, b_scale, b_qmin, b_qmax):
    return torch.matmul(a, b)


quantized_linear.float_reference = _linear_reference
quantized_conv.float_reference = _conv_reference
quantized_matmul.float_reference = _matmul_reference
