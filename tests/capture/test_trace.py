"""trace(): TraceError messages, automatic leaves, structured and keyword inputs, shared layers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqat_fx
from ptqat_fx import TraceError
from ptqat_fx.layer_spec import layer_specs
from ptqat_fx.capture import AUTO_LEAVES_KEY, trace


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)


class Assigns(nn.Module):
    def forward(self, x):
        x = x.clone()
        x[:, 0] = 0
        return x


class NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            gate = self.fc(x).sigmoid()
        return x * gate


class Loops(nn.Module):
    def forward(self, x):
        return torch.stack([x[i] * i for i in range(x.shape[0])])


class Outer(nn.Module):
    """Traceable itself; its child ``inner`` is not, and two siblings fail differently."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.inner = Branchy()
        self.assign = Assigns()
        self.post = nn.Linear(4, 4)

    def forward(self, x):
        return self.post(self.assign(self.inner(self.pre(x))))


class BranchyRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.mean() > 0 else self.fc(x * 2)


X = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "module, line, fix",
    [
        (Branchy(), "if x.sum() > 0:", "concrete_args"),
        (Assigns(), "x[:, 0] = 0", "out of place"),
        (NoGrad(), "with torch.no_grad():", ".detach()"),
        (Loops(), "for i in range(x.shape[0])", "concrete_args"),
    ],
)
def test_trace_error_names_module_line_and_fix(module, line, fix):
    model = nn.Sequential(nn.Linear(4, 4), module)
    with pytest.raises(TraceError) as error:
        trace(model)
    message = str(error.value)
    assert "module '1'" in message and line in message and fix in message
    assert "leaf_modules=['1']" in message


def test_strict_quantize_raises_naming_the_deepest_module():
    with pytest.raises(TraceError, match=r"module 'inner' at .*test_trace.py:\d+: \"if x.sum\(\) > 0:\""):
        ptqat_fx.quantize(Outer(), (X,), strict=True, progress=False)


def test_auto_leaf_makes_each_deepest_failing_module_a_leaf_and_records_why():
    model = Outer().eval()
    gm = trace(model, auto_leaf=True)
    leaves = gm.meta[AUTO_LEAVES_KEY]
    assert [leaf.path for leaf in leaves] == ["inner", "assign"]
    assert "control flow" in leaves[0].error and "if x.sum() > 0:" in leaves[0].line
    assert "item assignment" in leaves[1].error and "x[:, 0] = 0" in leaves[1].line
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["pre", "inner", "assign", "post"]
    assert torch.equal(gm(X), model(X)) and torch.equal(gm(-X), model(-X))


def test_auto_leaf_keeps_no_grad_semantics():
    model = nn.Sequential(nn.Linear(4, 4), NoGrad())
    gm = trace(model, auto_leaf=True)
    x = X.clone().requires_grad_()
    gm(x).sum().backward()
    reference = X.clone().requires_grad_()
    model(reference).sum().backward()
    assert torch.equal(x.grad, reference.grad)
    assert model[1].fc.weight.grad is None


def test_untraceable_root_forward_runs_as_one_leaf():
    model = BranchyRoot()
    gm = trace(model, auto_leaf=True)
    assert [leaf.path for leaf in gm.meta[AUTO_LEAVES_KEY]] == ["model"]
    assert torch.equal(gm(X), model(X)) and torch.equal(gm(-X), model(-X))


def test_auto_leaf_layers_are_quantized_and_listed():
    gm = ptqat_fx.quantize(Outer(), (X,), [X, -X], progress=False)
    (inner, assign) = gm.meta[AUTO_LEAVES_KEY]
    assert inner.quantized == ["inner.fc"] and inner.float_layers == []
    assert assign.quantized == [] and assign.float_layers == []
    assert gm.get_submodule("inner.fc.weight_fake_quant").calibrated
    assert gm.get_submodule("inner.fc.input_quantizer").calibrated


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, batch, metas, mode="sum", scale=None):
        feats = [self.fc(batch["image"]) * meta["weight"] for meta in metas]
        out = sum(feats) if mode == "sum" else torch.stack(feats).amax(0)
        return out * scale if scale is not None else out


def _metas():
    return [{"weight": torch.full((1,), float(i + 1)), "camera": f"cam{i}"} for i in range(3)]


def test_nested_inputs_are_traced_through_and_non_tensors_fixed():
    model = DictModel()
    batch = {"image": X}
    gm = trace(model, example_inputs=({"image": X}, _metas(), "max"))
    assert torch.equal(gm(batch, _metas(), "max"), model(batch, _metas(), "max"))
    assert gm.meta[AUTO_LEAVES_KEY] == []
    assert sum(n.op == "call_module" for n in gm.graph.nodes) == 3


def test_keyword_inputs_and_explicit_concrete_args():
    model = DictModel()
    scale = torch.tensor(2.0)
    gm = trace(model, example_inputs=({"image": X}, _metas()), example_kwargs={"scale": scale},
               concrete_args={"mode": "sum"})
    assert torch.equal(gm({"image": X}, _metas(), scale=scale), model({"image": X}, _metas(), scale=scale))


def test_quantize_takes_structured_inputs():
    model = DictModel()
    example = ({"image": X}, _metas())
    gm = ptqat_fx.quantize(model, example, [example], progress=False)
    assert [spec.name for spec in layer_specs(gm)] == ["fc", "fc#1", "fc#2"]
    assert ((gm(*example) - model(*example)).norm() / model(*example).norm()) < 0.1


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.step = nn.Linear(4, 4)

    def forward(self, x):
        for _ in range(3):
            x = torch.relu(self.step(x))
        return x


def test_module_called_at_several_places_shares_its_weight_quantizer():
    gm = ptqat_fx.quantize(Reused(), (X,), progress=False)
    specs = layer_specs(gm)
    assert [spec.name for spec in specs] == ["step", "step#1", "step#2"]
    assert {spec.weight_quantizer for spec in specs} == {"step.weight_fake_quant"}
    assert len({spec.input_quantizers for spec in specs}) == 3
