"""Functional layer calls that name their weight: captured in the positional form the passes read."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ptqat_fx
from ptqat_fx import QuantConfig
from ptqat_fx.capture import trace
from ptqat_fx.layer_spec import layer_specs


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class BeitAttention(nn.Module):
    """timm's BEiT/EVA attention: one qkv projection called through ``F.linear`` with keyword
    weight and bias, the bias built from q and v biases around a zero k bias (``keywords``;
    without it the same calls positional, the reference)."""

    def __init__(self, dim: int = 16, heads: int = 2, keywords: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.keywords = heads, keywords
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(_randn(dim, seed=1))
        self.v_bias = nn.Parameter(_randn(dim, seed=2))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.proj = nn.Linear(dim, dim)
        self.conv = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        B, N, C = x.shape
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.keywords:
            qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        else:
            qkv = F.linear(x, self.qkv.weight, qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x.transpose(1, 2).unsqueeze(-1)
        if self.keywords:
            x = F.conv2d(input=x, weight=self.conv.weight, bias=self.conv.bias, stride=1)
        else:
            x = F.conv2d(x, self.conv.weight, self.conv.bias, 1)
        return self.proj(x.squeeze(-1).transpose(1, 2))


def test_keyword_weight_and_bias_become_positional():
    model, x = BeitAttention().eval(), _randn(2, 8, 16)
    gm = trace(model, example_inputs=(x,))
    layer_calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (F.linear, F.conv2d)]
    assert len(layer_calls) == 2
    for node in layer_calls:
        assert len(node.args) == 3 and not {"input", "weight", "bias"} & set(node.kwargs)
        assert node.kwargs == ({"stride": 1} if node.target is F.conv2d else {})
        assert node.args[1].op == "get_attr"
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_keyword_layer_calls_quantize_as_positional_ones():
    x = _randn(2, 8, 16)
    calib = [(_randn(2, 8, 16, seed=seed),) for seed in (1, 2)]
    config = QuantConfig(w_bits=8, a_bits=8)
    gm = ptqat_fx.quantize(BeitAttention().eval(), (x,), calib, config, select=None, progress=False)
    reference = ptqat_fx.quantize(BeitAttention(keywords=False).eval(), (x,), calib, config, select=None,
                                  progress=False)
    weighted = {spec.weight for spec in layer_specs(gm) if spec.weight_quantizer}
    assert weighted == {"qkv.weight", "conv.weight", "proj.weight"}
    with torch.no_grad():
        quantized, expected, fp = gm(x), reference(x), BeitAttention(keywords=False).eval()(x)
    assert torch.equal(quantized, expected)
    assert not torch.equal(quantized, fp)  # the quantizers act
