"""Issue 14's deep-network acceptance: torchvision ResNet-101 (random init) at W8A8 agrees with
``convert(arithmetic="engine")`` within the documented bound (docs/deploy.md) under a default
onnxruntime session and under ``onnx.reference``. With float Q/DQ the two runtimes drifted
from ``convert`` with depth (one tie flipped by accumulation order, amplified by every later
quantizer); integer layers leave no accumulation order to differ in."""
from __future__ import annotations

import onnxruntime
import pytest
import torch

import ptqat_fx
from ptqat_fx.export.verify import output_step, run_onnx, step_agreement
from tests.zoo.torchvision_zoo import load_torchvision, randomize_zero_weights

pytestmark = pytest.mark.slow  # ~2 min: ResNet-101 quantized, exported, and run by onnx.reference


def test_resnet101_w8a8_within_one_output_step_in_both_runtimes(tmp_path):
    torchvision = load_torchvision()
    if torchvision is None:
        pytest.skip("torchvision is not installed")
    torch.manual_seed(0)
    model = randomize_zero_weights(torchvision.models.resnet101(weights=None)).eval()
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(2, 3, 64, 64, generator=generator) for _ in range(2)]
    config = ptqat_fx.QuantConfig(w_bits=8, a_bits=8, w_observer="minmax", a_observer="minmax")
    qmodel = ptqat_fx.quantize(model, (calibration[0],), calibration, config, select=None, progress=False).eval()
    ptqat_fx.export_onnx(qmodel, (calibration[0],), tmp_path / "m.onnx", dynamic_batch=True)
    x = torch.randn(4, 3, 64, 64, generator=generator)  # not a calibration batch
    with torch.no_grad():
        expected = ptqat_fx.convert(qmodel, arithmetic="engine")(x).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    step = output_step(qmodel)
    for got in (session.run(None, {session.get_inputs()[0].name: x.numpy()})[0],
                run_onnx(tmp_path / "m.onnx", (x,), "reference")[0]):
        found = step_agreement(got, expected, step)
        assert found.within_one_step >= 0.999 and found.argmax_changed == 0.0, found
