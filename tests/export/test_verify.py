"""verify.first_divergence and step_agreement: with integer layers (integer accumulation in
the exported graph) onnxruntime and onnx.reference quantize every activation of the ResNet
example to the same integers, where float Q/DQ let them differ at ``k + 0.5`` ties."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ptqat_fx
from ptqat_fx.export.verify import first_divergence, step_agreement
from tests.export.quantized_examples import example_input, quantized


@pytest.mark.slow  # ~20 s: both runtimes on 128 samples with every activation as an output
def test_runtimes_round_every_activation_alike(tmp_path):
    ptqat_fx.export_onnx(quantized("resnet", 8), (example_input("resnet"),), tmp_path / "m.onnx", dynamic_batch=True)
    x = torch.randn(128, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    assert first_divergence(tmp_path / "m.onnx", (x,)) is None


def test_step_agreement_counts_steps_and_argmax_changes():
    reference = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 0.0]])
    engine = reference + np.array([[0.0, 0.25, 0.0], [-1.5, 0.0, 1.0]])  # row 1's argmax moves
    found = step_agreement(engine, reference, step=0.5)
    assert found.max_steps == 3.0
    assert found.within_one_step == 4 / 6
    assert found.argmax_changed == 0.5
