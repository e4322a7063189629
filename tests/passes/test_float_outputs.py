"""Calibration's recorded float outputs let the analysis run only the quantized side: the same
discrepancies as the two-sided interpreter, which stays the reference."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ptqat_fx
from examples import resnet_small, vit_small
from ptqat_fx.capture import trace
from ptqat_fx.config import METRICS
from ptqat_fx.layer_spec import layer_specs
from ptqat_fx.passes import discrepancy as discrepancy_module
from ptqat_fx.passes.annotate import annotate
from ptqat_fx.passes.calibrate import calibrate
from ptqat_fx.passes.discrepancy import discrepancy
from ptqat_fx.passes.float_outputs import FloatOutputs, same_inputs
from ptqat_fx.passes.fold_bn import fold_bn
from ptqat_fx.passes.insert_quantizers import insert_quantizers


class InPlace(nn.Module):
    """Layer outputs changed in place right after the layer: the record must keep the value
    the layer produced."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(x).relu_()
        h = self.fc2(h)
        h.mul_(2).add_(1)
        return self.fc3(h)


def _quantized(model, data, observer="mse"):
    config = ptqat_fx.QuantConfig(w_bits=4, a_bits=8, w_observer=observer, a_observer=observer)
    gm = trace(copy.deepcopy(model))
    gm = insert_quantizers(annotate(fold_bn(gm), config), config)
    return gm


def _analysed(model, data, analysis_data=None, record=True, max_bytes=None):
    gm = _quantized(model, data)
    reference = FloatOutputs(max_bytes) if record else None
    calibrate(gm, data, 1, progress=False, record=reference)
    discrepancy(gm, analysis_data if analysis_data is not None else data, 1, metrics=METRICS, progress=False,
                reference=reference)
    return {spec.name: dict(spec.discrepancy) for spec in layer_specs(gm)}


def _count_interpreter_runs(monkeypatch):
    runs = []
    original = discrepancy_module.DiscrepancyInterpreter.run

    def counting(self, *args, **kwargs):
        runs.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(discrepancy_module.DiscrepancyInterpreter, "run", counting)
    return runs


@pytest.mark.parametrize("build,shape", [
    (lambda: InPlace(), (6, 8)),
    (resnet_small.build, (2, 3, 32, 32)),
    (vit_small.build, (2, 1, 28, 28)),
])
def test_recorded_analysis_equals_the_two_sided_interpreter(monkeypatch, build, shape):
    torch.manual_seed(0)
    model = build().eval()
    data = [torch.randn(shape) for _ in range(3)]
    expected = _analysed(model, data, record=False)
    runs = _count_interpreter_runs(monkeypatch)
    got = _analysed(model, data)
    assert runs == []  # every batch took the quantized-only sweep
    assert got == expected  # bit for bit: the same arithmetic, the same sums
    assert all(len(values) == len(METRICS) for values in got.values()) and len(got) >= 3


def test_other_batches_and_batches_beyond_the_bound_take_the_interpreter(monkeypatch):
    torch.manual_seed(0)
    model = InPlace()
    data = [torch.randn(6, 8) for _ in range(3)]
    shuffled = [data[1], data[0], data[2]]
    expected = _analysed(model, data, shuffled, record=False)
    runs = _count_interpreter_runs(monkeypatch)
    assert _analysed(model, data, shuffled) == expected
    assert len(runs) == 2  # batch 2 equals the recorded batch 2; 0 and 1 differ
    unshuffled = _analysed(model, data, record=False)
    runs.clear()
    one_batch = sum(t.nbytes for t in data[:1]) + 6 * (16 + 16 + 4) * 4
    assert _analysed(model, data, max_bytes=one_batch) == unshuffled
    assert len(runs) == 2  # only the first batch fitted


def test_a_record_of_another_graph_or_changed_weights_is_not_used(monkeypatch):
    torch.manual_seed(0)
    data = [torch.randn(6, 8) for _ in range(2)]
    gm = _quantized(InPlace(), data)
    record = FloatOutputs()
    calibrate(gm, data, 1, progress=False, record=record)
    assert record.valid_for(gm) and not record.valid_for(_quantized(InPlace(), data))
    with torch.no_grad():
        gm.fc1.weight.add_(1.0)
    assert not record.valid_for(gm)
    runs = _count_interpreter_runs(monkeypatch)
    discrepancy(gm, data, 1, progress=False, reference=record)
    assert len(runs) == 2


def test_quantize_uses_the_record_and_matches_the_reference(monkeypatch):
    torch.manual_seed(0)
    model = resnet_small.build().eval()
    data = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    runs = _count_interpreter_runs(monkeypatch)
    gm = ptqat_fx.quantize(model, (data[0],), data, progress=False)
    assert runs == []
    fresh = _quantized(model, data)
    calibrate(fresh, data, 1, progress=False)
    discrepancy(fresh, data, 1, metrics=("relative",), progress=False)
    expected = {s.name: s.discrepancy["accumulated.relative"] for s in layer_specs(fresh)}
    assert {s.name: s.discrepancy["accumulated.relative"] for s in layer_specs(gm)} == expected


def test_same_inputs():
    x = torch.arange(6.0).reshape(2, 3)
    assert same_inputs((x, {"k": 2}), (x.clone(), {"k": 2}))
    assert not same_inputs((x,), (x + 1,))
    assert not same_inputs((x,), (x.reshape(3, 2),))
    assert not same_inputs((x, 1), (x, 2))
    assert not same_inputs((x,), (x, x))
