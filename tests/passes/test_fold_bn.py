"""fold_bn against the eval-mode Conv -> BN it replaces."""
from __future__ import annotations

import torch
from torch import nn

from ptqat_fx.passes.fold_bn import fold_bn, fused_conv
from ptqat_fx.capture import trace
from examples import resnet_small


def test_folded_resnet_equals_eager_and_has_no_batchnorm():
    model = resnet_small.build()
    x = torch.randn(2, 3, 32, 32)
    gm = fold_bn(trace(resnet_small.build()))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert torch.allclose(gm(x), model(x), rtol=1e-4, atol=1e-5)
    folded = [n for n in gm.graph.nodes if "folded_bn" in n.meta]
    assert len(folded) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_conv_output_used_twice_is_not_folded():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = nn.BatchNorm2d(2).eval()

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = TwoUses().eval()
    model.bn.running_mean.fill_(0.5)
    gm = fold_bn(trace(model))
    assert isinstance(gm.get_submodule("bn"), nn.BatchNorm2d)
    x = torch.randn(1, 2, 4, 4)
    assert torch.allclose(gm(x), model(x))


def test_fused_conv_leaves_the_conv_alone_and_owns_its_parameters():
    conv, bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4).eval()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 2.0)
    before = conv.weight.detach().clone()
    fused = fused_conv(conv, bn)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(fused(x), bn(conv(x)), rtol=1e-5, atol=1e-6)
    assert torch.equal(conv.weight, before) and conv.bias is None
    assert fused.weight is not conv.weight and fused.weight.data_ptr() != conv.weight.data_ptr()
    assert fused.bias is not None
