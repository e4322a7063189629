"""quantize() end to end on the bundled examples, and its errors on bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqat_fx
from ptqat_fx import CalibrationError, InputError, QuantConfig, TraceError
from ptqat_fx.layer_spec import layer_specs
from ptqat_fx.runtime.quantizer import FakeQuantizer, quantizers
from ptqat_fx.capture import trace
from examples import mlp, resnet_small, vit_small

EXAMPLES = {
    "resnet": (resnet_small.build, (4, 3, 32, 32)),
    "vit": (vit_small.build, (4, 1, 28, 28)),
    "mlp": (mlp.build, (4, 1, 28, 28)),
}


def _data(shape, batches=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(batches)]


def _relative_error(out, ref):
    with torch.no_grad():
        return ((out - ref).norm() / ref.norm()).item()


# Counted by hand from the example models' definitions (default arguments):
# resnet: stem conv + 3 blocks x 2 convs + 2 shortcut convs (stages 2 and 3 change width) + fc;
# vit: patch conv + 2 blocks x (q, k, v, proj, fc1, fc2 and 2 attention matmuls) + head;
# mlp: fc1, fc2, fc3.
EXPECTED_LAYERS = {"resnet": 10, "vit": 18, "mlp": 3}


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_quantizable_layer_gets_quantizers(name):
    build, shape = EXAMPLES[name]
    model = build()
    gm = ptqat_fx.quantize(model, (torch.randn(shape),), _data(shape), progress=False)
    specs = layer_specs(gm)
    assert len(specs) == EXPECTED_LAYERS[name]
    assert all(q.mode == "quantize" for q in quantizers(gm).values())
    for spec in specs:
        if spec.weight is not None:
            assert isinstance(gm.get_submodule(spec.weight_quantizer), FakeQuantizer)
        assert spec.input_quantizers


@pytest.mark.parametrize("name", EXAMPLES)
def test_w8a8_is_close_and_w4a8_improves_with_calibration(name):
    build, shape = EXAMPLES[name]
    model = build()
    calib = _data(shape, batches=8)
    test = torch.randn(shape, generator=torch.Generator().manual_seed(99))
    reference = model(test)
    w8a8 = ptqat_fx.quantize(model, (test,), calib, QuantConfig(w_bits=8, a_bits=8), progress=False)
    assert _relative_error(w8a8(test), reference) < 0.05

    w4a8 = ptqat_fx.quantize(model, (test,), calib, QuantConfig(w_bits=4, a_bits=8), progress=False)
    calibrated_error = _relative_error(w4a8(test), reference)
    assert torch.isfinite(w4a8(test)).all()
    # Uncalibrated: the initial unit step sizes, as before any data was seen.
    for quantizer in quantizers(w4a8).values():
        quantizer.scale.data.fill_(1.0)
    assert calibrated_error < _relative_error(w4a8(test), reference)


@pytest.mark.parametrize("name", EXAMPLES)
def test_original_model_is_bit_identical_after_quantize(name):
    build, shape = EXAMPLES[name]
    model = build().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = ptqat_fx.quantize(model, (torch.randn(shape),), _data(shape), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and gm.training
    assert not any(isinstance(m, FakeQuantizer) for m in model.modules())


def test_quantize_is_deterministic():
    build, shape = EXAMPLES["resnet"]
    runs = [ptqat_fx.quantize(build(), (torch.randn(shape),), _data(shape), progress=False) for _ in range(2)]
    scales = [{k: q.scale.detach() for k, q in quantizers(gm).items()} for gm in runs]
    assert scales[0].keys() == scales[1].keys()
    assert all(torch.equal(scales[0][k], scales[1][k]) for k in scales[0])


def test_calibration_batches_may_carry_labels():
    build, shape = EXAMPLES["mlp"]
    labelled = [(x, torch.zeros(shape[0], dtype=torch.long)) for x in _data(shape)]
    gm = ptqat_fx.quantize(build(), (torch.randn(shape),), labelled, progress=False)
    assert all(q.calibrated for q in quantizers(gm).values())


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_untraceable_model_raises_trace_error_naming_module_and_line():
    with pytest.raises(TraceError) as error:
        trace(DataDependent())
    message = str(error.value)
    assert "'gate'" in message
    assert "if x.sum() > 0" in message
    assert "leaf_modules=['gate']" in message


def test_item_assignment_raises_trace_error():
    class Assign(nn.Module):
        def forward(self, x):
            x[:, 0] = 0
            return x

    with pytest.raises(TraceError, match="item assignment"):
        trace(Assign())


def test_example_inputs_must_be_a_tuple():
    with pytest.raises(InputError, match="example_inputs"):
        ptqat_fx.quantize(mlp.build(), torch.randn(2, 784), progress=False)


def test_example_inputs_must_run_on_the_eager_model():
    with pytest.raises(InputError, match="example_inputs"):
        ptqat_fx.quantize(mlp.build(), (torch.randn(2, 5),), progress=False)


def test_empty_calibration_data():
    with pytest.raises(CalibrationError, match="no batch"):
        ptqat_fx.quantize(mlp.build(), (torch.randn(2, 784),), [], progress=False)


def test_non_finite_calibration_batch_is_named():
    data = _data((2, 784), batches=3)
    data[2][0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="batch 2"):
        ptqat_fx.quantize(mlp.build(), (torch.randn(2, 784),), data, progress=False)


def test_zero_weights_and_activations_give_finite_scales():
    model = mlp.build()
    with torch.no_grad():
        model.fc2.weight.zero_()
    gm = ptqat_fx.quantize(model, (torch.zeros(2, 784),), [torch.zeros(2, 784)], progress=False)
    for quantizer in quantizers(gm).values():
        assert torch.isfinite(quantizer.scale).all() and (quantizer.scale > 0).all()
    assert torch.isfinite(gm(torch.randn(2, 784))).all()


def test_one_shot_iterator_serves_calibration_and_analysis():
    data = _data((2, 784), batches=3)
    gm = ptqat_fx.quantize(mlp.build(), (data[0],), iter(data), progress=False)
    assert all(spec.discrepancy for spec in layer_specs(gm))


class KeywordMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x, *, mask=None):
        y = self.a(x)
        if mask is not None:
            y = y * mask
        return self.b(y)


def test_keyword_inputs_calibrate_by_name():
    model = KeywordMask()
    generator = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(8, 4, generator=generator), "mask": (torch.rand(8, 4, generator=generator) > 0.5).float()}
               for _ in range(3)]
    gm = ptqat_fx.quantize(model, (batches[0]["x"],), batches, QuantConfig(w_bits=8, a_bits=8),
                           example_kwargs={"mask": batches[0]["mask"]}, progress=False)
    assert [s.name for s in layer_specs(gm)] == ["a", "b"]
    assert all(spec.discrepancy for spec in layer_specs(gm))
    reference = model(batches[1]["x"], mask=batches[1]["mask"])
    assert _relative_error(gm(batches[1]["x"], mask=batches[1]["mask"]), reference) < 0.05


def test_keyword_inputs_need_dict_batches():
    model = KeywordMask()
    x, mask = torch.randn(2, 4), torch.ones(2, 4)
    with pytest.raises(InputError, match="batch 0"):
        ptqat_fx.quantize(model, (x,), [x], example_kwargs={"mask": mask}, progress=False)
