"""The fused LSQ ops against today's quantizer arithmetic: reference path, Triton kernels
(under the Triton interpreter on the CPU, compiled on CUDA), autograd, and torch.compile."""
from __future__ import annotations

import pytest
import torch

from ptqat_fx.runtime import lsq_kernels as K
from ptqat_fx.runtime import quantizer as Q

CASES = [((6, 5, 4, 3), None), ((6, 5, 4, 3), 0), ((6, 5, 4, 3), 1), ((33, 70), 0), ((3000,), None)]
INTERPRETED = K.triton is not None and type(K._forward_kernel).__name__ == "InterpretedFunction"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="needs triton with TRITON_INTERPRET=1 at import (tests/conftest.py sets it without CUDA)")
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


def _two_quantizer_step(quantize):
    """A loss through an activation and a per-channel weight quantizer, and its inputs."""

    def step(inp, w, w_scale, a_scale):
        return (quantize(inp, a_scale, 0, 255) @ quantize(w, w_scale, -8, 7, 0)).sum()

    x, a_scale, _ = _inputs((8, 16), None, seed=3)
    weight, scale, _ = _inputs((16, 16), 0, seed=4)
    return step, (x.relu(), weight, scale, a_scale)


def _assert_compiled_gradients_equal_eager(step, inputs):
    grads = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        torch._dynamo.reset()
        args = [t.clone().requires_grad_() for t in inputs]
        fn(*args).backward()
        grads.append([a.grad for a in args])
    torch._dynamo.reset()
    for eager, compiled in zip(*grads):
        assert eager.abs().sum() > 0
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_compile_fullgraph_one_graph_and_eager_gradients():
    step, inputs = _two_quantizer_step(K.lsq_fake_quantize)
    explained = torch._dynamo.explain(step)(*inputs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    _assert_compiled_gradients_equal_eager(step, inputs)


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
    # The step-size gradient is a sum over a channel (or the tensor); the kernel sums in another
    # order than torch, so it cannot be bit for bit. It must be as accurate as torch's own sum:
    # its error against a float64 sum at most twice torch's, plus sqrt(n) float32 ulps of the
    # largest (the typical error of summing n terms in another order).
    _, exact_step = K.reference_backward(x.double(), scale.double(), grad.double(), qmin, qmax, axis, 0.1)
    torch_error = (ref_step.double() - exact_step).abs()
    kernel_error = (grad_step.double() - exact_step).abs()
    terms = x.numel() // exact_step.numel()
    ulps = terms ** 0.5 * torch.finfo(torch.float32).eps * float(exact_step.abs().max())
    assert (kernel_error <= 2 * torch_error + ulps).all(), float((kernel_error - 2 * torch_error).max())


@needs_interpreter
@pytest.mark.parametrize("shape,axis", CASES)
def test_triton_interpreted_fp32_bit_for_bit(shape, axis):
    _check_triton("cpu", torch.float32, shape, axis, seed=4, exact=True)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_interpreted_low_precision_within_one_step(dtype):
    _check_triton("cpu", dtype, (6, 5, 4, 3), 0, seed=5, exact=False)
    _check_triton("cpu", dtype, (3000,), None, seed=6, exact=False)


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values with other strides: dense in another dim order, or with gaps."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return t.transpose(1, 3).contiguous().transpose(1, 3)
    return torch.stack([t, -t], -1)[..., 0]  # every other element of its storage


@needs_interpreter
@pytest.mark.parametrize("grad_layout", ["same", "contiguous"])
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "gaps"])
@pytest.mark.parametrize("axis", [None, 1])
def test_triton_interpreted_other_layouts(layout, grad_layout, axis):
    x, scale, grad = _inputs((4, 6, 5, 3), axis, seed=7)
    x = _laid_out(x, layout)
    grad = _laid_out(grad, layout) if grad_layout == "same" else grad
    out, mask = K.triton_forward(x, scale, -8, 7, axis, with_mask=True)
    ref, ref_mask = K.reference_forward(x, scale, -8, 7, axis, with_mask=True)
    assert torch.equal(out, ref) and torch.equal(mask, ref_mask)
    assert out.stride() == ref.stride() and mask.stride() == ref_mask.stride()
    grad_x, grad_step = K.triton_backward(x, scale, grad, -8, 7, axis, 0.1)
    ref_x, ref_step = K.reference_backward(x, scale, grad, -8, 7, axis, 0.1)
    assert torch.equal(grad_x, ref_x) and grad_x.stride() == torch.empty_like(grad).stride()
    torch.testing.assert_close(grad_step, ref_step, rtol=1e-5, atol=1e-6)


def test_kernels_apply_only_to_cuda_tensors(monkeypatch):
    assert not K.applies(torch.ones(3)) and not K.applies(torch.ones(3, device="meta"))
    if torch.cuda.is_available() and K.triton is not None:
        assert K.applies(torch.ones(3, device="cuda"))
        monkeypatch.setattr(K, "ENABLED", False)
        assert not K.applies(torch.ones(3, device="cuda"))


def _spy_on_kernels(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name in ("triton_forward", "triton_backward"):
        original = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    return calls


def _quantizer_and_fused_conv_step(device: str = "cpu") -> list[torch.Tensor]:
    """Output and gradients of a per-channel weight quantizer, a per-tensor activation
    quantizer with a frozen step, and a fused quantized conv; all in fp32."""
    from ptqat_fx.runtime.fused_layers import quantized_conv

    x, a_scale, _ = _inputs((2, 6, 5, 5), None, seed=11, device=device)
    w, w_scale, _ = _inputs((6, 6, 3, 3), 0, seed=12, device=device)
    # The conv's own step is off the frozen quantizer's grid, so its gradient is not zero.
    x, w, w_scale, c_scale = (t.clone().requires_grad_() for t in (x, w, w_scale, a_scale * 0.75))
    frozen = Q.lsq_fake_quantize(x, a_scale, -8, 7)
    out = quantized_conv(frozen, c_scale, -8, 7, Q.lsq_fake_quantize(w, w_scale, -8, 7, 0), padding=1)
    out.square().sum().backward()
    return [out.detach(), x.grad, w.grad, w_scale.grad, c_scale.grad]


def _fused_linear_and_matmul_step() -> list[torch.Tensor]:
    from ptqat_fx.runtime.fused_layers import quantized_linear, quantized_matmul

    x, x_scale, _ = _inputs((3, 5, 16), None, seed=14)
    w, _, _ = _inputs((16, 16), 0, seed=15)
    b, b_scale, _ = _inputs((3, 16, 7), None, seed=16)
    x, x_scale, w, b, b_scale = (t.clone().requires_grad_() for t in (x, x_scale, w, b, b_scale))
    h_scale = (x_scale * 0.5).detach().requires_grad_()
    out = quantized_matmul(quantized_linear(x, x_scale, -8, 7, w), h_scale, -8, 7, b, b_scale, -8, 7)
    out.square().sum().backward()
    return [out.detach(), x.grad, w.grad, b.grad, x_scale.grad, h_scale.grad, b_scale.grad]


@needs_interpreter
def test_eager_fused_linear_and_matmul_run_the_kernels_where_they_apply(monkeypatch):
    calls = _spy_on_kernels(monkeypatch)
    reference = _fused_linear_and_matmul_step()
    monkeypatch.setattr(K, "applies", lambda x: True)
    fused = _fused_linear_and_matmul_step()
    # linear: forward, recomputation, backward; matmul: two of each.
    assert sorted(calls) == ["triton_backward"] * 3 + ["triton_forward"] * 6
    for got, want in zip(fused[:4], reference[:4]):
        assert torch.equal(got, want)
    for got, want in zip(fused[4:], reference[4:]):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_interpreter
def test_eager_quantizer_and_fused_layers_run_the_kernels_only_where_they_apply(monkeypatch):
    calls = _spy_on_kernels(monkeypatch)
    reference = _quantizer_and_fused_conv_step()
    assert calls == [], "CPU tensors take the pure-torch path"
    monkeypatch.setattr(K, "applies", lambda x: True)  # CUDA's choice, run by the interpreter
    fused = _quantizer_and_fused_conv_step()
    # Quantizer forwards (activation, weight), the conv's input forward, its recomputation
    # in backward; backward kernels for the conv's input and the weight (the frozen step's
    # backward is the saved mask).
    assert sorted(calls) == ["triton_backward"] * 2 + ["triton_forward"] * 4
    for got, want in zip(fused[:3], reference[:3]):
        assert torch.equal(got, want)
    for got, want in zip(fused[3:], reference[3:]):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_interpreter
@pytest.mark.parametrize("kernels", [False, True], ids=["tensor_ops", "custom_op"])
def test_compiled_quantizer_takes_the_custom_op_where_the_kernels_apply(monkeypatch, kernels):
    if kernels:
        monkeypatch.setattr(K, "applies", lambda x: True)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    step, inputs = _two_quantizer_step(Q.lsq_fake_quantize)
    torch._dynamo.reset()
    torch.compile(step, backend=capture, fullgraph=True)(*inputs)
    assert len(graphs) == 1 and ("lsq_fake_quantize" in graphs[0]) == kernels
    _assert_compiled_gradients_equal_eager(step, inputs)


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


@pytest.mark.gpu
@needs_cuda
def test_cuda_eager_runs_the_kernels_and_equals_the_torch_path(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    calls = _spy_on_kernels(monkeypatch)
    fused = _quantizer_and_fused_conv_step("cuda")
    assert sorted(calls) == ["triton_backward"] * 2 + ["triton_forward"] * 4
    monkeypatch.setattr(K, "ENABLED", False)
    reference = _quantizer_and_fused_conv_step("cuda")
    assert len(calls) == 6, "with ENABLED off the CUDA path is the pure-torch one"
    for got, want in zip(fused[:3], reference[:3]):
        assert torch.equal(got, want)
    for got, want in zip(fused[3:], reference[3:]):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_cuda_compiled_quantizer_equals_eager_at_the_clip_bound():
    """Min-max steps put each channel's largest weight exactly on the clip bound, where
    inductor's approximate division flips the clip mask (bench/lsq_division.py); compiled
    code takes the custom op, whose kernels divide as eager does."""
    generator = torch.Generator().manual_seed(13)
    weight = (torch.randn(256, 64, 3, 3, generator=generator) * 0.05).cuda()
    step = weight.abs().amax((1, 2, 3)) / 7
    grad = torch.randn(weight.shape, generator=generator).cuda()
    results = []
    torch._dynamo.reset()
    for fn in (Q.lsq_fake_quantize, torch.compile(Q.lsq_fake_quantize, fullgraph=True)):
        w, s = weight.clone().requires_grad_(), step.clone().requires_grad_()
        out = fn(w, s, -8, 7, 0)
        out.backward(grad)
        results.append((out.detach(), w.grad, s.grad))
    torch._dynamo.reset()
    (eager_out, eager_w, eager_s), (out, w_grad, s_grad) = results
    assert torch.equal(out, eager_out) and torch.equal(w_grad, eager_w)
    torch.testing.assert_close(s_grad, eager_s, rtol=1e-5, atol=1e-7)
