"""calibrate: step sizes from the observed ranges, the switch to fake-quant, and its errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ptqat_fx import CalibrationError, QuantConfig
from ptqat_fx.passes.annotate import annotate
from ptqat_fx.passes.calibrate import calibrate
from ptqat_fx.passes.insert_quantizers import insert_quantizers
from ptqat_fx.runtime.quantizer import QuantizerMode, quantizers
from ptqat_fx.capture import trace


def _graph(config=QuantConfig(w_bits=8, a_bits=8, w_observer="minmax", a_observer="minmax")):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    return model, insert_quantizers(annotate(trace(model), config), config)


def test_minmax_steps_are_the_largest_magnitudes_over_all_batches():
    model, gm = _graph()
    batches = [torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-4.0, 1.0, 3.0]])]
    calibrate(gm, batches, arity=1, progress=False)
    by_path = quantizers(gm)
    (input_quantizer,) = [q for path, q in by_path.items() if path.startswith("input_quantizers")]
    # By hand: max |x| over both batches is 4.0; signed 8 bits -> qmax 127.
    assert float(input_quantizer.scale) == pytest.approx(4.0 / 127)
    weight_quantizer = by_path["0.weight_fake_quant"]
    expected = model[0].weight.detach().abs().amax(dim=1) / 127
    torch.testing.assert_close(weight_quantizer.scale.detach(), expected)
    assert all(q.mode is QuantizerMode.QUANTIZE for q in by_path.values())


def test_observing_does_not_change_outputs_and_batches_may_carry_labels():
    model, gm = _graph()
    x = torch.randn(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))  # observe mode passes through
    calibrate(gm, [(x, torch.zeros(4))], arity=1, progress=False)
    assert float(quantizers(gm)["input_quantizers.input_1"].scale) == pytest.approx(float(x.abs().max()) / 127)


def test_errors_name_the_problem():
    _, gm = _graph()
    with pytest.raises(CalibrationError, match="no batch"):
        calibrate(gm, [], arity=1, progress=False)
    with pytest.raises(CalibrationError, match="batch 1"):
        calibrate(gm, [torch.zeros(1, 3), torch.full((1, 3), float("nan"))], arity=1, progress=False)


def test_histograms_binned_after_each_forward_give_the_same_steps(monkeypatch):
    # What calibrate does on a GPU (runtime.observer.DeferredHistograms), run on the CPU.
    from examples import resnet_small
    from ptqat_fx.passes import calibrate as calibrate_module
    from ptqat_fx.runtime.observer import DeferredHistograms

    config = QuantConfig()  # MSE observers: histograms
    batches = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(3)]

    def calibrated():
        torch.manual_seed(0)
        gm = insert_quantizers(annotate(trace(resnet_small.build()), config), config)
        return calibrate(gm, batches, arity=1, progress=False)

    immediate = calibrated()
    made = []
    monkeypatch.setattr(calibrate_module, "_deferred_histograms", lambda device: made.append(DeferredHistograms(1 << 30)) or made[-1])
    deferred = calibrated()
    assert len(made) == 1 and not made[0].pending
    steps = {name: q.scale for name, q in quantizers(deferred).items()}
    assert all(q.observer.deferred is None for q in quantizers(deferred).values())
    for name, quantizer in quantizers(immediate).items():
        assert torch.equal(steps[name], quantizer.scale), name
