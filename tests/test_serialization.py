"""save/load: bit-identical round trips, and files that are truncated, corrupted or crafted."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import ptqat_fx
from ptqat_fx.meta import config
from ptqat_fx.digest import digests
from ptqat_fx.layer_spec import layer_specs
from ptqat_fx.runtime.quantizer import quantizers
from tests.export.quantized_examples import EXAMPLES, example_input, quantized


def _structure(gm):
    return [(n.name, n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes]


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_round_trip_is_bit_identical(name, tmp_path):
    qmodel = quantized(name, 4).train()
    specs = layer_specs(qmodel)
    for index, spec in enumerate(specs):  # a PTQAT selection: every other layer trainable
        spec.selected = index % 2 == 0
        if not spec.selected and spec.weight is not None:
            qmodel.get_parameter(spec.weight).requires_grad_(False)
            qmodel.get_submodule(spec.weight_quantizer).scale.requires_grad_(False)
    ptqat_fx.save(qmodel, tmp_path / "m.ptqat")
    loaded = ptqat_fx.load(tmp_path / "m.ptqat")

    x = example_input(name, seed=9)
    assert torch.equal(loaded(x), qmodel(x)) and loaded.training
    assert _structure(loaded) == _structure(qmodel)
    assert layer_specs(loaded) == specs
    assert [(n, p.requires_grad) for n, p in loaded.named_parameters()] == [
        (n, p.requires_grad) for n, p in qmodel.named_parameters()
    ]
    state, loaded_state = qmodel.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) and state[k].dtype == loaded_state[k].dtype for k in state)
    for path, quantizer in quantizers(loaded).items():
        original = qmodel.get_submodule(path)
        assert (quantizer.mode, quantizer.qmin, quantizer.qmax, quantizer.channel_axis) == (
            original.mode, original.qmin, original.qmax, original.channel_axis)
    assert config(loaded) == config(qmodel)
    # The loaded model trains like the original: same gradients on the trainable set.
    loaded(x).sum().backward()
    qmodel(x).sum().backward()
    for (n, p), (_, q) in zip(loaded.named_parameters(), qmodel.named_parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), n


def test_converted_model_round_trips(tmp_path):
    converted = ptqat_fx.convert(quantized("vit", 4), pack_int4_weights=True)
    ptqat_fx.save(converted, tmp_path / "c.ptqat")
    loaded = ptqat_fx.load(tmp_path / "c.ptqat")
    x = example_input("vit")
    assert torch.equal(loaded(x), converted(x)) and not loaded.training
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in converted.state_dict().items()}


def test_truncated_and_corrupted_files_raise_clearly(tmp_path):
    ptqat_fx.save(quantized("mlp", 8), tmp_path / "m.ptqat")
    data = (tmp_path / "m.ptqat").read_bytes()
    (tmp_path / "truncated").write_bytes(data[: len(data) // 2])
    with pytest.raises(ptqat_fx.SerializationError, match="truncated or corrupted"):
        ptqat_fx.load(tmp_path / "truncated")
    (tmp_path / "garbage").write_bytes(b"not a model" * 100)
    with pytest.raises(ptqat_fx.SerializationError, match="truncated or corrupted"):
        ptqat_fx.load(tmp_path / "garbage")
    torch.save({"format": "other", "weights": torch.zeros(2)}, tmp_path / "foreign")
    with pytest.raises(ptqat_fx.SerializationError, match="not written by ptqat_fx.save"):
        ptqat_fx.load(tmp_path / "foreign")


def _crafted(tmp_path, edit):
    """A saved MLP whose graph description was edited by ``edit`` (as an attacker could)."""
    ptqat_fx.save(quantized("mlp", 8), tmp_path / "m.ptqat")
    payload = torch.load(tmp_path / "m.ptqat", weights_only=True)
    description = json.loads(payload["description"])
    edit(description)
    payload["description"] = json.dumps(description)
    payload["digest"] = digests(payload["description"], payload["tensors"])  # as an attacker would
    torch.save(payload, tmp_path / "crafted")
    return tmp_path / "crafted"


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["nodes"][1].update(op="call_function", target="os.system"), "not an allowed function"),
        (lambda d: d["nodes"][1].update(op="call_method", target="__reduce__"), "not a Python identifier"),
        (lambda d: d["nodes"][0].update(target="x=__import__('os')"), "not a Python identifier"),
        (lambda d: d["modules"][0].update({"class": "Module.__subclasses__"}), "not a Python identifier"),
        (lambda d: next(n for n in d["nodes"] if n["op"] == "get_attr").update(target="fc1.__class__"), "not a Python identifier"),
    ],
    ids=["function", "dunder-method", "placeholder", "module-class", "attribute"],
)
def test_crafted_descriptions_are_refused(tmp_path, edit, message):
    with pytest.raises(ptqat_fx.SerializationError, match=message):
        ptqat_fx.load(_crafted(tmp_path, edit))


def test_modules_that_need_code_are_refused_at_save(tmp_path):
    class Scale(nn.Module):
        def forward(self, x):
            return x * 2

    model = nn.Sequential(nn.Linear(4, 4), Scale()).eval()
    x = torch.randn(2, 4)
    qmodel = ptqat_fx.quantize(model, (x,), [x], leaf_modules=[Scale], progress=False)
    with pytest.raises(ptqat_fx.SerializationError, match="module '1' is a .*Scale.*rebuilds only torch.nn"):
        ptqat_fx.save(qmodel, tmp_path / "m.ptqat")
    assert not (tmp_path / "m.ptqat").exists()


def test_ptqat_model_round_trips(tmp_path):
    """Frozen constants, frozen_conv and the fused quantized_* calls are saved too."""
    ptqat = quantized("vit", 4, select=ptqat_fx.Select()).train()
    ptqat_fx.save(ptqat, tmp_path / "p.ptqat")
    loaded = ptqat_fx.load(tmp_path / "p.ptqat")
    x = example_input("vit")
    assert torch.equal(loaded(x), ptqat(x)) and _structure(loaded) == _structure(ptqat)
    assert layer_specs(loaded) == layer_specs(ptqat)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in ptqat.named_parameters() if p.requires_grad
    ]
    # What unfuse needs (each fused node's plain form) survives, so the loaded model lowers.
    assert torch.equal(ptqat_fx.convert(loaded)(x), ptqat_fx.convert(ptqat)(x))
