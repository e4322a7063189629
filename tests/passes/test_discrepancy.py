"""discrepancy: float64 hand computations and the relation of local and accumulated."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import ptqat_fx
from ptqat_fx.layer_spec import layer_specs
from ptqat_fx.meta import float_weight, layer_spec
from ptqat_fx.passes.discrepancy import (
    DiscrepancyInterpreter, _Both, _fake_quantize, discrepancy, discrepancy_table,
)
from ptqat_fx.runtime.quantizer import FakeQuantizer
from examples import resnet_small


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(x)


def _prepared(model, data):
    return ptqat_fx.quantize(model, (data[0],), data, select=None, progress=False)


def test_local_discrepancy_of_one_layer_equals_float64_hand_computation():
    torch.manual_seed(0)
    model = OneLinear()
    data = [torch.randn(4, 6) for _ in range(3)]
    gm = _prepared(model, data)
    discrepancy(gm, data, 1, modes=("local", "accumulated"), progress=False)
    (spec,) = layer_specs(gm)

    w_q = gm.fc.weight_fake_quant
    a_q = gm.get_submodule(spec.input_quantizers[0])
    w_scale = w_q.scale.detach().double()[:, None]
    weight = (model.fc.weight.double() / w_scale).round().clamp(-8, 7) * w_scale
    a_scale = a_q.scale.detach().double()
    per_sample = {"euclidean": [], "relative": [], "mse": [], "cosine": []}
    for x in data:
        x = x.double()
        x_q = (x / a_scale).round().clamp(-128, 127) * a_scale
        q = x_q @ weight.T + model.fc.bias.double()
        f = x @ model.fc.weight.double().T + model.fc.bias.double()
        diff = (q - f).norm(dim=1)
        per_sample["euclidean"] += diff.tolist()
        per_sample["relative"] += (diff / f.norm(dim=1)).tolist()
        per_sample["mse"] += ((q - f) ** 2).mean(dim=1).tolist()
        per_sample["cosine"] += (1 - torch.nn.functional.cosine_similarity(q, f, dim=1)).tolist()
    for metric, values in per_sample.items():
        expected = sum(values) / len(values)
        assert spec.discrepancy[f"local.{metric}"] == pytest.approx(expected, rel=1e-4, abs=1e-9)
        # The first layer receives float inputs: accumulated equals local.
        assert spec.discrepancy[f"accumulated.{metric}"] == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_first_layer_accumulated_equals_local_and_runs_are_identical():
    data = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    gm = _prepared(resnet_small.build(), data)
    discrepancy(gm, data, 1, modes=("local", "accumulated"), progress=False)
    first = layer_specs(gm)[0].discrepancy
    assert first["accumulated.relative"] == pytest.approx(first["local.relative"], rel=1e-6)
    later = layer_specs(gm)[3].discrepancy
    assert later["accumulated.relative"] != pytest.approx(later["local.relative"], rel=1e-3)
    before = [dict(s.discrepancy) for s in layer_specs(gm)]
    discrepancy(gm, data, 1, modes=("local", "accumulated"), progress=False)
    assert before == [s.discrepancy for s in layer_specs(gm)]


def test_table_rows_in_graph_order():
    data = [torch.randn(2, 3, 32, 32)]
    gm = _prepared(resnet_small.build(), data)
    discrepancy(gm, data, 1, progress=False)
    rows = discrepancy_table(gm, "accumulated.mse")
    assert [r["layer"] for r in rows] == [s.name for s in layer_specs(gm)]
    assert all(r["value"] > 0 for r in rows)


@pytest.mark.parametrize("strategy", ["all", "small", "none"])
def test_analysis_after_freeze_matches_analysis_before(strategy):
    data = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    model = resnet_small.build()
    gm = ptqat_fx.quantize(model, (data[0],), data, select=ptqat_fx.Select(strategy), progress=False)
    before = [s.discrepancy["accumulated.relative"] for s in layer_specs(gm)]
    discrepancy(gm, data, 1, progress=False)
    after = [s.discrepancy["accumulated.relative"] for s in layer_specs(gm)]
    assert after == pytest.approx(before, rel=1e-5)


class _FormerSweep(DiscrepancyInterpreter):
    """The sweep before it stopped running quantizer modules on the float side: its
    ``run_node`` verbatim, the reference for the current one."""

    def run_node(self, n):
        if n.op in ("placeholder", "get_attr"):
            value = fx.Interpreter.run_node(self, n)
            if float_weight(n) is not None:
                return _Both(self.module.get_parameter(float_weight(n)), value, value)
            return _Both(value, value)
        float_args, float_kwargs = self._side(n, "float")
        float_target = getattr(n.target, "float_reference", n.target)
        float_out = getattr(self, n.op)(float_target, float_args, float_kwargs)
        if n.op == "output":
            return float_out
        if n.op == "call_module" and isinstance(self.module.get_submodule(n.target), FakeQuantizer):
            quantizer = self.module.get_submodule(n.target)
            (float_in,), (quantized_in,) = float_args, self._side(n, "quantized")[0]
            if n.args[0].op == "get_attr":
                if n.name not in self.quantized_constants:
                    self.quantized_constants[n.name] = _fake_quantize(quantizer, float_in)
                constant = self.quantized_constants[n.name]
                return _Both(float_in, constant, constant)
            local = _fake_quantize(quantizer, float_in) if "local" in self.modes else None
            return _Both(float_in, _fake_quantize(quantizer, quantized_in), local)
        quantized_args, quantized_kwargs = self._side(n, "quantized")
        quantized_out = getattr(self, n.op)(n.target, quantized_args, quantized_kwargs)
        spec = layer_spec(n)
        if spec is not None:
            self._record(n, spec, float_out, quantized_out)
        return _Both(float_out, quantized_out)


@pytest.mark.parametrize("strategy", [None, "small"])
def test_sweep_gives_the_discrepancies_of_the_former_sweep(strategy):
    data = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    select = ptqat_fx.Select(strategy) if strategy else None
    gm = ptqat_fx.quantize(resnet_small.build(), (data[0],), data, select=select, progress=False)
    means = []
    for sweep in (DiscrepancyInterpreter, _FormerSweep):
        interpreter = sweep(gm, ("local", "accumulated"))
        with torch.no_grad():
            for batch in data:
                interpreter.run(batch)
        means.append(interpreter.means())
    assert len(means[0]) == len(layer_specs(gm)) and means[0] == means[1]
