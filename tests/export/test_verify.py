"""verify.first_divergence: the disagreement between onnxruntime and onnx.reference on the
ResNet example is a float rounding flip at a ``k + 0.5`` tie, not a semantic difference."""
from __future__ import annotations

import pytest
import torch

import ptqat_fx
from ptqat_fx.export.verify import first_divergence
from tests.export.quantized_examples import example_input, quantized


@pytest.mark.slow  # ~20 s: both runtimes on 128 samples with every activation as an output
def test_runtimes_first_differ_by_one_integer_at_a_rounding_tie(tmp_path):
    ptqat_fx.export_onnx(quantized("resnet", 8), (example_input("resnet"),), tmp_path / "m.onnx", dynamic_batch=True)
    x = torch.randn(128, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    divergence = first_divergence(tmp_path / "m.onnx", (x,))
    assert divergence is not None and divergence.flipped <= 2
    engine, reference = divergence.ties
    tie = round(engine * 2) / 2
    assert tie % 1 == 0.5
    # Both sides within float32 accumulation noise of one k + 0.5, on opposite sides of it.
    assert abs(engine - tie) < 1e-4 and abs(reference - tie) < 1e-4
    assert (engine - tie) * (reference - tie) <= 0
