"""quantize_joins: one quantizer shared by all inputs of each add and concat."""
from __future__ import annotations

import operator

import torch
from torch import nn

import ptqat_fx
from ptqat_fx.meta import join_quantizer

G = torch.Generator().manual_seed(0)


class Joins(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.fuse = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x) * 10
        width = a.shape[1] + b.shape[1]  # integer arithmetic: not a join of activations
        return self.fuse(torch.cat([a, b], dim=1))[:, : width // 2] + a


def _join_nodes(gm):
    return [n for n in gm.graph.nodes if join_quantizer(n) is not None]


def test_add_and_cat_inputs_share_one_quantizer_covering_all_inputs():
    x = torch.randn(2, 3, 6, 6, generator=G)
    config = ptqat_fx.QuantConfig(w_bits=8, share_join_quantizers=True, a_observer="minmax")
    model = Joins()
    gm = ptqat_fx.quantize(model, (x,), [x], config, progress=False)
    joins = _join_nodes(gm)
    assert [n.target for n in joins] == [torch.cat, operator.add]
    cat = joins[0]
    target = join_quantizer(cat)
    assert [value.target for value in cat.args[0]] == [target, target]
    with torch.no_grad():
        largest = max(model.a(x).abs().max(), (model.b(x) * 10).abs().max())
    torch.testing.assert_close(gm.get_submodule(target).scale, (largest / 127).reshape(1))
    assert ((gm(x) - model(x)).norm() / model(x).norm()) < 0.03


def test_off_by_default():
    x = torch.randn(2, 3, 6, 6, generator=G)
    gm = ptqat_fx.quantize(Joins(), (x,), [x], progress=False)
    assert not _join_nodes(gm)
