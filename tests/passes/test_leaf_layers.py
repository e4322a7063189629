"""Layers inside leaves (modules whose forward runs eagerly) are first-class: reported with
their kind and bits, analysed at module level, selectable and trained; frozen leaves stay
frozen during finetune (BatchNorm statistics); layer subclasses with their own forward are
quantized where that forward ends in the base function on ``self.weight``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptqat_fx
from ptqat_fx import QuantConfig, Select
from ptqat_fx.coverage import coverage
from ptqat_fx.layer_spec import layer_specs
from ptqat_fx.meta import auto_leaves
from ptqat_fx.runtime.quantized_modules import is_quantized_layer
from tests.capture.test_shape_idioms import FoldSequence as Fold

G = torch.Generator().manual_seed(0)
X = torch.randn(6, 3, 8, 8, generator=G)


class ConvBlock(nn.Module):
    """conv -> BN -> ReLU behind a branch on tensor values: a leaf (nested capture)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        if x.abs().sum() < 0:  # never true: a branch on values, which does not trace
            x = -x
        return self.drop(torch.relu(self.bn(self.conv(x))))


class LeafNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ConvBlock()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.block(x).mean((2, 3)))


def _trained_bn(model: nn.Module) -> nn.Module:
    # Non-trivial running statistics, so that a train-mode step would visibly move them.
    model.train()
    with torch.no_grad():
        model(X)
    return model.eval()


def test_report_lists_leaf_layers_with_kind_and_bits_and_agrees_with_coverage():
    gm = ptqat_fx.quantize(_trained_bn(LeafNet()), (X,), [X], progress=False)
    rows = {row.name: row for row in ptqat_fx.report(gm).rows}
    assert set(rows) == {"block.conv", "head"}
    assert (rows["block.conv"].kind, rows["block.conv"].w_bits, rows["block.conv"].a_bits) == ("conv2d", 4, 8)  # W4A8 default
    assert len(rows) == coverage(gm).quantized == coverage(gm).layers == 2
    text = str(ptqat_fx.report(gm))
    assert "2 quantizable layers" in text and "block.conv" in text


def test_leaf_layer_discrepancy_is_its_module_output_against_float():
    model = _trained_bn(LeafNet())
    gm = ptqat_fx.quantize(model, (X,), [X], progress=False)
    conv = gm.get_submodule("block.conv")
    spec = conv.layer_spec
    with torch.no_grad():
        float_out = model.block.conv(X)
        quantized = F.conv2d(conv.input_quantizer(X), conv.weight_fake_quant(model.block.conv.weight), conv.bias, 1, 1)
    per_sample = (quantized - float_out).flatten(1).norm(dim=1) / float_out.flatten(1).norm(dim=1)
    assert spec.discrepancy["accumulated.relative"] == pytest.approx(per_sample.mean().item(), rel=1e-5)
    assert spec.discrepancy["accumulated.relative"] > 0


def _finetune(gm, steps=3):
    target = torch.randn(6, 2, generator=G)
    ptqat_fx.finetune(gm, [(X, target)], loss=nn.functional.mse_loss, steps=steps, lr=1e-2, progress=False)


def test_selected_leaf_layer_is_trained():
    gm = ptqat_fx.quantize(_trained_bn(LeafNet()), (X,), [X], select=Select("all"), progress=False)
    weight = gm.get_parameter("block.conv.weight")
    assert weight.requires_grad and gm.get_submodule("block.conv").layer_spec.selected
    before = weight.detach().clone()
    _finetune(gm)
    assert not torch.equal(before, weight)


def test_frozen_leaf_keeps_batchnorm_statistics_and_weights_during_finetune():
    # "fewest": the smaller layer (head, 18 parameters) is trained, the leaf's conv frozen.
    gm = ptqat_fx.quantize(_trained_bn(LeafNet()), (X,), [X], select=Select("fewest", fraction=0.5), progress=False)
    assert [r.name for r in ptqat_fx.report(gm).rows if r.selected] == ["head"]
    bn = gm.get_submodule("block.bn")
    saved = {k: v.clone() for k, v in bn.state_dict().items()}
    weight = gm.get_parameter("block.conv.weight").detach().clone()
    gm.train()
    head = gm.get_parameter("head.weight").detach().clone()
    _finetune(gm)
    assert all(torch.equal(saved[k], v) for k, v in bn.state_dict().items())  # num_batches_tracked too
    assert torch.equal(weight, gm.get_parameter("block.conv.weight"))
    assert not torch.equal(head, gm.get_parameter("head.weight"))
    assert bn.training and gm.get_submodule("block.drop").training  # train mode restored afterwards


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _tied_reference(gm, x):
    """The tied model from its own quantizers, one weight quantizer for both uses."""
    specs = {s.name: s for s in layer_specs(gm)}
    wq = gm.get_submodule(specs["a"].weight_quantizer)
    w = wq(gm.get_parameter("a.weight"))
    h = F.linear(gm.get_submodule(specs["a"].input_quantizers[0])(x), w, gm.a.bias)
    return F.linear(gm.get_submodule(specs["b"].input_quantizers[0])(torch.relu(h)), w, gm.b.bias)


def test_tied_weight_gets_one_quantizer_and_stays_tied_through_finetune():
    x = torch.randn(16, 4, generator=G)
    for select in (Select("all"), Select("fewest", fraction=0.5)):
        gm = ptqat_fx.quantize(Tied(), (x,), [x], select=select, progress=False)
        specs = {s.name: s for s in layer_specs(gm)}
        assert gm.get_submodule(specs["a"].weight_quantizer) is gm.get_submodule(specs["b"].weight_quantizer)
        assert gm.get_parameter("a.weight").requires_grad  # trained once, whichever use is selected
        assert coverage(gm).quantized == 2
        target = torch.randn(16, 4, generator=G)
        ptqat_fx.finetune(gm, [(x, target)], loss=F.mse_loss, steps=3, lr=1e-2, progress=False)
        gm.eval()
        with torch.no_grad():
            torch.testing.assert_close(gm(x), _tied_reference(gm, x))


class TiedLeaf(Tied):
    def forward(self, x):
        if x.sum() > 1e9:
            return x
        return self.b(self.a(x))


def test_tied_weight_inside_a_leaf_gets_one_quantizer():
    x = torch.randn(8, 4, generator=G)
    gm = ptqat_fx.quantize(nn.Sequential(TiedLeaf()), (x,), [x], progress=False)
    assert gm.get_submodule("0.a").weight_fake_quant is gm.get_submodule("0.b").weight_fake_quant


class SamePadConv(nn.Conv2d):
    """EfficientNet's Conv2dStaticSamePadding: pad in forward, then the base function."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StandardizedConv(nn.Conv2d):
    """timm's StdConv2d: the weight is transformed before the conv; quantizing self.weight
    would not put the conv's weight on the grid."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, 1, 1)


class Inner(nn.Module):
    """Traceable: inside a nested capture it becomes a graph in which the subclass stays a call."""

    def __init__(self):
        super().__init__()
        self.same = SamePadConv(8, 8, 3, bias=False)

    def forward(self, x):
        return torch.relu(self.same(x))


class SubclassLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.same = SamePadConv(3, 8, 3)
        self.std = StandardizedConv(8, 8, 3)
        self.inner = Inner()

    def forward(self, x):
        if x.abs().sum() < 0:
            x = -x
        return self.inner(self.std(self.same(x)))


def test_layer_subclasses_are_quantized_where_their_forward_ends_in_the_base_call():
    model = nn.Sequential(SubclassLeaf()).eval()
    gm = ptqat_fx.quantize(model, (X,), [X], QuantConfig(w_bits=8), progress=False)
    same = gm.get_submodule("0.same")
    assert is_quantized_layer(same) and isinstance(same, SamePadConv)
    assert is_quantized_layer(gm.get_submodule("0.inner.same"))
    with torch.no_grad():
        expected = F.conv2d(F.pad(same.input_quantizer(X), (1, 1, 1, 1)), same.weight_fake_quant(model[0].same.weight),
                            same.bias)
        torch.testing.assert_close(same(X), expected)
        assert not torch.equal(same(X), model[0].same(X))
    assert "same" not in dict(same.named_parameters()) and "weight" in dict(same.named_parameters())
    (leaf,) = auto_leaves(gm)
    assert leaf.float_layers == [
        "0.std (StandardizedConv subclasses Conv2d with a forward that does not pass self.weight to the Conv2d function)"
    ]
    assert coverage(gm).float_layers == ["0.std"]
    assert {r.name for r in ptqat_fx.report(gm).rows} == {"0.same", "0.inner.same"}
    assert "left in float: 0.std" in str(ptqat_fx.report(gm))


def test_report_header_names_the_captured_shapes():
    x = torch.randn(2, 3, 2, 5, 5, generator=G)
    first = str(ptqat_fx.report(ptqat_fx.quantize(Fold(), (x,), [x], progress=False))).splitlines()[0]
    assert first == "captured for input shapes x [2, 3, 2, 5, 5] (other shapes are refused)"
    general = str(ptqat_fx.report(ptqat_fx.quantize(LeafNet().eval(), (X,), [X], progress=False))).splitlines()[0]
    assert general.startswith("captured for any input shape")



class KeepPositive(nn.Module):
    """How many rows ``b`` sees depends on the sign of ``a``'s output, which 4-bit weights
    flip for some of 2000 rows: the two sides call ``b`` with different shapes."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h[h[:, 0] > 0]).sum(0)


class KeepPositiveLeaf(KeepPositive):
    def forward(self, x):
        if x.sum() > 1e9:  # a branch on values: a leaf
            return x[:1, :2]
        return super().forward(x)


@pytest.mark.parametrize("leaf", [False, True], ids=["graph", "leaf"])
def test_layer_called_with_other_shapes_on_each_side_is_measured_on_its_float_input(leaf):
    from ptqat_fx.passes.discrepancy import discrepancy

    x = torch.randn(2000, 4, generator=G)
    gm = ptqat_fx.quantize(nn.Sequential(KeepPositiveLeaf() if leaf else KeepPositive()), (x,), [x], select=None,
                           progress=False)
    assert bool(auto_leaves(gm)) == leaf
    discrepancy(gm, [x], 1, modes=("accumulated", "local"), progress=False)
    measured = next(s for s in layer_specs(gm) if s.name.endswith("b") or s.weight == "0.b.weight").discrepancy
    assert measured["accumulated.relative"] == measured["local.relative"] > 0


class LinearBN(nn.Module):
    """A BatchNorm after a linear: folding does not take it, so it stays in the graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.bn(self.fc(x)))


def test_graph_batchnorm_with_frozen_affine_keeps_its_statistics_during_finetune():
    x = torch.randn(32, 4, generator=G)
    gm = ptqat_fx.quantize(LinearBN(), (x,), [x], select=Select("all"), progress=False)
    bn = next(m for m in gm.modules() if isinstance(m, nn.BatchNorm1d))
    assert not any(p.requires_grad for p in bn.parameters())
    saved = {k: v.clone() for k, v in bn.state_dict().items()}
    ptqat_fx.finetune(gm, [(x, torch.randn(32, 1, generator=G))], loss=F.mse_loss, steps=2, progress=False)
    assert all(torch.equal(saved[k], v) for k, v in bn.state_dict().items())
