"""No process-global state outlives a trace: threads, ``torch.no_grad``, ``KeyboardInterrupt``."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _orig_module_call, _orig_module_getattr

import ptqat_fx
from ptqat_fx.capture import trace
from ptqat_fx.capture.hooks import unpatched

NO_GRAD, NO_GRAD_ENTER = torch.no_grad, torch.no_grad.__enter__
APPLY = torch.autograd.Function.__dict__["apply"]


def _torch_is_unpatched() -> bool:
    return (
        torch.no_grad is NO_GRAD and torch.no_grad.__enter__ is NO_GRAD_ENTER
        and torch.autograd.Function.__dict__["apply"] is APPLY and unpatched()
        and nn.Module.__call__ is _orig_module_call and nn.Module.__getattr__ is _orig_module_getattr
    )


class Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class Net(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        b = x.size(0)
        y = Scale.apply(torch.relu(self.bn(self.conv(x))))
        return self.fc(y.view(b, 8, -1).mean(-1))


def _quantized_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    gm = ptqat_fx.quantize(model, (x,), [x, x.flip(0)], select=None, progress=False)
    with torch.no_grad():
        return {**gm.state_dict(), "out": gm(x)}


@pytest.mark.parametrize("calls", [3, pytest.param(10, marks=pytest.mark.slow)])
def test_threads_quantize_bit_identical_to_sequential(calls):
    seeds = [(t * calls + i) % 4 for t in range(4) for i in range(calls)]
    models = {seed: Net(seed).eval() for seed in set(seeds)}  # the global RNG, before any thread
    sequential = {seed: _quantized_state(models[seed], seed) for seed in models}
    results: list[tuple[int, dict]] = []
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for i in range(calls):
                seed = seeds[thread * calls + i]
                results.append((seed, _quantized_state(models[seed], seed)))
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 4 * calls
    for seed, state in results:
        assert state.keys() == sequential[seed].keys()
        assert all(torch.equal(state[k], sequential[seed][k]) for k in state), seed
    assert _torch_is_unpatched()


def test_no_grad_is_the_same_object_after_tracing():
    class NoGrad(nn.Module):
        def forward(self, x):
            with torch.no_grad():
                return x * 2

    trace(nn.Sequential(nn.Linear(2, 2)), example_inputs=(torch.ones(1, 2),))
    gm = trace(nn.Sequential(nn.Linear(2, 2), NoGrad()), example_inputs=(torch.ones(1, 2),), auto_leaf=True)
    assert _torch_is_unpatched()
    with torch.no_grad():
        assert not torch.is_grad_enabled()
    x = torch.ones(1, 2, requires_grad=True)
    assert not gm(x).requires_grad  # the eager no_grad block kept its semantics


def test_eager_code_in_another_thread_is_not_traced_while_one_thread_traces():
    started, release = threading.Event(), threading.Event()
    seen: list[object] = []

    class Slow(nn.Module):
        def forward(self, x):
            started.set()
            release.wait(5)
            return x + 1

    def trace_in_thread() -> None:
        trace(nn.Sequential(nn.Linear(2, 2), Slow()), example_inputs=(torch.ones(1, 2),))

    tracer = threading.Thread(target=trace_in_thread)
    tracer.start()
    assert started.wait(5)
    # FX has swapped nn.Module.__call__ process-wide for its trace; this thread must not see it.
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    seen.append(model(torch.ones(1, 2)))
    seen.append(Scale.apply(torch.ones(1)))
    release.set()
    tracer.join()
    assert isinstance(seen[0], torch.Tensor) and not isinstance(seen[0], fx.Proxy)
    assert torch.equal(seen[1], torch.full((1,), 2.0))
    assert _torch_is_unpatched()


def test_keyboard_interrupt_during_tracing_leaves_torch_unpatched():
    class Interrupts(nn.Module):
        def forward(self, x):
            if isinstance(x, fx.Proxy):
                raise KeyboardInterrupt
            return x

    model = nn.Sequential(nn.Linear(2, 2), Interrupts())
    with pytest.raises(KeyboardInterrupt):
        trace(model, example_inputs=(torch.ones(1, 2),), auto_leaf=True)
    assert _torch_is_unpatched()
    gm = trace(nn.Sequential(nn.Linear(2, 2)))  # the lock was released
    assert isinstance(gm, fx.GraphModule)
