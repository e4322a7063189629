"""The fused LSQ ops against today's quantizer arithmetic: reference path, Triton kernels
(under the Triton interpreter on the CPU, compiled on CUDA), autograd, and torch.compile."""
from __future__ import annotations

import os

if "triton" not in __import__("sys").modules:
    # The CPU runs Triton kernels only when the interpreter is chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from ptqat_fx.runtime import lsq_kernels as K
from ptqat_fx.runtime import quantizer as Q

CASES = [((6, 5, 4, 3), None), ((6, 5, 4, 3), 0), ((6, 5, 4, 3), 1), ((33, 70), 0), ((3000,), None)]
INTERPRETED = K.triton is not None and type(K._forward_kernel).__name__ == "InterpretedFunction"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="needs triton with TRITON_INTERPRET=1 at import")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or K.triton is None, reason="needs CUDA and triton")


def _inputs(shape, axis, seed, dtype=torch.float32, device="cpu"):
    """Values spread over and beyond the 4-bit range, exact .5 ties (power-of-two steps), and
    a gradient; fresh for every case."""
    generator = torch.Generator().manual_seed(seed)
    steps = 1 if axis is None else shape[axis]
    scale = 2.0 ** torch.randint(-4, 0, (steps,), generator=generator).float()
    x = torch.randn(shape, generator=generator) * 4 * scale.max()
    x.view(-1)[::7] = (torch.randint(-12, 12, (x.numel(),), generator=generator)[::7] + 0.5) * scale.min()
    grad = torch.randn(shape, generator=generator)
    return x.to(device, dtype), scale.to(device), grad.to(device, dtype)


@pytest.mark.parametrize("shape,axis", CASES)
def test_reference_is_todays_quantizer_bit_for_bit(shape, axis):
    x, scale, grad = _inputs(shape, axis, seed=1)
    out, mask = K.reference_forward(x, scale, -8, 7, axis, with_mask=True)
    assert torch.equal(out, Q.fake_quantize_forward(x, scale, -8, 7, axis))
    expected_mask = ((x / Q.broadcast_scale(scale, x.dim(), axis)) >= -8) & ((x / Q.broadcast_scale(scale, x.dim(), axis)) <= 7)
    assert torch.equal(mask, expected_mask) and 0 < mask.sum() < mask.numel()
    grad_x, grad_step = K.reference_backward(x, scale, grad, -8, 7, axis, 0.3)
    ref_x, ref_step = Q.fake_quantize_backward(x, scale, grad, -8, 7, axis, 0.3)
    assert torch.equal(grad_x, ref_x) and torch.equal(grad_step, ref_step)


@pytest.mark.parametrize("trainable", [True, False])
@pytest.mark.parametrize("shape,axis", CASES[:3])
def test_autograd_matches_lsq_function_and_saves_the_same(shape, axis, trainable):
    x, scale, grad = _inputs(shape, axis, seed=2)
    results = []
    for function in (Q.lsq_fake_quantize, K.lsq_fake_quantize):
        xi, si = x.clone().requires_grad_(), scale.clone().requires_grad_(trainable)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = function(xi, si, -8, 7, axis)
        (out * grad).sum().backward()
        results.append((out.detach(), xi.grad, si.grad, sorted((t.dtype, t.numel()) for t in saved)))
    (out_q, gx_q, gs_q, saved_q), (out_k, gx_k, gs_k, saved_k) = results
    assert torch.equal(out_q, out_k) and torch.equal(gx_q, gx_k)
    assert saved_q == saved_k, "the custom op must keep what _LSQFunction keeps"
    if trainable:
        torch.testing.assert_close(gs_k, gs_q, rtol=1e-6, atol=1e-7)
        assert gs_k.abs().sum() > 0
    else:
        assert gs_k is None and saved_k == [(torch.bool, x.numel())]


def test_compile_fullgraph_one_graph_and_eager_gradients():
    x, a_scale, _ = _inputs((8, 16), None, seed=3)
    weight, scale, _ = _inputs((16, 16), 0, seed=4)

    def step(inp, w, w_scale, a_scale):
        return (K.lsq_fake_quantize(inp, a_scale, 0, 255) @ K.lsq_fake_quantize(w, w_scale, -8, 7, 0)).sum()

    explained = torch._dynamo.explain(step)(x.relu(), weight, scale, a_scale)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    grads = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        torch._dynamo.reset()
        args = [t.clone().requires_grad_() for t in (x.relu(), weight, scale, a_scale)]
        fn(*args).backward()
        grads.append([a.grad for a in args])
    for eager, compiled in zip(*grads):
        assert eager.abs().sum() > 0
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def _check_triton(device, dtype, shape, axis, seed, exact):
    x, scale, grad = _inputs(shape, axis, seed, dtype, device)
    qmin, qmax = (-8, 7)
    out, mask = K.triton_forward(x, scale, qmin, qmax, axis, with_mask=True)
    ref, ref_mask = K.reference_forward(x, scale, qmin, qmax, axis, with_mask=True)
    assert torch.equal(mask, ref_mask)
    if exact:
        assert torch.equal(out, ref)
    else:  # one step of the quantizer at most (the interpreter rounds bf16/fp16 its own way)
        step = Q.broadcast_scale(scale, x.dim(), axis)
        assert ((out.float() - ref.float()).abs() <= step * (1 + 1e-3)).all()
        assert (out != ref).float().mean() < 0.5
    grad_x, grad_step = K.triton_backward(x, scale, grad, qmin, qmax, axis, 0.1)
    ref_x, ref_step = K.reference_backward(x, scale, grad, qmin, qmax, axis, 0.1)
    assert torch.equal(grad_x, ref_x)
    torch.testing.assert_close(grad_step, ref_step, rtol=1e-5, atol=1e-6)


@needs_interpreter
@pytest.mark.parametrize("shape,axis", CASES)
def test_triton_interpreted_fp32_bit_for_bit(shape, axis):
    _check_triton("cpu", torch.float32, shape, axis, seed=4, exact=True)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_interpreted_low_precision_within_one_step(dtype):
    _check_triton("cpu", dtype, (6, 5, 4, 3), 0, seed=5, exact=False)
    _check_triton("cpu", dtype, (3000,), None, seed=6, exact=False)


@needs_interpreter
def test_triton_interpreted_non_contiguous_keeps_strides():
    x, scale, _ = _inputs((4, 6, 5, 3), None, seed=7)
    x = x.permute(0, 2, 3, 1)
    out, _ = K.triton_forward(x, scale, -8, 7, None)
    assert out.stride() == K.reference_forward(x, scale, -8, 7, None)[0].stride()
    assert torch.equal(out, K.reference_forward(x, scale, -8, 7, None)[0])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,axis", CASES + [((64, 256, 28, 28), None), ((512, 256, 3, 3), 0)])
def test_triton_cuda_bit_for_bit(dtype, shape, axis):
    _check_triton("cuda", dtype, shape, axis, seed=8, exact=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("trainable", [True, False])
def test_cuda_op_compiled_equals_eager(trainable):
    x, scale, grad = _inputs((32, 64, 14, 14), None, seed=9, device="cuda")
    weight, w_scale, _ = _inputs((64, 64, 3, 3), 0, seed=10, device="cuda")

    def loss(inp, w, ws, s):
        q = K.lsq_fake_quantize(inp, s, -128, 127)
        return (torch.nn.functional.conv2d(q, K.lsq_fake_quantize(w, ws, -8, 7, 0), padding=1) ** 2).mean()

    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        args = [x.clone().requires_grad_(), weight.clone().requires_grad_(), w_scale.clone().requires_grad_(),
                scale.clone().requires_grad_(trainable)]
        fn(*args).backward()
        grads.append([a.grad for a in args])
    for eager, compiled in zip(*grads):
        if eager is None:
            assert compiled is None
            continue
        assert eager.abs().sum() > 0 and compiled.abs().sum() > 0
        torch.testing.assert_close(compiled, eager, rtol=2e-3, atol=1e-5)
