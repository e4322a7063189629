"""annotate: which nodes are quantizable layers, by kind, against counts written out by hand."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptqat_fx import QuantConfig
from ptqat_fx.layer_spec import layer_specs
from ptqat_fx.passes.annotate import annotate
from ptqat_fx.capture import trace


class PaddedConv(nn.Conv2d):
    """A Conv2d subclass with its own forward (as EfficientNet's static-same-padding conv)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.padded = PaddedConv(4, 4, 3)
        self.proj = nn.Parameter(torch.randn(6, 16))
        self.fc = nn.Linear(6, 6, bias=False)
        self.register_buffer("rays", torch.randn(6, 6))

    def forward(self, x):
        x = self.padded(torch.relu(self.conv(x))).flatten(2)      # conv2d, conv2d (traced through)
        tokens = F.linear(x, self.proj)                            # linear on a parameter
        tokens = self.fc(tokens)                                   # linear module
        scores = tokens @ tokens.transpose(1, 2)                   # matmul of two activations
        geometry = self.rays.mm(self.rays)                         # geometry: stays float
        return scores.sum() + geometry.sum()


def _annotated(config=None):
    return annotate(trace(Mixed()), config)


def test_kinds_names_and_order_are_the_hand_counted_ones():
    specs = layer_specs(_annotated())
    assert [s.kind for s in specs] == ["conv2d", "conv2d", "linear", "linear", "matmul"]
    assert [s.index for s in specs] == [0, 1, 2, 3, 4]
    assert specs[0].name == "conv" and specs[0].module_path == "conv"
    assert specs[1].module_path is None and specs[1].weight == "padded.weight"  # the subclass's own F.conv2d
    assert specs[2].weight == "proj" and specs[2].params == 6 * 16
    assert specs[3].params == 36 and specs[3].bias is None
    assert specs[4].weight is None and specs[4].params == 0
    assert specs[0].params == 4 * 3 * 9 + 4


def test_skip_by_kind_and_by_path():
    assert [s.kind for s in layer_specs(_annotated(QuantConfig(skip=("matmul",))))] == ["conv2d", "conv2d", "linear", "linear"]
    assert [s.name for s in layer_specs(_annotated(QuantConfig(skip=("conv", "fc"))))][0].startswith("padded")


def test_annotating_twice_gives_the_same_specs():
    gm = _annotated()
    first = [(s.name, s.kind, s.index) for s in layer_specs(gm)]
    assert [(s.name, s.kind, s.index) for s in layer_specs(annotate(gm))] == first
