"""coverage(): counts, float layers, and the warning for a model with nothing to quantize."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqat_fx
from ptqat_fx.coverage import coverage
from examples import mlp


def test_model_without_quantizable_layers_warns_and_reports_so():
    model = nn.Sequential(nn.ReLU(), nn.LayerNorm(4))
    with pytest.warns(UserWarning, match="no quantizable layer"):
        gm = ptqat_fx.quantize(model, (torch.randn(2, 4),), progress=False)
    found = coverage(gm)
    assert (found.layers, found.quantized, found.share) == (0, 0, 1.0)
    assert "no quantizable layer" in str(found)


def test_skipped_layers_count_as_float():
    config = ptqat_fx.QuantConfig(skip=("fc3",), w_observer="minmax")
    gm = ptqat_fx.quantize(mlp.build(inputs=16), (torch.randn(2, 16),), config=config, select=None, progress=False)
    found = coverage(gm)
    assert (found.layers, found.quantized, found.float_layers) == (3, 2, ["fc3"])
    assert found.traced_whole
    assert str(found).startswith("quantized 2/3 quantizable layers (67%); traced whole")
