"""bench.grad_check refuses a "compiled" forward whose gradients are missing, zero or rerouted,
and passes one that computes eager's gradients; the compiled forwards here are plain functions
with the defect built in, so the check is tested without a compiler."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.grad_check import GradientCheckError, grad_check


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def test_eager_twin_passes_with_and_without_sensitivity(model):
    x = torch.randn(32, 8)
    plain = grad_check(model, lambda x: model(x), (x,), _loss, tolerance=1e-6)
    assert plain["worst_rel_diff"] == 0.0 and plain["tensors"] == 4
    report = grad_check(model, lambda x: model(x), (x,), _loss, sensitivity=True)
    assert report["worst_excess"] == 0.0


def test_a_detached_weight_is_refused(model):
    x = torch.randn(32, 8)

    def no_first_weight(x: torch.Tensor) -> torch.Tensor:
        return model[2](torch.tanh(F.linear(x, model[0].weight.detach(), model[0].bias)))

    with pytest.raises(GradientCheckError, match=r"0\.weight: gradient missing \(compiled\)"):
        grad_check(model, no_first_weight, (x,), _loss, sensitivity=True)


def test_a_doubled_gradient_with_the_same_loss_is_refused(model):
    x = torch.randn(32, 8)

    def doubled(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return out + (out - out.detach())  # the same value, twice the gradient

    with pytest.raises(GradientCheckError, match="its bound"):
        grad_check(model, doubled, (x,), _loss, sensitivity=True)
    with pytest.raises(GradientCheckError, match="tolerance"):
        grad_check(model, doubled, (x,), _loss, tolerance=1e-3)


class _RoundingNearATie(nn.Module):
    """``smooth * x[1] + step * (10 * round(x[0]) + 1)``: x[0] sits one ulp below a tie."""

    def __init__(self) -> None:
        super().__init__()
        self.smooth = nn.Parameter(torch.tensor([1.5]))
        self.step = nn.Parameter(torch.tensor([1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rounded = x[0] + (torch.round(x[0]) - x[0]).detach()
        return self.smooth * x[1] + self.step * (10 * rounded + 1)


def test_sensitivity_widens_the_bound_only_where_one_ulp_moves_the_gradient():
    # One ulp of input turns round(x[0]) from 1 into 2, so step's gradient moves 11 -> 21 and
    # gets a wide bound; smooth's moves by one ulp and keeps the base tolerance, so the same
    # excess is refused there and passes on step.
    model = _RoundingNearATie()
    x = torch.tensor([1.5 - 2.0 ** -23, 2.0])

    def loss(out: torch.Tensor) -> torch.Tensor:
        return out.sum()

    assert grad_check(model, model, (x,), loss, sensitivity=True)["worst_excess"] == 0.0

    def off(parameter: nn.Parameter):
        return lambda x: model(x) + 0.01 * (parameter - parameter.detach())

    with pytest.raises(GradientCheckError, match="smooth"):
        grad_check(model, off(model.smooth), (x,), loss, sensitivity=True)
    report = grad_check(model, off(model.step), (x,), loss, sensitivity=True)
    assert 0 < report["worst_excess"] < 1 and report["worst_excess_tensor"] == "step"
