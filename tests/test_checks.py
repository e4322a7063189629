"""Clear errors for what users really pass: each names the culprit and the fix."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ptqat_fx

CONFIG = ptqat_fx.QuantConfig(w_observer="minmax", a_observer="minmax")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def _quantize(calib_data=None, config=CONFIG, select=ptqat_fx.Select("small"), **kwargs):
    return ptqat_fx.quantize(_model(), (X,), calib_data, config, select, progress=False, **kwargs)


@pytest.mark.parametrize("calib_data,message", [
    ([X, None], r"calib_data batch 1 is None"),
    ([{"x": X}], r"calib_data batch 0 is a dict with keys \['x'\]: pass example_kwargs="),
    ([X, X.double()], r"calib_data batch 1, input 0, is a torch.float64 tensor .*example_inputs\[0\] is a torch.float32"),
    ([X, torch.randn(4, 9)], r"calib_data batch 1, input 0, is a torch.float32 tensor of shape \(4, 9\)"),
    (torch.randn(64, 8), r"calib_data is one tensor of shape \(64, 8\).*\[calib_data\]"),
], ids=["none", "dict-without-example-kwargs", "dtype", "shape", "one-big-tensor"])
def test_bad_calibration_batches_are_named(calib_data, message):
    with pytest.raises(ptqat_fx.InputError, match=message):
        _quantize(calib_data)


def test_other_batch_size_is_accepted():
    qmodel = _quantize([X, torch.randn(7, 8)])
    assert torch.isfinite(qmodel(X)).all()


def test_select_and_config_in_the_forms_users_write():
    by_name = _quantize([X], config={"w_observer": "minmax", "a_observer": "minmax"}, select="all")
    assert by_name.meta["ptqat_config"] == CONFIG
    assert all(p.requires_grad for p in by_name.parameters())
    with pytest.raises(ptqat_fx.ConfigError, match=r"\['bitz'\] are not QuantConfig fields"):
        _quantize([X], config={"bitz": 4})
    with pytest.raises(ptqat_fx.ConfigError, match="Select.strategy='smal'"):
        _quantize([X], select="smal")
    with pytest.raises(ptqat_fx.ConfigError, match="select=0.5: pass a Select"):
        _quantize([X], select=0.5)
    with pytest.raises(ptqat_fx.ConfigError, match="Select.fraction='0.5': must be a number"):
        ptqat_fx.Select(fraction="0.5")


def test_skip_pattern_that_matches_nothing_warns():
    with pytest.warns(UserWarning, match="skip pattern 'head.\\*' matches no module path"):
        _quantize([X], config=ptqat_fx.QuantConfig(skip=("head.*",)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _quantize([X], config=ptqat_fx.QuantConfig(skip=("2", "linear")), select=None)


@pytest.mark.parametrize("config,select,cause", [
    (ptqat_fx.QuantConfig(skip=("linear",)), ptqat_fx.Select("all"), r"QuantConfig.skip=\('linear',\)"),
    (CONFIG, ptqat_fx.Select("small", theta=0.0), "Select.theta=0.0"),
])
def test_nothing_trainable_warns_naming_the_cause(config, select, cause):
    with pytest.warns(UserWarning, match=f"nothing in the quantized model is trainable: {cause}"):
        _quantize([X], config=config, select=select)


@pytest.mark.parametrize("verb", ["convert", "report", "export_onnx", "finetune"])
def test_float_model_is_refused_by_every_verb(verb, tmp_path):
    model = torch.fx.symbolic_trace(_model())
    calls = {
        "convert": lambda: ptqat_fx.convert(model),
        "report": lambda: ptqat_fx.report(model),
        "export_onnx": lambda: ptqat_fx.export_onnx(model, (X,), tmp_path / "m.onnx"),
        "finetune": lambda: ptqat_fx.finetune(model, [X], teacher=model, progress=False),
    }
    with pytest.raises(ptqat_fx.InputError, match=f"{verb} was given a Sequential that ptqat_fx.quantize never made.*quantize it first"):
        calls[verb]()


@pytest.mark.parametrize("verb", ["convert", "export_onnx"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_is_refused_at_convert_and_export(verb, dtype, tmp_path):
    qmodel = _quantize([X]).to(dtype)
    call = {"convert": lambda: ptqat_fx.convert(qmodel),
            "export_onnx": lambda: ptqat_fx.export_onnx(qmodel, (X.to(dtype),), tmp_path / "m.onnx")}[verb]
    with pytest.raises(ptqat_fx.InputError, match=f"{verb} needs a float32 model, but '.*' is {dtype}: call model.float"):
        call()
