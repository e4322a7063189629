"""The layer-kind registry: lookups by type (isinstance), function and method, and a kind
form added in one line (``torch.linalg.matmul``) quantized end to end."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

import ptqat_fx
from ptqat_fx.layer_kinds import (
    graph_functions, kind, kind_of_function, kind_of_method, kind_of_type, kinds, quantizable_as_module, runs_as_kind,
)
from ptqat_fx.layer_spec import layer_specs
from ptqat_fx.runtime.frozen_conv import frozen_conv
from ptqat_fx.runtime.linear_transposed import linear_transposed
from ptqat_fx.runtime.fused_layers import quantized_conv, quantized_linear, quantized_matmul


class PaddedConv(nn.Conv2d):
    """Like EfficientNet's Conv2dStaticSamePadding: a Conv2d subclass with its own forward."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0)


class PlainSubclass(nn.Linear):
    pass


def test_registry_holds_the_kinds_written_out():
    assert [k.name for k in kinds()] == [
        "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
        "linear_transposed", "matmul",
    ]
    assert [k.weight_axis for k in kinds()] == [0, 0, 0, 0, 1, 1, 1, 1, None]
    assert set(graph_functions()) == {frozen_conv, quantized_conv, quantized_linear, quantized_matmul, linear_transposed}


def test_lookups_match_subclasses_and_every_form():
    assert kind_of_type(PaddedConv) is kind("conv2d")
    assert kind_of_type(nn.LazyLinear) is kind("linear")
    assert kind_of_type(nn.ReLU) is None
    assert runs_as_kind(PlainSubclass(2, 2)) is kind("linear")
    assert runs_as_kind(PaddedConv(1, 1, 3)) is None  # its forward pads: keep the module call
    assert not quantizable_as_module(PaddedConv(1, 1, 3)) and quantizable_as_module(nn.Conv2d(1, 1, 3))
    assert kind_of_function(operator.matmul) is kind_of_function(torch.bmm) is kind("matmul")
    assert kind_of_function(F.conv_transpose2d) is kind("conv_transpose2d")
    assert kind_of_method("bmm") is kind("matmul") and kind_of_method("relu") is None
    assert kind("conv_transpose2d").aten == (torch.ops.aten.conv_transpose2d.input,)


class Attention(nn.Module):
    def __init__(self, product):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.product = product

    def forward(self, x):
        return self.product(self.q(x), self.k(x).transpose(1, 2))


def test_linalg_matmul_is_quantized_as_torch_matmul_is():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    select = ptqat_fx.Select("all")
    linalg = ptqat_fx.quantize(Attention(torch.linalg.matmul), (x,), [x], select=select, progress=False)
    plain = ptqat_fx.quantize(Attention(torch.matmul), (x,), [x], select=select, progress=False)
    assert [s.kind for s in layer_specs(linalg)] == ["linear", "linear", "matmul"]
    assert len(layer_specs(linalg)[-1].input_quantizers) == 2
    with torch.no_grad():
        torch.testing.assert_close(linalg(x), plain(x))
        assert not torch.allclose(linalg(x), Attention(torch.matmul)(x))  # it is quantized
