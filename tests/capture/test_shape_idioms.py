"""Shape-aware capture: each idiom that broke plain torch.fx, in a small model written that way.

Every test checks the captured graph against the eager model on the example inputs, that the
layers stay ``call_module`` nodes (visible to the passes), and that the idiom did not make a leaf.
"""
from __future__ import annotations

import einops
import pytest
import torch
from einops import rearrange
from torch import nn

from ptqat_fx.capture import AUTO_LEAVES_KEY, RECORDED_CALLS_KEY, specialization, trace
from ptqat_fx.errors import InputError, TraceError

from tests.capture.mask_library import causal_mask

G = torch.Generator().manual_seed(0)


def _captured(model: nn.Module, *inputs: torch.Tensor, **kwargs: torch.Tensor):
    model.eval()
    gm = trace(model, example_inputs=inputs, example_kwargs=kwargs)
    assert gm.meta[AUTO_LEAVES_KEY] == []
    with torch.no_grad():
        assert torch.equal(gm(*inputs, **kwargs), model(*inputs, **kwargs))
    return gm


def _calls(gm) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


class CompareSizes(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, y):
        if x.size(2) > y.size(2):
            y = nn.functional.interpolate(y, size=x.shape[2:])
        else:
            x = nn.functional.interpolate(x, size=y.shape[2:])
        return self.conv(x + y)


def test_if_size_comparison_becomes_a_constant():
    x, y = torch.randn(1, 3, 8, 8, generator=G), torch.randn(1, 3, 4, 4, generator=G)
    gm = _captured(CompareSizes(), x, y)
    assert _calls(gm) == ["conv"]
    assert specialization(gm).input_shapes == {"x": (1, 3, 8, 8), "y": (1, 3, 4, 4)}


class PerSample(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        B = x.shape[0]
        outs = []
        for ix in range(B):
            outs.append(self.fc(x[ix]) * (ix + 1))
        return torch.stack(outs)


def test_for_range_over_batch_unrolls():
    gm = _captured(PerSample(), torch.randn(3, 4, generator=G))
    assert _calls(gm) == ["fc", "fc", "fc"]


class FoldSequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)

    def forward(self, x):
        b, s = x.shape[:2]
        y = self.conv(x.view(b * s, *x.shape[2:]))
        return y.view(b, s, *y.shape[1:]).mean(1)


def test_view_with_shape_arithmetic_and_unpacking():
    _captured(FoldSequence(), torch.randn(2, 3, 2, 5, 5, generator=G))


class AssertChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        assert C == 3, "expects RGB"
        return self.conv(x).reshape(B, -1, H * W)


def test_assert_on_a_shape_passes_at_trace_time():
    _captured(AssertChannels(), torch.randn(2, 3, 4, 4, generator=G))


class Rearranges(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 6)

    def forward(self, x):
        tokens = rearrange(x, "b c h w -> b (h w) c")
        tokens = self.proj(tokens)
        return einops.reduce(tokens, "b n (g d) -> b g d", "mean", g=2)


def test_einops_calls_become_call_nodes_without_naming_them():
    gm = _captured(Rearranges(), torch.randn(2, 3, 4, 4, generator=G))
    assert _calls(gm) == ["proj"]
    assert {"einops.einops.rearrange", "einops.einops.reduce"} <= set(gm.meta[RECORDED_CALLS_KEY])
    # the recorded functions are restored once tracing ends
    assert einops.rearrange.__module__ == "einops.einops" and not hasattr(einops.rearrange, "__ptqat_recorded__")
    assert not hasattr(rearrange, "__ptqat_recorded__")


class MaskedAttention(nn.Module):
    """transformers' attention: the mask function returns None without padding, and the
    attention is causal exactly when the mask is None."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        mask = causal_mask(q)
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


def test_a_library_call_returning_none_is_none_in_the_graph():
    x = torch.randn(2, 5, 8, generator=G)
    gm = _captured(MaskedAttention(), x)  # as a node (never None), the attention was not causal
    assert "tests.capture.mask_library.causal_mask" in gm.meta[RECORDED_CALLS_KEY]
    assert not [n for n in gm.graph.nodes if n.target is causal_mask]


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.size(0) > 1 and x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)


def test_control_flow_on_tensor_values_still_needs_a_leaf():
    x = torch.randn(3, 4, generator=G)
    with pytest.raises(TraceError, match=r"if x.size\(0\) > 1 and x.sum\(\) > 0:.*Fix: .*leaf_modules"):
        trace(nn.Sequential(ValueBranch()), example_inputs=(x,))


def test_specialized_graph_refuses_another_batch_size():
    model = FoldSequence().eval()
    x = torch.randn(2, 3, 2, 5, 5, generator=G)
    gm = _captured(model, x)
    with pytest.raises(InputError, match=r"input 'x' has shape \[4, 3, 2, 5, 5\].*shape \[2, 3, 2, 5, 5\]"):
        gm(torch.randn(4, 3, 2, 5, 5, generator=G))


def test_plain_traceable_model_stays_general():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    gm = _captured(model, torch.randn(2, 4, generator=G))
    assert specialization(gm) is None
    x = torch.randn(7, 4, generator=G)
    assert torch.equal(gm(x), model(x))
