"""Integer GEMM for converted linear layers: ``torch._int_mm`` on the stored INT8 integers.

A converted linear layer computes ``F.linear(q_x * s_x, q_w * s_w, b)`` in float: the
integers are dequantized first and multiplied in float32, which costs more than the float
layer it replaced. ``integer_linear`` multiplies the integers themselves (int8 x int8 ->
int32, exact in any accumulation order) and scales once::

    y = (q_x @ q_w^T) * (s_x * s_w) + b

which is what an INT8 engine (TensorRT, onnxruntime's QGemm) computes. It differs from the
float simulation only by float32 rounding of the simulation's accumulation (the integer sum is
exact), so it is the engine's arithmetic, not a new approximation.
"""
from __future__ import annotations

import torch


def _int_mm_takes(a: torch.Tensor, n: int) -> bool:
    """Whether ``torch._int_mm`` accepts ``a`` [M, K] times a [K, n] matrix on ``a``'s device:
    CUDA's cuBLASLt kernel needs M > 16 and K, n multiples of 8."""
    if a.device.type != "cuda":
        return True
    return a.shape[0] > 16 and a.shape[1] % 8 == 0 and n % 8 == 0


def integer_linear(
    q_x: torch.Tensor, s_x: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``F.linear(q_x * s_x, q_w * s_w, bias)`` computed on the integers.

    Args:
        q_x: int8 input integers ``[..., K]``.
        s_x: the input's scalar step (float32).
        q_w: int8 weight integers ``[N, K]``.
        s_w: per-output-channel steps, any shape with ``N`` elements (float32).
        bias: ``[N]`` or None.

    Shapes ``torch._int_mm`` does not take on CUDA (see ``_int_mm_takes``) are multiplied in
    float32 instead, which is exact while the integer sums stay below 2^24.
    """
    k, n = q_x.shape[-1], q_w.shape[0]
    a = q_x.reshape(-1, k)
    if _int_mm_takes(a, n):
        accumulated = torch._int_mm(a, q_w.t()).to(torch.float32)
    else:
        accumulated = a.to(torch.float32) @ q_w.t().to(torch.float32)
    y = accumulated * (s_x * s_w.reshape(-1))
    if bias is not None:
        y = y + bias
    return y.reshape(*q_x.shape[:-1], n)
